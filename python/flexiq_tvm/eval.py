"""Accuracy evaluation of zoo models (``flexiq-tvm eval``).

For now FP32: the torch model's top-1 on the test data and, for the TVM build of the same
model (``frontend.build_fp32``), its top-1 agreement with torch and the largest logit
difference.  The JSON follows the keys of DESIGN.md (``model, dataset, n_images, fp32.top1,
results[method, ratio, top1, agreement]``); later issues append quantized rows to ``results``.

Data: Fashion-MNIST models use the 10 000-image test set; EfficientNet-Lite0 uses the held-out
part of the natural photos (several deterministic views each, never the calibration photos);
there ``top1`` counts only the labelled (foolbox ImageNet) views, agreement counts all views.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from . import frontend
from .zoo import data, registry

log = logging.getLogger(__name__)


def load_eval_data(name: str, limit: int | None = None) -> tuple[str, np.ndarray, np.ndarray]:
    """``(dataset name, x, labels)`` of the evaluation data of zoo model ``name``."""
    s = registry.spec(name)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit}; must be a positive number of images")
    if s.dataset == "fmnist":
        x, y = data.load_fmnist("test", limit=limit)
        return "fashion-mnist-test", x, y
    x, y = data.load_natural("evaluation", limit=limit)
    return "natural-heldout-views", x, y


def predict_runner(runner, x: np.ndarray, batch: int) -> np.ndarray:
    """Logits of a built module with a static batch ``batch`` (the tail is zero-padded)."""
    outs = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        n = len(xb)
        if n < batch:
            xb = np.concatenate([xb, np.zeros((batch - n, *xb.shape[1:]), xb.dtype)])
        outs.append(runner(xb)[:n])
    return np.concatenate(outs)


def top1(logits: np.ndarray, labels: np.ndarray) -> float | None:
    """Top-1 accuracy over labelled images (label >= 0); ``None`` if none is labelled."""
    mask = labels >= 0
    if not mask.any():
        return None
    return float((logits[mask].argmax(1) == labels[mask]).mean())


def top5_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of ``a``'s top-5 classes (FP32) that are also in ``b``'s top-5."""
    ta, tb = np.argsort(-a, 1)[:, :5], np.argsort(-b, 1)[:, :5]
    return float(np.mean([len(set(x) & set(y)) / 5 for x, y in zip(ta, tb)]))


def evaluate_fp32(
    name: str, limit: int | None = None, tvm_limit: int | None = 500,
    vias: tuple[str, ...] = ("torch.export",), batch: int = 50,
) -> dict:
    """FP32 accuracy of zoo model ``name`` in torch, and its TVM build's agreement with torch.

    ``limit`` caps the images for torch (default: all); ``tvm_limit`` caps those run through
    the TVM build (default 500, ``0`` skips TVM; the default llvm pipeline leaves convolutions
    unscheduled, so it is slow); ``vias`` lists the frontends to build through (one result row
    each).  Returns the eval JSON document.
    """
    from .fakequant import predict

    dataset, x, y = load_eval_data(name, limit)
    model = registry.get_model(name)
    t0 = time.time()
    logits = predict(model, x, batch=250)
    torch_s = time.time() - t0
    acc = top1(logits, y)
    doc = {
        "model": name,
        "dataset": dataset,
        "n_images": len(x),
        "n_labelled": int((y >= 0).sum()),
        "fp32": {"top1": acc, "seconds": round(torch_s, 2)},
        "results": [],
    }
    for via in vias if (tvm_limit is None or tvm_limit > 0) else ():
        n = len(x) if tvm_limit is None else min(tvm_limit, len(x))
        b = min(batch, n)
        imported = frontend.import_model(model, x[:b], via=via)
        runner = frontend.build_fp32(imported)
        t0 = time.time()
        tvm_logits = predict_runner(runner, x[:n], b)
        doc["results"].append({
            "method": "tvm-fp32",
            "ratio": None,
            "top1": top1(tvm_logits, y[:n]),
            "agreement": float((tvm_logits.argmax(1) == logits[:n].argmax(1)).mean()),
            "n_images": n,
            "frontend": via,
            "max_abs_logit_diff": float(np.abs(tvm_logits - logits[:n]).max()),
            "seconds": round(time.time() - t0, 2),
        })
    return doc


# ------------------------------------------------------------------------- quantized


FLEXIQ_SELECTIONS = ("static", "greedy", "evolutionary")


