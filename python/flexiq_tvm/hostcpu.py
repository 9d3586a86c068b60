"""What this machine's CPU offers the llvm kernels (no TVM or torch needed: the runtime checks
an artifact's target against it before loading native code)."""

from __future__ import annotations

import functools
import os
import platform


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's ``/proc/cpuinfo`` fields (empty where there is none); read once:
    every kernel build asks."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, val = line.partition(":")
                info[key.strip()] = val.strip()
    except OSError:
        pass
    return info


def cpu_model() -> str | None:
    """The CPU's model name, as ``/proc/cpuinfo`` gives it."""
    return _cpuinfo().get("model name")


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (empty where ``/proc/cpuinfo`` has none)."""
    return frozenset(_cpuinfo().get("flags", "").split())


ISAS = ("avx2", "avxvnni", "avx512vnni")
# the /proc/cpuinfo flags each kernel ISA needs
ISA_FLAGS = {"avx2": ("avx2",), "avxvnni": ("avx2", "avx_vnni"),
             "avx512vnni": ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")}


def _x86() -> bool:
    return platform.machine() in ("x86_64", "AMD64")


def isa_available(isa: str) -> bool:
    """Whether this CPU runs the kernels of ``isa`` (one of :data:`ISAS`)."""
    return _x86() and all(f in cpu_flags() for f in ISA_FLAGS[isa])


def best_isa() -> str:
    """The fastest exact INT8 kernels this CPU runs: ``avx512vnni`` (``vpdpbusd`` with EVEX
    encoding), else ``avxvnni`` (the same instruction, VEX-encoded), else ``avx2``. Both VNNI
    ISAs run the same kernels (ymm registers: the AVX-512 build needs only the encoding).

    ``FLEXIQ_ISA`` overrides it (e.g. ``FLEXIQ_ISA=avx2`` builds for an AVX2-only machine);
    the older ``FLEXIQ_AVXVNNI=0`` means ``avx2``."""
    env = os.environ.get("FLEXIQ_ISA", "").strip().lower()
    if env:
        return check_isa(env)
    if os.environ.get("FLEXIQ_AVXVNNI", "1") == "0":
        return "avx2"
    for isa in ("avx512vnni", "avxvnni"):
        if isa_available(isa):
            return isa
    return "avx2"


def check_isa(isa) -> str:
    """``isa`` validated (``None``: :func:`best_isa`): a known ISA that this CPU runs, else a
    ``ValueError`` that says which features are missing."""
    if isa is None:
        return best_isa()
    name = str(isa).strip().lower().replace("-", "").replace("_", "")
    if name not in ISAS:
        raise ValueError(f"isa={isa!r}: choose one of {', '.join(ISAS)}")
    lacking = [f for f in ISA_FLAGS[name] if f not in cpu_flags()] if _x86() else ["x86-64"]
    if lacking:
        raise ValueError(f"isa={name}: this CPU lacks {', '.join(lacking)} (it runs: "
                         f"{', '.join(i for i in ISAS if isa_available(i)) or 'none'})")
    return name


def vnni(isa: str) -> bool:
    """Whether ``isa``'s kernels use the VNNI dot product ``vpdpbusd``."""
    return isa in ("avxvnni", "avx512vnni")


def avx_vnni() -> bool:
    """Whether the default kernels use VNNI (:func:`best_isa` is a VNNI ISA)."""
    return vnni(best_isa())


def missing_features(target) -> list[str]:
    """The x86 features an llvm target (dict or JSON string) asks for with ``+feature`` in
    ``mattr`` that this CPU lacks (only those FlexiQ adds itself are checked: the VNNI and
    AVX-512 features of :func:`kernel_target`)."""
    import json

    if isinstance(target, str):
        try:
            target = json.loads(target)
        except ValueError:
            return []
    if not isinstance(target, dict) or target.get("kind") != "llvm":
        return []
    flags = {"avxvnni": "avx_vnni", "avx512f": "avx512f", "avx512bw": "avx512bw",
             "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni"}
    have = cpu_flags()
    return [f for f in (a[1:] for a in target.get("mattr", []) if a.startswith("+"))
            if f in flags and flags[f] not in have]


def kernel_mattr(isa: str) -> list[str]:
    """The LLVM ``mattr`` of the integer kernels built for ``isa``.

    The FP32 glue and the quantizers keep FMA off (TVM lets LLVM contract ``a * b + c``,
    which rounds once where the oracle rounds twice), and on x86 switching FMA off also drops
    AVX-512F. The integer GEMMs have no float arithmetic, so the AVX-512 VNNI build compiles
    them in a module of their own with FMA and AVX-512 on
    (:func:`flexiq_tvm.schedules.llvm.build`)."""
    if isa == "avx512vnni":
        return ["+avx512f", "+avx512bw", "+avx512vl", "+avx512vnni"]
    return ["-fma"] + (["+avxvnni"] if isa == "avxvnni" else [])
