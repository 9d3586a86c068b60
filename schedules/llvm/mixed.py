"""Mixed-precision (INT8 + shifted INT4) TensorIR kernels for llvm, scheduled by hand.

Each function returns a PrimFunc for one layer's static shapes; the low-bit boundary is a
runtime scalar, so the ratio variants of a module share every kernel and every weight buffer.
Arithmetic is the integer oracle's (:mod:`flexiq_tvm.reference`) exactly:

* ``quantize_padded`` / ``quantize_rows``: 8-bit activation codes
  ``clip(floor(x * inv + 0.5))`` and, for 4-bit channels, the effective extraction
  ``clip((q + 2**(s-1)) >> s)``; a conv input is written zero-padded (code 0 is the value 0),
  a linear input transposed as the GEMM's ``[K, P]`` operand, zero-padded to the P tile.
  A channel is 4-bit when its rank in the plan's priority order is below ``n_low`` (for GEMM
  layers, whose low block is the reordered prefix, the rank is the identity).
* ``im2col``: padded codes -> the GEMM's ``[K, P]`` operand for conv, zero beyond P.
* ``mixed_gemm``: ``acc[o, p] = sum_{k < nk} (a4 * w4) << shift[k] + sum_{k >= nk} a8 * w8`` in
  int32. The 4-bit weights are packed two per byte (16-output blocks: byte ``j`` holds output
  ``j`` in its low nibble and ``j + 8`` in its high nibble) and unpacked and shifted once per
  (k, 16 outputs); the 8-bit weights are stored ``[K, O]`` int8. Register tile: 16 outputs
  (two 8-lane int32 vectors) x ``TP`` positions, parallel over tiles.
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


def im2col(n, c, hp, wp, kh, kw, stride, dil, oh, ow, ppad):
    """Padded codes i16[n,c,hp,wp] -> col i16[n, c*kh*kw, ppad] (zero beyond oh*ow)."""
    sh, sw = stride
    dh, dw = dil
    kk = kh * kw
    p_real = oh * ow

    @T.prim_func(private=True, s_tir=True)
    def im2col(q: T.Buffer((n, c, hp, wp), "int16"), col: T.Buffer((n, c * kk, ppad), "int16")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            for bc in T.parallel(n * c):
                for r in range(kk):
                    for y, x in T.grid(oh, ow):
                        col[bc // c, (bc % c) * kk + r, y * ow + x] = q[
                            bc // c, bc % c, y * sh + (r // kw) * dh, x * sw + (r % kw) * dw]
                    for p in range(ppad - p_real):
                        col[bc // c, (bc % c) * kk + r, p_real + p] = T.int16(0)

    return im2col


def quantize_rows(m, k, mpad, inv, signed):
    """x f32[m,k] -> col i16[1, k, mpad] (transposed; 4-bit codes for channels < n_low)."""
    lo, hi, lo4, hi4 = _act_bounds(signed)

    @T.prim_func(private=True, s_tir=True)
    def quantize_rows(x: T.Buffer((m, k), "float32"), sa: T.Buffer((k,), "int32"),
                      n_low: T.int32, col: T.Buffer((1, k, mpad), "int16")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            for ci in range(k):
                for p in range(mpad):
                    v = T.if_then_else(p < m, x[p, ci], T.float32(0))
                    q = T.max(T.min(T.Cast("int32", T.floor(v * T.float32(inv) + T.float32(0.5))),
                                    hi), lo)
                    s = sa[ci]
                    half = T.if_then_else(s > 0, T.shift_left(1, s - 1), 0)
                    q4 = T.max(T.min(T.shift_right(q + half, s), hi4), lo4)
                    col[0, ci, p] = T.Cast("int16", T.if_then_else(ci < n_low, q4, q))

    return quantize_rows


def mixed_gemm(n, opad, k, ppad, k4, layout):
    """col i16[n,k,ppad] x weights -> acc i32[n,opad,ppad] ("OP") or [n,ppad,opad] ("PO")."""
    if opad % TO or ppad % TP:
        raise ValueError(f"mixed_gemm: opad={opad} must be a multiple of {TO}, ppad={ppad} of {TP}")
    nob, npb = opad // TO, ppad // TP
    k4 = max(k4, 1)
    out_shape = (n, opad, ppad) if layout == "OP" else (n, ppad, opad)

    @T.prim_func(private=True, s_tir=True)
    def mixed_gemm_op(col: T.Buffer((n, k, ppad), "int16"), w8: T.Buffer((k, opad), "int8"),
                      w4: T.Buffer((k4, opad // 2), "uint8"), shift: T.Buffer((k,), "int32"),
                      nk: T.int32, acc: T.Buffer(out_shape, "int32")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            for b in range(n):
                for t in T.parallel(nob * npb):
                    accl = T.alloc_buffer((TP, TO), "int32", scope="local")
                    wv = T.alloc_buffer((TO,), "int32", scope="local")
                    for pi, oi in T.grid(TP, TO):
                        accl[pi, oi] = 0
                    for kq in range(nk):
                        for oi in T.vectorized(TO // 2):
                            wv[oi] = T.shift_left(T.bitwise_xor(T.bitwise_and(
                                T.Cast("int32", w4[kq, (t // npb) * (TO // 2) + oi]), 15), 8) - 8,
                                shift[kq])
                        for oi in T.vectorized(TO // 2):
                            wv[oi + TO // 2] = T.shift_left(T.bitwise_xor(T.shift_right(
                                T.Cast("int32", w4[kq, (t // npb) * (TO // 2) + oi]), 4), 8) - 8,
                                shift[kq])
                        for pi in T.unroll(TP):
                            for oi in T.vectorized(TO):
                                accl[pi, oi] = accl[pi, oi] + T.Cast(
                                    "int32", col[b, kq, (t % npb) * TP + pi]) * wv[oi]
                    for kq in range(nk, k):
                        for oi in T.vectorized(TO):
                            wv[oi] = T.Cast("int32", w8[kq, (t // npb) * TO + oi])
                        for pi in T.unroll(TP):
                            for oi in T.vectorized(TO):
                                accl[pi, oi] = accl[pi, oi] + T.Cast(
                                    "int32", col[b, kq, (t % npb) * TP + pi]) * wv[oi]
                    if layout == "OP":
                        for oi, pi in T.grid(TO, TP):
                            acc[b, (t // npb) * TO + oi, (t % npb) * TP + pi] = accl[pi, oi]
                    else:
                        for pi in range(TP):
                            for oi in T.vectorized(TO):
                                acc[b, (t % npb) * TP + pi, (t // npb) * TO + oi] = accl[pi, oi]

    return mixed_gemm_op


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
    """x f32[n,c,h,w] -> q i16[n,c,h+pt+pb,w+pl+pr]; 4-bit codes where rank[c] < n_low."""
    lo, hi, lo4, hi4 = _act_bounds(signed)
    pt, pb, pl, pr = pad
    hp, wp = h + pt + pb, w + pl + pr

    @T.prim_func(private=True, s_tir=True)
    def quantize_padded(x: T.Buffer((n, c, h, w), "float32"), sa: T.Buffer((c,), "int32"),
                        rank: T.Buffer((c,), "int32"), n_low: T.int32,
                        q: T.Buffer((n, c, hp, wp), "int16")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            for bc in T.parallel(n * c):
                for ih, iw in T.grid(hp, wp):
                    q[bc // c, bc % c, ih, iw] = T.int16(0)
                for ih, iw in T.grid(h, w):
                    qq = T.max(T.min(T.Cast("int32", T.floor(
                        x[bc // c, bc % c, ih, iw] * T.float32(inv) + T.float32(0.5))), hi), lo)
                    q4 = T.max(T.min(T.shift_right(qq + T.if_then_else(
                        sa[bc % c] > 0, T.shift_left(1, sa[bc % c] - 1), 0), sa[bc % c]), hi4), lo4)
                    q[bc // c, bc % c, ih + pt, iw + pl] = T.Cast(
                        "int16", T.if_then_else(rank[bc % c] < n_low, q4, qq))

    return quantize_padded


def mixed_grouped_conv(n, c, hp, wp, o, cg, kh, kw, stride, dil, oh, ow, groups):
    """Direct grouped conv over padded codes -> acc i32[n,o,oh,ow]."""
    og = o // groups
    sh, sw = stride
    dh, dw = dil
    nw = o * cg * kh * kw
    npk = (nw + 1) // 2

    @T.prim_func(private=True, s_tir=True)
    def mixed_grouped_conv(q: T.Buffer((n, c, hp, wp), "int16"),
                           w8: T.Buffer((o, cg, kh, kw), "int8"), w4: T.Buffer((npk,), "uint8"),
                           shift: T.Buffer((c,), "int32"), rank: T.Buffer((c,), "int32"),
                           n_low: T.int32, acc: T.Buffer((n, o, oh, ow), "int32")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            for b in range(n):
                for oc in T.parallel(o):
                    for y, x in T.grid(oh, ow):
                        acc[b, oc, y, x] = 0
                    for ci, ry, rx in T.grid(cg, kh, kw):
                        cin = (oc // og) * cg + ci
                        idx = ((oc * cg + ci) * kh + ry) * kw + rx
                        nib = T.bitwise_and(
                            T.shift_right(T.Cast("int32", w4[idx // 2]), (idx % 2) * 4), 15)
                        wl = T.shift_left(T.bitwise_xor(nib, 8) - 8, shift[cin])
                        wgt = T.if_then_else(rank[cin] < n_low, wl,
                                             T.Cast("int32", w8[oc, ci, ry, rx]))
                        for y, x in T.grid(oh, ow):
                            acc[b, oc, y, x] = acc[b, oc, y, x] + T.Cast(
                                "int32", q[b, cin, y * sh + ry * dh, x * sw + rx * dw]) * wgt

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
