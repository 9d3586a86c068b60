"""FlexiNPU target: simulator instructions, cycle model, BYOC partition, end-to-end bit-exactness
with the oracle and the llvm build, ratio switching by instruction patching, export/load."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from flexiq_tvm.target import npu
from flexiq_tvm.target.npu import isa, sim

import flexiq_tvm
from flexiq_tvm import reference as ref
from flexiq_tvm.eval import load_eval_data
from flexiq_tvm.plan import LayerPlan

pytestmark = pytest.mark.npu

RATIOS = (0.0, 0.5, 1.0)


def _layer(kind="conv2d", c=32, o=16, k=3, groups=1, n_low=(0, 16, 32), seed=0, signed=False,
           stride=(1, 1), padding=(1, 1, 1, 1)) -> LayerPlan:
    rng = np.random.default_rng(seed)
    shape = (o, c // groups, k, k) if kind == "conv2d" else (o, c)
    return LayerPlan(
        name="L", kind=kind, weight_shape=shape,
        w_codes=rng.integers(-127, 128, shape).astype(np.int8),
        w_scale=rng.uniform(0.001, 0.01, o).astype(np.float32), bias=None,
        act_scale=0.05, act_inv_scale=float(np.float32(1) / np.float32(0.05)),
        act_signed=signed, act_shift=rng.integers(0, 5, c).astype(np.int8),
        w_shift=rng.integers(0, 5, c).astype(np.int8),
        order=rng.permutation(c).astype(np.int32),
        n_low={f"{r:g}": n for r, n in zip(RATIOS, n_low, strict=True)}, eligible=True,
        macs_per_channel=1, stride=stride,
        padding=padding if kind == "conv2d" else (0, 0, 0, 0), groups=groups)


def _run_layer(lp, x, ratio_index, epilogue=(), config=None):
    conv = lp.kind == "conv2d"
    if conv:
        n, _, h, w = x.shape
        kh, kw = lp.weight_shape[2:]
        t, b, left, right = lp.padding
        oh = (h + t + b - kh) // lp.stride[0] + 1
        ow = (w + left + right - kw) // lp.stride[1] + 1
        out_shape = (n, lp.weight_shape[0], oh, ow)
    else:
        out_shape = (*x.shape[:-1], lp.weight_shape[0])
    prog = isa.layer_program(lp, x.shape, out_shape, list(epilogue), RATIOS,
                             config or isa.NPUConfig())
    prog = sim.patch(prog, ratio_index)
    return sim.run(prog, out_shape, x, acc_size=int(np.prod(out_shape)))


@pytest.mark.parametrize("kind,groups,signed", [("conv2d", 1, False), ("conv2d", 32, False),
                                                ("conv2d", 4, True), ("linear", 1, True)])
def test_mixed_layer_is_bit_exact_with_oracle(kind, groups, signed):
    lp = _layer(kind, groups=groups, signed=signed, stride=(2, 2) if groups == 4 else (1, 1))
    if groups == 32:  # depthwise: one input channel per group
        lp = _layer(kind, c=32, o=32, groups=32, signed=signed)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 32, 9, 9)) if kind == "conv2d"
         else rng.standard_normal((2, 5, 32))).astype(np.float32) * 3
    for i, r in enumerate(RATIOS):
        out, stats, acc = _run_layer(lp, x, i)
        xin = x if kind == "conv2d" else x.reshape(-1, 32)
        want, _ = ref.layer_forward(xin, lp, lp.low_mask(r))
        assert np.array_equal(acc.reshape(want.shape), want), (kind, groups, r)
        # requantize: acc * (s_a * s_w[o]) in float32, as the reference dequantizes
        axis = 1 if kind == "conv2d" else -1
        deq = ref.dequantize_acc(want, lp.act_scale, lp.w_scale, None, axis)
        assert np.array_equal(out.reshape(deq.shape), deq)
        assert stats["low_macs"] == (0 if r == 0 else stats["macs"] * lp.n_low[f"{r:g}"] // 32)


def test_epilogue_ops_in_float32_order():
    lp = _layer("linear", c=32, o=16)
    x = np.random.default_rng(2).standard_normal((3, 32)).astype(np.float32)
    bias = np.linspace(-1, 1, 16).astype(np.float32)
    mul = np.float32(1.7)
    epi = [("add", bias), ("multiply", np.array([mul])), ("subtract", bias[::-1].copy()),
           ("divide", np.full(16, 3, np.float32)), ("clip", (-0.5, 6.0)), ("relu", None)]
    out, _, _ = _run_layer(lp, x, 1, epi)
    want = ref.dequantize_acc(ref.layer_forward(x, lp, lp.low_mask(0.5))[0], lp.act_scale,
                              lp.w_scale, None, -1)
    want = np.maximum(np.clip((((want + bias) * mul) - bias[::-1]) / np.float32(3), -0.5, 6.0),
                      0).astype(np.float32)
    assert np.array_equal(out, want)


def test_residual_add_program():
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((1, 8, 4, 4)).astype(np.float32) for _ in range(2))
    prog = isa.add_program(a.shape, False, True, RATIOS, isa.NPUConfig())
    out, stats, _ = sim.run(prog, a.shape, a, b)
    assert np.array_equal(out, np.maximum(a + b, 0))
    assert stats["compute_cycles"] == 0 and stats["dma_cycles"] > 0


def test_patching_rewrites_only_the_boundary_word():
    lp = _layer()
    prog = isa.layer_program(lp, (1, 32, 8, 8), (1, 16, 8, 8), [], RATIOS, isa.NPUConfig())
    for i, n in enumerate((0, 16, 32)):
        p = sim.patch(prog, i)
        diff = [j for j in range(len(prog)) if p[j] != prog[j]]
        setb = isa.HEADER_BYTES + 4  # instruction 0 is SETB, word 1 its immediate
        assert all(setb <= j < setb + 4 for j in diff)
        assert struct.unpack_from("<i", p, setb)[0] == n
    with pytest.raises(sim.SimulatorError, match="ratio index"):
        sim.patch(prog, 3)
    with pytest.raises(sim.SimulatorError, match="not a FlexiNPU program"):
        sim.run(b"\0" * 256, (1,), np.zeros(1, np.float32))


def test_activation_buffer_overflow_is_an_error():
    lp = _layer()
    x = np.zeros((1, 32, 8, 8), np.float32)
    with pytest.raises(sim.SimulatorError, match="activation buffer"):
        _run_layer(lp, x, 0, config=isa.NPUConfig(abuf_bytes=1024))


def test_config_validation():
    with pytest.raises(ValueError, match="rows"):
        isa.NPUConfig(rows=0)
    with pytest.raises(ValueError, match="double-buffer"):
        isa.NPUConfig(wbuf_bytes=100)


def test_cycle_model_monotone_and_two_x_on_compute_bound_layer():
    lp = _layer(c=64, o=64, n_low=(0, 32, 64))
    x = np.random.default_rng(4).standard_normal((1, 64, 14, 14)).astype(np.float32)
    st = [_run_layer(lp, x, i)[1] for i in range(3)]
    comp = [s["compute_cycles"] for s in st]
    assert comp[0] > comp[1] > comp[2]
    # K = 64 * 9 = 576 rows: 36 tiles of 16 rows in 8-bit, 18 in 4-bit (two per PE row)
    assert comp[0] == 2 * comp[2]
    assert st[0]["compute_cycles"] > st[0]["dma_cycles"]  # compute-bound
    assert [s["total_cycles"] for s in st] == sorted((s["total_cycles"] for s in st),
                                                     reverse=True)


def test_dma_bound_layer_follows_bandwidth():
    # one row (a GEMV) against a wide weight matrix on a narrow DMA: weights dominate
    lp = _layer("linear", c=256, o=256, n_low=(0, 128, 256))
    x = np.random.default_rng(5).standard_normal((1, 256)).astype(np.float32)
    cfg = isa.NPUConfig(dma_bytes_per_cycle=2)
    st = [_run_layer(lp, x, i, config=cfg)[1] for i in range(3)]
    for s in st:
        assert s["dma_cycles"] > s["compute_cycles"]
        assert s["total_cycles"] >= s["dma_cycles"]
    # 8-bit weights 64 KiB at 2 B/cycle; 4-bit halves the bytes, so the time follows the DMA
    assert st[0]["dma_cycles"] >= 256 * 256 // 2
    assert st[2]["dma_cycles"] < 0.6 * st[0]["dma_cycles"]
    assert st[2]["total_cycles"] < 0.6 * st[0]["total_cycles"]


# ------------------------------------------------------------------ BYOC on the zoo


@pytest.fixture(scope="module")
def resnet20(static_plan):
    return static_plan("resnet20_fmnist")


def test_partition_structure(resnet20):
    from flexiq_tvm import frontend, transform
    from flexiq_tvm.transform import _graph as g

    model, plan = resnet20
    _, x, _ = load_eval_data("resnet20_fmnist", 1)
    mod = transform.prepare()(frontend.import_model(model, x).bound())
    part = npu.partition_for_flexiq_npu(mod, plan)
    ext = {gv.name_hint: f for gv, f in part.functions.items()
           if f.attrs is not None and "Codegen" in f.attrs}
    assert all(str(f.attrs["Codegen"]) == "flexiq_npu" for f in ext.values())
    comps = {name: b.value for name, f in ext.items() for b in g.bindings(f)
             if isinstance(b.value, type(f))}
    callees = [getattr(getattr(b.value, "op", None), "name_hint", None)
               for b in g.bindings(part["main"])]
    calls = [comps[c] for c in callees if c in comps]
    names = [str(c.attrs["Composite"]) for c in calls]
    layers = sorted(str(c.attrs["flexiq_npu.layer"]) for c in calls
                    if "flexiq_npu.layer" in c.attrs)
    assert layers == sorted(lp.name for lp in plan.layers)  # every plan layer, once
    # conv + BN (subtract, divide, multiply, add) with or without ReLU; 9 residual add + ReLU
    assert names.count("flexiq_npu.add_relu") == 9
    assert names.count("flexiq_npu.matmul_e1") == 1  # classifier + bias
    assert names.count("flexiq_npu.conv2d_e4_relu") + names.count("flexiq_npu.conv2d_e4") == 21
    # what stays on the host: pooling / reshape, and the ReLUs whose input is shared
    host = {g.op_name(b.value) for b in g.bindings(part["main"])} - {None}
    assert "relax.nn.conv2d" not in host and "relax.matmul" not in host


@pytest.fixture(scope="module")
def resnet20_llvm(resnet20):
    model, plan = resnet20
    _, xs, _ = load_eval_data("resnet20_fmnist", 1)
    return flexiq_tvm.compile(model, xs[:1], plan=plan, database=None)


def test_resnet20_npu_equals_llvm_build_and_switches_by_patching(resnet20, resnet20_llvm,
                                                                   tmp_path):
    model, plan = resnet20
    _, xs, _ = load_eval_data("resnet20_fmnist", 8)
    cn = flexiq_tvm.compile(model, xs[:1], plan=plan, target="flexiq_npu")
    cl = resnet20_llvm
    assert cn.report.kept_fp32 == [] and len(cn.report.covered) == len(plan.layers)
    cycles = []
    for r in cn.ratios:
        got = np.concatenate([cn(xs[i : i + 1], ratio=r) for i in range(len(xs))])
        want = np.concatenate([cl(xs[i : i + 1], ratio=r) for i in range(len(xs))])
        # every covered layer is oracle-exact in both builds, and the float glue is the same
        assert np.array_equal(got, want), r
        npu.read_stats(cn, reset=True)
        cn(xs[:1], ratio=r)
        cycles.append(sum(p["total_cycles"] for p in npu.read_stats(cn)))
    assert cycles == sorted(cycles, reverse=True) and cycles[0] > 1.3 * cycles[-1]
    # module-wide switch: the patch function is the one the runtime calls
    cn.set_ratio(1.0)
    assert np.array_equal(cn(xs[:1]), cl(xs[:1], ratio=1.0))
    path = cn.export(tmp_path / "npu.flexiq", profile={"0": 1.0})
    loaded = flexiq_tvm.load(path)
    assert loaded.metadata["target"] == "flexiq_npu"
    for r in (0.0, 1.0, 0.5):
        assert np.array_equal(loaded(xs[:1], ratio=r), cl(xs[:1], ratio=r))


@pytest.mark.parametrize("name", ["resnet20_fmnist", "mobilenetv2_fmnist", "vit_fmnist",
                                  "swin_fmnist"])
def test_zoo_layer_programs_bit_exact_with_oracle(name, static_plan):
    """Every covered layer of every FMNIST zoo model, at every ratio, run as its FlexiNPU
    program on the layer's real input: int32 accumulators equal to the oracle's."""
    import torch

    model, plan = static_plan(name)
    _, x, _ = load_eval_data(name, 2)
    seen = {}
    hooks = [model.get_submodule(lp.name).register_forward_hook(
        lambda m, i, o, n=lp.name: seen.__setitem__(n, (i[0].numpy(), tuple(o.shape))))
        for lp in plan.layers]
    with torch.no_grad():
        model(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    ratios = plan.ratios
    for lp in plan.layers:
        xin, oshape = seen[lp.name]
        prog = isa.layer_program(lp, xin.shape, oshape, [], ratios, isa.NPUConfig())
        for i, r in enumerate(ratios):
            flat = xin if lp.kind == "conv2d" else xin.reshape(-1, xin.shape[-1])
            want = ref.layer_forward(flat, lp, lp.low_mask(r))[0]
            _, _, acc = sim.run(sim.patch(prog, i), oshape, xin, acc_size=want.size)
            assert np.array_equal(acc.reshape(want.shape), want), (name, lp.name, r)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv2_fmnist", "vit_fmnist", "swin_fmnist"])
def test_zoo_npu_build_equals_llvm_build(name, static_plan):
    """The NPU module (programs + host glue) against the llvm module, every ratio."""
    model, plan = static_plan(name)
    _, xs, _ = load_eval_data(name, 4)
    cn = flexiq_tvm.compile(model, xs[:1], plan=plan, target="flexiq_npu")
    cl = flexiq_tvm.compile(model, xs[:1], plan=plan, database=None)
    assert cn.report.kept_fp32 == []
    for r in cn.ratios:
        for i in range(len(xs)):
            np.testing.assert_array_equal(cn(xs[i : i + 1], ratio=r), cl(xs[i : i + 1], ratio=r))


def test_layers_too_large_for_the_buffer_stay_on_the_host(resnet20, resnet20_llvm):
    """A small activation buffer: the 16 x 28 x 28 layers run on the CPU's FlexiQ kernels (one
    entry per ratio), the rest on the NPU, and the module still equals the llvm build."""
    model, plan = resnet20
    _, xs, _ = load_eval_data("resnet20_fmnist", 2)
    small = isa.NPUConfig(abuf_bytes=8 * 1024)  # 32 x 14 x 14 = 6272 codes fit, 12544 do not
    cn = flexiq_tvm.compile(model, xs[:1], plan=plan, target="flexiq_npu", npu_config=small)
    assert cn.report.kept_fp32 == [] and len(cn.report.covered) == len(plan.layers)
    on_cpu = {c["layer"] for c in cn.report.covered if c["device"] == "cpu"}
    # 16-channel inputs are the 28 x 28 ones (12544 codes); the stem's 1 x 28 x 28 fits
    assert on_cpu == {lp.name for lp in plan.layers if lp.in_channels == 16}
    assert len(on_cpu) == 8
    cl = resnet20_llvm
    for r in (0.0, 0.5, 1.0, 0.0):  # back to 0: the patch and the variant move together
        assert np.array_equal(cn(xs[:1], ratio=r), cl(xs[:1], ratio=r))
