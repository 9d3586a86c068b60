"""Mixed-precision (INT8 + shifted INT4) TensorIR kernels for llvm, scheduled by hand.

Each function returns a PrimFunc for one layer's static shapes; the low-bit boundary
``n_low`` is a runtime scalar, so the ratio variants of a module share every kernel and every
weight buffer. Arithmetic is the integer oracle's (:mod:`flexiq_tvm.reference`) exactly;
the design is explained in docs/kernels.md:

* ``quantize_nhwc`` / ``quantize_rows``: 8-bit activation codes ``clip(floor(x * inv + 0.5))``
  (two float32 roundings: the target has FMA contraction off) into a channels-last buffer,
  and the 4-bit codes ``clip((q + 2**(sa-1)) >> sa)`` of the active low channels into
  a uint8 buffer in :class:`LowLayout` slot order; each buffer holds the code of 0 where a
  channel belongs to the other block. On the VNNI ISAs the 8-bit codes are unsigned bytes
  (signed ones +128) and the 4-bit bytes are stored shifted left by ``sa``.
* ``mixed_gemm``: implicit-GEMM conv / linear. AVX2: the 8-bit block on ``vpmaddwd``, the
  4-bit block on ``vpmaddubsw`` with int16 chunks flushed by ``vpmaddwd`` times
  ``2**shift``. VNNI (``isa`` ``avxvnni`` / ``avx512vnni``, default: this CPU's best): both
  blocks on ``vpdpbusd`` (unsigned 8-bit codes; pre-shifted 4-bit operands) straight into the
  int32 tile.
* ``quantize_padded`` + ``mixed_grouped_conv``: grouped/depthwise conv on NCHW codes (4-bit
  codes pre-shifted by ``sa + sw``); a channel is 4-bit when its rank in the plan's priority
  order is below ``n_low``, so no contiguous block is needed.
* ``dequantize``: ``float(acc) * (s_a * s_w[o])`` in the layer's output shape.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from flexiq_tvm.hostcpu import ISAS, best_isa
from flexiq_tvm.hostcpu import vnni as uses_vnni

from ..arith import code8, extract4

TO = 16  # output-channel tile (two AVX2 int32 vectors)
TP = 6  # position tile (register accumulators: TP x 2 vectors)
TH = TP // 2  # positions per half-tile of the 4-bit phase (its int16 accumulators)
OPAQUE = 8  # relax op_pattern kOpaque: FuseOps leaves these kernels alone


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def _act_bounds(signed: bool) -> tuple[int, int, int, int]:
    return (-127, 127, -8, 7) if signed else (0, 255, 0, 15)


class LowLayout:
    """Where a GEMM layer's 4-bit channels live for the ``vpmaddubsw`` path.

    The 4-bit block (the reordered channel prefix ``[0, n_max)``, nested across ratios) is
    stored in *slots*, four per quad (one ``vpmaddubsw`` pair of pairs per output). A quad
    holds channels of one total shift only: the slots are grouped into one *run* per shift
    value (at most 9), each run holding its channels in channel order and padded to whole
    quads (a pad slot holds no channel, -1). At a given ``n_low`` the active channels of a run
    are a prefix of it (the low sets are prefixes of the channel order), so the kernel reads
    each run up to its last active quad; an inactive channel in a read quad holds the code of
    0 in the 4-bit activation buffer and adds nothing. Runs are cut into *chunks* of at most
    ``flush`` quads x taps (int16 partial sums stay exact: a quad adds at most 2 x 15 x 8 = 240
    per lane, 136 x 240 < 2**15), each flushed into the int32 accumulator by ``vpmaddwd`` with
    ``2**shift``.

    Attributes
    ----------
    slot_chan : int32 [S]
        Channel of each slot (-1: pad); ``S`` a multiple of 4.
    runs : list of (first quad, quads, shift)
    """

    FLUSH_QUADS = 136  # quads x taps per int16 chunk: 136 * 240 <= 32767

    def __init__(self, shift: np.ndarray, n_max: int, taps: int) -> None:
        shift = np.asarray(shift, np.int64)[:n_max]
        chans, runs = [], []
        for sh in sorted(set(shift.tolist())):
            members = np.nonzero(shift == sh)[0].tolist()  # channel order
            quads = -(-len(members) // 4)
            runs.append((len(chans) // 4, quads, int(sh)))
            chans.extend(members + [-1] * (4 * quads - len(members)))
        if not chans:
            chans = [-1] * 4
        self.slot_chan = np.asarray(chans, np.int32)
        self.runs = runs
        self.taps = taps
        self.n_max = n_max
        self.per_chunk = max(1, self.FLUSH_QUADS // taps)

    @property
    def slots(self) -> int:
        return len(self.slot_chan)

    def chunks(self, n_low: int) -> np.ndarray:
        """int32 ``[G, 3]`` (first quad, quads, shift) of the quads that hold a channel below
        ``n_low``, cut to the flush bound; ``G >= 1`` rows (a zero-quad row when none)."""
        rows = []
        for q0, nq, sh in self.runs:
            used = [q for q in range(q0, q0 + nq)
                    if any(0 <= ch < n_low for ch in self.slot_chan[4 * q : 4 * q + 4])]
            if not used:
                continue
            first, last = used[0], used[-1] + 1
            for s in range(first, last, self.per_chunk):
                rows.append((s, min(self.per_chunk, last - s), sh))
        return np.asarray(rows or [(0, 0, 0)], np.int32)

    def max_chunks(self) -> int:
        return max(len(self.chunks(self.n_max)), 1)

    def pack(self, w4codes: np.ndarray, opad: int) -> np.ndarray:
        """4-bit codes ``[taps, C, O]`` -> uint8 ``[taps * S/4, opad/16, 32]``: per tap, quad
        and 16 outputs the 64 codes in ``vpmaddubsw`` order ``e = 4*output + slot``; byte ``j``
        holds ``e = j`` (low nibble) and ``e = j + 32`` (high nibble)."""
        taps, _, o = w4codes.shape
        full = np.zeros((taps, self.slots, opad), np.int32)
        ok = self.slot_chan >= 0
        full[:, ok, :o] = w4codes[:, self.slot_chan[ok], :]
        e = full.reshape(taps, self.slots // 4, 4, opad // TO, TO).transpose(0, 1, 3, 4, 2)
        nib = (e.reshape(taps * self.slots // 4, opad // TO, 4 * TO) & 15).astype(np.uint8)
        return nib[:, :, : 2 * TO] | (nib[:, :, 2 * TO :] << 4)

    def slot_shift(self, shift: np.ndarray) -> np.ndarray:
        """int32 ``[S]``: ``shift[c]`` of each slot's channel (0 for a pad slot): the weight
        shifts that :func:`mixed_gemm`'s VNNI path applies to the 4-bit weights."""
        out = np.zeros(self.slots, np.int32)
        ok = self.slot_chan >= 0
        out[ok] = np.asarray(shift, np.int64)[self.slot_chan[ok]]
        return out

    def correction(self, w4codes: np.ndarray, shift: np.ndarray, n_low: int,
                   opad: int) -> np.ndarray:
        """int32 ``[opad]``: ``8 * sum w4[tap, c, o] << shift[c]`` over every channel ``c`` whose
        slot lies in a quad the kernel processes at ``n_low``: signed 4-bit activations are
        stored ``u = a + 8`` (and the code of 0, ``u = 8``, in the other slots of those quads),
        so the kernel's sum carries exactly this much extra."""
        out = np.zeros(opad, np.int64)
        chans = []
        for q0, nq, _ in self.chunks(n_low).tolist():
            chans += [c for c in self.slot_chan[4 * q0 : 4 * (q0 + nq)].tolist() if c >= 0]
        if chans:
            ch = np.asarray(chans)
            w = w4codes[:, ch, :].astype(np.int64) << np.asarray(shift, np.int64)[None, ch, None]
            out[: w4codes.shape[2]] = 8 * w.sum((0, 1))
        return out.astype(np.int32)


