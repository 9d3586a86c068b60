"""Device check of the CUDA lowering: built here, run on a GPU machine with TVM's runtime only.

``prepare`` (here: TVM's compiler and nvcc, no GPU needed) writes a bundle folder:

- ``py/``: a runtime-only TVM (the ``tvm`` package without ``libtvm_compiler``; 305 MB -> about
  11 MB) and this flexiq_tvm; ``wheels/``: apache-tvm-ffi for the GPU machine's Python;
- ``kernels/``: the mixed GEMM (:func:`flexiq_tvm.schedules.cuda.mixed_gemm`) exported per
  case (the exactness cases' operands are regenerated there from their seeds);
- ``models/``: zoo models compiled with ``flexiq_tvm.compile(target=cuda, expose_layers=True)``
  at the default ratios (0 / 0.25 / 0.5 / 0.75 / 1), as artifacts, with their plans, layer
  records and two test images;
- ``bin/<arch>/``: every CUDA source above compiled by nvcc (fatbin), so the GPU machine
  compiles nothing; ``manifest.json``. All of it is packed into ``bundle.tar.xz``.

``run`` (on the GPU, through ``scripts/gpu_check.sh``) writes one JSON document:

1. bit-exactness of the GEMM kernel on random quantized operands (512 x 256 x 1024 and a
   ResNet-20-shaped 3x3 conv as an implicit GEMM) at ratios 0 / 0.5 / 1 against the integer
   oracle (``flexiq_tvm.reference.mixed_matmul``), for the arch's path and, on Hopper, also
   for the s4 ``mma.sync`` path that ptxas accepts for sm_90;
2. timings (median, TVM ``time_evaluator``) on 4096^3 and a ResNet 3x3 conv shape (batch 32,
   64 -> 64 channels, 56 x 56: M = 100352, K = 576, N = 64) at ratios 0 / 0.5 / 1, tiled as
   ``compile`` tiles them and untiled (one 16 x 8 tile per warp), beside ``torch._int_mm``
   (cuBLASLt INT8) and an FP16 matmul;
3. whole models: each artifact loaded with ``flexiq_tvm.load`` and every covered layer's
   accumulator compared with the oracle fed the same layer input, at every ratio, on two
   images; plus each ratio's latency at batch 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ((512, 256, 1024), (64 * 64, 64, 576))
TIMINGS = ((4096, 4096, 4096), (100352, 64, 576))
RATIOS = (0.0, 0.5, 1.0)
MODELS = ("resnet20_fmnist", "mobilenetv2_fmnist", "vit_fmnist", "swin_fmnist")


def operands(m, n, k, ratio, seed):
    """Random post-ReLU (unsigned) activation and signed weight codes, per-channel extraction
    shifts and a low-bit channel set of ``ratio * k`` channels, from ``seed``."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    sa, sw = rng.integers(0, 5, k).astype(np.int8), rng.integers(0, 5, k).astype(np.int8)
    low = np.zeros(k, bool)
    low[rng.permutation(k)[: round(ratio * k)]] = True
    return {"q": q, "w": w, "sa": sa, "sw": sw, "low": low}


def layout(ops, int4):
    """:func:`~flexiq_tvm.schedules.cuda.pack` of one case's operands."""
    from flexiq_tvm.schedules.cuda import pack

    from flexiq_tvm import reference as ref

    q, w, low, sa, sw = (ops[key] for key in ("q", "w", "low", "sa", "sw"))
    q = q.astype(np.int32)
    a4 = ref.extract_bits(q[:, low], sa[low], False)
    w4 = ref.extract_bits(w[:, low].astype(np.int32), sw[low], True)
    shift = sa[low].astype(np.int32) + sw[low]
    return pack(q[:, ~low], w[:, ~low], a4, w4, shift, int4)


# ---------------------------------------------------------------------------- prepare


def _copy_runtime(py: Path) -> None:
    """The ``tvm`` package without its compiler library, C++ sources and third-party trees."""
    import tvm

    src = Path(tvm.__file__).parent
    skip = {"3rdparty", "include", "src", "web", "cmake", "__pycache__", "libtvm_compiler.so"}
    compiler_only = {"relax", "topi", "s_tir"}  # never imported without the compiler

    def ignore(d, names):
        top = Path(d) == src
        return [n for n in names if n in skip or (top and n in compiler_only)]

    shutil.copytree(src, py / "tvm", ignore=ignore)
    pkg = ROOT / "python" / "flexiq_tvm"
    no_data = {"__pycache__", "checkpoints"}
    shutil.copytree(pkg, py / "flexiq_tvm", ignore=lambda d, names: [
        n for n in names if n in no_data])
    shutil.copytree(ROOT / "schedules", py / "flexiq_tvm" / "schedules",  # no tuning logs
                    ignore=lambda d, names: [n for n in names if n in ("__pycache__", "tuned")])


