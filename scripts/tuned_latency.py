"""Batch-1 latency of each FMNIST zoo model compiled with and without the committed tuning
database (schedules/llvm/tuned), measured side by side, interleaved, in one process.

Usage: .venv/bin/python scripts/tuned_latency.py [--json PATH] [--repeat N]
"""

import argparse
import json

import numpy as np

import flexiq_tvm
from flexiq_tvm import FlexiQConfig
from flexiq_tvm.eval import load_eval_data, zoo_plan
from flexiq_tvm.lowering import database_exists, default_database
from flexiq_tvm.runtime.module import median_ms
from flexiq_tvm.zoo import registry

MODELS = ("resnet20_fmnist", "mobilenetv2_fmnist", "vit_fmnist", "swin_fmnist")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()
    db = default_database()
    if not database_exists(db):
        raise SystemExit(f"no tuning database at {db}: run scripts/tune_zoo.sh")
    rows = []
    for name in MODELS:
        model = registry.get_model(name)
        cfg = FlexiQConfig(selection="static", calib_images=32)
        plan = zoo_plan(name, model, cfg)
        _, x, _ = load_eval_data(name, 1)
        tuned = flexiq_tvm.compile(model, x, plan=plan, database=str(db))
        plain = flexiq_tvm.compile(model, x, plan=plan, database=None)
        for r in (0.0, 1.0):
            t, p = [], []
            for _ in range(5):  # interleaved blocks: both see the same machine state
                t.append(median_ms(lambda r=r: tuned(x, ratio=r), args.repeat // 5))
                p.append(median_ms(lambda r=r: plain(x, ratio=r), args.repeat // 5))
            diff = float(np.abs(tuned(x, ratio=r) - plain(x, ratio=r)).max())
            row = {"model": name, "ratio": r, "tuned_ms": float(np.median(t)),
                   "untuned_ms": float(np.median(p)), "max_abs_logit_diff": diff}
            row["speedup"] = row["untuned_ms"] / row["tuned_ms"]
            rows.append(row)
            print(f"{name:<20} r{r:g}: tuned {row['tuned_ms']:.3f} ms, untuned "
                  f"{row['untuned_ms']:.3f} ms ({row['speedup']:.2f}x), max|diff| {diff:.1e}",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"database": str(db), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
