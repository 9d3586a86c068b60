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
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import reference as ref
from .plan import LayerPlan, QuantPlan


def _per_weight(values: np.ndarray, lp: LayerPlan) -> np.ndarray:
    return ref.per_weight(values, lp.weight_shape, lp.groups)


def extraction_terms(lp: LayerPlan, mask: np.ndarray, shape: tuple, dtype: torch.dtype
                     ) -> tuple[torch.Tensor, ...]:
    """Per-input-channel ``(half, 2**-s, lo, hi, 2**s)`` of the 4-bit extraction of ``lp``'s
    input codes under ``mask``, each reshaped to ``shape``.

    One formula for every channel: an 8-bit channel gets shift 0 and the 8-bit bounds, so
    ``clamp(floor((q + half) * 2**-s), lo, hi) * 2**s`` leaves its code as it is.
    """
    sa = lp.act_shift.astype(np.int64)
    lo8, hi8 = ref.act_range(lp.act_signed)
    lo4, hi4 = ref.act_range(lp.act_signed, 4)
    pw = np.where(mask, 2.0**sa, 1.0)
    half = np.where(mask & (sa > 0), 2.0 ** np.maximum(sa - 1, 0), 0.0)
    terms = (half, 1.0 / pw, np.where(mask, lo4, lo8), np.where(mask, hi4, hi8), pw)
    return tuple(torch.from_numpy(np.asarray(t, np.float64)).to(dtype).reshape(shape)
                 for t in terms)


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
        mult = np.float32(lp.act_scale) * lp.w_scale.astype(np.float32)
        self.register_buffer("mult", torch.from_numpy(mult))
        bias = None if lp.bias is None else torch.from_numpy(lp.bias.astype(np.float32))
        self.register_buffer("bias", bias)
        self.low: tuple | None = None  # per-channel terms of the extraction, or None (INT8)
        self.mask: np.ndarray | None = None
        self.mask_sig = 0  # a hash of ``mask`` (0: INT8), the layer's part of a memo key
        self.weight_now = self.w8
        self.memo: _Memo | None = None  # set by the model while it memoizes

    def set_low(self, mask: np.ndarray | None) -> None:
        """Set which input channels run in 4-bit (``None`` or all-False: pure INT8)."""
        if mask is None or not np.any(mask):
            self.low, self.mask, self.weight_now, self.mask_sig = None, None, self.w8, 0
            return
        mask = np.asarray(mask, dtype=bool)
        if self.mask is not None and np.array_equal(mask, self.mask):
            return  # unchanged (the channel search sets every layer's mask per candidate)
        self.mask = mask.copy()
        self.mask_sig = hash(np.packbits(mask).tobytes()) | 1
        self.low = extraction_terms(self.lp, mask, self.chan_shape, self.dtype)
        wmask = torch.from_numpy(_per_weight(mask, self.lp))
        self.weight_now = torch.where(wmask, self.w4, self.w8)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """8-bit codes (as float) of the input, with 4-bit channels already lowered."""
        q = x.float() * self.inv_scale
        q = q.add_(0.5).floor_().clamp_(self.lo, self.hi).to(self.dtype)
        if self.low is not None:
            half, inv_pow, lo, hi, pw = self.low
            # (q + half) * 2**-s is exact (a power of two), so this is the oracle's shift
            q = torch.clamp_(q.add_(half).mul_(inv_pow).floor_(), lo, hi).mul_(pw)
        return q

    def accumulate(self, x: torch.Tensor) -> torch.Tensor:
        """The int32 accumulator, as floats (exact within the dtype's integer range)."""
        q = self.quantize_input(x)
        lp = self.lp
        if self.kind == "conv2d":
            top, bottom, left, right = lp.padding
            pad = (top, left)
            if (top, left) != (bottom, right):  # asymmetric ("same" padding): pad codes
                q, pad = F.pad(q, (left, right, top, bottom)), 0
            return F.conv2d(q, self.weight_now, None, lp.stride, pad, lp.dilation, lp.groups)
        return F.linear(q, self.weight_now)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memo = self.memo
        if memo is not None and memo.active:
            key = memo.extend(self.mask_sig)
            hit = memo.get(self.lp.name, key)
            if hit is not None:
                return hit.clone()  # what follows may work in place (ReLU(inplace), +=)
            y = self._compute(x)
            memo.put(self.lp.name, key, y.clone())
            return y
        return self._compute(x)

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        acc = self.accumulate(x).float()
        shape = (1, -1, 1, 1) if self.kind == "conv2d" else (-1,)
        y = acc.mul_(self.mult.reshape(shape))
        if self.bias is not None:
            y = y.add_(self.bias.reshape(shape))
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


