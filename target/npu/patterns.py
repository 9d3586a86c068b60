"""BYOC patterns of the FlexiNPU and ``partition_for_flexiq_npu``.

Offloaded (composite names ``flexiq_npu.*``):

* ``flexiq_npu.conv2d_e{k}[_relu|_clip]`` -- ``R.nn.conv2d(x, W)`` with a constant ``W`` that a
  QuantPlan layer covers, followed by ``k`` (0..6) elementwise ops with a per-channel or scalar
  constant (add / subtract / multiply / divide: conv bias and decomposed BatchNorm) and
  optionally ReLU or clip (ReLU6);
* ``flexiq_npu.matmul_e{k}[_relu|_clip]`` -- the same for ``R.matmul(x, W)`` (linear layers);
* ``flexiq_npu.add[_relu]`` -- a residual add of two tensors of one shape.

Everything else (layer norm, softmax, attention matmuls, reshapes, pooling, layers the plan
does not cover or whose input exceeds the activation buffer) stays on the host (llvm).
"""

from __future__ import annotations

import numpy as np
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard
from tvm.relax.transform import FusionPattern

from ...transform import _graph as g
from .isa import NPUConfig

MAX_EPILOGUE = 6
EW_OPS = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")
ACTS = ("_relu", "_clip", "")  # with an activation first: patterns are tried in order


def _static_shape(expr) -> tuple[int, ...] | None:
    if not g.is_tensor(expr):
        return None
    try:
        return g.shape_of(expr)
    except (TypeError, ValueError):
        return None


def _dtype(expr) -> str | None:
    return str(expr.ty.dtype) if g.is_tensor(expr) else None


def _layer_pattern(root_op: str, n_ew: int, act: str):
    x, w = wildcard(), is_const()
    root = is_op(root_op)(x, w)
    ann = {"root": root, "x": x, "w": w}
    p = root
    for i in range(n_ew):
        c = is_const()
        p = (is_op("relax.add")(p, c) | is_op("relax.add")(c, p) | is_op("relax.subtract")(p, c)
             | is_op("relax.multiply")(p, c) | is_op("relax.multiply")(c, p)
             | is_op("relax.divide")(p, c))
        ann[f"e{i}"] = p
    if act == "_relu":
        p = is_op("relax.nn.relu")(p)
        ann["act"] = p
    elif act == "_clip":
        p = is_op("relax.clip")(p, wildcard(), wildcard())
        ann["act"] = p
    return p, ann


def _not_leaking(ctx, names) -> bool:
    """Intermediate results of the chain are used by the next op only."""
    for n in names:
        expr = ctx.annotated_expr.get(n)
        if expr is None:
            continue
        var = ctx.value_to_bound_var.get(expr)
        if var is not None and len(ctx.var_usages.get(var, [])) > 1:
            return False
    return True


def _prim_float(expr) -> float | None:
    """The value of a ``R.prim_value`` float/int constant (clip bounds), else ``None``."""
    v = getattr(expr, "value", None)
    v = getattr(v, "value", v)
    return float(v) if isinstance(v, (int, float)) else None


def _per_channel(const, out_shape, channel_axis: int) -> bool:
    shape = g.const_np(const).shape
    if int(np.prod(shape)) == 1:
        return True
    # broadcast against the output: the constant may vary along the channel axis only
    full = (1,) * (len(out_shape) - len(shape)) + shape
    if len(full) != len(out_shape):
        return False
    ax = channel_axis % len(out_shape)
    return all(d == 1 for i, d in enumerate(full) if i != ax) and full[ax] == out_shape[ax]


def _lookup_layer(plan, root):
    from ...transform.annotate_channel_precision import match_layer, weight_oihw

    op = root.op.name
    w = g.const_np(root.args[1])
    if op == "relax.matmul" and w.ndim != 2:
        return None
    return match_layer(plan, weight_oihw(op, w), set())


def _layer_check(plan, config: NPUConfig, n_ew: int, act: str):
    def check(ctx) -> bool:
        root = ctx.annotated_expr["root"]
        x = ctx.annotated_expr["x"]
        in_shape, out_shape = _static_shape(x), _static_shape(root)
        if in_shape is None or out_shape is None or _dtype(x) != "float32":
            return False
        if root.op.name == "relax.nn.conv2d":
            a = root.attrs
            if (a.data_layout, a.kernel_layout, a.out_layout) != ("NCHW", "OIHW", "NCHW"):
                return False
            axis = 1
        else:
            axis = -1
        lp = _lookup_layer(plan, root)
        if lp is None or int(np.prod(in_shape)) > config.abuf_bytes:
            return False
        for i in range(n_ew):
            e = ctx.annotated_expr[f"e{i}"]
            t_arg, c_arg = e.args
            if g.const_np(t_arg) is not None:
                if e.op.name in ("relax.subtract", "relax.divide"):
                    return False
                c_arg = t_arg
            if not _per_channel(c_arg, out_shape, axis):
                return False
        if act == "_clip":
            lo, hi = ctx.annotated_expr["act"].args[1:]
            if _prim_float(lo) is None or _prim_float(hi) is None:
                return False
        chain = ["root"] + [f"e{i}" for i in range(n_ew)]
        return _not_leaking(ctx, chain if act else chain[:-1])  # the last one is the output

    return check


def _layer_attrs(plan):
    def attrs(annotated) -> dict[str, str]:
        lp = _lookup_layer(plan, annotated["root"])
        return {"flexiq_npu.layer": lp.name} if lp is not None else {}

    return attrs


def _add_check(relu: bool):
    def check(ctx) -> bool:
        a, b = ctx.annotated_expr["a"], ctx.annotated_expr["b"]
        if g.const_np(a) is not None or g.const_np(b) is not None:
            return False
        sa, sb = _static_shape(a), _static_shape(b)
        if sa is None or sa != sb or _dtype(a) != "float32" or _dtype(b) != "float32":
            return False
        return _not_leaking(ctx, ["add"]) if relu else True

    return check


def flexiq_npu_patterns(plan, config: NPUConfig | None = None) -> list[FusionPattern]:
    """The FlexiNPU fusion patterns for ``plan``'s layers, longest epilogue first."""
    config = config or NPUConfig()
    out = []
    for op, kind in (("relax.nn.conv2d", "conv2d"), ("relax.matmul", "matmul")):
        for n_ew in range(MAX_EPILOGUE, -1, -1):
            for act in ACTS:
                pat, ann = _layer_pattern(op, n_ew, act)
                out.append(FusionPattern(f"flexiq_npu.{kind}_e{n_ew}{act}", pat, ann,
                                         _layer_check(plan, config, n_ew, act),
                                         _layer_attrs(plan)))
    for relu in (True, False):
        a, b = wildcard(), wildcard()
        add = is_op("relax.add")(a, b)
        pat = is_op("relax.nn.relu")(add) if relu else add
        out.append(FusionPattern("flexiq_npu.add" + ("_relu" if relu else ""), pat,
                                 {"a": a, "b": b, "add": add}, _add_check(relu)))
    return out


def partition_for_flexiq_npu(mod, plan, config: NPUConfig | None = None):
    """Wrap every offloadable region of ``mod`` (bound, prepared: see
    :func:`flexiq_tvm.transform.prepare`) into a ``Codegen="flexiq_npu"`` function."""
    return relax.transform.FuseOpsByPattern(flexiq_npu_patterns(plan, config),
                                            bind_constants=True, annotate_codegen=True)(mod)
