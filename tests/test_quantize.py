"""Calibration, plans, fake-quant == oracle per layer kind, nesting, determinism."""

import numpy as np
import pytest
import torch
from torch import nn

from flexiq_tvm import reference as ref
from flexiq_tvm.config import FlexiQConfig, parse_ratios
from flexiq_tvm.fakequant import FakeQuantModel
from flexiq_tvm.plan import QuantPlan
from flexiq_tvm.quantize import quantize


class TinyNet(nn.Module):
    """Every covered layer kind: 3x3 conv, depthwise, grouped, strided 1x1, token linears."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, 1, 1)
        self.dw = nn.Conv2d(12, 12, 3, 2, 1, groups=12, bias=False)
        self.grouped = nn.Conv2d(12, 18, 3, 1, 2, dilation=2, groups=3)
        self.pw = nn.Conv2d(18, 20, 1, 2)
        self.norm = nn.LayerNorm(20)
        self.fc1 = nn.Linear(20, 37)
        self.fc2 = nn.Linear(37, 20)
        self.head = nn.Linear(20, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.nn.functional.relu6(self.dw(x))
        x = self.grouped(x)  # signed input of pw
        x = self.pw(x).flatten(2).transpose(1, 2)  # (B, tokens, 20)
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyNet().eval()
    calib = np.random.default_rng(0).standard_normal((48, 3, 12, 12)).astype(np.float32)
    return model, calib


@pytest.mark.parametrize("selection", ["static", "random", "greedy", "evolutionary",
                                       "static+reconstruct"])
def test_fakequant_equals_oracle_on_integer_tensors(tiny, selection):
    model, calib = tiny
    selection, _, rec = selection.partition("+")
    cfg = FlexiQConfig(selection=selection, calib_images=48, search_images=16,
                       population=4, generations=2, reconstruct=bool(rec))
    plan = quantize(model, calib, cfg, "tiny", progress=False)
    assert [lp.name for lp in plan.layers] == ["stem", "dw", "grouped", "pw", "fc1", "fc2",
                                               "head"]
    assert {lp.kind for lp in plan.layers} == {"conv2d", "linear"}
    assert plan.layer("dw").depthwise and plan.layer("grouped").groups == 3
    assert not plan.layer("stem").eligible and not plan.layer("head").eligible
    fq = FakeQuantModel(model, plan, dtype=torch.float64)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 3, 12, 12)).astype(
        np.float32))
    for r in plan.ratios:
        fq.set_ratio(r)
        inputs = {}
        hooks = [fq.layers[n].register_forward_hook(
            lambda m, i, o, n=n: inputs.__setitem__(n, i[0].detach())) for n in fq.layers]
        with torch.no_grad():
            fq(x)
        for h in hooks:
            h.remove()
        for lp in plan.layers:
            xin = inputs[lp.name]
            acc, y = ref.layer_forward(xin.numpy(), lp, lp.low_mask(r))
            with torch.no_grad():
                got_acc = fq.layers[lp.name].accumulate(xin).numpy()
                got_y = fq.layers[lp.name](xin).numpy()
            np.testing.assert_array_equal(got_acc, acc.astype(np.float64), err_msg=lp.name)
            np.testing.assert_allclose(got_y, y, rtol=1e-6, atol=1e-6, err_msg=lp.name)


def test_plan_nesting_mac_ratio_and_roundtrip(tiny, tmp_path):
    model, calib = tiny
    plan = quantize(model, calib, FlexiQConfig(selection="greedy", search_images=16), "tiny",
                    progress=False)
    plan.check_nested()
    prev = None
    for r in plan.ratios:
        masks = {lp.name: lp.low_mask(r) for lp in plan.layers}
        if prev is not None:
            assert all((prev[n] <= masks[n]).all() for n in masks)  # nested
        prev = masks
        # ratio counts eligible MACs: reached, overshooting by less than one channel's MACs
        f = plan.mac_fraction(r)
        assert f >= r - 1e-9
        max_chan = max(lp.macs_per_channel for lp in plan.layers if lp.eligible)
        total = sum(lp.in_channels * lp.macs_per_channel for lp in plan.layers if lp.eligible)
        assert f - r <= max_chan / total + 1e-9
    assert plan.mac_fraction(1.0) == 1.0 and plan.channel_fraction(1.0) == 1.0
    assert plan.mac_fraction(0.0) == 0.0
    path = plan.save(tmp_path / "p.npz")
    back = QuantPlan.load(path)
    for a, b in zip(plan.layers, back.layers):
        assert a.name == b.name and a.n_low == b.n_low and a.act_scale == b.act_scale
        np.testing.assert_array_equal(a.w_codes, b.w_codes)
        np.testing.assert_array_equal(a.order, b.order)
    assert back.metrics == plan.metrics
    with pytest.raises(ValueError, match=r"ratio 0\.3 is not in the plan"):
        back.check_ratio(0.3)


def test_selection_is_deterministic_under_seed(tiny):
    model, calib = tiny
    cfg = dict(selection="evolutionary", search_images=16, population=4, generations=3)
    a = quantize(model, calib, FlexiQConfig(**cfg, seed=1), progress=False)
    b = quantize(model, calib, FlexiQConfig(**cfg, seed=1), progress=False)
    for la, lb in zip(a.layers, b.layers):
        assert la.n_low == lb.n_low
        np.testing.assert_array_equal(la.order, lb.order)
    c = quantize(model, calib, FlexiQConfig(selection="random", seed=2), progress=False)
    d = quantize(model, calib, FlexiQConfig(selection="random", seed=3), progress=False)
    assert any((lc.order != ld.order).any() for lc, ld in zip(c.layers, d.layers))


def test_options_keep_layers_8bit(tiny):
    model, calib = tiny
    plan = quantize(model, calib, FlexiQConfig(selection="static", keep_first_8bit=False,
                                               keep_last_8bit=False, depthwise_low=False),
                    progress=False)
    assert plan.layer("stem").eligible and plan.layer("head").eligible
    dw = plan.layer("dw")
    assert not dw.eligible and "depthwise" in dw.reason and dw.n_low["1"] == 0


def test_naive_extraction_uses_shift_four(tiny):
    model, calib = tiny
    plan = quantize(model, calib, FlexiQConfig(selection="static", extraction="naive"),
                    progress=False)
    assert all((lp.act_shift == 4).all() and (lp.w_shift == 4).all() for lp in plan.layers)
    eff = quantize(model, calib, FlexiQConfig(selection="static"), progress=False)
    assert any((lp.act_shift < 4).any() for lp in eff.layers)


def test_config_validation():
    with pytest.raises(ValueError, match="strictly ascending"):
        FlexiQConfig(ratios=(0.5, 0.25))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        FlexiQConfig(ratios=(0, 1.5))
    with pytest.raises(ValueError, match="selection='best'"):
        FlexiQConfig(selection="best")
    with pytest.raises(ValueError, match="calib_images=0"):
        FlexiQConfig(calib_images=0)
    with pytest.raises(TypeError, match="reconstruct='yes'"):
        FlexiQConfig(reconstruct="yes")
    with pytest.raises(ValueError, match="reconstruct_alpha=-1"):
        FlexiQConfig(reconstruct_alpha=-1)
    with pytest.raises(TypeError, match="reconstruct_alpha='big'"):
        FlexiQConfig(reconstruct_alpha="big")
    assert parse_ratios("0, .5,1") == (0.0, 0.5, 1.0)
    with pytest.raises(ValueError, match="ratio 'x' is not a number"):
        parse_ratios("0,x")


class SamePadConv(nn.Conv2d):
    """TensorFlow-style asymmetric 'same' padding applied in forward (as in EfficientNet)."""

    def forward(self, x):
        return super().forward(torch.nn.functional.pad(x, (0, 1, 0, 1)))


class PadNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = SamePadConv(4, 6, 2, stride=2)
        self.c = nn.Conv2d(6, 6, 4, padding="same", bias=False)
        self.d = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def test_padding_applied_inside_forward_is_captured():
    torch.manual_seed(0)
    model = PadNet().eval()
    calib = np.random.default_rng(0).standard_normal((16, 2, 9, 9)).astype(np.float32)
    plan = quantize(model, calib, FlexiQConfig(selection="static", keep_first_8bit=False),
                    progress=False)
    assert plan.layer("a").padding == (1, 1, 1, 1)
    assert plan.layer("b").padding == (0, 1, 0, 1)
    assert plan.layer("c").padding == (1, 2, 1, 2)  # torch 'same' pads the extra at the end
    fq = FakeQuantModel(model, plan, dtype=torch.float64)
    x = torch.from_numpy(calib[:4])
    with torch.no_grad():
        y_fp32 = model(x).numpy()
        y_int8 = fq(x).numpy()
    assert np.abs(y_int8 - y_fp32).max() < 0.05 * np.abs(y_fp32).max()
    fq.set_ratio(1.0)
    got = {}
    hook = fq.layers["b"].register_forward_pre_hook(lambda m, i: got.update(x=i[0]))
    with torch.no_grad():
        fq(x)
    hook.remove()
    lp = plan.layer("b")
    acc, _ = ref.layer_forward(got["x"].numpy(), lp, lp.low_mask(1.0))
    with torch.no_grad():
        np.testing.assert_array_equal(fq.layers["b"].accumulate(got["x"]).numpy(), acc)


def test_unsupported_conv_is_kept_fp32_and_reported():
    model = PadNet().eval()
    model.c.padding_mode = "reflect"
    calib = np.random.default_rng(0).standard_normal((8, 2, 9, 9)).astype(np.float32)
    plan = quantize(model, calib, FlexiQConfig(selection="static"), progress=False)
    assert [lp.name for lp in plan.layers] == ["a", "b", "d"]
    assert plan.metrics["kept_fp32"] == {"c": "padding_mode='reflect'"}


class InplaceNet(nn.Module):
    """Convs whose outputs later ops change in place (ReLU(inplace=True), ``+=``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, 1, 1)
        self.b = nn.Conv2d(8, 8, 3, 1, 1)
        self.c = nn.Conv2d(8, 6, 1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.act(self.a(x))
        y = self.act(self.b(x))
        y += x
        return self.head(self.act(self.c(y)).mean((2, 3)))


def test_memoized_search_forward_is_exact_and_reuses_the_prefix():
    torch.manual_seed(0)
    model = InplaceNet().eval()
    calib = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    cfg = FlexiQConfig(selection="static", calib_images=16, keep_first_8bit=False,
                       keep_last_8bit=False)
    plan = quantize(model, calib, cfg, "inplace", progress=False)
    fq = FakeQuantModel(model, plan)
    x = torch.from_numpy(calib[:5])
    rng = np.random.default_rng(3)

    def rand(names):
        return {lp.name: rng.random(lp.in_channels) < 0.5 for lp in plan.layers
                if lp.name in names}

    # the INT8 base; then only the last layers change (the prefix is reused); a repeat; a
    # change at the first layer (nothing reused); the base again
    cands = [{}, rand({"c"}), rand({"c", "head"}), None, rand({"a", "b", "c", "head"}), {}]
    cands[3] = cands[1]
    with torch.no_grad():
        plain = []
        for sets in cands:
            fq.set_masks(sets)
            plain.append(fq(x).clone())
        fq.memoize(x, size=2)
        for i, sets in enumerate(cands):
            fq.set_masks(sets)
            assert torch.equal(fq(x, pin=i == 0), plain[i]), i
        memo = fq._memo
        # layers run per candidate: 4, 2 and 2 (a, b from the pinned base), 0, 4, 0
        assert (memo.misses, memo.hits) == (12, 12)
        other = x + 1  # another tensor runs as usual, without the memo
        fq.set_masks({})
        assert memo.misses == 12 and not torch.equal(fq(other), plain[0])
        fq.memoize(None)
    assert all(layer.memo is None for layer in fq.layers.values())


def test_kl_search_metric_measures_the_fp32_model():
    from flexiq_tvm.quantize import search_distance

    torch.manual_seed(0)
    model = InplaceNet().eval()
    calib = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    cfg = FlexiQConfig(selection="static", calib_images=16, keep_first_8bit=False)
    plan = quantize(model, calib, cfg, "inplace", progress=False)
    fq = FakeQuantModel(model, plan)
    x = torch.from_numpy(calib[:7])
    with torch.no_grad():
        lp32 = torch.log_softmax(model(x).double(), 1)
        kl = search_distance(model, fq, x, "kl")
        mse = search_distance(model, fq, x, "mse")
        masks = {lp.name: lp.low_mask(1.0) for lp in plan.layers}
        for sets in ({}, masks):
            fq.set_masks(sets)
            lq = torch.log_softmax(fq(x).double(), 1)
            want = float((lp32.exp() * (lp32 - lq)).sum(1).mean())
            assert kl(sets) == pytest.approx(want, rel=1e-5, abs=1e-9)  # float32 sums
        assert mse({}) == 0.0 and mse(masks) > 0.0
        fq.memoize(None)
    with pytest.raises(ValueError, match="search_metric"):
        FlexiQConfig(search_metric="l1")
    greedy = quantize(model, calib, FlexiQConfig(selection="greedy", calib_images=16,
                                                 search_metric="kl"), "inplace",
                      progress=False)
    greedy.check_nested()
    assert greedy.config["search_metric"] == "kl"