def _ffi_wheel(folder: Path, python_version: str) -> str:
    import importlib.metadata as md

    version = md.version("apache-tvm-ffi")
    # and its one requirement (pure Python), should that machine's Python lack it
    wanted = [f"apache-tvm-ffi=={version}",
              f"typing-extensions=={md.version('typing-extensions')}"]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64",
           "--platform", "manylinux_2_17_x86_64", "-d", str(folder), *wanted]
    subprocess.run(cmd, check=True)
    return version


def _digest(ops) -> str:
    """SHA-256 of a case's operands: the GPU machine regenerates them from the seed (numpy's
    generator streams are stable) and checks this before comparing."""
    h = hashlib.sha256()
    for key in sorted(ops):
        h.update(key.encode() + np.ascontiguousarray(ops[key]).tobytes())
    return h.hexdigest()


def _kernel(bundle, arch, name, m, n, k, ratio, int4, check, seed, log, tiles=None):
    """Export one mixed GEMM kernel for ``arch`` (and its nvcc binary), tiled as ``compile``
    tiles it unless ``tiles`` is given: the exactness cases keep their operands' seed and
    digest, the timing cases the shapes of their words."""
    import tvm
    from flexiq_tvm.schedules.cuda import mixed_gemm
    from flexiq_tvm.schedules.cuda.layout import gemm_tiles

    from flexiq_tvm.runtime.cuda import precompile

    ops = operands(m, n, k, ratio, seed)
    arrays, runs, chunks4, k8p = layout(ops, int4)
    t = gemm_tiles(m, n) if tiles is None else tiles
    f = mixed_gemm(m, n, k8p, runs, chunks4, int4, act_signed=False, tiles=t)
    ex = tvm.compile(tvm.IRModule({"main": f}), target={"kind": "cuda", "arch": arch})
    ex.export_library(str(bundle / "kernels" / f"{name}.so"))
    keys = precompile(ex.mod, arch, bundle / "bin" / arch)
    log(f"kernel {name}: runs {runs}, 4-bit chunks {chunks4}, K8 {k8p}, {t}")
    return {"name": name, "m": m, "n": n, "k": k, "ratio": ratio, "int4_mma": int4,
            "tiles": [t.wm, t.wn, t.warps_m, t.warps_n],
            "check": check, "seed": seed, "operands_sha256": _digest(ops),
            "run_table": arrays["run_table"].tolist(), "sources": keys,
            "shapes": {key: list(arrays[key].shape) for key in ("A8", "W8", "A4", "W4")}}


def _model(bundle, target, name, log, ratios=None):
    """Compile zoo model ``name`` for ``target`` with its layers exposed, at ``ratios`` (the
    default config's five unless given); write its artifact, plan, layer records and two
    test images (and, for CUDA, its kernels' binaries)."""
    import flexiq_tvm
    from flexiq_tvm.api import layer_records
    from flexiq_tvm.config import FlexiQConfig
    from flexiq_tvm.eval import load_eval_data, zoo_plan
    from flexiq_tvm.runtime.cuda import precompile
    from flexiq_tvm.zoo import registry

    t = time.perf_counter()
    model = registry.get_model(name)
    cfg = FlexiQConfig(selection="static", calib_images=32)
    if ratios is not None:
        cfg = dataclasses.replace(cfg, ratios=tuple(ratios))
    plan = zoo_plan(name, model, cfg)
    _, xs, _ = load_eval_data(name, 2)
    cm = flexiq_tvm.compile(model, xs[:1], plan=plan, config=cfg, expose_layers=True,
                            target=target)
    d = bundle / "models"
    cm.export(d / f"{name}.flexiq")
    plan.save(d / f"{name}.plan.json")
    (d / f"{name}.layers.json").write_text(json.dumps(layer_records(cm)))
    np.save(d / f"{name}.x.npy", np.ascontiguousarray(xs[:2], np.float32))
    keys = []
    if isinstance(target, dict) and target["kind"] == "cuda":
        keys = precompile(cm.exportable.mod, target["arch"], bundle / "bin" / target["arch"])
    size = (d / f"{name}.flexiq").stat().st_size
    wb = cm.report.weight_bytes
    log(f"model {name}: {len(cm.layers)} layers, {time.perf_counter() - t:.0f} s, ratios "
        f"{list(cfg.ratios)}, weights INT8 {wb['int8']} B + INT4 {wb['int4_packed']} B, "
        f"artifact {size} B")
    return {"name": name, "layers": len(cm.layers), "sources": keys,
            "compile_s": time.perf_counter() - t, "weight_bytes": wb, "artifact_bytes": size}


