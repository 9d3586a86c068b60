"""llvm (x86 CPU) kernels for FlexiQ mixed-precision layers: hand-scheduled TensorIR templates,
and the Relax pipeline that builds a module around them."""

from __future__ import annotations

import tvm

from .injective import ScheduleInjective, schedule_injective
from .mixed import KERNELS

__all__ = ["KERNELS", "PASS_CONFIG", "ScheduleInjective", "pipeline", "schedule_injective"]

# TIR StorageRewrite in TVM 0.27 folds the GEMM's int16 register tile into the memory of its
# int16 weight panel while the panel is still read (wrong results for some shapes, e.g. 2
# input channels with a 3x3 kernel). Every build of these kernels runs with it switched off.
PASS_CONFIG = {"tirx.disable_storage_rewrite": True}


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
