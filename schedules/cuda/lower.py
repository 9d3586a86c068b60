"""The kernels around :func:`~.mixed.mixed_gemm` that make a whole model run on CUDA.

Per covered GEMM layer (conv as an implicit GEMM, or linear) and ratio:

* :func:`gemm_layout` (host, at compile time): which reduction rows ``k = c * KK + tap`` go
  to the 8-bit block and which to the 4-bit block (sorted into one run per total shift,
  :func:`~.mixed.layout4`), the weight words and the run table.
* :func:`pack_activations`: quantizes the layer's FP32 input and writes the kernel's
  activation words directly (im2col, 8-bit codes four per word, 4-bit codes eight per word,
  or four on sm_90) from the row tables of :func:`gemm_layout`.
* :func:`dequantize_rows`: the int32 ``(M, N)`` product back to the layer's FP32 output.

Grouped and depthwise convs have no tensor-core form: :func:`quantize_effective` writes each
channel's 8-bit-scale value (``q``, or ``extract_bits(q) << sa`` on a 4-bit channel) and
:func:`grouped_conv` multiplies it with the weights' (``w``, or ``extract_bits(w) << sw``).
That is the oracle's sum exactly: ``(a4 << sa) (w4 << sw) = (a4 w4) << (sa + sw)``.

These kernels are plain TensorIR; the CUDA pipeline's dlight rules bind their threads.
``exact=True`` (the CUDA build) computes ``x * inv + 0.5`` with ``__fmul_rn`` and
``__fadd_rn``, which nvcc never fuses into an FMA, so the codes equal the oracle's float32
arithmetic (an FMA rounds once and can move a value across ``.5``). :func:`reference_gemm` is
:func:`~.mixed.mixed_gemm`'s arithmetic in plain loops, for checking the whole lowering on a
CPU.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx
from tvm.script import tirx as T

from flexiq_tvm.reference import act_range, extract_bits

from ..arith import code8, extract4
from .layout import (
    K8_CHUNK,
    TILE_M,
    TILE_N,
    _words,
    a_home,
    a_stored,
    b_home,
    chunk4,
    fragment_order,
    layout4,
    run_table,
    take_columns,
)
from .mixed import mixed_gemm  # noqa: F401  (the lowering's GEMM, beside its kernels)


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


class GemmLayout:
    """Host side of one layer's mixed GEMM at one ratio (see :func:`gemm_layout`)."""

    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


