"""Device check of the CUDA mixed INT8/INT4 kernel (run by scripts/gpu_check.sh on a GPU).

1. Bit-exactness of the kernel: random quantized operands of a 512 x 256 x 1024 GEMM at
   ratios 0 / 0.5 / 1 (and a ResNet-20-shaped 3x3 conv as an implicit GEMM), the kernel on
   the GPU against the integer oracle (flexiq_tvm.reference.mixed_matmul).
2. Timings (median, TVM time_evaluator) of the kernel on 4096^3 and on a ResNet 3x3 conv shape
   (batch 32, 64 -> 64 channels, 56 x 56: M = 100352, K = 576, N = 64) at ratios 0 / 0.5 / 1,
   beside torch._int_mm (cuBLASLt INT8) and an FP16 matmul when torch has CUDA.
3. Whole models: zoo models compiled with ``flexiq_tvm.compile(target=cuda)``, each covered
   layer's accumulator against the oracle at ratios 0 / 0.5 / 1 (as many models as fit in
   ``--zoo-budget-s``).
Writes one JSON document. No network is needed.
"""

import argparse
import json
import time

import numpy as np
import tvm
from flexiq_tvm.schedules.cuda import arch_has_int4_mma, mixed_gemm, pack

from flexiq_tvm import reference as ref


def operands(m, n, k, ratio, rng):
    q = rng.integers(0, 256, (m, k)).astype(np.int32)  # post-ReLU activations: unsigned
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    sa, sw = rng.integers(0, 5, k).astype(np.int8), rng.integers(0, 5, k).astype(np.int8)
    low = np.zeros(k, bool)
    low[rng.permutation(k)[: round(ratio * k)]] = True
    a4 = ref.extract_bits(q[:, low], sa[low], False)
    w4 = ref.extract_bits(w[:, low].astype(np.int32), sw[low], True)
    shift = sa[low].astype(np.int32) + sw[low]
    return (q[:, ~low], w[:, ~low], a4, w4, shift), (q, w, low, sa, sw)


def build(m, n, k8p, runs, chunks4, int4, arch):
    f = mixed_gemm(m, n, k8p, runs, chunks4, int4, act_signed=False)
    return tvm.compile(tvm.IRModule({"main": f}), target={"kind": "cuda", "arch": arch})


def run_case(m, n, k, ratio, arch, dev, rng, check, number=5):
    int4 = arch_has_int4_mma(arch)
    parts, full = operands(m, n, k, ratio, rng)
    arrays, runs, chunks4, k8p = pack(*parts, int4)
    ex = build(m, n, k8p, runs, chunks4, int4, arch)
    args = [tvm.runtime.tensor(arrays[key], dev) for key in ("A8", "W8", "A4", "W4",
                                                             "run_table")]
    out = tvm.runtime.empty((m, n), "int32", dev)
    ex.mod["main"](*args, out)
    res = {"m": m, "n": n, "k": k, "ratio": ratio, "int4_mma": int4}
    if check:
        q, w, low, sa, sw = full
        want = ref.mixed_matmul(q, w, low, sa, sw, False)
        res["bit_exact"] = bool(np.array_equal(out.numpy(), want))
    timer = ex.mod.time_evaluator("main", dev, number=number, repeat=3)
    res["median_ms"] = 1e3 * float(np.median(timer(*args, out).results))
    res["tops"] = 2 * m * n * k / (res["median_ms"] * 1e-3) / 1e12
    return res


