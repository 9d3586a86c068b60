"""Mixed-precision (INT8 + shifted INT4) TensorIR kernels for llvm, scheduled by hand.

Each function returns a PrimFunc for one layer's static shapes; the low-bit boundary is a
runtime scalar, so the ratio variants of a module share every kernel and every weight buffer.
Arithmetic is the integer oracle's (:mod:`flexiq_tvm.reference`) exactly:

* ``quantize_padded`` / ``quantize_rows``: 8-bit activation codes
  ``clip(floor(x * inv + 0.5))``; for a 4-bit channel the effective extraction
  ``clip((q + 2**(sa-1)) >> sa)``, shifted left by the channel's total shift ``sa + sw``
  (at most 15 << 8, an int16). Moving the oracle's per-channel left shift of the 4-bit partial
  product onto the activation is exact and leaves the GEMM one uniform int16 dot product.
  A conv input is written zero-padded (code 0 is the value 0), a linear input as the GEMM's
  ``[P, K]`` rows, zero-padded to the tiles. A channel is 4-bit when its rank in the plan's
  priority order is below ``n_low`` (for GEMM layers, whose low block is the reordered prefix,
  the rank is the identity).
* ``im2col``: padded codes -> the GEMM's ``[P, K]`` operand for conv, ``K`` in
  ``(channel, ky, kx)`` order so the 4-bit rows stay a prefix; zero padding.
* ``mixed_gemm``: ``acc[o, p] = sum_k col[p, k] * w[k, o]`` in int32 with ``vpmaddwd`` (AVX2),
  ``w`` the raw 4-bit weight for the ``nk`` prefix rows and the INT8 weight for the rest. The
  4-bit weights are packed two per byte; each parallel task widens its 16-output weight panel
  to int16 once, so the unpacking is amortised over all its positions. Register tile:
  16 outputs (two 8-lane int32 vectors) x ``TP`` positions.
* ``mixed_grouped_conv``: direct grouped/depthwise conv; a channel is 4-bit when its rank in the
  plan's priority order is below ``n_low`` (no contiguous block needed).
* ``dequantize``: ``float(acc) * (s_a * s_w[o])``, dropping the tile padding.

The float part of the quantizer is two rounded float32 operations (multiply, then add), as in
numpy and torch: no fused multiply-add (the target must not contract it; tests check ties).
"""

from __future__ import annotations

from tvm.script import tirx as T

TO = 16  # output-channel tile (two AVX2 int32 vectors)
TP = 6  # position tile (register accumulators: TP x 2 vectors)
OPAQUE = 8  # relax op_pattern kOpaque: FuseOps leaves these kernels alone


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def _act_bounds(signed: bool) -> tuple[int, int, int, int]:
    return (-127, 127, -8, 7) if signed else (0, 255, 0, 15)


