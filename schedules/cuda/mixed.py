"""CUDA kernels for FlexiQ mixed INT8/INT4 GEMMs on tensor cores (``mma.sync``).

``mixed_gemm(M, N, K8, chunks4, int4_mma)`` computes, for an ``M x N`` output,

    C[m, n] = sum_k A8[m, k] * W8[n, k]                     (8-bit block, K8 rows)
            + sum_runs (sum_{k in run} A4[m, k] * W4[n, k]) << shift(run)   (4-bit block)

with int32 accumulation: exactly the oracle's mixed accumulator once the host has laid the
operands out (:func:`pack`). The 4-bit reduction rows are sorted by their total extraction
shift (activation + weight) and cut into runs of whole MMA K-chunks with one shift each; a
run accumulates in its own fragment and is shifted into the result once.

Tiling (:class:`~.layout.Tiles`, chosen by :func:`~.layout.gemm_tiles`): each warp owns
``wm x wn`` 16 x 8 MMA tiles, loading ``wm`` A and ``wn`` B fragments per K-chunk for
``wm * wn`` MMAs, and a CTA holds ``warps_m x warps_n`` warps (up to 64 x 16 outputs per warp,
128 x 64 per CTA). Operands go from global memory straight into fragments: no shared-memory
staging, the warps of a CTA that read the same rows or columns meet in L1. Fragments follow
the PTX ISA register layouts of ``mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32`` and
``...m16n8k64...s4.s4...``: with ``g = lane / 4`` and ``t = lane % 4``, register ``i`` of A
holds row ``g + 8 (i % 2)``, K words ``t + 4 (i / 2)``; register ``i`` of B holds column ``g``,
K word ``t + 4 i``; accumulator ``i`` is row ``g + 8 (i / 2)``, column ``2 t + i % 2``. A K word
is 4 int8 or 8 int4 values (lowest index in the lowest bits). The host (and the packing
kernel) store each 16 x 8-word A block and 8 x 8-word B block in fragment order
(:func:`~.layout.fragment_order`): a lane's 4 A registers are 4 consecutive words, its 2 B
registers 2, so each fragment is one 16- or 8-byte vector load and a warp reads whole
32-byte rows.

Per architecture: ``int4_mma=True`` (sm_80 / sm_86 / sm_89) runs the 4-bit block on the s4
MMA (K-chunks of 64); ``int4_mma=False`` (sm_90: Hopper has no INT4 tensor-core path) runs
it as INT8 MMA over unpacked 4-bit values (K-chunks of 32), so the 4-bit block then only
saves the 8-bit block's memory traffic, not MMA issue slots. The per-lane addresses
(:func:`~.layout.a_slot`, ``b_slot``, ``c_frag``, ``warp_origin``) are shared with the CPU
emulation (:func:`~.layout.emulate`), whose MMA reads the registers by the ISA's tables.
"""

from __future__ import annotations

from tvm.script import tirx as T

from .layout import (  # noqa: F401  (re-exported: callers import them from here)
    K8_CHUNK,
    TILE_M,
    TILE_N,
    Tiles,
    a_slot,
    arch_has_int4_mma,
    b_slot,
    c_frag,
    chunk4,
    gemm_path,
    gemm_tiles,
    warp_origin,
)


