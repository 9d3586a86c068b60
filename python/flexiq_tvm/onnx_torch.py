"""An ONNX graph as a torch module: the FP32 model that calibration, sensitivity and the
channel search run on when a user holds only the ``.onnx`` file.

:func:`to_torch` turns every ``Conv`` (2-D, constant weight) into an ``nn.Conv2d`` and every
``Gemm`` / ``MatMul`` with a constant 2-D weight into an ``nn.Linear``, holding the ONNX
initializers themselves, so that the plan the quantizer computes on this module finds its
layers in the Relax graph the compiler imports from the same file (the compiler matches
layers by their weights). Every other op runs as the torch function it names, eagerly (shapes
computed at run time, as ``Shape`` / ``Gather`` / ``Concat`` chains do, just work). An op this
module does not know, or a node of a custom domain, is refused with its name, op and domain.

Why our own converter and not ``onnx2torch``: its package requires ``torchvision``, whose
pinned build does not match the torch pinned here, and calibration only needs the forward
pass of the standard ops (docs/own_model.md argues the choice).
"""

from __future__ import annotations

import functools
import re

import numpy as np

_STANDARD_DOMAINS = ("", "ai.onnx")


class UnsupportedONNX(ValueError):
    """An ONNX graph this converter cannot run (the message names the node)."""


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _name(node, i: int) -> str:
    base = re.sub(r"[^0-9A-Za-z_]+", "_", node.name or f"{node.op_type}_{i}").strip("_")
    return base or f"{node.op_type}_{i}"


def _torch_dtype(onnx_type: int):
    import onnx
    import torch

    np_type = onnx.helper.tensor_dtype_to_np_dtype(onnx_type)
    return torch.from_numpy(np.zeros(1, np_type)).dtype


@functools.cache
def _padded_conv2d_class():
    """An ``nn.Conv2d`` that pads asymmetrically first (ONNX ``pads`` may differ begin/end;
    the quantizer measures a conv's effective padding from its forward)."""
    import torch.nn.functional as F
    from torch import nn

    class PaddedConv2d(nn.Conv2d):
        def __init__(self, pads, **kw) -> None:
            super().__init__(padding=0, **kw)
            top, left, bottom, right = pads
            self.pads = (left, right, top, bottom)  # F.pad's order

        def forward(self, x):
            return super().forward(F.pad(x, self.pads))

    return PaddedConv2d


def _conv_module(node, a: dict, w: np.ndarray, b: np.ndarray | None, in_shape):
    """``nn.Conv2d`` for a 2-D ONNX Conv (attributes ``a``) with a constant weight (None when
    not 2-D)."""
    import torch
    from torch import nn

    if w.ndim != 4:
        return None
    k = tuple(w.shape[2:])
    strides = tuple(a.get("strides", (1, 1)))
    dil = tuple(a.get("dilations", (1, 1)))
    pads = list(a.get("pads", (0, 0, 0, 0)))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        if in_shape is None:
            raise UnsupportedONNX(f"node {node.name!r} (Conv): auto_pad={auto} needs a static "
                                  "input shape")
        pads = [0, 0, 0, 0]
        for i in range(2):
            size = in_shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + dil[i] * (k[i] - 1) + 1 - size)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[i], pads[i + 2] = lo, total - lo
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    groups = int(a.get("group", 1))
    kw = dict(in_channels=w.shape[1] * groups, out_channels=w.shape[0], kernel_size=k,
              stride=strides, dilation=dil, groups=groups, bias=b is not None)
    if pads[0] == pads[2] and pads[1] == pads[3]:
        m = nn.Conv2d(padding=(pads[0], pads[1]), **kw)
    else:
        m = _padded_conv2d_class()(pads, **kw)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(np.array(w, np.float32)))
        if b is not None:
            m.bias.copy_(torch.from_numpy(np.array(b, np.float32)))
    return m


def _linear_module(w_ok: np.ndarray, b: np.ndarray | None):
    """``nn.Linear`` whose weight is ``w_ok`` ([out, in])."""
    import torch
    from torch import nn

    m = nn.Linear(w_ok.shape[1], w_ok.shape[0], bias=b is not None)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(np.array(w_ok, np.float32)))
        if b is not None:
            m.bias.copy_(torch.from_numpy(np.array(b, np.float32).reshape(-1)))
    return m