def im2col(n, c, hp, wp, kh, kw, stride, dil, oh, ow, ppad, kpad):
    """Padded codes i16[n,c,hp,wp] -> col i16[n, ppad, kpad]: row ``p`` holds position ``p``'s
    receptive field in ``(channel, ky, kx)`` order; zero beyond ``c*kh*kw`` and beyond P."""
    sh, sw = stride
    dh, dw = dil
    kk = kh * kw
    kdim = c * kk
    p_real = oh * ow

    @T.prim_func(private=True, s_tir=True)
    def im2col(q: T.Buffer((n, c, hp, wp), "int16"), col: T.Buffer((n, ppad, kpad), "int16")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            for by in T.parallel(n * oh):
                for x in range(ow):
                    for ci, r in T.grid(c, kk):
                        col[by // oh, (by % oh) * ow + x, ci * kk + r] = q[
                            by // oh, ci, (by % oh) * sh + (r // kw) * dh, x * sw + (r % kw) * dw]
                    for kq in range(kpad - kdim):
                        col[by // oh, (by % oh) * ow + x, kdim + kq] = T.int16(0)
            for b, pq, kq in T.grid(n, ppad - p_real, kpad):
                col[b, p_real + pq, kq] = T.int16(0)

    return im2col


def quantize_rows(m, k, mpad, kpad, inv, signed):
    """x f32[m,k] -> col i16[1, mpad, kpad] (GEMM rows; zero padding), channels < n_low as
    shifted 4-bit codes ``extract(q, sa) << st``."""
    lo, hi, lo4, hi4 = _act_bounds(signed)

    @T.prim_func(private=True, s_tir=True)
    def quantize_rows(x: T.Buffer((m, k), "float32"), sa: T.Buffer((k,), "int32"),
                      st: T.Buffer((k,), "int32"), n_low: T.int32,
                      col: T.Buffer((1, mpad, kpad), "int16")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            for p in T.parallel(mpad):
                for ci in range(kpad):
                    col[0, p, ci] = T.int16(0)
                if p < m:
                    for ci in range(k):
                        col[0, p, ci] = T.Cast("int16", _code(
                            x[p, ci], inv, lo, hi, lo4, hi4, sa[ci], st[ci], ci < n_low))

    return quantize_rows


def _code(v, inv, lo, hi, lo4, hi4, s, st, low):
    """The 8-bit code of ``v``, or for a 4-bit channel its extracted code shifted left by
    ``st`` (the channel's activation plus weight shift: the product with the raw 4-bit weight
    is then already on the INT8 scale)."""
    q = T.max(T.min(T.Cast("int32", T.floor(v * T.float32(inv) + T.float32(0.5))), hi), lo)
    q4 = T.max(T.min(T.shift_right(q + T.if_then_else(s > 0, T.shift_left(1, s - 1), 0), s),
                     hi4), lo4)
    return T.if_then_else(low, T.shift_left(q4, st), q)


def _pmadd(a, b):
    """``vpmaddwd``: 16 x int16 pairs -> 8 x int32 sums of pair products (exact)."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                                   a, b, dtype="int32x8")


def gemm_chunks(nob: int, npb: int, tasks: int = 8) -> int:
    """Position tiles per parallel task: at least ``tasks`` tasks where the work allows, and
    as few as possible (each task widens its 16-output weight panel once)."""
    nchunk = min(npb, max(1, -(-tasks // nob)))
    return -(-npb // nchunk)


def mixed_gemm(n, opad, k, ppad, k4, layout):
    """col i16[n,ppad,kpad] x weights -> acc i32[n,opad,ppad] ("OP") or [n,ppad,opad] ("PO").

    ``acc[o, p] = sum_k col[p, k] * w[k, o]`` where ``w`` is the raw 4-bit weight for rows
    ``k < nk`` (the activation codes of those rows are pre-shifted) and the INT8 weight for the
    others. Weights: ``w8`` int8 ``[kpad/2, opad, 2]`` (row pairs interleaved, as ``vpmaddwd``
    reads them) and ``w4`` uint8 ``[k4pad/2, opad/16, 16]`` (per row pair and 16 outputs, 32
    nibbles in the same interleaved order, byte ``j`` holding element ``j`` and ``j + 16``).
    Each task widens one 16-output panel to int16 once (choosing 4- or 8-bit per row), then
    runs ``TP x 16`` register tiles of ``vpmaddwd`` over its positions.
    """
    if opad % TO or ppad % TP:
        raise ValueError(f"mixed_gemm: opad={opad} must be a multiple of {TO}, ppad={ppad} of {TP}")
    nob, npb = opad // TO, ppad // TP
    kpad = _round_up(k, 2)
    kh2 = kpad // 2
    k4h = max(_round_up(k4, 2) // 2, 1)
    ppc = gemm_chunks(nob, npb)
    nchunk = -(-npb // ppc)
    out_shape = (n, opad, ppad) if layout == "OP" else (n, ppad, opad)

    @T.prim_func(private=True, s_tir=True)
    def mixed_gemm(col: T.Buffer((n, ppad, kpad), "int16"), w8: T.Buffer((kh2, 2 * opad), "int8"),
                   w4: T.Buffer((k4h, nob, 16), "uint8"), nk: T.int32,
                   acc: T.Buffer(out_shape, "int32")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            for b in range(n):
                for t in T.parallel(nob * nchunk):
                    panel = T.alloc_buffer((kh2, 2 * TO), "int16")
                    accl = T.alloc_buffer((TP, TO), "int32", scope="local")
                    for kp in range(kh2):
                        if 2 * kp + 1 < nk:
                            for j in T.vectorized(16):
                                panel[kp, j] = T.Cast("int16", T.bitwise_xor(T.bitwise_and(
                                    T.Cast("int32", w4[kp, t // nchunk, j]), 15), 8) - 8)
                            for j in T.vectorized(16):
                                panel[kp, j + 16] = T.Cast("int16", T.bitwise_xor(T.shift_right(
                                    T.Cast("int32", w4[kp, t // nchunk, j]), 4), 8) - 8)
                        elif 2 * kp >= nk:
                            for j in T.vectorized(2 * TO):
                                panel[kp, j] = T.Cast("int16", w8[kp, (t // nchunk) * 2 * TO + j])
                        else:
                            for j in range(2 * TO):
                                if j % 2 == 0:
                                    panel[kp, j] = T.Cast("int16", T.bitwise_xor(T.bitwise_and(
                                        T.shift_right(T.Cast("int32", w4[kp, t // nchunk, j % 16]),
                                                      (j // 16) * 4), 15), 8) - 8)
                                else:
                                    panel[kp, j] = T.Cast("int16",
                                                          w8[kp, (t // nchunk) * 2 * TO + j])
                    for pt in range(ppc):
                        if (t % nchunk) * ppc + pt < npb:
                            for pi in T.unroll(TP):
                                for oi in T.vectorized(TO):
                                    accl[pi, oi] = 0
                            for kp in range(kh2):
                                for pi in T.unroll(TP):
                                    accl[pi, T.ramp(0, 1, 8)] = accl[pi, T.ramp(0, 1, 8)] + _pmadd(
                                        T.reinterpret(T.broadcast(T.reinterpret(col[
                                            b, ((t % nchunk) * ppc + pt) * TP + pi,
                                            T.ramp(2 * kp, 1, 2)], dtype="int32"), 8),
                                            dtype="int16x16"),
                                        panel[kp, T.ramp(0, 1, 16)])
                                    accl[pi, T.ramp(8, 1, 8)] = accl[pi, T.ramp(8, 1, 8)] + _pmadd(
                                        T.reinterpret(T.broadcast(T.reinterpret(col[
                                            b, ((t % nchunk) * ppc + pt) * TP + pi,
                                            T.ramp(2 * kp, 1, 2)], dtype="int32"), 8),
                                            dtype="int16x16"),
                                        panel[kp, T.ramp(16, 1, 16)])
                            if layout == "OP":
                                for oi in range(TO):
                                    for pi in T.unroll(TP):
                                        acc[b, (t // nchunk) * TO + oi,
                                            ((t % nchunk) * ppc + pt) * TP + pi] = accl[pi, oi]
                            else:
                                for pi in T.unroll(TP):
                                    for oi in T.vectorized(TO):
                                        acc[b, ((t % nchunk) * ppc + pt) * TP + pi,
                                            (t // nchunk) * TO + oi] = accl[pi, oi]

    return mixed_gemm


def dequantize(n, o, p, opad, ppad, layout):
    """acc i32 (tile-padded) -> f32 ``[n, o, p]`` ("OP") or ``[p, o]`` ("PO"): acc * mult[o]."""

    if layout == "OP":
        @T.prim_func(private=True, s_tir=True)
        def dequantize_op(acc: T.Buffer((n, opad, ppad), "int32"),
                          mult: T.Buffer((o,), "float32"), y: T.Buffer((n, o, p), "float32")):
            T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
            with T.sblock("root"):
                for b, oc in T.grid(n, o):
                    for q in range(p):
                        y[b, oc, q] = T.Cast("float32", acc[b, oc, q]) * mult[oc]

        func = dequantize_op
    else:
        @T.prim_func(private=True, s_tir=True)
        def dequantize_po(acc: T.Buffer((n, ppad, opad), "int32"),
                          mult: T.Buffer((o,), "float32"), y: T.Buffer((p, o), "float32")):
            T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
            with T.sblock("root"):
                for q, oc in T.grid(p, o):
                    y[q, oc] = T.Cast("float32", acc[0, q, oc]) * mult[oc]

        func = dequantize_po
    return func


def quantize_padded(n, c, h, w, pad, inv, signed):
    """x f32[n,c,h,w] -> q i16[n,c,h+pt+pb,w+pl+pr] (zero border); where ``rank[c] < n_low``
    the shifted 4-bit code ``extract(q, sa) << st`` (see :func:`_code`)."""
    lo, hi, lo4, hi4 = _act_bounds(signed)
    pt, pb, pl, pr = pad
    hp, wp = h + pt + pb, w + pl + pr

    @T.prim_func(private=True, s_tir=True)
    def quantize_padded(x: T.Buffer((n, c, h, w), "float32"), sa: T.Buffer((c,), "int32"),
                        st: T.Buffer((c,), "int32"), rank: T.Buffer((c,), "int32"),
                        n_low: T.int32, q: T.Buffer((n, c, hp, wp), "int16")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            for bc in T.parallel(n * c):
                for ih, iw in T.grid(hp, wp):
                    q[bc // c, bc % c, ih, iw] = T.int16(0)
                for ih, iw in T.grid(h, w):
                    q[bc // c, bc % c, ih + pt, iw + pl] = T.Cast("int16", _code(
                        x[bc // c, bc % c, ih, iw], inv, lo, hi, lo4, hi4, sa[bc % c],
                        st[bc % c], rank[bc % c] < n_low))

    return quantize_padded


def mixed_grouped_conv(n, c, hp, wp, o, cg, kh, kw, stride, dil, oh, ow, groups):
    """Direct grouped conv over padded codes -> acc i32[n,o,oh,ow]; the raw 4-bit weight where
    ``rank[cin] < n_low`` (whose activation codes come pre-shifted), else the INT8 weight."""
    og = o // groups
    sh, sw = stride
    dh, dw = dil
    nw = o * cg * kh * kw
    npk = (nw + 1) // 2

    @T.prim_func(private=True, s_tir=True)
    def mixed_grouped_conv(q: T.Buffer((n, c, hp, wp), "int16"),
                           w8: T.Buffer((o, cg, kh, kw), "int8"), w4: T.Buffer((npk,), "uint8"),
                           rank: T.Buffer((c,), "int32"), n_low: T.int32,
                           acc: T.Buffer((n, o, oh, ow), "int32")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            for b in range(n):
                for oc in T.parallel(o):
                    for y, x in T.grid(oh, ow):
                        acc[b, oc, y, x] = 0
                    for ci, ry, rx in T.grid(cg, kh, kw):
                        for y, x in T.grid(oh, ow):
                            acc[b, oc, y, x] = acc[b, oc, y, x] + T.Cast("int32", q[
                                b, (oc // og) * cg + ci, y * sh + ry * dh, x * sw + rx * dw]) * \
                                T.if_then_else(rank[(oc // og) * cg + ci] < n_low, T.bitwise_xor(
                                    T.bitwise_and(T.shift_right(T.Cast("int32", w4[(
                                        ((oc * cg + ci) * kh + ry) * kw + rx) // 2]), (((
                                            (oc * cg + ci) * kh + ry) * kw + rx) % 2) * 4), 15),
                                    8) - 8, T.Cast("int32", w8[oc, ci, ry, rx]))

    return mixed_grouped_conv


KERNELS = {
    "gemm_tiles": (TO, TP),
    "im2col": im2col,
    "quantize_rows": quantize_rows,
    "mixed_gemm": mixed_gemm,
    "dequantize": dequantize,
    "quantize_padded": quantize_padded,
    "mixed_grouped_conv": mixed_grouped_conv,
}
