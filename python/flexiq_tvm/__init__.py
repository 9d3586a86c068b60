"""flexiq-tvm: FlexiQ adaptive INT8/INT4 mixed-precision quantization on Apache TVM.

Public API (this version): :func:`compile` (model -> :class:`CompiledModule` with one function
per low-bit ratio; ``.export(path)``), :func:`load` (artifact -> runnable
:class:`FlexiQModule`, no torch needed), :class:`FlexiQConfig`, :func:`quantize` (calibration
and nested channel selection -> :class:`QuantPlan`), :class:`FakeQuantModel` (integer-exact
torch emulation of a plan), the integer oracle :mod:`flexiq_tvm.reference`, the frontends
:mod:`flexiq_tvm.frontend` and the model zoo :mod:`flexiq_tvm.zoo`.
"""

import os

# TVM's CPU thread pool defaults to half the logical CPUs (it assumes two hardware threads per
# core), so a 2-vCPU machine runs every parallel kernel on one core. Use them all unless the
# user chose (TVM reads this when a thread's pool is created, i.e. on its first parallel call).
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))
                                             if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1))

from ._version import __version__
from .api import CompiledModule, CompileReport, compile
from .config import FlexiQConfig
from .plan import LayerPlan, QuantPlan
from .quantize import quantize
from .runtime import ArtifactError, FlexiQModule, load


def __getattr__(name):  # torch-dependent names load on first use
    if name == "FakeQuantModel":
        from .fakequant import FakeQuantModel

        return FakeQuantModel
    raise AttributeError(f"module 'flexiq_tvm' has no attribute {name!r}")


__all__ = ["ArtifactError", "CompileReport", "CompiledModule", "FakeQuantModel",
           "FlexiQConfig", "FlexiQModule", "LayerPlan", "QuantPlan", "__version__", "compile",
           "load", "quantize"]
