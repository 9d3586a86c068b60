"""``flexiq-tvm bench``: FlexiQ modules beside their peers, side by side in one run.

Every system runs the same real input batch of the model's evaluation data; each figure is the
median of repeated runs after warm-up, with every system using all of the machine's cores:

* ``torch-fp32``: the zoo model in eager PyTorch (``torch.no_grad``);
* ``onnxruntime-fp32`` / ``onnxruntime-int8``: the model exported to ONNX, and its static QDQ
  quantization (per-channel INT8 weights, UINT8 activations calibrated on the model's
  calibration images) by ``onnxruntime.quantization.quantize_static``;
* ``tvm-fp32``: TVM's default Relax pipeline on the same graph (unscheduled conv2d);
* ``flexiq-llvm``: :func:`flexiq_tvm.compile` (static selection), one row per ratio and
  kernel ISA (``isa``): the host's best, and beside it the AVX2 build where the best is a
  VNNI one (the honest stand-in for an AVX2-only CPU, :func:`isas_to_bench`).

``peak_mem_mb`` is the largest resident-set growth of the process while a system is built and
run once, sampled every millisecond (the build's transient memory included); the timed runs
come after, without the sampler. Kernel rows time one FlexiQ GEMM kernel on random codes;
``switch_us`` is the cost of ``set_ratio``.
JSON keys (DESIGN.md): ``{"machine", "rows": [{"model", "batch", "system", "ratio",
"median_ms", "peak_mem_mb"}], "kernels": [{"name", "ratio", "median_us"}], "switch_us"}``,
plus ``isa`` on every FlexiQ row and kernel (``null`` for the peers) and ``isas`` (the ISAs
run, the host's best first; the summary's ratio figures are the best ISA's, ``by_isa`` has
each one's).
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import tempfile
import threading
from pathlib import Path

import numpy as np

from . import _quiet
from ._quiet import native_stderr
from .runtime.module import median_ms

log = logging.getLogger(__name__)

DEFAULT_MODELS = ("resnet20_fmnist", "mobilenetv2_fmnist", "vit_fmnist",
                  "efficientnet_lite0_imagenet")
PEERS = ("torch-fp32", "onnxruntime-fp32", "onnxruntime-int8", "tvm-fp32")


def machine() -> dict:
    """CPU model, cores and the SIMD features the kernels care about."""
    from .hostcpu import best_isa, cpu_flags, cpu_model

    flags = cpu_flags()
    return {"platform": platform.platform(), "cores": os.cpu_count(), "cpu": cpu_model(),
            "simd": sorted(f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl",
                                       "avx512_vnni", "avx_vnni", "amx_int8") if f in flags),
            "kernels": best_isa()}


class PeakRSS:
    """Context manager: the largest RSS growth (MB) over its body, sampled every 1 ms."""

    def __enter__(self):
        import gc

        import psutil

        gc.collect()
        self._proc = psutil.Process()
        self.base = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _onnx_fp32(model, x: np.ndarray, path: Path) -> Path:
    """Plain inference export (BatchNorm folded by the exporter), the peers' best case."""
    import torch

    with torch.no_grad():
        torch.onnx.export(model.eval(), (torch.from_numpy(x),), str(path), opset_version=17,
                          dynamo=False, input_names=["input"], output_names=["output"])
    return path


