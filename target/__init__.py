"""Target plug-ins (llvm/, cuda/, npu/), installed as ``flexiq_tvm.target``.

A target supplies kernels for the quantized ops, its place in the Relax pipeline and a check
that it is available; targets never import each other.
"""
