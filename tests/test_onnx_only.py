"""A user's model from its ONNX file alone: six architectures built in torch with seeded
random weights, exported by both torch exporters (BatchNorm folded, a dynamic batch axis),
the torch module thrown away, and compiled from the .onnx file at ratios 0, 0.5 and 1.
Every conv and linear is covered, ratio 0 is close to onnxruntime FP32, and every covered
layer is bit-exact with the integer oracle at every ratio."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import flexiq_tvm
from flexiq_tvm import FlexiQConfig, frontend, onnx_torch
from flexiq_tvm.api import oracle_mismatches
from flexiq_tvm.usermodel import sqnr_db


def _bn(c):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():  # statistics a trained net could have, so that folding matters
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


def _cbr(i, o, k=3, s=1, g=1):
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), _bn(o), nn.ReLU())


class Bottleneck(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 32)
        self.reduce, self.mid = _cbr(32, 16, 1), _cbr(16, 16, 3)
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), _bn(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.expand(self.mid(self.reduce(x))))
        return self.head(x.mean((2, 3)))


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 16)
        self.l1, self.l2 = _cbr(16, 8), _cbr(24, 8)
        self.trans = _cbr(32, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        x = nn.functional.avg_pool2d(self.trans(x), 2)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Shuffle(nn.Module):
    def __init__(self, groups=4):
        super().__init__()
        self.g = groups
        self.stem = _cbr(3, 32)
        self.gc1 = _cbr(32, 32, 1, g=groups)
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False), _bn(32))
        self.gc2 = nn.Sequential(nn.Conv2d(32, 32, 1, groups=groups, bias=False), _bn(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.gc1(x)
        n, c, h, w = y.shape
        y = y.reshape(n, self.g, c // self.g, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = torch.relu(x + self.gc2(self.dw(y)))
        return self.head(x.mean((2, 3)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _cbr(3, 32)
        self.g1, self.g2 = _cbr(32, 64, 3, s=2, g=4), _cbr(64, 64, 3, g=8)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.g2(self.g1(self.stem(x))).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.body = _cbr(3, 32), _cbr(32, 32)
        self.fc1, self.fc2 = nn.Linear(32, 8), nn.Linear(8, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.body(self.stem(x))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3))))))
        x = x * s[:, :, None, None]
        return self.head(x.mean((2, 3)))


class Fire(nn.Module):
    """SqueezeNet's fire modules (1x1 squeeze, 1x1 and 3x3 expand, concatenated), max pooling
    and a Gemm head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1), nn.ReLU())
        self.sq1, self.e1a, self.e1b = _cbr(32, 8, 1), _cbr(8, 16, 1), _cbr(8, 16, 3)
        self.sq2, self.e2a, self.e2b = _cbr(32, 8, 1), _cbr(8, 16, 1), _cbr(8, 16, 3)
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.stem(x), 2)
        s = self.sq1(x)
        x = torch.cat([self.e1a(s), self.e1b(s)], 1)
        s = self.sq2(x)
        x = nn.functional.max_pool2d(torch.cat([self.e2a(s), self.e2b(s)], 1), 2)
        return self.head(torch.flatten(x, 1))


ARCHS = {"bottleneck": Bottleneck, "dense": Dense, "shuffle": Shuffle, "grouped": Grouped,
         "squeeze_excite": SqueezeExcite, "fire": Fire}


def _export(net, x, path, exporter: str = "torchscript"):
    """Plain ``torch.onnx.export`` with either exporter (TorchScript, or the dynamo-based
    default): eval mode folds BatchNorm into the convs; the batch axis is dynamic."""
    args = (torch.from_numpy(x[:1]),)
    if exporter == "dynamo":
        torch.onnx.export(net.eval(), args, str(path), dynamo=True, input_names=["image"],
                          output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        torch.onnx.export(net.eval(), args, str(path), dynamo=False, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}})
    return path


def _data(seed=0):
    g = np.random.default_rng(seed)
    return g.standard_normal((96, 3, 16, 16)).astype(np.float32)


# the dynamo exporter's files of five architectures run under `make test-slow` (about 30 s):
# the default run keeps the fire net (reshapes, concat, max pools, the Gemm head)
_FAST_DYNAMO = {"fire"}


