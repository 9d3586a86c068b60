"""Quantization-aware finetuning that makes one set of weights accurate at every ratio
(``flexiq-tvm finetune``).

What is trained
    A copy of the FP32 model whose covered layers are :class:`QATLayer` s.  Their forward is
    the arithmetic of :class:`~flexiq_tvm.fakequant.FakeQuantLayer` (8-bit codes, 4-bit
    channels replaced by their extracted value, per-output-channel weight scales recomputed
    from the current weights) with straight-through rounding, so the weights (and every other
    parameter: BatchNorm / LayerNorm affine, embeddings) learn what the integer kernels
    compute.  Optionally (``learn_act_scale``) each layer's activation scale is a parameter
    too (LSQ-style: the gradient flows through ``s * clamp(round(x / s))``).  BatchNorm
    running statistics stay frozen (the network runs in eval mode), so the compiled graph keeps
    the calibrated activation ranges.

Nested channel sets: fixed
    The plan's priority order and per-ratio boundaries come from post-training selection and
    are kept.  Re-searching during training would move channels between the 4- and 8-bit
    sets while the weights adapt to one assignment, the compiled layout (channel reorder,
    packed INT4 blocks) depends on the order, and a search costs minutes per model; fixed
    sets let every step train exactly the sub-networks that will be deployed.  The extraction
    shifts are kept as well (they were chosen for the calibrated ranges, which BN freezing
    preserves).

Ratio sampling and loss
    Each step draws one ratio from the plan's set (seeded), sets every layer's 4-bit mask to
    that ratio, and minimizes ``(1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher || student)``
    with the FP32 model as teacher (its logits are computed once; no augmentation, so the
    teacher sees the same images).

Output
    The finetuned FP32 ``state_dict`` and a :class:`QuantPlan` of the same format as a
    post-training one (codes and scales recomputed from the trained weights by
    :mod:`flexiq_tvm.reference`), so ``flexiq_tvm.compile(model, x, plan=plan)`` takes them
    unchanged.  Committed checkpoints live in ``zoo/checkpoints/finetuned/``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import reference as ref
from .fakequant import parent_of, replace_layers
from .plan import LayerPlan, QuantPlan

log = logging.getLogger(__name__)

FINETUNED_DIR = Path(__file__).resolve().parent / "zoo" / "checkpoints" / "finetuned"
FINETUNED_MANIFEST = FINETUNED_DIR / "manifest.json"


def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    """``floor(x + 0.5)`` forward, identity backward (the reference's activation rounding)."""
    return x + (torch.floor(x + 0.5) - x).detach()


def _round_even(x: torch.Tensor) -> torch.Tensor:
    """``rint(x)`` forward, identity backward (the reference's weight rounding)."""
    return x + (torch.round(x) - x).detach()


def _floor(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.floor(x) - x).detach()


def _lower(q: torch.Tensor, pow_s: torch.Tensor, half_s: torch.Tensor, lo4: int, hi4: int
           ) -> torch.Tensor:
    """Extracted 4-bit value at 8-bit scale: ``clip((q + half) >> s, lo4, hi4) << s``."""
    return torch.clamp(_floor((q + half_s) / pow_s), lo4, hi4) * pow_s


def _shift_tensors(shift: np.ndarray, shape) -> tuple[torch.Tensor, torch.Tensor]:
    s = np.asarray(shift, np.int64)
    pow_s = torch.from_numpy(2.0 ** s).float().reshape(shape)
    half = torch.from_numpy(np.where(s > 0, 2.0 ** np.maximum(s - 1, 0), 0.0)).float()
    return pow_s, half.reshape(shape)


class QATLayer(nn.Module):
    """Trainable FlexiQ conv2d/linear: the fake-quant arithmetic with straight-through rounding.

    Holds the original module (its ``weight`` / ``bias`` parameters are the ones trained).
    """

    def __init__(self, module: nn.Module, lp: LayerPlan, learn_act_scale: bool = False):
        super().__init__()
        self.module = module
        self.lp = lp
        self.lo, self.hi = ref.act_range(lp.act_signed)
        self.lo4, self.hi4 = ref.act_range(lp.act_signed, 4)
        self.wlo4, self.whi4 = ref.act_range(True, 4)
        c = lp.in_channels
        self.chan_shape = (1, c, 1, 1) if lp.kind == "conv2d" else (c,)
        pa, ha = _shift_tensors(lp.act_shift, self.chan_shape)
        self.register_buffer("pow_a", pa)
        self.register_buffer("half_a", ha)
        wshape = tuple(lp.weight_shape)
        pw, hw = _shift_tensors(ref.per_weight(lp.w_shift, wshape, lp.groups).reshape(-1),
                                (wshape[0], wshape[1], *([1] * (len(wshape) - 2))))
        self.register_buffer("pow_w", pw)
        self.register_buffer("half_w", hw)
        self.learn_act_scale = learn_act_scale
        if learn_act_scale:
            self.log_act_scale = nn.Parameter(torch.tensor(math.log(float(lp.act_scale))))
        else:  # the calibrated scale, applied exactly as the reference does
            self.register_buffer("act_scale_t", torch.tensor(float(lp.act_scale)))
            self.register_buffer("act_inv_scale_t", torch.tensor(float(lp.act_inv_scale)))
        self.low: torch.Tensor | None = None
        self.wlow: torch.Tensor | None = None

    def act_scales(self) -> tuple[float, float]:
        """``(scale, inv_scale)`` of the input quantizer, float32 values."""
        if not self.learn_act_scale:
            return float(self.lp.act_scale), float(self.lp.act_inv_scale)
        scale = np.float32(torch.exp(self.log_act_scale.detach()))
        return float(scale), float(np.float32(1.0) / scale)

    def set_low(self, mask: np.ndarray | None) -> None:
        if mask is None or not np.any(mask):
            self.low = self.wlow = None
            return
        m = np.asarray(mask, dtype=bool)
        self.low = torch.from_numpy(m).reshape(self.chan_shape)
        self.wlow = torch.from_numpy(ref.per_weight(m, tuple(self.lp.weight_shape),
                                                    self.lp.groups))

    def weight_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes with 4-bit columns lowered, per-output scale)``; codes as float, STE."""
        w = self.module.weight
        amax = w.detach().reshape(w.shape[0], -1).abs().amax(1)
        s = torch.where(amax > 0, amax / ref.INT8_MAX, torch.ones_like(amax))
        s = s.reshape((-1,) + (1,) * (w.ndim - 1))
        codes = torch.clamp(_round_even(w / s), -ref.INT8_MAX, ref.INT8_MAX)
        if self.wlow is not None:
            codes = torch.where(self.wlow, _lower(codes, self.pow_w, self.half_w,
                                                  self.wlo4, self.whi4), codes)
        return codes, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.learn_act_scale:
            s_a = torch.exp(self.log_act_scale)
            v = x / s_a
        else:
            s_a, v = self.act_scale_t, x * self.act_inv_scale_t
        q = torch.clamp(_round_half_up(v), self.lo, self.hi)
        if self.low is not None:
            q = torch.where(self.low, _lower(q, self.pow_a, self.half_a, self.lo4, self.hi4), q)
        codes, s_w = self.weight_codes()
        lp, bias = self.lp, self.module.bias
        # integer-valued operands: the accumulator is exact, as in FakeQuantLayer
        if lp.kind == "conv2d":
            top, bottom, left, right = lp.padding
            if any(lp.padding):
                q = F.pad(q, (left, right, top, bottom))
            acc = F.conv2d(q, codes, None, lp.stride, 0, lp.dilation, lp.groups)
            shape = (1, -1, 1, 1)
        else:
            acc = F.linear(q, codes)
            shape = (-1,)
        y = acc * (s_a * s_w.reshape(-1)).reshape(shape)
        return y if bias is None else y + bias.reshape(shape)


class QATModel(nn.Module):
    """A copy of the FP32 model with every plan layer wrapped in a :class:`QATLayer`."""

    def __init__(self, model: nn.Module, plan: QuantPlan, learn_act_scale: bool = False):
        super().__init__()
        self.plan = plan
        self.net, self.layers = replace_layers(
            model, plan, lambda orig, lp: QATLayer(orig, lp, learn_act_scale))

    def set_ratio(self, ratio: float) -> None:
        self.plan.check_ratio(ratio)
        for lp in self.plan.layers:
            self.layers[lp.name].set_low(lp.low_mask(ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def export(self) -> tuple[nn.Module, QuantPlan]:
        """The finetuned FP32 model and its plan (codes and scales from the trained weights)."""
        net = copy.deepcopy(self.net)
        layers = []
        for lp in self.plan.layers:
            parent, attr = parent_of(net, lp.name)
            qat = getattr(parent, attr)
            setattr(parent, attr, qat.module)
            w = qat.module.weight.detach().float().numpy()
            w_scale = ref.weight_scales(w)
            scale, inv_scale = qat.act_scales()
            layers.append(dataclasses.replace(
                lp, w_codes=ref.quantize_weight(w, w_scale), w_scale=w_scale,
                bias=None if qat.module.bias is None
                else qat.module.bias.detach().float().numpy().copy(),
                act_scale=scale, act_inv_scale=inv_scale))
        plan = QuantPlan(self.plan.model, self.plan.ratios, dict(self.plan.config), layers,
                         dict(self.plan.metrics))
        plan.check_nested()
        return net.eval(), plan


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Finetuning hyper-parameters (defaults: the committed checkpoints' recipe)."""

    epochs: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 64
    alpha: float = 0.7  # weight of distillation vs cross-entropy
    temperature: float = 2.0
    train_images: int | None = None  # first N of a seeded permutation of the train split
    learn_act_scale: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs={self.epochs}; must be positive")
        if self.lr <= 0 or self.batch_size <= 0:
            raise ValueError("lr and batch_size must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha}; must be in [0, 1]")
        if self.train_images is not None and self.train_images <= 0:
            raise ValueError(f"train_images={self.train_images}; must be positive")


