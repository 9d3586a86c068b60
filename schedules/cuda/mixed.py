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

from tvm.script import tirx as T

from .layout import K8_CHUNK, TILE_M, TILE_N, arch_has_int4_mma, chunk4, gemm_path  # noqa: F401


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
