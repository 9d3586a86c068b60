"""FlexiNPU: a simulated mixed INT8/INT4 systolic-array accelerator as a TVM BYOC target.

* :class:`NPUConfig` -- the machine model (array, buffers, DMA, vector unit, clock);
* :func:`partition_for_flexiq_npu` / :func:`flexiq_npu_patterns` -- what is offloaded;
* ``relax.ext.flexiq_npu`` (:mod:`.codegen`) -- programs + simulator as a C runtime module;
* :mod:`.sim` -- the same simulator as a host library (tests, per-layer oracle checks);
* :func:`build` -- bound Relax module -> executable; ``flexiq_tvm.compile(...,
  target="flexiq_npu")`` calls it.

See README.md in this folder for the machine and its instruction set.
"""

from __future__ import annotations

from .isa import NPUConfig
from .patterns import flexiq_npu_patterns, partition_for_flexiq_npu

__all__ = ["NPUConfig", "build", "flexiq_npu_patterns", "partition_for_flexiq_npu", "read_stats"]


def build(mod, plan, ratios, host, config: NPUConfig | None = None, host_target=None):
    """Partition a prepared module for the NPU, run the codegen, build the host part.

    ``host``: the CPU side as ``(kernels, build)`` (``schedules/llvm``'s ``kernels(isa)`` and
    ``build``; passed in, since targets do not import each other): layers the NPU cannot take
    and the FP32 rest run there.

    Returns ``(executable, info)``; ``info`` lists the programs (symbol, pattern, plan layer,
    bytes) and names the ratio-switch and stats functions of the NPU module.
    """
    import tvm
    from tvm import relax

    from ... import transform
    from ...frontend import default_llvm_target
    from . import codegen

    kernels, cpu_build = host
    config = config or NPUConfig()
    mod = partition_for_flexiq_npu(mod, plan, config)
    # plan layers the NPU cannot take (input over ABUF, no pattern) still run FlexiQ, on the
    # CPU's kernels: one entry per ratio (main_r000 ...), the NPU part switched by patching
    annotate = transform.AnnotateChannelPrecision(plan)
    mod = annotate(mod)
    g = transform._graph
    host = [str(g.composite_kind(mod, b.value)[1].attrs["flexiq.layer"])
            for b in g.bindings(mod["main"]) if g.composite_kind(mod, b.value) is not None]
    if host:
        mod = transform.ReorderChannelBlocks(plan)(mod)
        mod = transform.QuantizeMixedPrecision(plan, kernels, ratios)(mod)
    else:
        mod = transform.strip_composites(mod)
    with codegen.codegen_context(plan, ratios, config) as state:
        mod = relax.transform.RunCodegen()(mod)
    if not state.programs:
        raise ValueError("no layer of the model could be offloaded to flexiq_npu")
    tgt = host_target or tvm.target.Target(default_llvm_target())
    ex = cpu_build(mod, tgt)
    info = {"programs": state.programs, "set_ratio": f"flexiq_npu_set_ratio_{state.tag}",
            "stats": f"flexiq_npu_stats_{state.tag}",
            "entry": None if host else "main",  # None: one variant per ratio
            "host_flexiq_layers": host,  # plan layers on the CPU's FlexiQ kernels
            "config": {k: getattr(config, k) for k in config.__dataclass_fields__}}
    return ex, info


STAT_FIELDS = ("compute_cycles", "dma_cycles", "vector_cycles", "total_cycles", "macs",
               "low_macs")


def read_stats(module, reset: bool = True) -> list[dict]:
    """Per-program cycle counters of a flexiq_npu module since the last reset, in program
    order, with each program's symbol, pattern and plan layer."""
    import numpy as np
    import tvm

    info = module.metadata["npu"]
    fn = module.library_function(info["stats"])
    buf = tvm.runtime.tensor(np.zeros((len(info["programs"]), len(STAT_FIELDS)), np.int64))
    fn(buf, int(reset))
    return [{"symbol": p["symbol"], "pattern": p["pattern"], "layer": p["layer"],
             **dict(zip(STAT_FIELDS, (int(v) for v in row), strict=True))}
            for p, row in zip(info["programs"], buf.numpy(), strict=True)]
