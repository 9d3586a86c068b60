"""``flexiq_tvm.compile``: model + calibration data -> one module with a function per ratio."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from . import _quiet
from ._quiet import native_stderr
from .config import FlexiQConfig
from .lowering import TARGETS, cuda_target, epilogue_fusion, lowering, resolve_database
from .plan import QuantPlan
from .runtime.module import FlexiQModule

log = logging.getLogger(__name__)

@dataclass
class CompileReport:
    """What the compiler did: covered layers, what stayed FP32 and why, gathers, memory."""

    covered: list[dict] = field(default_factory=list)
    kept_fp32: list[dict] = field(default_factory=list)
    gathers: list[str] = field(default_factory=list)
    fused: list[dict] = field(default_factory=list)
    unfused: list[dict] = field(default_factory=list)
    weight_bytes: dict = field(default_factory=dict)
    ratios: list[float] = field(default_factory=list)
    times_s: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The report as JSON types (the ``report`` key of compile's JSON and metadata)."""
        return {"covered": self.covered, "kept_fp32": self.kept_fp32, "gathers": self.gathers,
                "fused": self.fused, "unfused": self.unfused,
                "weight_bytes": self.weight_bytes, "ratios": self.ratios,
                "times_s": self.times_s}

    def summary(self) -> str:
        """A few human-readable lines: coverage, weight bytes, what stayed FP32, gathers."""
        wb = self.weight_bytes
        lines = [
            f"covered layers: {len(self.covered)}  kept FP32: {len(self.kept_fp32)}  "
            f"gathers: {len(self.gathers)}",
            f"weights: INT8 {wb.get('int8', 0)} B, packed INT4 {wb.get('int4_packed', 0)} B "
            f"(+{100 * wb.get('int4_packed', 0) / max(wb.get('int8', 1), 1):.1f} %), "
            f"FP32 (uncovered) {wb.get('fp32', 0)} B",
        ]
        lines += [f"  FP32: {k['op']} {k.get('shape')} ({k['reason']})" for k in self.kept_fp32]
        lines += [f"  gather before {g}" for g in self.gathers]
        if self.fused or self.unfused:
            why: dict = {}
            for u in self.unfused:
                why.setdefault(u["reason"], []).append(u["layer"])
            lines.append(f"fused epilogues: {len(self.fused)} layers get their input codes "
                         "straight from the layer before")
            lines += [f"  unfused ({r}): " + (", ".join(ls) if len(ls) <= 3
                                              else f"{len(ls)} layers")
                      for r, ls in why.items()]
        return "\n".join(lines)