def _axes(node, ins, a, pos: int = 1):
    """Axes given as an attribute (older opsets) or as input ``pos`` (newer ones)."""
    if len(ins) > pos and ins[pos] is not None:
        return [int(v) for v in ins[pos].reshape(-1).tolist()]
    return list(a["axes"]) if "axes" in a else None


def _pool(node, x, a, kind: str):
    import torch.nn.functional as F

    k = tuple(a["kernel_shape"])
    strides = tuple(a.get("strides", (1,) * len(k)))
    pads = list(a.get("pads", (0,) * 2 * len(k)))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if (auto != "NOTSET" and auto != "VALID") or len(k) != 2:
        raise UnsupportedONNX(f"node {node.name!r} ({node.op_type}): only 2-D pools with "
                              "explicit pads are supported")
    if auto == "VALID":
        pads = [0, 0, 0, 0]
    ceil = bool(a.get("ceil_mode", 0))
    sym = pads[0] == pads[2] and pads[1] == pads[3]
    if kind == "max":
        dil = tuple(a.get("dilations", (1, 1)))
        if not sym:
            x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]), value=float("-inf"))
            pads = [0, 0, 0, 0]
        return F.max_pool2d(x, k, strides, (pads[0], pads[1]), dil, ceil_mode=ceil)
    include = bool(a.get("count_include_pad", 0))
    if not sym:
        if not include:
            raise UnsupportedONNX(f"node {node.name!r} (AveragePool): asymmetric pads "
                                  "excluded from the count")
        x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
        pads = [0, 0, 0, 0]
    return F.avg_pool2d(x, k, strides, (pads[0], pads[1]), ceil_mode=ceil,
                        count_include_pad=include)


def _reshape(x, shape, allowzero: bool):
    dims = [int(v) for v in shape.reshape(-1).tolist()]
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _slice(x, ins):
    starts, ends = ins[1].tolist(), ins[2].tolist()
    axes = ins[3].tolist() if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = ins[4].tolist() if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    idx = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps, strict=True):
        n = x.shape[ax]
        if st < 0:  # torch slicing has no negative step: flip, slice, done
            raise UnsupportedONNX("Slice with a negative step")
        s = max(0, min(n, s + n if s < 0 else s))
        e = max(0, min(n, e + n if e < 0 else e))
        idx[ax] = slice(s, e, st)
    return x[tuple(idx)]


@functools.cache
def _elementwise() -> tuple[dict, dict]:
    """The ONNX ops that are one torch function of one or two tensors (built once)."""
    import torch
    import torch.nn.functional as F

    unary = {"Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
             "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs,
             "Erf": torch.erf, "Reciprocal": torch.reciprocal, "Floor": torch.floor,
             "Ceil": torch.ceil, "Softplus": F.softplus, "Not": torch.logical_not,
             "Sign": torch.sign, "Round": torch.round}
    binary = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow,
              "Equal": torch.eq, "Greater": torch.gt, "Less": torch.lt,
              "GreaterOrEqual": torch.ge, "LessOrEqual": torch.le, "And": torch.logical_and,
              "Or": torch.logical_or, "MatMul": torch.matmul}
    return unary, binary


