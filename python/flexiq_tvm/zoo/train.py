"""Seeded training of the Fashion-MNIST zoo models (``flexiq-tvm train --model NAME``).

Recipes are fixed per model (below) so that a checkpoint is reproducible from its manifest
entry.  CNNs use SGD with Nesterov momentum, transformers AdamW; both a one-cycle cosine
schedule, label smoothing 0.1 and light augmentation (random 2-pixel shifts, horizontal flips).
The checkpoint is written to ``zoo/checkpoints/NAME.pt`` and its sha256, test accuracy (full
10 000-image test set) and command to ``zoo/checkpoints/manifest.json``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import data, registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    epochs: int
    optimizer: str  # "sgd" | "adamw"
    lr: float
    weight_decay: float
    batch_size: int = 128
    label_smoothing: float = 0.1
    warmup_frac: float = 0.15


RECIPES: dict[str, Recipe] = {
    "resnet20_fmnist": Recipe(epochs=12, optimizer="sgd", lr=0.1, weight_decay=5e-4),
    "mobilenetv2_fmnist": Recipe(epochs=10, optimizer="sgd", lr=0.1, weight_decay=4e-5),
    "vit_fmnist": Recipe(epochs=12, optimizer="adamw", lr=2e-3, weight_decay=0.05),
    "swin_fmnist": Recipe(epochs=20, optimizer="adamw", lr=2e-3, weight_decay=0.05),
}


def _augment(x, gen):
    """Random shift by up to 2 pixels (zero padding of the normalized background) and h-flip."""
    import torch

    b = x.shape[0]
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2), value=float(-data.FMNIST_MEAN / data.FMNIST_STD))
    dx = torch.randint(0, 5, (b,), generator=gen)
    dy = torch.randint(0, 5, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(28)[None, :])[:, None, :, None]  # (b,1,28,1)
    cols = (dx[:, None] + torch.arange(28)[None, :])[:, None, None, :]  # (b,1,1,28)
    out = pad[torch.arange(b)[:, None, None, None], torch.zeros_like(rows), rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def evaluate_torch(model, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    """Top-1 accuracy (fraction) of a torch model on normalized numpy images."""
    from ..fakequant import predict

    model.eval()
    return int((predict(model, x, batch).argmax(1) == y).sum()) / len(x)


def train(name: str, seed: int = 0, epochs: int | None = None, threads: int = 1,
          save: bool = True, limit: int | None = None) -> dict:
    """Train zoo model ``name`` and (``save``) commit its checkpoint and manifest entry.

    Returns the manifest entry (``top1`` is the full test-set accuracy as a fraction).
    """
    import torch

    spec = registry.spec(name)
    if not spec.trained_here:
        raise ValueError(f"{name} is pretrained, not trained by this project")
    recipe = RECIPES[name]
    if epochs is not None:
        if epochs <= 0:
            raise ValueError(f"epochs={epochs}; must be positive")
        recipe = Recipe(**{**asdict(recipe), "epochs": epochs})
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)

    xtr, ytr = data.load_fmnist("train", limit=limit)
    xte, yte = data.load_fmnist("test")
    xtr_t, ytr_t = torch.from_numpy(xtr), torch.from_numpy(ytr)

    model = registry.get_model(name, pretrained=False).train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "token" not in n
             and "pos_embed" not in n and "rel_table" not in n]
    no_decay = [p for n, p in model.named_parameters() if not any(p is q for q in decay)]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=recipe.lr, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.99))
    steps_per_epoch = math.ceil(len(xtr) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    warm = max(1, int(recipe.warmup_frac * total))

    def lr_at(step: int) -> float:
        if step < warm:
            return recipe.lr * (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * t))

    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    t0 = time.time()
    step = 0
    for epoch in range(recipe.epochs):
        model.train()
        perm = torch.randperm(len(xtr_t), generator=gen)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            xb = _augment(xtr_t[idx], gen)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = loss_fn(model(xb), ytr_t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach())
            step += 1
        acc = evaluate_torch(model, xte[:2000], yte[:2000])
        log.info("%s epoch %d/%d loss %.4f test[:2000] %.4f (%.0f s)", name, epoch + 1,
                 recipe.epochs, running / steps_per_epoch, acc, time.time() - t0)
        print(f"{name} epoch {epoch + 1}/{recipe.epochs} loss {running / steps_per_epoch:.4f} "
              f"test[:2000] {acc:.4f} ({time.time() - t0:.0f} s)", flush=True)
    train_s = time.time() - t0
    model.eval()
    top1 = evaluate_torch(model, xte, yte)
    weights = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        weights.update(k.encode() + v.detach().contiguous().numpy().tobytes())
    entry = {
        "file": f"{name}.pt",
        "weights_sha256": weights.hexdigest(),
        "top1": top1,
        "n_test_images": len(xte),
        "seed": seed,
        "recipe": asdict(recipe),
        "train_seconds": round(train_s),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": f"flexiq-tvm train --model {name} --seed {seed}"
        + (f" --epochs {epochs}" if epochs is not None else ""),
    }
    if save:
        registry.CHECKPOINT_DIR.mkdir(parents=True, exist_ok=True)
        path = registry.checkpoint_path(name)
        torch.save(model.state_dict(), path)
        entry["sha256"] = registry.sha256_file(path)
        entry["size_bytes"] = path.stat().st_size
        registry.write_manifest_entry(name, entry)
    print(f"{name}: FP32 top-1 {top1:.4f} on {len(xte)} test images ({train_s:.0f} s)",
          file=sys.stderr)
    return entry
