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
from .fakequant import extraction_terms, parent_of, replace_layers
from .plan import LayerPlan, QuantPlan
from .zoo.data import normalize_imagenet

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


class _ActFakeQuant(torch.autograd.Function):
    """The input quantizer of a calibrated layer, fused, with a straight-through gradient.

    Forward: ``v = clamp(floor(x * inv + 0.5), lo, hi)``, then (``terms``, see
    :func:`~flexiq_tvm.fakequant.extraction_terms`) every channel's extracted value, computed
    in place as :class:`~flexiq_tvm.fakequant.FakeQuantLayer` does.  Backward: ``g * inv``
    where no clamp was active, else 0, the gradient of the unfused straight-through
    expression.  Only that boolean mask is kept for backward, not the handful of full-size
    intermediate tensors the unfused expression records.
    """

    @staticmethod
    def forward(ctx, x, inv, lo, hi, terms):
        with torch.no_grad():
            v = (x * inv).add_(0.5).floor_()
            keep = (v >= lo) & (v <= hi)
            v.clamp_(lo, hi)
            if terms is not None:
                half, inv_pow, lo_c, hi_c, pw = terms
                v.add_(half).mul_(inv_pow).floor_()
                keep &= (v >= lo_c) & (v <= hi_c)
                torch.clamp_(v, lo_c, hi_c).mul_(pw)
        ctx.save_for_backward(keep, inv)
        return v

    @staticmethod
    def backward(ctx, grad):
        keep, inv = ctx.saved_tensors
        return grad * keep * inv, None, None, None, None


