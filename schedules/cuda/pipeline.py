"""The Relax pipeline of a CUDA FlexiQ module: TVM's CUDA pipeline with an optional
MetaSchedule database applied between fusion and dlight's default GPU schedules (which then
schedule only what the database did not; the tensor-core GEMM is scheduled by hand)."""

from __future__ import annotations

import tvm
from tvm import relax


def fused_passes(target: tvm.target.Target) -> list:
    """Legalization and fusion: the PrimFuncs that get scheduled (and that tuning sees)."""
    del target  # same passes for every CUDA arch
    return [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(),
            relax.transform.FuseTIR()]


def pipeline(target: tvm.target.Target, database: str | None = None) -> tvm.transform.Pass:
    """TVM's CUDA pipeline, with ``database`` (a ``flexiq-tvm tune`` work dir) applied
    before the default schedules."""
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0, name="FlexiQCUDAPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            tuned = [relax.transform.MetaScheduleApplyDatabase(str(database))] if database else []
            default = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                              dl.gpu.GeneralReduction(), dl.gpu.Fallback())
            seq = tvm.transform.Sequential(
                cuda.library_dispatch_passes(target) + fused_passes(target) + tuned + [default]
                + cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target))
            return seq(mod)

    return _pipeline