def gemm_weights(codes: np.ndarray, rank: np.ndarray, sa: np.ndarray, sw: np.ndarray,
                 int4_mma: bool, n_lows) -> GemmLayout:
    """One layer's weight words for :func:`~.mixed.mixed_gemm`, stored once for every ratio.

    ``codes (O, C, KK)``: INT8 weight codes (taps flattened; row ``k = c * KK + tap``);
    ``rank (C,)``: each channel's place in the low-bit order (a ratio's 4-bit channels are
    those of rank below its ``n_low``); ``n_lows``: the compiled ratios' ``n_low``.

    - ``W8``: the rows of the channels that are 8-bit at some ratio (rank >= min n_low), in
      rank order: at every ratio its 8-bit rows are a suffix of them.
    - ``W4``: the rows of the channels that are 4-bit at some ratio (rank < max n_low),
      grouped by total shift ``sa + sw`` (one group per shift, padded to whole MMA K-chunks),
      in rank order within a group: at every ratio its 4-bit rows are a prefix of each group.
    """
    o, c, kk = codes.shape
    rank = np.asarray(rank)
    order = np.argsort(rank, kind="stable")
    n_min, n_max = int(min(n_lows)), int(max(n_lows))
    c4 = chunk4(int4_mma)
    per4 = 8 if int4_mma else 4

    def rows_of(chans):
        return (np.asarray(chans, np.int64)[:, None] * kk + np.arange(kk)).ravel()

    n = _round_up(o, TILE_N)
    wk = np.zeros((n, c * kk), np.int64)
    wk[:o] = codes.reshape(o, c * kk)
    ch8 = order[n_min:]
    k8_all = _round_up(len(ch8) * kk, K8_CHUNK)
    shift = (np.asarray(sa, np.int64) + sw)
    low = order[:n_max]
    rows4 = rows_of(low)
    cols, table, chunk = layout4(shift[rows4 // kk], int4_mma)  # stable: rank order kept
    groups = [(s_, first, low[shift[low] == s_]) for first, _, s_ in table]
    w4codes = extract_bits(wk[:, rows4].astype(np.int32), np.asarray(sw)[rows4 // kk], True)
    wk4 = max(chunk * c4 // per4, 1)
    return GemmLayout(
        n=n, kk=kk, rank=rank, n_min=n_min, ch8=ch8, groups=groups, int4_mma=int4_mma,
        W8=fragment_order(_words(take_columns(wk, rows_of(ch8), max(k8_all, 4)), 8), "b"),
        W4=fragment_order(_words(take_columns(w4codes, cols, wk4 * per4), 32 // per4), "b"))


def ratio_layout(weights: GemmLayout, n_low: int, sa: np.ndarray, m: int) -> GemmLayout:
    """One ratio's side of a layer's mixed GEMM over :func:`gemm_weights` (shared).

    Returns the padded sizes, where this ratio's blocks start in the shared weights
    (``k8_first``, the run table's last column), and the activation row tables
    ``src8``/``src4`` (row ``k`` or -1: a zero code) and ``sa4`` that
    :func:`pack_activations` reads. Rows that the shared weights hold but this ratio does not
    use in a block (4-bit rows in the 8-bit block's first chunk, other channels' rows in a
    run's last chunk) get zero activations, so they add nothing.
    """
    w, kk, int4_mma = weights, weights.kk, weights.int4_mma
    c4, per4 = chunk4(int4_mma), 8 if int4_mma else 4
    skip = (n_low - w.n_min) * kk  # stored 8-bit rows that are 4-bit at this ratio
    rows8 = len(w.ch8) * kk
    first = skip // K8_CHUNK
    k8p = _round_up(rows8, K8_CHUNK) - first * K8_CHUNK if rows8 > skip else 0
    a8 = max(k8p // 4, 1)
    t = first * K8_CHUNK + np.arange(a8 * 4)
    ok = (t >= skip) & (t < rows8)
    src8 = np.full(a8 * 4, -1, np.int32)
    if rows8:
        tc = np.minimum(t, rows8 - 1)
        src8 = np.where(ok, w.ch8[tc // kk] * kk + tc % kk, -1).astype(np.int32)
    runs, src4, sa4, chunk = [], [], [], 0
    for shift, g0, chans in w.groups:
        low = chans[w.rank[chans] < n_low]  # a prefix of the group (rank order)
        if not len(low):
            continue
        rows = (low[:, None] * kk + np.arange(kk)).ravel()
        k = _round_up(len(rows), c4)
        src4.append(np.concatenate([rows, np.full(k - len(rows), -1)]))
        sa4.append(np.concatenate([np.repeat(np.asarray(sa)[low], kk), np.zeros(k - len(rows))]))
        runs.append((chunk, k // c4, shift, g0))
        chunk += k // c4
    a4 = max(chunk * c4 // per4, 1)
    pad = a4 * per4 - chunk * c4
    return GemmLayout(
        m=_round_up(m, TILE_M), n=w.n, k8p=k8p, k8_first=first, runs=len(runs),
        chunks4=chunk, w8_words=a8, w4_words=a4, int4_mma=int4_mma, W8=w.W8, W4=w.W4,
        run_table=run_table(runs),
        src8=src8,
        src4=np.concatenate([*src4, np.full(pad, -1)]).astype(np.int32),
        sa4=np.concatenate([*sa4, np.zeros(pad)]).astype(np.int32))


def gemm_layout(codes: np.ndarray, low: np.ndarray, sa: np.ndarray, sw: np.ndarray,
                int4_mma: bool, m: int) -> GemmLayout:
    """One layer's mixed GEMM at one ratio, given its 4-bit channels ``low (C,)``:
    :func:`gemm_weights` for that ratio alone, then :func:`ratio_layout`."""
    low = np.asarray(low, bool)
    rank = np.argsort(np.argsort(~low, kind="stable"), kind="stable")  # low channels first
    n_low = int(low.sum())
    return ratio_layout(gemm_weights(codes, rank, sa, sw, int4_mma, [n_low]), n_low, sa, m)


def _quantize(v, inv: float, signed: bool, exact: bool):
    return code8(v, inv, *act_range(signed, 8), exact)


def _extract(q, sh, signed: bool):
    return extract4(q, sh, *act_range(signed, 4))


def _prim(tensors) -> tirx.PrimFunc:
    """A PrimFunc of TE tensors (no global symbol: the module that adds it names it), opaque
    to FuseOps: FuseTIR cannot merge these (their buffers meet other ops' under one Relax
    var), and the CUDA pipeline's dlight rules schedule each one alone."""
    return te.create_prim_func(tensors).without_attr("global_symbol").with_attr(
        "op_pattern", 8)


def _im2col_codes(x, conv: dict | None, inv: float, signed: bool, exact: bool):
    """``code(m, k)``: the 8-bit code of im2col row ``m`` (output pixel), reduction row ``k``
    (``c * KK + tap``; -1 or a padding tap: 0) of NCHW ``x`` (``conv`` geometry) or of the
    ``(M, C)`` rows of a linear layer (``conv`` None); rows past ``M`` are 0."""
    if conv:
        nb, _, h, w = x.shape
        kk, kw, p = conv["kh"] * conv["kw"], conv["kw"], conv["oh"] * conv["ow"]
        rows = nb * p
    else:
        rows, kk = x.shape[0], 1

    def code(m, s):
        ok = tirx.all(s >= 0, m < rows)
        s_, m_ = tirx.max(s, 0), tirx.min(m, rows - 1)
        ch = s_ // kk
        if conv:
            t = s_ % kk
            n, pix = m_ // p, m_ % p
            ih = (pix // conv["ow"]) * conv["stride"][0] - conv["pad"][0] + (t // kw) * conv[
                "dilation"][0]
            iw = (pix % conv["ow"]) * conv["stride"][1] - conv["pad"][1] + (t % kw) * conv[
                "dilation"][1]
            ok = tirx.all(ok, ih >= 0, ih < h, iw >= 0, iw < w)
            v = x[n, ch, tirx.min(tirx.max(ih, 0), h - 1), tirx.min(tirx.max(iw, 0), w - 1)]
        else:
            v = x[m_, ch]
        return tirx.if_then_else(ok, _quantize(v, inv, signed, exact), 0)

    return code


def pack_activations(layout: GemmLayout, x_shape: tuple, conv: dict | None, inv: float,
                     signed: bool, exact: bool) -> tirx.PrimFunc:
    """``main(x, src8, src4, sa4, A8w, A4w)``: the layer's input quantized and laid out as
    :func:`~.mixed.mixed_gemm`'s activation words (in fragment order).

    ``x`` is NCHW (``conv`` = dict of ``kh, kw, stride, dilation, pad (top, left), oh, ow``)
    or ``(M, C)`` rows of a linear layer (``conv`` None). Rows past ``M`` and padding taps
    are zero codes."""
    per4 = 8 if layout.int4_mma else 4
    bits4 = 32 // per4
    x = te.placeholder(x_shape, "float32", "x")
    src8 = te.placeholder((layout.w8_words * 4,), "int32", "src8")
    src4 = te.placeholder((layout.w4_words * per4,), "int32", "src4")
    sa4 = te.placeholder((layout.w4_words * per4,), "int32", "sa4")
    code = _im2col_codes(x, conv, inv, signed, exact)

    def word8(m, wd):
        out = tirx.const(0, "uint32")
        for j in range(4):
            b = tirx.Cast("uint32", tirx.bitwise_and(code(m, src8[wd * 4 + j]), 255))
            out = out | tirx.shift_left(b, tirx.const(8 * j, "uint32"))
        return out

    def word4(m, wd):
        out = tirx.const(0, "uint32")
        for j in range(per4):
            i = wd * per4 + j
            v = _extract(code(m, src4[i]), sa4[i], signed)
            b = tirx.Cast("uint32", tirx.bitwise_and(v, (1 << bits4) - 1))
            out = out | tirx.shift_left(b, tirx.const(bits4 * j, "uint32"))
        return out

    def stored(word, words: int):
        """The word at storage position (row, w): fragment order (an empty block's 1-word
        placeholder is left as is)."""
        if words % 8:
            return word

        def f(row, w):
            r, k = a_stored(row % TILE_M, w % 8)
            return word(row // TILE_M * TILE_M + r, w // 8 * 8 + k)
        return f

    a8 = te.compute((layout.m, layout.w8_words), stored(word8, layout.w8_words), "A8w")
    a4 = te.compute((layout.m, layout.w4_words), stored(word4, layout.w4_words), "A4w")
    return _prim([x, src8, src4, sa4, a8, a4])


def dequantize_rows(layout: GemmLayout, y_shape: tuple, conv: bool) -> tirx.PrimFunc:
    """``main(C, mult, y)``: ``y = float(C[pixel, o]) * mult[o]`` in the layer's output shape
    (NCHW for a conv, ``(..., O)`` for a linear layer)."""
    acc = te.placeholder((layout.m, layout.n), "int32", "C")
    o = y_shape[1] if conv else y_shape[-1]
    mult = te.placeholder((o,), "float32", "mult")
    if conv:
        _, _, oh, ow = y_shape
        y = te.compute(y_shape, lambda n, c, i, j: tirx.Cast(
            "float32", acc[(n * oh + i) * ow + j, c]) * mult[c], "y")
    else:
        lead = y_shape[:-1]

        def f(*idx):
            m = 0
            for d, i in zip(lead, idx[:-1], strict=True):
                m = m * d + i
            return tirx.Cast("float32", acc[m, idx[-1]]) * mult[idx[-1]]

        y = te.compute(y_shape, f, "y")
    return _prim([acc, mult, y])


def accumulator_view(layout: GemmLayout, batch: int, o: int, pixels: int,
                     conv: bool) -> tirx.PrimFunc:
    """``main(C, acc)``: the product in the layout the oracle checks read, ``(N, O, P)`` for a
    conv and ``(1, M, O)`` for a linear layer."""
    c = te.placeholder((layout.m, layout.n), "int32", "C")
    if conv:
        acc = te.compute((batch, o, pixels), lambda n, k, p: c[n * pixels + p, k], "acc")
    else:
        acc = te.compute((1, pixels, o), lambda _, m, k: c[m, k], "acc")
    return _prim([c, acc])


def quantize_effective(x_shape: tuple, pad: tuple, inv: float, signed: bool,
                       exact: bool) -> tirx.PrimFunc:
    """``main(x, shift, q)``: zero-padded NCHW codes at the 8-bit scale; channel ``c`` is
    4-bit where ``shift[c] >= 0`` (then ``extract_bits(q, shift) << shift``)."""
    n, c, h, w = x_shape
    top, bottom, left, right = pad
    x = te.placeholder(x_shape, "float32", "x")
    shift = te.placeholder((c,), "int32", "shift")

    def f(b, ch, i, j):
        ih, iw = i - top, j - left
        ok = tirx.all(ih >= 0, ih < h, iw >= 0, iw < w)
        q = _quantize(x[b, ch, tirx.min(tirx.max(ih, 0), h - 1),
                        tirx.min(tirx.max(iw, 0), w - 1)], inv, signed, exact)
        sh = shift[ch]
        v = tirx.if_then_else(sh >= 0, tirx.shift_left(_extract(q, tirx.max(sh, 0), signed),
                                                        tirx.max(sh, 0)), q)
        return tirx.if_then_else(ok, v, 0)

    q = te.compute((n, c, h + top + bottom, w + left + right), f, "q")
    return _prim([x, shift, q])


def grouped_conv(q_shape: tuple, w_shape: tuple, stride: tuple, dilation: tuple,
                 out_hw: tuple, groups: int) -> tirx.PrimFunc:
    """``main(q, w, acc)``: int32 grouped conv of effective codes (int32) with effective
    weights (int8: ``w``, or ``extract_bits(w) << sw`` in [-128, 112])."""
    n = q_shape[0]
    o, cg, kh, kw = w_shape
    og = o // groups
    q = te.placeholder(q_shape, "int32", "q")
    w = te.placeholder(w_shape, "int8", "w")
    rc = te.reduce_axis((0, cg), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    acc = te.compute(
        (n, o, *out_hw),
        lambda b, k, i, j: te.sum(
            q[b, (k // og) * cg + rc, i * stride[0] + ry * dilation[0],
              j * stride[1] + rx * dilation[1]] * w[k, rc, ry, rx].astype("int32"),
            axis=[rc, ry, rx]),
        "acc")
    return _prim([q, w, acc])


def dequantize_nchw(shape: tuple) -> tirx.PrimFunc:
    """``main(acc, mult, y)``: ``y = float(acc) * mult[channel]`` (NCHW)."""
    acc = te.placeholder(shape, "int32", "acc")
    mult = te.placeholder((shape[1],), "float32", "mult")
    y = te.compute(shape, lambda b, k, i, j: tirx.Cast("float32", acc[b, k, i, j]) * mult[k],
                   "y")
    return _prim([acc, mult, y])


def reference_gemm(m: int, n: int, k8: int, runs: int, chunks4: int, int4_mma: bool,
                   act_signed: bool = False, tiles=None, k8_first: int = 0,
                   wk8: int | None = None, wk4: int | None = None) -> tirx.PrimFunc:
    """:func:`~.mixed.mixed_gemm`'s signature and arithmetic in plain loops (any target):
    unpack the words, multiply, and shift each run's partial sum into the result
    (``tiles`` is accepted and ignored: there are no warps here)."""
    per4 = 8 if int4_mma else 4
    bits4 = 32 // per4
    w8, w4 = max(k8 // 4, 1), max(chunks4 * chunk4(int4_mma) // per4, 1)
    wk8, wk4 = wk8 or w8, wk4 or w4
    words4 = chunk4(int4_mma) // per4
    runs_n = max(runs, 1)

    def a_at(buf, row, wd):  # the logical word (row, wd) of fragment-ordered A words
        r, w = a_home(row % TILE_M, wd % 8)
        return buf[row // TILE_M * TILE_M + r, wd // 8 * 8 + w]

    def b_at(buf, row, wd):
        r, w = b_home(row % TILE_N, wd % 8)
        return buf[row // TILE_N * TILE_N + r, wd // 8 * 8 + w]

    def field(word, j, bits, signed):
        v = T.bitwise_and(T.shift_right(word, T.uint32(j * bits)), T.uint32((1 << bits) - 1))
        v = T.Cast("int32", v)
        return T.if_then_else(v >= (1 << (bits - 1)), v - (1 << bits), v) if signed else v

    @T.prim_func(s_tir=True)
    def main(A8: T.Buffer((m, w8), "uint32"), W8: T.Buffer((n, wk8), "uint32"),
             A4: T.Buffer((m, w4), "uint32"), W4: T.Buffer((n, wk4), "uint32"),
             run_table: T.Buffer((runs_n, 4), "int32"), C: T.Buffer((m, n), "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for i in T.parallel(m):
            for j in range(n):
                acc = T.alloc_buffer((1,), "int32", scope="local")
                part = T.alloc_buffer((1,), "int32", scope="local")
                acc[0] = 0
                for wd in range(k8 // 4):
                    for b in T.unroll(4):
                        acc[0] = acc[0] + field(a_at(A8, i, wd), b, 8, act_signed) * field(
                            b_at(W8, j, k8_first * 8 + wd), b, 8, True)
                for r in range(runs):
                    part[0] = 0
                    for kc in range(run_table[r, 1]):
                        for wd in range(words4):
                            for b in T.unroll(per4):
                                part[0] = part[0] + field(
                                    a_at(A4, i, (run_table[r, 0] + kc) * words4 + wd), b,
                                    bits4, act_signed) * field(
                                    b_at(W4, j, (run_table[r, 3] + kc) * words4 + wd), b,
                                    bits4, True)
                    acc[0] = acc[0] + T.shift_left(part[0], run_table[r, 2])
                C[i, j] = acc[0]

    return main


# ------------------------------------------------------------- dp4a (GPUs without mma.sync)


def dp4a_layout(codes: np.ndarray, low: np.ndarray, sa: np.ndarray, sw: np.ndarray, m: int,
                act_signed: bool) -> GemmLayout:
    """Host side of one layer's dp4a GEMM at one ratio: every reduction row ``k = c * KK +
    tap`` at the 8-bit scale (a 4-bit channel as ``extract_bits(w) << sw``), four signed bytes
    per word. Unsigned activations are stored minus 128 (dp4a multiplies signed bytes);
    ``corr[o] = 128 * sum_k w_eff[o, k]`` puts that back."""
    o, c, kk = codes.shape
    w = codes.astype(np.int32)
    weff = np.where(low[None, :, None], np.left_shift(extract_bits(w, sw[None, :, None], True),
                                                      sw[None, :, None]), w).reshape(o, c * kk)
    kwords = max(-(-(c * kk) // 4), 1)
    n = _round_up(o, TILE_N)
    b = np.zeros((n, kwords * 4), np.int64)
    b[:o, : c * kk] = weff
    corr = np.zeros(n, np.int32)
    if not act_signed:
        corr[:o] = 128 * weff.sum(1)
    return GemmLayout(m=_round_up(m, TILE_M), n=n, kwords=kwords, act_signed=act_signed,
                      B=_words(b, 8).view(np.int32), corr=corr,
                      shift=np.where(low, sa, -1).astype(np.int32))


def pack_effective(layout: GemmLayout, x_shape: tuple, conv: dict | None, inv: float,
                   signed: bool, exact: bool) -> tirx.PrimFunc:
    """``main(x, shift, Aw)``: the layer's input at the 8-bit scale (``q``, or
    ``extract_bits(q, sa) << sa`` where ``shift[c] = sa >= 0``), im2col rows, four bytes per
    int32 word (unsigned activations minus 128), for :func:`dp4a_gemm`."""
    x = te.placeholder(x_shape, "float32", "x")
    c = x_shape[1]  # NCHW, or (rows, C)
    kk = conv["kh"] * conv["kw"] if conv else 1
    shift = te.placeholder((c,), "int32", "shift")
    code = _im2col_codes(x, conv, inv, signed, exact)
    bias = 0 if signed else 128

    def byte(m, k):
        q = code(m, tirx.if_then_else(k < c * kk, k, -1))
        sh = shift[tirx.min(k, c * kk - 1) // kk]
        v = tirx.if_then_else(sh >= 0, tirx.shift_left(_extract(q, tirx.max(sh, 0), signed),
                                                        tirx.max(sh, 0)), q)
        return tirx.Cast("uint32", tirx.bitwise_and(v - bias, 255))

    def word(m, wd):
        out = tirx.const(0, "uint32")
        for j in range(4):
            out = out | tirx.shift_left(byte(m, wd * 4 + j), tirx.const(8 * j, "uint32"))
        return tirx.reinterpret("int32", out)

    a = te.compute((layout.m, layout.kwords), word, "Aw")
    return _prim([x, shift, a])


def dp4a_gemm(m: int, n: int, kwords: int) -> tirx.PrimFunc:
    """``main(Aw, Bw, corr, C)``: ``C[i, j] = corr[j] + sum_w dp4a(Aw[i, w], Bw[j, w])`` (signed
    bytes), one thread per output on CUDA cores (``__dp4a``, sm_61 and newer)."""
    threads = 256
    blocks = -(-m * n // threads)

    @T.prim_func(s_tir=True)
    def main(A: T.Buffer((m, kwords), "int32"), B: T.Buffer((n, kwords), "int32"),
             corr: T.Buffer((n,), "int32"), C: T.Buffer((m, n), "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True, "tirx.is_scheduled": True,
                     "flexiq.scheduled": True})
        for bx in T.thread_binding(blocks, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                acc = T.alloc_buffer((1,), "int32", scope="local")
                if bx * threads + tx < m * n:
                    acc[0] = corr[(bx * threads + tx) % n]
                    for w in range(kwords):
                        acc[0] = T.call_pure_extern(
                            "int32", "__dp4a", A[(bx * threads + tx) // n, w],
                            B[(bx * threads + tx) % n, w], acc[0])
                    C[(bx * threads + tx) // n, (bx * threads + tx) % n] = acc[0]

    return main


def reference_dp4a(m: int, n: int, kwords: int) -> tirx.PrimFunc:
    """:func:`dp4a_gemm`'s signature and arithmetic in plain loops (any target)."""

    def sbyte(word, j):
        v = T.bitwise_and(T.shift_right(word, j * 8), 255)
        return T.if_then_else(v >= 128, v - 256, v)

    @T.prim_func(s_tir=True)
    def main(A: T.Buffer((m, kwords), "int32"), B: T.Buffer((n, kwords), "int32"),
             corr: T.Buffer((n,), "int32"), C: T.Buffer((m, n), "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for i in T.parallel(m):
            for j in range(n):
                acc = T.alloc_buffer((1,), "int32", scope="local")
                acc[0] = corr[j]
                for w in range(kwords):
                    for b in T.unroll(4):
                        acc[0] = acc[0] + sbyte(A[i, w], b) * sbyte(B[j, w], b)
                C[i, j] = acc[0]

    return main
