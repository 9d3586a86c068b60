"""CUDA kernels for FlexiQ mixed INT8/INT4 GEMMs on tensor cores (``mma.sync``).

``mixed_gemm(M, N, K8, chunks4, int4_mma)`` computes, for an ``M x N`` output,

    C[m, n] = sum_k A8[m, k] * W8[n, k]                     (8-bit block, K8 rows)
            + sum_runs (sum_{k in run} A4[m, k] * W4[n, k]) << shift(run)   (4-bit block)

with int32 accumulation: exactly the oracle's mixed accumulator once the host has laid the
operands out (:func:`pack`). The 4-bit reduction rows are sorted by their total extraction
shift (activation + weight) and cut into runs of whole MMA K-chunks with one shift each; a
run accumulates in its own fragment and is shifted into the result once.

Each warp owns a 16 x 8 output tile (one CTA = one warp; a first, untiled version: operands are
read from global memory straight into fragments, no shared-memory staging). Fragments follow
the PTX ISA register layouts of ``mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32`` and
``...m16n8k64...s4.s4...``: with ``g = lane / 4`` and ``t = lane % 4``, register ``i`` of A
holds row ``g + 8 (i % 2)``, K words ``t + 4 (i / 2)``; register ``i`` of B holds column ``g``,
K word ``t + 4 i``; accumulator ``i`` is row ``g + 8 (i / 2)``, column ``2 t + i % 2``. A K word
is 4 int8 or 8 int4 values (lowest index in the lowest bits), so the host packs K contiguously
and every fragment register is one aligned 32-bit load.

Per architecture: ``int4_mma=True`` (sm_80 / sm_86 / sm_89) runs the 4-bit block on the s4
MMA (K-chunks of 64); ``int4_mma=False`` (sm_90: Hopper has no INT4 tensor-core path) runs
it as INT8 MMA over unpacked 4-bit values (K-chunks of 32), so the 4-bit block then only
saves the 8-bit block's memory traffic, not MMA issue slots.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

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


def mixed_gemm(m: int, n: int, k8: int, runs: int, chunks4: int, int4_mma: bool,
               act_signed: bool = False):
    """PrimFunc ``main(A8w, W8w, A4w, W4w, run_table, C)`` (see the module docs).

    ``m``/``n`` multiples of 16/8; ``k8`` a multiple of 32; ``chunks4`` 4-bit K-chunks in
    ``runs`` runs (``run_table[r] = (first chunk, chunks, shift)``). Packed operands are uint32
    words: ``A8w (m, k8/4)``, ``W8w (n, k8/4)``, ``A4w (m, W4)``, ``W4w (n, W4)`` with
    ``W4 = chunks4 * chunk / (8 if int4_mma else 4)``. ``act_signed``: activation codes are
    signed (s8 / s4) or, after a ReLU, unsigned (u8 / u4); weights are always signed.
    """
    c4 = chunk4(int4_mma)
    per_word = 8 if int4_mma else 4
    w8, w4 = max(k8 // 4, 1), max(chunks4 * c4 // per_word, 1)
    n8 = k8 // K8_CHUNK
    words4 = c4 // per_word  # words per chunk per row (8: 4 per half for each of 2 halves)
    shape4 = "m16n8k64" if int4_mma else "m16n8k32"
    dt4 = "int4" if int4_mma else "int8"
    a8t = "int8" if act_signed else "uint8"
    a4t = dt4 if act_signed else "u" + dt4
    runs_n = max(runs, 1)

    @T.prim_func(s_tir=True)
    def main(A8: T.Buffer((m, w8), "uint32"), W8: T.Buffer((n, w8), "uint32"),
             A4: T.Buffer((m, w4), "uint32"), W4: T.Buffer((n, w4), "uint32"),
             run_table: T.Buffer((runs_n, 3), "int32"), C: T.Buffer((m, n), "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True, "tirx.is_scheduled": True,
                     "flexiq.scheduled": True})
        for by in T.thread_binding(m // TILE_M, thread="blockIdx.y"):
            for bx in T.thread_binding(n // TILE_N, thread="blockIdx.x"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    a = T.alloc_buffer((4,), "uint32", scope="local")
                    b = T.alloc_buffer((2,), "uint32", scope="local")
                    acc = T.alloc_buffer((4,), "int32", scope="local")
                    part = T.alloc_buffer((4,), "int32", scope="local")
                    row = by * TILE_M + tx // 4
                    col = bx * TILE_N + tx // 4
                    for i in T.unroll(4):
                        acc[i] = 0
                    for kc in range(n8):  # 8-bit block: 32 K per MMA, 8 words per row
                        for i in T.unroll(4):
                            a[i] = A8[row + 8 * (i % 2), kc * 8 + tx % 4 + 4 * (i // 2)]
                        for i in T.unroll(2):
                            b[i] = W8[col, kc * 8 + tx % 4 + 4 * i]
                        T.evaluate(T.ptx_legacy.mma("m16n8k32", "row", "col", a8t, "int8",
                                                    "int32", a.data, 0, b.data, 0, acc.data, 0,
                                                    False, dtype="int32"))
                    for r in range(runs):  # 4-bit block: one shift per run of chunks
                        for i in T.unroll(4):
                            part[i] = 0
                        for kc in range(run_table[r, 1]):
                            ch = run_table[r, 0] + kc
                            for i in T.unroll(4):
                                a[i] = A4[row + 8 * (i % 2),
                                          ch * words4 + tx % 4 + 4 * (i // 2)]
                            for i in T.unroll(2):
                                b[i] = W4[col, ch * words4 + tx % 4 + 4 * i]
                            T.evaluate(T.ptx_legacy.mma(shape4, "row", "col", a4t, dt4,
                                                        "int32", a.data, 0, b.data, 0,
                                                        part.data, 0, False, dtype="int32"))
                        for i in T.unroll(4):
                            acc[i] = acc[i] + T.shift_left(part[i], run_table[r, 2])
                    for i in T.unroll(4):
                        C[by * TILE_M + tx // 4 + 8 * (i // 2),
                          bx * TILE_N + (tx % 4) * 2 + i % 2] = acc[i]

    return main


# ----------------------------------------------------------------------- host layout


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
    arrays = {"A8": _words(take_columns(np.asarray(a8), cols8, max(k8p, 4)), 8),
              "W8": _words(take_columns(np.asarray(w8), cols8, max(k8p, 4)), 8),
              "A4": _words(take_columns(np.asarray(a4), cols4, w4_words * 32 // bits4), bits4),
              "W4": _words(take_columns(np.asarray(w4), cols4, w4_words * 32 // bits4), bits4),
              "run_table": np.array(table or [(0, 0, 0)], np.int32)}
    return arrays, len(table), chunk, k8p


def emulate(arrays: dict, m: int, n: int, k8p: int, runs: int, int4_mma: bool,
            act_signed: bool = False) -> np.ndarray:
    """The kernel's arithmetic on the CPU, fragment by fragment, following the same
    per-lane register indices and the PTX MMA definition (D = A x B + C on the fragments'
    logical matrices). Checks the index math of :func:`mixed_gemm` against the oracle."""
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
    A8, W8, A4, W4, table = (arrays[k] for k in ("A8", "W8", "A4", "W4", "run_table"))
    bits4 = 4 if int4_mma else 8
    words4 = chunk4(int4_mma) // (32 // bits4)
    for by in range(m // TILE_M):
        for bx in range(n // TILE_N):
            acc = [[0] * 4 for _ in range(32)]
            lanes = range(32)
            for kc in range(k8p // K8_CHUNK):
                a = [[A8[by * 16 + ln // 4 + 8 * (i % 2), kc * 8 + ln % 4 + 4 * (i // 2)]
                      for i in range(4)] for ln in lanes]
                b = [[W8[bx * 8 + ln // 4, kc * 8 + ln % 4 + 4 * i] for i in range(2)]
                     for ln in lanes]
                scatter(mma(a, b, 8, act_signed), acc, 0, 0)
            for r in range(runs):
                part = [[0] * 4 for _ in range(32)]
                first, count, shift = (int(v) for v in table[r])
                for kc in range(count):
                    ch = first + kc
                    a = [[A4[by * 16 + ln // 4 + 8 * (i % 2), ch * words4 + ln % 4 + 4 * (i // 2)]
                          for i in range(4)] for ln in lanes]
                    b = [[W4[bx * 8 + ln // 4, ch * words4 + ln % 4 + 4 * i] for i in range(2)]
                         for ln in lanes]
                    scatter(mma(a, b, bits4, act_signed), part, 0, 0)
                for ln in lanes:
                    for i in range(4):
                        acc[ln][i] += part[ln][i] << shift
            for ln in lanes:
                g, t = ln // 4, ln % 4
                for i in range(4):
                    C[by * 16 + g + 8 * (i // 2), bx * 8 + 2 * t + i % 2] = acc[ln][i]
    return C.astype(np.int32)
