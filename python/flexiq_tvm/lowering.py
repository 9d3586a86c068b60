"""Target resolution and the lowering pass per target: shared by ``compile`` (api) and
``tune``, which both build the module the same way.

Here the target plug-ins meet the target-independent passes: the lowering passes take their
kernels as arguments (``schedules/llvm``'s ``kernels(isa)``, ``schedules/cuda``'s ``lower``), so
no pass imports a schedule.
"""

from __future__ import annotations

from pathlib import Path

from .plan import QuantPlan

TARGETS = ("llvm", "flexiq_npu")


def default_database(target_kind: str = "llvm") -> Path:
    """Where tuned records of ``target_kind`` live (committed with the repository): beside
    the target's kernels in ``flexiq_tvm.schedules`` (the repository's ``schedules/``)."""
    from . import schedules  # the folder the tuned databases live in

    return Path(schedules.__file__).resolve().parent / target_kind / "tuned"


def database_exists(work_dir) -> bool:
    p = Path(work_dir)
    return (p / "database_workload.json").exists() and (p / "database_tuning_record.json").exists()


def lowering(plan: QuantPlan, ratios, cuda=None, expose_layers: bool = False,
             isa: str | None = None):
    """The pass that lowers the FlexiQ composites for the CPU with ``isa``'s kernels (default:
    :func:`flexiq_tvm.hostcpu.best_isa`), or for ``cuda`` (a target from :func:`cuda_target`)
    with that arch's GEMM path."""
    from . import transform

    if cuda is None:
        from .schedules.llvm import kernels

        return transform.QuantizeMixedPrecision(plan, kernels(isa), ratios,
                                                expose_layers=expose_layers)
    from .schedules.cuda import gemm_path, lower

    return transform.QuantizeMixedPrecisionGPU(plan, lower, ratios,
                                               gemm_path(str(cuda.attrs["arch"])),
                                               expose_layers=expose_layers)


def epilogue_fusion(isa: str | None = None):
    """The pass that fuses each covered layer's dequantizer, FP32 glue and the next covered
    layer's quantizer into one kernel (llvm, ``isa``'s kernel library): run after
    :func:`lowering`; its ``fused`` / ``fallbacks`` say what it did."""
    from . import transform
    from .schedules.llvm import kernels

    return transform.FuseRequantize(kernels(isa))


def cuda_target(target):
    """The CUDA ``tvm.target.Target`` (with this machine's CPU as host) that ``target`` names,
    or ``None`` for the other targets; a CUDA target without ``arch`` is an error."""
    import tvm

    from . import frontend

    if isinstance(target, str) and target in TARGETS:
        return None
    try:
        tgt = tvm.target.Target(target)
    except Exception:  # not a target description at all
        return None
    if tgt.kind.name != "cuda":
        return None
    # TVM fills in sm_50 when no GPU is present: the architecture must be the user's
    if isinstance(target, (dict, str)) and "arch" not in target:
        raise ValueError('a CUDA target needs its architecture: {"kind": "cuda", "arch": '
                         '"sm_80"} (sm_80..sm_89 run the 4-bit block on s4 tensor cores, '
                         "sm_90 as INT8 MMA, sm_61..sm_75 on dp4a)")
    from .schedules.cuda import gemm_path

    gemm_path(str(tgt.attrs["arch"]))  # raises for an arch without the kernels' instructions
    return tvm.target.Target(tgt, host=tvm.target.Target(frontend.default_llvm_target()))


def resolve_database(database, kind: str = "llvm"):
    """The tuning work dir to apply (``"auto"``: ``schedules/<kind>/tuned`` if present), or
    ``None``."""
    if database is None:
        return None
    if database == "auto":
        d = default_database(kind)
        return str(d) if database_exists(d) else None
    if not database_exists(database):
        raise ValueError(f"database={database!r}: no MetaSchedule database there (run "
                         "`flexiq-tvm tune --work-dir ...`)")
    return str(Path(database))
