"""CUDA mixed INT8/INT4 tensor-core GEMM without a GPU: the kernel's fragment layout, emulated
lane by lane, equals the oracle; TVM generates CUDA for sm_80 / sm_89 / sm_90 and nvcc turns it
into PTX and cubin holding the expected MMA instructions per architecture."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from flexiq_tvm.schedules.cuda import arch_has_int4_mma, emulate, gemm_path, mixed_gemm, pack

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


@pytest.mark.parametrize("tiles", [(1, 1, 1, 1), (2, 2, 2, 1), (4, 2, 1, 2), None])
@pytest.mark.parametrize("int4_mma", [True, False])
def test_tiled_gemm_emulation_equals_oracle(tiles, int4_mma):
    """Warps of several MMA tiles, CTAs of several warps: every output written once (the
    emulation checks), each equal to the oracle. ``None``: the tiling compile picks."""
    from flexiq_tvm.schedules.cuda.layout import Tiles, gemm_tiles

    m, n, k = 64, 32, 150
    (a8, w8, a4, w4, shift), want = _layer_operands(m, n, k, 60, False, seed=4)
    arrays, runs, _, k8p = pack(a8, w8, a4, w4, shift, int4_mma)
    t = gemm_tiles(m, n) if tiles is None else Tiles(*tiles)
    assert np.array_equal(emulate(arrays, m, n, k8p, runs, int4_mma, False, t), want)


def test_fragment_order_puts_each_lanes_registers_side_by_side():
    """Stored order: lane l's A registers 0..3 at words 4 (l % 2) .. +3 of row l // 2, its B
    registers at 2 (l % 4) .. +1 of row l // 4; a_home / b_home find a logical word again."""
    from flexiq_tvm.schedules.cuda.layout import (
        a_frag,
        a_home,
        a_stored,
        b_frag,
        b_home,
        fragment_order,
    )

    rng = np.random.default_rng(5)
    a = rng.integers(0, 2**32, (32, 16), dtype=np.uint32)  # 2 x 2 blocks
    b = rng.integers(0, 2**32, (16, 16), dtype=np.uint32)
    fa, fb = fragment_order(a, "a"), fragment_order(b, "b")
    for br, bc in ((0, 0), (1, 1), (0, 1)):
        for lane in range(32):
            got = fa[br * 16 + lane // 2, bc * 8 + 4 * (lane % 2): bc * 8 + 4 * (lane % 2) + 4]
            want = [a[br * 16 + a_frag(lane, i)[0], bc * 8 + a_frag(lane, i)[1]] for i in range(4)]
            assert got.tolist() == want
            got = fb[br * 8 + lane // 4, bc * 8 + 2 * (lane % 4): bc * 8 + 2 * (lane % 4) + 2]
            want = [b[br * 8 + b_frag(lane, i)[0], bc * 8 + b_frag(lane, i)[1]] for i in range(2)]
            assert got.tolist() == want
    for r in range(16):
        for w in range(8):
            assert a_stored(*a_home(r, w)) == (r, w)
            hr, hw = a_home(r, w)
            assert fa[hr, hw] == a[r, w]
            if r < 8:
                hr, hw = b_home(r, w)
                assert fb[hr, hw] == b[r, w]
    assert sorted(fa.ravel().tolist()) == sorted(a.ravel().tolist())  # a permutation
    with pytest.raises(ValueError, match="8-word K-chunks"):
        fragment_order(a[:, :12], "a")


def test_gemm_tiles_divide_the_output():
    from flexiq_tvm.schedules.cuda.layout import Tiles, gemm_tiles

    assert gemm_tiles(4096, 4096) == Tiles(4, 2, 2, 4)  # 64 x 16 per warp, 128 x 64 per CTA
    assert gemm_tiles(100352, 64) == Tiles(4, 2, 2, 4)
    assert gemm_tiles(784, 16) == Tiles(1, 2, 1, 1)  # ResNet-20's first stage, one image
    assert gemm_tiles(48, 24) == Tiles(1, 1, 1, 1)
    for m, n in ((4096, 4096), (100352, 64), (784, 16), (48, 24), (96, 40)):
        t = gemm_tiles(m, n)
        assert m % t.block_m == 0 and n % t.block_n == 0
    with pytest.raises(ValueError, match="not a multiple of the 128 x 64 CTA"):
        mixed_gemm(64, 64, 32, 0, 0, False, tiles=Tiles(4, 2, 2, 4))
    with pytest.raises(AssertionError, match="exactly once"):  # the emulation's own check
        emulate({"A8": np.zeros((32, 8), np.uint32), "W8": np.zeros((16, 8), np.uint32),
                 "A4": np.zeros((32, 1), np.uint32), "W4": np.zeros((16, 1), np.uint32),
                 "run_table": np.zeros((1, 4), np.int32)}, 32, 16, 32, 0, False, False,
                _OneWarpShort())


class _OneWarpShort:
    """A tiling that launches one warp per CTA where its origins expect two: half the
    columns are never written, which the emulation must notice."""
    wm = wn = warps_m = warps = 1
    warps_n = 2
    block_m, block_n = 16, 16


def test_arch_table():
    assert [gemm_path(a) for a in ("sm_61", "sm_75", "sm_80", "sm_89", "sm_90", "sm_90a")] == [
        "dp4a", "dp4a", "mma_s4", "mma_s4", "mma_s8", "mma_s8"]
    with pytest.raises(ValueError, match="sm_61 or newer"):
        gemm_path("sm_52")
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
    code = _sass(cubin)  # the machine code: tensor-core IMMA, the s4 one where the arch has it
    imma = _imma(code)
    assert "IMMA.16832.U8.S8" in imma and ("IMMA.16864.U4.S4" in imma) == int4, imma
    # fragments in fragment order: one 16-byte load per A fragment, 8 bytes per B fragment
    assert "LDG.E.128" in code and "LDG.E.64" in code


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch,int4", [("sm_80", True), ("sm_90", False), ("sm_90", True)])
def test_tiled_gemm_keeps_its_tiles_in_registers(arch, int4, tmp_path):
    """The 4096^3 kernel as compile tiles it (4 x 2 MMA tiles per warp, 8 warps): ptxas
    keeps its accumulators and fragments in registers (no local-memory spills) within the
    255 a thread may have."""
    import re
    import subprocess

    import tvm
    from flexiq_tvm.schedules.cuda.layout import Tiles, gemm_tiles

    from flexiq_tvm.runtime.cuda import cuda_sources

    assert gemm_tiles(4096, 4096) == Tiles(4, 2, 2, 4)
    ex = tvm.compile(tvm.IRModule({"main": mixed_gemm(4096, 4096, 2048, 9, 37, int4)}),
                     target={"kind": "cuda", "arch": arch})
    (tmp_path / "k.cu").write_text(cuda_sources(ex.mod)[0])
    r = subprocess.run(["nvcc", "--cubin", f"-arch={arch}", "-Xptxas", "-v", "-o",
                        str(tmp_path / "k.cubin"), str(tmp_path / "k.cu")],
                       capture_output=True, text=True, check=True)
    assert "0 bytes spill stores, 0 bytes spill loads" in r.stderr, r.stderr
    regs = int(re.search(r"Used (\d+) registers", r.stderr).group(1))
    assert 64 < regs <= 255, regs  # the tiles' 32 + 32 accumulators and 12 fragment words


def _sass(binary) -> str:
    from flexiq_tvm.runtime.cuda import cuda_tool, sass

    if cuda_tool("cuobjdump") is None or cuda_tool("nvdisasm") is None:
        pytest.skip("cuobjdump / nvdisasm are not installed: SASS not read")
    return sass(bytes(binary))


def _imma(code: str) -> set[str]:
    """The IMMA (integer tensor-core) instructions in SASS text."""
    import re

    return set(re.findall(r"IMMA\.[0-9A-Z.]+", code))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_hopper_runs_s4_mma_as_int8_imma():
    """ptxas takes the s4 ``mma.sync.m16n8k64`` for sm_90, with no 4-bit tensor core to run it
    on: the SASS holds INT8 ``IMMA.16832`` alone (twice as many), the 4-bit operands unpacked
    in registers. The GPU check times this kernel beside the INT8 path (bytes vs unpacking)."""
    import tvm
    from tvm.support import nvcc

    f = mixed_gemm(32, 16, 64, 2, 3, True, act_signed=False)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    ex = tvm.compile(tvm.IRModule({"main": f}), target=target)
    src = next(m for m in ex.mod.imports if m.kind == "cuda").inspect_source()
    assert "mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32" in src
    with target:
        cubin = nvcc.compile_cuda(src, target_format="cubin", arch="sm_90", compiler="nvcc")
    assert _imma(_sass(cubin)) == {"IMMA.16832.U8.S8"}


# ----------------------------------------------------------------- whole models (CUDA lowering)


def _conv_case(signed, seed):
    """An NCHW input, a layer's weights and shifts, and its im2col codes as the oracle has
    them (stride 1x2, padding 1, 3x3 taps)."""
    rng = np.random.default_rng(seed)
    n, c, h, w, o = 2, 12, 7, 6, 10
    x = (rng.standard_normal((n, c, h, w)) * 2).astype(np.float32)
    x = x if signed else np.abs(x)
    codes = rng.integers(-127, 128, (o, c, 9)).astype(np.int8)
    sa, sw = rng.integers(0, 5, c).astype(np.int32), rng.integers(0, 5, c).astype(np.int32)
    low = np.zeros(c, bool)
    low[rng.permutation(c)[:5]] = True
    inv = float(np.float32(1 / 0.03))
    q = np.pad(ref.quantize_act(x, np.float32(inv), signed), ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([q[:, :, i : i + 7, j : j + 5 : 2] for i in range(3) for j in range(3)], -1)
    qa = cols.transpose(0, 2, 3, 1, 4).reshape(n * 7 * 3, c * 9)  # rows: pixels; k = c*9 + tap
    conv = dict(kh=3, kw=3, stride=(1, 2), dilation=(1, 1), pad=(1, 1), oh=7, ow=3)
    return x, codes, sa, sw, low, inv, qa, conv


@pytest.mark.parametrize("int4_mma", [True, False])
@pytest.mark.parametrize("signed", [False, True])
def test_pack_activations_writes_the_kernel_words_and_the_gemm_equals_the_oracle(int4_mma,
                                                                                  signed):
    import tvm
    from flexiq_tvm.schedules.cuda import lower

    x, codes, sa, sw, low, inv, qa, conv = _conv_case(signed, seed=int(int4_mma) + 2 * signed)
    m = qa.shape[0]
    lay = lower.gemm_layout(codes, low, sa, sw, int4_mma, m)
    dev = tvm.cpu()
    t = lambda a: tvm.runtime.tensor(np.asarray(a), dev)  # noqa: E731
    a8 = t(np.zeros((lay.m, lay.w8_words), np.uint32))
    a4 = t(np.zeros((lay.m, lay.w4_words), np.uint32))
    f = lower.pack_activations(lay, x.shape, conv, inv, signed, exact=False)
    pk = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                     target="llvm")
    pk["main"](t(x), t(lay.src8), t(lay.src4), t(lay.sa4), a8, a4)
    # the words pack() lays out from the oracle's own codes
    lowk = np.repeat(low, 9)
    sak, swk = np.repeat(sa, 9), np.repeat(sw, 9)
    w = codes.reshape(codes.shape[0], -1)
    pad = lambda a, rows: np.pad(a, ((0, rows - a.shape[0]), (0, 0)))  # noqa: E731
    arrays, runs, chunks4, k8p = pack(
        pad(qa[:, ~lowk], lay.m), pad(w[:, ~lowk], lay.n),
        pad(ref.extract_bits(qa[:, lowk], sak[lowk], signed), lay.m),
        pad(ref.extract_bits(w[:, lowk].astype(np.int32), swk[lowk], True), lay.n),
        (sak + swk)[lowk], int4_mma)
    got = {"A8": a8.numpy(), "A4": a4.numpy(), "W8": lay.W8, "W4": lay.W4,
           "run_table": lay.run_table}
    for key, want in arrays.items():
        assert np.array_equal(got[key], want), key
    assert (runs, chunks4, k8p) == (lay.runs, lay.chunks4, lay.k8p)
    # the GEMM's arithmetic in plain loops (and the fragment emulation) equal the oracle
    gemm = tvm.compile(tvm.IRModule({"main": lower.reference_gemm(
        lay.m, lay.n, lay.k8p, lay.runs, lay.chunks4, int4_mma, signed)}), target="llvm")
    out = t(np.zeros((lay.m, lay.n), np.int32))
    gemm["main"](a8, t(lay.W8), a4, t(lay.W4), t(lay.run_table), out)
    want = ref.mixed_matmul(qa, w, lowk, sak, swk, signed)
    assert np.array_equal(out.numpy()[:m, : w.shape[0]], want)
    em = emulate(got, lay.m, lay.n, lay.k8p, lay.runs, int4_mma, signed)
    assert np.array_equal(em[:m, : w.shape[0]], want)


@pytest.mark.parametrize("int4_mma", [True, False])
def test_weights_stored_once_serve_every_ratio(int4_mma):
    """One layer's weight words for four ratios (0, 3, 7 and all 12 channels 4-bit, in a
    random low-bit order): each ratio's layout reads the same W8 / W4 from its own offsets;
    its activations packed by the packing kernel (built for the CPU), the GEMM in plain loops
    and the fragment emulation all equal the oracle with that ratio's 4-bit channels, and
    the shared words are smaller than the four ratios' own."""
    import tvm
    from flexiq_tvm.schedules.cuda import lower

    x, codes, sa, sw, _, inv, qa, conv = _conv_case(False, seed=11)
    o, c, kk = codes.shape
    m = qa.shape[0]
    rank = np.random.default_rng(12).permutation(c)
    n_lows = (0, 3, 7, 12)
    shared = lower.gemm_weights(codes, rank, sa, sw, int4_mma, n_lows)
    dev = tvm.cpu()
    t = lambda a: tvm.runtime.tensor(np.asarray(a), dev)  # noqa: E731
    w = codes.reshape(o, -1)
    own = 0
    for n_low in n_lows:
        low = rank < n_low
        lay = lower.ratio_layout(shared, n_low, sa, m)
        assert lay.W8 is shared.W8 and lay.W4 is shared.W4
        one = lower.gemm_layout(codes, low, sa, sw, int4_mma, m)
        own += one.W8.nbytes * bool(one.k8p) + one.W4.nbytes * bool(one.chunks4)
        a8 = t(np.zeros((lay.m, lay.w8_words), np.uint32))
        a4 = t(np.zeros((lay.m, lay.w4_words), np.uint32))
        pk = tvm.compile(tvm.IRModule({"main": lower.pack_activations(
            lay, x.shape, conv, inv, False, exact=False).with_attr("global_symbol", "main")}),
            target="llvm")
        pk["main"](t(x), t(lay.src8), t(lay.src4), t(lay.sa4), a8, a4)
        kw = dict(k8_first=lay.k8_first, wk8=lay.W8.shape[1], wk4=lay.W4.shape[1])
        gemm = tvm.compile(tvm.IRModule({"main": lower.reference_gemm(
            lay.m, lay.n, lay.k8p, lay.runs, lay.chunks4, int4_mma, False, **kw)}),
            target="llvm")
        out = t(np.zeros((lay.m, lay.n), np.int32))
        gemm["main"](a8, t(lay.W8), a4, t(lay.W4), t(lay.run_table), out)
        lowk = np.repeat(low, kk)
        want = ref.mixed_matmul(qa, w, lowk, np.repeat(sa, kk), np.repeat(sw, kk), False)
        assert np.array_equal(out.numpy()[:m, :o], want), n_low
        em = emulate({"A8": a8.numpy(), "A4": a4.numpy(), "W8": lay.W8, "W4": lay.W4,
                      "run_table": lay.run_table}, lay.m, lay.n, lay.k8p, lay.runs, int4_mma,
                     False, k8_first=lay.k8_first)
        assert np.array_equal(em[:m, :o], want), n_low
    assert shared.W8.nbytes + shared.W4.nbytes < own / 2


@pytest.mark.parametrize("signed", [False, True])
def test_dp4a_path_packs_effective_bytes_and_equals_the_oracle(signed):
    import tvm
    from flexiq_tvm.schedules.cuda import lower

    x, codes, sa, sw, low, inv, qa, conv = _conv_case(signed, seed=7 + signed)
    m = qa.shape[0]
    lay = lower.dp4a_layout(codes, low, sa, sw, m, signed)
    dev = tvm.cpu()
    t = lambda a: tvm.runtime.tensor(np.asarray(a), dev)  # noqa: E731
    f = lower.pack_effective(lay, x.shape, conv, inv, signed, exact=False)
    pk = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                     target="llvm")
    words = t(np.zeros((lay.m, lay.kwords), np.int32))
    pk["main"](t(x), t(lay.shift), words)
    gemm = tvm.compile(tvm.IRModule({"main": lower.reference_dp4a(lay.m, lay.n, lay.kwords)}),
                       target="llvm")
    out = t(np.zeros((lay.m, lay.n), np.int32))
    gemm["main"](words, t(lay.B), t(lay.corr), out)
    lowk = np.repeat(low, 9)
    want = ref.mixed_matmul(qa, codes.reshape(codes.shape[0], -1), lowk, np.repeat(sa, 9),
                            np.repeat(sw, 9), signed)
    assert np.array_equal(out.numpy()[:m, : codes.shape[0]], want)
    # the bytes are the 8-bit-scale values (minus 128 when unsigned), im2col order
    eff = np.where(lowk, ref.lowered_value(qa, np.repeat(sa, 9), signed), qa)
    got = words.numpy()[:m].view(np.int8).reshape(m, -1)[:, : qa.shape[1]]
    assert np.array_equal(got.astype(np.int64), eff - (0 if signed else 128))


def _lowered_on_cpu(name, path, ratios, static_plan):
    """A zoo model through the CUDA lowering, built for the CPU with the plain-loop GEMM in
    place of the tensor-core one (same operands, same run table): a module whose every layer
    the oracle can check here."""
    import tvm
    from flexiq_tvm.schedules.cuda import lower
    from flexiq_tvm.schedules.cuda.lower import reference_dp4a, reference_gemm

    from flexiq_tvm import frontend, transform
    from flexiq_tvm.api import CompiledModule, CompileReport
    from flexiq_tvm.eval import load_eval_data

    model, plan = static_plan(name)
    _, xs, _ = load_eval_data(name, 2)
    mod = transform.prepare()(frontend.import_model(model, xs[:1]).bound())
    mod = transform.ReorderChannelBlocks(plan)(transform.AnnotateChannelPrecision(plan)(mod))
    lowering = transform.QuantizeMixedPrecisionGPU(
        plan, lower, ratios, path, gemm=reference_dp4a if path == "dp4a" else reference_gemm,
        exact=False, expose_layers=True)
    ex = tvm.compile(lowering(mod), target="llvm")
    return CompiledModule(ex, ratios, xs[:1].shape, CompileReport(), plan, expose_layers=True,
                          layers=lowering.layers), xs


def _check_lowering(name, path, static_plan, ratios=(0.0, 0.5, 1.0)):
    from flexiq_tvm.api import oracle_mismatches

    cm, xs = _lowered_on_cpu(name, path, ratios, static_plan)
    assert len(cm.layers) >= 3
    for r in ratios:
        for i in range(2):
            assert oracle_mismatches(cm, xs[i : i + 1], r) == [], (r, i)


@pytest.mark.slow  # 45-60 s per path on 2 cores
@pytest.mark.parametrize("path", ["mma_s4", "mma_s8", "dp4a"])
def test_cuda_lowering_of_resnet20_is_oracle_exact_per_layer(path, static_plan):
    # the default run: two ratios over one set of shared weights (both blocks at 0.5, the
    # 4-bit block alone at 1); the slow set checks 0 / 0.5 / 1 on the other paths
    ratios = (0.5, 1.0) if path == "mma_s4" else (0.0, 0.5, 1.0)
    _check_lowering("resnet20_fmnist", path, static_plan, ratios)


@pytest.mark.slow
@pytest.mark.parametrize("name,path", [("mobilenetv2_fmnist", "mma_s4"),
                                       ("mobilenetv2_fmnist", "mma_s8"),
                                       ("vit_fmnist", "mma_s4"), ("vit_fmnist", "mma_s8"),
                                       ("vit_fmnist", "dp4a"), ("swin_fmnist", "mma_s4")])
def test_cuda_lowering_of_the_zoo_is_oracle_exact_per_layer(name, path, static_plan):
    _check_lowering(name, path, static_plan)


def _compile_for_cuda(arch, static_plan):
    import flexiq_tvm
    from flexiq_tvm import FlexiQConfig
    from flexiq_tvm.eval import load_eval_data

    model, plan = static_plan("resnet20_fmnist")
    _, xs, _ = load_eval_data("resnet20_fmnist", 1)
    cfg = FlexiQConfig(selection="static", ratios=(0.5,))  # both blocks in every layer
    return flexiq_tvm.compile(model, xs, plan=plan, config=cfg,
                              target={"kind": "cuda", "arch": arch}), xs


def _cuda_source(cm) -> str:
    def mods(m):
        yield m
        for i in m.imports:
            yield from mods(i)

    return next(m for m in mods(cm.executable.mod) if m.kind == "cuda").inspect_source()


@pytest.mark.slow  # about a minute each; the default run compiles the kernels per arch
@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_75"])
def test_compile_for_cuda_builds_the_whole_model_without_a_gpu(arch, static_plan, tmp_path):
    import tvm
    from tvm.support import nvcc

    cm, xs = _compile_for_cuda(arch, static_plan)
    assert cm.ratios == (0.5,) and cm.metadata["target"]["arch"] == arch
    assert cm.metadata["target"]["host"]["kind"] == "llvm"
    assert len(cm.report.covered) == 22  # every conv and the classifier
    src = _cuda_source(cm)
    path = gemm_path(arch)
    int4 = path == "mma_s4"
    mma8, mma4 = "mma.sync.aligned.m16n8k32.row.col.s32", "mma.sync.aligned.m16n8k64"
    # every covered layer is a GEMM here (structurally equal kernels are emitted once): the
    # 8-bit block on INT8 MMA, the 4-bit block on s4 MMA (sm_80) or on INT8 MMA again (sm_90),
    # both on dp4a before sm_80
    assert all(not c["grouped"] for c in cm.report.covered)
    assert (mma8 in src) == (path != "dp4a") and (mma4 in src) == int4
    assert ("__dp4a" in src) == (path == "dp4a")
    assert "__fmul_rn" in src and "__fadd_rn" in src  # quantization never fused into an FMA
    if not tvm.cuda(0).exist:  # a clear error, not a crash, on calling or loading it here
        import flexiq_tvm
        from flexiq_tvm.runtime import ArtifactError

        with pytest.raises(RuntimeError, match=f"does not have .*compiled for cuda {arch}"):
            cm(xs)
        art = cm.export(tmp_path / "r20_cuda.flexiq", profile={"0.5": 1.0})
        with pytest.raises(ArtifactError, match=rf"compiled for CUDA \({arch}\); this machine"):
            flexiq_tvm.load(art)
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: CUDA source generated, not compiled")
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        ptx = nvcc.compile_cuda(src, target_format="ptx", arch=arch, compiler="nvcc")
    ptx = bytes(ptx).decode() if not isinstance(ptx, str) else ptx
    assert f".target {arch}" in ptx and (mma8 in ptx) == (path != "dp4a")
    assert (mma4 in ptx) == int4 and ("dp4a.s32.s32" in ptx) == (path == "dp4a")


@pytest.mark.parametrize("target,msg", [("cuda", "needs its architecture"),
                                        ({"kind": "cuda"}, "needs its architecture"),
                                        ({"kind": "cuda", "arch": "sm_52"}, "sm_61 or newer"),
                                        ("opencl", "available")])
def test_compile_rejects_a_target_it_cannot_build(target, msg, static_plan):
    import flexiq_tvm

    model, plan = static_plan("resnet20_fmnist")
    with pytest.raises(ValueError, match=msg):
        flexiq_tvm.compile(model, np.zeros((1, 1, 28, 28), np.float32), plan=plan,
                           target=target)


@pytest.mark.slow
def test_cuda_tuning_tasks_leave_the_tensor_core_gemm_alone(static_plan):
    from flexiq_tvm import tune
    from flexiq_tvm.eval import load_eval_data

    model, plan = static_plan("resnet20_fmnist")
    _, xs, _ = load_eval_data("resnet20_fmnist", 1)
    mod, target = tune.lowered(model, xs, plan, (0.0, 1.0),
                               target={"kind": "cuda", "arch": "sm_90"})
    assert target.kind.name == "cuda" and str(target.attrs["arch"]) == "sm_90"
    tasks, skipped = tune.tunable_tasks(mod, target)
    names = [t.task_name for t in tasks]
    assert skipped and all("gemm" in s for s in skipped)  # hand-scheduled, never tuned
    assert any("pack" in n for n in names) and any("deq" in n for n in names)
    import tvm

    if not tvm.cuda(0).exist:  # measuring needs a GPU: here or behind an RPC tracker
        with pytest.raises(ValueError, match="this machine has none"):
            tune.tune("resnet20_fmnist", trials=1, target={"kind": "cuda", "arch": "sm_90"})

