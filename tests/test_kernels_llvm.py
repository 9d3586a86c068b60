"""The llvm kernel library directly: each kernel against numpy on random operands, at every
low-bit boundary (odd ones included: a row pair of ``vpmaddwd`` may straddle 4/8-bit)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from flexiq_tvm import frontend
from flexiq_tvm.schedules.llvm import KERNELS
from flexiq_tvm.schedules.llvm.mixed import gemm_chunks
from flexiq_tvm.transform.quantize_mixed_precision import interleave_pairs, pack_int4_blocks

TO, TP = KERNELS["gemm_tiles"]


def _build(prim_func):
    mod = tvm.IRModule({"main": prim_func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=tvm.target.Target(frontend.default_llvm_target()))


def _rup(v, m):
    return -(-v // m) * m


def _weights(w8, w4, c4, cpad, opad):
    """[kh, kw, c, o] codes -> the kernel's (w8, w4) operands."""
    kh, kw, c, o = w8.shape
    a = np.zeros((kh, kw, cpad, opad), np.int8)
    a[:, :, :c, :o] = w8
    b = np.zeros((kh, kw, max(c4, 2), opad), np.int32)
    b[:, :, :c4, :o] = w4[:, :, :c4]
    return (tvm.runtime.tensor(interleave_pairs(a.reshape(-1, opad))),
            tvm.runtime.tensor(pack_int4_blocks(b.reshape(-1, opad), TO)))


CASES = [  # n, c, h, w, o, kh, kw, stride, dil, layout
    (1, 5, 9, 7, 5, 3, 3, (1, 1), (1, 1), "OP"),  # odd channels, P not a tile multiple
    (2, 16, 8, 8, 40, 3, 3, (2, 2), (1, 1), "OP"),  # batch 2, strided
    (1, 7, 10, 10, 16, 3, 3, (1, 1), (2, 2), "OP"),  # dilated
    (1, 33, 1, 50, 70, 1, 1, (1, 1), (1, 1), "PO"),  # a linear layer: 50 rows
]


@pytest.mark.parametrize("case", CASES)
def test_mixed_gemm_conv_matches_numpy_at_every_boundary(case):
    n, c, hp, wp, o, kh, kw, stride, dil, layout = case
    rng = np.random.default_rng(c * 100 + o)
    oh = (hp - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wp - dil[1] * (kw - 1) - 1) // stride[1] + 1
    cpad, opad = _rup(c, 2), _rup(o, TO)
    ppad = _rup(oh * ow, TP)
    c4 = _rup(c - 1, 2)  # the largest low block (rounded up to even, as the pass does)
    w8 = rng.integers(-127, 128, size=(kh, kw, c, o))
    w4 = rng.integers(-8, 8, size=(kh, kw, c, o))
    lib = _build(KERNELS["mixed_gemm"](n, hp, wp, cpad, kh, kw, stride, dil, oh, ow, opad, c4,
                                       layout))
    wts = _weights(w8, w4, min(c4, c), cpad, opad)
    for n_low in sorted({0, 1, c // 2, c // 2 + 1, c - 2, c - 1}):
        q = np.zeros((n, hp, wp, cpad), np.int16)
        q[..., :c] = rng.integers(-127, 256, size=(n, hp, wp, c))
        q[..., :n_low] = rng.integers(-2048, 3841, size=(n, hp, wp, n_low))  # 15 << 8 max
        w = np.where(np.arange(c)[:, None] < n_low, w4, w8)  # [kh, kw, c, o]
        want = np.zeros((n, oh, ow, o), np.int64)
        for ry in range(kh):
            for rx in range(kw):
                win = q[:, ry * dil[0] : ry * dil[0] + stride[0] * (oh - 1) + 1 : stride[0],
                        rx * dil[1] : rx * dil[1] + stride[1] * (ow - 1) + 1 : stride[1], :c]
                want += win.astype(np.int64) @ w[ry, rx]
        want = want.reshape(n, oh * ow, o)
        shape = (n, opad, ppad) if layout == "OP" else (n, ppad, opad)
        acc = tvm.runtime.empty(shape, "int32")
        lib["main"](tvm.runtime.tensor(q), *wts, n_low, acc)
        got = acc.numpy()
        got = got[:, :o, : oh * ow].transpose(0, 2, 1) if layout == "OP" else got[:, : oh * ow, :o]
        np.testing.assert_array_equal(got, want, err_msg=f"n_low={n_low}")


def test_gemm_chunks_give_each_task_whole_tiles():
    assert gemm_chunks(1, 171) * 8 >= 171  # one output tile: positions split 8 ways
    assert gemm_chunks(8, 11) == 11  # enough output tiles: one chunk
    assert gemm_chunks(3, 1) == 1


def test_quantize_nhwc_layout_codes_and_padding():
    n, c, h, w, pad, cpad = 1, 3, 4, 5, (1, 0, 2, 1), 4
    x = np.random.default_rng(2).normal(size=(n, c, h, w)).astype(np.float32)
    inv, sa, st = 40.0, np.array([1, 2, 0], np.int32), np.array([3, 5, 0], np.int32)
    lib = _build(KERNELS["quantize_nhwc"](n, c, h, w, pad, cpad, inv, True))
    q = tvm.runtime.empty((n, h + 1, w + 3, cpad), "int16")
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(sa), tvm.runtime.tensor(st), 2, q)
    got = q.numpy()
    code = np.clip(np.floor(x * np.float32(inv) + np.float32(0.5)), -127, 127).astype(np.int32)
    half = np.where(sa > 0, 1 << np.maximum(sa - 1, 0), 0)[None, :, None, None]
    low = np.clip((code + half) >> sa[None, :, None, None], -8, 7) << st[None, :, None, None]
    want = np.where(np.arange(c)[None, :, None, None] < 2, low, code).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(got[:, 1:, 2:7, :c], want)
    assert not got[:, 0].any() and not got[:, :, :2].any() and not got[:, :, 7:].any()
    assert not got[..., c:].any()


def test_schedule_injective_vectorises_and_keeps_results_bit_identical():
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.script import relax as R

    from flexiq_tvm.schedules.llvm import ScheduleInjective, pipeline

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

    target = tvm.target.Target(frontend.default_llvm_target())
    with target:
        fused = tvm.transform.Sequential(cpu.legalize_passes(target))(Chain)
    scheduled = ScheduleInjective()(fused)
    names = [gv.name_hint for gv, f in scheduled.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and "flexiq.scheduled" in (f.attrs or {})]
    assert len(names) == 1 and "vectorized" in scheduled[names[0]].script()
    rng = np.random.default_rng(3)
    args = [rng.standard_normal(s).astype(np.float32) for s in
            [(1, 16, 28, 28), (1, 16, 28, 28), (1, 16, 1, 1), (1, 16, 1, 1)]]
    outs = []
    for pipe in ("default", pipeline(target)):
        ex = tvm.compile(Chain, target=target, relax_pipeline=pipe)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        outs.append(vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
