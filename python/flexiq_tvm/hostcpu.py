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


def avx_vnni() -> bool:
    """Whether the FlexiQ kernels use AVX-VNNI (``vpdpwssd`` / ``vpdpbusd`` on ymm registers,
    VEX-encoded, no AVX-512 needed): when the CPU has it, unless ``FLEXIQ_AVXVNNI=0`` (e.g. to
    build for an AVX2-only machine such as Zen 3, or to test the AVX2 path)."""
    return (os.environ.get("FLEXIQ_AVXVNNI", "1") != "0"
            and platform.machine() in ("x86_64", "AMD64") and "avx_vnni" in cpu_flags())


def missing_features(target) -> list[str]:
    """The x86 features an llvm target (dict or JSON string) asks for with ``+feature`` in
    ``mattr`` that this CPU lacks (only those FlexiQ adds itself are checked: ``avxvnni``)."""
    import json

    if isinstance(target, str):
        try:
            target = json.loads(target)
        except ValueError:
            return []
    if not isinstance(target, dict) or target.get("kind") != "llvm":
        return []
    flags = {"avxvnni": "avx_vnni"}
    have = cpu_flags()
    return [f for f in (a[1:] for a in target.get("mattr", []) if a.startswith("+"))
            if f in flags and flags[f] not in have]
