"""Distillation on augmented photos (EfficientNet-Lite0's finetune): the fused input quantizer
has the unfused straight-through gradient, a student started from a plan's codes is that plan,
the augmenter is seeded, and a compact checkpoint (weights in the plan) loads back exactly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from flexiq_tvm import finetune as ft
from flexiq_tvm.fakequant import FakeQuantModel, predict
from flexiq_tvm.plan import codes_digest
from flexiq_tvm.zoo import data

NAME = "resnet20_fmnist"


@pytest.fixture(scope="module")
def model_plan(static_plan):
    return static_plan(NAME)


def test_fused_quantizer_has_the_unfused_straight_through_gradient(model_plan):
    _, plan = model_plan
    lp = plan.layers[3]
    layer_mask = lp.low_mask(0.5)
    x = (torch.randn(2, lp.in_channels, 5, 5) * 3 * float(lp.act_scale) * 127).requires_grad_()
    terms = ft.extraction_terms(lp, layer_mask, (1, lp.in_channels, 1, 1), torch.float32)
    inv = torch.tensor(float(lp.act_inv_scale))
    lo, hi = ft.ref.act_range(lp.act_signed)
    fused = ft._ActFakeQuant.apply(x, inv, lo, hi, terms)
    g = torch.randn_like(fused)
    (gx,) = torch.autograd.grad((fused * g).sum(), x)
    # the unfused expression of QATLayer's learned-scale path, at the calibrated scale
    pa, ha = ft._shift_tensors(lp.act_shift, (1, lp.in_channels, 1, 1))
    lo4, hi4 = ft.ref.act_range(lp.act_signed, 4)
    q = torch.clamp(ft._round_half_up(x * inv), lo, hi)
    low = torch.from_numpy(layer_mask).reshape(1, -1, 1, 1)
    unfused = torch.where(low, ft._lower(q, pa, ha, lo4, hi4), q)
    (ux,) = torch.autograd.grad((unfused * g).sum(), x)
    assert torch.equal(fused, unfused)
    assert torch.equal(gx, ux)
    assert 0 < int((gx == 0).sum()) < gx.numel()  # some inputs clamp, most do not


def test_student_from_codes_is_the_plan_even_when_codes_are_not_rounded_weights(model_plan):
    model, plan = model_plan
    plan = copy.deepcopy(plan)
    lp = plan.layers[2]
    codes = lp.w_codes.astype(np.int32)
    codes[..., 0] = np.clip(codes[..., 0] + 1, -127, 127)  # not round(w / s) any more
    # as the reconstruction leaves it: the digest of the FP32 weights' nearest codes
    lp.weight_digest = codes_digest(lp.w_codes)
    lp.w_codes = codes.astype(np.int8)
    x, _ = data.load_fmnist("test", 16)
    fq = FakeQuantModel(model, plan)
    student = ft.QATModel(model, plan, from_codes=True)
    for r in plan.ratios:
        fq.set_ratio(r)
        student.set_ratio(r)
        with torch.no_grad():
            assert np.array_equal(student(torch.from_numpy(x)).numpy(), predict(fq, x)), r
    net, exported = student.export()
    assert all(np.array_equal(a.w_codes, b.w_codes) and np.array_equal(a.w_scale, b.w_scale)
               for a, b in zip(plan.layers, exported.layers, strict=True))
    # the compiler finds every exported layer by the exported model's weights
    assert all(b.matches(net.get_submodule(b.name).weight.detach().numpy())
               for b in exported.layers)


def test_augmenter_is_seeded_and_normalized():
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
              for _ in range(3)]
    a = ft.PhotoAugmenter(photos, seed=5).batch(4)
    b = ft.PhotoAugmenter(photos, seed=5).batch(4)
    c = ft.PhotoAugmenter(photos, seed=6).batch(4)
    assert a.shape == (4, 3, 224, 224) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= -127 / 128 and a.max() <= 1.0


def test_compact_checkpoint_round_trip(model_plan, tmp_path, monkeypatch):
    model, plan = model_plan
    monkeypatch.setattr(ft, "FINETUNED_DIR", tmp_path)
    monkeypatch.setattr(ft, "FINETUNED_MANIFEST", tmp_path / "manifest.json")
    net, exported = ft.QATModel(model, plan, from_codes=True).export()
    entry = ft.save_checkpoint(NAME, net, exported, {"note": "test"}, weights_in_plan=True)
    state = torch.load(tmp_path / f"{NAME}.pt", weights_only=True)
    assert not any(f"{lp.name}.weight" in state for lp in plan.layers)
    assert entry["weights_in_plan"] and entry["size_bytes"] > 0
    loaded, lplan = ft.load_finetuned(NAME)
    for lp in lplan.layers:
        w = loaded.get_submodule(lp.name).weight.detach().numpy()
        assert np.array_equal(ft.ref.quantize_weight(w, lp.w_scale), lp.w_codes)
    x, _ = data.load_fmnist("test", 8)
    a, b = FakeQuantModel(net, exported), FakeQuantModel(loaded, lplan)
    a.set_ratio(0.5)
    b.set_ratio(0.5)
    assert np.array_equal(predict(a, x), predict(b, x))


LITE0 = "efficientnet_lite0_imagenet"


def _lite0_finetuned():
    if LITE0 not in ft.read_manifest():
        pytest.skip(f"no committed finetuned {LITE0}")
    return ft.load_finetuned(LITE0)


@pytest.mark.slow
def test_committed_lite0_reproduces_its_agreement_on_every_held_out_view():
    """The committed distilled Lite0 gives back, view for view, the agreement with FP32 that
    its manifest records at every ratio (about 10 min: 1360 views x 5 ratios in fake-quant)."""
    from flexiq_tvm.eval import load_eval_data
    from flexiq_tvm.zoo import registry

    model, plan = _lite0_finetuned()
    entry = ft.read_manifest()[LITE0]
    _, x, _ = load_eval_data(LITE0, None)
    assert len(x) == entry["n_test_images"] > 1000
    fp32 = predict(registry.get_model(LITE0), x, 50).argmax(1)
    fq = FakeQuantModel(model, plan)
    got = {}
    for r in plan.ratios:
        fq.set_ratio(r)
        got[f"{r:g}"] = float((predict(fq, x, 50).argmax(1) == fp32).mean())
    assert got == {f"{float(k):g}": v for k, v in entry["agreement"].items()}