class QATLayer(nn.Module):
    """Trainable FlexiQ conv2d/linear: the fake-quant arithmetic with straight-through rounding.

    Holds the original module (its ``weight`` / ``bias`` parameters are the ones trained).
    """

    def __init__(self, module: nn.Module, lp: LayerPlan, learn_act_scale: bool = False,
                 fixed_w_scale: bool = False):
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
        # the plan's per-output weight scales, kept (codes reconstructed by GPTQ, whose
        # scales are the FP32 weights'), or recomputed from the current weights each step
        self.fixed_w_scale = fixed_w_scale
        if fixed_w_scale:
            self.register_buffer("w_scale_t", torch.from_numpy(
                np.asarray(lp.w_scale, np.float32)).reshape((-1,) + (1,) * (len(wshape) - 1)))
        self.low: torch.Tensor | None = None  # unfused path (learned scale): the 4-bit mask
        self.terms: tuple | None = None  # fused path: the per-channel extraction terms
        self.wlow: torch.Tensor | None = None

    def act_scales(self) -> tuple[float, float]:
        """``(scale, inv_scale)`` of the input quantizer, float32 values."""
        if not self.learn_act_scale:
            return float(self.lp.act_scale), float(self.lp.act_inv_scale)
        scale = np.float32(torch.exp(self.log_act_scale.detach()))
        return float(scale), float(np.float32(1.0) / scale)

    def set_low(self, mask: np.ndarray | None) -> None:
        if mask is None or not np.any(mask):
            self.low = self.wlow = self.terms = None
            return
        m = np.asarray(mask, dtype=bool)
        if self.learn_act_scale:
            self.low = torch.from_numpy(m).reshape(self.chan_shape)
        else:
            self.terms = extraction_terms(self.lp, m, self.chan_shape, torch.float32)
        self.wlow = torch.from_numpy(ref.per_weight(m, tuple(self.lp.weight_shape),
                                                    self.lp.groups))

    def weight_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes with 4-bit columns lowered, per-output scale)``; codes as float, STE."""
        w = self.module.weight
        if self.fixed_w_scale:
            s = self.w_scale_t
        else:
            amax = w.detach().reshape(w.shape[0], -1).abs().amax(1)
            s = torch.where(amax > 0, amax / ref.INT8_MAX, torch.ones_like(amax))
            s = s.reshape((-1,) + (1,) * (w.ndim - 1))
        codes = torch.clamp(_round_even(w / s), -ref.INT8_MAX, ref.INT8_MAX)
        if self.wlow is not None:
            codes = torch.where(self.wlow, _lower(codes, self.pow_w, self.half_w,
                                                  self.wlo4, self.whi4), codes)
        return codes, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.learn_act_scale:  # the gradient reaches the scale: unfused
            s_a = torch.exp(self.log_act_scale)
            q = torch.clamp(_round_half_up(x / s_a), self.lo, self.hi)
            if self.low is not None:
                q = torch.where(self.low, _lower(q, self.pow_a, self.half_a, self.lo4,
                                                 self.hi4), q)
        else:
            s_a = self.act_scale_t
            q = _ActFakeQuant.apply(x, self.act_inv_scale_t, self.lo, self.hi, self.terms)
        codes, s_w = self.weight_codes()
        lp, bias = self.lp, self.module.bias
        # integer-valued operands: the accumulator is exact, as in FakeQuantLayer
        if lp.kind == "conv2d":
            top, bottom, left, right = lp.padding
            pad = (top, left)
            if (top, left) != (bottom, right):  # asymmetric ("same" padding): pad codes
                q, pad = F.pad(q, (left, right, top, bottom)), 0
            acc = F.conv2d(q, codes, None, lp.stride, pad, lp.dilation, lp.groups)
            shape = (1, -1, 1, 1)
        else:
            acc = F.linear(q, codes)
            shape = (-1,)
        y = acc * (s_a * s_w.reshape(-1)).reshape(shape)
        return y if bias is None else y + bias.reshape(shape)


def dequantized_weight(lp: LayerPlan) -> torch.Tensor:
    """``codes * scale`` of a layer (float32): it quantizes back to exactly its codes."""
    scale = np.asarray(lp.w_scale, np.float32).reshape((-1,) + (1,) * (lp.w_codes.ndim - 1))
    return torch.from_numpy(lp.w_codes.astype(np.float32) * scale)


class QATModel(nn.Module):
    """A copy of the FP32 model with every plan layer wrapped in a :class:`QATLayer`."""

    def __init__(self, model: nn.Module, plan: QuantPlan, learn_act_scale: bool = False,
                 from_codes: bool = False):
        """``from_codes``: start from the plan's weight codes and keep its weight scales (the
        covered layers' weights become ``codes * scale``), so that training starts exactly at
        a plan whose codes are not ``round(w / s)`` (GPTQ reconstruction); else the codes
        are recomputed from the FP32 weights, scales included, every step."""
        super().__init__()
        self.plan = plan
        self.from_codes = from_codes
        self.net, self.layers = replace_layers(
            model, plan, lambda orig, lp: QATLayer(orig, lp, learn_act_scale, from_codes))
        if from_codes:
            with torch.no_grad():
                for lp in plan.layers:
                    self.layers[lp.name].module.weight.copy_(dequantized_weight(lp))

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
            w_scale = (np.asarray(lp.w_scale, np.float32).copy() if self.from_codes
                       else ref.weight_scales(w))
            scale, inv_scale = qat.act_scales()
            # the codes are now the trained weights' nearest ones, so the compiler finds the
            # layer by them: a reconstructed plan's digest (of the FP32 weights' nearest
            # codes) would no longer match any weight of the exported model
            layers.append(dataclasses.replace(
                lp, w_codes=ref.quantize_weight(w, w_scale), w_scale=w_scale, weight_digest="",
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
    steps: int | None = None  # overrides ``epochs`` (augmented photos have no epochs)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs={self.epochs}; must be positive")
        if self.lr <= 0 or self.batch_size <= 0:
            raise ValueError("lr and batch_size must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha}; must be in [0, 1]")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"steps={self.steps}; must be positive")
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
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    total = cfg.steps or max(1, round(cfg.epochs * steps_per_epoch))

    def batches():
        perm, pos = rng.permutation(len(x)), 0
        while True:
            if pos + cfg.batch_size > len(x):
                perm, pos = rng.permutation(len(x)), 0
            idx = torch.from_numpy(perm[pos : pos + cfg.batch_size])
            pos += cfg.batch_size
            yield x[idx], t_logits[idx], y[idx]

    student = QATModel(model, plan, cfg.learn_act_scale)
    return _train(student, plan, cfg, total, batches(), rng, progress,
                  {"n_train_images": len(x)})


def _train(student: QATModel, plan: QuantPlan, cfg: FinetuneConfig, total: int, batches,
           rng, progress: bool, info: dict) -> tuple[nn.Module, QuantPlan, dict]:
    """The training loop: ``batches`` yields ``(images, teacher logits, labels or None)``;
    one plan ratio is drawn per step; cosine lr; returns what :func:`finetune` does."""
    from tqdm.auto import tqdm

    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ratios = list(plan.ratios)
    T = cfg.temperature
    history, t0, running = [], time.time(), []
    bar = tqdm(total=total, desc=f"finetune {plan.model}", unit="step", disable=not progress,
               leave=False)
    for step in range(total):
        xb, tb, yb = next(batches)
        r = ratios[int(rng.integers(len(ratios)))]
        student.set_ratio(r)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        out = student(xb)
        kd = F.kl_div(F.log_softmax(out / T, -1), F.log_softmax(tb / T, -1),
                      reduction="batchmean", log_target=True) * T * T
        if yb is None:
            loss = kd
        else:
            loss = (1 - cfg.alpha) * F.cross_entropy(out, yb) + cfg.alpha * kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(float(loss.detach()))
        bar.update()
        if (step + 1) % 50 == 0 or step + 1 == total:
            mean = float(np.mean(running))
            running = []
            history.append({"step": step + 1, "loss": round(mean, 5),
                            "seconds": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{mean:.4f}")
            log.debug("finetune %s: step %d/%d loss %.4f (%.0f s)", plan.model, step + 1,
                      total, mean, time.time() - t0)
    bar.close()
    net, new_plan = student.export()
    new_plan.metrics = {**new_plan.metrics, "finetune": {
        **dataclasses.asdict(cfg), "steps": total, "seconds": round(time.time() - t0, 1),
        **info}}
    return net, new_plan, {"steps": total, "history": history,
                           "seconds": round(time.time() - t0, 1)}


class PhotoAugmenter:
    """Random training views of a few photos, preprocessed as the model expects.

    Each view: a random resized crop (area ``scale`` of the photo resized to a short side of
    ``short_side``, aspect ratio in [3/4, 4/3]) resized to ``size`` (bicubic), a horizontal
    flip half of the time, colour jitter (brightness, contrast and saturation factors drawn
    in ``1 +- jitter``), then the EfficientNet-Lite normalization.  :meth:`batch` mixes the
    views pairwise (mixup, ``lam ~ Beta(mixup, mixup)``) when ``mixup > 0``.
    """

    def __init__(self, photos: list, seed: int = 0, size: int = 224, short_side: int = 320,
                 scale: tuple[float, float] = (0.25, 1.0), jitter: float = 0.3,
                 mixup: float = 0.4) -> None:
        from PIL import Image

        if not photos:
            raise ValueError("no photos to augment")
        self.size, self.scale, self.jitter, self.mixup = size, scale, jitter, mixup
        self.rng = np.random.default_rng(seed)
        self.photos = []
        for im in photos:
            w, h = im.size
            f = short_side / min(w, h)
            self.photos.append(im.convert("RGB").resize(
                (max(size, round(w * f)), max(size, round(h * f))), Image.BICUBIC))

    def view(self) -> np.ndarray:
        from PIL import Image

        rng = self.rng
        im = self.photos[int(rng.integers(len(self.photos)))]
        w, h = im.size
        for _ in range(10):
            area = w * h * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if cw <= w and ch <= h:
                break
        else:
            cw = ch = min(w, h)
        left, top = int(rng.integers(w - cw + 1)), int(rng.integers(h - ch + 1))
        crop = im.resize((self.size, self.size), Image.BICUBIC,
                         box=(left, top, left + cw, top + ch))
        x = np.asarray(crop, dtype=np.float32) / 255.0
        if rng.random() < 0.5:
            x = x[:, ::-1]
        j = self.jitter
        b, c, sat = rng.uniform(1 - j, 1 + j, 3)
        x = x * b
        x = (x - x.mean()) * c + x.mean()
        gray = x @ np.float32([0.299, 0.587, 0.114])
        x = (x - gray[..., None]) * sat + gray[..., None]
        return normalize_imagenet(np.clip(x, 0.0, 1.0).transpose(2, 0, 1)).astype(np.float32)

    def batch(self, n: int) -> np.ndarray:
        x = np.stack([self.view() for _ in range(n)])
        if self.mixup > 0:
            lam = self.rng.beta(self.mixup, self.mixup, size=(n, 1, 1, 1)).astype(np.float32)
            x = lam * x + (1 - lam) * x[self.rng.permutation(n)]
        return x


def distill(model: nn.Module, plan: QuantPlan, photos: list, config: FinetuneConfig,
            progress: bool = True) -> tuple[nn.Module, QuantPlan, dict]:
    """Finetune ``model`` under ``plan`` by distillation alone from its FP32 self on
    augmented views of ``photos`` (no labels): ``config.steps`` steps of ``batch_size``
    fresh views, the teacher's logits computed on the same views.  The student starts from
    the plan's codes (:class:`QATModel` ``from_codes``), so GPTQ codes are its first step."""
    cfg = config
    if not cfg.steps:
        raise ValueError("distillation on augmented photos needs config.steps")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    aug = PhotoAugmenter(photos, seed=cfg.seed + 1)
    teacher = copy.deepcopy(model).eval()

    def batches():
        while True:
            xb = torch.from_numpy(aug.batch(cfg.batch_size))
            with torch.no_grad():  # left before yielding: the student's step needs autograd
                tb = teacher(xb)
            yield xb, tb, None

    student = QATModel(model, plan, cfg.learn_act_scale, from_codes=True)
    info = {"n_photos": len(photos), "views_seen": cfg.steps * cfg.batch_size}
    return _train(student, plan, cfg, cfg.steps, batches(), rng, progress, info)


