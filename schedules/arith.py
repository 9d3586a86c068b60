"""TIR expressions of the integer oracle's arithmetic (:mod:`flexiq_tvm.reference`), shared by
every target's kernels so that they all compute the same codes."""

from __future__ import annotations

from tvm.script import tirx as T


def code8(v, inv: float, lo, hi, exact: bool = False):
    """The 8-bit activation code ``clip(floor(v * inv + 0.5), lo, hi)`` with two float32
    roundings. ``exact``: through ``__fmul_rn`` / ``__fadd_rn`` (CUDA), which nvcc never
    contracts into an FMA (one rounding, which can move a value across ``.5``)."""
    if exact:
        t = T.call_pure_extern("float32", "__fadd_rn", T.call_pure_extern(
            "float32", "__fmul_rn", v, T.float32(inv)), T.float32(0.5))
    else:
        t = v * T.float32(inv) + T.float32(0.5)
    return T.max(T.min(T.Cast("int32", T.floor(t)), hi), lo)


def extract4(q, s, lo4, hi4):
    """Effective bit extraction ``clip((q + 2**(s-1)) >> s, lo4, hi4)`` to 4 bits. The rounding
    term is ``(1 << s) >> 1`` (0 for ``s = 0``): no branch, so a vector of lanes with
    different shifts stays a vector (TVM scalarises an ``if_then_else`` whose condition
    varies across lanes)."""
    return T.max(T.min(T.shift_right(q + T.shift_right(T.shift_left(1, s), 1), s), hi4), lo4)
