"""Accuracy and fidelity per ratio of a zoo model, with and without the nested GPTQ
reconstruction (issue 22), on all of its evaluation data (every held-out view for
EfficientNet-Lite0, the 10 000 test images for Fashion-MNIST).  Writes one eval-style JSON
(DESIGN.md keys, plus ``kl`` and ``top5_overlap`` per row) and prints a line per row.

    .venv/bin/python scripts/reconstruct_table.py --json docs/results/lite0_reconstruct.json
    .venv/bin/python scripts/reconstruct_table.py --model resnet20_fmnist \
        --methods flexiq-static,flexiq-static+gptq --json docs/results/resnet20_reconstruct.json
"""

from __future__ import annotations

import argparse
import json
import time

from flexiq_tvm import eval as ev
from flexiq_tvm.config import FlexiQConfig
from flexiq_tvm.fakequant import FakeQuantModel, predict
from flexiq_tvm.quantize import quantize
from flexiq_tvm.zoo import registry

RUNS = {  # method: config overrides
    "flexiq-static": {"selection": "static"},
    "flexiq-greedy": {"selection": "greedy"},
    "flexiq-static+gptq": {"selection": "static", "reconstruct": True},
    "flexiq-greedy+gptq": {"selection": "greedy", "reconstruct": True},
    "flexiq-evolutionary": {"selection": "evolutionary"},
    "flexiq-evolutionary+gptq": {"selection": "evolutionary", "reconstruct": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0_imagenet",
                    choices=sorted(registry.MODELS))
    ap.add_argument("--ratios", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--methods", default=",".join(RUNS), help=f"of {', '.join(RUNS)}")
    ap.add_argument("--limit", type=int, default=None, help="held-out views (default: all)")
    ap.add_argument("--search-images", type=int, default=16)
    ap.add_argument("--sensitivity-steps", type=int, default=4)
    ap.add_argument("--search-metric", default="mse", choices=("mse", "kl"))
    ap.add_argument("--population", type=int, default=12)
    ap.add_argument("--generations", type=int, default=16)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    name = args.model
    unknown = set(args.methods.split(",")) - set(RUNS)
    if unknown:
        ap.error(f"unknown method(s) {sorted(unknown)}; allowed: {', '.join(RUNS)}")
    ratios = tuple(float(r) for r in args.ratios.split(","))
    dataset, x, y = ev.load_eval_data(name, args.limit)
    model = registry.get_model(name)
    fp32 = predict(model, x, batch=50)
    base = {"calib_images": 128, "search_images": args.search_images,
            "sensitivity_steps": args.sensitivity_steps, "search_metric": args.search_metric,
            "population": args.population, "generations": args.generations}
    calib = ev.load_calibration(name, base["calib_images"], 0)
    doc = {"model": name, "dataset": dataset, "n_images": len(x),
           "n_labelled": int((y >= 0).sum()), "n_calibration": len(calib),
           "fp32": {"top1": ev.top1(fp32, y)}, "config": base, "results": []}
    cache: dict = {}
    for method in args.methods.split(","):
        cfg = FlexiQConfig(ratios=ratios, **base, **RUNS[method])
        t0 = time.time()
        plan = quantize(model, calib, cfg, name, progress=False, cache=cache)
        fq = FakeQuantModel(model, plan)
        for r in ratios:
            fq.set_ratio(r)
            q = predict(fq, x, batch=50)
            row = ev._row(method, r, q, y, fp32, plan, {
                "top5_overlap": ev.top5_overlap(fp32, q),
                "selection_seconds": plan.metrics["selection_seconds"],
                "selection_evaluations": plan.metrics["selection_evaluations"],
                "reconstruction_seconds": plan.metrics.get("reconstruction_seconds", 0.0)})
            doc["results"].append(row)
            print(f"{method:20s} {r:4g} agreement {100 * row['agreement']:6.2f} % top-1 "
                  f"{100 * row['top1']:6.2f} % kl {row['kl']:.3f} top5 "
                  f"{100 * row['top5_overlap']:.1f} %", flush=True)
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=1)
        print(f"{method}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
