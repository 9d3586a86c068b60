"""Host side of the CUDA mixed GEMM (numpy only, no TVM compiler): per-arch paths, the
operand layout :func:`pack` writes for :func:`~.mixed.mixed_gemm`, and :func:`emulate`, the
kernel's fragment arithmetic on the CPU. Importable with a runtime-only TVM, so the device
check (``scripts/gpu_check.py run``) can lay out operands on a machine without the compiler.
See :mod:`.mixed` for the fragment layouts."""

from __future__ import annotations

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
