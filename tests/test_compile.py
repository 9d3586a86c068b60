"""flexiq_tvm.compile on the zoo: bit-exact with the oracle, predictions equal to fake-quant,
through both frontends; API errors."""

from __future__ import annotations

import numpy as np
import pytest

import flexiq_tvm
from flexiq_tvm import FlexiQConfig
from flexiq_tvm.api import oracle_mismatches
from flexiq_tvm.eval import load_eval_data
from flexiq_tvm.fakequant import FakeQuantModel, predict
from flexiq_tvm.zoo import data

FMNIST = ["resnet20_fmnist", "mobilenetv2_fmnist", "vit_fmnist", "swin_fmnist"]


@pytest.fixture(scope="module")
def plans(static_plan):
    return lambda name: static_plan(name, 64 if name in FMNIST else 16)


def _check_model(plans, name, via, n_images, min_agreement=1.0, agreement_ratios=None):
    model, plan = plans(name)
    _, xs, _ = load_eval_data(name, n_images)
    cm = flexiq_tvm.compile(model, xs[:1], plan=plan, via=via, expose_layers=True)
    assert cm.ratios == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert not [k for k in cm.report.kept_fp32 if "plan layer" in k["reason"]]
    fq = FakeQuantModel(model, plan)
    for r in cm.ratios:
        assert oracle_mismatches(cm, xs[:1], r) == [], (name, via, r)
        cm.set_ratio(r)
        fq.set_ratio(r)
        got = np.concatenate([cm(xs[i : i + 1]) for i in range(n_images)])
        want = predict(fq, xs)
        # every layer is bit-exact given its input; float rounding outside the covered layers
        # (BN, residual adds in another order) can flip a code, rarely a prediction
        if agreement_ratios is None or r in agreement_ratios:
            assert (got.argmax(1) == want.argmax(1)).mean() >= min_agreement, (name, via, r)


@pytest.mark.parametrize("via", ["torch.export", "onnx"])
def test_resnet20_bit_exact_and_equal_to_fakequant(plans, via):
    _check_model(plans, "resnet20_fmnist", via, 40)


# batch 3 of the fused module on every ISA runs by default in tests/test_fuse_requantize.py
@pytest.mark.parametrize("name,batch", [pytest.param("resnet20_fmnist", 3, marks=pytest.mark.slow),
                                        pytest.param("vit_fmnist", 2, marks=pytest.mark.slow)])
def test_batched_module_is_bit_exact(plans, name, batch):
    """A module compiled for a batch: the GEMM's register tiles run over the whole batch (a
    parallel task's tiles span images), and a linear layer's rows are tokens x images."""
    model, plan = plans(name)
    _, xs, _ = load_eval_data(name, batch)
    cm = flexiq_tvm.compile(model, xs[:batch], plan=plan, expose_layers=True,
                            config=FlexiQConfig(ratios=(0, 0.5, 1)))
    for r in cm.ratios:
        assert oracle_mismatches(cm, xs[:batch], r) == [], (name, r)
    one = flexiq_tvm.compile(model, xs[:1], plan=plan, config=FlexiQConfig(ratios=(0, 1)))
    # each image's logits as from the batch-1 module (same kernels' arithmetic per image)
    np.testing.assert_array_equal(cm(xs[:batch], ratio=1)[1], one(xs[1:2], ratio=1)[0])


def _other_isas():
    from flexiq_tvm import hostcpu

    best = hostcpu.best_isa()
    return [i for i in hostcpu.ISAS if i != best and hostcpu.isa_available(i)]


@pytest.mark.parametrize("isa", _other_isas())
def test_every_other_isa_this_cpu_runs_is_bit_exact(plans, isa):
    """The host's best ISA is what every other compile test runs; here the others (on a VNNI
    machine the AVX2 build, the stand-in for an AVX2-only CPU) on a batch of 3."""
    model, plan = plans("resnet20_fmnist")
    _, xs, _ = load_eval_data("resnet20_fmnist", 3)
    cm = flexiq_tvm.compile(model, xs[:3], plan=plan, expose_layers=True, isa=isa,
                            config=FlexiQConfig(ratios=(0, 0.5, 1)))
    assert cm.metadata["isa"] == isa and len(cm.layers) == len(plan.layers)
    for r in cm.ratios:
        assert oracle_mismatches(cm, xs[:3], r) == [], (isa, r)