@pytest.mark.parametrize("exporter,arch", [
    pytest.param(e, a, marks=[] if e == "torchscript" or a in _FAST_DYNAMO else pytest.mark.slow)
    for e in ("torchscript", "dynamo") for a in ARCHS])
def test_compiles_from_the_onnx_file_alone(arch, exporter, tmp_path):
    torch.manual_seed(0)
    x = _data()
    path = _export(ARCHS[arch](), x, tmp_path / f"{arch}.onnx", exporter)  # module gone
    proto = onnx.load(str(path))
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}  # folded
    weighted = [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    cfg = FlexiQConfig(selection="static", ratios=(0, 0.5, 1), calib_images=64)
    cm = flexiq_tvm.compile(str(path), x[:1], x[16:], config=cfg, expose_layers=True)
    assert len(cm.report.covered) == len(weighted), cm.report.summary()
    assert not [k for k in cm.report.kept_fp32 if k.get("weight_bytes")], cm.report.summary()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for r in (0.0, 0.5, 1.0):
        assert oracle_mismatches(cm, x[:1], r) == [], (arch, r)
    ref = sess.run(None, {"image": x[:8]})[0]
    y = np.concatenate([cm(x[i : i + 1], ratio=0.0) for i in range(8)])
    assert sqnr_db(ref, y) >= 25.0, sqnr_db(ref, y)
    assert cm.plan.mac_fraction(1.0) > 0.5 > cm.plan.mac_fraction(0.0) == 0.0


def test_the_calibration_model_runs_the_graph_as_onnxruntime_does(tmp_path):
    torch.manual_seed(1)
    x = _data(1)
    for arch, cls in ARCHS.items():
        path = _export(cls(), x, tmp_path / f"{arch}.onnx")
        m = onnx_torch.to_torch(onnx.load(str(path)))
        with torch.no_grad():
            y = m(torch.from_numpy(x[:4])).numpy()
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        ref = sess.run(None, {"image": x[:4]})[0]
        assert np.allclose(y, ref, rtol=1e-4, atol=1e-4), arch
        n_layers = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in
                       onnx.load(str(path)).graph.node)
        assert len(m.layers) == n_layers, arch


def test_bn_kept_as_batchnormalization_is_covered_alike(tmp_path):
    torch.manual_seed(2)
    x = _data(2)
    net = Bottleneck().eval()
    proto = frontend.export_onnx(net, x[:1])  # training=PRESERVE keeps BatchNormalization
    assert "BatchNormalization" in {n.op_type for n in proto.graph.node}
    del net
    cfg = FlexiQConfig(selection="static", ratios=(0, 1), calib_images=64)
    cm = flexiq_tvm.compile(proto, x[:1], x[16:], config=cfg, expose_layers=True)
    assert len(cm.report.covered) == 5
    for r in (0.0, 1.0):
        assert oracle_mismatches(cm, x[:1], r) == []


def test_custom_domains_and_unknown_ops_are_refused_by_name():
    node = onnx.helper.make_node("FusedThing", ["x"], ["y"], name="fuse0", domain="com.acme")
    graph = onnx.helper.make_graph(
        [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])])
    proto = onnx.helper.make_model(graph)
    with pytest.raises(onnx_torch.UnsupportedONNX, match=r"fuse0.*custom domain 'com.acme'"):
        onnx_torch.to_torch(proto)
    node = onnx.helper.make_node("NonMaxSuppression", ["x"], ["y"], name="nms")
    graph.node[0].CopyFrom(node)
    with pytest.raises(onnx_torch.UnsupportedONNX, match=r"nms.*NonMaxSuppression"):
        onnx_torch.to_torch(onnx.helper.make_model(graph))


@pytest.mark.parametrize("calib,msg", [
    (np.zeros((64, 3, 8, 8), np.float32), r"shape \(64, 3, 8, 8\); expected \(N, 3, 16, 16\)"),
    (np.zeros((4, 3, 16, 16), np.float32), "4 calibration samples; at least 8"),
    (np.full((16, 3, 16, 16), np.nan, np.float32), "NaN or infinity"),
    ([["a"]], "must be an array of numbers"),
])
def test_bad_calibration_data_gets_one_clear_error(tmp_path, calib, msg):
    x = _data()
    path = _export(Grouped(), x, tmp_path / "g.onnx")
    with pytest.raises(ValueError, match=msg):
        flexiq_tvm.compile(str(path), x[:1], calib, config=FlexiQConfig(ratios=(0, 1)))


