"""What this machine's CPU offers the llvm kernels (no TVM or torch needed: the runtime checks
an artifact's target against it before loading native code)."""

from __future__ import annotations

import os
import platform


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (``/proc/cpuinfo``; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


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
