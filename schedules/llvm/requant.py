"""Fused epilogues for llvm: a covered layer's int32 accumulator, through the FP32 glue after
it, straight into the next covered layer's input codes, in one pass over memory.

:class:`flexiq_tvm.transform.FuseRequantize` finds the chains; these kernels compute them.
Between the accumulator and the codes nothing is stored unless another consumer needs the FP32
tensor (a residual's skip path): then the kernel also writes it (``z``) and makes the codes
from what it wrote.

Exactness: the value of channel ``ci`` at pixel ``(yy, xx)`` is computed as the unfused module
computes it, in the same order with every result rounded to float32: ``float(acc) * mult[ci]``
(the dequantizer), then each glue step of the graph in order (``+ - * /`` with a per-channel
constant or the residual tensor, ``max`` / ``min`` for ReLU, ReLU6 and clip, TVM's own
``max(min(x, hi), lo)``), then the consumer's ``clip(floor(v * inv + 0.5))``. These kernels
are built in the module's own llvm target (FMA contraction off), never with an ISA's kernel
target, so the bits are the oracle's.

A glue step is ``(op, kind, arg, left)``: ``op`` one of :data:`STEP_OPS`; ``kind`` ``"cv"``
(row ``arg`` of the per-channel constant table ``cv[K, c]``) or ``"res"`` (the residual
tensor, same shape as the output); ``left``: the operand is on the left (``c - x``, ``c / x``).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..arith import code8, extract4
from .mixed import (
    OPAQUE,
    _act_bounds,
    _fill4,
    _isa,
    _off8,
    _pre4,
    _q8_dtype,
    nhwc_border,
    nhwc_codes,
    padded_codes,
    uses_vnni,
)

VC = 16  # channels per vector in the channels-last ("PO") epilogue

STEP_OPS = ("add", "subtract", "multiply", "divide", "maximum", "minimum")


def glue_value(acc, mult, cv, res, steps, ow, nn, ci, yy, xx, layout="OP", res_nhwc=False):
    """The float32 value of output channel ``ci`` at ``(yy, xx)``: the dequantized
    accumulator (``acc[n, o, p]`` for ``layout`` "OP", ``acc[n, p, o]`` for "PO"; position
    ``p = yy * ow + xx``) through ``steps`` (the residual ``res`` read NCHW, or NHWC when
    ``res_nhwc``: a tensor another fused epilogue wrote channels-last)."""
    a = acc[nn, ci, yy * ow + xx] if layout == "OP" else acc[nn, yy * ow + xx, ci]
    v = T.Cast("float32", a) * mult[ci]
    for op, kind, arg, left in steps:
        if kind == "cv":
            b = cv[arg, ci]
        else:
            b = res[nn, yy, xx, ci] if res_nhwc else res[nn, ci, yy, xx]
        lhs, rhs = (b, v) if left else (v, b)
        if op == "add":
            v = lhs + rhs
        elif op == "subtract":
            v = lhs - rhs
        elif op == "multiply":
            v = lhs * rhs
        elif op == "divide":
            v = lhs / rhs
        elif op == "maximum":
            v = T.max(lhs, rhs)
        elif op == "minimum":
            v = T.min(lhs, rhs)
        else:
            raise ValueError(f"glue op {op!r}; fusable: {STEP_OPS}")
    return v


def _read(value, gather):
    """``value`` with the consumer's channel ``ci`` read at the producer's ``gather[ci]`` (a
    ``take`` between them, folded), or ``value`` itself when ``gather`` is None (no loads
    through an index then: in the channels-last body they would be gathers)."""
    if gather is None:
        return value
    return lambda nn, ci, yy, xx: value(nn, gather[ci], yy, xx)


def _without_z(func):
    """``func`` without its last parameter (the FP32 output ``zb``, which its body does not
    touch when ``z`` is off): one TVMScript definition serves both variants."""
    return tirx.PrimFunc(list(func.params)[:-1], func.body, func.ret_type, func.attrs)


def _check(steps, n_cv):
    for op, kind, arg, _ in steps:
        if op not in STEP_OPS or kind not in ("cv", "res"):
            raise ValueError(f"glue step {(op, kind)!r}; fusable: {STEP_OPS} with a "
                             "per-channel constant or the residual")
        if kind == "cv" and not 0 <= arg < n_cv:
            raise ValueError(f"glue step reads constant row {arg} of {n_cv}")


def requantize_nhwc(acc_shape, ow, steps, n_cv, res, z, gathered, n, c, h, w, pad, cpad,
                    slots, inv, signed, isa=None, layout="OP", z_nhwc=False, res_nhwc=False):
    """acc i32 ``acc_shape`` (``layout`` "OP": ``[n, >=c, >=h*w]``; "PO": ``[n, >=h*w, >=c]``,
    a GEMM that wrote its outputs channels-last) -> the codes of
    :func:`~.mixed.quantize_nhwc` (``q8``, ``q4``) of the glue's output, and with ``z`` that
    output f32 ``[n, c, h, w]``. Operands: ``acc, mult[c], cv[max(n_cv, 1), c], res, gather,
    sa, slot_chan, n_low``; ``res`` is f32 ``[n, c, h, w]`` when the glue has a residual step,
    else an unused ``[1, 1, 1, 1]``; ``gather`` i32 ``[c]``: the consumer's channel ``ci`` is
    the glue output's channel ``gather[ci]`` when ``gathered`` (``z`` is in the producer's
    order), else unused. With "PO", ``z_nhwc`` writes ``z`` as ``[n, h, w, c]`` and
    ``res_nhwc`` reads ``res`` so (contiguous along the channels, like the accumulator)."""
    if (z_nhwc or res_nhwc) and layout != "PO":
        raise ValueError("channels-last z / residual need the channels-last accumulator")
    _check(steps, n_cv)
    isa = _isa(isa)
    if layout == "PO":
        body = po_codes(n, c, h, w, pad, cpad, slots, inv, signed, isa, z=z, z_nhwc=z_nhwc)
    else:
        body = nhwc_codes(n, c, h, w, pad, cpad, slots, inv, signed, isa, z=z)
    hp, wp = h + pad[0] + pad[1], w + pad[2] + pad[3]
    rshape = ((n, h, w, c) if res_nhwc else (n, c, h, w)) if res else (1, 1, 1, 1)
    zshape = (n, h, w, c) if z_nhwc else (n, c, h, w)
    d8 = _q8_dtype(isa)
    k = max(n_cv, 1)

    def val(acc, mult, cv, r):
        return lambda nn, ci, yy, xx: glue_value(acc, mult, cv, r, steps, ow, nn, ci, yy, xx,
                                                 layout, res_nhwc)

    @T.prim_func(private=True, s_tir=True)
    def requantize(acc: T.Buffer(acc_shape, "int32"), mult: T.Buffer((c,), "float32"),
                   cv: T.Buffer((k, c), "float32"), r: T.Buffer(rshape, "float32"),
                   gather: T.Buffer((c,), "int32"), sa: T.Buffer((c,), "int32"),
                   slot_chan: T.Buffer((slots,), "int32"), n_low: T.int32,
                   q8: T.Buffer((n, hp, wp, cpad), d8),
                   q4: T.Buffer((n, hp, wp, slots), "uint8"), zb: T.Buffer(zshape, "float32")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            if layout == "PO":
                body(val(acc, mult, cv, r), gather if gathered else None, sa, slot_chan, n_low,
                     q8, q4, zb)
            else:
                body(val(acc, mult, cv, r),
                     _read(lambda nn, ci, yy, xx: zb[nn, ci, yy, xx] if z
                           else val(acc, mult, cv, r)(nn, ci, yy, xx),
                           gather if gathered else None), sa, slot_chan, n_low, q8, q4, zb)

    return requantize if z else _without_z(requantize)


def requantize_padded(acc_shape, ow, steps, n_cv, res, z, gathered, n, c, h, w, pad, inv,
                      signed):
    """acc i32 ``acc_shape`` -> the codes of :func:`~.mixed.quantize_padded` (``q``, for a
    grouped / depthwise conv) of the glue's output, and with ``z`` that output. Operands:
    ``acc, mult, cv, res, gather`` as in :func:`requantize_nhwc`, then ``sa, st, rank,
    n_low``."""
    _check(steps, n_cv)
    body = padded_codes(n, c, h, w, pad, inv, signed, z=z)
    hp, wp = h + pad[0] + pad[1], w + pad[2] + pad[3]
    rshape = (n, c, h, w) if res else (1, 1, 1, 1)
    k = max(n_cv, 1)

    def val(acc, mult, cv, r):
        return lambda nn, ci, yy, xx: glue_value(acc, mult, cv, r, steps, ow, nn, ci, yy, xx)

    @T.prim_func(private=True, s_tir=True)
    def requantize(acc: T.Buffer(acc_shape, "int32"), mult: T.Buffer((c,), "float32"),
                   cv: T.Buffer((k, c), "float32"), r: T.Buffer(rshape, "float32"),
                   gather: T.Buffer((c,), "int32"), sa: T.Buffer((c,), "int32"),
                   st: T.Buffer((c,), "int32"), rank: T.Buffer((c,), "int32"), n_low: T.int32,
                   q: T.Buffer((n, c, hp, wp), "int16"), zb: T.Buffer((n, c, h, w), "float32")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            body(val(acc, mult, cv, r),
                 _read(lambda nn, ci, yy, xx: zb[nn, ci, yy, xx] if z
                       else val(acc, mult, cv, r)(nn, ci, yy, xx),
                       gather if gathered else None), sa, st, rank, n_low, q, zb)

    return requantize if z else _without_z(requantize)


def po_codes(n, c, h, w, pad, cpad, slots, inv, signed, isa, z: bool = False,
             z_nhwc: bool = False):
    """The codes of :func:`~.mixed.quantize_nhwc` made from a channels-last ("PO")
    accumulator, as a macro ``body(val, gather, sa, slot_chan, n_low, q8, q4, zbuf)``: per
    interior pixel the values of its channels are computed ``VC`` at a time, read and stored
    contiguously (the producer's GEMM wrote its outputs channels-last, so nothing is
    transposed), and coded into a local row of 8-bit codes; the 8-bit buffer and the 4-bit
    slots read that row (the slots through their channel, ``gather`` when not None, both
    resolved once per row). With ``z`` the values are also stored in ``zbuf``
    (``[n, c, h, w]``, or ``[n, h, w, c]`` with ``z_nhwc``)."""
    lo, hi, lo4, hi4 = _act_bounds(signed)
    off = 8 if signed else 0
    vnni = uses_vnni(isa)
    d8, off8 = _q8_dtype(isa), _off8(isa, signed)
    pt, pb, pl, _ = pad
    hp = h + pt + pb
    border = nhwc_border(n, h, w, pad, cpad, slots, signed, isa)
    zv = c // VC * VC
    # the local rows in whole vectors: TVM aligns a stack buffer of a multiple of 4 elements
    # to 64 bytes and its vector accesses assume so (13 floats got a 16-byte slot: a fault)
    cr, cr8 = -(-c // VC) * VC, -(-cpad // VC) * VC

    # Select, not if_then_else: the conditions vary across a vector's lanes, and TVM
    # scalarises an if_then_else there (both sides are safe to evaluate: indices are clamped)
    @T.macro
    def body(val, gather, sa, slot_chan, n_low, q8, q4, zbuf):
        for by in T.parallel(n * hp):
            border(by, sa, slot_chan, n_low, q8, q4)
            if by % hp >= pt and by % hp < pt + h:
                # per slot: the code row's index of its channel, and its shift
                src4 = T.decl_buffer((slots,), "int32")
                sh4 = T.decl_buffer((slots,), "int32")
                src8 = T.decl_buffer((cr8,), "int32")  # code row index of each 8-bit channel
                for ci in range(cpad):
                    src8[ci] = _read(lambda nn, cc, yy, xx: cc, gather)(0, T.min(ci, c - 1), 0,
                                                                        0)
                for si in range(slots):
                    src4[si] = _read(lambda nn, cc, yy, xx: cc, gather)(
                        0, T.max(slot_chan[si], 0), 0, 0)
                    sh4[si] = sa[T.max(slot_chan[si], 0)]
                for ix in range(w):
                    vals = T.decl_buffer((cr,), "float32")
                    row = T.decl_buffer((cr,), "int32")
                    for co in range(zv // VC):
                        for ci in T.vectorized(VC):
                            vals[co * VC + ci] = val(by // hp, co * VC + ci, by % hp - pt, ix)
                    if c > zv:
                        for ci in T.vectorized(c - zv):
                            vals[zv + ci] = val(by // hp, zv + ci, by % hp - pt, ix)
                    for ci in T.vectorized(c):
                        row[ci] = code8(vals[ci], inv, lo, hi)
                    if z and z_nhwc:
                        for ci in T.vectorized(c):
                            zbuf[by // hp, by % hp - pt, ix, ci] = vals[ci]
                    if z and not z_nhwc:
                        for ci in range(c):
                            zbuf[by // hp, ci, by % hp - pt, ix] = vals[ci]
                    for ci in T.vectorized(cpad):
                        q8[by // hp, by % hp, pl + ix, ci] = T.Cast(d8, T.Select(
                            tirx.all(ci >= n_low, ci < c),
                            row[src8[ci]], 0) + off8)
                    if n_low > 0:  # else the GEMM reads no 4-bit code
                        for si in T.vectorized(slots):
                            q4[by // hp, by % hp, pl + ix, si] = T.Select(
                                tirx.all(slot_chan[si] >= 0, slot_chan[si] < n_low),
                                T.Cast("uint8", _pre4(off + extract4(row[src4[si]], sh4[si],
                                                                     lo4, hi4), sh4[si], vnni)),
                                _fill4(off, sa, slot_chan, si, vnni))

    return body