def finetune(model: nn.Module, plan: QuantPlan, x_train: np.ndarray, y_train: np.ndarray,
             config: FinetuneConfig | None = None, progress: bool = True
             ) -> tuple[nn.Module, QuantPlan, dict]:
    """Finetune ``model`` under ``plan`` on ``(x_train, y_train)``.

    Returns ``(finetuned FP32 model, its QuantPlan, training log)``; ``model`` and ``plan``
    are not modified.
    """
    cfg = config or FinetuneConfig()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    x = torch.from_numpy(np.asarray(x_train, np.float32))
    y = torch.from_numpy(np.asarray(y_train, np.int64))
    teacher = copy.deepcopy(model).eval()
    with torch.no_grad():
        t_logits = torch.cat([teacher(x[i : i + 500]) for i in range(0, len(x), 500)])
    student = QATModel(model, plan, cfg.learn_act_scale)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = max(1, round(cfg.epochs * steps_per_epoch))
    ratios = list(plan.ratios)
    T = cfg.temperature
    history, t0, running = [], time.time(), []
    perm = rng.permutation(len(x))
    pos = 0
    for step in range(total):
        if pos + cfg.batch_size > len(x):
            perm, pos = rng.permutation(len(x)), 0
        idx = torch.from_numpy(perm[pos : pos + cfg.batch_size])
        pos += cfg.batch_size
        r = ratios[int(rng.integers(len(ratios)))]
        student.set_ratio(r)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        out = student(x[idx])
        ce = F.cross_entropy(out, y[idx])
        kd = F.kl_div(F.log_softmax(out / T, -1), F.log_softmax(t_logits[idx] / T, -1),
                      reduction="batchmean", log_target=True) * T * T
        loss = (1 - cfg.alpha) * ce + cfg.alpha * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(float(loss.detach()))
        if (step + 1) % 50 == 0 or step + 1 == total:
            mean = float(np.mean(running))
            running = []
            history.append({"step": step + 1, "loss": round(mean, 5),
                            "seconds": round(time.time() - t0, 1)})
            if progress:
                log.info("finetune %s: step %d/%d loss %.4f (%.0f s)", plan.model, step + 1,
                         total, mean, time.time() - t0)
    net, new_plan = student.export()
    new_plan.metrics = {**new_plan.metrics, "finetune": {
        **dataclasses.asdict(cfg), "steps": total, "seconds": round(time.time() - t0, 1),
        "n_train_images": len(x)}}
    return net, new_plan, {"steps": total, "history": history,
                           "seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------------- checkpoints


def checkpoint_paths(name: str) -> tuple[Path, Path]:
    """``(state_dict .pt, plan .npz)`` of zoo model ``name``'s committed finetuned version."""
    return FINETUNED_DIR / f"{name}.pt", FINETUNED_DIR / f"{name}.plan.npz"


def save_checkpoint(name: str, model: nn.Module, plan: QuantPlan, entry: dict) -> dict:
    from .zoo.registry import sha256_file

    FINETUNED_DIR.mkdir(parents=True, exist_ok=True)
    pt, npz = checkpoint_paths(name)
    torch.save(model.state_dict(), pt)
    plan.save(npz)
    manifest = read_manifest()
    manifest[name] = {**entry, "sha256": sha256_file(pt), "plan_sha256": sha256_file(npz),
                      "size_bytes": pt.stat().st_size + npz.stat().st_size}
    FINETUNED_MANIFEST.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    return manifest[name]


def read_manifest() -> dict:
    if not FINETUNED_MANIFEST.exists():
        return {}
    return json.loads(FINETUNED_MANIFEST.read_text())


def load_finetuned(name: str) -> tuple[nn.Module, QuantPlan]:
    """The committed finetuned model (FP32, eval mode) and plan of zoo model ``name``,
    verified against the sha256 of ``finetuned/manifest.json``."""
    from .zoo import registry

    pt, npz = checkpoint_paths(name)
    entry = read_manifest().get(name)
    if entry is None or not pt.exists() or not npz.exists():
        raise FileNotFoundError(f"no finetuned checkpoint for {name} in {FINETUNED_DIR}: run "
                                f"`flexiq-tvm finetune --model {name}`")
    for path, key in ((pt, "sha256"), (npz, "plan_sha256")):
        digest = registry.sha256_file(path)
        if digest != entry[key]:
            raise ValueError(f"{path} has sha256 {digest[:12]}…, the manifest says "
                             f"{entry[key][:12]}…: the file is corrupted or was replaced")
    model = registry.get_model(name, pretrained=False)
    model.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
    return model.eval(), QuantPlan.load(npz)


# ------------------------------------------------------------------------ evaluation


def run(name: str, config: FinetuneConfig | None = None, plan: QuantPlan | None = None,
        selection: str = "greedy", limit: int | None = 2000, threads: int = 1,
        save: bool = True, progress: bool = True) -> dict:
    """``flexiq-tvm finetune``: PTQ plan (or ``plan``), finetune, and one evaluation table.

    The table (same images, same run): FP32, uniform W4A4 (post-training), and PTQ vs
    finetuned FlexiQ at every plan ratio.  Returns the JSON document.
    """
    from .baselines import uniform_model
    from .config import FlexiQConfig
    from .eval import _row, load_eval_data, top1, zoo_plan
    from .fakequant import FakeQuantModel, predict
    from .zoo import data, registry

    cfg = config or FinetuneConfig()
    if registry.spec(name).dataset != "fmnist":
        raise ValueError(f"finetuning needs labelled training data: {name} has none here "
                         "(Fashion-MNIST zoo models only)")
    torch.set_num_threads(threads)
    model = registry.get_model(name)
    t0 = time.time()
    if plan is None:
        plan = zoo_plan(name, model, FlexiQConfig(selection=selection), progress)
    t_plan = time.time() - t0
    xtr, ytr = data.load_fmnist("train")
    if cfg.train_images is not None:
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(xtr))[: cfg.train_images])
        xtr, ytr = xtr[keep], ytr[keep]
    ft_model, ft_plan, train_log = finetune(model, plan, xtr, ytr, cfg, progress)
    dataset, x, y = load_eval_data(name, limit)
    fp32 = predict(model, x)
    doc = {"model": name, "dataset": dataset, "n_images": len(x),
           "n_labelled": int((y >= 0).sum()), "fp32": {"top1": top1(fp32, y)},
           "finetune": {**dataclasses.asdict(cfg), "selection": selection,
                        "plan_seconds": round(t_plan, 1), **train_log},
           "results": []}
    for method, (m, p) in (("flexiq-ptq", (model, plan)),
                           ("flexiq-finetuned", (ft_model, ft_plan))):
        fq = FakeQuantModel(m, p)
        for r in p.ratios:
            fq.set_ratio(r)
            doc["results"].append(_row(method, r, predict(fq, x), y, fp32, p))
    doc["results"].append(_row("uniform-w4a4", None, predict(uniform_model(model, plan), x),
                               y, fp32))
    doc["summary"] = summarize(doc)
    if save:
        entry = {"top1": {f"{r['ratio']:g}": r["top1"] for r in doc["results"]
                          if r["method"] == "flexiq-finetuned"},
                 "n_test_images": len(x),
                 "config": {k: v for k, v in doc["finetune"].items() if k != "history"},
                 "torch": torch.__version__,
                 "command": f"flexiq-tvm finetune --model {name} --epochs {cfg.epochs:g}"}
        doc["checkpoint"] = save_checkpoint(name, ft_model, ft_plan, entry)
    return doc


def summarize(doc: dict) -> dict:
    """Per-ratio differences used by the issue's targets (points, FP32 minus quantized)."""
    fp = doc["fp32"]["top1"]
    rows = {(r["method"], r["ratio"]): r["top1"] for r in doc["results"]}
    w4a4 = rows[("uniform-w4a4", None)]
    out = {"fp32_minus_finetuned_pt": {}, "finetuned_minus_ptq_pt": {}}
    for (method, ratio), acc in rows.items():
        if method == "flexiq-finetuned":
            out["fp32_minus_finetuned_pt"][f"{ratio:g}"] = round(100 * (fp - acc), 2)
            out["finetuned_minus_ptq_pt"][f"{ratio:g}"] = round(
                100 * (acc - rows[("flexiq-ptq", ratio)]), 2)
    top = max(r for m, r in rows if m == "flexiq-finetuned")
    out["finetuned_r1_minus_w4a4_pt"] = round(100 * (rows[("flexiq-finetuned", top)] - w4a4), 2)
    return out
