"""``make demo``: every zoo model's FP32 accuracy and its TVM build's agreement with torch,
then the FlexiQ flow: resnet20_fmnist compiled with five ratio variants, accuracy and latency
per ratio from real runs."""

from __future__ import annotations

import os
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
    print()
    print_compiled(compile_and_measure("resnet20_fmnist"))
    return 1 if failures else 0


def top1_per_ratio(cm, xs, ys) -> dict[float, float]:
    """Top-1 of a compiled module at each of its ratios, one image per call (batch 1)."""
    import numpy as np

    return {r: float((np.array([cm(xs[i : i + 1], ratio=r).argmax() for i in range(len(xs))])
                      == ys).mean()) for r in cm.ratios}


def compile_and_measure(name: str = "resnet20_fmnist", plan=None, selection: str = "static",
                        via: str = "torch.export", n_images: int = 1000,
                        finetuned: bool = False, target: str = "llvm") -> dict:
    """Compile a zoo FMNIST model with FlexiQ, then for each ratio measure top-1 on the first
    ``n_images`` test images and the batch-1 median latency, beside torch FP32.

    ``finetuned``: compile the committed finetuned model and its plan instead. ``target``:
    ``"llvm"`` or ``"flexiq_npu"`` (latency is then the simulator's wall time; the NPU's
    modeled cycles come from ``flexiq-tvm bench --target flexiq_npu``)."""
    import torch

    import flexiq_tvm

    from .config import FlexiQConfig
    from .quantize import quantize
    from .runtime.module import median_ms
    from .zoo import data, registry

    if finetuned:
        if plan is not None:
            raise ValueError("finetuned=True compiles the finetuned checkpoint's own plan")
        from .finetune import load_finetuned

        model, plan = load_finetuned(name)
        selection = "finetuned"
    else:
        model = registry.get_model(name)
    cfg = FlexiQConfig(selection="static" if finetuned else selection)
    t0 = time.perf_counter()
    if plan is None:
        plan = quantize(model, data.fmnist_calibration(cfg.calib_images, cfg.seed), cfg,
                        model_name=name, progress=False)
    t_plan = time.perf_counter() - t0
    xs, ys = data.load_fmnist("test", n_images)
    t0 = time.perf_counter()
    cm = flexiq_tvm.compile(model, xs[:1], plan=plan, via=via, config=cfg, target=target)
    t_compile = time.perf_counter() - t0
    # torch on as many threads as TVM's pool (flexiq_tvm sets TVM_NUM_THREADS on import)
    threads = int(os.environ.get("TVM_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    x1 = xs[:1]
    with torch.no_grad():
        torch_ms = median_ms(lambda: model(torch.from_numpy(x1)), 50, warmup=5)
    top1 = top1_per_ratio(cm, xs, ys)
    rows = [{"ratio": r, "top1": top1[r], "median_ms": median_ms(lambda r=r: cm(x1, ratio=r),
                                                                  50, warmup=5)}
            for r in cm.ratios]
    return {"model": name, "via": via, "selection": selection, "n_images": n_images,
            "target": target,
            "plan_seconds": t_plan, "compile_seconds": t_compile, "torch_fp32_ms": torch_ms,
            "threads": threads,
            "rows": rows, "report": cm.report}


def print_compiled(res: dict) -> None:
    print(f"{res['model']}: FlexiQ ({res['selection']} selection) compiled for "
          f"{res.get('target', 'llvm')} via "
          f"{res['via']} in {res['compile_seconds']:.1f} s (plan {res['plan_seconds']:.1f} s)")
    print(res["report"].summary())
    print(f"  {'ratio':>5} {'top-1':>8} {'batch-1 ms':>11}   (first {res['n_images']} test images)")
    for r in res["rows"]:
        print(f"  {r['ratio']:>5g} {100 * r['top1']:>7.2f}% {r['median_ms']:>11.3f}")
    print(f"  torch FP32 ({res.get('threads', 1)} threads, as FlexiQ) batch-1: "
          f"{res['torch_fp32_ms']:.3f} ms")