@pytest.mark.slow
@pytest.mark.parametrize("via", ["torch.export", "onnx"])
@pytest.mark.parametrize("name", FMNIST[1:])
def test_zoo_bit_exact_and_equal_to_fakequant(plans, name, via):
    _check_model(plans, name, via, 100, min_agreement=0.98)


@pytest.mark.slow
@pytest.mark.parametrize("via", ["torch.export", "onnx"])
def test_efficientnet_lite0_bit_exact_and_equal_to_fakequant(plans, via):
    # bit-exact at every ratio; predictions compared where this quick static plan (16
    # calibration views) leaves the model meaningful: from ratio 0.5 on it agrees with FP32 on
    # almost no image, and near-tied logits of a broken model say nothing about the compiler
    _check_model(plans, "efficientnet_lite0_imagenet", via, 20, min_agreement=0.9,
                 agreement_ratios=(0.0, 0.25))


def test_api_errors(plans):
    model, plan = plans("resnet20_fmnist")
    xs, _ = data.load_fmnist("test", 2)
    cm = flexiq_tvm.compile(model, xs[:1], plan=plan, config=FlexiQConfig(ratios=(0, 0.5)))
    assert cm.ratios == (0.0, 0.5)
    with pytest.raises(ValueError, match=r"compiled ratios: \[0.0, 0.5\]"):
        cm.set_ratio(0.25)
    with pytest.raises(ValueError, match="compiled for"):
        cm(xs[:2])
    with pytest.raises(TypeError, match="float32"):
        cm(xs[:1].astype(np.float64))
    with pytest.raises(ValueError, match="target"):
        flexiq_tvm.compile(model, xs[:1], plan=plan, target="vulkan")
    with pytest.raises(ValueError, match="isa='sse': choose one of"):
        flexiq_tvm.compile(model, xs[:1], plan=plan, isa="sse")
    with pytest.raises(ValueError, match="plan"):
        flexiq_tvm.compile(b"not onnx", xs[:1])
    assert cm.report.weight_bytes["int8"] == sum(lp.w_codes.size for lp in plan.layers)


def _reconstructed(name: str, calib_images: int):
    from flexiq_tvm.eval import zoo_plan
    from flexiq_tvm.zoo import registry

    model = registry.get_model(name)
    cfg = FlexiQConfig(ratios=(0, 0.5, 1), selection="static", calib_images=calib_images,
                       reconstruct=True)
    return model, zoo_plan(name, model, cfg)


@pytest.mark.parametrize("name,n_calib", [
    ("resnet20_fmnist", 64),
    pytest.param("efficientnet_lite0_imagenet", 27, marks=pytest.mark.slow)])
def test_reconstructed_codes_are_bit_exact(name, n_calib):
    """Codes learned by the nested GPTQ (issue 22) go through the compiler unchanged: every
    covered layer bit-exact with the oracle at ratios 0, 0.5 and 1."""
    model, plan = _reconstructed(name, n_calib)
    assert "reconstruction_seconds" in plan.metrics
    _, xs, _ = load_eval_data(name, 2)
    assert all(lp.weight_digest for lp in plan.layers if lp.eligible)
    cm = flexiq_tvm.compile(model, xs[:1], plan=plan, expose_layers=True,
                            config=FlexiQConfig(ratios=(0, 0.5, 1)))
    assert cm.ratios == (0.0, 0.5, 1.0)
    # every plan layer found in the graph (by the digest of its nearest codes), none in FP32
    assert len(cm.layers) == len(plan.layers)
    assert not [k for k in cm.report.kept_fp32 if k.get("macs") or "plan layer" in k["reason"]]
    for r in cm.ratios:
        assert oracle_mismatches(cm, xs[1:2], r) == [], (name, r)