def _onnx_int8(fp32_path: Path, calib: np.ndarray, batch: int, path: Path) -> Path:
    """Static QDQ quantization of the FP32 export, calibrated on ``calib`` in batches of the
    model's static batch size."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"input": calib[i : i + batch]} for i in range(0, len(calib), batch)])

        def get_next(self):
            return next(self._it, None)

    # onnxruntime's quantizer logs "Please consider to run pre-processing before quantization"
    # on the root logger for every model: advice for models with dynamic shapes or unfused
    # ops, and an inference export like ours is already shape-inferred and optimized
    # and "Axis 1 is out-of-range for weight ..." for every 1-D weight (layer norms) that
    # per-channel quantization leaves per-tensor, as it should
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # its sessions' graph-cleaning chatter (warnings)
    root = logging.getLogger()
    filters = [_DropMessages("pre-processing before quantization"),
               _DropMessages("is out-of-range for weight")]
    for f in filters:
        root.addFilter(f)
    try:
        quantize_static(str(fp32_path), str(path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    finally:
        for f in filters:
            root.removeFilter(f)
    return path


class _DropMessages(logging.Filter):
    """A logging filter that drops the records whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: "Removing initializer ..." per unused constant
    opts.intra_op_num_threads = os.cpu_count() or 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def bench_model(name: str, batch: int, ratios=(0.0, 0.25, 0.5, 0.75, 1.0), repeat: int = 20,
                systems=(*PEERS, "flexiq-llvm"), tvm_repeat: int = 3,
                isas=None) -> tuple[list, float]:
    """Rows for one model and batch size; also the ratio-switch cost (µs) of its module (the
    best ISA's). ``isas``: the kernel ISAs FlexiQ is built for (default
    :func:`isas_to_bench`)."""
    import torch

    import flexiq_tvm

    from . import frontend
    from .config import FlexiQConfig
    from .eval import load_calibration, load_eval_data
    from .quantize import quantize
    from .zoo import registry

    model = registry.get_model(name).eval()
    _, xs, _ = load_eval_data(name, batch)
    if len(xs) < batch:
        xs = np.concatenate([xs] * (-(-batch // len(xs))))[:batch]
    x = np.ascontiguousarray(xs[:batch])
    calib = load_calibration(name, 32)
    rows, switch = [], float("nan")

    def row(system, ratio, ms, mem, isa=None):
        rows.append({"model": name, "batch": batch, "system": system, "ratio": ratio,
                     "median_ms": ms, "peak_mem_mb": mem, "isa": isa})
        log.info("%s b%d %s %s %s: %.3f ms (peak +%.1f MB)", name, batch, system, isa or "",
                 "" if ratio is None else f"r{ratio:g}", ms, mem)

    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        # each system is built and run once under PeakRSS, then timed without the sampler
        if "torch-fp32" in systems:
            torch.set_num_threads(threads)
            xt = torch.from_numpy(x)
            with torch.no_grad():
                with PeakRSS() as m:
                    model(xt)
                row("torch-fp32", None, median_ms(lambda: model(xt), repeat), m.mb)
        fp32_path = None
        if "onnxruntime-fp32" in systems or "onnxruntime-int8" in systems:
            fp32_path = _onnx_fp32(model, x, Path(tmp) / "fp32.onnx")
        if "onnxruntime-fp32" in systems:
            with PeakRSS() as m:
                sess = _ort_session(fp32_path)
                sess.run(None, {"input": x})
            row("onnxruntime-fp32", None, median_ms(lambda: sess.run(None, {"input": x}),
                                                    repeat), m.mb)
        if "onnxruntime-int8" in systems:
            cal = np.concatenate([calib] * (-(-batch // len(calib))))[: max(batch, len(calib))]
            cal = cal[: (len(cal) // batch) * batch]
            with PeakRSS() as m:
                sess = _ort_session(_onnx_int8(fp32_path, cal, batch, Path(tmp) / "int8.onnx"))
                sess.run(None, {"input": x})
            row("onnxruntime-int8", None, median_ms(lambda: sess.run(None, {"input": x}),
                                                    repeat), m.mb)
        if "tvm-fp32" in systems:
            with PeakRSS() as m, native_stderr(_quiet.FAST_TAKE):
                runner = frontend.build_fp32(frontend.import_model(model, x))
                runner(x)
            row("tvm-fp32", None, median_ms(lambda: runner(x), tvm_repeat, warmup=0), m.mb)
        if "flexiq-llvm" in systems:
            cfg = FlexiQConfig(selection="static", calib_images=32, ratios=tuple(ratios))
            plan = quantize(model, calib, cfg, model_name=name, progress=False)
            for k, isa in enumerate(isas or isas_to_bench()):
                with PeakRSS() as m:
                    cm = flexiq_tvm.compile(model, x, plan=plan, config=cfg, isa=isa)
                    cm(x)
                # interleaved rounds after a warm pass over every ratio (right after the build
                # the first variant timed in series read up to 1.4x slow at batch 1)
                for r, ms in cm.profile(x, repeat=repeat).items():
                    row("flexiq-llvm", float(r), ms, m.mb, isa)
                if k == 0:
                    switch = switch_us(cm)
    return rows, switch


def switch_us(cm, n: int = 2000) -> float:
    """Median cost of one ``set_ratio`` call on a compiled module, in microseconds."""
    ratios = itertools.cycle(cm.ratios)
    return 1e3 * median_ms(lambda: cm.set_ratio(next(ratios)), n, warmup=0)


KERNEL_SHAPES = {  # name: (channels, spatial size, outputs, kernel size)
    "conv3x3_64x64_28x28": (64, 28, 64, 3),
    "conv1x1_256x256_14x14": (256, 14, 256, 1),
    "linear_768x768_197tok": (768, None, 768, 1),
}


def bench_kernels(ratios=(0.0, 0.5, 1.0), number: int = 20, repeat: int = 7,
                  isas=None) -> list[dict]:
    """One FlexiQ GEMM kernel per shape on random codes, at each ratio (median µs), for each
    ISA of ``isas`` (default: :func:`isas_to_bench`)."""
    out = []
    for isa in isas or isas_to_bench():
        out += _bench_kernels(isa, ratios, number, repeat)
    return out


def isas_to_bench() -> list[str]:
    """The host's best ISA and, where that is a VNNI one, the AVX2 build beside it (the honest
    stand-in for an AVX2-only CPU)."""
    from .hostcpu import best_isa

    best = best_isa()
    return [best] + (["avx2"] if best != "avx2" else [])


def _bench_kernels(isa, ratios, number, repeat) -> list[dict]:
    import tvm

    from . import frontend
    from .schedules.llvm import PASS_CONFIG, kernel_target, kernels
    from .schedules.llvm.mixed import TO, TP, LowLayout, k_group, pack_w8

    def rup(v, m):
        return -(-v // m) * m

    target = kernel_target(frontend.default_llvm_target(), isa)
    lib_k = kernels(isa)
    rng = np.random.default_rng(0)
    out = []
    for name, (c, hw, o, k) in KERNEL_SHAPES.items():
        if hw is None:
            hp, wp, oh, ow = 1, 197, 1, 197
        else:
            hp = wp = hw + 2 * (k // 2)
            oh = ow = hw
        cpad, opad, kk = rup(c, k_group(isa)), rup(o, TO), k * k
        # realistic total shifts (5..8, as calibrated on the zoo) in several runs
        low = LowLayout(rng.integers(5, 9, size=c), c, kk)
        f = lib_k["mixed_gemm"](1, hp, wp, cpad, low.slots, low.max_chunks(), k, k, (1, 1),
                                (1, 1), oh, ow, opad, "OP")
        with tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
            lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                              target=target)
        q8 = tvm.runtime.tensor(rng.integers(0, 256, (1, hp, wp, cpad)).astype(
            lib_k["q8_dtype"]))
        q4 = tvm.runtime.tensor(rng.integers(0, 16, (1, hp, wp, low.slots)).astype(np.uint8))
        w8 = tvm.runtime.tensor(pack_w8(
            rng.integers(-127, 128, (kk * cpad, opad)).astype(np.int8), isa))
        w4 = tvm.runtime.tensor(low.pack(rng.integers(-8, 8, (kk, c, o)), opad))
        acc = tvm.runtime.empty((1, opad, rup(oh * ow, TP)), "int32")
        slot = tvm.runtime.tensor(low.slot_shift(rng.integers(0, 5, size=c)))
        corr = tvm.runtime.tensor(np.zeros(opad, np.int32))
        timer = lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=repeat)
        for r in ratios:
            n_low = round(r * c)
            rows = low.chunks(n_low)
            table = np.zeros((low.max_chunks(), 3), np.int32)
            table[: len(rows)] = rows
            args = (q8, q4, w8, w4, slot, tvm.runtime.tensor(table),
                    (rows[:, 1] > 0).sum().item(), corr, n_low, acc)
            if r == ratios[0]:  # the first timing also pays for the thread pool and page
                timer(*args)  # faults: one discarded run
            res = timer(*args)
            us = 1e6 * float(np.median(res.results))
            macs = oh * ow * o * c * kk
            out.append({"name": name, "ratio": r, "median_us": us, "gmacs": macs / us / 1e3,
                        "isa": isa})
            log.info("kernel %s %s r%g: %.1f us (%.1f GMAC/s)", name, isa, r, us,
                     macs / us / 1e3)
    return out


def run(models=DEFAULT_MODELS, batches=(1, 32), ratios=(0.0, 0.25, 0.5, 0.75, 1.0),
        repeat: int = 20, systems=(*PEERS, "flexiq-llvm"), kernels: bool = True,
        isas=None) -> dict:
    """The whole benchmark as the DESIGN.md ``bench`` document; FlexiQ for each of ``isas``
    (default :func:`isas_to_bench`; the first is the one the summary compares)."""
    isas = list(isas or isas_to_bench())
    doc = {"machine": machine(), "rows": [], "kernels": [], "switch_us": None, "isas": isas}
    switches = []
    if kernels:
        doc["kernels"] = bench_kernels(isas=isas)
    for name in models:
        for b in batches:
            rows, sw = bench_model(name, b, ratios, repeat, systems, isas=isas)
            doc["rows"].extend(rows)
            if sw == sw:  # not NaN
                switches.append(sw)
    if switches:
        doc["switch_us"] = float(np.median(switches))
    doc["summary"] = summarize(doc)
    return doc


def summarize(doc: dict) -> dict:
    """Ratios between systems, per model and batch: speedup of each ratio over ratio 0, and
    each peer's time over FlexiQ's at ratios 0 and 1 (> 1: FlexiQ faster); kernel speedups."""
    out: dict = {"models": [], "kernels": []}
    keys = sorted({(r["model"], r["batch"]) for r in doc["rows"]})
    isas = doc.get("isas") or sorted({r.get("isa") for r in doc["rows"]
                                      if r["system"] == "flexiq-llvm"} - {None}) or [None]

    def figures(fq, peers):
        entry = {}
        if 0.0 in fq:
            entry["speedup_vs_r0"] = {f"{k:g}": fq[0.0] / v for k, v in fq.items()}
            for lab, r in (("r0", 0.0), ("r1", 1.0)):
                if r in fq:
                    entry[f"peer_over_{lab}"] = {p: t / fq[r] for p, t in peers.items()}
        return entry

    for model, batch in keys:
        rs = [r for r in doc["rows"] if r["model"] == model and r["batch"] == batch]
        peers = {r["system"]: r["median_ms"] for r in rs if r["system"] != "flexiq-llvm"}
        by_isa = {}
        for isa in isas:
            fq = {r["ratio"]: r["median_ms"] for r in rs
                  if r["system"] == "flexiq-llvm" and r.get("isa") in (isa, None)}
            by_isa[isa] = figures(fq, peers)
        entry = {"model": model, "batch": batch, **by_isa[isas[0]]}
        if len(isas) > 1:
            entry["by_isa"] = by_isa
        if peers:
            entry["fastest_peer"] = min(peers, key=peers.get)
        out["models"].append(entry)
    kern = {}
    for k in doc.get("kernels", []):
        kern.setdefault((k["name"], k.get("isa")), {})[k["ratio"]] = k["median_us"]
    for (name, isa), t in kern.items():
        if 0.0 in t:
            out["kernels"].append({"name": name, "isa": isa,
                                   **{f"speedup_r{r:g}": t[0.0] / v for r, v in t.items()}})
    return out


def print_bench(doc: dict) -> None:
    m = doc["machine"]
    print(f"machine: {m.get('cpu', '?')}, {m.get('cores')} cores, {' '.join(m.get('simd', []))}")
    if doc["kernels"]:
        print(f"  {'kernel':<24} {'isa':<11} {'ratio':>5} {'us':>10} {'GMAC/s':>8}")
        for k in doc["kernels"]:
            print(f"  {k['name']:<24} {k.get('isa') or '-':<11} {k['ratio']:>5g} "
                  f"{k['median_us']:>10.1f} {k['gmacs']:>8.1f}")
    print(f"  {'model':<28} {'batch':>5} {'system':<18} {'isa':<11} {'ratio':>5} {'ms':>10} "
          f"{'+MB':>7}")
    for r in doc["rows"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:g}"
        print(f"  {r['model']:<28} {r['batch']:>5} {r['system']:<18} {r.get('isa') or '-':<11} "
              f"{ratio:>5} {r['median_ms']:>10.3f} {r['peak_mem_mb']:>7.1f}")
    if doc.get("switch_us") is not None:
        print(f"  ratio switch (set_ratio): {doc['switch_us']:.2f} us")
    for e in doc.get("summary", {}).get("models", []):
        if "peer_over_r0" in e:
            po0 = ", ".join(f"{p} {v:.2f}x" for p, v in e["peer_over_r0"].items())
            print(f"  {e['model']} b{e['batch']}: peers / flexiq r0: {po0}")
        if "peer_over_r1" in e:
            po1 = ", ".join(f"{p} {v:.2f}x" for p, v in e["peer_over_r1"].items())
            print(f"  {e['model']} b{e['batch']}: peers / flexiq r1: {po1}")


# ------------------------------------------------------------------------ FlexiNPU


def bench_npu(models=DEFAULT_MODELS, ratios=(0.0, 0.25, 0.5, 0.75, 1.0), config=None,
              n_switch: int = 2000) -> dict:
    """Cycles and modeled latency per ratio of each model on the simulated FlexiNPU (batch 1,
    one test image), per layer program, plus the ratio-switch cost (instruction patching).

    Rows follow the bench keys with ``system="flexiq-npu"`` and ``median_ms`` the *modeled*
    latency (NPU cycles / clock; host ops are not modeled); cycles are in ``npu``.
    """
    import flexiq_tvm

    from .config import FlexiQConfig
    from .eval import load_eval_data, zoo_plan
    from .target import npu
    from .zoo import registry

    config = config or npu.NPUConfig()
    doc = {"machine": machine(), "rows": [], "kernels": [], "switch_us": None,
           "npu": {"config": {k: getattr(config, k) for k in config.__dataclass_fields__},
                   "models": []}}
    switches = []
    for name in models:
        model = registry.get_model(name)
        cfg = FlexiQConfig(selection="static", calib_images=32, ratios=tuple(ratios))
        plan = zoo_plan(name, model, cfg)
        _, x, _ = load_eval_data(name, 1)
        cm = flexiq_tvm.compile(model, x, plan=plan, target="flexiq_npu", config=cfg,
                                npu_config=config)
        per_ratio = {}
        for r in cm.ratios:
            npu.read_stats(cm, reset=True)
            cm(x, ratio=r)
            per_ratio[r] = npu.read_stats(cm, reset=True)
        totals = {r: {k: sum(p[k] for p in progs) for k in npu.STAT_FIELDS}
                  for r, progs in per_ratio.items()}
        for r, t in totals.items():
            doc["rows"].append({"model": name, "batch": int(x.shape[0]), "system": "flexiq-npu",
                                "ratio": r, "median_ms": t["total_cycles"] / config.clock_mhz
                                / 1e3, "peak_mem_mb": None, **t})
        t0, t1 = totals[ratios[0]]["total_cycles"], totals[ratios[-1]]["total_cycles"]
        mid = 0.5 if 0.5 in totals else None
        layers = []
        for i, p0 in enumerate(per_ratio[ratios[0]]):
            p1 = per_ratio[ratios[-1]][i]
            layers.append({"symbol": p0["symbol"], "layer": p0["layer"], "pattern": p0["pattern"],
                           "compute_bound": p0["compute_cycles"] > max(p0["dma_cycles"],
                                                                      p0["vector_cycles"]),
                           "compute_ratio_r0_over_r1": (p0["compute_cycles"] / p1["compute_cycles"]
                                                        if p1["compute_cycles"] else None),
                           "cycles": {f"{r:g}": per_ratio[r][i]["total_cycles"]
                                      for r in per_ratio},
                           "compute_cycles": {f"{r:g}": per_ratio[r][i]["compute_cycles"]
                                              for r in per_ratio},
                           "dma_cycles": {f"{r:g}": per_ratio[r][i]["dma_cycles"]
                                          for r in per_ratio}})
        eligible = {lp.name for lp in plan.layers if lp.eligible}
        cb = [L["compute_ratio_r0_over_r1"] for L in layers
              if L["compute_bound"] and L["layer"] in eligible]
        sw = switch_us(cm, n_switch)
        switches.append(sw)
        doc["npu"]["models"].append({
            "model": name, "programs": len(layers), "covered_layers": len(cm.report.covered),
            "kept_on_host": [c["layer"] for c in cm.report.covered if c["device"] == "cpu"]
            + [k["op"] for k in cm.report.kept_fp32],
            "total_cycles": {f"{r:g}": t["total_cycles"] for r, t in totals.items()},
            "speedup_vs_r0": {f"{r:g}": t0 / t["total_cycles"] for r, t in totals.items()},
            "gain_fraction_r0.5": ((t0 - totals[mid]["total_cycles"]) / (t0 - t1)
                                   if mid is not None and t0 != t1 else None),
            "compute_bound_layers": len(cb),
            "compute_bound_min_ratio": min(cb) if cb else None,
            "compute_bound_median_ratio": float(np.median(cb)) if cb else None,
            "switch_us": sw, "layers": layers})
        log.info("npu %s: cycles %s", name, {f"{r:g}": t["total_cycles"]
                                              for r, t in totals.items()})
    doc["switch_us"] = float(np.median(switches)) if switches else None
    return doc


def print_npu(doc: dict) -> None:
    c = doc["npu"]["config"]
    print(f"FlexiNPU model: {c['rows']}x{c['cols']} array (8-bit MAC or 2x 4-bit), "
          f"DMA {c['dma_bytes_per_cycle']} B/cycle, {c['vector_lanes']} vector lanes, "
          f"{c['clock_mhz']:g} MHz")
    print(f"  {'model':<20} {'ratio':>5} {'cycles':>10} {'compute':>10} {'dma':>9} "
          f"{'vector':>9} {'modeled ms':>10} {'speedup':>8}")
    for m in doc["npu"]["models"]:
        for r in doc["rows"]:
            if r["model"] != m["model"]:
                continue
            key = f"{r['ratio']:g}"
            print(f"  {m['model']:<20} {r['ratio']:>5g} {r['total_cycles']:>10} "
                  f"{r['compute_cycles']:>10} {r['dma_cycles']:>9} {r['vector_cycles']:>9} "
                  f"{r['median_ms']:>10.4f} {m['speedup_vs_r0'][key]:>7.2f}x")
        gf = m["gain_fraction_r0.5"]
        print(f"  {m['model']}: {m['programs']} NPU programs; ratio 0.5 gets "
              f"{'n/a' if gf is None else f'{100 * gf:.0f} %'} of the ratio-1.0 gain; "
              f"{m['compute_bound_layers']} compute-bound eligible layers, compute cycles "
              f"r0/r1 min {m['compute_bound_min_ratio'] or 0:.2f}x, median "
              f"{m['compute_bound_median_ratio'] or 0:.2f}x; switch {m['switch_us']:.2f} us")