def _run_node(node, ins, a):
    import torch
    import torch.nn.functional as F

    op = node.op_type
    x = ins[0] if ins else None
    unary, binary = _elementwise()
    if op in unary:
        return unary[op](x)
    if op in binary:
        return binary[op](ins[0], ins[1])
    if op == "Div":
        if not x.is_floating_point() and not ins[1].is_floating_point():
            return torch.div(x, ins[1], rounding_mode="trunc")
        return torch.div(x, ins[1])
    if op in ("Identity", "Dropout"):
        return x
    if op == "LeakyRelu":
        return F.leaky_relu(x, a.get("alpha", 0.01))
    if op == "Elu":
        return F.elu(x, a.get("alpha", 1.0))
    if op == "HardSigmoid":
        return torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1)
    if op == "HardSwish":
        return F.hardswish(x)
    if op == "Gelu":
        approx = a.get("approximate", b"none")
        return F.gelu(x, approximate=approx.decode() if isinstance(approx, bytes) else approx)
    if op == "Clip":
        lo = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("min")
        hi = ins[2] if len(ins) > 2 and ins[2] is not None else a.get("max")
        lo = None if lo is None else float(lo)
        hi = None if hi is None else float(hi)
        return torch.clamp(x, lo, hi)
    if op in ("Softmax", "LogSoftmax"):
        fn = F.softmax if op == "Softmax" else F.log_softmax
        return fn(x, dim=a.get("axis", -1))
    if op in ("Min", "Max", "Sum", "Mean"):
        out = ins[0]
        for t in ins[1:]:
            out = {"Min": torch.minimum, "Max": torch.maximum}.get(op, torch.add)(out, t)
        return out / len(ins) if op == "Mean" else out
    if op == "Where":
        return torch.where(ins[0].bool(), ins[1], ins[2])
    if op == "BatchNormalization":
        return F.batch_norm(x, ins[3], ins[4], ins[1], ins[2], False, 0.0,
                            a.get("epsilon", 1e-5))
    if op == "LayerNormalization":
        axis = a.get("axis", -1) % x.dim()
        shape = tuple(x.shape[axis:])
        bias = ins[2] if len(ins) > 2 else None
        return F.layer_norm(x, shape, ins[1].reshape(shape),
                            None if bias is None else bias.reshape(shape),
                            a.get("epsilon", 1e-5))
    if op == "InstanceNormalization":
        return F.instance_norm(x, weight=ins[1], bias=ins[2], eps=a.get("epsilon", 1e-5))
    if op == "GlobalAveragePool":
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
    if op == "GlobalMaxPool":
        return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)
    if op == "MaxPool":
        return _pool(node, x, a, "max")
    if op == "AveragePool":
        return _pool(node, x, a, "avg")
    if op == "Flatten":
        axis = a.get("axis", 1) % max(1, x.dim())
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op == "Reshape":
        return _reshape(x, ins[1], bool(a.get("allowzero", 0)))
    if op == "Transpose":
        return x.permute(*a.get("perm", list(range(x.dim()))[::-1]))
    if op == "Concat":
        return torch.cat([t for t in ins if t.numel() or t.dim() == ins[0].dim()],
                         dim=a["axis"])
    if op == "Split":
        axis = a.get("axis", 0)
        sizes = ins[1].tolist() if len(ins) > 1 and ins[1] is not None else a.get("split")
        if sizes is None:
            n = a.get("num_outputs", len(node.output))
            size = -(-x.shape[axis] // n)
            sizes = [min(size, x.shape[axis] - i * size) for i in range(n)]
        return tuple(torch.split(x, list(sizes), dim=axis))
    if op == "Slice":
        return _slice(x, ins)
    if op == "Squeeze":
        axes = _axes(node, ins, a)
        if axes is None:
            return x.squeeze()
        for ax in sorted((v % x.dim() for v in axes), reverse=True):
            x = x.squeeze(ax)
        return x
    if op == "Unsqueeze":
        axes = _axes(node, ins, a)
        rank = x.dim() + len(axes)
        for ax in sorted(v % rank for v in axes):
            x = x.unsqueeze(ax)
        return x
    if op == "Gather":
        axis = a.get("axis", 0) % x.dim()
        idx = ins[1].long()
        idx = torch.where(idx < 0, idx + x.shape[axis], idx)
        out = torch.index_select(x, axis, idx.reshape(-1))
        return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))
    if op == "Shape":
        dims = list(x.shape)[a.get("start", 0):a.get("end", None)]
        return torch.tensor(dims, dtype=torch.int64)
    if op == "Cast":
        return x.to(_torch_dtype(a["to"]))
    if op == "ConstantOfShape":
        value = a.get("value")
        fill = 0.0 if value is None else _tensor(value).reshape(-1)[0].item()
        dtype = torch.float32 if value is None else _tensor(value).dtype
        return torch.full([int(v) for v in x.tolist()], fill, dtype=dtype)
    if op == "Expand":
        shape = [int(v) for v in ins[1].tolist()]
        return x * torch.ones(shape, dtype=x.dtype)  # numpy-style broadcast both ways
    if op == "Range":
        return torch.arange(ins[0].item(), ins[1].item(), ins[2].item(), dtype=ins[0].dtype)
    if op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"):
        axes = _axes(node, ins, a)
        keep = bool(a.get("keepdims", 1))
        if axes is None or not axes:
            if a.get("noop_with_empty_axes", 0) and axes is not None:
                return x
            axes = list(range(x.dim()))
        fn = {"ReduceMean": torch.mean, "ReduceSum": torch.sum,
              "ReduceMax": torch.amax, "ReduceMin": torch.amin}[op]
        return fn(x, dim=tuple(axes), keepdim=keep)
    if op == "Pad":
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        pads = (ins[1].tolist() if len(ins) > 1 else list(a["pads"]))
        value = float(ins[2]) if len(ins) > 2 and ins[2] is not None else a.get("value", 0.0)
        n = len(pads) // 2
        torch_pads = []
        for ax in reversed(range(n)):
            torch_pads += [pads[ax], pads[ax + n]]
        return F.pad(x, torch_pads, mode=mode, value=value if mode == "constant" else None)
    if op == "Gemm":  # a Gemm whose B is not constant
        aa, bb = ins[0], ins[1]
        aa = aa.T if a.get("transA", 0) else aa
        bb = bb.T if a.get("transB", 0) else bb
        out = a.get("alpha", 1.0) * (aa @ bb)
        if len(ins) > 2 and ins[2] is not None:
            out = out + a.get("beta", 1.0) * ins[2]
        return out
    if op == "Conv":  # a Conv whose weight is not constant, or not 2-D
        fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}.get(ins[1].dim())
        pads = list(a.get("pads", (0,) * 2 * (ins[1].dim() - 2)))
        n = len(pads) // 2
        if fn is None or pads[:n] != pads[n:]:
            raise UnsupportedONNX(f"node {node.name!r} (Conv): unsupported form")
        return fn(x, ins[1], ins[2] if len(ins) > 2 else None, tuple(a.get("strides", 1)),
                  tuple(pads[:n]), tuple(a.get("dilations", 1)), a.get("group", 1))
    raise UnsupportedONNX(f"node {node.name!r}: ONNX op {op} is not supported by the FP32 "
                          "calibration model (flexiq_tvm.onnx_torch)")


