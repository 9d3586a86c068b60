"""llvm (x86 CPU) kernels for FlexiQ mixed-precision layers: hand-scheduled TensorIR templates,
and the Relax pipeline and build that put a module around them."""

from __future__ import annotations

import json

import tvm

from . import mixed, requant
from .injective import ScheduleInjective, schedule_injective

__all__ = ["PASS_CONFIG", "ScheduleInjective", "build", "kernel_target", "kernels", "pipeline",
           "schedule_injective", "split_kernels"]

# TIR StorageRewrite in TVM 0.27 folds the GEMM's int16 register tile into the memory of its
# int16 weight panel while the panel is still read (wrong results for some shapes, e.g. 2
# input channels with a 3x3 kernel). Every build of these kernels runs with it switched off.
PASS_CONFIG = {"tirx.disable_storage_rewrite": True}

ISA_ATTR = "flexiq.isa"  # an integer-only kernel, built with its ISA's kernel target


def kernels(isa: str | None = None) -> dict:
    """The llvm kernel library for ``isa`` (:func:`.mixed.kernels`: the quantizers, GEMMs,
    dequantizers and the ISA's operand layout) plus the fused epilogues of :mod:`.requant`
    (``requantize_nhwc``, ``requantize_padded``; float glue, so built in the module's own
    target with FMA off, never the ISA's kernel target)."""
    k = mixed.kernels(isa)
    k["requantize_nhwc"] = mixed.scheduled(requant.requantize_nhwc, k["isa"])
    k["requantize_padded"] = mixed.scheduled(requant.requantize_padded)
    return k


def pipeline(target: tvm.target.Target, database: str | None = None) -> tvm.transform.Pass:
    """TVM's default CPU Relax pipeline plus :class:`ScheduleInjective` after fusion (the
    FP32 glue between FlexiQ kernels gets one parallel, vectorised loop per fused chain).

    ``database``: a MetaSchedule work dir (``flexiq-tvm tune``); its records are applied after
    fusion, and ScheduleInjective then handles only what the database did not."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="FlexiQLLVMPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:  # the database pass reads the current target when it is made
            tuned = [relax.transform.MetaScheduleApplyDatabase(str(database))] if database else []
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target) + cpu.legalize_passes(target) + tuned
                + [ScheduleInjective()] + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target))
            return seq(mod)

    return _pipeline


def kernel_target(target, isa: str) -> tvm.target.Target:
    """``target`` (the module's llvm target: a dict or ``Target``) with the ``mattr`` of
    ``isa``'s integer kernels (:func:`flexiq_tvm.hostcpu.kernel_mattr`)."""
    from flexiq_tvm.hostcpu import kernel_mattr

    t = dict(target) if isinstance(target, dict) else json.loads(str(target))
    t["mattr"] = kernel_mattr(isa)
    return tvm.target.Target(t)


def split_kernels(mod: tvm.IRModule) -> tuple[tvm.IRModule, dict[str, tvm.IRModule]]:
    """Take the integer kernels (PrimFuncs marked ``flexiq.isa``) out of ``mod``: each
    ``call_tir`` of one becomes a ``call_dps_packed`` of its symbol (``flexiq_<name>``), and the
    kernels come back as one TIR module per ISA, to be built with :func:`kernel_target`.

    Why: TVM builds every llvm function of a module with one LLVM target machine, and that
    one has FMA off (the glue must round like the oracle), which on x86 also switches
    AVX-512 off. The kernels hold no float arithmetic and may use any ISA."""
    from tvm import relax

    kernels_ = {gv: f for gv, f in mod.functions.items()
                if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None
                and ISA_ATTR in f.attrs}
    if not kernels_:
        return mod, {}
    symbol = {gv: f"flexiq_{gv.name_hint}" for gv in kernels_}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    @relax.expr_functor.mutator
    class _Extern(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if call.op.same_as(call_tir) and call.args[0] in symbol:
                out = list(call.ty_args)
                return relax.call_dps_packed(relax.ExternFunc(symbol[call.args[0]]),
                                             call.args[1], out if len(out) > 1 else out[0])
            return call

    funcs, by_isa = {}, {}
    for gv, f in mod.functions.items():
        if gv in kernels_:
            by_isa.setdefault(str(f.attrs[ISA_ATTR]), {})[symbol[gv]] = f.with_attr(
                "global_symbol", symbol[gv])
        elif isinstance(f, relax.Function):
            funcs[gv] = _Extern().visit_expr(f)
        else:
            funcs[gv] = f
    return (tvm.IRModule(funcs, attrs=mod.attrs),
            {isa: tvm.IRModule(fs) for isa, fs in by_isa.items()})


def build(mod: tvm.IRModule, target, database: str | None = None):
    """Compile a Relax module that calls these kernels: the module with ``target`` (FMA off)
    through :func:`pipeline`, its integer kernels with their ISA's :func:`kernel_target`,
    imported into the same executable (``export_library`` links them into one library)."""
    tgt = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    mod, kmods = split_kernels(mod)
    with tvm.transform.PassContext(opt_level=3, config=PASS_CONFIG):
        ex = tvm.compile(mod, target=tgt, relax_pipeline=pipeline(tgt, database))
        for isa, kmod in sorted(kmods.items()):
            ex.mod.import_module(tvm.tirx.build(kmod, target=kernel_target(tgt, isa)))
    return ex
