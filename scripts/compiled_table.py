"""Compile every zoo model with FlexiQ (static plan) through both frontends and record what
docs/results.md reports for issue 4: compile time, covered layers and gathers, weight bytes,
oracle mismatches at every ratio, and prediction agreement with the fake-quant model.

Usage: python scripts/compiled_table.py [--images N] [--json docs/results/compiled.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import flexiq_tvm
from flexiq_tvm import FlexiQConfig
from flexiq_tvm.api import oracle_mismatches
from flexiq_tvm.eval import load_calibration, load_eval_data
from flexiq_tvm.fakequant import FakeQuantModel, predict
from flexiq_tvm.quantize import quantize
from flexiq_tvm.zoo import registry

MODELS = ("resnet20_fmnist", "mobilenetv2_fmnist", "vit_fmnist", "swin_fmnist",
          "efficientnet_lite0_imagenet")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--json", default="docs/results/compiled.json")
    args = ap.parse_args()
    rows = []
    for name in MODELS:
        model = registry.get_model(name)
        n_cal = 64 if "fmnist" in name else 16
        cfg = FlexiQConfig(selection="static", calib_images=n_cal)
        plan = quantize(model, load_calibration(name, n_cal), cfg, model_name=name,
                        progress=False)
        n = args.images if "fmnist" in name else 40
        _, xs, _ = load_eval_data(name, n)
        fq = FakeQuantModel(model, plan)
        fp32 = predict(model, xs).argmax(1)
        for via in ("torch.export", "onnx"):
            t0 = time.perf_counter()
            cm = flexiq_tvm.compile(model, xs[:1], plan=plan, via=via, expose_layers=True)
            secs = time.perf_counter() - t0
            row = {"model": name, "via": via, "compile_s": secs,
                   "covered": len(cm.report.covered), "gathers": len(cm.report.gathers),
                   "kept_fp32": len(cm.report.kept_fp32), "weight_bytes": cm.report.weight_bytes,
                   "n_images": n, "ratios": []}
            for r in cm.ratios:
                bad = oracle_mismatches(cm, xs[:1], r)
                cm.set_ratio(r)
                fq.set_ratio(r)
                got = np.concatenate([cm(xs[i : i + 1]) for i in range(n)]).argmax(1)
                want = predict(fq, xs).argmax(1)
                row["ratios"].append({"ratio": r, "oracle_mismatches": len(bad),
                                      "agree_fakequant": float((got == want).mean()),
                                      "fakequant_agree_fp32": float((want == fp32).mean())})
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.json, "w") as f:
        json.dump({"rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
