"""CUDA kernels for FlexiQ mixed INT8/INT4 layers (tensor-core ``mma.sync``), compile-checked
without a GPU: the GEMM (:mod:`.mixed`), its host-side operand layout (:mod:`.layout`, numpy
only), the kernels around it that make a whole model (:mod:`.lower`), and the module pipeline
(:mod:`.pipeline`).

The host-side names import eagerly; the kernels and the pipeline need TVM's compiler and load
on first use, so a runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``) can still lay out operands."""

from importlib import import_module

from .layout import arch_has_int4_mma, chunk4, emulate, gemm_path, pack

_LAZY = {"mixed_gemm": ("mixed", "mixed_gemm"), "pipeline": ("pipeline", None),
         "lower": ("lower", None), "mixed": ("mixed", None)}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod, attr = _LAZY[name]
    m = import_module(f"{__name__}.{mod}")
    return getattr(m, attr) if attr else m


__all__ = ["arch_has_int4_mma", "chunk4", "emulate", "gemm_path", "mixed_gemm", "pack",
           "pipeline"]
