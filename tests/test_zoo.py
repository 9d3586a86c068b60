import shutil

import numpy as np
import pytest
import torch

from flexiq_tvm.zoo import registry
from flexiq_tvm.zoo.train import evaluate_torch

TRAINED = [n for n, s in registry.MODELS.items() if s.trained_here]


def test_manifest_matches_committed_checkpoints():
    manifest = registry.read_manifest()
    assert sorted(manifest) == sorted(TRAINED)
    for name in TRAINED:
        path = registry.checkpoint_path(name)
        entry = manifest[name]
        assert path.stat().st_size <= 5 * 2**20, f"{name} checkpoint over 5 MB"
        assert registry.sha256_file(path) == entry["sha256"]
        assert entry["command"].startswith(f"flexiq-tvm train --model {name}")
        assert entry["n_test_images"] == 10000


@pytest.mark.parametrize("name", TRAINED)
def test_trained_model_meets_accuracy_bar_on_full_test_set(name, fmnist_test):
    x, y = fmnist_test
    spec = registry.spec(name)
    acc = evaluate_torch(registry.get_model(name), x, y)
    assert acc >= spec.min_top1
    # the manifest records the same evaluation
    assert acc == pytest.approx(registry.read_manifest()[name]["top1"], abs=1e-4)


def test_efficientnet_lite0_is_pretrained_and_recognizes_labelled_photos(capfd):
    from flexiq_tvm.zoo import data

    model = registry.get_model("efficientnet_lite0_imagenet")
    assert capfd.readouterr().out == ""  # the library's "Loaded pretrained weights" line
    photos = [p for p in data.natural_photos() if p.label >= 0]
    from PIL import Image

    x = np.stack([data.preprocess_imagenet(Image.open(p.path)) for p in photos])
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    hits = int((pred == np.array([p.label for p in photos])).sum())
    assert hits >= 17  # DATA.md: Lite0 gets 18/20 of the foolbox samples


def test_corrupted_checkpoint_is_refused(tmp_path, monkeypatch):
    name = "resnet20_fmnist"
    shutil.copy(registry.MANIFEST, tmp_path / "manifest.json")
    raw = bytearray(registry.checkpoint_path(name).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / f"{name}.pt").write_bytes(bytes(raw))
    monkeypatch.setattr(registry, "CHECKPOINT_DIR", tmp_path)
    monkeypatch.setattr(registry, "MANIFEST", tmp_path / "manifest.json")
    with pytest.raises(ValueError, match="corrupted or was replaced"):
        registry.get_model(name)


def test_unknown_model_lists_the_zoo():
    with pytest.raises(ValueError, match="available: resnet20_fmnist"):
        registry.get_model("resnet50")


@pytest.mark.parametrize("name", TRAINED)
def test_fresh_models_have_expected_layer_kinds(name):
    model = registry.get_model(name, pretrained=False)
    kinds = {type(m).__name__ for m in model.modules()}
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    expect = {
        "resnet20_fmnist": {"BatchNorm2d", "BasicBlock"},
        "mobilenetv2_fmnist": {"ReLU6", "InvertedResidual"},
        "vit_fmnist": {"LayerNorm", "Attention", "Mlp"},
        "swin_fmnist": {"SwinBlock", "PatchMerging", "LayerNorm"},
    }[name]
    assert expect <= kinds
    if name == "mobilenetv2_fmnist":
        assert any(c.groups == c.in_channels > 1 for c in convs)  # depthwise
    if name == "swin_fmnist":
        assert any(b.shift > 0 for b in model.modules() if type(b).__name__ == "SwinBlock")


@pytest.mark.slow  # 40 s: two short trainings
def test_training_is_seeded_and_reproducible():
    from flexiq_tvm.zoo.train import train

    a = train("vit_fmnist", seed=5, epochs=1, limit=256, save=False)
    b = train("vit_fmnist", seed=5, epochs=1, limit=256, save=False)
    c = train("vit_fmnist", seed=6, epochs=1, limit=256, save=False)
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["top1"] == b["top1"]
    assert c["weights_sha256"] != a["weights_sha256"]
    assert a["recipe"]["epochs"] == 1 and a["command"].endswith("--seed 5 --epochs 1")


def test_pretrained_model_cannot_be_trained():
    from flexiq_tvm.zoo.train import train

    with pytest.raises(ValueError, match="pretrained"):
        train("efficientnet_lite0_imagenet", save=False)
