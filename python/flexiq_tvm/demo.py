"""``make demo``: every zoo model's FP32 accuracy and its TVM build's agreement with torch."""

from __future__ import annotations

import time

from .eval import evaluate_fp32
from .zoo.registry import MODELS


def run_demo(tvm_limit: int = 200) -> int:
    """Evaluate each zoo model (torch, full test data) and its TVM builds (both frontends)."""
    print("flexiq-tvm demo: FP32 zoo on real data, torch vs TVM (llvm) builds")
    print(f"{'model':<28} {'data':<22} {'images':>6} {'torch top-1':>11}   "
          f"{'TVM via':<13} {'agree':>7} {'max|diff|':>9}")
    t0 = time.time()
    failures = 0
    notes = []
    for name, s in MODELS.items():
        doc = evaluate_fp32(name, tvm_limit=tvm_limit, vias=("torch.export", "onnx"))
        acc = doc["fp32"]["top1"]
        bar = "" if s.min_top1 is None else (" ok" if acc >= s.min_top1 else " BELOW BAR")
        failures += bar == " BELOW BAR"
        for i, r in enumerate(doc["results"]):
            head = (f"{name:<28} {doc['dataset']:<22} {doc['n_images']:>6} "
                    f"{100 * acc:>10.2f}%" if i == 0 else " " * 70)
            print(f"{head}   {r['frontend']:<13} {100 * r['agreement']:>6.1f}% "
                  f"{r['max_abs_logit_diff']:>9.1e}{bar if i == 0 else ''}", flush=True)
            failures += r["max_abs_logit_diff"] > 1e-4
        if doc["n_labelled"] < doc["n_images"]:
            notes.append(f"{name}: top-1 over its {doc['n_labelled']} labelled views of "
                         f"{doc['n_images']} held-out views")
    for n in notes:
        print(n)
    print(f"TVM rows use the first {tvm_limit} images of each set; {time.time() - t0:.0f} s")
    return 1 if failures else 0