class _Memo:
    """Layer outputs kept between forwards over one fixed batch (the channel search).

    A layer's output depends only on the batch and on the masks of the layers that ran before
    it and of itself, so it is keyed by that chain of mask signatures: a candidate that
    differs from a kept one first at layer ``k`` recomputes from layer ``k`` on.  Each layer
    keeps its ``size`` most recently used outputs, plus those of the pinned candidate.
    """

    def __init__(self, x: torch.Tensor, size: int) -> None:
        self.x, self.size = x, size
        self.active = False
        self.pinning = False
        self.chain: tuple = ()
        self.lru: dict[str, OrderedDict] = {}
        self.pinned: dict[str, tuple] = {}  # layer -> (key, output)
        self.hits = self.misses = 0

    def start(self, x: torch.Tensor, pin: bool) -> None:
        self.active = x is self.x
        self.chain = ()
        self.pinning = pin and self.active
        if self.pinning:
            self.pinned = {}

    def extend(self, sig: int) -> tuple:
        self.chain = (*self.chain, sig)
        return self.chain

    def get(self, name: str, key: tuple) -> torch.Tensor | None:
        pk = self.pinned.get(name)
        if pk is not None and pk[0] == key:
            self.hits += 1
            return pk[1]
        lru = self.lru.get(name)
        if lru is not None and key in lru:
            lru.move_to_end(key)
            self.hits += 1
            return lru[key]
        self.misses += 1
        return None

    def put(self, name: str, key: tuple, y: torch.Tensor) -> None:
        if self.pinning:
            self.pinned[name] = (key, y)
            return
        lru = self.lru.setdefault(name, OrderedDict())
        lru[key] = y
        while len(lru) > self.size:
            lru.popitem(last=False)


class FakeQuantModel(nn.Module):
    """A copy of the FP32 model whose covered layers are :class:`FakeQuantLayer` s."""

    def __init__(self, model: nn.Module, plan: QuantPlan, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.plan = plan
        self.net, self.layers = replace_layers(model, plan,
                                               lambda orig, lp: FakeQuantLayer(lp, dtype))
        self.ratio: float | None = None
        self._memo: _Memo | None = None
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

    def memoize(self, x: torch.Tensor | None, size: int = 3) -> None:
        """Keep layer outputs between forwards over exactly this tensor ``x`` (``None``:
        stop).  Other inputs run as usual; see :class:`_Memo`."""
        memo = None if x is None else _Memo(x, size)
        for fq in self.layers.values():
            fq.memo = memo
        self._memo = memo

    def forward(self, x: torch.Tensor, pin: bool = False) -> torch.Tensor:
        """Logits of the quantized model (float32 unless built with another ``dtype``).
        ``pin``: while memoizing, keep this candidate's layer outputs until the next pin."""
        memo = self._memo
        if memo is not None:
            memo.start(x, pin)
        try:
            return self.net(x)
        finally:
            if memo is not None:
                memo.active = False


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """Logits of ``model`` over numpy images, batched."""
    outs = [model(torch.from_numpy(x[i : i + batch])).float().numpy()
            for i in range(0, len(x), batch)]
    return np.concatenate(outs)
