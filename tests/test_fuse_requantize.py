"""FuseRequantize: the pass's structure (Before -> Expected kernels and operands), what it
leaves unfused and why, and bit-identity of fused modules with the unfused, oracle-exact ones
on odd shapes, at every ratio, on every ISA this CPU runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from flexiq_tvm.schedules.llvm import kernels
from torch import nn
from tvm import relax

import flexiq_tvm
from flexiq_tvm import FlexiQConfig, frontend, hostcpu, transform
from flexiq_tvm.api import oracle_mismatches
from flexiq_tvm.lowering import epilogue_fusion, lowering
from flexiq_tvm.quantize import quantize
from flexiq_tvm.transform.fuse_requantize import role


class OddNet(nn.Module):
    """Every fused pattern on channels that are no multiple of 4: conv+BN+ReLU, conv+BN+ReLU6
    into a depthwise conv, depthwise+BN+ReLU6 into a 1x1 conv, a residual add (its output
    read by two convs and a pooling), a linear head (unfused)."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.b0 = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.c1, self.b1 = nn.Conv2d(5, 7, 3, stride=2, padding=1), nn.BatchNorm2d(7)
        self.dw, self.b2 = nn.Conv2d(7, 7, 3, padding=1, groups=7), nn.BatchNorm2d(7)
        self.pw, self.b3 = nn.Conv2d(7, 13, 1), nn.BatchNorm2d(13)
        self.c4, self.b4 = nn.Conv2d(13, 13, 3, padding=1), nn.BatchNorm2d(13)
        self.a, self.b = nn.Conv2d(13, 11, 1), nn.Conv2d(13, 11, 3, padding=1)
        self.fc = nn.Linear(11 + 13, 6)

    def forward(self, x):
        h = torch.relu(self.b0(self.c0(x)))
        h = torch.clamp(self.b1(self.c1(h)), 0, 6)
        h = torch.clamp(self.b2(self.dw(h)), 0, 6)
        h = self.b3(self.pw(h))
        h = torch.relu(self.b4(self.c4(h)) + h)  # residual: h is read twice
        y = torch.relu(self.a(h) + self.b(h))  # two convs read the block output
        return self.fc(torch.cat([y.mean((2, 3)), h.mean((2, 3))], 1))


CFG = FlexiQConfig(selection="static", calib_images=32, keep_first_8bit=False,
                   keep_last_8bit=False, depthwise_low=True, ratios=(0, 0.25, 0.5, 0.75, 1))


@pytest.fixture(scope="module")
def oddnet():
    torch.manual_seed(0)
    model = OddNet().eval()
    for mod in model.modules():  # non-trivial batch norms
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    calib = np.random.default_rng(0).standard_normal((32, 3, 9, 11)).astype(np.float32)
    return model, calib, quantize(model, calib, CFG, progress=False)


def _lowered(model, calib, plan, batch, isa):
    mod = transform.prepare()(frontend.import_model(model, calib[:batch]).bound())
    mod = transform.ReorderChannelBlocks(plan)(transform.AnnotateChannelPrecision(plan)(mod))
    return lowering(plan, [0.0, 1.0], isa=isa)(mod)


def _calls(func):
    return [b.value for b in func.body.blocks[0].bindings
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)
            and b.value.op.name == "relax.call_tir"]