def _tensor(proto_tensor):
    import onnx
    import torch

    arr = onnx.numpy_helper.to_array(proto_tensor)
    return torch.from_numpy(np.array(arr))


# the ops _run_node handles in a branch of their own (beside the element-wise tables)
_OTHER_OPS = frozenset({
    "Div", "Identity", "Dropout", "LeakyRelu", "Elu", "HardSigmoid", "HardSwish", "Gelu",
    "Clip", "Softmax", "LogSoftmax", "Min", "Max", "Sum", "Mean", "Where",
    "BatchNormalization", "LayerNormalization", "InstanceNormalization", "GlobalAveragePool",
    "GlobalMaxPool", "MaxPool", "AveragePool", "Flatten", "Reshape", "Transpose", "Concat",
    "Split", "Slice", "Squeeze", "Unsqueeze", "Gather", "Shape", "Cast", "ConstantOfShape",
    "Expand", "Range", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "Pad", "Gemm",
    "Conv", "Constant"})


def supported_ops() -> frozenset[str]:
    """Every ONNX op this converter runs."""
    unary, binary = _elementwise()
    return _OTHER_OPS | unary.keys() | binary.keys()


def check_supported(proto) -> None:
    """Refuse, with the first offending node named, a graph this converter cannot run: a node
    of a custom domain, or an op it does not know."""
    supported = supported_ops()
    for i, node in enumerate(proto.graph.node):
        if node.domain not in _STANDARD_DOMAINS:
            raise UnsupportedONNX(f"node {node.name or i!r}: op {node.op_type} of the custom "
                                  f"domain {node.domain!r} is not supported (only standard "
                                  "ONNX ops)")
        if node.op_type not in supported:
            raise UnsupportedONNX(f"node {node.name or i!r}: ONNX op {node.op_type} is not "
                                  "supported")


