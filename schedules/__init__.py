"""TensorIR schedules and MetaSchedule tuning databases, one folder per target (llvm/, cuda/).

Installed as ``flexiq_tvm.schedules``.  Kernels never import passes, the API or the CLI.
"""