def prepare(args) -> None:
    from flexiq_tvm.schedules.cuda import arch_has_int4_mma
    from flexiq_tvm.schedules.cuda.layout import Tiles

    out = Path(args.bundle)
    if out.exists():
        shutil.rmtree(out)
    bundle = out / "tree"  # packed into one bundle.tar.xz at the end
    for sub in ("py", "wheels", "kernels", "models", f"bin/{args.arch}"):
        (bundle / sub).mkdir(parents=True)

    def log(msg):
        print(f"[prepare {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    _copy_runtime(bundle / "py")
    ffi = _ffi_wheel(bundle / "wheels", args.python_version)
    log(f"runtime-only TVM copied; apache-tvm-ffi {ffi} for Python {args.python_version}")
    native = arch_has_int4_mma(args.arch)
    # Hopper: the INT8 path, and the s4 mma.sync kernel too (ptxas takes it for sm_90)
    paths = [native] + ([True] if args.arch.startswith("sm_90") else [])
    kernels = []
    for int4 in paths:
        tag = "s4" if int4 else "s8"
        for ratio in RATIOS:
            for m, n, k in CHECKS:
                kernels.append(_kernel(bundle, args.arch, f"check_{tag}_{m}x{n}x{k}_r{ratio:g}",
                                       m, n, k, ratio, int4, True, len(kernels), log))
            for m, n, k in TIMINGS:  # as compile tiles it, and one 16 x 8 tile per warp
                seed = len(kernels)  # both tilings on the same operands
                for tiles, tt in ((None, ""), (Tiles(), "_untiled")):
                    kernels.append(_kernel(
                        bundle, args.arch, f"time_{tag}{tt}_{m}x{n}x{k}_r{ratio:g}", m, n, k,
                        ratio, int4, False, seed, log, tiles))
    target = {"kind": "cuda", "arch": args.arch}
    models = [_model(bundle, target, name, log) for name in args.models]
    manifest = {"arch": args.arch, "python": args.python_version, "tvm_ffi": ffi,
                "kernel_ratios": list(RATIOS), "kernels": kernels, "models": models}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    with tarfile.open(out / "bundle.tar.xz", "w:xz") as tar:  # a third of the carry limit
        tar.add(bundle, arcname=".")
    shutil.rmtree(bundle)
    packed = (out / "bundle.tar.xz").stat().st_size
    log(f"bundle {out / 'bundle.tar.xz'}: {size / 2**20:.1f} MiB, {packed / 2**20:.1f} MiB "
        "packed")


# ---------------------------------------------------------------------------- run


def _time_ms(fn, dev, *args, number=5):
    timer = fn.time_evaluator("main", dev, number=number, repeat=3)
    return 1e3 * float(np.median(timer(*args).results))


def run_kernel(bundle, spec, dev, rng):
    """One exported GEMM kernel on ``dev``: against the oracle (exactness cases) and timed."""
    import tvm

    from flexiq_tvm import reference as ref

    mod = tvm.runtime.load_module(str(bundle / "kernels" / f"{spec['name']}.so"))
    m, n, k = spec["m"], spec["n"], spec["k"]
    res = {key: spec[key] for key in ("m", "n", "k", "ratio", "int4_mma", "tiles")}
    if spec["check"]:
        ops = operands(m, n, k, spec["ratio"], spec["seed"])
        if _digest(ops) != spec["operands_sha256"]:
            raise RuntimeError(f"{spec['name']}: numpy here generates other operands")
        arrays, *_ = layout(ops, spec["int4_mma"])
        if arrays["run_table"].tolist() != spec["run_table"]:
            raise RuntimeError(f"{spec['name']}: the operands lay out differently here")
    else:  # timing only: random words in the kernel's layout
        arrays = {key: rng.integers(0, 2**32, shape, dtype=np.uint32)
                  for key, shape in spec["shapes"].items()}
        arrays["run_table"] = np.array(spec["run_table"], np.int32)
    args = [tvm.runtime.tensor(arrays[key], dev) for key in ("A8", "W8", "A4", "W4",
                                                             "run_table")]
    out = tvm.runtime.empty((m, n), "int32", dev)
    mod["main"](*args, out)
    if spec["check"]:
        want = ref.mixed_matmul(ops["q"].astype(np.int32), ops["w"], ops["low"], ops["sa"],
                                ops["sw"], False)
        got = out.numpy()
        res["bit_exact"] = bool(np.array_equal(got, want))
        if not res["bit_exact"]:
            res["max_abs_diff"] = int(np.abs(got.astype(np.int64) - want).max())
    res["median_ms"] = _time_ms(mod, dev, *args, out)
    res["tops"] = 2 * m * n * k / (res["median_ms"] * 1e-3) / 1e12
    return res


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


def run_model(bundle, spec, dev):
    """Load one model's artifact on ``dev``; every covered layer against the oracle at every
    ratio on the stored images, and each ratio's latency."""
    import flexiq_tvm
    from flexiq_tvm.api import accumulator_mismatches
    from flexiq_tvm.plan import QuantPlan

    d, name = bundle / "models", spec["name"]
    t = time.perf_counter()
    mod = flexiq_tvm.load(d / f"{name}.flexiq", device=dev)
    res = {"model": name, "layers": spec["layers"], "load_s": time.perf_counter() - t}
    plan = QuantPlan.load(d / f"{name}.plan.json")
    records = json.loads((d / f"{name}.layers.json").read_text())
    xs = np.load(d / f"{name}.x.npy")
    res["mismatches"] = {f"{r:g}": [accumulator_mismatches(
        records, plan, mod.layer_tensors(xs[i : i + 1], r), r) for i in range(len(xs))]
        for r in mod.ratios}
    res["bit_exact"] = all(not m for ms in res["mismatches"].values() for m in ms)
    res["latency_ms"] = mod.profile(xs[:1], repeat=20)
    return res


def run(args) -> None:
    import tvm

    from flexiq_tvm.runtime import cuda
    from flexiq_tvm.runtime.cuda import add_binaries, cuda_runtime

    bundle = Path(args.bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    if not cuda_runtime():
        raise SystemExit(f"TVM's CUDA runtime did not load: {cuda.LOAD_ERROR}")
    if not tvm.cuda(0).exist:
        raise SystemExit("no CUDA device")
    dev = tvm.cuda(0)
    arch = "sm_" + dev.compute_version.replace(".", "")
    doc = {"device": dev.device_name, "arch": arch, "bundle_arch": manifest["arch"],
           "runtime_only_tvm": bool(tvm.base._RUNTIME_ONLY),
           "precompiled_binaries": add_binaries(bundle / "bin" / arch),
           "checks": [], "timings": [], "peers": {}, "zoo_models": []}

    def save():  # after every phase: a timeout still leaves what was measured
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)

    rng = np.random.default_rng(1)
    for spec in manifest["kernels"]:
        try:
            res = run_kernel(bundle, spec, dev, rng)
        except Exception as e:  # report and go on
            res = {"kernel": spec["name"], "error": f"{type(e).__name__}: {e}"[:2000]}
        res["kernel"] = spec["name"]
        doc["checks" if spec["check"] else "timings"].append(res)
        print(res, flush=True)
        save()
    for m, n, k in TIMINGS:
        doc["peers"][f"{m}x{n}x{k}"] = torch_peers(m, n, k)
    peer = doc["peers"]["4096x4096x4096"].get("torch_int_mm_ms")
    for t in doc["timings"]:
        if peer and t.get("m") == 4096 and "median_ms" in t:
            t["fraction_of_cublaslt_int8"] = peer / t["median_ms"]
    save()
    for spec in manifest["models"]:
        try:
            res = run_model(bundle, spec, dev)
        except Exception as e:
            res = {"model": spec["name"], "error": f"{type(e).__name__}: {e}"[:2000]}
        doc["zoo_models"].append(res)
        print({k: v for k, v in res.items() if k != "mismatches"}, flush=True)
        save()
    doc["all_bit_exact"] = all(c.get("bit_exact") for c in doc["checks"] + doc["zoo_models"])
    save()
    print(json.dumps({k: v for k, v in doc.items() if k not in ("timings", "checks")},
                     indent=1, default=str))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build the bundle here (compiler + nvcc, no GPU)")
    p.add_argument("--bundle", default=".gpubundle")
    p.add_argument("--arch", default="sm_90", help="the GPU's arch (H100 / H200: sm_90)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's python3")
    p.add_argument("--models", nargs="*", default=list(MODELS))
    r = sub.add_parser("run", help="run the bundle on the GPU (runtime-only TVM)")
    r.add_argument("--bundle", default=".gpubundle")
    r.add_argument("--json", required=True)
    args = ap.parse_args()
    prepare(args) if args.cmd == "prepare" else run(args)


if __name__ == "__main__":
    main()