def quantize_rows(m, k, kpad, slots, inv, signed, isa: str | None = None):
    """x f32[m,k] -> (q8 [1,1,m,kpad], q4 u8[1,1,m,slots]): a linear layer is a 1x1 conv
    over its ``m`` rows, with the codes of :func:`quantize_nhwc`.

    The rows are already channels-last, so this is elementwise: parallel over rows, the 8-bit
    codes vectorised along the channels (contiguous loads and stores), the 4-bit ones along
    the slots (a gather through ``slot_chan``). A block with no active channel at this
    ``n_low`` is only filled with the code of 0."""
    lo, hi, lo4, hi4 = _act_bounds(signed)
    off = 8 if signed else 0
    kv, sv = kpad // 8 * 8, slots // 8 * 8
    isa = _isa(isa)
    vnni = uses_vnni(isa)
    d8, off8 = _q8_dtype(isa), _off8(isa, signed)

    def c8(x, r, ci, n_low):
        return T.Cast(d8, T.if_then_else(tirx.all(ci >= n_low, ci < k), code8(
            x[r, T.min(ci, k - 1)], inv, lo, hi), 0) + off8)

    def c4(x, sa, slot_chan, r, si, n_low):
        return T.if_then_else(
            tirx.all(slot_chan[si] >= 0, slot_chan[si] < n_low),
            T.Cast("uint8", _pre4(off + extract4(code8(x[r, T.max(slot_chan[si], 0)], inv, lo,
                                                        hi), sa[T.max(slot_chan[si], 0)], lo4,
                                                 hi4), sa[T.max(slot_chan[si], 0)], vnni)),
            _fill4(off, sa, slot_chan, si, vnni))

    @T.prim_func(private=True, s_tir=True)
    def quantize(x: T.Buffer((m, k), "float32"), sa: T.Buffer((k,), "int32"),
                 slot_chan: T.Buffer((slots,), "int32"), n_low: T.int32,
                 q8: T.Buffer((1, 1, m, kpad), d8),
                 q4: T.Buffer((1, 1, m, slots), "uint8")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            for r in T.parallel(m):
                if n_low < k:
                    for co in range(kv // 8):
                        for ci in T.vectorized(8):
                            q8[0, 0, r, co * 8 + ci] = c8(x, r, co * 8 + ci, n_low)
                    for ci in range(kpad - kv):
                        q8[0, 0, r, kv + ci] = c8(x, r, kv + ci, n_low)
                else:
                    for ci in range(kpad):
                        q8[0, 0, r, ci] = T.Cast(d8, off8)
                if n_low > 0:
                    for so in range(sv // 8):
                        for si in T.vectorized(8):
                            q4[0, 0, r, so * 8 + si] = c4(x, sa, slot_chan, r, so * 8 + si,
                                                          n_low)
                    for si in range(slots - sv):
                        q4[0, 0, r, sv + si] = c4(x, sa, slot_chan, r, sv + si, n_low)
                else:
                    for si in range(slots):
                        q4[0, 0, r, si] = _fill4(off, sa, slot_chan, si, vnni)

    return quantize


def quantize_nhwc(n, c, h, w, pad, cpad, slots, inv, signed, isa: str | None = None):
    """x f32[n,c,h,w] -> channels-last, zero-bordered codes for :func:`mixed_gemm`:

    * ``q8`` ``[n, hp, wp, cpad]``: the 8-bit code of channels ``>= n_low`` (the code of 0
      below, on the border and in the pad channels); int16 on AVX2, uint8 on the VNNI ISAs
      (``vpdpbusd`` wants unsigned bytes: signed codes are stored ``+128``);
    * ``q4`` u8 ``[n, hp, wp, slots]``: per slot (:class:`LowLayout`) the 4-bit code
      ``clip((q + 2**(sa-1)) >> sa)`` of its channel when that is below ``n_low``, stored
      ``+8`` for signed activations (``vpmaddubsw`` / ``vpdpbusd`` want unsigned bytes); every
      other slot and the border hold the code of 0. On the VNNI ISAs (``isa``, default: this
      CPU's best, :func:`flexiq_tvm.hostcpu.best_isa`) each byte of a channel's slot is
      shifted left by the channel's ``sa`` (:func:`mixed_gemm`).
    """
    return _quantizer(n, c, h, w, pad, cpad, slots, inv, signed, _isa(isa))


def _quantizer(n, c, h, w, pad, cpad, slots, inv, signed, isa):
    body = nhwc_codes(n, c, h, w, pad, cpad, slots, inv, signed, isa)

    @T.prim_func(private=True, s_tir=True)
    def quantize(x: T.Buffer((n, c, h, w), "float32"), sa: T.Buffer((c,), "int32"),
                 slot_chan: T.Buffer((slots,), "int32"), n_low: T.int32,
                 q8: T.Buffer((n, h + pad[0] + pad[1], w + pad[2] + pad[3], cpad),
                              _q8_dtype(isa)),
                 q4: T.Buffer((n, h + pad[0] + pad[1], w + pad[2] + pad[3], slots), "uint8")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            body(lambda nn, ci, yy, xx: x[nn, ci, yy, xx],
                 lambda nn, ci, yy, xx: x[nn, ci, yy, xx], sa, slot_chan, n_low, q8, q4, None)

    return quantize


def nhwc_border(n, h, w, pad, cpad, slots, signed, isa):
    """A macro ``border(by, sa, slot_chan, n_low, q8, q4)``: the code of 0 in the zero border
    of padded row ``by`` (image ``by // hp``) of the channels-last buffers (the whole row when
    it is a border row, else its left and right columns). At ``n_low = 0`` the 4-bit buffer
    is left unwritten: the GEMM reads none of it then (no chunk, ``ng = 0``)."""
    off = 8 if signed else 0
    vnni = uses_vnni(isa)
    zero8 = T.Cast(_q8_dtype(isa), _off8(isa, signed))
    pt, pb, pl, pr = pad
    hp, wp = h + pt + pb, w + pl + pr

    @T.macro
    def border(by, sa, slot_chan, n_low, q8, q4):
        if by % hp < pt or by % hp >= pt + h:
            for ix, ci in T.grid(wp, cpad):
                q8[by // hp, by % hp, ix, ci] = zero8
            if n_low > 0:
                for ix, si in T.grid(wp, slots):
                    q4[by // hp, by % hp, ix, si] = _fill4(off, sa, slot_chan, si, vnni)
        else:
            for ix, ci in T.grid(pl, cpad):
                q8[by // hp, by % hp, ix, ci] = zero8
            for ix, ci in T.grid(pr, cpad):
                q8[by // hp, by % hp, pl + w + ix, ci] = zero8
            if n_low > 0:
                for ix, si in T.grid(pl, slots):
                    q4[by // hp, by % hp, ix, si] = _fill4(off, sa, slot_chan, si, vnni)
                for ix, si in T.grid(pr, slots):
                    q4[by // hp, by % hp, pl + w + ix, si] = _fill4(off, sa, slot_chan, si,
                                                                    vnni)

    return border


def nhwc_codes(n, c, h, w, pad, cpad, slots, inv, signed, isa, z: bool = False):
    """The loop nest of :func:`quantize_nhwc` as a TVMScript macro
    ``body(val, src, sa, slot_chan, n_low, q8, q4, zbuf)``, shared with the fused epilogues
    of :mod:`.requant`. ``val(nn, ci, yy, xx)`` is the float32 value of channel ``ci`` at
    interior pixel ``(yy, xx)``: a load of the layer input, or a producer's dequantized
    accumulator through its FP32 glue. With ``z``, each interior row's values of every channel
    are first stored in ``zbuf`` (``[n, c, h, w]``: the FP32 tensor that other consumers
    read) and the codes read them back through ``src``; else ``src`` is ``val`` (evaluated
    where each code is made)."""
    lo, hi, lo4, hi4 = _act_bounds(signed)
    off = 8 if signed else 0
    vnni = uses_vnni(isa)
    d8, off8 = _q8_dtype(isa), _off8(isa, signed)
    zero8 = T.Cast(d8, off8)
    pt, pb, pl, _ = pad
    hp = h + pt + pb
    vl = _row_vector(w)  # interior columns in vectors of vl lanes
    wv = w // vl * vl

    # per interior row: the active block's codes computed vl columns at a time (vectorised
    # float math), stored channels-last; the 8-bit buffer holds 0 for 4-bit channels and the
    # 4-bit one the code of 0 for inactive slots
    border = nhwc_border(n, h, w, pad, cpad, slots, signed, isa)

    @T.macro
    def body(val, src, sa, slot_chan, n_low, q8, q4, zbuf):
        for by in T.parallel(n * hp):
            border(by, sa, slot_chan, n_low, q8, q4)
            if by % hp >= pt and by % hp < pt + h:
                if z:
                    for ci in range(c):
                        for xo in range(wv // vl):
                            for xi in T.vectorized(vl):
                                zbuf[by // hp, ci, by % hp - pt, xo * vl + xi] = val(
                                    by // hp, ci, by % hp - pt, xo * vl + xi)
                        for xr in range(w - wv):
                            zbuf[by // hp, ci, by % hp - pt, wv + xr] = val(
                                by // hp, ci, by % hp - pt, wv + xr)
                # only the active block's channels are computed: the rest hold the code
                # of 0 (the 8-bit buffer below n_low, the inactive 4-bit slots)
                for ci in range(n_low):
                    for ix in range(w):
                        q8[by // hp, by % hp, pl + ix, ci] = zero8
                for ci in range(n_low, cpad):
                    for xo in range(wv // vl):
                        for xi in T.vectorized(vl):
                            q8[by // hp, by % hp, pl + xo * vl + xi, ci] = T.Cast(
                                d8, T.if_then_else(ci < c, code8(
                                    src(by // hp, T.min(ci, c - 1), by % hp - pt,
                                        xo * vl + xi), inv, lo, hi), 0) + off8)
                    for xr in range(w - wv):
                        q8[by // hp, by % hp, pl + wv + xr, ci] = T.Cast(
                            d8, T.if_then_else(ci < c, code8(
                                src(by // hp, T.min(ci, c - 1), by % hp - pt, wv + xr),
                                inv, lo, hi), 0) + off8)
                if n_low > 0:  # else the GEMM reads no 4-bit code (nhwc_border)
                    for si in range(slots):
                        if slot_chan[si] >= 0 and slot_chan[si] < n_low:
                            for xo in range(wv // vl):
                                for xi in T.vectorized(vl):
                                    q4[by // hp, by % hp, pl + xo * vl + xi, si] = T.Cast(
                                        "uint8", _pre4(off + extract4(code8(
                                            src(by // hp, slot_chan[si], by % hp - pt,
                                                xo * vl + xi),
                                            inv, lo, hi), sa[slot_chan[si]], lo4, hi4),
                                            sa[slot_chan[si]], vnni))
                            for xr in range(w - wv):
                                q4[by // hp, by % hp, pl + wv + xr, si] = T.Cast(
                                    "uint8", _pre4(off + extract4(code8(
                                        src(by // hp, slot_chan[si], by % hp - pt, wv + xr),
                                        inv, lo, hi), sa[slot_chan[si]], lo4, hi4),
                                        sa[slot_chan[si]], vnni))
                        else:
                            for ix in range(w):
                                q4[by // hp, by % hp, pl + ix, si] = _fill4(off, sa, slot_chan,
                                                                            si, vnni)

    return body


def _isa(isa: str | None) -> str:
    """The kernels' ISA, validated (``None``: :func:`flexiq_tvm.hostcpu.best_isa`). Kernels
    of any ISA can be generated and built on any CPU; only running them needs it."""
    if isa is None:
        return best_isa()
    if isa not in ISAS:
        raise ValueError(f"isa={isa!r}: one of {ISAS}")
    return isa


def _q8_dtype(isa: str) -> str:
    """The 8-bit activation codes' storage: int16 pairs for ``vpmaddwd`` (AVX2), unsigned
    bytes for ``vpdpbusd`` (VNNI)."""
    return "uint8" if uses_vnni(isa) else "int16"


def _off8(isa: str, signed: bool) -> int:
    """The offset stored with an 8-bit code: +128 for signed codes on VNNI (``[-127, 127]``
    -> ``[1, 255]``: unsigned bytes), else 0."""
    return 128 if signed and uses_vnni(isa) else 0


def k_group(isa: str) -> int:
    """Input channels per 8-bit weight group: a ``vpmaddwd`` pair or a ``vpdpbusd`` quad
    (the padded channel count ``cpad`` is a multiple of it)."""
    return 4 if uses_vnni(isa) else 2


def pack_w8(w: np.ndarray, isa: str) -> np.ndarray:
    """INT8 weights ``[K, O]`` (rows ``k = tap*cpad + c``, K a multiple of :func:`k_group`)
    -> the GEMM's operand: ``[K/g, g*O]`` with the ``g`` rows of a group interleaved per
    output (element ``g*o + r`` of group ``kg`` is ``w[g*kg + r, o]``), the operand order of
    ``vpmaddwd`` (g = 2) and ``vpdpbusd`` (g = 4)."""
    g = k_group(isa)
    k, o = w.shape
    return w.reshape(k // g, g, o).transpose(0, 2, 1).reshape(k // g, g * o)


def corr8(w: np.ndarray, n_low: int, signed: bool, isa: str, opad: int) -> np.ndarray:
    """int32 ``[opad]``: what the stored +128 of signed 8-bit codes adds to each output, over
    the rows the VNNI GEMM reads at ``n_low`` (channel quads from ``n_low // 4``; the code of 0
    is stored 128 wherever a channel is inactive, so those rows add ``128 * w`` too). ``w``:
    the INT8 weights ``[taps, cpad, O]``. Zero on AVX2 and for unsigned codes."""
    out = np.zeros(opad, np.int64)
    off = _off8(isa, signed)
    if off:
        out[: w.shape[2]] = off * w[:, 4 * (n_low // 4):, :].astype(np.int64).sum((0, 1))
    return out.astype(np.int32)


def _pre4(u, s, vnni):
    """A 4-bit activation byte: ``u`` (the code, +8 if signed); on the VNNI path shifted left by
    its channel's activation shift ``s`` (at most 15 << 4 = 240: still a byte)."""
    return T.shift_left(u, s) if vnni else u


def _fill4(off, sa, slot_chan, si, vnni):
    """The byte of slot ``si`` where its channel is inactive, and on the border: the code of 0
    (``off``), pre-shifted like an active code on the VNNI path (a pad slot keeps ``off``)."""
    if vnni and off:
        return T.Cast("uint8", T.shift_left(off, T.if_then_else(
            slot_chan[si] >= 0, sa[T.max(slot_chan[si], 0)], 0)))
    return T.uint8(off)


def _pmadd(a, b):
    """``vpmaddwd``: 16 x int16 pairs -> 8 x int32 sums of pair products (exact)."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                                   a, b, dtype="int32x8")


def _splat(buf, start, n, dtype):
    """The ``n`` narrow elements ``buf[start : start + n]`` (32 bits in all) repeated over a
    256-bit vector viewed as ``dtype``: one activation pair / quad for every output lane."""
    return T.reinterpret(T.broadcast(T.reinterpret(buf[T.ramp(start, 1, n)], dtype="int32"), 8),
                         dtype=dtype)


def _pmaddubs(a, b):
    """``vpmaddubsw``: 32 x (u8 x s8) -> 16 x int16 sums of pairs (4-bit operands never
    saturate: at most 2 x 15 x 8)."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                   a, b, dtype="int16x16")


def _dpbusd(acc, a, b):
    """``vpdpbusd`` (AVX-VNNI, or AVX512-VNNI with AVX512-VL): ``acc`` (int32x8) plus per
    lane the sum of 4 (u8 x s8) products (exact, no saturation)."""
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"),
                                   acc, a, b, dtype="int32x8")


def gemm_chunks(nob: int, npb: int, tasks: int = 8) -> int:
    """Position tiles per parallel task: at least ``tasks`` tasks where the work allows, and
    as few as possible (each task widens its 16-output weight panels once)."""
    nchunk = min(npb, max(1, -(-tasks // nob)))
    return -(-npb // nchunk)


def mixed_gemm(n, hp, wp, cpad, slots, ngmax, kh, kw, stride, dil, oh, ow, opad, layout,
               isa: str | None = None):
    """Implicit-GEMM conv (a linear layer is the 1x1 case) over the codes of
    :func:`quantize_nhwc` -> acc i32 ``[n,opad,ppad]`` ("OP") or ``[n,ppad,opad]`` ("PO"),
    ``ppad = round_up(oh*ow, TP)`` (padding positions repeat the last one).

    ``acc[o,p] = sum_{taps, c >= n_low} q8 * w8 + sum_{chunks} (sum_{taps, slots} u4 * w4)
    << shift - corr[o]``, by ISA (``isa``, default :func:`flexiq_tvm.hostcpu.best_isa`):

    * AVX2, 8-bit block: ``vpmaddwd`` on int16 codes, rows ``k = tap*cpad + c``, weights
      ``w8`` int8 ``[taps*cpad/2, 2*opad]`` (row pairs interleaved per output,
      :func:`pack_w8`);
    * AVX2, 4-bit block: ``vpmaddubsw`` on bytes, twice the MACs per instruction: per chunk
      of :class:`LowLayout` quads one int16 partial sum per output and quad half, flushed by
      ``vpmaddwd`` with ``2**shift``; ``chunks`` int32 ``[ngmax, 3]`` (first quad, quads,
      shift) for this call's ``n_low``, ``ng`` of them used; weights ``w4`` uint8
      ``[taps*slots/4, opad/16, 32]`` (two nibbles per byte, :meth:`LowLayout.pack`);
    * VNNI (``avxvnni``, ``avx512vnni``): both blocks on ``vpdpbusd`` (u8 x s8, four products
      per int32 lane, exact), straight into the int32 tile. The 8-bit codes are unsigned bytes
      (signed ones stored +128, removed by :func:`corr8`), weights ``w8`` int8
      ``[taps*cpad/4, 4*opad]`` (row quads interleaved); the 4-bit operands are pre-shifted
      (``slot_wshift`` int32 ``[slots]``: each slot's weight shift,
      :meth:`LowLayout.slot_shift`), so their products come out on the INT8 scale. Per
      instruction the two blocks do the same MACs: on VNNI the 4-bit block saves only bytes;
    * ``corr`` int32 ``[opad]`` removes the stored offsets of signed activations (+8 of the
      4-bit codes, :meth:`LowLayout.correction`, and on VNNI +128 of the 8-bit ones).

    A channel of one block holds the code of 0 in the other block's activation buffer, so the
    weight panels need no masking: each parallel task copies (widens) one 16-output panel of
    each block once, then runs register tiles of ``TP`` positions x 16 outputs.
    """
    isa = _isa(isa)
    vnni = uses_vnni(isa)
    g8 = k_group(isa)
    if opad % TO or cpad % g8 or slots % 4:
        raise ValueError(f"mixed_gemm: opad={opad} (x{TO}), cpad={cpad} (x{g8}), "
                         f"slots={slots} (x4)")
    d8 = _q8_dtype(isa)
    p8 = "int8" if vnni else "int16"  # the 8-bit weight panel: bytes, or widened to int16
    sh, sw = stride
    dh, dw = dil
    kk = kh * kw
    ch = cpad // g8  # 8-bit weight groups (pairs or quads) per tap
    nq = slots // 4
    p_real = oh * ow
    ppad = _round_up(p_real, TP)
    nob, npb = opad // TO, ppad // TP
    ntile = n * npb  # register tiles over the whole batch (a tile never spans two images)
    ppc = gemm_chunks(nob, ntile)
    nchunk = -(-ntile // ppc)
    out_shape = (n, opad, ppad) if layout == "OP" else (n, ppad, opad)

    def pixel(tile, pi):
        """The padded-input pixel (image, row, column flattened) under position ``pi`` of
        register tile ``tile`` (tiles never span images; padding positions repeat the
        image's last one)."""
        p = T.min(tile % npb * TP + pi, p_real - 1)
        return (tile // npb * hp + p // ow * sh) * wp + p % ow * sw

    @T.prim_func(private=True, s_tir=True)
    def mixed_gemm(q8: T.Buffer((n, hp, wp, cpad), d8),
                   q4: T.Buffer((n, hp, wp, slots), "uint8"),
                   w8: T.Buffer((kk * ch, g8 * opad), "int8"),
                   w4: T.Buffer((kk * nq, nob, 2 * TO), "uint8"),
                   slot_wshift: T.Buffer((slots,), "int32"),
                   chunks: T.Buffer((ngmax, 3), "int32"), ng: T.int32,
                   corr: T.Buffer((opad,), "int32"), n_low: T.int32,
                   acc: T.Buffer(out_shape, "int32")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            q8f = T.decl_buffer((n * hp * wp * cpad,), d8, data=q8.data)
            q4f = T.decl_buffer((n * hp * wp * slots,), "uint8", data=q4.data)
            for t in T.parallel(nob * nchunk):
                # decl_buffer, not alloc_buffer: TVM would compact an alloc_buffer to the
                # region it sees accessed, and the n_low-dependent loop bounds make that
                # region (and the re-indexing) wrong
                panel8 = T.decl_buffer((ch * kk, g8 * TO), p8)
                panel4 = T.decl_buffer((nq * kk, 4 * TO), "int8")
                off4 = T.decl_buffer((nq * kk,), "int64")
                # weight panels, channel-major (row = channel pair / quad * taps + tap): the
                # rows a ratio reads are then one contiguous range per block / chunk, walked
                # by one flat loop; off8 / off4 give each row's activation offset from its
                # pixel. Plain widening copies, independent of n_low (the activation buffers
                # hold the code of 0 wherever a channel belongs to the other block, so its
                # weight there never counts)
                for r, cp in T.grid(kk, ch):
                    for j in T.vectorized(g8 * TO):
                        panel8[r * ch + cp, j] = T.Cast(
                            p8, w8[r * ch + cp, (t // nchunk) * g8 * TO + j])
                for qd, r in T.grid(nq, kk):
                    off4[qd * kk + r] = T.Cast(
                        "int64", ((r // kw) * dh * wp + (r % kw) * dw) * slots + 4 * qd)
                    # byte j of a quad row is slot j % 4 of output j // 4; on the VNNI path
                    # each weight is shifted by its channel's weight shift (-8 << 4 = -128:
                    # still a byte), so that with the activations' own shift the products
                    # come out on the INT8 scale and need no flush
                    for j in T.vectorized(2 * TO):
                        panel4[qd * kk + r, j] = T.Cast("int8", T.shift_left(T.bitwise_xor(
                            T.bitwise_and(T.Cast("int32", w4[r * nq + qd, t // nchunk, j]), 15),
                            8) - 8, slot_wshift[qd * 4 + j % 4] if vnni else 0))
                    for j in T.vectorized(2 * TO):
                        panel4[qd * kk + r, j + 2 * TO] = T.Cast("int8", T.shift_left(
                            T.bitwise_xor(T.shift_right(T.Cast(
                                "int32", w4[r * nq + qd, t // nchunk, j]), 4), 8) - 8,
                            slot_wshift[qd * 4 + j % 4] if vnni else 0))
                for pt in range(ppc):
                    if (t % nchunk) * ppc + pt < ntile:
                        # the register tile: small "global"-scope buffers become stack
                        # allocas that LLVM promotes to registers ("local" scope goes
                        # through the workspace allocator in TVM 0.27); declared here, in
                        # the tile's scope, so StorageRewrite cannot fold them into a panel
                        accl = T.decl_buffer((TP, TO), "int32")
                        acc16 = T.decl_buffer((TP, 2 * TO), "int16")
                        pix8 = T.decl_buffer((TP,), "int32")
                        pix4 = T.decl_buffer((TP,), "int64")
                        for pi in T.unroll(TP):
                            pix8[pi] = pixel((t % nchunk) * ppc + pt, pi) * cpad
                            pix4[pi] = T.Cast("int64", pixel((t % nchunk) * ppc + pt, pi) * slots)
                            for hh in T.unroll(2):
                                for oi in T.vectorized(8):
                                    accl[pi, hh * 8 + oi] = 0 - corr[
                                        (t // nchunk) * TO + hh * 8 + oi]
                        for ry, rx in T.grid(kh, kw):
                            for cp in range(n_low // g8, ch):
                                for pi in T.unroll(TP):
                                    for hh in T.unroll(2):
                                        if vnni:
                                            accl[pi, T.ramp(hh * 8, 1, 8)] = _dpbusd(
                                                accl[pi, T.ramp(hh * 8, 1, 8)], _splat(
                                                    q8f, pix8[pi] + (ry * dh * wp + rx * dw)
                                                    * cpad + 4 * cp, 4, "uint8x32"),
                                                panel8[(ry * kw + rx) * ch + cp,
                                                       T.ramp(hh * 32, 1, 32)])
                                        else:
                                            accl[pi, T.ramp(hh * 8, 1, 8)] = accl[
                                                pi, T.ramp(hh * 8, 1, 8)] + _pmadd(_splat(
                                                    q8f, pix8[pi] + (ry * dh * wp + rx * dw)
                                                    * cpad + 2 * cp, 2, "int16x16"),
                                                panel8[(ry * kw + rx) * ch + cp,
                                                       T.ramp(hh * 16, 1, 16)])
                        # 4-bit phase; without VNNI in two halves of TP/2 positions: 6 int16
                        # accumulators + 2 weight vectors + 1 broadcast fit the 16 registers
                        for g in range(ng):
                            if vnni:
                                # pre-shifted operands: straight into the int32 tile, whole
                                # tiles, no flush (the chunk's shift is already applied)
                                for j in range(chunks[g, 1] * kk):
                                    for pi in T.unroll(TP):
                                        for hh in T.unroll(2):
                                            accl[pi, T.ramp(hh * 8, 1, 8)] = _dpbusd(
                                                accl[pi, T.ramp(hh * 8, 1, 8)], _splat(
                                                    q4f, pix4[pi] + off4[chunks[g, 0] * kk + j],
                                                    4, "uint8x32"),
                                                panel4[chunks[g, 0] * kk + j,
                                                       T.ramp(hh * 32, 1, 32)])
                            else:
                                for hv in T.unroll(2):
                                    for pi in T.unroll(TH):
                                        for hh in T.unroll(2):
                                            for oi in T.vectorized(TO):
                                                acc16[hv * TH + pi, hh * TO + oi] = T.int16(0)
                                    for j in range(chunks[g, 1] * kk):
                                        for pi in T.unroll(TH):
                                            for hh in T.unroll(2):
                                                acc16[hv * TH + pi, T.ramp(hh * 16, 1, 16)] = \
                                                    acc16[hv * TH + pi,
                                                          T.ramp(hh * 16, 1, 16)] + _pmaddubs(
                                                        _splat(q4f, pix4[hv * TH + pi]
                                                               + off4[chunks[g, 0] * kk + j],
                                                               4, "uint8x32"),
                                                        panel4[chunks[g, 0] * kk + j,
                                                               T.ramp(hh * 32, 1, 32)])
                                    for pi in T.unroll(TH):
                                        for hh in T.unroll(2):
                                            accl[hv * TH + pi, T.ramp(hh * 8, 1, 8)] = accl[
                                                hv * TH + pi, T.ramp(hh * 8, 1, 8)] + _pmadd(
                                                acc16[hv * TH + pi, T.ramp(hh * 16, 1, 16)],
                                                T.broadcast(T.Cast("int16", T.shift_left(
                                                    1, chunks[g, 2])), 16))
                        # constant accumulator indices only (unrolled), so LLVM keeps
                        # the tile in registers
                        if layout == "OP":
                            for oi in T.unroll(TO):
                                for pi in T.unroll(TP):
                                    acc[((t % nchunk) * ppc + pt) // npb, (t // nchunk) * TO + oi,
                                        (((t % nchunk) * ppc + pt) % npb) * TP + pi] = accl[pi, oi]
                        else:
                            for pi in T.unroll(TP):
                                for hh in T.unroll(2):
                                    for oi in T.vectorized(8):
                                        acc[((t % nchunk) * ppc + pt) // npb,
                                            (((t % nchunk) * ppc + pt) % npb) * TP + pi,
                                            (t // nchunk) * TO + hh * 8 + oi] = accl[
                                            pi, hh * 8 + oi]

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


def _row_vector(w: int) -> int:
    """Lanes for a row of ``w`` columns: the whole row when it is short (a row of 7 or 14 would
    otherwise be mostly scalar remainder), else the width in 8..16 that leaves the shortest
    scalar remainder."""
    return w if w <= 16 else min(range(8, 17), key=lambda v: (w % v, -v))


def quantize_padded(n, c, h, w, pad, inv, signed):
    """x f32[n,c,h,w] -> q i16[n,c,h+pt+pb,w+pl+pr] (zero border); where ``rank[c] < n_low``
    the 4-bit code ``extract(q, sa) << st``, shifted by the channel's activation plus weight
    shift: its product with the raw 4-bit weight is then on the INT8 scale.

    Parallel over (image, channel) planes; the block of a plane is decided once per plane and
    its rows are vectorised (:func:`_row_vector`); only the border is zero-filled."""
    body = padded_codes(n, c, h, w, pad, inv, signed)
    hp, wp = h + pad[0] + pad[1], w + pad[2] + pad[3]

    @T.prim_func(private=True, s_tir=True)
    def quantize_padded(x: T.Buffer((n, c, h, w), "float32"), sa: T.Buffer((c,), "int32"),
                        st: T.Buffer((c,), "int32"), rank: T.Buffer((c,), "int32"),
                        n_low: T.int32, q: T.Buffer((n, c, hp, wp), "int16")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            body(lambda nn, ci, yy, xx: x[nn, ci, yy, xx],
                 lambda nn, ci, yy, xx: x[nn, ci, yy, xx], sa, st, rank, n_low, q, None)

    return quantize_padded


def padded_codes(n, c, h, w, pad, inv, signed, z: bool = False):
    """The loop nest of :func:`quantize_padded` as a TVMScript macro
    ``body(val, src, sa, st, rank, n_low, q, zbuf)``; ``val``, ``src``, ``z`` and ``zbuf`` as
    in :func:`nhwc_codes` (with ``z`` each plane's values are stored in ``zbuf`` first)."""
    lo, hi, lo4, hi4 = _act_bounds(signed)
    pt, pb, pl, pr = pad
    wp = w + pl + pr
    vl = _row_vector(w)
    wv = w // vl * vl

    @T.macro
    def body(val, src, sa, st, rank, n_low, q, zbuf):
        for bc in T.parallel(n * c):
            if z:
                for ih in range(h):
                    for xo in range(wv // vl):
                        for xi in T.vectorized(vl):
                            zbuf[bc // c, bc % c, ih, xo * vl + xi] = val(
                                bc // c, bc % c, ih, xo * vl + xi)
                    for xr in range(w - wv):
                        zbuf[bc // c, bc % c, ih, wv + xr] = val(bc // c, bc % c, ih, wv + xr)
            for ih, iw in T.grid(pt, wp):
                q[bc // c, bc % c, ih, iw] = T.int16(0)
            for ih, iw in T.grid(pb, wp):
                q[bc // c, bc % c, pt + h + ih, iw] = T.int16(0)
            for ih in range(h):
                for iw in range(pl):
                    q[bc // c, bc % c, pt + ih, iw] = T.int16(0)
                for iw in range(pr):
                    q[bc // c, bc % c, pt + ih, pl + w + iw] = T.int16(0)
            if rank[bc % c] < n_low:
                for ih in range(h):
                    for xo in range(wv // vl):
                        for xi in T.vectorized(vl):
                            q[bc // c, bc % c, pt + ih, pl + xo * vl + xi] = T.Cast(
                                "int16", T.shift_left(extract4(code8(
                                    src(bc // c, bc % c, ih, xo * vl + xi), inv, lo, hi),
                                    sa[bc % c], lo4, hi4), st[bc % c]))
                    for xr in range(w - wv):
                        q[bc // c, bc % c, pt + ih, pl + wv + xr] = T.Cast(
                            "int16", T.shift_left(extract4(code8(
                                src(bc // c, bc % c, ih, wv + xr), inv, lo, hi),
                                sa[bc % c], lo4, hi4), st[bc % c]))
            else:
                for ih in range(h):
                    for xo in range(wv // vl):
                        for xi in T.vectorized(vl):
                            q[bc // c, bc % c, pt + ih, pl + xo * vl + xi] = T.Cast(
                                "int16", code8(src(bc // c, bc % c, ih, xo * vl + xi), inv,
                                               lo, hi))
                    for xr in range(w - wv):
                        q[bc // c, bc % c, pt + ih, pl + wv + xr] = T.Cast(
                            "int16", code8(src(bc // c, bc % c, ih, wv + xr), inv, lo, hi))

    return body


def _strided(buf, start, stride, lanes):
    """``buf[start + stride * i]`` for ``i < lanes`` as one vector: a contiguous load of
    ``stride * lanes`` elements and a shuffle of every ``stride``-th (LLVM turns a strided
    ramp into one scalar load per lane)."""
    if stride == 1:
        return buf[T.ramp(start, 1, lanes)]
    return tirx.Shuffle([buf[T.ramp(start, 1, stride * lanes)]],
                        [tirx.IntImm("int32", stride * i) for i in range(lanes)])


GV = 16  # output columns per vector of the grouped conv (int32 lanes: one zmm, two ymm)


def mixed_grouped_conv(n, c, hp, wp, o, cg, kh, kw, stride, dil, oh, ow, groups):
    """Direct grouped conv over padded codes -> acc i32[n,o,oh,ow]; the raw 4-bit weight where
    ``rank[cin] < n_low`` (whose activation codes come pre-shifted), else the INT8 weight.

    Parallel over (image, output channel); the channel's ``cg x kh x kw`` weights are decoded
    once into a small register-resident buffer, then each output row is computed ``GV``
    columns at a time (taps unrolled, int32 vector accumulator). A row shorter than ``GV`` (7
    and 14 columns are common) is still one vector: its spare lanes read the codes that follow
    in memory and are never stored, so the ragged end costs no scalar loop. The last image's
    last group of planes, where those lanes would read past the buffer, is computed column by
    column.
    """
    og = o // groups
    sh, sw = stride
    dh, dw = dil
    kk = kh * kw
    nw = o * cg * kk
    npk = (nw + 1) // 2
    plane = hp * wp
    nfull, rem = ow // GV, ow % GV  # whole vectors per row, stored lanes of the last one
    nvec, rl = nfull + (1 if rem else 0), max(rem, 1)

    def at(bo, ci, y, x, r):  # flat index of the code under output (y, x), input ci, tap r
        return (((bo // o) * c + (bo % o) // og * cg + ci) * plane
                + (y * sh + r // kw * dh) * wp + x * sw + r % kw * dw)

    @T.prim_func(private=True, s_tir=True)
    def mixed_grouped_conv(q: T.Buffer((n, c, hp, wp), "int16"),
                           w8: T.Buffer((o, cg, kh, kw), "int8"), w4: T.Buffer((npk,), "uint8"),
                           rank: T.Buffer((c,), "int32"), n_low: T.int32,
                           acc: T.Buffer((n, o, oh, ow), "int32")):
        T.func_attr({"tir.noalias": True, "op_pattern": OPAQUE})
        with T.sblock("root"):
            qf = T.decl_buffer((n * c * plane,), "int16", data=q.data)
            for bo in T.parallel(n * o):
                wv = T.decl_buffer((cg * kk,), "int32")
                for ci, r in T.grid(cg, kk):
                    wv[ci * kk + r] = T.if_then_else(
                        rank[(bo % o) // og * cg + ci] < n_low,
                        T.bitwise_xor(T.bitwise_and(T.shift_right(
                            T.Cast("int32", w4[(((bo % o) * cg + ci) * kk + r) // 2]),
                            (((bo % o) * cg + ci) * kk + r) % 2 * 4), 15), 8) - 8,
                        T.Cast("int32", w8[bo % o, ci, r // kw, r % kw]))
                if bo // o == n - 1 and (bo % o) // og == groups - 1:
                    for y, x in T.grid(oh, ow):
                        one = T.decl_buffer((1,), "int32")
                        one[0] = 0
                        for ci, r in T.grid(cg, kk):
                            one[0] = one[0] + T.Cast("int32", qf[at(bo, ci, y, x, r)]) \
                                * wv[ci * kk + r]
                        acc[bo // o, bo % o, y, x] = one[0]
                else:
                    for y, xo in T.grid(oh, nvec):
                        vec = T.decl_buffer((GV,), "int32")
                        for xi in T.vectorized(GV):
                            vec[xi] = 0
                        for ci in range(cg):
                            for r in T.unroll(kk):
                                vec[T.ramp(0, 1, GV)] = vec[T.ramp(0, 1, GV)] + T.Cast(
                                    f"int32x{GV}", _strided(qf, at(bo, ci, y, xo * GV, r), sw,
                                                            GV)) \
                                    * T.broadcast(wv[ci * kk + r], GV)
                        if xo < nfull:
                            for xi in T.vectorized(GV):
                                acc[bo // o, bo % o, y, xo * GV + xi] = vec[xi]
                        else:
                            for xi in T.unroll(rl):
                                acc[bo // o, bo % o, y, nfull * GV + xi] = vec[xi]

    return mixed_grouped_conv


def scheduled(builder, isa=None, module_isa=None):
    """Mark the kernels ``builder`` makes as hand-scheduled: ScheduleInjective and
    MetaSchedule (``flexiq-tvm tune``) leave them as they are. ``isa`` is passed on to the
    builder; ``module_isa`` marks an integer-only kernel that is built in the module of that
    ISA's kernel target (attribute ``flexiq.isa``, :func:`flexiq_tvm.schedules.llvm.build`)."""

    def build(*args, **kwargs):
        if isa is not None:
            kwargs.setdefault("isa", isa)
        f = builder(*args, **kwargs).with_attr("flexiq.scheduled", True)
        if module_isa is not None:
            f = f.with_attr("flexiq.isa", kwargs.get("isa", module_isa))
        return f

    build.__name__ = builder.__name__
    build.__doc__ = builder.__doc__
    return build


def kernels(isa: str | None = None) -> dict:
    """The llvm kernel library for ``isa`` (default: :func:`flexiq_tvm.hostcpu.best_isa`, read
    now): kernel generators by name, ``"gemm_tiles"`` (the output and position multiples the
    GEMM operands are padded to), and the ISA's 8-bit operand layout (``"q8_dtype"``,
    ``"k_group"``, ``"pack_w8"``, ``"corr8"``)."""
    isa = _isa(isa)
    return {
        "isa": isa,
        "gemm_tiles": (TO, TP),
        "q8_dtype": _q8_dtype(isa),
        "k_group": k_group(isa),
        "pack_w8": lambda w: pack_w8(w, isa),
        "corr8": lambda w, n_low, signed, opad: corr8(w, n_low, signed, isa, opad),
        "quantize_nhwc": scheduled(quantize_nhwc, isa),
        "quantize_rows": scheduled(quantize_rows, isa),
        "mixed_gemm": scheduled(mixed_gemm, isa, module_isa=isa),
        "low_layout": LowLayout,
        "dequantize": scheduled(dequantize),
        "quantize_padded": scheduled(quantize_padded),
        "mixed_grouped_conv": scheduled(mixed_grouped_conv, module_isa=isa),
    }
