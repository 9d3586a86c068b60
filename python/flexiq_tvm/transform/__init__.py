"""FlexiQ Relax passes, one per file, each a ``tvm.transform`` module pass.

Order: :func:`prepare` (TVM's own clean-up passes) -> :class:`AnnotateChannelPrecision` ->
:class:`ReorderChannelBlocks` -> :class:`QuantizeMixedPrecision` (-> :class:`FuseRequantize`
on llvm), then the target's pipeline.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ._graph import strip_composites
from .annotate_channel_precision import AnnotateChannelPrecision
from .fuse_requantize import FuseRequantize
from .quantize_mixed_precision import QuantizeMixedPrecision, variant_name
from .quantize_mixed_precision_gpu import QuantizeMixedPrecisionGPU
from .reorder_channel_blocks import ReorderChannelBlocks


def prepare() -> tvm.transform.Pass:
    """Bring a bound frontend module into the form the passes expect: BatchNorm decomposed
    into per-channel elementwise ops, constants folded (linear weights become ``[K, O]``
    constants), tuple plumbing removed, one dataflow block."""
    return tvm.transform.Sequential([
        relax.transform.DecomposeOpsForInference(),
        relax.transform.FoldConstant(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.DeadCodeElimination(),
    ], name="FlexiQPrepare")


__all__ = [
    "AnnotateChannelPrecision",
    "FuseRequantize",
    "QuantizeMixedPrecision",
    "QuantizeMixedPrecisionGPU",
    "ReorderChannelBlocks",
    "prepare",
    "strip_composites",
    "variant_name",
]
