"""ReorderChannelBlocks: permute channels so each layer's 4-bit channels form a prefix block.

Runs after :class:`AnnotateChannelPrecision`, before :class:`QuantizeMixedPrecision`.

Every covered GEMM layer (conv with ``groups == 1``, linear) wants its input channels ordered
so that, for every ratio, the 4-bit set is the first ``n_low`` channels (nested across ratios;
inside each ratio's increment, channels are grouped by shift). A tensor's channel order is set
by whoever produces it, so the pass solves it over the graph as constraint propagation:

* union-find over tensors: ops that keep the channel axis (unary and per-channel binary
  elementwise ops incl. decomposed BatchNorm, residual adds, LayerNorm over the channel axis,
  pooling / mean over other axes, reshapes and transposes that keep the axis, concat along
  another axis, depthwise convs, covered or not) join their inputs and output into one
  *channel space*;
* a space is *free* when all its producers are conv/linear layers with constant weights (their
  output channels can be permuted); the model input, the outputs and the operands of any other
  op *pin* a space to the original order;
* a free space takes the order its largest 4-bit consumer wants; every other consumer whose
  low sets are not prefixes of that order gets an explicit ``R.take`` gather (listed in the
  compile report through the ``flexiq.gather`` attribute).

All constants along a permuted space are permuted with it (conv/linear weights on both sides,
biases, BatchNorm, LayerNorm affine, depthwise weights), so the FP32 outputs do not change.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..plan import QuantPlan
from . import _graph as g

UNARY = {"relax.nn.relu", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.silu", "relax.clip",
         "relax.sigmoid", "relax.tanh", "relax.erf", "relax.negative", "relax.nn.relu6"}
BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
          "relax.minimum"}
POOL = {"relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d"}


def desired_order(lp) -> np.ndarray:
    """The input-channel order a layer wants: for each ratio increment of the nested low sets,
    its channels grouped by shift (then by index); the 8-bit channels last, by index."""
    shift = lp.act_shift.astype(np.int32) + lp.w_shift.astype(np.int32)
    bounds = sorted(set(int(v) for v in lp.n_low.values()))
    order, start = [], 0
    for b in bounds:
        seg = np.asarray(lp.order[start:b])
        order.extend(seg[np.lexsort((seg, shift[seg]))].tolist())
        start = max(start, b)
    rest = np.sort(np.asarray(lp.order[start:]))
    order.extend(rest.tolist())
    return np.asarray(order, dtype=np.int64)


def satisfies(perm: np.ndarray, lp) -> bool:
    """True when every ratio's 4-bit set of ``lp`` is a prefix of ``perm``."""
    for n in lp.n_low.values():
        if set(perm[:n].tolist()) != set(np.asarray(lp.order[:n]).tolist()):
            return False
    return True


class _Spaces:
    """Union-find over tensors with a channel axis."""

    def __init__(self) -> None:
        self.parent: dict = {}
        self.axis: dict = {}
        self.pinned: set = set()

    def add(self, v, axis: int | None) -> None:
        self.parent.setdefault(v, v)
        self.axis[v] = axis
        if axis is None:
            self.pinned.add(v)

    def find(self, v):
        while self.parent[v] is not v and not self.parent[v].same_as(v):
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra.same_as(rb):
            return
        self.parent[rb] = ra
        if rb in self.pinned:
            self.pinned.add(ra)

    def pin(self, v) -> None:
        if v in self.parent:
            self.pinned.add(self.find(v))

    def is_pinned(self, v) -> bool:
        return self.find(v) in self.pinned


def _reshape_axis(in_shape, axis, out_shape) -> int | None:
    before = int(np.prod(in_shape[:axis]))
    c = in_shape[axis]
    acc = 1
    for j, d in enumerate(out_shape):
        if acc == before and d == c:
            return j
        acc *= d
    return None