def test_pass_structure_before_and_expected(oddnet):
    """Before: quantize -> GEMM -> dequantize -> BN, ReLU. Expected: the GEMM writes its outputs
    channels-last and one requantize kernel (the generator's, for exactly the graph's steps in
    its order) makes the next layer's codes; nothing FP32 in between."""
    model, calib, plan = oddnet
    isa = hostcpu.best_isa()
    before = _lowered(model, calib, plan, 1, isa)
    fpass = epilogue_fusion(isa)
    after = fpass(before)
    k = kernels(isa)
    roles = [role(after, c)["role"] for c in _calls(after["main_r000"])
             if role(after, c) is not None]
    # c0 quantizes the model input; every other conv gets its codes fused; fc keeps its own
    assert roles.count("quantize_nhwc") == 1 and roles.count("quantize_rows") == 1
    assert "quantize_padded" not in roles
    assert roles.count("dequantize") == 3  # a and b (a pooling reads their sum), fc
    fused = {f["layer"]: f for f in fpass.fused}
    assert set(fused) == {"c1", "dw", "pw", "c4", "a", "b"}
    assert {u["layer"]: u["reason"] for u in fpass.fallbacks} == {
        "c0": "its input is the model's input (no covered producer)",
        "fc": "a linear layer (rows layout)"}
    # each consumer's steps are its producer's glue: conv bias, batch norm, activation
    bn = ["add", "subtract", "divide", "multiply", "add"]
    assert fused["c1"]["steps"] == [*bn, "maximum"]  # ReLU
    assert fused["dw"]["steps"] == fused["pw"]["steps"] == [*bn, "minimum", "maximum"]  # ReLU6
    assert fused["c4"]["steps"] == bn and fused["c4"]["writes_fp32"]  # the skip reads pw's
    assert fused["a"]["steps"] == fused["b"]["steps"] == [*bn, "add", "maximum"]  # residual
    assert not fused["dw"]["channels_last"]  # a depthwise consumer reads NCHW
    assert fused["c1"]["channels_last"] and fused["a"]["gather"] and fused["b"]["gather"]
    # the block output feeds a, b and a pooling: one of a / b writes it (NCHW: the pooling)
    assert fused["a"]["writes_fp32"] != fused["b"]["writes_fp32"]
    # Expected kernel of c1's input: c0's GEMM (channels-last) -> BN -> ReLU -> codes
    calls = _calls(after["main_r000"])
    req = next(c for c in calls if c.args[0].name_hint == "c1_requantize")
    gemm = next(c for c in calls if c.args[0].name_hint.startswith("c0_gemm"))
    assert role(after, gemm)["args"][-1] == "PO"
    ops = req.args[1].fields
    assert ops[0].same_as(next(b.var for b in after["main_r000"].body.blocks[0].bindings
                               if b.value.same_as(gemm)))
    qrec = role(before, next(c for c in _calls(before["main_r000"])
                             if c.args[0].name_hint == "c1_quantize"))
    _, c, _, w = qrec["args"][:4]
    expected = k["requantize_nhwc"](
        tuple(int(d) for d in ops[0].ty.shape), w,
        [(op, "cv", i, False) for i, op in enumerate([*bn, "maximum"])], 6, False, False,
        False, *qrec["args"], layout="PO")
    tvm.ir.assert_structural_equal(after[req.args[0]], expected)
    # its constants, one row per step: c0's bias and BN as the graph has them, ReLU's 0
    cv = ops[2].value.numpy()
    bias = model.c0.bias.detach().numpy()
    assert cv.shape == (6, c) and not cv[5].any()
    assert sorted(cv[0].tolist()) == sorted(bias.tolist())  # in the reordered channel order
    assert plan.layer("c0").weight_shape[0] == c


def _cases():
    """Batch 1 and 3 on the best ISA (what compile picks), batch 3 on every other one this CPU
    runs (on a VNNI machine the AVX2 build)."""
    best = hostcpu.best_isa()
    # the other ISAs are slow here (30 s each): tests/test_compile.py checks every one this
    # CPU runs bit-exact in the default suite
    return [(best, 1), (best, 3)] + [pytest.param(i, 3, marks=pytest.mark.slow)
                                     for i in hostcpu.ISAS
                                     if i != best and hostcpu.isa_available(i)]


@pytest.mark.parametrize("isa,batch", _cases())
def test_fused_module_is_bit_identical_to_the_oracle_exact_one(oddnet, isa, batch):
    """The unfused module is oracle-exact layer by layer; the fused one returns the same bits
    at every ratio (a code off by one anywhere would move the logits)."""
    model, calib, plan = oddnet
    x = calib[:batch]
    if batch > 1:  # the oracle's check of the unfused module (batch 1 adds nothing to it)
        exposed = flexiq_tvm.compile(model, x, plan=plan, config=CFG, isa=isa,
                                     expose_layers=True)
        for r in exposed.ratios:
            assert oracle_mismatches(exposed, x, r) == [], (isa, batch, r)
    fused = flexiq_tvm.compile(model, x, plan=plan, config=CFG, isa=isa)
    plain = flexiq_tvm.compile(model, x, plan=plan, config=CFG, isa=isa, fuse_epilogues=False)
    assert len(fused.report.fused) == 6 and not plain.report.fused
    assert fused.metadata["report"]["fused"] == fused.report.fused
    for xi in (calib[batch : 2 * batch], x):
        for r in fused.ratios:
            got, want = fused(xi, ratio=r), plain(xi, ratio=r)
            assert got.dtype == np.float32
            assert np.array_equal(got.view(np.int32), want.view(np.int32)), (isa, batch, r)