def zoo_checks(arch: str, budget_s: float) -> list:
    """Whole zoo models compiled for this GPU (``flexiq_tvm.compile(target=cuda)``), every
    covered layer's int32 accumulator against the oracle at ratios 0 / 0.5 / 1 on two test
    images; models that do not fit in ``budget_s`` are reported as skipped."""
    import flexiq_tvm
    from flexiq_tvm.api import oracle_mismatches
    from flexiq_tvm.config import FlexiQConfig
    from flexiq_tvm.eval import load_eval_data, zoo_plan
    from flexiq_tvm.zoo import registry

    out, t_end = [], time.perf_counter() + budget_s
    for name in ("resnet20_fmnist", "mobilenetv2_fmnist", "vit_fmnist", "swin_fmnist"):
        if time.perf_counter() > t_end:
            out.append({"model": name, "skipped": "time budget"})
            continue
        t = time.perf_counter()
        try:
            model = registry.get_model(name)
            cfg = FlexiQConfig(selection="static", calib_images=32, ratios=(0.0, 0.5, 1.0))
            plan = zoo_plan(name, model, cfg)
            _, xs, _ = load_eval_data(name, 2)
            res = {"model": name}
            cm = flexiq_tvm.compile(model, xs[:1], plan=plan, config=cfg, expose_layers=True,
                                    target={"kind": "cuda", "arch": arch})
            res["compile_s"] = time.perf_counter() - t
            res["mismatches"] = {f"{r:g}": [oracle_mismatches(cm, xs[i : i + 1], r)
                                            for i in range(2)] for r in cfg.ratios}
            res["bit_exact"] = all(not m for ms in res["mismatches"].values() for m in ms)
            res["layers"] = len(cm.layers)
        except Exception as e:  # report and go on: the other checks still run
            res = {"model": name, "error": f"{type(e).__name__}: {e}"}
        out.append(res)
        print(res, flush=True)
    return out


def torch_peers(m, n, k):
    try:
        import torch
    except ImportError:
        return {"error": "torch is not installed"}
    if not torch.cuda.is_available():
        return {"error": "torch has no CUDA"}
    out = {}
    a8 = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    b8 = torch.randint(-127, 128, (k, n), dtype=torch.int8, device="cuda")
    a16, b16 = a8.half(), b8.half()
    for name, fn in (("torch_int_mm_ms", lambda: torch._int_mm(a8, b8)),
                     ("torch_fp16_ms", lambda: a16 @ b16)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(10):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        out[name] = 1e3 * float(np.median(ts))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--zoo-budget-s", type=float, default=150.0,
                    help="seconds for the whole-model checks (compile + run)")
    args = ap.parse_args()
    dev = tvm.cuda(0)
    if not dev.exist:
        raise SystemExit("no CUDA device")
    arch = "sm_" + dev.compute_version.replace(".", "")
    rng = np.random.default_rng(0)
    doc = {"device": dev.device_name, "arch": arch, "int4_mma": arch_has_int4_mma(arch),
           "checks": [], "timings": [], "peers": {}}
    def save():  # after every phase: a timeout still leaves what was measured
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)

    for r in (0.0, 0.5, 1.0):
        doc["checks"].append(run_case(512, 256, 1024, r, arch, dev, rng, check=True))
        doc["checks"].append(run_case(64 * 64, 64, 576, r, arch, dev, rng, check=True))
        print(doc["checks"][-2:], flush=True)
    for (m, n, k) in ((4096, 4096, 4096), (100352, 64, 576)):
        for r in (0.0, 0.5, 1.0):
            doc["timings"].append(run_case(m, n, k, r, arch, dev, rng, check=False))
            print(doc["timings"][-1], flush=True)
        doc["peers"][f"{m}x{n}x{k}"] = torch_peers(m, n, k)
        save()
    r0 = next(t for t in doc["timings"] if t["m"] == 4096 and t["ratio"] == 0.0)
    peer = doc["peers"]["4096x4096x4096"].get("torch_int_mm_ms")
    if peer:
        doc["r0_fraction_of_cublaslt_int8"] = peer / r0["median_ms"]
    save()
    doc["zoo_models"] = zoo_checks(arch, args.zoo_budget_s)
    save()
    print(json.dumps({k: v for k, v in doc.items() if k != "timings"}, indent=1))


if __name__ == "__main__":
    main()
