"""``flexiq-tvm tune``: MetaSchedule autotuning of what the FlexiQ kernels do not cover.

The mixed INT8/INT4 kernels are hand-scheduled TensorIR templates (``schedules/llvm``, and
the tensor-core GEMM of ``schedules/cuda``, marked ``flexiq.scheduled``); every other PrimFunc
of a compiled model -- the FP32 glue that
:class:`~flexiq_tvm.schedules.llvm.ScheduleInjective` otherwise gets, reductions (pooling,
layer norm, softmax), attention's activation x activation matmuls, layers no plan covers -- is
a MetaSchedule task. For CUDA the activation packing, dequantization and grouped convs around
the tensor-core GEMM are tasks too. Tuning uses the XGBoost cost model and the evolutionary
search; trials are measured locally or, with an RPC tracker, on remote machines
(``ms.runner.RPCRunner``). Records go to a JSON database, by default
``schedules/<llvm|cuda>/tuned/`` (one database per target kind, shared by the zoo models: a
record applies wherever its workload appears), which :func:`flexiq_tvm.compile` applies when
it exists (``relax.transform.MetaScheduleApplyDatabase``, before ScheduleInjective on the CPU
and before dlight's default GPU schedules on CUDA).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from .lowering import default_database

log = logging.getLogger(__name__)

BUILDER_TIMEOUT_S = 300  # importing tvm.s_tir.tensor_intrin in a builder takes ~40 s here


@dataclass(frozen=True)
class RPCConfig:
    """Where trials run when they run remotely: a TVM RPC tracker and a device key."""

    tracker_host: str
    tracker_port: int
    key: str
    session_timeout_s: int = 120

    @classmethod
    def parse(cls, tracker: str, key: str) -> RPCConfig:
        host, sep, port = tracker.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--rpc-tracker {tracker!r}: expected HOST:PORT")
        if not key:
            raise ValueError("--rpc-key is required with --rpc-tracker")
        return cls(host, int(port), key)

    def runner(self):
        """A MetaSchedule ``RPCRunner`` that measures on the tracker's devices of ``key``."""
        from tvm.s_tir import meta_schedule as ms

        rpc = ms.runner.RPCConfig(tracker_host=self.tracker_host,
                                  tracker_port=self.tracker_port, tracker_key=self.key,
                                  session_timeout_sec=self.session_timeout_s)
        return ms.runner.RPCRunner(rpc_config=rpc, evaluator_config=ms.runner.EvaluatorConfig(
            number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False))


def prune(work_dir) -> None:
    """Keep only the best record of each tuned workload (and only workloads with a record):
    what ``compile`` applies, without the untuned workloads' module text."""
    import os
    import tempfile

    from tvm.s_tir import meta_schedule as ms

    work_dir = Path(work_dir)
    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        pruned = ms.database.JSONDatabase(work_dir=tmp)
        db.dump_pruned(pruned)
        for name in ("database_workload.json", "database_tuning_record.json"):
            os.replace(Path(tmp) / name, work_dir / name)


def lowered(model, example_input, plan, ratios, via: str = "torch.export", target="llvm"):
    """The module ``compile`` would build, after legalization and fusion (the PrimFuncs
    MetaSchedule sees), and its target (``"llvm"`` or a CUDA target with its arch)."""
    import numpy as np
    import tvm

    from . import frontend, transform
    from .lowering import cuda_target, epilogue_fusion, lowering

    x = np.asarray(example_input, np.float32)
    imported = frontend.import_model(model, x, via=via)
    mod = transform.prepare()(imported.bound())
    mod = transform.AnnotateChannelPrecision(plan)(mod)
    mod = transform.ReorderChannelBlocks(plan)(mod)
    cuda = cuda_target(target)
    mod = lowering(plan, ratios, cuda)(mod)
    if cuda is None:  # the glue compile() leaves unfused is what there is to tune
        mod = epilogue_fusion()(mod)
    if cuda is not None:
        from .schedules.cuda import pipeline as gpu

        with cuda:
            return tvm.transform.Sequential(gpu.fused_passes(cuda))(mod), cuda
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    tgt = tvm.target.Target(frontend.default_llvm_target())
    with tgt:
        mod = tvm.transform.Sequential(cpu.library_dispatch_passes(tgt)
                                       + cpu.legalize_passes(tgt))(mod)
    return mod, tgt


