"""CUDA kernels for FlexiQ mixed INT8/INT4 layers (tensor-core ``mma.sync``), compile-checked
without a GPU; see :mod:`.mixed`."""

from .mixed import arch_has_int4_mma, chunk4, emulate, mixed_gemm, pack

__all__ = ["arch_has_int4_mma", "chunk4", "emulate", "mixed_gemm", "pack"]
