"""The llvm kernel library directly: each kernel against numpy on random operands, at every
low-bit boundary (odd ones included: a row pair of ``vpmaddwd`` may straddle 4/8-bit)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from flexiq_tvm.schedules.llvm import kernel_target, kernels
from flexiq_tvm.schedules.llvm.mixed import corr8, gemm_chunks, pack_w8

from flexiq_tvm import frontend
from flexiq_tvm.hostcpu import ISAS, isa_available

TO, TP = kernels("avx2")["gemm_tiles"]
KERNELS = kernels("avx2")  # the ISA-independent kernels
# every ISA's kernels; those this CPU cannot run are skipped
ISA_PARAMS = [pytest.param(i, id=i, marks=pytest.mark.skipif(
    not isa_available(i), reason=f"this CPU cannot run {i}")) for i in ISAS]


def _build(prim_func, isa=None):
    """One kernel as a module's ``main``; an integer kernel with its ISA's kernel target."""
    from flexiq_tvm.schedules.llvm import PASS_CONFIG

    mod = tvm.IRModule({"main": prim_func.with_attr("global_symbol", "main")})
    target = frontend.default_llvm_target()
    with tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
        return tvm.compile(mod, target=kernel_target(target, isa) if isa else
                           tvm.target.Target(target))


def _rup(v, m):
    return -(-v // m) * m


CASES = [  # n, c, h, w, o, kh, kw, stride, dil, layout, signed
    (1, 5, 9, 7, 5, 3, 3, (1, 1), (1, 1), "OP", False),  # odd channels, P not a tile multiple
    (2, 16, 8, 8, 40, 3, 3, (2, 2), (1, 1), "OP", True),  # batch 2, strided, signed
    (1, 7, 10, 10, 16, 3, 3, (1, 1), (2, 2), "OP", False),  # dilated
    (1, 33, 1, 50, 70, 1, 1, (1, 1), (1, 1), "PO", True),  # a linear layer: 50 rows
    (1, 300, 4, 4, 16, 1, 1, (1, 1), (1, 1), "OP", False),  # a run longer than one flush
    (1, 1, 30, 30, 16, 3, 3, (1, 1), (1, 1), "OP", False),  # one input channel, no 4-bit
    # the batch shares the parallel tasks' tiles: a task's tiles span images
    (3, 6, 7, 7, 20, 3, 3, (1, 1), (1, 1), "OP", False),
    (2, 9, 1, 13, 20, 1, 1, (1, 1), (1, 1), "PO", True),
]


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("case", CASES)
def test_mixed_gemm_conv_matches_numpy_at_every_boundary(case, isa):
    from flexiq_tvm.schedules.llvm.mixed import LowLayout

    vnni = isa != "avx2"
    n, c, hp, wp, o, kh, kw, stride, dil, layout, signed = case
    rng = np.random.default_rng(c * 100 + o)
    oh = (hp - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wp - dil[1] * (kw - 1) - 1) // stride[1] + 1
    cpad, opad, kk = _rup(c, 4 if vnni else 2), _rup(o, TO), kh * kw
    ppad = _rup(oh * ow, TP)
    n_max = c - 1
    # activation and weight shifts in no particular order (the slots regroup their sums), or
    # one long run
    sa = rng.integers(0, 5, size=c) if c < 100 else np.zeros(c, np.int64)
    sw = rng.integers(0, 5, size=c) if c < 100 else np.zeros(c, np.int64)
    st = sa + sw
    low = LowLayout(st, n_max, kk)
    w8 = rng.integers(-127, 128, size=(kh, kw, c, o))
    w4 = rng.integers(-8, 8, size=(kh, kw, c, o))
    lib = _build(kernels(isa)["mixed_gemm"](n, hp, wp, cpad, low.slots, low.max_chunks(), kh,
                                            kw, stride, dil, oh, ow, opad, layout), isa)
    a8 = np.zeros((kh, kw, cpad, opad), np.int8)
    a8[:, :, :c, :o] = w8
    w8t = tvm.runtime.tensor(pack_w8(a8.reshape(-1, opad), isa))
    w4taps = w4.reshape(kk, c, o)
    w4t = tvm.runtime.tensor(low.pack(w4taps, opad))
    slot_t = tvm.runtime.tensor(low.slot_shift(sw))
    off = 8 if signed else 0
    for n_low in sorted({v for v in (0, 1, 2, c // 2, c // 2 + 1, n_max - 1, n_max)
                         if 0 <= v <= n_max}):
        q8 = np.zeros((n, hp, wp, cpad), np.int16)
        q8[..., n_low:c] = rng.integers(-127 if signed else 0, 128 if signed else 256,
                                        size=(n, hp, wp, c - n_low))
        off8 = 128 if signed and vnni else 0  # VNNI: unsigned bytes, signed codes +128
        a4 = rng.integers(-8 if signed else 0, 8 if signed else 16, size=(n, hp, wp, c))
        a4[..., n_low:] = 0
        # the quantizer's bytes: the code (+8 if signed), the code of 0 in inactive slots; on
        # the VNNI path shifted by the channel's activation shift
        q4 = np.full((n, hp, wp, low.slots), off, np.uint8)
        for si, ci in enumerate(low.slot_chan):
            if ci >= 0:
                u = a4[..., ci] + off if ci < n_low else np.full(a4.shape[:3], off)
                q4[..., si] = u << sa[ci] if vnni else u
        x = q8[..., :c].astype(np.int64) + (a4 << st)  # 4-bit channels on the INT8 scale
        w = np.where(np.arange(c)[:, None] < n_low, w4, w8)  # [kh, kw, c, o]
        want = np.zeros((n, oh, ow, o), np.int64)
        for ry in range(kh):
            for rx in range(kw):
                win = x[:, ry * dil[0] : ry * dil[0] + stride[0] * (oh - 1) + 1 : stride[0],
                        rx * dil[1] : rx * dil[1] + stride[1] * (ow - 1) + 1 : stride[1]]
                want += win @ w[ry, rx]
        want = want.reshape(n, oh * ow, o)
        rows = low.chunks(n_low)
        table = np.zeros((low.max_chunks(), 3), np.int32)
        table[: len(rows)] = rows
        corr = (low.correction(w4taps, st, n_low, opad) if signed
                else np.zeros(opad, np.int32))
        corr = corr + corr8(a8.reshape(kk, cpad, opad)[..., :o], n_low, signed, isa, opad)
        shape = (n, opad, ppad) if layout == "OP" else (n, ppad, opad)
        acc = tvm.runtime.empty(shape, "int32")
        q8t = (q8 + off8).astype(np.uint8) if vnni else q8
        lib["main"](tvm.runtime.tensor(q8t), tvm.runtime.tensor(q4), w8t, w4t, slot_t,
                    tvm.runtime.tensor(table), int((rows[:, 1] > 0).sum()),
                    tvm.runtime.tensor(corr), n_low, acc)
        got = acc.numpy()
        got = got[:, :o, : oh * ow].transpose(0, 2, 1) if layout == "OP" else got[:, : oh * ow, :o]
        np.testing.assert_array_equal(got, want, err_msg=f"n_low={n_low}")


def test_low_layout_quads_hold_one_shift_and_chunks_respect_the_flush_bound():
    from flexiq_tvm.schedules.llvm.mixed import LowLayout

    st = np.array([0, 0, 0, 3, 3, 5, 5, 5, 5, 5, 1])
    low = LowLayout(st, 10, taps=9)
    assert low.slot_chan.tolist() == [0, 1, 2, -1, 3, 4, -1, -1, 5, 6, 7, 8, 9, -1, -1, -1]
    assert low.runs == [(0, 1, 0), (1, 1, 3), (2, 2, 5)]
    assert low.chunks(4).tolist() == [[0, 1, 0], [1, 1, 3]]
    assert low.chunks(0).tolist() == [[0, 0, 0]]
    mixed = LowLayout(np.array([2, 0, 2, 0, 1]), 5, taps=1)  # one run per shift value
    assert mixed.slot_chan.tolist() == [1, 3, -1, -1, 4, -1, -1, -1, 0, 2, -1, -1]
    assert mixed.chunks(2).tolist() == [[0, 1, 0], [2, 1, 2]]
    big = LowLayout(np.zeros(200, int), 200, taps=9)  # 50 quads, at most 15 per chunk
    assert [r[1] for r in big.chunks(200).tolist()] == [15, 15, 15, 5]


def test_gemm_chunks_give_each_task_whole_tiles():
    assert gemm_chunks(1, 171) * 8 >= 171  # one output tile: positions split 8 ways
    assert gemm_chunks(8, 11) == 11  # enough output tiles: one chunk
    assert gemm_chunks(3, 1) == 1


@pytest.mark.parametrize("isa", ["avx2", "avxvnni"])  # the two layouts; pure integer / float
@pytest.mark.parametrize("signed", [False, True])
def test_quantize_nhwc_layout_codes_and_padding(signed, isa):
    from flexiq_tvm.schedules.llvm.mixed import LowLayout

    vnni = isa != "avx2"
    off8 = 128 if signed and vnni else 0  # VNNI: unsigned bytes, signed codes stored +128
    n, c, h, w, pad, cpad = 1, 3, 4, 5, (1, 0, 2, 1), 4
    x = np.random.default_rng(2).normal(size=(n, c, h, w)).astype(np.float32)
    inv, sa = 40.0, np.array([1, 2, 0], np.int32)
    low = LowLayout(np.array([3, 5, 0]), 2, taps=1)  # channels 0, 1 (shifts 3, 5) in 4-bit
    lib = _build(kernels(isa)["quantize_nhwc"](n, c, h, w, pad, cpad, low.slots, inv, signed))
    q8 = tvm.runtime.empty((n, h + 1, w + 3, cpad), "uint8" if vnni else "int16")
    q4 = tvm.runtime.empty((n, h + 1, w + 3, low.slots), "uint8")
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(sa), tvm.runtime.tensor(low.slot_chan),
                2, q8, q4)
    lo, hi, lo4, hi4, off = (-127, 127, -8, 7, 8) if signed else (0, 255, 0, 15, 0)
    code = np.clip(np.floor(x * np.float32(inv) + np.float32(0.5)), lo, hi).astype(np.int32)
    half = np.where(sa > 0, 1 << np.maximum(sa - 1, 0), 0)[None, :, None, None]
    a4 = np.clip((code + half) >> sa[None, :, None, None], lo4, hi4)
    g8, g4 = q8.numpy().astype(np.int32) - off8, q4.numpy()
    np.testing.assert_array_equal(g8[:, 1:, 2:7, 2], code[:, 2])
    assert not g8[..., :2].any() and not g8[..., 3:].any()  # 4-bit channels, channel pad
    # on the VNNI path every byte of a channel's slot (code, code of 0, border) is shifted by
    # the channel's activation shift
    pre = np.array([sa[ci] if vnni and ci >= 0 else 0 for ci in low.slot_chan])
    for si, ci in enumerate(low.slot_chan):
        want = a4[:, ci] + off if ci >= 0 else np.full((n, h, w), off)
        np.testing.assert_array_equal(g4[:, 1:, 2:7, si], want << pre[si])
    border = np.ones(g4.shape[1:3], bool)
    border[1:, 2:7] = False
    assert (g4[:, border] == off << pre).all() and not g8[:, border].any()


def _scheduled_scripts(mod) -> dict[str, str]:
    """TVMScript of the PrimFuncs ScheduleInjective schedules in legalized, fused ``mod``."""
    from flexiq_tvm.schedules.llvm import ScheduleInjective
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    target = tvm.target.Target(frontend.default_llvm_target())
    with target:
        legal = tvm.transform.Sequential(cpu.legalize_passes(target))(mod)
    return {gv.name_hint: f.script() for gv, f in ScheduleInjective()(legal).functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and "flexiq.scheduled" in (f.attrs or {})}


def _assert_pipeline_bit_identical(mod, shapes, seed):
    """``mod`` built by TVM's default pipeline and by ours gives the same bits."""
    from flexiq_tvm.schedules.llvm import pipeline
    from tvm import relax

    target = tvm.target.Target(frontend.default_llvm_target())
    rng = np.random.default_rng(seed)
    args = [tvm.runtime.tensor(rng.standard_normal(s).astype(np.float32)) for s in shapes]
    outs = []
    for pipe in ("default", pipeline(target)):
        ex = tvm.compile(mod, target=target, relax_pipeline=pipe)
        outs.append(relax.VirtualMachine(ex, tvm.cpu())["main"](*args).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


def test_schedule_injective_vectorises_and_keeps_results_bit_identical():
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Chain:  # a BatchNorm affine + residual + ReLU, as between two FlexiQ layers
        @R.function
        def main(x: R.Tensor((1, 16, 28, 28), "float32"), r: R.Tensor((1, 16, 28, 28), "float32"),
                 m: R.Tensor((1, 16, 1, 1), "float32"), s: R.Tensor((1, 16, 1, 1), "float32")):
            with R.dataflow():
                a = R.divide(R.subtract(x, m), s)
                b = R.nn.relu(R.add(R.multiply(a, s), r))
                R.output(b)
            return b

    texts = _scheduled_scripts(Chain)
    assert len(texts) == 1 and "vectorized" in next(iter(texts.values()))
    _assert_pipeline_bit_identical(Chain, [(1, 16, 28, 28), (1, 16, 28, 28), (1, 16, 1, 1),
                                           (1, 16, 1, 1)], seed=3)


def test_schedule_reduction_parallelises_and_keeps_results_bit_identical():
    """Attention's FP32 matmul + softmax (reductions TVM's CPU pipeline leaves on one thread):
    parallel over the leading data-parallel loops only, outputs bit-identical."""
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Attn:
        @R.function
        def main(q: R.Tensor((4, 50, 32), "float32"), k: R.Tensor((4, 32, 50), "float32")):
            with R.dataflow():
                a = R.nn.softmax(R.matmul(q, k), axis=-1)
                R.output(a)
            return a

    texts = _scheduled_scripts(Attn)
    assert set(texts) == {"matmul", "softmax"}
    # matmul: the fewest leading output axes with MIN_TASKS iterations, fused and parallel;
    # the reduction axis stays a serial loop
    assert "for i0 in T.parallel(T.int64(4))" not in texts["matmul"]  # 4 < MIN_TASKS
    assert "i0_i1_fused in T.parallel(T.int64(200))" in texts["matmul"]
    assert texts["softmax"].count("T.parallel") == 4  # max, exp, sum, divide
    _assert_pipeline_bit_identical(Attn, [(4, 50, 32), (4, 32, 50)], seed=4)


@pytest.mark.parametrize("n,c,h,w,groups,o,k,stride,dil", [
    (1, 16, 14, 14, 16, 16, 3, 1, 1),  # depthwise, a row shorter than one vector
    (2, 8, 11, 13, 8, 8, 5, 2, 1),  # batch 2, 5x5, strided, ragged end
    (1, 12, 9, 9, 4, 24, 3, 1, 2),  # grouped (3 in, 6 out per group), dilated
    (2, 4, 20, 21, 4, 4, 3, 1, 1),  # a whole vector and a ragged one per row
])
def test_mixed_grouped_conv_matches_numpy(n, c, h, w, groups, o, k, stride, dil):
    from flexiq_tvm.transform.quantize_mixed_precision import pack_int4_flat

    cg, og = c // groups, o // groups
    pad = k // 2 * dil
    hp, wp = h + 2 * pad, w + 2 * pad
    oh = (hp - dil * (k - 1) - 1) // stride + 1
    ow = (wp - dil * (k - 1) - 1) // stride + 1
    rng = np.random.default_rng(c + o)
    lib = _build(KERNELS["mixed_grouped_conv"](n, c, hp, wp, o, cg, k, k, (stride, stride),
                                               (dil, dil), oh, ow, groups))
    q = rng.integers(-2048, 3841, (n, c, hp, wp)).astype(np.int16)
    w8 = rng.integers(-127, 128, (o, cg, k, k)).astype(np.int8)
    w4 = rng.integers(-8, 8, (o, cg, k, k))
    rank = rng.permutation(c).astype(np.int32)  # 4-bit where rank < n_low: no prefix needed
    for n_low in (0, c // 3, c):
        acc = tvm.runtime.empty((n, o, oh, ow), "int32")
        lib["main"](tvm.runtime.tensor(q), tvm.runtime.tensor(w8),
                    tvm.runtime.tensor(pack_int4_flat(w4)), tvm.runtime.tensor(rank), n_low, acc)
        want = np.zeros((n, o, oh, ow), np.int64)
        for oc in range(o):
            for ci in range(cg):
                cin = oc // og * cg + ci
                wt = w4[oc, ci] if rank[cin] < n_low else w8[oc, ci].astype(np.int64)
                for ry in range(k):
                    for rx in range(k):
                        win = q[:, cin, ry * dil : ry * dil + stride * (oh - 1) + 1 : stride,
                                rx * dil : rx * dil + stride * (ow - 1) + 1 : stride]
                        want[:, oc] += win.astype(np.int64) * wt[ry, rx]
        np.testing.assert_array_equal(acc.numpy(), want, err_msg=f"n_low={n_low}")


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("w", [7, 19, 20])  # one whole-row vector; 8..16 lanes + remainder
def test_quantize_padded_codes_and_border(signed, w):
    """The grouped/depthwise conv's quantizer: NCHW codes with a zero border; a channel of
    rank below n_low holds its 4-bit code shifted by its total shift."""
    n, c, h, pad = 2, 5, 3, (1, 2, 0, 1)  # top, bottom, left, right
    rng = np.random.default_rng(w)
    x = rng.normal(size=(n, c, h, w)).astype(np.float32)
    inv = 40.0
    sa = rng.integers(0, 5, size=c).astype(np.int32)
    st = sa + rng.integers(0, 5, size=c).astype(np.int32)
    rank = rng.permutation(c).astype(np.int32)
    lib = _build(KERNELS["quantize_padded"](n, c, h, w, pad, inv, signed))
    lo, hi, lo4, hi4 = (-127, 127, -8, 7) if signed else (0, 255, 0, 15)
    code = np.clip(np.floor(x * np.float32(inv) + np.float32(0.5)), lo, hi).astype(np.int64)
    half = np.where(sa > 0, 1 << np.maximum(sa - 1, 0), 0)[None, :, None, None]
    a4 = np.clip((code + half) >> sa[None, :, None, None], lo4, hi4)
    for n_low in (0, 2, c):
        q = tvm.runtime.empty((n, c, h + 3, w + 1), "int16")
        lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(sa), tvm.runtime.tensor(st),
                    tvm.runtime.tensor(rank), n_low, q)
        low = (rank < n_low)[None, :, None, None]
        want = np.zeros((n, c, h + 3, w + 1), np.int64)
        want[:, :, 1 : 1 + h, 0:w] = np.where(low, a4 << st[None, :, None, None], code)
        np.testing.assert_array_equal(q.numpy(), want, err_msg=f"n_low={n_low}")


@pytest.mark.parametrize("isa", ["avx2", "avxvnni"])  # the two layouts; pure integer / float
@pytest.mark.parametrize("signed", [False, True])
def test_quantize_rows_codes_at_every_boundary(signed, isa):
    """A linear layer's rows: vectorised along channels / slots, odd widths included."""
    from flexiq_tvm.schedules.llvm.mixed import LowLayout

    vnni = isa != "avx2"
    off8 = 128 if signed and vnni else 0
    m, k, kpad = 13, 19, 20
    rng = np.random.default_rng(5)
    x = rng.normal(size=(m, k)).astype(np.float32)
    inv, sa = 30.0, rng.integers(0, 5, size=k).astype(np.int32)
    low = LowLayout(rng.integers(3, 9, size=k), k - 2, taps=1)
    lib = _build(kernels(isa)["quantize_rows"](m, k, kpad, low.slots, inv, signed))
    lo, hi, lo4, hi4, off = (-127, 127, -8, 7, 8) if signed else (0, 255, 0, 15, 0)
    code = np.clip(np.floor(x * np.float32(inv) + np.float32(0.5)), lo, hi).astype(np.int32)
    half = np.where(sa > 0, 1 << np.maximum(sa - 1, 0), 0)
    a4 = np.clip((code + half) >> sa, lo4, hi4)
    for n_low in (0, 1, 8, k - 2):
        q8 = tvm.runtime.empty((1, 1, m, kpad), "uint8" if vnni else "int16")
        q4 = tvm.runtime.empty((1, 1, m, low.slots), "uint8")
        lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(sa),
                    tvm.runtime.tensor(low.slot_chan), n_low, q8, q4)
        want8 = np.full((m, kpad), off8, np.int64)
        want8[:, n_low:k] = code[:, n_low:] + off8
        np.testing.assert_array_equal(q8.numpy()[0, 0].astype(np.int64), want8,
                                      err_msg=f"n_low={n_low}")
        want4 = np.full((m, low.slots), off, np.int64)
        for si, ci in enumerate(low.slot_chan):
            if 0 <= ci < n_low:
                want4[:, si] = a4[:, ci] + off
            if vnni and ci >= 0:
                want4[:, si] <<= sa[ci]
        np.testing.assert_array_equal(q4.numpy()[0, 0], want4, err_msg=f"n_low={n_low}")