def tunable_tasks(mod, target):
    """MetaSchedule tasks of ``mod`` except the hand-scheduled FlexiQ kernels:
    ``(tasks, skipped task names)``."""
    from tvm.s_tir import meta_schedule as ms

    tasks, skipped = [], []
    for t in ms.relax_integration.extract_tasks(mod, target):
        funcs = [f for f in t.dispatched[0].functions.values() if hasattr(f, "attrs")]
        if any(f.attrs is not None and "flexiq.scheduled" in f.attrs for f in funcs):
            skipped.append(t.task_name)
        else:
            tasks.append(t)
    return tasks, skipped


def tune(name: str, trials: int = 64, work_dir=None, rpc: RPCConfig | None = None,
         selection: str = "static", seed: int = 0, max_trials_per_task: int | None = None,
         num_trials_per_iter: int = 16, target="llvm") -> dict:
    """Tune zoo model ``name``'s non-FlexiQ PrimFuncs (``trials`` measured candidates in all)
    for this CPU or, with a CUDA ``target`` (``{"kind": "cuda", "arch": "sm_90"}``), for that
    GPU: measured on this machine's GPU or, with ``rpc``, on the remote ones. Returns a summary
    (tasks, best times, seconds, database path)."""
    import numpy as np
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from .config import FlexiQConfig
    from .eval import load_eval_data, zoo_plan
    from .lowering import cuda_target
    from .zoo import registry

    if trials <= 0:
        raise ValueError(f"trials={trials}; must be positive")
    kind = "llvm" if cuda_target(target) is None else "cuda"
    if kind == "cuda" and rpc is None and not tvm.cuda(0).exist:
        raise ValueError("tuning for CUDA measures on a GPU: this machine has none; give "
                         "--rpc-tracker HOST:PORT --rpc-key KEY of GPU machines")
    work_dir = Path(work_dir) if work_dir is not None else default_database(kind)
    work_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model = registry.get_model(name)
    cfg = FlexiQConfig(selection=selection, calib_images=32)
    plan = zoo_plan(name, model, cfg)
    _, x, _ = load_eval_data(name, 1)
    mod, target = lowered(model, x, plan, cfg.ratios, target=target)
    tasks, skipped = tunable_tasks(mod, target)
    if not tasks:
        raise ValueError(f"{name}: nothing to tune (every PrimFunc is a FlexiQ kernel)")
    log.info("tune %s: %d tasks (%d FlexiQ kernels skipped), %d trials, %s", name, len(tasks),
             len(skipped), trials, "RPC " + f"{rpc.tracker_host}:{rpc.tracker_port}/{rpc.key}"
             if rpc else "local")
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, str(work_dir), seed=seed)
    database = ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=str(work_dir),
        max_trials_global=trials, max_trials_per_task=max_trials_per_task,
        num_trials_per_iter=num_trials_per_iter,
        builder=ms.builder.LocalBuilder(timeout_sec=BUILDER_TIMEOUT_S),
        runner=rpc.runner() if rpc else "local", cost_model="xgb")
    best = []
    for ctx in contexts:
        recs = database.get_top_k(database.commit_workload(ctx.mod), 1)
        us = (1e6 * float(np.mean([float(v) for v in recs[0].run_secs]))
              if recs and recs[0].run_secs else None)
        best.append({"task": ctx.task_name, "best_us": us})
    prune(work_dir)  # after reading: the summary must not add workloads back
    return {"model": name, "target": str(target), "trials": trials, "tasks": best,
            "skipped_flexiq_kernels": len(skipped), "seconds": round(time.time() - t0, 1),
            "database": str(work_dir), "rpc": None if rpc is None else
            f"{rpc.tracker_host}:{rpc.tracker_port}/{rpc.key}"}