@tvm.transform.module_pass(opt_level=0, name="ReorderChannelBlocks")
class ReorderChannelBlocks:
    """Permute channels into contiguous low/high blocks (see the module docstring).

    Parameters
    ----------
    plan : QuantPlan
        The plan the composites were annotated with.
    """

    def __init__(self, plan: QuantPlan, func_name: str = "main") -> None:
        self.plan = plan
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        func = mod[self.func_name]
        sp = _Spaces()
        depthwise: set = set()  # covered depthwise composites (the order passes through)
        const_perm: dict = {}  # (binding var, arg index) -> (space member, axis, role)
        consumers: list = []  # (binding var, input var, layer plan)
        for p in func.params:
            if g.is_tensor(p):
                sp.add(p, None)
        for b in g.bindings(func):
            self._visit(mod, b.var, b.value, sp, const_perm, consumers, depthwise)
        # outputs are pinned
        for v in _vars_in(func.body.body):
            sp.pin(v)

        # choose one permutation per free space
        space_perm: dict = {}
        by_space: dict = {}
        for bvar, xin, lp in consumers:
            by_space.setdefault(sp.find(xin), []).append((bvar, xin, lp))
        for root, cons in by_space.items():
            if sp.is_pinned(root):
                continue
            wanting = [c for c in cons if max(c[2].n_low.values()) > 0]
            if not wanting:
                continue
            best = max(wanting, key=lambda c: c[2].macs_per_channel * c[2].in_channels)
            space_perm[root] = desired_order(best[2])

        def perm_of(v) -> np.ndarray | None:
            if v not in sp.parent:
                return None
            return space_perm.get(sp.find(v))

        gathers: dict = {}
        layer_in: dict = {}
        for bvar, xin, lp in consumers:
            cur = perm_of(xin)
            cur_arr = np.arange(lp.in_channels) if cur is None else cur
            if satisfies(cur_arr, lp):
                layer_in[bvar] = (cur_arr, False)
                continue
            want = desired_order(lp)
            pos = np.argsort(cur_arr)  # original channel -> position in the current tensor
            gathers[bvar] = pos[want]
            layer_in[bvar] = (want, True)

        def visit(bb, var, value):
            if not isinstance(value, relax.Call):
                return value
            args = list(value.args)
            for i, a in enumerate(args):
                key = (var, i)
                if key in const_perm:
                    member, axis, role = const_perm[key]
                    perm = perm_of(member)
                    if role == "in" and var in layer_in:
                        perm = layer_in[var][0]
                    w = g.const_np(a)
                    changed = perm is not None
                    if perm is not None:
                        w = np.take(w, perm, axis=axis)
                    if i == 1 and (var, "out") in const_perm:
                        member, oaxis, _ = const_perm[(var, "out")]
                        operm = perm_of(member)
                        if operm is not None:
                            w = np.take(w, operm, axis=oaxis)
                            changed = True
                    if changed:
                        args[i] = relax.const(np.ascontiguousarray(w))
            comp = g.composite_kind(mod, value)
            if comp is not None and var in depthwise:
                cfunc = comp[1]
                perm = perm_of(var)
                perm = [int(i) for i in (np.arange(g.shape_of(var)[1]) if perm is None else perm)]
                attrs = dict(cfunc.attrs)
                attrs["flexiq.in_perm"] = perm
                attrs["flexiq.out_perm"] = perm
                bb.update_func(value.op, cfunc.with_attrs(attrs))
            if comp is not None and var in layer_in:  # other grouped composites keep the order
                kind, cfunc = comp
                in_perm, gathered = layer_in[var]
                out_perm = perm_of(var)
                if var in gathers:
                    ax = 1 if kind == g.CONV else len(g.shape_of(args[0])) - 1
                    args[0] = bb.emit(relax.op.take(args[0], relax.const(gathers[var], "int64"),
                                                    axis=ax), name_hint="gather")
                o = g.shape_of(var)[1 if kind == g.CONV else -1]
                attrs = dict(cfunc.attrs)
                attrs["flexiq.in_perm"] = [int(i) for i in in_perm]
                attrs["flexiq.out_perm"] = [int(i) for i in (np.arange(o) if out_perm is None
                                                             else out_perm)]
                attrs["flexiq.gather"] = bool(gathered)
                bb.update_func(value.op, cfunc.with_attrs(attrs))
            return relax.Call(value.op, args, value.attrs, value.ty_args)

        return relax.transform.Normalize()(g.rebuild(mod, self.func_name, visit))

    # ------------------------------------------------------------------ graph analysis
    def _visit(self, mod, var, value, sp, const_perm, consumers, depthwise) -> None:
        if not g.is_tensor(var):
            for u in _vars_in(value):
                sp.pin(u)
            return
        rank = len(g.shape_of(var))
        op = g.op_name(value)
        comp = g.composite_kind(mod, value)
        if comp is not None:
            kind, cfunc = comp
            lp = self.plan.layer(str(cfunc.attrs["flexiq.layer"]))
            xin = value.args[0]
            conv_attrs = g.inner_call(cfunc).attrs
            grouped = kind == g.CONV and int(conv_attrs.groups) > 1
            out_axis = 1 if kind == g.CONV else rank - 1
            if grouped:
                w_shape = tuple(lp.weight_shape)
                if w_shape[1] == 1 and int(conv_attrs.groups) == w_shape[0] == lp.in_channels:
                    # depthwise: channel i in is channel i out, so it passes the order through
                    # (its kernel picks 4-bit channels by rank, no prefix needed)
                    sp.add(var, 1)
                    sp.union(xin, var)
                    const_perm[(var, 1)] = (var, 0, "out")
                    depthwise.add(var)
                    return
                sp.pin(xin)
                sp.add(var, None)
                return
            consumers.append((var, xin, lp))
            sp.add(var, out_axis)
            const_perm[(var, 1)] = (xin, 1 if kind == g.CONV else 0, "in")
            # QuantizeMixedPrecision permutes the plan's codes by in_perm / out_perm; the FP32
            # weight constant is permuted on both sides here too
            self._out_weight(var, kind, const_perm)
            return
        if op == "relax.nn.conv2d" and g.const_np(value.args[1]) is not None:
            groups = int(value.attrs.groups)
            w = g.const_np(value.args[1])
            if groups == 1:
                sp.add(var, 1)
                const_perm[(var, 1)] = (value.args[0], 1, "in")
                self._out_weight(var, g.CONV, const_perm)
                return
            if w.shape[1] == 1 and groups == w.shape[0]:  # depthwise: passes the order through
                sp.add(var, 1)
                sp.union(value.args[0], var)
                const_perm[(var, 1)] = (var, 0, "out")
                return
        if op == "relax.matmul" and g.const_np(value.args[1]) is not None \
                and g.const_np(value.args[1]).ndim == 2 and g.is_tensor(value.args[0]):
            sp.add(var, rank - 1)
            const_perm[(var, 1)] = (value.args[0], 0, "in")
            self._out_weight(var, g.LINEAR, const_perm)
            return
        x0 = value.args[0] if isinstance(value, relax.Call) and value.args else None
        ax0 = sp.axis.get(x0) if x0 is not None and x0 in sp.parent else None
        if op in UNARY and ax0 is not None:
            sp.add(var, ax0)
            sp.union(x0, var)
            return
        if op in BINARY:
            self._binary(var, value, sp, const_perm)
            return
        if op in POOL and ax0 == 1:
            sp.add(var, 1)
            sp.union(x0, var)
            return
        if op == "relax.mean" and ax0 is not None:
            axes = [int(a) % len(g.shape_of(x0)) for a in value.attrs.axis]
            if ax0 not in axes:
                new = ax0 if value.attrs.keepdims else ax0 - sum(a < ax0 for a in axes)
                sp.add(var, new)
                sp.union(x0, var)
                return
        if op == "relax.reshape" and ax0 is not None:
            new = _reshape_axis(g.shape_of(x0), ax0, g.shape_of(var))
            if new is not None:
                sp.add(var, new)
                sp.union(x0, var)
                return
        if op == "relax.permute_dims" and ax0 is not None:
            axes = value.attrs.axes
            axes = list(range(rank))[::-1] if axes is None else [int(a) for a in axes]
            sp.add(var, axes.index(ax0))
            sp.union(x0, var)
            return
        if op == "relax.nn.layer_norm" and ax0 is not None:
            axes = [int(a) % rank for a in value.attrs.axes]
            if axes == [ax0]:
                sp.add(var, ax0)
                sp.union(x0, var)
                const_perm[(var, 1)] = (var, 0, "out")
                const_perm[(var, 2)] = (var, 0, "out")
                return
        if op == "relax.concat" and isinstance(value.args[0], relax.Tuple):
            fields = value.args[0].fields
            cat = int(value.attrs.axis) % rank
            # joins spaces when every field is a tensor with the same channel axis (not the
            # concat axis); constant fields (class tokens) fall through and pin
            axes = {sp.axis.get(f) if f in sp.parent else None for f in fields}
            if len(axes) == 1 and None not in axes and cat not in axes:
                sp.add(var, axes.pop())
                for f in fields:
                    sp.union(f, var)
                return
        for u in _vars_in(value):
            sp.pin(u)
        sp.add(var, None)

    def _binary(self, var, value, sp, const_perm) -> None:
        out_shape = g.shape_of(var)
        rank = len(out_shape)
        tensor_args = [a for a in value.args if a in sp.parent]
        axes = set()
        for a in tensor_args:
            ar = len(g.shape_of(a))
            ax = sp.axis.get(a)
            axes.add(None if ax is None or g.shape_of(a) != out_shape else ax + rank - ar)
        if len(axes) != 1 or None in axes or not tensor_args:
            for u in _vars_in(value):
                sp.pin(u)
            sp.add(var, None)
            return
        ax = axes.pop()
        c = out_shape[ax]
        for i, a in enumerate(value.args):
            w = g.const_np(a)
            if w is None:
                continue
            cax = ax - (rank - w.ndim)
            if cax >= 0 and w.shape[cax] == c and c > 1:
                const_perm[(var, i)] = (var, cax, "out")
        sp.add(var, ax)
        for a in tensor_args:
            sp.union(a, var)

    @staticmethod
    def _out_weight(var, kind, const_perm) -> None:
        """Record that the weight's output axis follows ``var``'s space."""
        const_perm[(var, "out")] = (var, 0 if kind == g.CONV else 1, "out")


def _vars_in(expr) -> list:
    out = []
    if isinstance(expr, relax.Var):
        out.append(expr)
    elif isinstance(expr, relax.Tuple):
        for f in expr.fields:
            out.extend(_vars_in(f))
    elif isinstance(expr, relax.TupleGetItem):
        out.extend(_vars_in(expr.tuple_value))
    elif isinstance(expr, relax.Call):
        for a in expr.args:
            out.extend(_vars_in(a))
    return out
