"""Fake-quant torch model built from a :class:`QuantPlan` (fast accuracy evaluation, search).

Each covered layer is replaced by a module that computes, in floating point, *exactly* the
integer arithmetic of :mod:`flexiq_tvm.reference`: the input is quantized to 8-bit codes, the
4-bit channels are replaced by their extracted value ``(codes >> shift) << shift`` (rounded,
clamped), the weights likewise per input channel, and a conv/linear over these integer-valued
tensors gives the int32 accumulator, which is dequantized with ``s_a * s_w[o]`` plus bias.

Integer-valued float arithmetic is exact while partial sums stay below 2**24 (float32) or
2**53 (float64): build with ``dtype=torch.float64`` when bit-exactness matters (tests), float32
is the fast default (trained models stay far below 2**24).  :meth:`FakeQuantModel.set_ratio`
selects a plan ratio; :meth:`FakeQuantModel.set_masks` sets arbitrary per-layer 4-bit masks
(used by the channel search).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import reference as ref
from .plan import LayerPlan, QuantPlan


def _per_weight(values: np.ndarray, lp: LayerPlan) -> np.ndarray:
    return ref.per_weight(values, lp.weight_shape, lp.groups)


class FakeQuantLayer(nn.Module):
    """Integer-exact emulation of one FlexiQ conv2d/linear layer."""

    def __init__(self, lp: LayerPlan, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lp = lp
        self.kind = lp.kind
        self.dtype = dtype
        self.signed = lp.act_signed
        self.lo, self.hi = ref.act_range(lp.act_signed)
        self.lo4, self.hi4 = ref.act_range(lp.act_signed, 4)
        self.inv_scale = float(lp.act_inv_scale)
        c = lp.in_channels
        shape = (1, c, 1, 1) if lp.kind == "conv2d" else (c,)
        self.chan_shape = shape
        w8 = torch.from_numpy(lp.w_codes.astype(np.float64)).to(dtype)
        w4 = ref.lowered_value(lp.w_codes.astype(np.int32), _per_weight(lp.w_shift, lp), True)
        w4 = torch.from_numpy(w4.astype(np.float64))
        self.register_buffer("w8", w8)
        self.register_buffer("w4", w4.to(dtype))
        sa = lp.act_shift.astype(np.int64)
        self.register_buffer("pow_sa", torch.from_numpy(2.0**sa).to(dtype).reshape(shape))
        half = np.where(sa > 0, 2.0 ** np.maximum(sa - 1, 0), 0.0)
        self.register_buffer("half_sa", torch.from_numpy(half).to(dtype).reshape(shape))
        mult = np.float32(lp.act_scale) * lp.w_scale.astype(np.float32)
        self.register_buffer("mult", torch.from_numpy(mult))
        bias = None if lp.bias is None else torch.from_numpy(lp.bias.astype(np.float32))
        self.register_buffer("bias", bias)
        self.low: torch.Tensor | None = None
        self.weight_now = self.w8

    def set_low(self, mask: np.ndarray | None) -> None:
        """Set which input channels run in 4-bit (``None`` or all-False: pure INT8)."""
        if mask is None or not np.any(mask):
            self.low, self.weight_now = None, self.w8
            return
        m = torch.from_numpy(np.asarray(mask, dtype=bool))
        self.low = m.reshape(self.chan_shape)
        wmask = torch.from_numpy(_per_weight(np.asarray(mask, dtype=bool), self.lp))
        self.weight_now = torch.where(wmask, self.w4, self.w8)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """8-bit codes (as float) of the input, with 4-bit channels already lowered."""
        q = torch.floor(x.float() * self.inv_scale + 0.5).clamp_(self.lo, self.hi)
        q = q.to(self.dtype)
        if self.low is not None:
            q4 = torch.floor((q + self.half_sa) / self.pow_sa).clamp_(self.lo4, self.hi4)
            q = torch.where(self.low, q4 * self.pow_sa, q)
        return q

    def accumulate(self, x: torch.Tensor) -> torch.Tensor:
        """The int32 accumulator, as floats (exact within the dtype's integer range)."""
        q = self.quantize_input(x)
        lp = self.lp
        if self.kind == "conv2d":
            top, bottom, left, right = lp.padding
            if any(lp.padding):
                q = F.pad(q, (left, right, top, bottom))
            return F.conv2d(q, self.weight_now, None, lp.stride, 0, lp.dilation, lp.groups)
        return F.linear(q, self.weight_now)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = self.accumulate(x).float()
        shape = (1, -1, 1, 1) if self.kind == "conv2d" else (-1,)
        y = acc * self.mult.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        return y


def parent_of(net: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(parent module, attribute)`` of the submodule at dotted path ``name``."""
    parent_name, _, attr = name.rpartition(".")
    return (net.get_submodule(parent_name) if parent_name else net), attr


def replace_layers(model: nn.Module, plan: QuantPlan, make) -> tuple[nn.Module, dict]:
    """An eval-mode copy of ``model`` whose plan layers are ``make(original, layer_plan)``,
    and those new modules by layer name (the weights must have the plan's shapes)."""
    net = copy.deepcopy(model).eval()
    layers = {}
    for lp in plan.layers:
        parent, attr = parent_of(net, lp.name)
        orig = getattr(parent, attr)
        if tuple(orig.weight.shape) != tuple(lp.weight_shape):
            raise ValueError(f"layer {lp.name}: model weight {tuple(orig.weight.shape)} "
                             f"does not match the plan's {lp.weight_shape}")
        layers[lp.name] = make(orig, lp)
        setattr(parent, attr, layers[lp.name])
    return net, layers


class FakeQuantModel(nn.Module):
    """A copy of the FP32 model whose covered layers are :class:`FakeQuantLayer` s."""

    def __init__(self, model: nn.Module, plan: QuantPlan, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.plan = plan
        self.net, self.layers = replace_layers(model, plan,
                                               lambda orig, lp: FakeQuantLayer(lp, dtype))
        self.ratio: float | None = None
        self.set_ratio(plan.ratios[0])

    def set_ratio(self, ratio: float) -> None:
        """Run every layer with the plan's 4-bit channel set of ``ratio`` (one of its ratios)."""
        self.plan.check_ratio(ratio)
        for lp in self.plan.layers:
            self.layers[lp.name].set_low(lp.low_mask(ratio))
        self.ratio = ratio

    def set_masks(self, masks: dict[str, np.ndarray | None]) -> None:
        """Per-layer 4-bit masks (layers not named run INT8)."""
        for name, fq in self.layers.items():
            fq.set_low(masks.get(name))
        self.ratio = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the quantized model (float32 unless built with another ``dtype``)."""
        return self.net(x)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """Logits of ``model`` over numpy images, batched."""
    outs = [model(torch.from_numpy(x[i : i + batch])).float().numpy()
            for i in range(0, len(x), batch)]
    return np.concatenate(outs)