# ---------------------------------------------------------------------- checkpoints


def checkpoint_paths(name: str) -> tuple[Path, Path]:
    """``(state_dict .pt, plan .npz)`` of zoo model ``name``'s committed finetuned version."""
    return FINETUNED_DIR / f"{name}.pt", FINETUNED_DIR / f"{name}.plan.npz"


def save_checkpoint(name: str, model: nn.Module, plan: QuantPlan, entry: dict,
                    weights_in_plan: bool = False) -> dict:
    """Write ``model``'s state and ``plan`` to the committed checkpoint of ``name``.

    ``weights_in_plan``: leave the covered layers' weights out of the state (the plan holds
    them as INT8 codes and scales, a quarter of the size; :func:`load_finetuned` rebuilds them
    as ``codes * scale``, which quantize back to the same codes)."""
    from .zoo.registry import sha256_file

    FINETUNED_DIR.mkdir(parents=True, exist_ok=True)
    pt, npz = checkpoint_paths(name)
    state = model.state_dict()
    if weights_in_plan:
        state = {k: v for k, v in state.items() if k not in _plan_weight_keys(plan)}
    torch.save(state, pt)
    plan.save(npz)
    manifest = read_manifest()
    manifest[name] = {**entry, "weights_in_plan": weights_in_plan, "sha256": sha256_file(pt),
                      "plan_sha256": sha256_file(npz),
                      "size_bytes": pt.stat().st_size + npz.stat().st_size}
    FINETUNED_MANIFEST.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    return manifest[name]


