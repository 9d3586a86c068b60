"""Frontends: a PyTorch module or an ONNX model -> a Relax IRModule (FP32).

Two paths, both from TVM itself (see TVM_NOTES.md):

* ``torch.export.export`` -> ``relax.frontend.torch.from_exported_program``;
* ONNX (a path, bytes or ``onnx.ModelProto``; torch modules are exported with the TorchScript
  exporter, opset 17) -> ``relax.frontend.onnx.from_onnx``.  Models whose ONNX graph computes
  shapes at run time (EfficientNet's "same" padding gives dynamic ``Pad``/``Slice``) are
  constant-folded first with onnxruntime's basic graph optimizations.

Either way the result is an :class:`ImportedModel`: the module's ``main`` takes the input(s)
followed by the weights, and ``params`` holds the weights in order, so later passes can see and
rewrite them; :meth:`ImportedModel.bound` binds them as constants for building.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

VIA = ("torch.export", "onnx")
ONNX_OPSET = 17


@dataclass
class ImportedModel:
    """A Relax module whose ``main`` takes ``num_inputs`` inputs followed by ``params``."""

    mod: Any  # tvm.IRModule
    params: list[np.ndarray]
    num_inputs: int
    input_shapes: list[tuple[int, ...]]
    source: str  # "torch.export" or "onnx"
    param_names: list[str] = field(default_factory=list)

    def bound(self):
        """The module with every weight bound as a constant (``main`` takes only the inputs)."""
        from tvm import relax

        fn = self.mod["main"]
        weights = dict(zip(list(fn.params[self.num_inputs :]), self.params, strict=True))
        return relax.transform.BindParams("main", weights)(self.mod)


def _detach(mod, num_inputs: int, input_shapes, source: str) -> ImportedModel:
    from tvm import relax

    mod, params = relax.frontend.detach_params(mod)
    weights = [p.numpy() for p in params.get("main", [])]
    fn = mod["main"]
    if len(fn.params) != num_inputs + len(weights):
        raise RuntimeError(
            f"{source}: main has {len(fn.params)} parameters, expected {num_inputs} inputs + "
            f"{len(weights)} weights"
        )
    names = [p.name for p in fn.params[num_inputs:]]
    return ImportedModel(mod, weights, num_inputs, [tuple(s) for s in input_shapes], source, names)


def _as_tuple(example_input) -> tuple:
    if isinstance(example_input, tuple | list):
        return tuple(example_input)
    return (example_input,)


def _to_torch(x):
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    raise TypeError(f"example input must be a torch.Tensor or numpy array, got {type(x).__name__}")


def from_torch(model, example_input) -> ImportedModel:
    """Import a ``torch.nn.Module`` through ``torch.export`` (static shapes of the example)."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = tuple(_to_torch(x) for x in _as_tuple(example_input))
    model = model.eval()
    with torch.no_grad():
        ep = torch.export.export(model, args)
    with warnings.catch_warnings():
        # TVM's importer copies the program's pytree specs, and torch 2.13 warns on that copy
        # that `isinstance(treespec, LeafSpec)` is deprecated: torch's code, not the user's
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`",
                                category=FutureWarning)
        mod = from_exported_program(ep, keep_params_as_input=True)
    return _detach(mod, len(args), [tuple(a.shape) for a in args], "torch.export")


def export_onnx(model, example_input, path: str | os.PathLike | None = None,
                opset: int = ONNX_OPSET):
    """Export a torch module to ONNX (TorchScript exporter, ``dynamo=False``).

    BatchNorm is exported as ``BatchNormalization`` (training mode ``PRESERVE`` on a module in
    eval mode), not folded into the conv weights: a QuantPlan is computed on the torch module's
    own conv weights, and the compiler finds each layer in the graph by those weights.
    Returns the ``onnx.ModelProto``; also writes it to ``path`` when given.
    """
    import onnx
    import torch

    args = tuple(_to_torch(x) for x in _as_tuple(example_input))
    buf = io.BytesIO()
    names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    with torch.no_grad():
        torch.onnx.export(model.eval(), args, buf, opset_version=opset, dynamo=False,
                          input_names=names, output_names=["output"],
                          training=torch.onnx.TrainingMode.PRESERVE)
    proto = onnx.load_from_string(buf.getvalue())
    if path is not None:
        onnx.save(proto, str(path))
    return proto


def _load_onnx(model):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes | bytearray):
        return onnx.load_from_string(bytes(model))
    if isinstance(model, str | os.PathLike):
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"ONNX file not found: {path}")
        return onnx.load(str(path))
    raise TypeError(f"expected an ONNX path, bytes or ModelProto, got {type(model).__name__}")


_SHAPE_INPUT_OPS = {"Pad", "Slice", "Reshape", "Expand", "Tile", "Resize", "ConstantOfShape"}


def _has_runtime_shapes(proto) -> bool:
    """True when a shape-like operand (pads, starts, target shape...) is computed in the graph."""
    const = {i.name for i in proto.graph.initializer}
    const |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    for n in proto.graph.node:
        if n.op_type == "Shape":
            return True
        if n.op_type in _SHAPE_INPUT_OPS:
            operands = n.input if n.op_type == "ConstantOfShape" else n.input[1:]
            if any(name and name not in const for name in operands):
                return True
    return False


_WEIGHT_REWRITING_FUSIONS = ["ConvBNFusion", "ConvAddFusion", "ConvMulFusion", "MatMulAddFusion",
                             "GemmTransposeFusion", "MatMulScaleFusion"]


def fold_onnx_constants(proto):
    """Constant-fold an ONNX graph (shape computations included) with onnxruntime.

    Uses only onnxruntime's *basic* level, which folds constants and removes redundant nodes
    but does not fuse ops into onnxruntime-specific ones, so the result stays standard ONNX;
    the basic fusions that rewrite conv/matmul weights (BatchNorm, Add, Mul into Conv) are
    disabled so the weights stay those of the source model.
    """
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "folded.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = out
        ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=_WEIGHT_REWRITING_FUSIONS)
        return onnx.load(out)


def prepare_onnx(model, input_shapes: dict[str, tuple[int, ...]] | None = None):
    """The ONNX graph as the compiler imports it, and its static input shapes.

    ``input_shapes`` maps graph input names to static shapes; by default the shapes declared
    in the graph are used (they must then be static). A graph that computes shapes at run
    time is constant-folded first (with the inputs made static). Calibration on an ONNX-only
    model runs on this same graph (:func:`onnx_calibration_model`), so that its plan finds
    its layers by their weights.
    """
    proto = _load_onnx(model)
    shapes = _static_shapes(proto, input_shapes)
    if _has_runtime_shapes(proto):
        log.info("ONNX graph computes shapes at run time: constant-folding it first")
        proto = fold_onnx_constants(_with_static_inputs(proto, shapes))
    return proto, shapes


def _static_shapes(proto, input_shapes) -> dict[str, tuple[int, ...]]:
    """The graph inputs' static shapes: ``input_shapes`` where given (checked against what the
    graph declares), else the declared ones (which must then be static)."""
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if input_shapes:
        unknown = set(input_shapes) - {i.name for i in inputs}
        if unknown:
            raise ValueError(f"input_shapes names {sorted(unknown)} are not graph inputs "
                             f"(inputs: {sorted(i.name for i in inputs)})")
    shapes: dict[str, tuple[int, ...]] = {}
    for inp in inputs:
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in inp.type.tensor_type.shape.dim]
        if input_shapes and inp.name in input_shapes:
            shape = tuple(int(d) for d in input_shapes[inp.name])
            if len(shape) != len(dims) or any(d and d != v for d, v in zip(dims, shape)):
                raise ValueError(f"ONNX input {inp.name!r} has shape {dims} (None: dynamic); "
                                 f"got an example of shape {shape}")
            shapes[inp.name] = shape
            continue
        if any(d is None or d <= 0 for d in dims):
            raise ValueError(
                f"ONNX input {inp.name!r} has a dynamic shape {dims}; pass input_shapes="
                f"{{{inp.name!r}: (N, C, H, W)}}"
            )
        shapes[inp.name] = tuple(dims)
    return shapes


def from_onnx(model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> ImportedModel:
    """Import an ONNX model (path, bytes or ``ModelProto``); ``input_shapes`` as in
    :func:`prepare_onnx`."""
    from tvm.relax.frontend.onnx import from_onnx as tvm_from_onnx

    proto, shapes = prepare_onnx(model, input_shapes)
    mod = tvm_from_onnx(proto, shape_dict=shapes, keep_params_in_input=True)
    return _detach(mod, len(shapes), list(shapes.values()), "onnx")


def _example_shapes(proto, example_input) -> dict | None:
    if example_input is None:
        return None
    xs = _as_tuple(example_input)
    initializers = {i.name for i in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers]
    if len(names) != len(xs):
        raise ValueError(f"the ONNX graph takes {len(names)} inputs ({names}); got "
                         f"{len(xs)} example inputs")
    return {n: tuple(x.shape) for n, x in zip(names, xs, strict=True)}


def onnx_calibration_model(model, example_input=None):
    """The FP32 torch module that calibration and the channel search run on for an ONNX-only
    model: the graph :func:`prepare_onnx` gives the compiler, run by
    :func:`flexiq_tvm.onnx_torch.to_torch` (its convs and linears hold the graph's own
    weights)."""
    from .onnx_torch import to_torch

    proto = _load_onnx(model)
    shapes = _static_shapes(proto, _example_shapes(proto, example_input))
    # folded as the compiler's graph is (onnxruntime's basic fusions, e.g. BatchNorm into
    # the conv, so the weights are the same) but with the batch axis left as the file has
    # it, so that calibration runs in batches; a batch fixed in the file runs in chunks
    if _has_runtime_shapes(proto):
        proto = fold_onnx_constants(proto)
    initializers = {i.name for i in proto.graph.initializer}
    first = next(i for i in proto.graph.input if i.name not in initializers)
    dim0 = first.type.tensor_type.shape.dim[:1]
    batch = int(dim0[0].dim_value) if dim0 and dim0[0].HasField("dim_value") else None
    return to_torch(proto, shapes, batch=batch)


def _with_static_inputs(proto, shapes):
    """A copy of ``proto`` whose graph inputs carry the given static shapes."""
    import onnx

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for inp in proto.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, shapes[inp.name], strict=True):
                d.ClearField("dim_param")
                d.dim_value = int(v)
    return proto


def is_torch_module(model) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(model, torch.nn.Module)


def import_model(model, example_input=None, via: str = "torch.export") -> ImportedModel:
    """Import a torch module (``via`` ``"torch.export"`` or ``"onnx"``) or an ONNX model.

    An ONNX path/bytes/ModelProto always goes through the ONNX frontend; its input shape is
    taken from ``example_input`` when given, else from the graph.
    """
    if via not in VIA:
        raise ValueError(f"via={via!r}; allowed: {VIA}")
    if is_torch_module(model):
        if example_input is None:
            raise ValueError("a torch model needs example_input (a tensor of the input shape)")
        if via == "torch.export":
            return from_torch(model, example_input)
        proto = export_onnx(model, example_input)
        return from_onnx(proto)
    proto = _load_onnx(model)
    return from_onnx(proto, _example_shapes(proto, example_input))


def default_llvm_target() -> dict:
    """The llvm target of this machine as a dict (TVM 0.27 rejects option strings).

    On x86-64 the host CPU as LLVM detects it (``-mcpu=native``), so AVX2 is used where the
    machine has it; elsewhere LLVM's generic CPU.

    FMA is switched off (``mattr=-fma``): TVM lets LLVM contract ``a * b + c`` into one fused
    multiply-add, which rounds once where numpy and torch round twice. The quantizer's
    ``x * inv + 0.5`` and the FP32 glue must round like the integer oracle and the fake-quant
    model, so every multiply and add is rounded separately. (On AVX-512 CPUs this also drops
    AVX-512F, which depends on FMA.) The integer GEMMs are built apart, with their ISA's
    features (:func:`flexiq_tvm.schedules.llvm.build`).
    """
    import platform

    target = {"kind": "llvm", "num-cores": os.cpu_count() or 1}
    if platform.machine() in ("x86_64", "AMD64"):
        import tvm

        target["mtriple"] = "x86_64-pc-linux-gnu"
        target["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
        target["mattr"] = ["-fma"]
        # LLVM's SLP vectoriser packs the kernels' per-position address arithmetic into vector
        # registers (extracting each address again), competing with the dot products for the
        # vector ports; every vector loop here is vectorised explicitly in TIR
        target["cl-opt"] = ["-vectorize-slp=false"]
    return target


class Runner:
    """A built FP32 module: ``runner(x) -> numpy`` (first output of ``main``)."""

    def __init__(self, executable, device=None) -> None:
        import tvm
        from tvm import relax

        self.executable = executable
        self.device = device or tvm.cpu()
        self.vm = relax.VirtualMachine(executable, self.device)

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        import tvm

        args = [tvm.runtime.tensor(np.ascontiguousarray(x), self.device) for x in inputs]
        out = self.vm["main"](*args)
        while not hasattr(out, "numpy"):  # frontends return a tuple of outputs
            out = out[0]
        return out.numpy()


def build_fp32(imported: ImportedModel, target: str | dict | None = None) -> Runner:
    """Build the FP32 module with TVM's default Relax pipeline and return a :class:`Runner`."""
    import tvm

    target = target or default_llvm_target()
    ex = tvm.compile(imported.bound(), target=tvm.target.Target(target))
    return Runner(ex)
