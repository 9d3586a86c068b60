"""Schedules for the FP32 glue that TVM's default CPU pipeline leaves unscheduled.

Between two FlexiQ kernels a model runs elementwise FP32 code (BatchNorm's affine, bias,
ReLU/GELU, residual adds, reshapes). ``FuseOps``/``FuseTIR`` put each chain in one PrimFunc, but
without a schedule every stage is its own loop nest writing a full intermediate buffer.
:func:`schedule_injective` inlines every stage into the last one and parallelises and
vectorises the fused loop: one pass over memory per chain. The arithmetic (each op in its
order, each result rounded to float32) is unchanged, so the outputs are bit-identical.

Functions with a reduction (matmul, softmax, layer norm, pooling) are parallelised over the
leading data-parallel loops of each block (:func:`schedule_reduction`); functions marked opaque
(the FlexiQ kernels) or scheduled by a tuning database are left as they are.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import tirx

VECTOR = 8  # float32 lanes of an AVX2 register
MIN_PARALLEL = 4096  # below this many elements a thread wake-up costs more than it saves
MIN_TASKS = 16  # parallel iterations wanted for a reduction block (a few per thread)


def _is_injective(sch, block) -> bool:
    return all(int(iv.iter_type) == 0 for iv in sch.get(block).iter_vars)  # kDataPar


def schedule_reduction(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Parallelise each root-level block of an unscheduled reduction PrimFunc (matmul,
    softmax, layer norm, pooling) over its leading loops; left alone, TVM's CPU pipeline runs
    them on one thread. The prefix is the shortest with at least ``MIN_TASKS`` iterations;
    TVM's ``parallel`` primitive refuses a loop bound to a reduction axis, which ends the
    search. The reduction order inside each output is unchanged: the results are
    bit-identical."""
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(func)
        n_blocks = len(sch.get_child_blocks(sch.get_sblock("root")))
    except Exception:  # no root block: not a TensorIR compute function
        return func
    changed = False
    for i in range(n_blocks):
        sch = s_tir.Schedule(func)  # a fresh one: a refused parallel leaves a fused loop
        loops = sch.get_loops(sch.get_child_blocks(sch.get_sblock("root"))[i])
        try:
            extents = [int(sch.get(lp).extent) for lp in loops]
        except TypeError:  # a symbolic extent
            continue
        if not loops or int(np.prod(extents)) < MIN_PARALLEL:
            continue
        # the fewest leading loops that give every thread several chunks: the loop nest
        # inside stays as LLVM vectorises it (fusing all output axes made a matmul slower)
        n_lead = next((k for k in range(1, len(loops) + 1)
                       if np.prod(extents[:k]) >= MIN_TASKS), len(loops))
        try:
            sch.parallel(sch.fuse(*loops[:n_lead]) if n_lead > 1 else loops[0])
        except Exception:  # a loop bound to a reduction axis: the block stays serial
            continue
        func, changed = sch.mod["main"], True
    return func.with_attr("flexiq.scheduled", True) if changed else func


def schedule_injective(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Inline, fuse, parallelise and vectorise an all-injective PrimFunc; parallelise a
    reduction one (:func:`schedule_reduction`); others unchanged."""
    from tvm import s_tir

    attrs = func.attrs or {}
    if (int(attrs.get("op_pattern", 0)) >= 8 or "flexiq.scheduled" in attrs
            or attrs.get("tirx.is_scheduled", False)):
        return func  # opaque kernels / applied from a tuning database
    sch = s_tir.Schedule(func)
    try:
        root = sch.get_sblock("root")
    except Exception:  # no root block: not a TensorIR compute function
        return func
    blocks = sch.get_child_blocks(root)
    if not blocks:
        return func
    if int(attrs.get("op_pattern", 0)) >= 3 or not all(_is_injective(sch, b) for b in blocks):
        return schedule_reduction(func)
    try:
        for b in blocks[:-1]:
            sch.compute_inline(b)
    except Exception:  # a stage that cannot be inlined: keep the default
        return func
    last = sch.get_child_blocks(root)[-1]
    loops = sch.get_loops(last)
    if not loops:
        return sch.mod["main"]
    extents = [int(sch.get(lp).extent) for lp in loops]
    # outer: the leading axes (batch, channel), parallel; inner: the trailing two (the
    # spatial plane of NCHW, tokens x features of a linear layer), vectorised, so per-channel
    # operands stay loop-invariant in the vector loop
    split_at = max(len(loops) - 2, 1) if len(loops) > 1 else 0
    outer = sch.fuse(*loops[:split_at]) if split_at else None
    inner = sch.fuse(*loops[split_at:])
    n_inner = 1
    for e in extents[split_at:]:
        n_inner *= e
    if n_inner % VECTOR == 0:
        _, vec = sch.split(inner, [None, VECTOR])
        sch.vectorize(vec)
    total = n_inner
    for e in extents[:split_at]:
        total *= e
    if outer is not None and total >= MIN_PARALLEL and total // n_inner > 1:
        sch.parallel(outer)
    return sch.mod["main"].with_attr("flexiq.scheduled", True)


@tvm.transform.module_pass(opt_level=0, name="ScheduleInjective")
class ScheduleInjective:
    """Apply :func:`schedule_injective` to every PrimFunc of a (legalized, fused) module."""

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        funcs = {gv: schedule_injective(f) if isinstance(f, tirx.PrimFunc) else f
                 for gv, f in mod.functions.items()}
        return tvm.IRModule(funcs, attrs=mod.attrs, global_infos=mod.global_infos)
