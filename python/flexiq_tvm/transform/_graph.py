"""Helpers shared by the FlexiQ passes: walk and rebuild a Relax function's dataflow block."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import relax

Constant = tvm.ir.GenericConst

COMPOSITE_ATTR = "Composite"
CONV = "flexiq.conv2d"
LINEAR = "flexiq.linear"


def bindings(func: relax.Function) -> list:
    """The bindings of ``func``'s body, which must be one dataflow block (after ``prepare``)."""
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        raise ValueError("expected a function body made of binding blocks")
    out = []
    for block in body.blocks:
        out.extend(block.bindings)
    return out


def const_np(expr) -> np.ndarray | None:
    """The value of a Relax constant as numpy, else ``None``."""
    if isinstance(expr, Constant):
        return expr.value.numpy()
    return None


def op_name(call) -> str | None:
    if isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op):
        return call.op.name
    return None


def composite_kind(mod, call) -> tuple[str, relax.Function] | None:
    """``(kind, function)`` when ``call`` calls a FlexiQ composite function of ``mod``."""
    if isinstance(call, relax.Call) and isinstance(call.op, relax.GlobalVar):
        func = mod[call.op]
        if isinstance(func, relax.Function) and func.attrs is not None:
            kind = func.attrs.get(COMPOSITE_ATTR) if COMPOSITE_ATTR in func.attrs else None
            if kind in (CONV, LINEAR):
                return str(kind), func
    return None


def inner_call(func: relax.Function) -> relax.Call:
    """The conv2d/matmul call inside a composite function."""
    for b in bindings(func):
        if isinstance(b.value, relax.Call):
            return b.value
    return func.body.body


def substitute(expr, vmap: dict):
    """``expr`` with the vars of ``vmap`` replaced (calls, tuples, tuple items)."""
    if isinstance(expr, relax.Var):
        return vmap.get(expr, expr)
    if isinstance(expr, relax.Tuple):
        return relax.Tuple([substitute(f, vmap) for f in expr.fields])
    if isinstance(expr, relax.TupleGetItem):
        return relax.TupleGetItem(substitute(expr.tuple_value, vmap), expr.index)
    if isinstance(expr, relax.Call):
        return relax.Call(expr.op, [substitute(a, vmap) for a in expr.args], expr.attrs,
                          expr.ty_args)
    return expr


def rebuild(mod: tvm.IRModule, name: str, visit: Callable, ret: Callable | None = None,
            new_name: str | None = None, setup: Callable | None = None) -> tvm.IRModule:
    """Re-emit function ``name``'s bindings through ``visit(bb, var, value) -> Expr`` (value
    already substituted); ``visit`` may emit extra bindings or add functions to ``bb`` first.
    ``ret(bb, body) -> Expr`` may replace the returned expression. The result (named
    ``new_name``, default ``name``) replaces the original in the returned module."""
    func = mod[name]
    new_name = new_name or name
    bb = relax.BlockBuilder(mod)
    if setup is not None:
        setup(bb)
    # fresh parameters: functions emitted from one source must not share Var objects
    params = [relax.Var(p.name, p.ty) for p in func.params]
    vmap: dict = dict(zip(func.params, params))
    outputs = _output_vars(func)
    tmp = f"__flexiq_tmp_{new_name}"
    with bb.function(tmp, params):
        with bb.dataflow():
            for b in bindings(func):
                value = visit(bb, b.var, substitute(b.value, vmap))
                if b.var in outputs:
                    new = bb.emit_output(value, name_hint=b.var.name)
                else:
                    new = bb.emit(value, name_hint=b.var.name)
                vmap[b.var] = new
        body = substitute(func.body.body, vmap)
        if ret is not None:
            body = ret(bb, body)
        bb.emit_func_output(body)
    out = bb.get()
    tmp_gv = out.get_global_var(tmp)
    new_func = out[tmp_gv]
    attrs = dict(func.attrs) if func.attrs is not None else {}
    attrs["global_symbol"] = new_name
    new_func = new_func.with_attrs(attrs)
    funcs = {gv: f for gv, f in out.functions.items() if gv.name_hint != tmp}
    if new_name == name:
        funcs[out.get_global_var(name)] = new_func
        return tvm.IRModule(funcs, attrs=mod.attrs)
    result = tvm.IRModule(funcs, attrs=mod.attrs)
    result[new_name] = new_func
    return result


def _output_vars(func: relax.Function) -> set:
    """Vars bound in dataflow blocks that are visible outside (non-DataflowVar)."""
    outs = set()
    for b in bindings(func):
        if not isinstance(b.var, relax.DataflowVar):
            outs.add(b.var)
    return outs


def is_tensor(expr) -> bool:
    ty = getattr(expr, "ty", None)
    return isinstance(ty, relax.TensorType) and ty.shape is not None


def shape_of(expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


def strip_composites(mod: tvm.IRModule, name: str = "main") -> tvm.IRModule:
    """Inline the FlexiQ composites back into plain conv2d/matmul calls (FP32 checks)."""
    def visit(bb, var, value):
        comp = composite_kind(mod, value)
        if comp is None:
            return value
        inner = inner_call(comp[1])
        return relax.Call(inner.op, list(value.args), inner.attrs, inner.ty_args)

    out = rebuild(mod, name, visit)
    keep = {gv: f for gv, f in out.functions.items()
            if not (isinstance(f, relax.Function) and f.attrs is not None
                    and COMPOSITE_ATTR in f.attrs)}
    return tvm.IRModule(keep, attrs=out.attrs)
