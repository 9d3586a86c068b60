"""``quantize(model, calib_data, config) -> QuantPlan``: calibrate, extract, select.

Which layers are covered: every ``nn.Conv2d`` (regular, 1x1, depthwise, grouped) and
``nn.Linear`` (attention q/k/v/output projections, MLPs, patch merging) that the model calls
during calibration.  Eligible for 4-bit are all of them except, by default, the first and the
last covered layer (stem and classifier) and, if ``depthwise_low=False``, depthwise convs.
Activation x activation matmuls of attention (``q @ k^T``, ``attn @ v``) are not modules: they
stay in floating point in this version (the compiler reports them as kept in FP32).
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from . import bitops
from . import reference as ref
from .calibrate import LayerStats, calibrate
from .config import FlexiQConfig
from .plan import LayerPlan, QuantPlan, ratio_key

log = logging.getLogger(__name__)


class UnsupportedLayer(ValueError):
    """A covered-looking layer FlexiQ cannot express (kept in FP32 and reported)."""


def _same_padding(k: int, d: int) -> tuple[int, int]:
    total = d * (k - 1)
    return total // 2, total - total // 2


def _effective_padding(module, input_shape) -> tuple[int, int, int, int]:
    """Zero padding ``(top, bottom, left, right)`` the conv really applies to its input.

    ``nn.Conv2d`` subclasses may pad in their own ``forward`` (TensorFlow-style "same"
    padding, as in EfficientNet): the forward is probed once on a tensor of ones with
    ``F.conv2d`` intercepted, and the zero border of what reaches it is measured.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.overrides import TorchFunctionMode

    def explicit(pad, kernel, dilation):
        if pad == "valid":
            return (0, 0, 0, 0)
        if pad == "same":
            return (*_same_padding(kernel[0], dilation[0]), *_same_padding(kernel[1], dilation[1]))
        ph, pw = (pad, pad) if isinstance(pad, int) else tuple(pad)
        return (ph, ph, pw, pw)

    if type(module).forward is nn.Conv2d.forward:
        if module.padding_mode != "zeros":
            raise UnsupportedLayer(f"padding_mode={module.padding_mode!r}")
        return explicit(module.padding, module.kernel_size, module.dilation)

    calls = []

    class Capture(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.conv2d:
                calls.append((args, kwargs))
            return func(*args, **kwargs)

    x = torch.ones((1, *input_shape[1:]))
    with torch.no_grad(), Capture():
        module(x)
    if len(calls) != 1:
        raise UnsupportedLayer(f"forward calls conv2d {len(calls)} times")
    args, kwargs = calls[0]
    padded = args[0]
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, args)) | kwargs
    if padded.shape[1] != input_shape[1]:
        raise UnsupportedLayer("forward changes the channel count before conv2d")
    nz = (padded[0, 0] != 0).numpy()
    rows, cols = np.flatnonzero(nz.any(1)), np.flatnonzero(nz.any(0))
    extra = (int(rows[0]), int(nz.shape[0] - 1 - rows[-1]), int(cols[0]),
             int(nz.shape[1] - 1 - cols[-1]))
    if (nz.shape[0] - extra[0] - extra[1], nz.shape[1] - extra[2] - extra[3]) != tuple(
            input_shape[2:]) or not nz[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all():
        raise UnsupportedLayer("forward transforms the input beyond zero padding")
    inner = explicit(bound.get("padding", 0), module.kernel_size, module.dilation)
    return tuple(a + b for a, b in zip(extra, inner))


def _geometry(module, input_shape) -> dict:
    from torch import nn

    if isinstance(module, nn.Conv2d):
        return {"kind": "conv2d", "stride": tuple(module.stride),
                "padding": _effective_padding(module, input_shape),
                "dilation": tuple(module.dilation), "groups": int(module.groups)}
    return {"kind": "linear"}


def _layer_plans(stats: dict[str, LayerStats], cfg: FlexiQConfig,
                 skipped: dict[str, str]) -> list[LayerPlan]:
    names = list(stats)
    plans = []
    for idx, (name, st) in enumerate(stats.items()):
        m = st.module
        try:
            geo = _geometry(m, st.input_shape)
        except UnsupportedLayer as e:
            skipped[name] = str(e)
            log.warning("layer %s kept in FP32: %s", name, e)
            continue
        w = m.weight.detach().float().numpy()
        w_scale = ref.weight_scales(w)
        w_codes = ref.quantize_weight(w, w_scale)
        a_err = bitops.act_shift_errors(st.hist, st.act_signed)
        act_shift = bitops.choose_shifts(a_err, cfg.extraction)
        w_err = _weight_errors_per_input_channel(w_codes, geo)
        w_shift = bitops.choose_shifts(w_err, cfg.extraction)
        eligible, reason = True, ""
        if cfg.keep_first_8bit and idx == 0:
            eligible, reason = False, "first layer kept 8-bit"
        elif cfg.keep_last_8bit and idx == len(names) - 1:
            eligible, reason = False, "last layer kept 8-bit"
        lp = LayerPlan(
            name=name, weight_shape=tuple(w.shape), w_codes=w_codes, w_scale=w_scale,
            bias=None if m.bias is None else m.bias.detach().float().numpy().copy(),
            act_scale=float(st.act_scale), act_inv_scale=float(st.act_inv_scale),
            act_signed=bool(st.act_signed), act_shift=act_shift, w_shift=w_shift,
            order=np.arange(len(act_shift), dtype=np.int32), n_low={},
            eligible=eligible, reason=reason, macs_per_channel=st.macs_per_channel, **geo,
        )
        if lp.depthwise and not cfg.depthwise_low and eligible:
            lp.eligible, lp.reason = False, "depthwise kept 8-bit (depthwise_low=False)"
        plans.append(lp)
    return plans


def _group_columns(w_codes: np.ndarray, geo: dict) -> np.ndarray:
    """Weights as ``(O_g, C, ...)``: input channel ``c``'s column is its group's weights."""
    if geo.get("groups", 1) == 1:
        return w_codes
    g = geo["groups"]
    o, cg = w_codes.shape[:2]
    og = o // g
    # channel c = group*cg + j uses rows [group*og, (group+1)*og) of column j
    w = w_codes.reshape(g, og, cg, *w_codes.shape[2:])
    return np.moveaxis(w, 0, 1).reshape(og, g * cg, *w_codes.shape[2:])


def _weight_errors_per_input_channel(w_codes, geo) -> np.ndarray:
    return bitops.weight_shift_errors(_group_columns(w_codes, geo))


def _proxy_and_range(lp: LayerPlan, st: LayerStats) -> tuple[np.ndarray, np.ndarray]:
    geo = {"groups": lp.groups}
    wc = _group_columns(lp.w_codes, geo)
    if lp.groups > 1:
        og = lp.weight_shape[0] // lp.groups
        # scales follow the rows of each channel's group
        ws = lp.w_scale.reshape(lp.groups, og)
        # per-channel column energies with that group's row scales
        c = lp.in_channels
        cg = c // lp.groups
        proxy = np.empty(c)
        for g in range(lp.groups):
            sl = slice(g * cg, (g + 1) * cg)
            proxy[sl] = bitops.error_proxy(
                st.hist[sl], lp.act_signed, lp.act_scale, lp.act_shift[sl],
                lp.w_codes[g * og : (g + 1) * og], ws[g], lp.w_shift[sl])
        return proxy, bitops.range_score(st.hist, lp.act_signed, wc)
    proxy = bitops.error_proxy(st.hist, lp.act_signed, lp.act_scale, lp.act_shift,
                               lp.w_codes, lp.w_scale, lp.w_shift)
    return proxy, bitops.range_score(st.hist, lp.act_signed, wc)


def search_distance(model, fq, x, metric: str = "mse", on_call=None):
    """The channel search's measure of a candidate: ``distance(sets, pin=False) -> float``.

    ``fq`` (a :class:`FakeQuantModel`) runs with the candidate's 4-bit masks ``sets`` on the
    search batch ``x``; ``metric`` ``mse`` compares its outputs with the INT8 model's (``fq``
    with every mask empty, as it is when this is called), ``kl`` computes ``KL(FP32 ||
    candidate)`` of the softmax over each output's last axis, averaged over the batch and
    summed over the outputs (several heads).  Layer outputs are memoized on ``fq`` (call
    ``fq.memoize(None)`` when done): a candidate recomputes from its first changed layer on.
    """
    import torch

    from .baselines import kl_divergence

    def outputs(net, pin=False):  # every output, flattened side by side (several heads)
        out = net(x, pin=pin) if net is fq else net(x)
        outs = out if isinstance(out, tuple | list) else (out,)
        return [o.float().reshape(len(x), -1) for o in outs]

    with torch.no_grad():
        if metric == "kl":  # against the FP32 model: what agreement is judged on
            ref_out = [o.numpy() for o in outputs(model.eval())]
        elif metric == "mse":  # against the INT8 model
            ref_out = outputs(fq)
        else:
            raise ValueError(f"search metric {metric!r}; allowed: mse, kl")
    fq.memoize(x)

    def distance(sets: dict[str, np.ndarray], pin: bool = False) -> float:
        fq.set_masks(sets)
        if on_call is not None:
            on_call()
        with torch.no_grad():
            got = outputs(fq, pin)
        if metric == "kl":
            return float(sum(kl_divergence(r, o.numpy()) for r, o in zip(ref_out, got)))
        return float(torch.cat([(o - r) ** 2 for o, r in zip(got, ref_out)], 1).mean())

    return distance


def quantize(model, calib_data: np.ndarray, config: FlexiQConfig | None = None,
             model_name: str = "model", progress: bool = True, cache: dict | None = None
             ) -> QuantPlan:
    """Calibrate ``model`` on ``calib_data`` and select nested channel sets -> QuantPlan.

    Parameters
    ----------
    model
        FP32 ``torch.nn.Module`` (eval mode is set).
    calib_data
        float32 numpy batch (N, ...) of preprocessed inputs; the first ``config.calib_images``
        are used, the first ``config.search_images`` of them also drive the channel search.
    config
        :class:`FlexiQConfig`; default ``FlexiQConfig()``.
    cache
        Optional dict shared between calls on the same model and calibration data: the
        calibration statistics and the measured sensitivity curves are reused.
    """
    import torch

    from .fakequant import FakeQuantModel
    from .select import LayerInfo, Selector

    cfg = config or FlexiQConfig()
    t0 = time.time()
    calib = np.asarray(calib_data, np.float32)[: cfg.calib_images]
    key = ("calibration", id(model), calib.shape, hashlib.sha1(calib.tobytes()).hexdigest())
    if cache is not None and key in cache:
        stats = cache[key]
    else:
        stats = calibrate(model, calib, progress=progress)
        if cache is not None:
            cache[key] = stats
    if not stats:
        raise ValueError("the model has no Conv2d/Linear layer to quantize")
    skipped: dict[str, str] = {}
    layers = _layer_plans(stats, cfg, skipped)
    if not layers:
        raise ValueError(f"no layer can be quantized: {skipped}")
    t_calib = time.time() - t0
    recon = None
    if cfg.reconstruct:
        from .reconstruct import reconstruct

        recon = reconstruct(model, layers, calib, alpha=cfg.reconstruct_alpha,
                            progress=progress)
    infos = []
    for lp in layers:
        proxy, rng_score = _proxy_and_range(lp, stats[lp.name])
        infos.append(LayerInfo(lp.name, lp.in_channels, lp.macs_per_channel, lp.eligible,
                               proxy, rng_score))
    # the search measures distances with an INT8 plan (all n_low = 0)
    for lp in layers:
        lp.n_low = {ratio_key(r): 0 for r in cfg.ratios}
    plan = QuantPlan(model_name, cfg.ratios, cfg.to_dict(), layers)
    fq = FakeQuantModel(model, plan)
    x_search = torch.from_numpy(calib[: cfg.search_images])

    bar = None
    if progress and cfg.selection in ("greedy", "evolutionary"):
        from tqdm import tqdm

        # candidates measured so far (a count: how many the search takes depends on the model)
        bar = tqdm(desc=f"select ({cfg.selection})", unit=" candidates", disable=None,
                   leave=False)
    distance = search_distance(model, fq, x_search, cfg.search_metric,
                               bar.update if bar is not None else None)
    selector = Selector(infos, distance, cfg, cache)
    try:
        chosen = selector.run()
    finally:
        fq.memoize(None)
        if bar is not None:
            bar.close()
    for lp in layers:
        order, counts = chosen[lp.name]
        lp.order = order
        lp.n_low = {ratio_key(r): int(n) for r, n in counts.items()}
    plan.check_nested()
    plan.metrics = {
        "calibration_seconds": round(t_calib, 2),
        "selection_seconds": round(selector.seconds, 2),
        "selection_evaluations": selector.evaluations,
        "sensitivity_reused": selector.sensitivity_cached,
        "mac_fraction": {ratio_key(r): plan.mac_fraction(r) for r in cfg.ratios},
        "mac_fraction_all_covered": {ratio_key(r): plan.mac_fraction(r, False)
                                     for r in cfg.ratios},
        "channel_fraction": {ratio_key(r): plan.channel_fraction(r) for r in cfg.ratios},
        "kept_fp32": skipped,
    }
    if recon is not None:
        plan.metrics["reconstruction_seconds"] = recon["seconds"]
    log.info("quantize %s: %d layers (%d eligible), calibration %.1f s, selection %.1f s",
             model_name, len(layers), sum(lp.eligible for lp in layers), t_calib,
             selector.seconds)
    return plan