def test_compiles_from_a_saved_torch_export_program_alone(tmp_path):
    torch.manual_seed(3)
    x = _data(3)
    net = Fire().eval()
    path = tmp_path / "fire.pt2"
    torch.export.save(torch.export.export(net, (torch.from_numpy(x[:1]),)), str(path))
    del net
    program = torch.export.load(str(path)).module()
    cfg = FlexiQConfig(selection="static", ratios=(0, 0.5, 1), calib_images=64)
    cm = flexiq_tvm.compile(str(path), x[:1], x[16:], config=cfg, expose_layers=True)
    assert len(cm.report.covered) == 8, cm.report.summary()  # 7 convs and the head
    assert not [k for k in cm.report.kept_fp32 if k.get("weight_bytes")]
    for r in (0.0, 0.5, 1.0):
        assert oracle_mismatches(cm, x[:1], r) == [], r
    with torch.no_grad():
        ref = np.concatenate([program(torch.from_numpy(x[i : i + 1])).numpy()
                              for i in range(8)])
    y = np.concatenate([cm(x[i : i + 1], ratio=0.0) for i in range(8)])
    assert sqnr_db(ref, y) >= 25.0, sqnr_db(ref, y)


def test_a_plan_that_does_not_fit_the_graph_is_a_warning_naming_the_layers(tmp_path, caplog):
    """The old trap: a plan computed on the torch module, an ONNX file exported with BatchNorm
    folded into the convs (other weights). The compile still works, and says so loudly."""
    import logging

    torch.manual_seed(4)
    x = _data(4)
    net = Bottleneck().eval()
    cfg = FlexiQConfig(selection="static", ratios=(0, 1), calib_images=32)
    plan = flexiq_tvm.quantize(net, x[:32], cfg, progress=False)
    path = _export(net, x, tmp_path / "folded.onnx")
    caplog.set_level(logging.WARNING, logger="flexiq_tvm.api")
    cm = flexiq_tvm.compile(str(path), x[:1], plan=plan, config=cfg)
    warned = [r.getMessage() for r in caplog.records if "stay in FP32" in r.getMessage()]
    assert len(warned) == 1 and "relax.nn.conv2d" in warned[0], warned
    assert [c["kind"] for c in cm.report.covered] == ["linear"]  # only the head fits


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(_cbr(3, 16), _cbr(16, 16))
        self.cls, self.box = nn.Linear(16, 10), nn.Linear(16, 4)

    def forward(self, x):
        f = self.body(x).mean((2, 3))
        return self.cls(f), self.box(f)


def test_a_graph_with_several_outputs_returns_them_all(tmp_path):
    from flexiq_tvm.runtime.policy import StaticPolicy
    from flexiq_tvm.runtime.server import InferenceServer

    torch.manual_seed(5)
    x = _data(5)
    path = tmp_path / "two.onnx"
    torch.onnx.export(TwoHeads().eval(), (torch.from_numpy(x[:1]),), str(path), dynamo=False,
                      input_names=["image"], output_names=["cls", "box"])
    cfg = FlexiQConfig(selection="greedy", ratios=(0, 1), calib_images=64)
    cm = flexiq_tvm.compile(str(path), x[:1], x[16:], config=cfg, expose_layers=True)
    assert cm.num_outputs == 2 and len(cm.report.covered) == 4
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"image": x[:1]})
    got = cm(x[:1], ratio=0.0)
    assert [g.shape for g in got] == [(1, 10), (1, 4)]
    assert all(sqnr_db(r, g) >= 25.0 for r, g in zip(ref, got, strict=True))
    for r in (0.0, 1.0):
        assert oracle_mismatches(cm, x[:1], r) == []
    with pytest.raises(ValueError, match="this module has 2 outputs"):
        InferenceServer(cm, StaticPolicy(0.0))
