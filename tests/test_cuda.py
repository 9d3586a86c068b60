"""CUDA mixed INT8/INT4 tensor-core GEMM without a GPU: the kernel's fragment layout, emulated
lane by lane, equals the oracle; TVM generates CUDA for sm_80 / sm_89 / sm_90 and nvcc turns it
into PTX and cubin holding the expected MMA instructions per architecture."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from flexiq_tvm.schedules.cuda import arch_has_int4_mma, emulate, mixed_gemm, pack

from flexiq_tvm import reference as ref


def _layer_operands(m, n, k, n_low, signed, seed=0):
    """A linear layer's quantized operands split as the kernel takes them, and the oracle."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((m, k)) * 2).astype(np.float32)
    if not signed:
        x = np.abs(x)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    sa = rng.integers(0, 5, k).astype(np.int8)
    sw = rng.integers(0, 5, k).astype(np.int8)
    low = np.zeros(k, bool)
    low[rng.permutation(k)[:n_low]] = True
    inv = np.float32(1) / np.float32(0.02)
    q = ref.quantize_act(x, inv, signed)
    want = ref.mixed_matmul(q, w, low, sa, sw, signed)
    a4 = ref.extract_bits(q[:, low], sa[low], signed)
    w4 = ref.extract_bits(w[:, low].astype(np.int32), sw[low], True)
    shift = sa[low].astype(np.int32) + sw[low]
    return (q[:, ~low], w[:, ~low], a4, w4, shift), want


@pytest.mark.parametrize("int4_mma", [True, False])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("n_low", [0, 45, 100])
def test_fragment_layout_emulation_equals_oracle(int4_mma, signed, n_low):
    m, n, k = 20, 12, 100  # not multiples of the tiles: the host pads
    (a8, w8, a4, w4, shift), want = _layer_operands(m, n, k, n_low, signed)
    mp, np_ = -(-m // 16) * 16, -(-n // 8) * 8
    pad = lambda a, rows: np.pad(a, ((0, rows - a.shape[0]), (0, 0)))  # noqa: E731
    arrays, runs, chunks4, k8p = pack(pad(a8, mp), pad(w8, np_), pad(a4, mp), pad(w4, np_),
                                      shift, int4_mma)
    got = emulate(arrays, mp, np_, k8p, runs, int4_mma, signed)
    assert np.array_equal(got[:m, :n], want)
    assert runs == len(np.unique(shift))
    assert chunks4 == int(arrays["run_table"][:, 1].sum())


def test_arch_table():
    assert [arch_has_int4_mma(a) for a in ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90",
                                           "sm_90a")] == [True, True, True, True, False, False]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_cuda_compiles_to_tensor_core_mma(arch, tmp_path):
    import tvm
    from tvm.support import nvcc

    int4 = arch_has_int4_mma(arch)
    f = mixed_gemm(32, 16, 64, 2, 3, int4, act_signed=False)
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    ex = tvm.compile(tvm.IRModule({"main": f}), target=target)
    src = next(m for m in ex.mod.imports if m.kind == "cuda").inspect_source()
    mma8 = "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32"
    mma4 = "mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32"
    assert mma8 in src
    assert (mma4 in src) == int4
    with target:
        ptx = nvcc.compile_cuda(src, target_format="ptx", arch=arch, compiler="nvcc")
        cubin = nvcc.compile_cuda(src, target_format="cubin", arch=arch, compiler="nvcc")
    ptx = bytes(ptx).decode() if not isinstance(ptx, str) else ptx
    assert f".target {arch}" in ptx
    assert mma8 in ptx and (mma4 in ptx) == int4
    if not int4:  # Hopper: the 4-bit block runs as a second int8 MMA stream
        assert ptx.count(mma8) >= 2
    assert bytes(cubin[:4]) == b"\x7fELF" and len(cubin) > 1000