def _plan_weight_keys(plan: QuantPlan) -> set[str]:
    return {f"{lp.name}.weight" for lp in plan.layers}


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
    plan = QuantPlan.load(npz)
    state = torch.load(pt, map_location="cpu", weights_only=True)
    if entry.get("weights_in_plan"):
        for lp in plan.layers:
            state[f"{lp.name}.weight"] = dequantized_weight(lp)
    model.load_state_dict(state)
    return model.eval(), plan


# ------------------------------------------------------------------------ evaluation


#: the post-training plan an ImageNet finetune starts from: greedy selection with the nested
#: GPTQ reconstruction on 128 calibration views (docs/results.md, issue 22)
IMAGENET_PTQ = {"reconstruct": True, "calib_images": 128, "search_images": 16,
                "sensitivity_steps": 4}


def run(name: str, config: FinetuneConfig | None = None, plan: QuantPlan | None = None,
        selection: str = "greedy", limit: int | None = 2000, threads: int = 1,
        save: bool = True, progress: bool = True) -> dict:
    """``flexiq-tvm finetune``: PTQ plan (or ``plan``), finetune, and one evaluation table.

    Fashion-MNIST models train on the labelled training split (cross-entropy plus
    distillation).  EfficientNet-Lite0 has no labelled training data here: it is distilled
    from its FP32 self on augmented views of the calibration photos (:func:`distill`), and
    evaluated on every held-out view.  The table (same images, same run): FP32, uniform
    W4A4 (post-training), and PTQ vs finetuned FlexiQ at every plan ratio, with agreement,
    KL and top-5 overlap against FP32.  Returns the JSON document.
    """
    from .baselines import uniform_model
    from .config import FlexiQConfig
    from .eval import _row, load_eval_data, top1, top5_overlap, zoo_plan
    from .fakequant import FakeQuantModel, predict
    from .zoo import data, registry

    cfg = config or FinetuneConfig()
    imagenet = registry.spec(name).dataset != "fmnist"
    if imagenet and not cfg.steps:
        raise ValueError(f"{name} is distilled on augmented photos: give the number of steps "
                         "(--steps), not epochs")
    torch.set_num_threads(threads)
    model = registry.get_model(name)
    t0 = time.time()
    if plan is None:
        plan = zoo_plan(name, model, FlexiQConfig(selection=selection,
                                                  **(IMAGENET_PTQ if imagenet else {})),
                        progress)
    t_plan = time.time() - t0
    if imagenet:
        ft_model, ft_plan, train_log = distill(model, plan, data.load_photos("calibration"),
                                               cfg, progress)
    else:
        xtr, ytr = data.load_fmnist("train")
        if cfg.train_images is not None:
            keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(xtr))
                           [: cfg.train_images])
            xtr, ytr = xtr[keep], ytr[keep]
        ft_model, ft_plan, train_log = finetune(model, plan, xtr, ytr, cfg, progress)
    dataset, x, y = load_eval_data(name, limit)
    batch = 50 if imagenet else 500
    fp32 = predict(model, x, batch)
    doc = {"model": name, "dataset": dataset, "n_images": len(x),
           "n_labelled": int((y >= 0).sum()), "fp32": {"top1": top1(fp32, y)},
           "finetune": {**dataclasses.asdict(cfg), "selection": selection,
                        "plan_config": dict(plan.config), "plan_seconds": round(t_plan, 1),
                        **train_log},
           "results": []}

    def row(method, r, q, p=None):
        return _row(method, r, q, y, fp32, p, {"top5_overlap": top5_overlap(fp32, q)})

    for method, (m, p) in (("flexiq-ptq", (model, plan)),
                           ("flexiq-finetuned", (ft_model, ft_plan))):
        fq = FakeQuantModel(m, p)
        for r in p.ratios:
            fq.set_ratio(r)
            doc["results"].append(row(method, r, predict(fq, x, batch), p))
    doc["results"].append(row("uniform-w4a4", None,
                              predict(uniform_model(model, plan), x, batch)))
    doc["summary"] = summarize(doc)
    if save:
        how = f"--steps {cfg.steps}" if cfg.steps else f"--epochs {cfg.epochs:g}"
        default = FinetuneConfig()
        for flag, key in (("--lr", "lr"), ("--batch-size", "batch_size"), ("--alpha", "alpha"),
                          ("--seed", "seed")):
            if getattr(cfg, key) != getattr(default, key):
                how += f" {flag} {getattr(cfg, key):g}"
        if threads != 1:  # torch's reductions, hence the weights, depend on the thread count
            how += f" --threads {threads}"
        entry = {"top1": {f"{r['ratio']:g}": r["top1"] for r in doc["results"]
                          if r["method"] == "flexiq-finetuned"},
                 "agreement": {f"{r['ratio']:g}": r["agreement"] for r in doc["results"]
                               if r["method"] == "flexiq-finetuned"},
                 "n_test_images": len(x),
                 "config": {k: v for k, v in doc["finetune"].items() if k != "history"},
                 "torch": torch.__version__,
                 "command": f"flexiq-tvm finetune --model {name} {how}"}
        doc["checkpoint"] = save_checkpoint(name, ft_model, ft_plan, entry,
                                            weights_in_plan=imagenet)
    return doc


def summarize(doc: dict) -> dict:
    """Per-ratio differences used by the issue's targets (points, FP32 minus quantized; top-1
    ones are ``None`` without labels), and agreement with FP32 in percent."""
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
    out["agreement_pct"] = {m: {f"{r['ratio']:g}": round(100 * r["agreement"], 2)
                                for r in doc["results"] if r["method"] == m}
                            for m in ("flexiq-ptq", "flexiq-finetuned")}
    return out
