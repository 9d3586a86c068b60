"""Host side of the CUDA mixed GEMM (numpy only, no TVM compiler): per-arch paths, the
operand layout :func:`pack` writes for :func:`~.mixed.mixed_gemm`, and :func:`emulate`, the
kernel's fragment arithmetic on the CPU. Importable with a runtime-only TVM, so the device
check (``scripts/gpu_check.py run``) can lay out operands on a machine without the compiler.
See :mod:`.mixed` for the fragment layouts."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

K8_CHUNK = 32  # m16n8k32 (int8)
TILE_M, TILE_N = 16, 8


def chunk4(int4_mma: bool) -> int:
    """K-chunk of the 4-bit block's MMA."""
    return 64 if int4_mma else 32


def gemm_path(arch: str) -> str:
    """How a covered GEMM layer runs on ``sm_XY``: ``"mma_s4"`` (INT8 and s4 ``mma.sync``,
    sm_80..sm_89), ``"mma_s8"`` (INT8 ``mma.sync`` for both blocks, sm_90 and newer: no 4-bit
    MMA) or ``"dp4a"`` (CUDA cores, sm_61..sm_75: ``m16n8k32`` needs sm_80)."""
    v = int(arch.split("_")[1].rstrip("a"))
    if v < 61:
        raise ValueError(f"arch {arch}: FlexiQ's CUDA kernels need sm_61 or newer (dp4a)")
    return "dp4a" if v < 80 else "mma_s4" if v < 90 else "mma_s8"


def arch_has_int4_mma(arch: str) -> bool:
    """INT4 ``mma.sync`` on this ``sm_XY``: Turing/Ampere/Ada yes, Hopper (sm_90) no."""
    major_minor = int(arch.split("_")[1].rstrip("a"))
    return 75 <= major_minor < 90


@dataclass(frozen=True)
class Tiles:
    """How :func:`~.mixed.mixed_gemm` tiles its output: each warp computes ``wm x wn`` MMA
    tiles (``16 wm x 8 wn`` outputs), loading ``wm`` A and ``wn`` B fragments per K-chunk for
    ``wm * wn`` MMAs (register reuse); a CTA holds ``warps_m x warps_n`` warps whose loads of
    the same rows and columns meet in L1. ``Tiles()`` is one 16 x 8 tile per one-warp CTA."""

    wm: int = 1
    wn: int = 1
    warps_m: int = 1
    warps_n: int = 1

    @property
    def block_m(self) -> int:
        return TILE_M * self.wm * self.warps_m

    @property
    def block_n(self) -> int:
        return TILE_N * self.wn * self.warps_n

    @property
    def warps(self) -> int:
        return self.warps_m * self.warps_n


