"""llvm (x86 CPU) kernels for FlexiQ mixed-precision layers: hand-scheduled TensorIR templates."""

from .mixed import KERNELS

__all__ = ["KERNELS"]