def to_torch(proto, input_shapes: dict[str, tuple[int, ...]] | None = None,
             batch: int | None = None):
    """The ``torch.nn.Module`` that runs ``proto`` (an ``onnx.ModelProto``) in FP32.

    ``input_shapes``: static shapes of the graph inputs where the graph leaves them dynamic
    (only needed for ``auto_pad=SAME_*`` convs). ``batch``: the batch size the graph is fixed
    to, if it is (its reshapes may say so): a larger batch then runs in chunks of it (the last
    one filled with repeats), outputs concatenated. Its ``forward`` takes the graph inputs in
    order and returns the output (a tuple when the graph has several).
    """
    import onnx
    import torch
    from torch import nn

    check_supported(proto)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    shapes = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
        for vi in [*inferred.graph.value_info, *inferred.graph.input]:
            dims = [d.dim_value if d.HasField("dim_value") else None
                    for d in vi.type.tensor_type.shape.dim]
            shapes[vi.name] = dims
    except Exception:
        pass
    for name, shp in (input_shapes or {}).items():
        shapes[name] = list(shp)
    for node in proto.graph.node:  # Constant nodes are constants like initializers
        if node.op_type == "Constant":
            a = _attrs(node)
            if "value" not in a:
                raise UnsupportedONNX(f"node {node.name!r}: Constant without a tensor value")
            init[node.output[0]] = onnx.numpy_helper.to_array(a["value"])

    class OnnxModule(nn.Module):
        """A torch module running an ONNX graph (see :mod:`flexiq_tvm.onnx_torch`)."""

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleDict()
            self.consts = {k: torch.from_numpy(np.array(v)) for k, v in init.items()}
            self.plan: list = []  # (node, module key or None, attrs)
            self.inputs = [i.name for i in proto.graph.input if i.name not in init]
            self.outputs = [o.name for o in proto.graph.output]
            used = set()
            for i, node in enumerate(proto.graph.node):
                if node.op_type == "Constant":
                    continue
                a = _attrs(node)
                m = self._module_for(node, a)
                key = None
                if m is not None:
                    key = _name(node, i)
                    while key in used:
                        key += "_"
                    used.add(key)
                    self.layers[key] = m
                self.plan.append((node, key, a))

        @staticmethod
        def _module_for(node, a):
            ins = list(node.input)
            if node.op_type == "Conv" and len(ins) > 1 and ins[1] in init:
                b = init.get(ins[2]) if len(ins) > 2 and ins[2] else None
                if len(ins) > 2 and ins[2] and b is None:
                    return None
                return _conv_module(node, a, init[ins[1]], b, shapes.get(ins[0]))
            if node.op_type == "Gemm" and len(ins) > 1 and ins[1] in init:
                w = init[ins[1]]
                if (a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or w.ndim != 2
                        or a.get("beta", 1.0) != 1.0):
                    return None
                b = init.get(ins[2]) if len(ins) > 2 and ins[2] else None
                if len(ins) > 2 and ins[2] and (b is None or b.size != w.shape[
                        0 if a.get("transB", 0) else 1]):
                    return None
                return _linear_module(w if a.get("transB", 0) else w.T, b)
            if node.op_type == "MatMul" and ins[1] in init and init[ins[1]].ndim == 2 \
                    and ins[0] not in init:
                return _linear_module(init[ins[1]].T, None)
            return None

        def forward(self, *xs):
            if len(xs) != len(self.inputs):
                raise ValueError(f"the ONNX graph takes {len(self.inputs)} inputs "
                                 f"({self.inputs}), got {len(xs)}")
            return self._run(xs)

        def _run(self, xs):
            env = dict(self.consts)
            env.update(zip(self.inputs, xs))
            for node, key, a in self.plan:
                if key is not None:
                    out = self.layers[key](env[node.input[0]])
                else:
                    ins = [env[n] if n else None for n in node.input]
                    out = _run_node(node, ins, a)
                if isinstance(out, tuple):
                    env.update(zip(node.output, out))
                else:
                    env[node.output[0]] = out
            outs = tuple(env[n] for n in self.outputs)
            return outs[0] if len(outs) == 1 else outs

    m = OnnxModule().eval()
    return m if batch is None else chunked(m, batch)


def chunked(module, batch: int):
    """``module`` (fixed to ``batch`` samples: its reshapes say so) run on any batch: in chunks
    of ``batch``, the last one filled with repeats of its first sample, outputs concatenated
    (calibration statistics see each real sample once, and the repeats)."""
    import torch
    from torch import nn

    class Chunked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *xs):
            n = xs[0].shape[0] if xs and xs[0].dim() else None
            if n is None or n == batch:
                return self.inner(*xs)
            chunks = []
            for i in range(0, n, batch):
                part = [x[i : i + batch] for x in xs]
                short = batch - part[0].shape[0]
                if short:
                    part = [torch.cat([p, p[:1].expand(short, *p.shape[1:])]) for p in part]
                out = self.inner(*part)
                outs = out if isinstance(out, tuple) else (out,)
                chunks.append([o[: batch - short] for o in outs])
            outs = tuple(torch.cat(col) for col in zip(*chunks))
            return outs[0] if len(outs) == 1 else outs

    return Chunked().eval()
