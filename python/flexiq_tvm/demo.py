"""``make demo``: what FlexiQ is for, in two minutes on a laptop-class CPU.

The shipped ResNet-20 (Fashion-MNIST) is compiled into one module with five low-bit ratios;
one table shows, per ratio, the share of MACs in 4-bit, top-1 on 1000 test images and the
latency at batch 1 and 32, beside torch FP32 and onnxruntime INT8 measured in the same run;
then a short bursty load is replayed against static ratio 0, static ratio 1 and the adaptive
policy, and a PNG plot (offered load, chosen ratio, latency against the SLO) is written beside
the exported artifact. The zoo's FP32 checks live in the tests and ``flexiq-tvm eval``.

The batch-32 module is built in a second process while this one builds the batch-1 module
(compiling is single-threaded Python and LLVM: two cores build both in the time of one);
nothing is timed until both builds are done.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = "resnet20_fmnist"
RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _step(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:5.1f} s] {msg}", flush=True)


def build_artifact(plan_path: str, batch: int, out: str) -> None:
    """Compile ``MODEL`` for ``batch`` with the plan at ``plan_path`` and export it to
    ``out`` without a latency profile (the demo measures it when the machine is quiet)."""
    import numpy as np

    import flexiq_tvm

    from .config import FlexiQConfig
    from .plan import QuantPlan
    from .zoo import registry

    model = registry.get_model(MODEL)
    x = np.zeros((batch, *registry.spec(MODEL).input_shape), np.float32)
    cm = flexiq_tvm.compile(model, x, plan=QuantPlan.load(plan_path),
                            config=FlexiQConfig(ratios=RATIOS, selection="static"))
    cm.export(out, profile={})


def _predict(fn, xs, batch: int):
    """Argmax of ``fn`` over ``xs`` in batches of ``batch`` (the last one zero-padded)."""
    import numpy as np

    from .eval import predict_runner

    return predict_runner(lambda xb: np.asarray(fn(np.ascontiguousarray(xb))), xs,
                          batch).argmax(1)


def _onnxruntime_int8(model, calib, tmp: Path):
    """onnxruntime's static INT8 (QDQ, per-channel weights) of ``model`` with a dynamic batch
    axis, calibrated on ``calib``: the peer the INT8 baseline is measured against."""
    import torch

    from .bench import _onnx_int8, _ort_session

    fp32 = tmp / "fp32.onnx"
    with torch.no_grad():
        torch.onnx.export(model.eval(), (torch.from_numpy(calib[:1]),), str(fp32),
                          opset_version=17, dynamo=False, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "n"},
                                                                 "output": {0: "n"}})
    return _ort_session(_onnx_int8(fp32, calib, 32, tmp / "int8.onnx"))


def run_demo(duration_s: float = 6.0, out_dir: str = "demo_out", n_images: int = 1000) -> int:
    """The demo (see the module docs); returns the exit code."""
    t0 = time.perf_counter()
    import numpy as np
    import torch

    from . import bench
    from .config import FlexiQConfig
    from .quantize import quantize
    from .runtime import load, loadtest
    from .runtime.module import median_ms
    from .zoo import data, registry

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifact, plot = out / f"{MODEL}.flexiq", out / "loadtest.png"
    mach = bench.machine()
    threads = int(os.environ.get("TVM_NUM_THREADS", "1"))
    print(f"flexiq-tvm demo: {MODEL} compiled once for five low-bit ratios, on "
          f"{mach['cpu'] or 'this CPU'} ({threads} threads, {mach['kernels']} kernels)")
    model = registry.get_model(MODEL).eval()
    cfg = FlexiQConfig(ratios=RATIOS, selection="static")
    plan = quantize(model, data.fmnist_calibration(cfg.calib_images, cfg.seed), cfg,
                    model_name=MODEL, progress=False)
    xs, ys = data.load_fmnist("test", n_images)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        plan.save(tmp / "plan.npz")
        a32 = tmp / "b32.flexiq"
        code = ("import sys; from flexiq_tvm.demo import build_artifact; "
                "build_artifact(sys.argv[1], 32, sys.argv[2])")
        child = subprocess.Popen([sys.executable, "-c", code, str(tmp / "plan.npz"), str(a32)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        _step("channel plan ready (static selection); compiling batch 1 here and batch 32 in "
              "a second process", t0)
        build_artifact(str(tmp / "plan.npz"), 1, str(artifact))
        ort = _onnxruntime_int8(model, data.fmnist_calibration(64, cfg.seed + 1), tmp)
        log_child, _ = child.communicate()
        if child.returncode:
            sys.stderr.write(log_child.decode(errors="replace")[-4000:])
            raise RuntimeError("the batch-32 build failed (its output is above)")
        m1, m32 = load(artifact), load(a32)
        _step("both modules built and exported; measuring (nothing else runs now)", t0)

        torch.set_num_threads(threads)
        x1, x32 = np.ascontiguousarray(xs[:1]), np.ascontiguousarray(xs[:32])
        rows = []
        with torch.no_grad():
            tm = lambda x: model(torch.from_numpy(x)).numpy()  # noqa: E731
            rows.append(("torch FP32", None, None, _predict(tm, xs, 32),
                         median_ms(lambda: tm(x1), 50, 5), median_ms(lambda: tm(x32), 10, 2)))
        om = lambda x: ort.run(None, {"input": x})[0]  # noqa: E731
        rows.append(("onnxruntime INT8", None, None, _predict(om, xs, 32),
                     median_ms(lambda: om(x1), 50, 5), median_ms(lambda: om(x32), 10, 2)))
        for r in RATIOS:  # one warm pass over every ratio, then each timed
            m1(x1, ratio=r)
            m32(x32, ratio=r)
        profile = {}
        for r in RATIOS:
            t1 = median_ms(lambda r=r: m1(x1, ratio=r), 50, 5)
            profile[f"{r:g}"] = t1
            rows.append(("FlexiQ", r, plan.mac_fraction(r),
                         _predict(lambda x, r=r: m32(x, ratio=r), xs, 32), t1,
                         median_ms(lambda r=r: m32(x32, ratio=r), 10, 2)))
    print(f"  {'system':<17} {'ratio':>5} {'4-bit MACs':>11} {'top-1':>8} "
          f"{'batch-1 ms':>11} {'batch-32 ms':>12}")
    accuracy = {}
    for name, r, mac, pred, t1, t32 in rows:
        top1 = float((pred == ys).mean())
        if r is not None:
            accuracy[f"{r:g}"] = top1
        print(f"  {name:<17} {'-' if r is None else f'{r:g}':>5} "
              f"{'-' if mac is None else f'{100 * mac:.0f} %':>11} {100 * top1:>7.2f}% "
              f"{t1:>11.3f} {t32:>12.2f}")
    base = rows[2]
    best = min(rows[2:], key=lambda row: row[5])
    print(f"  (top-1 on the first {n_images} test images; latency: medians; the FlexiQ rows "
          f"share one set of INT8 weights)")
    print(f"  fastest ratio at batch 32: {best[1]:g}, {base[5] / best[5]:.2f}x ratio 0")
    # the artifact keeps the profile and accuracy measured just now
    load_mod = load(artifact)
    load_mod.export(artifact, profile=profile, accuracy=accuracy)
    _step(f"replaying a bursty trace ({duration_s:g} s per policy) on loopback", t0)
    doc = loadtest.run(load(artifact), accuracy, duration_s=duration_s, plot=str(plot))
    tr = doc["trace"]
    print(f"  base {tr['base_rps']:.0f} req/s, bursts {tr['burst_rps']:.0f} req/s; SLO "
          f"{doc['slo_ms']:.2f} ms (2x ratio 0's p50 at the base rate)")
    print(f"  {'policy':<10} {'within SLO':>10} {'p50 ms':>8} {'p99 ms':>8} {'mean top-1':>10}")
    for c in doc["configs"]:
        top1 = "-" if c["mean_top1"] is None else f"{100 * c['mean_top1']:.2f}%"
        print(f"  {c['name']:<10} {100 * c['slo_attainment']:>9.1f}% {c['p50_ms']:>8.2f} "
              f"{c['p99_ms']:>8.2f} {top1:>10}")
    _step("done", t0)
    print(f"wrote {artifact} (every ratio, batch 1, profile and accuracy inside) and {plot}")
    exe = Path(sys.executable).parent / "flexiq-tvm"
    with_path = os.path.relpath(exe) if exe.exists() else "flexiq-tvm"
    py = os.path.relpath(sys.executable) if Path(sys.executable).is_relative_to(Path.cwd()) \
        else "python"
    print("next:")
    for cmd, what in (
            (f"{with_path} serve {artifact} --slo-ms {doc['slo_ms']:.1f}",
             "serve it: the adaptive HTTP server"),
            (f"{py} tutorials/02_onnx_efficientnet.py", "an ONNX model (EfficientNet-Lite0)"),
            ("make bench", "the benchmark: every zoo model beside torch, onnxruntime, TVM")):
        print(f"  {cmd:<62} # {what}")
    return 0


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
