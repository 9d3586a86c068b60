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


def quantize_rows(m, k, kpad, inv, signed):
    """x f32[m,k] -> q i16[1, 1, m, kpad]: the GEMM's rows (a linear layer is a 1x1 conv over
    ``m`` positions), zero beyond ``k``; channels < n_low as shifted 4-bit codes."""
    lo, hi, lo4, hi4 = _act_bounds(signed)

    @T.prim_func(private=True, s_tir=True)
    def quantize_rows(x: T.Buffer((m, k), "float32"), sa: T.Buffer((k,), "int32"),
                      st: T.Buffer((k,), "int32"), n_low: T.int32,
                      q: T.Buffer((1, 1, m, kpad), "int16")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            for p in T.parallel(m):
                for ci in range(k):
                    q[0, 0, p, ci] = T.Cast("int16", _code(
                        x[p, ci], inv, lo, hi, lo4, hi4, sa[ci], st[ci], ci < n_low))
                for ci in range(kpad - k):
                    q[0, 0, p, k + ci] = T.int16(0)

    return quantize_rows


def quantize_nhwc(n, c, h, w, pad, cpad, inv, signed):
    """x f32[n,c,h,w] -> q i16[n, h+pt+pb, w+pl+pr, cpad] (channels last, zero border and zero
    channels beyond ``c``); channels < n_low as shifted 4-bit codes (the GEMM conv's low block
    is the reordered channel prefix)."""
    lo, hi, lo4, hi4 = _act_bounds(signed)
    pt, pb, pl, pr = pad
    hp, wp = h + pt + pb, w + pl + pr

    @T.prim_func(private=True, s_tir=True)
    def quantize_nhwc(x: T.Buffer((n, c, h, w), "float32"), sa: T.Buffer((c,), "int32"),
                      st: T.Buffer((c,), "int32"), n_low: T.int32,
                      q: T.Buffer((n, hp, wp, cpad), "int16")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            for by in T.parallel(n * hp):
                for ix, ci in T.grid(wp, cpad):
                    q[by // hp, by % hp, ix, ci] = T.int16(0)
                if by % hp >= pt and by % hp < pt + h:
                    for ci, ix in T.grid(c, w):
                        q[by // hp, by % hp, ix + pl, ci] = T.Cast("int16", _code(
                            x[by // hp, ci, by % hp - pt, ix], inv, lo, hi, lo4, hi4, sa[ci],
                            st[ci], ci < n_low))

    return quantize_nhwc


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


def mixed_gemm(n, hp, wp, cpad, kh, kw, stride, dil, oh, ow, opad, c4, layout):
    """Implicit-GEMM conv (a linear layer is the 1x1 case) over channels-last codes
    q i16[n,hp,wp,cpad] -> acc i32[n,opad,ppad] ("OP") or [n,ppad,opad] ("PO"),
    ``ppad = round_up(oh*ow, TP)`` (padding positions repeat the last one).

    ``acc[o, p] = sum_{ky,kx,c} q[y(p)+ky, x(p)+kx, c] * w[ky,kx,c,o]``, ``w`` the raw 4-bit
    weight for channels ``c < n_low`` (their activation codes come pre-shifted) and the INT8
    weight for the rest. Rows ``k = (ky*kw + kx)*cpad + c``; weights ``w8`` int8
    ``[kh*kw*cpad/2, 2*opad]`` (row pairs interleaved per output, as ``vpmaddwd`` reads them)
    and ``w4`` uint8 ``[kh*kw*c4pad/2, opad/16, 16]`` (per row pair and 16 outputs, the 32
    nibbles in the same order; byte ``j`` holds element ``j`` and ``j + 16``), ``c4pad`` the
    largest low block rounded up to even. Each parallel task widens one 16-output weight panel
    to int16 once (4- or 8-bit per row pair for this call's ``n_low``), then runs register
    tiles of ``TP`` positions x 16 outputs, two ``vpmaddwd`` per position and row pair.
    """
    if opad % TO or cpad % 2:
        raise ValueError(f"mixed_gemm: opad={opad} must be a multiple of {TO}, cpad={cpad} even")
    sh, sw = stride
    dh, dw = dil
    kk = kh * kw
    ch = cpad // 2
    c4h = max(_round_up(c4, 2) // 2, 1)
    p_real = oh * ow
    ppad = _round_up(p_real, TP)
    nob, npb = opad // TO, ppad // TP
    ppc = gemm_chunks(nob, npb)
    nchunk = -(-npb // ppc)
    out_shape = (n, opad, ppad) if layout == "OP" else (n, ppad, opad)

    @T.prim_func(private=True, s_tir=True)
    def mixed_gemm(q: T.Buffer((n, hp, wp, cpad), "int16"),
                   w8: T.Buffer((kk * ch, 2 * opad), "int8"),
                   w4: T.Buffer((kk * c4h, nob, 16), "uint8"), n_low: T.int32,
                   acc: T.Buffer(out_shape, "int32")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            qf = T.decl_buffer((n * hp * wp * cpad,), "int16", data=q.data)
            for b in range(n):
                for t in T.parallel(nob * nchunk):
                    panel = T.alloc_buffer((kk * ch, 2 * TO), "int16")
                    accl = T.alloc_buffer((TP, TO), "int32", scope="local")
                    base = T.alloc_buffer((TP,), "int32", scope="local")
                    for r, cp in T.grid(kk, ch):
                        if 2 * cp + 1 < n_low:
                            for j in T.vectorized(16):
                                panel[r * ch + cp, j] = T.Cast("int16", T.bitwise_xor(
                                    T.bitwise_and(T.Cast("int32", w4[r * c4h + cp, t // nchunk, j]),
                                                  15), 8) - 8)
                            for j in T.vectorized(16):
                                panel[r * ch + cp, j + 16] = T.Cast("int16", T.bitwise_xor(
                                    T.shift_right(T.Cast("int32", w4[r * c4h + cp, t // nchunk, j]),
                                                  4), 8) - 8)
                        elif 2 * cp >= n_low:
                            for j in T.vectorized(2 * TO):
                                panel[r * ch + cp, j] = T.Cast(
                                    "int16", w8[r * ch + cp, (t // nchunk) * 2 * TO + j])
                        else:  # the pair straddles the boundary: even row 4-bit, odd row 8-bit
                            for j in range(2 * TO):
                                if j % 2 == 0:
                                    panel[r * ch + cp, j] = T.Cast("int16", T.bitwise_xor(
                                        T.bitwise_and(T.shift_right(T.Cast(
                                            "int32", w4[r * c4h + cp, t // nchunk, j % 16]),
                                            (j // 16) * 4), 15), 8) - 8)
                                else:
                                    panel[r * ch + cp, j] = T.Cast(
                                        "int16", w8[r * ch + cp, (t // nchunk) * 2 * TO + j])
                    for pt in range(ppc):
                        if (t % nchunk) * ppc + pt < npb:
                            for pi in T.unroll(TP):
                                base[pi] = (((b * hp + T.min(
                                    ((t % nchunk) * ppc + pt) * TP + pi, p_real - 1) // ow * sh)
                                    * wp) + T.min(((t % nchunk) * ppc + pt) * TP + pi,
                                                  p_real - 1) % ow * sw) * cpad
                                for oi in T.vectorized(TO):
                                    accl[pi, oi] = 0
                            for ry, rx, cp in T.grid(kh, kw, ch):
                                for pi in T.unroll(TP):
                                    accl[pi, T.ramp(0, 1, 8)] = accl[pi, T.ramp(0, 1, 8)] + _pmadd(
                                        T.reinterpret(T.broadcast(T.reinterpret(qf[T.ramp(
                                            base[pi] + (ry * dh * wp + rx * dw) * cpad + 2 * cp,
                                            1, 2)], dtype="int32"), 8), dtype="int16x16"),
                                        panel[(ry * kw + rx) * ch + cp, T.ramp(0, 1, 16)])
                                    accl[pi, T.ramp(8, 1, 8)] = accl[pi, T.ramp(8, 1, 8)] + _pmadd(
                                        T.reinterpret(T.broadcast(T.reinterpret(qf[T.ramp(
                                            base[pi] + (ry * dh * wp + rx * dw) * cpad + 2 * cp,
                                            1, 2)], dtype="int32"), 8), dtype="int16x16"),
                                        panel[(ry * kw + rx) * ch + cp, T.ramp(16, 1, 16)])
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


def dequantize(n, o, p, opad, ppad, layout, yshape):
    """acc i32 (tile-padded ``[n, opad, ppad]`` for "OP", ``[1, ppad, opad]`` for "PO") ->
    f32 ``acc * mult[o]`` written straight in the layer's output shape ``yshape`` (``[n, o, p]``
    or ``[p, o]`` in memory order), so no reshape separates it from the FP32 ops after it."""

    if layout == "OP":
        @T.prim_func(private=True, s_tir=True)
        def dequantize_op(acc: T.Buffer((n, opad, ppad), "int32"),
                          mult: T.Buffer((o,), "float32"), y: T.Buffer(yshape, "float32")):
            T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
            with T.sblock("root"):
                yf = T.decl_buffer((n * o * p,), "float32", data=y.data)
                for bo in T.parallel(n * o):
                    for q in range(p):
                        yf[bo * p + q] = T.Cast("float32", acc[bo // o, bo % o, q]) * mult[bo % o]

        func = dequantize_op
    else:
        @T.prim_func(private=True, s_tir=True)
        def dequantize_po(acc: T.Buffer((1, ppad, opad), "int32"),
                          mult: T.Buffer((o,), "float32"), y: T.Buffer(yshape, "float32")):
            T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
            with T.sblock("root"):
                yf = T.decl_buffer((p * o,), "float32", data=y.data)
                for q in T.parallel(p):
                    for oc in range(o):
                        yf[q * o + oc] = T.Cast("float32", acc[0, q, oc]) * mult[oc]

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
    "quantize_nhwc": quantize_nhwc,
    "quantize_rows": quantize_rows,
    "mixed_gemm": mixed_gemm,
    "dequantize": dequantize,
    "quantize_padded": quantize_padded,
    "mixed_grouped_conv": mixed_grouped_conv,
}
