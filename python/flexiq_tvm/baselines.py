"""Baseline quantizers compared against FlexiQ in ``flexiq-tvm eval``.

``uniform-w4a4``: plain post-training W4A4 (min-max): weights per-output-channel symmetric
4-bit (``[-7, 7]``), activations per-tensor 4-bit over the calibrated range (unsigned
``[0, 15]`` when non-negative, else symmetric ``[-7, 7]``).  Same layers as FlexiQ's eligible
ones; the first and last layer stay 8-bit like FlexiQ's, so the comparison isolates the
4-bit scheme.  (``naive-truncation`` and ``random`` are FlexiQ plans with ``extraction="naive"``
or ``selection="random"``; see :mod:`flexiq_tvm.eval`.)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import reference as ref
from .plan import QuantPlan


class UniformQuantLayer(nn.Module):
    """Fake-quant conv/linear with ``bits``-bit per-channel weights and per-tensor inputs."""

    def __init__(self, module: nn.Module, lp, bits: int) -> None:
        super().__init__()
        self.module = module
        self.lp = lp
        top = 2 ** (bits - 1) - 1
        w = module.weight.detach().float()
        amax = w.reshape(w.shape[0], -1).abs().amax(1).clamp_min(1e-12)
        s = (amax / top).reshape((-1,) + (1,) * (w.ndim - 1))
        self.register_buffer("w_q", (w / s).round().clamp(-top, top) * s)
        # activation range from the plan's 8-bit calibration: amax = scale * 8-bit top
        a_top8 = ref.INT8_MAX if lp.act_signed else ref.UINT8_MAX
        a_max = lp.act_scale * a_top8
        self.a_lo, self.a_hi = (-top, top) if lp.act_signed else (0, 2**bits - 1)
        self.a_scale = a_max / self.a_hi if a_max > 0 else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = (x / self.a_scale).round().clamp(self.a_lo, self.a_hi) * self.a_scale
        m, lp = self.module, self.lp
        if lp.kind == "conv2d":
            top, bottom, left, right = lp.padding
            xq = F.pad(xq, (left, right, top, bottom))
            return F.conv2d(xq, self.w_q, m.bias, m.stride, 0, m.dilation, m.groups)
        return F.linear(xq, self.w_q, m.bias)


def uniform_model(model: nn.Module, plan: QuantPlan, bits: int = 4) -> nn.Module:
    """A copy of ``model`` whose eligible layers run uniform ``bits``-bit fake quantization
    and whose other covered layers run FlexiQ INT8 (the plan at ratio 0)."""
    from .fakequant import FakeQuantLayer, replace_layers

    net, _ = replace_layers(model, plan, lambda orig, lp: UniformQuantLayer(orig, lp, bits)
                            if lp.eligible else FakeQuantLayer(lp))
    return net


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(softmax(p) || softmax(q)) over rows, in nats."""
    p = torch.log_softmax(torch.from_numpy(p_logits).double(), -1)
    q = torch.log_softmax(torch.from_numpy(q_logits).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())
