"""Nested post-training reconstruction of the weight codes (GPTQ for both blocks at once).

FlexiQ runs one set of 8-bit weight codes ``q8`` at every ratio and extracts the 4-bit code
of a 4-bit channel from it, ``q4 = clip((q8 + 2^(s-1)) >> s, -8, 7)`` (``s`` the column's
shift, :mod:`flexiq_tvm.reference`).  Rounding every weight to its nearest code is what
collapses a network such as EfficientNet-Lite0 in 4-bit: the rounding errors of a layer's
weights add up in its outputs.  Optimal Brain Quantization / GPTQ (Frantar et al., NeurIPS 2022,
arXiv 2208.11580; ICLR 2023, arXiv 2210.17323) quantizes a layer's weights one input column at
a time and moves the columns not yet quantized to cancel the error already made, using the
inverse Hessian ``(X X^T)^-1`` of the layer's squared output error on calibration inputs.

Nesting (one set of 8-bit codes serves every ratio).  Two GPTQ processes run side by side
over the same columns, one for the 8-bit block and one for the 4-bit block, each compensating
its own error in its own copy of the weights.  At each column every weight's pair of codes is
chosen jointly: the candidates are the 4-bit codes around the 4-bit copy's value (and the one
the 8-bit copy's nearest code extracts to); each candidate ``k`` allows only the 8-bit codes
that extract to it, ``[k 2^s - 2^(s-1), k 2^s + 2^(s-1) - 1]`` (open-ended at the ends of the
4-bit range), of which the one nearest the 8-bit copy is taken; the pair minimising

    alpha * (8-bit error)^2 + (4-bit error)^2

wins.  ``alpha`` weighs the 8-bit block, which is every layer's block at ratio 0 (the INT8
baseline); the default 32 costs Lite0's ratio 0 0.5 pt of agreement and keeps most of GPTQ's
4-bit gain (docs/quantization.md and docs/results.md, measured).

Extraction stays the oracle's plain shift, and the codes live in the plan: the fake-quant
model, the oracle and every compiled path use them unchanged and stay bit-exact.  Only layers
eligible for 4-bit are reconstructed; columns are processed in descending Hessian diagonal
("act order"), with the usual 1 % dampening.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from . import reference as ref
from .plan import LayerPlan, codes_digest

log = logging.getLogger(__name__)


def _patches(lp: LayerPlan, x):
    """Layer input as ``(G, K, M)``: per group, the K = C_g*kh*kw values each output sees."""
    import torch.nn.functional as F

    if lp.kind == "linear":
        return x.reshape(-1, x.shape[-1]).T.unsqueeze(0)
    top, bottom, left, right = lp.padding
    if any(lp.padding):
        x = F.pad(x, (left, right, top, bottom))
    kh, kw = lp.weight_shape[2:]
    cols = F.unfold(x, (kh, kw), dilation=lp.dilation, stride=lp.stride)  # (N, C*kh*kw, L)
    n, ck, l_ = cols.shape
    g = lp.groups
    return cols.reshape(n, g, ck // g, l_).permute(1, 2, 0, 3).reshape(g, ck // g, n * l_)


def layer_hessians(model, layers: list[LayerPlan], x: np.ndarray, batch: int = 8) -> dict:
    """``{name: X X^T}`` per group, ``(G, K, K)`` float64, over the FP32 inputs ``x``."""
    import torch

    by_name = {lp.name: lp for lp in layers}
    hess: dict = {}
    mods = dict(model.named_modules())

    def hook(name):
        def fn(module, inputs, output):
            p = _patches(by_name[name], inputs[0].detach().float()).double()
            h = torch.bmm(p, p.transpose(1, 2))
            hess[name] = h if name not in hess else hess[name] + h
        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in by_name]
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])))
    finally:
        for h in handles:
            h.remove()
    return hess


def _grouped(a: np.ndarray, lp: LayerPlan) -> np.ndarray:
    """Weight-shaped array as ``(G, O_g, K)``."""
    g = lp.groups
    return a.reshape(g, a.shape[0] // g, -1)


def reconstruct_layer(lp: LayerPlan, w: np.ndarray, hess, damp: float = 0.01,
                      alpha: float = 32.0) -> dict:
    """Replace ``lp.w_codes`` by the nested GPTQ codes of FP32 weights ``w`` (in place).

    Returns the proxy errors ``tr((Q - W) H (Q - W)^T)`` of the 8-bit and the all-4-bit
    weights, before and after: ``{"l8": (before, after), "l4": (before, after)}``.
    """
    import torch

    scale = lp.w_scale.astype(np.float64).reshape((-1,) + (1,) * (w.ndim - 1))
    v = torch.from_numpy(_grouped(w.astype(np.float64) / scale, lp))
    shift = np.broadcast_to(ref.per_weight(lp.w_shift, lp.weight_shape, lp.groups),
                            lp.weight_shape)
    pow2 = torch.from_numpy(_grouped(2.0 ** shift.astype(np.float64), lp))[:, :1, :]
    half = torch.where(pow2 > 1, pow2 / 2, torch.zeros_like(pow2))
    h = hess.clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)
    diag[diag <= 0] = 1.0  # inputs never seen: plain rounding, no compensation
    h += damp * diag.mean(1).reshape(-1, 1, 1) * torch.eye(h.shape[1], dtype=h.dtype)
    # one column order for all groups: descending mean diagonal ("act order")
    order = torch.argsort(torch.diagonal(h, dim1=1, dim2=2).mean(0), descending=True)
    hp = h[:, order][:, :, order]
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)

    def bounds(k, p, hf):
        lo = torch.where(k <= -8, torch.full_like(k, -127.0), k * p - hf)
        hi = torch.where(k >= 7, torch.full_like(k, 127.0), k * p + p - hf - 1)
        return lo.clamp(-127, 127), hi.clamp(-127, 127)

    w8, w4 = v[:, :, order].clone(), v[:, :, order].clone()
    p2, hf2 = pow2[:, :, order], half[:, :, order]
    codes = torch.zeros_like(w8)
    for i in range(w8.shape[2]):
        c8, c4, p, hf = w8[:, :, i], w4[:, :, i], p2[:, :, i], hf2[:, :, i]
        fl = torch.floor(c4 / p)
        n8 = torch.round(c8).clamp(-127, 127)
        cands = torch.stack([fl, fl + 1, torch.floor((n8 + hf) / p)]).clamp(-8, 7)
        lo, hi = bounds(cands, p, hf)
        q8c = torch.minimum(torch.maximum(n8, lo), hi)
        cost = alpha * (c8 - q8c) ** 2 + (c4 - cands * p) ** 2
        pick = cost.argmin(0, keepdim=True)
        q8 = torch.gather(q8c, 0, pick)[0]
        q4 = torch.gather(cands, 0, pick)[0] * p
        codes[:, :, i] = q8
        row = u[:, i, i + 1:].unsqueeze(1)
        for wb, e in ((w8, c8 - q8), (w4, c4 - q4)):
            wb[:, :, i + 1:] -= (e / u[:, i, i].unsqueeze(1)).unsqueeze(2) * row
    new = np.empty(codes.shape, np.int32)
    new[:, :, order.numpy()] = codes.numpy()
    shift_g = _grouped(shift, lp)

    def errors(q: np.ndarray) -> tuple[float, float]:  # (8-bit, all-4-bit) proxy errors
        out = []
        for vals in (q, ref.lowered_value(q, shift_g, True)):
            d = torch.from_numpy(vals.astype(np.float64)) - v
            out.append(float(torch.einsum("gok,gkj,goj->", d, hess, d)))
        return out[0], out[1]

    before = errors(_grouped(lp.w_codes.astype(np.int32), lp))
    after = errors(new)
    if not lp.weight_digest:  # the compiler finds the layer by its nearest codes
        lp.weight_digest = codes_digest(lp.w_codes)
    lp.w_codes = new.reshape(lp.weight_shape).astype(np.int8)
    return {"l8": (before[0], after[0]), "l4": (before[1], after[1])}


def reconstruct(model, layers: list[LayerPlan], calib: np.ndarray, alpha: float = 32.0,
                progress: bool = True) -> dict:
    """Reconstruct the codes of every eligible layer of ``layers`` (in place).

    ``calib`` are the preprocessed calibration images (all are used).  Returns
    ``{"seconds", "layers": {name: {"l8": (before, after), "l4": (before, after)}}}``.
    """
    from tqdm import tqdm

    t0 = time.time()
    todo = [lp for lp in layers if lp.eligible]
    x = np.asarray(calib, np.float32)
    names = {lp.name for lp in todo}
    weights = {n: m.weight.detach().double().numpy() for n, m in model.named_modules()
               if n in names}
    hess = layer_hessians(model, todo, x)
    out = {}
    for lp in tqdm(todo, desc="reconstruct", unit=" layers", disable=None if progress else True,
                   leave=False):
        out[lp.name] = reconstruct_layer(lp, weights[lp.name], hess.pop(lp.name), alpha=alpha)
    secs = time.time() - t0
    log.info("reconstruct: %d layers, %.1f s", len(todo), secs)
    return {"seconds": round(secs, 2), "layers": out}