def gemm_tiles(m: int, n: int) -> Tiles:
    """The largest tiling that divides an ``m x n`` output (``m``/``n`` multiples of 16/8):
    up to 4 x 2 MMA tiles per warp (64 x 16 outputs; 32 accumulator registers plus 32 for a
    4-bit run's partial sums) and 2 x 4 warps per CTA (128 x 64 outputs, 256 threads)."""
    def largest(total, options):
        return next(v for v in options if total % v == 0)

    wm = largest(m // TILE_M, (4, 2, 1))
    wn = largest(n // TILE_N, (2, 1))
    return Tiles(wm, wn, largest(m // (TILE_M * wm), (2, 1)),
                 largest(n // (TILE_N * wn), (4, 2, 1)))


# Where the kernel reads and writes, per lane (``lane`` in 0..31) and fragment register ``i``:
# written once for the kernel and the emulation, on ints or TIR expressions. The emulation's
# MMA reads the registers with the PTX ISA's own tables, written apart from these.


def warp_origin(by, bx, warp, t: Tiles):
    """First output row and column of warp ``warp`` of CTA ``(by, bx)``."""
    return ((by * t.warps_m + warp // t.warps_n) * (TILE_M * t.wm),
            (bx * t.warps_n + warp % t.warps_n) * (TILE_N * t.wn))


def a_frag(lane, i):
    """A fragment register ``i``: (row in the 16-row tile, word in the K-chunk)."""
    return lane // 4 + 8 * (i % 2), lane % 4 + 4 * (i // 2)


def b_frag(lane, i):
    """B fragment register ``i``: (column in the 8-column tile, word in the K-chunk)."""
    return lane // 4, lane % 4 + 4 * i


def c_frag(lane, i):
    """Accumulator register ``i``: (row, column) in the 16 x 8 tile."""
    return lane // 4 + 8 * (i // 2), 2 * (lane % 4) + i % 2


# Fragment order: the words of each 16-row (A) or 8-row (B) block and 8-word K-chunk are
# stored so that a lane's fragment registers are consecutive words, one vector load each
# (16 bytes for A, 8 for B); a warp's load then reads whole 32-byte rows.


def a_slot(lane, i):
    """Where A register ``i`` of ``lane`` is stored in its 16-row x 8-word block."""
    return lane // 2, (lane % 2) * 4 + i


def b_slot(lane, i):
    """Where B register ``i`` of ``lane`` is stored in its 8-row x 8-word block."""
    return lane // 4, (lane % 4) * 2 + i


def a_stored(row, word):
    """The logical (row, word) of the A word stored at block position (row, word): the
    inverse of :func:`a_slot` followed by :func:`a_frag` (what the packing kernel writes)."""
    return a_frag(2 * row + word // 4, word % 4)


def a_home(row, word):
    """Block position where the A word of logical (row, word) is stored (inverse of
    :func:`a_stored`; what a reader of logical words, like ``reference_gemm``, addresses)."""
    return a_slot(4 * (row % 8) + word % 4, 2 * (word // 4) + row // 8)


def b_home(row, word):
    """Block position where the B word of logical (column row, word) is stored."""
    return b_slot(4 * row + word % 4, word // 4)


def _block_order(rows: int, slot, frag, regs: int) -> np.ndarray:
    """Flat source index (logical row * 8 + word) of each stored position of one block."""
    order = np.zeros(rows * 8, np.int64)
    for lane in range(32):
        for i in range(regs):
            (sr, sw), (lr, lw) = slot(lane, i), frag(lane, i)
            order[sr * 8 + sw] = lr * 8 + lw
    return order


def fragment_order(words: np.ndarray, operand: str) -> np.ndarray:
    """Row-major K words ``(R, W)`` (``R`` a multiple of 16 for ``"a"``, 8 for ``"b"``; ``W``
    a multiple of 8, or the kernels' 1-word placeholder of an empty block) in fragment order."""
    words = np.asarray(words)
    if words.shape[1] % 8:
        if words.shape[1] == 1 and not words.any():
            return words
        raise ValueError(f"{words.shape[1]} words per row: not whole 8-word K-chunks")
    rows = TILE_M if operand == "a" else TILE_N
    slot, frag, regs = (a_slot, a_frag, 4) if operand == "a" else (b_slot, b_frag, 2)
    r, w = words.shape
    blocks = words.reshape(r // rows, rows, w // 8, 8).transpose(0, 2, 1, 3).reshape(
        r // rows, w // 8, rows * 8)
    out = blocks[..., _block_order(rows, slot, frag, regs)]
    return out.reshape(r // rows, w // 8, rows, 8).transpose(0, 2, 1, 3).reshape(r, w)


def _words(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack int codes along the last axis into uint32 words (lowest index, lowest bits)."""
    per = 32 // bits
    c = np.asarray(codes, np.int64) & ((1 << bits) - 1)
    c = c.reshape(*c.shape[:-1], -1, per)
    shifts = np.arange(per, dtype=np.int64) * bits
    return (c << shifts).sum(-1).astype(np.uint32)


def layout4(shift4, int4_mma: bool) -> tuple[np.ndarray, list, int]:
    """Column order of the 4-bit block: its rows sorted (stably) by total shift, each shift's
    run padded with ``-1`` (a zero row) to whole MMA K-chunks. Returns ``(columns, run table
    [(first chunk, chunks, shift)], chunks)``; ``columns[j]`` is the 4-bit row in column j."""
    c4 = chunk4(int4_mma)
    shift4 = np.asarray(shift4)
    order = np.argsort(shift4, kind="stable")
    cols, table, chunk = [], [], 0
    for s in np.unique(shift4):
        idx = order[shift4[order] == s]
        k = -(-len(idx) // c4) * c4
        cols.append(np.concatenate([idx, np.full(k - len(idx), -1)]))
        table.append((chunk, k // c4, int(s)))
        chunk += k // c4
    return (np.concatenate(cols).astype(np.int64) if cols else np.zeros(0, np.int64),
            table, chunk)


def take_columns(codes: np.ndarray, cols: np.ndarray, width: int) -> np.ndarray:
    """``codes[:, cols]`` with zero columns where ``cols`` is -1, zero-padded to ``width``."""
    out = np.zeros((codes.shape[0], width), np.int64)
    valid = cols >= 0
    out[:, : len(cols)][:, valid] = codes[:, cols[valid]]
    return out


def pack(a8, w8, a4, w4, shift4, int4_mma: bool):
    """Lay out one mixed GEMM for :func:`mixed_gemm`.

    ``a8 (M, K8)``/``w8 (N, K8)``: 8-bit codes of the 8-bit reduction rows; ``a4 (M, K4)``/
    ``w4 (N, K4)``: 4-bit codes of the 4-bit rows; ``shift4 (K4,)``: each 4-bit row's total
    shift. Returns ``(arrays dict, runs, chunks4, k8_padded)``; zero rows pad every run to
    whole chunks (:func:`layout4`) and the 8-bit block to a multiple of 32 (zeros add nothing).
    """
    k8 = a8.shape[1]
    k8p = -(-k8 // K8_CHUNK) * K8_CHUNK
    cols8 = np.arange(k8)
    cols4, table, chunk = layout4(shift4, int4_mma)
    bits4 = 4 if int4_mma else 8
    w4_words = max(chunk * chunk4(int4_mma) * bits4 // 32, 1)
    arrays = {
        "A8": fragment_order(_words(take_columns(np.asarray(a8), cols8, max(k8p, 4)), 8), "a"),
        "W8": fragment_order(_words(take_columns(np.asarray(w8), cols8, max(k8p, 4)), 8), "b"),
        "A4": fragment_order(_words(take_columns(np.asarray(a4), cols4,
                                                 w4_words * 32 // bits4), bits4), "a"),
        "W4": fragment_order(_words(take_columns(np.asarray(w4), cols4,
                                                 w4_words * 32 // bits4), bits4), "b"),
        "run_table": run_table([(f, c, sh, f) for f, c, sh in table])}
    return arrays, len(table), chunk, k8p


def run_table(runs) -> np.ndarray:
    """The GEMM's run table, one row per run: ``(first A4 chunk, chunks, shift, first W4
    chunk)``. The weights may be stored once for several ratios while the activations are
    packed per ratio, so a run's chunks start at different places in the two."""
    return np.array(list(runs) or [(0, 0, 0, 0)], np.int32).reshape(-1, 4)


def emulate(arrays: dict, m: int, n: int, k8p: int, runs: int, int4_mma: bool,
            act_signed: bool = False, tiles: Tiles = Tiles(), k8_first: int = 0) -> np.ndarray:
    """The kernel's arithmetic on the CPU, fragment by fragment, following the same
    per-lane register indices and the PTX MMA definition (D = A x B + C on the fragments'
    logical matrices). Checks the index math of :func:`mixed_gemm` against the oracle, with
    the same ``tiles``; raises if the CTAs' warps do not write every output exactly once.
    ``k8_first``: the 8-bit block's first chunk in ``W8`` (weights stored for several
    ratios); the 4-bit runs' weight chunks come from the run table's last column."""
    def unpack(words, bits, signed=True):
        per = 32 // bits
        w = words.astype(np.int64)[..., None] >> (np.arange(per) * bits)
        v = w & ((1 << bits) - 1)
        if signed:
            v = np.where(v >= 1 << (bits - 1), v - (1 << bits), v)
        return v.reshape(*words.shape[:-1], -1)

    def mma(a_regs, b_regs, bits, a_signed):
        """Logical 16 x K and K x 8 tiles from 32 lanes' registers, then their product."""
        per = 32 // bits
        k = 8 * per  # 8 words per row: 4 per half
        A = np.zeros((16, k), np.int64)
        B = np.zeros((k, 8), np.int64)
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for i in range(4):
                w = t + 4 * (i // 2)
                A[g + 8 * (i % 2), w * per : (w + 1) * per] = unpack(
                    np.array([a_regs[lane][i]], np.uint32), bits, a_signed)
            for i in range(2):
                w = t + 4 * i
                B[w * per : (w + 1) * per, g] = unpack(np.array([b_regs[lane][i]], np.uint32),
                                                       bits)
        return A @ B

    def scatter(tile, out, r0, c0):
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for i in range(4):
                out[lane][i] += tile[g + 8 * (i // 2), 2 * t + i % 2]

    C = np.zeros((m, n), np.int64)
    writes = np.zeros((m, n), np.int64)
    A8, W8, A4, W4, table = (arrays[k] for k in ("A8", "W8", "A4", "W4", "run_table"))
    bits4 = 4 if int4_mma else 8
    words4 = chunk4(int4_mma) // (32 // bits4)
    lanes = range(32)

    def load(buf, r0, c0, ka, kb):  # the kernel's fragment loads of one 16 x 8 tile
        a = [[buf[0][r0 + a_slot(ln, i)[0], ka + a_slot(ln, i)[1]] for i in range(4)]
             for ln in lanes]
        b = [[buf[1][c0 + b_slot(ln, i)[0], kb + b_slot(ln, i)[1]] for i in range(2)]
             for ln in lanes]
        return a, b

    t = tiles
    if m % t.block_m or n % t.block_n:
        raise ValueError(f"{m} x {n} is not a multiple of the {t.block_m} x {t.block_n} CTA")
    for by in range(m // t.block_m):
        for bx in range(n // t.block_n):
            for warp in range(t.warps):
                row0, col0 = warp_origin(by, bx, warp, t)
                for ti in range(t.wm):
                    for tj in range(t.wn):
                        r0, c0 = row0 + ti * TILE_M, col0 + tj * TILE_N
                        acc = [[0] * 4 for _ in lanes]
                        for kc in range(k8p // K8_CHUNK):
                            a, b = load((A8, W8), r0, c0, kc * 8, (kc + k8_first) * 8)
                            scatter(mma(a, b, 8, act_signed), acc, 0, 0)
                        for r in range(runs):
                            part = [[0] * 4 for _ in lanes]
                            first, count, shift, first_w = (int(v) for v in table[r])
                            for kc in range(count):
                                a, b = load((A4, W4), r0, c0, (first + kc) * words4,
                                            (first_w + kc) * words4)
                                scatter(mma(a, b, bits4, act_signed), part, 0, 0)
                            for ln in lanes:
                                for i in range(4):
                                    acc[ln][i] += part[ln][i] << shift
                        for ln in lanes:
                            for i in range(4):
                                rr, cc = c_frag(ln, i)
                                C[r0 + rr, c0 + cc] = acc[ln][i]
                                writes[r0 + rr, c0 + cc] += 1
    if not (writes == 1).all():
        raise AssertionError("the tiling does not write every output exactly once")
    return C.astype(np.int32)
