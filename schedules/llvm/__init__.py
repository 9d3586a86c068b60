"""llvm (x86 CPU) kernels for FlexiQ mixed-precision layers: hand-scheduled TensorIR templates,
and the Relax pipeline that builds a module around them."""

from __future__ import annotations

import tvm

from .injective import ScheduleInjective, schedule_injective
from .mixed import KERNELS

__all__ = ["KERNELS", "ScheduleInjective", "pipeline", "schedule_injective"]


def pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's default CPU Relax pipeline plus :class:`ScheduleInjective` after fusion (the
    FP32 glue between FlexiQ kernels gets one parallel, vectorised loop per fused chain)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="FlexiQLLVMPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)
                + [ScheduleInjective()] + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target))
            return seq(mod)

    return _pipeline
