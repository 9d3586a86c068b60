"""CUDA kernels for FlexiQ mixed INT8/INT4 layers (tensor-core ``mma.sync``), compile-checked
without a GPU: the GEMM (:mod:`.mixed`), the kernels around it that make a whole model
(:mod:`.lower`), and the module pipeline (:mod:`.pipeline`)."""

from . import pipeline
from .mixed import arch_has_int4_mma, chunk4, emulate, gemm_path, mixed_gemm, pack

__all__ = ["arch_has_int4_mma", "chunk4", "emulate", "gemm_path", "mixed_gemm", "pack",
           "pipeline"]