def mixed_gemm(m: int, n: int, k8: int, runs: int, chunks4: int, int4_mma: bool,
               act_signed: bool = False, tiles: Tiles | None = None, k8_first: int = 0,
               wk8: int | None = None, wk4: int | None = None):
    """PrimFunc ``main(A8w, W8w, A4w, W4w, run_table, C)`` (see the module docs).

    ``m``/``n`` multiples of 16/8; ``k8`` a multiple of 32; ``chunks4`` 4-bit K-chunks in
    ``runs`` runs (``run_table[r] = (first A4 chunk, chunks, shift, first W4 chunk)``). Packed
    operands are uint32 words: ``A8w (m, k8/4)``, ``W8w (n, wk8)``, ``A4w (m, W4)``,
    ``W4w (n, wk4)`` with ``W4 = chunks4 * chunk / (8 if int4_mma else 4)``. The weights may
    be stored once for every ratio (wider than this ratio's activations): the 8-bit block
    then starts at chunk ``k8_first`` of ``W8w`` and each run at its own ``W4w`` chunk
    (``wk8``/``wk4`` default to the activations' widths). ``act_signed``: activation codes are
    signed (s8 / s4) or, after a ReLU, unsigned (u8 / u4); weights are always signed.
    ``tiles``: the output tiling (:class:`~.layout.Tiles`; default :func:`~.layout.gemm_tiles`,
    whose CTA must divide ``m x n``).
    """
    t = gemm_tiles(m, n) if tiles is None else tiles
    if m % t.block_m or n % t.block_n:
        raise ValueError(f"{m} x {n} output is not a multiple of the {t.block_m} x "
                         f"{t.block_n} CTA of {t}")
    c4 = chunk4(int4_mma)
    per_word = 8 if int4_mma else 4
    w8, w4 = max(k8 // 4, 1), max(chunks4 * c4 // per_word, 1)
    wk8, wk4 = wk8 or w8, wk4 or w4
    n8 = k8 // K8_CHUNK
    words4 = c4 // per_word  # words per chunk per row (8: 4 per half for each of 2 halves)
    shape4 = "m16n8k64" if int4_mma else "m16n8k32"
    dt4 = "int4" if int4_mma else "int8"
    a8t = "int8" if act_signed else "uint8"
    a4t = dt4 if act_signed else "u" + dt4
    runs_n = max(runs, 1)
    wm, wn, tiles_n = t.wm, t.wn, t.wm * t.wn

    @T.prim_func(s_tir=True)
    def main(A8: T.Buffer((m, w8), "uint32"), W8: T.Buffer((n, wk8), "uint32"),
             A4: T.Buffer((m, w4), "uint32"), W4: T.Buffer((n, wk4), "uint32"),
             run_table: T.Buffer((runs_n, 4), "int32"), C: T.Buffer((m, n), "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True, "tirx.is_scheduled": True,
                     "flexiq.scheduled": True})
        for by in T.thread_binding(m // t.block_m, thread="blockIdx.y"):
            for bx in T.thread_binding(n // t.block_n, thread="blockIdx.x"):
                for warp in T.thread_binding(t.warps, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        a = T.alloc_buffer((wm * 4,), "uint32", scope="local")
                        b = T.alloc_buffer((wn * 2,), "uint32", scope="local")
                        acc = T.alloc_buffer((tiles_n * 4,), "int32", scope="local")
                        part = T.alloc_buffer((tiles_n * 4,), "int32", scope="local")
                        row0, col0 = warp_origin(by, bx, warp, t)
                        for e in T.unroll(tiles_n * 4):
                            acc[e] = 0
                        for kc in range(n8):  # 8-bit block: 32 K per MMA, 8 words per row
                            for ti in T.unroll(wm):
                                for i in T.vectorized(4):
                                    a[ti * 4 + i] = A8[row0 + ti * TILE_M + a_slot(tx, i)[0],
                                                       kc * 8 + a_slot(tx, i)[1]]
                            for tj in T.unroll(wn):
                                for i in T.vectorized(2):
                                    b[tj * 2 + i] = W8[col0 + tj * TILE_N + b_slot(tx, i)[0],
                                                       (kc + k8_first) * 8 + b_slot(tx, i)[1]]
                            for ti in T.unroll(wm):
                                for tj in T.unroll(wn):
                                    T.evaluate(T.ptx_legacy.mma(
                                        "m16n8k32", "row", "col", a8t, "int8", "int32", a.data,
                                        ti * 4, b.data, tj * 2, acc.data, (ti * wn + tj) * 4,
                                        False, dtype="int32"))
                        for r in range(runs):  # 4-bit block: one shift per run of chunks
                            for e in T.unroll(tiles_n * 4):
                                part[e] = 0
                            for kc in range(run_table[r, 1]):
                                ch, chw = run_table[r, 0] + kc, run_table[r, 3] + kc
                                for ti in T.unroll(wm):
                                    for i in T.vectorized(4):
                                        a[ti * 4 + i] = A4[row0 + ti * TILE_M + a_slot(tx, i)[0],
                                                           ch * words4 + a_slot(tx, i)[1]]
                                for tj in T.unroll(wn):
                                    for i in T.vectorized(2):
                                        b[tj * 2 + i] = W4[col0 + tj * TILE_N + b_slot(tx, i)[0],
                                                           chw * words4 + b_slot(tx, i)[1]]
                                for ti in T.unroll(wm):
                                    for tj in T.unroll(wn):
                                        T.evaluate(T.ptx_legacy.mma(
                                            shape4, "row", "col", a4t, dt4, "int32", a.data,
                                            ti * 4, b.data, tj * 2, part.data,
                                            (ti * wn + tj) * 4, False, dtype="int32"))
                            for e in T.unroll(tiles_n * 4):
                                acc[e] = acc[e] + T.shift_left(part[e], run_table[r, 2])
                        for ti in T.unroll(wm):
                            for tj in T.unroll(wn):
                                for i in T.unroll(4):
                                    C[row0 + ti * TILE_M + c_frag(tx, i)[0],
                                      col0 + tj * TILE_N + c_frag(tx, i)[1]] = acc[
                                          (ti * wn + tj) * 4 + i]

    return main