def load_calibration(name: str, n: int, seed: int = 0) -> np.ndarray:
    """Calibration images of zoo model ``name`` (never evaluation images), seeded order.

    FMNIST: ``n`` images of the training split.  ImageNet: ``n`` views of the calibration
    photos (27 photos with opencv-doc installed): the center crop of every photo, then its
    other crops and flips (:data:`~flexiq_tvm.zoo.data.EVAL_VIEWS`), one view of every photo
    at a time; shuffled.
    """
    s = registry.spec(name)
    if s.dataset == "fmnist":
        return data.fmnist_calibration(n, seed=seed)
    x, _ = data.load_natural("calibration", views=True, limit=n)
    return x[np.random.default_rng(seed).permutation(len(x))]


def zoo_plan(name: str, model, config, progress: bool = False):
    """``quantize`` zoo model ``name`` on its own calibration data (``config.calib_images``
    images, ``config.seed``): the plan every tool and test of a zoo model starts from."""
    from .quantize import quantize

    calib = load_calibration(name, config.calib_images, config.seed)
    return quantize(model, calib, config, model_name=name, progress=progress)


def _row(method: str, ratio, logits: np.ndarray, y: np.ndarray, fp32: np.ndarray,
         plan=None, extra: dict | None = None) -> dict:
    from .baselines import kl_divergence

    row = {
        "method": method,
        "ratio": ratio,
        "top1": top1(logits, y),
        "agreement": float((logits.argmax(1) == fp32.argmax(1)).mean()),
        "kl": kl_divergence(fp32, logits),
    }
    if plan is not None and ratio is not None:
        row["mac_fraction"] = plan.mac_fraction(ratio)
        row["channel_fraction"] = plan.channel_fraction(ratio)
    row.update(extra or {})
    return row


def evaluate_quantized(
    name: str, ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
    selections: tuple[str, ...] = FLEXIQ_SELECTIONS, limit: int | None = None,
    config_overrides: dict | None = None, plan_dir: str | None = None, progress: bool = True,
) -> dict:
    """Accuracy per ratio of FlexiQ (each selection) and the baselines, in one run.

    Baselines: FP32, ``uniform-w4a4``, ``naive-truncation`` (top 4 bits, static order) and
    ``random`` channel selection (effective extraction).  Plans of the FlexiQ selections are
    saved to ``plan_dir`` when given.
    """
    from pathlib import Path

    from .baselines import uniform_model
    from .config import FlexiQConfig
    from .fakequant import FakeQuantModel, predict
    from .quantize import quantize

    for s in selections:
        if s not in FLEXIQ_SELECTIONS:
            raise ValueError(f"selection {s!r}; allowed: {FLEXIQ_SELECTIONS}")
    dataset, x, y = load_eval_data(name, limit)
    model = registry.get_model(name)
    fp32 = predict(model, x)
    overrides = dict(config_overrides or {})
    base = FlexiQConfig(ratios=ratios, **overrides)
    calib = load_calibration(name, base.calib_images, base.seed)
    doc = {
        "model": name, "dataset": dataset, "n_images": len(x),
        "n_labelled": int((y >= 0).sum()),
        "fp32": {"top1": top1(fp32, y)},
        "config": base.to_dict(),
        "results": [],
    }
    runs = [(f"flexiq-{s}", {"selection": s}) for s in selections]
    runs += [("random", {"selection": "random"}),
             ("naive-truncation", {"selection": "static", "extraction": "naive"})]
    w4a4_plan = None
    cache: dict = {}  # sensitivity curves, shared by greedy and evolutionary
    for method, opts in runs:
        cfg = FlexiQConfig(ratios=ratios, **{**overrides, **opts})
        t0 = time.time()
        plan = quantize(model, calib, cfg, name, progress=progress, cache=cache)
        if plan_dir is not None:
            Path(plan_dir).mkdir(parents=True, exist_ok=True)
            plan.save(Path(plan_dir) / f"{name}.{method}.npz")
        fq = FakeQuantModel(model, plan)
        for r in ratios:
            fq.set_ratio(r)
            doc["results"].append(_row(method, r, predict(fq, x), y, fp32, plan, {
                "selection_seconds": plan.metrics["selection_seconds"]}))
        log.info("%s %s done in %.0f s", name, method, time.time() - t0)
        w4a4_plan = w4a4_plan or plan
    doc["results"].append(_row("uniform-w4a4", None, predict(uniform_model(model, w4a4_plan), x),
                               y, fp32))
    return doc