class CompiledModule(FlexiQModule):
    """A compiled FlexiQ module: ``mod(x)``, ``mod(x, ratio=r)``, ``mod.set_ratio(r)``,
    ``mod.ratios``, ``mod.report``, ``mod.export(path)`` (see
    :class:`flexiq_tvm.runtime.FlexiQModule`, which this extends with the compile report, the
    plan and, with ``expose_layers``, every covered layer's tensors)."""

    def __init__(self, executable, ratios, input_shape, report: CompileReport, plan: QuantPlan,
                 device=None, expose_layers: bool = False, layers=None,
                 metadata: dict | None = None, exportable=None) -> None:
        super().__init__(executable, ratios, input_shape, "float32", device=device,
                         metadata=metadata, exportable=exportable)
        self.report = report
        self.plan = plan
        self.expose_layers = expose_layers
        self.layers = layers or []

    def layer_tensors(self, x, ratio: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per covered layer ``(input, int32 accumulator)`` (needs ``expose_layers=True``)."""
        if not self.expose_layers:
            raise ValueError("compile with expose_layers=True to read layer tensors")
        return super().layer_tensors(x, ratio)


def _kept_fp32(mod) -> list[dict]:
    from .transform import _graph as g

    out = []
    for b in g.bindings(mod["main"]):
        op = g.op_name(b.value)
        if op in ("relax.nn.conv2d", "relax.matmul"):
            w = g.const_np(b.value.args[1]) if len(b.value.args) > 1 else None
            reason = ("no plan layer has these weights" if w is not None
                      else "activation x activation (attention) matmul stays FP32")
            shape = list(g.shape_of(b.var))
            macs = 0
            if w is not None:  # per image: output elements x reduction length
                red = int(np.prod(w.shape[1:])) if op == "relax.nn.conv2d" else int(w.shape[0])
                macs = int(np.prod(shape[1:])) * red
            out.append({"op": op, "shape": shape, "reason": reason,
                        "weight_bytes": 0 if w is None else int(w.nbytes), "macs": macs})
    return out


def _warn_uncovered(kept: list[dict], plan: QuantPlan, missing: list[str]) -> None:
    """One warning when more than 3 % of the weighted layers' MACs stay in FP32 (a plan that
    does not fit the graph, e.g. computed on other weights), naming them and why."""
    left = [k for k in kept if k.get("macs")]
    if not left and not missing:
        return
    covered = sum(lp.in_channels * lp.macs_per_channel for lp in plan.layers
                  if lp.name not in missing)
    fp32 = sum(k["macs"] for k in left)
    if missing or fp32 > 0.03 * (covered + fp32):
        names = [f"{k['op']} {k['shape']}" for k in left[:4]] + missing[:4]
        log.warning("%.0f %% of the weighted layers' MACs stay in FP32 (%d ops: %s%s); "
                    "the report's kept_fp32 says why", 100 * fp32 / max(1, covered + fp32),
                    len(left) + len(missing), ", ".join(names),
                    ", ..." if len(left) + len(missing) > len(names) else "")


def compile(model, example_input, calib_data=None, target="llvm",
            config: FlexiQConfig | None = None, plan: QuantPlan | None = None,
            via: str = "torch.export", expose_layers: bool = False,
            progress: bool = False, npu_config=None, database="auto",
            isa: str | None = None, fuse_epilogues: bool = True) -> CompiledModule:
    """Quantize (unless ``plan`` is given) and compile a model into a FlexiQ module.

    Parameters
    ----------
    model
        A ``torch.nn.Module``; a saved ``torch.export`` program (``.pt2`` path or
        ``ExportedProgram``); or an ONNX model (path, bytes or ``ModelProto``): without a
        ``plan``, an ONNX model is calibrated and searched on its own graph (run in torch by
        :mod:`flexiq_tvm.onnx_torch`), no torch source needed.
    example_input
        A tensor / array of the input shape (the module is compiled for this shape).
    calib_data
        float32 calibration images (needed when ``plan`` is None).
    target
        ``"llvm"`` (this machine's CPU), ``"flexiq_npu"`` (the simulated FlexiNPU through
        BYOC: covered layers with their epilogues and residual adds run as NPU programs, the
        rest on the CPU; one entry function, the ratio is switched by patching the programs'
        boundary registers), or a CUDA target with its architecture, e.g. ``{"kind":
        "cuda", "arch": "sm_80"}`` (covered GEMM layers on tensor-core ``mma.sync`` from
        sm_80, the 4-bit block on s4 MMA up to sm_89 and as INT8 MMA on sm_90, on dp4a for
        sm_61..sm_75; grouped convs and the FP32 rest on CUDA cores; runs on
        ``tvm.cuda(0)``, compiles without a GPU).
    config
        :class:`FlexiQConfig` (ratios, selection, ...).
    via
        Frontend for torch models: ``"torch.export"`` or ``"onnx"``.
    expose_layers
        Also return every covered layer's input and int32 accumulator (for oracle checks;
        llvm only).
    npu_config
        :class:`flexiq_tvm.target.npu.NPUConfig` for ``target="flexiq_npu"`` (default one).
    database
        MetaSchedule records for the non-FlexiQ PrimFuncs (``flexiq-tvm tune``): ``"auto"``
        applies ``schedules/llvm/tuned`` (``schedules/cuda/tuned`` for CUDA) when it exists,
        a path applies that work dir, ``None`` none. The report's ``times_s`` notes which was used.
    isa
        The CPU kernels' instruction set (llvm, and the CPU part of flexiq_npu): ``"avx2"``
        (``vpmaddwd`` / ``vpmaddubsw``), ``"avxvnni"`` or ``"avx512vnni"`` (``vpdpbusd``);
        default: the fastest this CPU has (:func:`flexiq_tvm.hostcpu.best_isa`, or the
        ``FLEXIQ_ISA`` variable). One this CPU lacks is an error. An ``avx2`` build on a VNNI
        machine stands in for an AVX2-only CPU (Zen 3, older Intel).
    fuse_epilogues
        llvm: run each covered layer's dequantizer, the FP32 glue after it (bias, batch norm,
        ReLU / ReLU6, residual add, a channel gather) and the next covered layer's quantizer
        as one kernel (:class:`flexiq_tvm.transform.FuseRequantize`); bit-identical to the
        unfused module. The report's ``fused`` / ``unfused`` list each layer. Off with
        ``expose_layers`` (the layer inputs it exposes are the FP32 tensors fusion removes).
    """
    import tvm

    from . import frontend, hostcpu, transform
    from .quantize import quantize
    from .schedules.llvm import build as llvm_build
    from .schedules.llvm import kernel_target

    cuda = cuda_target(target)
    if cuda is None and target not in TARGETS:
        raise ValueError(f"target={target!r}; available: {TARGETS} or a CUDA target "
                         '({"kind": "cuda", "arch": "sm_80"})')
    isa = None if cuda is not None else hostcpu.check_isa(isa)
    config = config or FlexiQConfig()
    times = {}
    t0 = time.perf_counter()
    x = example_input.numpy() if hasattr(example_input, "numpy") else np.asarray(example_input)
    model = _torch_program(model)
    if plan is None:
        if calib_data is None:
            raise ValueError("calib_data is required when no plan is given")
        calib = _checked_calibration(calib_data, x.shape)
        # an ONNX-only model is calibrated and searched on the graph the compiler imports,
        # run in torch (flexiq_tvm.onnx_torch): its plan finds its layers by their weights
        source = (model if frontend.is_torch_module(model)
                  else frontend.onnx_calibration_model(model, x.astype(np.float32)))
        plan = quantize(source, calib, config, progress=progress)
    times["quantize"] = time.perf_counter() - t0
    ratios = [float(r) for r in config.ratios]
    for r in ratios:
        plan.check_ratio(r)
    t0 = time.perf_counter()
    imported = frontend.import_model(model, x.astype(np.float32), via=via)
    ret = imported.mod["main"].ret_ty
    n_outputs = len(ret.fields) if hasattr(ret, "fields") else 1
    mod = transform.prepare()(imported.bound())
    if target == "flexiq_npu":
        if expose_layers:
            raise ValueError("expose_layers is for target='llvm' (the NPU's per-layer oracle "
                             "check runs its programs in flexiq_tvm.target.npu.sim)")
        return _compile_npu(mod, x, plan, ratios, via, times, npu_config, isa)
    mod = transform.AnnotateChannelPrecision(plan)(mod)
    mod = transform.ReorderChannelBlocks(plan)(mod)
    kept = _kept_fp32(mod)
    qpass = lowering(plan, ratios, cuda, expose_layers, isa)
    mod = qpass(mod)
    fpass = None
    if cuda is None and fuse_epilogues and not expose_layers:
        fpass = epilogue_fusion(isa)
        mod = fpass(mod)
    times["passes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if cuda is not None:
        from .schedules.cuda import pipeline as cuda_pipeline

        tgt, db, device = cuda, resolve_database(database, "cuda"), tvm.cuda(0)
        with tvm.transform.PassContext(opt_level=3), _quiet_build():
            ex = tvm.compile(mod, target=tgt, relax_pipeline=cuda_pipeline.pipeline(tgt, db))
    else:
        tgt, device = tvm.target.Target(frontend.default_llvm_target()), None
        db = resolve_database(database)
        with _quiet_build():
            ex = llvm_build(mod, tgt, db)
    times["build"] = time.perf_counter() - t0
    report = CompileReport(ratios=ratios, times_s=times, kept_fp32=kept)
    if fpass is not None:
        report.fused, report.unfused = fpass.fused, fpass.fallbacks
    int8 = int4 = 0
    for L in qpass.layers:
        report.covered.append({"layer": L.lp.name, "kind": L.kind.split(".")[1],
                               "grouped": L.grouped, "gather": L.gather,
                               "n_low": {k: int(v) for k, v in L.lp.n_low.items()}})
        if L.gather:
            report.gathers.append(L.lp.name)
        int8 += L.w_bytes["int8"]
        int4 += L.w_bytes["int4_packed"]
    fp32 = sum(k["weight_bytes"] for k in kept)
    report.weight_bytes = {"int8": int8, "int4_packed": int4, "fp32": fp32}
    missing = [lp.name for lp in plan.layers if lp.name not in {c["layer"] for c in report.covered}]
    for name in missing:
        report.kept_fp32.append({"op": name, "shape": None,
                                 "reason": "plan layer not found in the graph"})
    _warn_uncovered(kept, plan, missing)
    log.info("compiled %d layers x %d ratios in %.1f s", len(qpass.layers), len(ratios),
             sum(times.values()))
    meta = {"target": _target_json(tgt), "database": db, "isa": isa,
            "kernel_target": None if isa is None else _target_json(kernel_target(tgt, isa)),
            "model": plan.model, "via": via, "plan": _plan_summary(plan, ratios),
            "report": report.as_dict(), "num_outputs": n_outputs,
            "expose_layers": bool(expose_layers)}
    return CompiledModule(ex, ratios, x.shape, report, plan, device=device,
                          expose_layers=expose_layers, layers=qpass.layers,
                          metadata=json_safe(meta))


def _torch_program(model):
    """A saved ``torch.export`` program (a ``.pt2`` path or an ``ExportedProgram``) as the
    torch module calibration and the compiler share (:mod:`flexiq_tvm.pt2_torch`); any other
    model as it is."""
    from pathlib import Path

    if isinstance(model, str | Path) and Path(model).suffix == ".pt2":
        from . import pt2_torch

        return pt2_torch.to_torch(pt2_torch.load(model))
    if type(model).__name__ == "ExportedProgram":
        from . import pt2_torch

        return pt2_torch.to_torch(model)
    return model


def _checked_calibration(calib_data, example_shape) -> np.ndarray:
    """Calibration samples as float32 ``(N, *sample)``, or one line saying what is wrong."""
    try:
        calib = np.asarray(calib_data, np.float32)
    except (TypeError, ValueError):
        raise ValueError(f"calibration data must be an array of numbers, got "
                         f"{type(calib_data).__name__}") from None
    sample = tuple(example_shape[1:])
    if calib.ndim != len(example_shape) or tuple(calib.shape[1:]) != sample:
        raise ValueError(f"calibration data has shape {calib.shape}; expected (N, "
                         f"{', '.join(map(str, sample))}) like the example input "
                         f"{tuple(example_shape)}")
    if not np.isfinite(calib).all():
        raise ValueError("calibration data contains NaN or infinity")
    if len(calib) < 8:
        raise ValueError(f"{len(calib)} calibration samples; at least 8 are needed (a few "
                         "hundred are best)")
    return calib


def _quiet_build():
    """What TVM's C++ side prints during a build that is benign here (see :mod:`._quiet`):
    legalizing ``R.take`` in its default "fast" mode warns once per gather that out-of-bounds
    indices would crash, and ours are constant permutations, in bounds by construction
    (ReorderChannelBlocks); MetaScheduleApplyDatabase announces the database it opens (the
    report's ``database`` says which)."""
    return native_stderr(_quiet.FAST_TAKE, _quiet.JSON_DATABASE)


def _plan_summary(plan: QuantPlan, ratios) -> dict:
    """What a module's metadata says of its plan."""
    return {"layers": len(plan.layers), "selection": plan.config.get("selection"),
            "mac_fraction": {f"{r:g}": plan.mac_fraction(r) for r in ratios},
            "channel_fraction": {f"{r:g}": plan.channel_fraction(r) for r in ratios}}


def _compile_npu(mod, x, plan, ratios, via, times, npu_config, isa) -> CompiledModule:
    import tvm

    from . import frontend
    from .schedules import llvm
    from .target import npu

    t0 = time.perf_counter()
    with _quiet_build():
        ex, info = npu.build(mod, plan, ratios, (llvm.kernels(isa), llvm.build), npu_config)
    times["build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lib = ex.jit()  # compiles the NPU module's C source: one library, one instruction memory
    times["jit"] = time.perf_counter() - t0
    on_npu = {p["layer"]: p["symbol"] for p in info["programs"] if p["layer"]}
    on_cpu = set(info["host_flexiq_layers"])
    report = CompileReport(ratios=ratios, times_s=times)
    for lp in plan.layers:
        if lp.name in on_npu or lp.name in on_cpu:
            report.covered.append({"layer": lp.name, "kind": lp.kind, "grouped": lp.groups > 1,
                                   "gather": False, "device": "npu" if lp.name in on_npu
                                   else "cpu", "npu_program": on_npu.get(lp.name),
                                   "n_low": {k: int(v) for k, v in lp.n_low.items()}})
        else:
            report.kept_fp32.append({"op": lp.name, "shape": None,
                                     "reason": "plan layer not found in the graph"})
    int8 = sum(lp.w_codes.size for lp in plan.layers if lp.name in on_npu)
    report.weight_bytes = {"int8": int8, "int4_packed": int8 // 2, "fp32": 0}
    host_target = tvm.target.Target(frontend.default_llvm_target())
    meta = {"target": "flexiq_npu", "model": plan.model, "via": via,
            "host_target": _target_json(host_target), "isa": isa,
            "kernel_target": _target_json(llvm.kernel_target(host_target, isa)),
            "plan": _plan_summary(plan, ratios),
            "ratio_switch": {"entry": info["entry"], "function": info["set_ratio"]},
            "npu": info, "report": report.as_dict()}
    return CompiledModule(lib, ratios, x.shape, report, plan, metadata=json_safe(meta),
                          exportable=ex)


def _target_json(tgt) -> dict | str:
    """A TVM target as a JSON object (its ``str`` is JSON in TVM 0.27; kept as text if not)."""
    import json

    try:
        return json.loads(str(tgt))
    except ValueError:
        return str(tgt)


def json_safe(obj):
    """``obj`` with numpy scalars/arrays and TVM containers turned into JSON types."""
    import json

    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist")
                                 else str(o)))


def layer_records(cm: CompiledModule) -> list[dict]:
    """JSON records of the covered layers of ``cm`` (compiled with ``expose_layers=True``),
    in the order of its exposed tensors: what :func:`accumulator_mismatches` needs besides the
    plan, so a module can be checked where it runs (a loaded artifact, no compiler)."""
    return [{"name": L.lp.name, "kind": L.kind,
             "in_perm": [int(i) for i in L.in_perm], "out_perm": [int(i) for i in L.out_perm],
             # top, left, bottom, right, as the graph's conv pads
             "padding": ([int(v) for v in L.conv_attrs.padding]
                         if L.kind == "flexiq.conv2d" else None)}
            for L in cm.layers]


def accumulator_mismatches(records: list[dict], plan: QuantPlan, pairs, ratio: float
                           ) -> list[tuple[str, int]]:
    """Compare each covered layer's int32 accumulator with the integer oracle fed the same
    layer input. ``records``: :func:`layer_records`; ``pairs``: per layer ``(input,
    accumulator)`` as the module produced them (``FlexiQModule.layer_tensors``).

    Returns ``[(layer, max |difference|)]`` for the layers that differ: empty means bit-exact.
    """
    from . import reference as ref

    bad = []
    for rec, (xin, acc) in zip(records, pairs, strict=True):
        lp = plan.layer(rec["name"])
        in_perm, out_perm = np.asarray(rec["in_perm"]), np.asarray(rec["out_perm"])
        xo = np.empty_like(xin)
        if rec["kind"] == "flexiq.conv2d":
            xo[:, in_perm] = xin
            pad = rec["padding"]
            if tuple(lp.padding) != (pad[0], pad[2], pad[1], pad[3]):
                # the graph pads with a separate op (TF "same" padding): the layer's input
                # is already padded, its conv pads as the graph says
                lp = dataclasses.replace(lp, padding=(pad[0], pad[2], pad[1], pad[3]))
            want = ref.layer_forward(xo, lp, lp.low_mask(ratio))[0][:, out_perm]
            n, o, h, w = want.shape
            got = acc.reshape(n, acc.shape[1], -1)[:, :o, : h * w].reshape(want.shape)
        else:
            xo[..., in_perm] = xin
            want = ref.layer_forward(xo.reshape(-1, xo.shape[-1]), lp,
                                     lp.low_mask(ratio))[0][:, out_perm]
            got = acc[0, : want.shape[0], : want.shape[1]]
        if not np.array_equal(got, want):
            bad.append((lp.name, int(np.abs(got.astype(np.int64) - want).max())))
    return bad


def oracle_mismatches(cm: CompiledModule, x, ratio: float) -> list[tuple[str, int]]:
    """:func:`accumulator_mismatches` of ``cm`` (compiled with ``expose_layers=True``) on
    input ``x`` at ``ratio``: empty means every covered layer is bit-exact."""
    return accumulator_mismatches(layer_records(cm), cm.plan, cm.layer_tensors(x, ratio), ratio)
