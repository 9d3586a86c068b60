"""FlexiQ Relax passes: structure (Before/Expected), FP32 invariance of the reordering, and
bit-exactness of the compiled kernels with the integer oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax
from tvm.script import relax as R

from flexiq_tvm import FlexiQConfig, frontend, transform
from flexiq_tvm.quantize import quantize
from flexiq_tvm.transform import _graph as g
from flexiq_tvm.transform.reorder_channel_blocks import desired_order, satisfies


@tvm.script.ir_module
class NoConv:
    @R.function
    def main(x: R.Tensor((1, 4, 8, 8), "float32")) -> R.Tensor((1, 4, 8, 8), "float32"):
        with R.dataflow():
            y = R.nn.relu(x)
            z = R.add(y, x)
            R.output(z)
        return z


class Residual(nn.Module):
    """conv -> BN -> ReLU -> [conv -> BN] + skip -> ReLU -> conv (two consumers of one space)."""

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.b0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.b0(self.c0(x)))
        h = torch.relu(self.b1(self.c1(h)) + h)
        h = torch.relu(self.c2(h))
        return self.fc(h.mean((2, 3)))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.c = nn.Conv2d(12, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return self.fc(torch.relu(self.c(h)).mean((2, 3)))


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.b = nn.Conv2d(12, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.clamp(self.a(x), 0, 6)
        h = torch.clamp(self.dw(h), 0, 6)
        return self.fc(self.b(h).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(12, d)
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, 3)
        self.heads = heads

    def forward(self, x):  # x: (B, T, 12)
        h = self.embed(x)
        y = self.norm(h)
        b, t, d = y.shape
        hd = d // self.heads

        def split(z):
            return z.reshape(b, t, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.q(y)), split(self.k(y)), split(self.v(y))
        a = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, -1) @ v
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return self.out(torch.nn.functional.gelu(self.mlp(h))).mean(1)


def _model_and_data(cls, shape, seed=0):
    torch.manual_seed(seed)
    model = cls().eval()
    for mod in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    rng = np.random.default_rng(seed)
    return model, rng.standard_normal((48, *shape)).astype(np.float32)


CFG = FlexiQConfig(selection="static", calib_images=48, keep_first_8bit=False,
                   keep_last_8bit=False, depthwise_low=True)


def _annotated(model, calib, via="torch.export"):
    plan = quantize(model, calib, CFG, progress=False)
    imported = frontend.import_model(model, torch.from_numpy(calib[:1]), via=via)
    mod = transform.prepare()(imported.bound())
    return plan, transform.AnnotateChannelPrecision(plan)(mod)


def _run_fp32(mod, x):
    ex = tvm.compile(transform.strip_composites(mod), target="llvm")
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    while not hasattr(out, "numpy"):
        out = out[0]
    return out.numpy()


def _composites(mod):
    return {str(f.attrs["flexiq.layer"]): f for gv, f in mod.functions.items()
            if isinstance(f, relax.Function) and f.attrs is not None and "Composite" in f.attrs}


def test_passes_are_noops_without_plan_layers():
    model, calib = _model_and_data(Residual, (3, 8, 8))
    plan = quantize(model, calib, CFG, progress=False)
    before = transform.prepare()(NoConv)
    after = transform.ReorderChannelBlocks(plan)(transform.AnnotateChannelPrecision(plan)(before))
    tvm.ir.assert_structural_equal(after, before)


def test_annotate_wraps_every_plan_layer_in_a_composite():
    model, calib = _model_and_data(Residual, (3, 8, 8))
    plan, mod = _annotated(model, calib)
    comps = _composites(mod)
    assert sorted(comps) == sorted(lp.name for lp in plan.layers)
    assert str(comps["c1"].attrs["Composite"]) == "flexiq.conv2d"
    assert str(comps["fc"].attrs["Composite"]) == "flexiq.linear"
    assert list(comps["c1"].attrs["flexiq.in_perm"]) == list(range(8))
    # the composite holds exactly the original op (Expected written out)
    x = relax.Var("x", relax.TensorType((1, 8, 8, 8), "float32"))
    w = relax.Var("w", relax.TensorType((8, 8, 3, 3), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("flexiq_conv2d_1", [x, w], attrs=dict(comps["c1"].attrs), private=True):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.conv2d(x, w, padding=(1, 1, 1, 1),
                                                    out_dtype="float32"))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(comps["c1"], bb.get()["flexiq_conv2d_1"])


@pytest.mark.parametrize("cls,shape", [(Residual, (3, 8, 8)), (Concat, (3, 8, 8)),
                                       (Depthwise, (3, 8, 8)), (Attention, (6, 12))])
def test_reorder_keeps_fp32_outputs_and_makes_low_blocks_prefixes(cls, shape):
    model, calib = _model_and_data(cls, shape)
    plan, mod = _annotated(model, calib)
    reordered = transform.ReorderChannelBlocks(plan)(mod)
    x = calib[:1]
    np.testing.assert_allclose(_run_fp32(reordered, x), _run_fp32(mod, x), atol=2e-5)
    for name, f in _composites(reordered).items():
        lp = plan.layer(name)
        if lp.groups == 1:
            assert satisfies(np.asarray([int(i) for i in f.attrs["flexiq.in_perm"]]), lp), name


def test_reorder_residual_space_is_shared_and_gathers_the_rest():
    model, calib = _model_and_data(Residual, (3, 8, 8))
    plan, mod = _annotated(model, calib)
    comps = _composites(transform.ReorderChannelBlocks(plan)(mod))
    # c1 and c2 read the same residual space: at most one of them needs a gather, and the
    # producers c0 / c1 write that space in one order
    gathers = [n for n in ("c1", "c2") if bool(comps[n].attrs["flexiq.gather"])]
    assert len(gathers) <= 1
    assert list(comps["c0"].attrs["flexiq.out_perm"]) == list(comps["c1"].attrs["flexiq.out_perm"])


def test_reorder_pins_concat_inputs():
    model, calib = _model_and_data(Concat, (3, 8, 8))
    plan, mod = _annotated(model, calib)
    comps = _composites(transform.ReorderChannelBlocks(plan)(mod))
    # a concat along channels pins its producers to the original order: c gets a gather
    assert list(comps["a"].attrs["flexiq.out_perm"]) == list(range(6))
    assert bool(comps["c"].attrs["flexiq.gather"]) == (not satisfies(np.arange(12),
                                                                     plan.layer("c")))


def test_desired_order_is_nested_and_grouped_by_shift():
    model, calib = _model_and_data(Residual, (3, 8, 8))
    plan = quantize(model, calib, CFG, progress=False)
    for lp in plan.layers:
        order = desired_order(lp)
        assert sorted(order.tolist()) == list(range(lp.in_channels))
        assert satisfies(order, lp)


@pytest.mark.parametrize("cls,shape", [(Residual, (3, 8, 8)), (Depthwise, (3, 8, 8)),
                                       (Attention, (6, 12)), (Concat, (3, 8, 8))])
def test_compiled_layers_are_bit_exact_with_the_oracle(cls, shape):
    import flexiq_tvm

    model, calib = _model_and_data(cls, shape)
    plan = quantize(model, calib, CFG, progress=False)
    cm = flexiq_tvm.compile(model, calib[:1], plan=plan, expose_layers=True)
    assert len(cm.layers) == len(plan.layers)
    for r in cm.ratios:
        for i in range(3):
            assert flexiq_tvm.api.oracle_mismatches(cm, calib[i : i + 1], r) == []


def test_weights_pack_two_nibbles_per_byte_in_the_kernel_order():
    from flexiq_tvm.schedules.llvm.mixed import LowLayout, pack_w8

    from flexiq_tvm.transform.quantize_mixed_precision import pack_int4_flat

    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, size=(2, 6, 32))  # 2 taps, 6 channels, 32 outputs
    low = LowLayout(np.array([1, 1, 1, 2, 2, 2]), 6, taps=2)
    packed = low.pack(codes, 32)
    assert packed.shape == (2 * low.slots // 4, 2, 32) and packed.dtype == np.uint8
    e = np.concatenate([((packed & 15).astype(np.int32) ^ 8) - 8,
                        ((packed >> 4).astype(np.int32) ^ 8) - 8], 2)  # [tap*quad, block, 64]
    for tq, ob, j in np.ndindex(e.shape):
        ch = low.slot_chan[4 * (tq % (low.slots // 4)) + j % 4]
        want = 0 if ch < 0 else codes[tq // (low.slots // 4), ch, 16 * ob + j // 4]
        assert e[tq, ob, j] == want
    pairs = pack_w8(codes[0, :4], "avx2")  # vpmaddwd: row pairs interleaved per output
    assert pairs.shape == (2, 64) and pairs[1, 2 * 5 + 1] == codes[0, 3, 5]
    quads = pack_w8(codes[0, :4], "avx512vnni")  # vpdpbusd: row quads
    assert quads.shape == (1, 128) and quads[0, 4 * 5 + 3] == codes[0, 3, 5]
    flat = pack_int4_flat(np.array([-8, 7, 3]))
    assert flat.tolist() == [0x78, 0x03]


def test_graph_helpers_find_dataflow_bindings():
    assert [g.op_name(b.value) for b in g.bindings(NoConv["main"])] == ["relax.nn.relu",
                                                                        "relax.add"]
