"""FuseRequantize: between two covered layers, run the producer's dequantizer, the FP32 glue
and the consumer's quantizer as one kernel, so no FP32 tensor is stored between them.

Runs after :class:`QuantizeMixedPrecision` (llvm). For each covered layer's quantizer
(``quantize_nhwc`` for a GEMM conv, ``quantize_padded`` for a grouped / depthwise conv) it
walks back from the quantizer's input through the glue:

* ``add`` / ``subtract`` / ``multiply`` / ``divide`` with a per-channel or scalar constant
  (bias, the decomposed batch norm), ``maximum`` / ``minimum``, ``nn.relu``, ``clip`` (ReLU6);
* ``add`` of another tensor of the output's shape (a residual: at most one per chain);

to a producer's ``dequantize`` (channel-major accumulator: a GEMM conv or a grouped conv).
Every value in between must have no other consumer; the quantizer's input itself may (the skip
path of a residual block reads it): then the fused kernel also writes that tensor. The chain
becomes one ``requantize_*`` kernel of the target's library (``schedules/llvm/requant.py``),
which computes every step in the graph's order in float32, so the codes are bit-identical to
the unfused module's, and the integer oracle judges both.

What is not fused, and why, is reported per layer (``fallbacks``): the model input (no
producer), an op outside the list (pooling, softmax, layer norm, GELU, concat, a gather, a
reshape), a value read twice, a linear producer or consumer (rows layout; the ViT's glue is
layer norm and GELU anyway), a second residual.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import tvm
from tvm import relax

from . import _graph as g
from .quantize_mixed_precision import CODES, _tag

REQUANT_ATTR = "flexiq.requant"  # JSON on the lowering's quantizers and dequantizers
CONSUMERS = {"quantize_nhwc": "requantize_nhwc", "quantize_padded": "requantize_padded"}
_BINARY = {"relax.add": "add", "relax.subtract": "subtract", "relax.multiply": "multiply",
           "relax.divide": "divide", "relax.maximum": "maximum", "relax.minimum": "minimum"}
_CALL_TIR = "relax.call_tir"


class _NoFuse(Exception):
    pass


def role(mod: tvm.IRModule, call) -> dict | None:
    """The ``flexiq.requant`` record of the kernel ``call`` calls (``call_tir``), else None."""
    if g.op_name(call) != _CALL_TIR:
        return None
    func = mod[call.args[0]]
    if func.attrs is None or REQUANT_ATTR not in func.attrs:
        return None
    return json.loads(str(func.attrs[REQUANT_ATTR]))


class _Chain:
    """One fusable chain: the dequantize binding, the glue steps in execution order, their
    constant rows, the residual (original var and its binding/argument position)."""

    def __init__(self, quant_var, quant_call, rec, z) -> None:
        self.quant_var, self.quant_call, self.rec, self.z = quant_var, quant_call, rec, z
        self.deq_var = None
        self.steps: list = []  # (op, kind, arg, left), execution order
        self.rows: list = []  # per-channel float32 vectors
        self.res = None  # (binding var that reads it, argument index, the residual's var)
        self.with_z = False
        self.gather = None  # consumer channel -> glue output channel (a folded take)
        self.gemm = None  # the producer GEMM's binding, when it is switched to channels-last
        self.z_nhwc = False  # z is written channels-last: only fused epilogues read it
        self.res_nhwc = False  # the residual is such a z


class FuseRequantizeLowering:
    """Fuse dequantize -> glue -> quantize chains into the target's requantize kernels.

    Parameters
    ----------
    kernels : dict
        The target's kernel library (``flexiq_tvm.schedules.llvm.kernels(isa)``): it must
        provide ``requantize_nhwc`` and ``requantize_padded``.

    After a run, ``fused`` lists ``{"layer", "steps", "writes_fp32"}`` per fused consumer and
    ``fallbacks`` ``{"layer", "reason"}`` per consumer left with its own quantizer (the
    layer names of the first entry function).
    """

    def __init__(self, kernels: dict) -> None:
        self.kernels = kernels
        self.fused: list[dict] = []
        self.fallbacks: list[dict] = []

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        self.fused, self.fallbacks = [], []
        names = [gv.name_hint for gv, f in mod.functions.items()
                 if isinstance(f, relax.Function)
                 and not (f.attrs is not None and g.COMPOSITE_ATTR in f.attrs)]
        out = mod
        for i, name in enumerate(sorted(names)):
            out = self._fuse_function(out, name, report=i == 0)
        return relax.transform.DeadCodeElimination(names)(out)

    # ---------------------------------------------------------------- analysis
    def _plan(self, mod, func, report):
        binds = g.bindings(func)
        value_of = {b.var: b.value for b in binds}
        uses: Counter = Counter()
        for b in binds:
            uses.update(relax.analysis.free_vars(b.value))
        uses.update(relax.analysis.free_vars(func.body.body))
        for b in binds:  # a value visible outside the dataflow block is stored anyway
            if not isinstance(b.var, relax.DataflowVar):
                uses[b.var] += 1
        chains = []
        for b in binds:
            rec = role(mod, b.value)
            if rec is None or rec["role"] not in (*CONSUMERS, "quantize_rows"):
                continue
            layer = b.var.name.removesuffix(CODES)
            z = b.value.args[1].fields[0]
            try:
                if rec["role"] == "quantize_rows":
                    raise _NoFuse("a linear layer (rows layout)")
                z, gather = _folded_take(z, value_of, uses)
                ch = _Chain(b.var, b.value, rec, z)
                ch.gather = gather
                self._walk(mod, ch, z, value_of, uses, first=True)
                ch.layer = layer
                chains.append(ch)
            except _NoFuse as e:
                if report:
                    self.fallbacks.append({"layer": layer, "reason": str(e)})
        # several consumers may read one glue output (a residual block's output feeds the
        # next block's conv and its shortcut conv): each fused kernel recomputes the glue from
        # the accumulator; the first writes the FP32 tensor when anything else reads it
        by_z: dict = {}
        for ch in chains:
            by_z.setdefault(ch.z, []).append(ch)
        by_acc: dict = {}
        for z, group in by_z.items():
            group[0].with_z = uses[z] > len(group)
            for ch in group:
                by_acc.setdefault(value_of[ch.deq_var].args[1].fields[0], []).append(ch)
        for acc, group in by_acc.items():
            prod = role(mod, value_of.get(acc))
            # the GEMM writes its outputs channels-last when every epilogue reading it makes
            # channels-last codes
            if (prod is not None and prod["role"] == "mixed_gemm" and uses[acc] == 1
                    and all(ch.rec["role"] == "quantize_nhwc" for ch in group)):
                for ch in group:
                    ch.gemm = acc
        # a z read only by channels-last epilogues (as their residual) is stored channels-last
        # too, so neither side strides over it
        readers: dict = {}
        for ch in chains:
            if ch.res is not None:
                readers.setdefault(ch.res[2], []).append(ch)
        for z, group in by_z.items():
            w = group[0]
            rs = readers.get(z, [])
            if (w.with_z and w.gemm is not None and rs and uses[z] == len(group) + len(rs)
                    and all(r.gemm is not None for r in rs)):
                w.z_nhwc = True
                for r in rs:
                    r.res_nhwc = True
        if report:
            self.fused.extend({"layer": ch.layer, "steps": [s[0] for s in ch.steps],
                               "writes_fp32": ch.with_z, "fp32_channels_last": ch.z_nhwc,
                               "channels_last": ch.gemm is not None,
                               "gather": ch.gather is not None} for ch in chains)
        return chains

    def _walk(self, mod, ch, var, value_of, uses, first=False):
        """Follow ``var`` back to a dequantize, appending the steps (in reverse)."""
        steps, rows = [], []
        res = None
        cur = var
        shape = g.shape_of(var)
        while True:
            if not first and uses[cur] != 1:
                raise _NoFuse(f"{cur.name} has {uses[cur]} consumers")
            first = False
            if cur not in value_of:
                raise _NoFuse("its input is the model's input (no covered producer)")
            v = value_of[cur]
            rec = role(mod, v)
            if rec is not None and rec["role"] == "dequantize":
                if rec["layout"] != "OP":
                    raise _NoFuse("the producer is a linear layer (rows layout)")
                ch.deq_var = cur
                break
            name = g.op_name(v)
            if name == "relax.nn.relu":
                steps.append(("maximum", rows_add(rows, 0.0, shape), False))
                cur = v.args[0]
            elif name == "relax.clip":
                lo, hi = float(v.args[1].value), float(v.args[2].value)
                # TVM's clip: max(min(x, hi), lo); reversed here like every step
                steps.append(("maximum", rows_add(rows, lo, shape), False))
                steps.append(("minimum", rows_add(rows, hi, shape), False))
                cur = v.args[0]
            elif name in _BINARY:
                a, b = v.args
                ca, cb = g.const_np(a), g.const_np(b)
                if ca is not None or cb is not None:
                    const, other, left = (ca, b, True) if ca is not None else (cb, a, False)
                    steps.append((_BINARY[name], rows_add(rows, const, shape), left))
                    cur = other
                elif name == "relax.add" and res is None:
                    # one operand is the chain, the other the residual read as it is
                    pick = next((i for i, x in enumerate((a, b)) if self._reaches(
                        mod, x, value_of, uses)), None)
                    if pick is None:
                        raise _NoFuse("neither operand of a residual add comes from a "
                                      "covered layer through fusable glue")
                    other = (a, b)[1 - pick]
                    if g.shape_of(other) != shape or other.ty.dtype != "float32":
                        raise _NoFuse("a broadcast tensor operand")
                    res = (cur, 1 - pick, other)
                    steps.append(("add", "res", False))
                    cur = (a, b)[pick]
                else:
                    raise _NoFuse(f"{name.removeprefix('relax.')} of two tensors")
            else:
                raise _NoFuse(f"{(name or type(v).__name__).removeprefix('relax.')} "
                              "sits between the layers")
            if not g.is_tensor(cur) or g.shape_of(cur) != shape:
                raise _NoFuse("a broadcast or reshaped value in the chain")
        # collected from the quantizer back: rows and steps in the graph's order
        last = len(rows) - 1
        ch.steps = [(op, "res", 0, False) if r == "res" else (op, "cv", last - r, left)
                    for op, r, left in reversed(steps)]
        ch.rows, ch.res = rows[::-1], res

    def _reaches(self, mod, var, value_of, uses) -> bool:
        probe = _Chain(None, None, None, var)
        try:
            self._walk(mod, probe, var, value_of, uses)
        except _NoFuse:
            return False
        return True

    # ---------------------------------------------------------------- rewrite
    def _fuse_function(self, mod, name, report):
        chains = self._plan(mod, mod[name], report)
        if not chains:
            return mod
        at = {(ch.z if ch.with_z else ch.quant_var): ch for ch in chains}  # unique keys
        later = {ch.quant_var: ch for ch in chains if ch.with_z}
        gemms = {ch.gemm for ch in chains if ch.gemm is not None}
        seen: dict = {}  # original var -> its binding value, substituted
        made: dict = {}  # chain -> the fused call's var
        nhwc: dict = {}  # original z -> its channels-last tensor

        def visit(bb, var, value):
            if var in gemms:
                value = self._channels_last(bb, mod, value)
            seen[var] = value
            if var in at:
                ch = at[var]
                call = self._fused_call(bb, ch, seen, nhwc)
                if not ch.with_z:
                    return call
                made[ch] = f = bb.emit(call)
                zf = relax.TupleGetItem(f, len(call.ty_args[0].fields) - 1)
                if not ch.z_nhwc:
                    return zf
                nhwc[var] = bb.emit(zf)
                # the NCHW z is read only by bindings that are now dead (DCE removes both)
                return relax.op.zeros(relax.ShapeExpr(g.shape_of(var)), "float32")
            if var in later:
                f = made[later[var]]
                if later[var].rec["role"] == "quantize_padded":
                    return relax.TupleGetItem(f, 0)
                return relax.Tuple([relax.TupleGetItem(f, 0), relax.TupleGetItem(f, 1)])
            return value

        return g.rebuild(mod, name, visit)

    def _channels_last(self, bb, mod, call):
        """The GEMM ``call`` with its accumulator written ``[n, positions, outputs]``."""
        rec = role(mod, call)
        args = [*rec["args"][:-1], "PO"]
        func = _tag(self.kernels["mixed_gemm"](*args), "mixed_gemm", *args)
        gv = bb.add_func(func, call.args[0].name_hint + "_po")
        n, opad, ppad = (int(d) for d in call.ty_args[0].shape)
        return relax.call_tir(gv, call.args[1], relax.TensorType((n, ppad, opad), "int32"))

    def _fused_call(self, bb, ch, seen, nhwc):
        deq = seen[ch.deq_var]
        acc, mult = deq.args[1].fields[0], deq.args[1].fields[1]
        shape = g.shape_of(ch.z)
        c = shape[1]
        if ch.res is None:
            res = relax.const(np.zeros((1, 1, 1, 1), np.float32), "float32")
        elif ch.res_nhwc:
            res = nhwc[ch.res[2]]
        else:
            res = seen[ch.res[0]].args[ch.res[1]]
        cv = (np.stack(ch.rows) if ch.rows else np.zeros((1, c))).astype(np.float32)
        gather = np.arange(c) if ch.gather is None else ch.gather
        qargs = list(ch.quant_call.args[1].fields[1:])  # the quantizer's constants and n_low
        gen = self.kernels[CONSUMERS[ch.rec["role"]]]
        extra = ({"layout": "PO", "z_nhwc": ch.z_nhwc, "res_nhwc": ch.res_nhwc}
                 if ch.gemm is not None else {})
        func = gen(g.shape_of(acc), shape[3], ch.steps, len(ch.rows), ch.res is not None,
                   ch.with_z, ch.gather is not None, *ch.rec["args"], **extra)
        gv = bb.add_func(func, f"{ch.layer}_requantize")
        ty = ch.quant_call.ty_args[0]
        outs = list(ty.fields) if isinstance(ty, relax.TupleType) else [ty]
        if ch.with_z:
            n, c, h, w = shape
            outs.append(relax.TensorType((n, h, w, c) if ch.z_nhwc else shape, "float32"))
        return relax.call_tir(gv, relax.Tuple([acc, mult, relax.const(cv, "float32"), res,
                                               relax.const(gather.astype(np.int32), "int32"),
                                               *qargs]), outs if len(outs) > 1 else outs[0])


def _folded_take(z, value_of, uses):
    """``(source, indices)`` when ``z`` is a channel gather (``take`` along axis 1 with
    constant indices, a permutation, read only by the quantizer) of ``source``: the fused
    kernel reads its channels through the indices. Else ``(z, None)``."""
    v = value_of.get(z)
    if g.op_name(v) != "relax.take" or uses[z] != 1 or int(v.attrs.axis) != 1:
        return z, None
    idx = g.const_np(v.args[1])
    src = v.args[0]
    if (idx is None or idx.ndim != 1 or not g.is_tensor(src)
            or g.shape_of(src) != g.shape_of(z)
            or sorted(idx.tolist()) != list(range(g.shape_of(z)[1]))):
        return z, None
    return src, idx.astype(np.int64)


def rows_add(rows: list, const, shape) -> int:
    """Append ``const`` (a scalar, or per-channel: broadcastable to ``shape`` along axis 1
    only) to ``rows`` as a float32 vector over the channels; its row index."""
    c = shape[1]
    a = np.asarray(const)
    if a.dtype.kind != "f":
        raise _NoFuse(f"a {a.dtype} constant")
    if a.size == 1:
        vec = np.full(c, a.reshape(()), np.float32)
    else:
        if a.ndim > len(shape):
            raise _NoFuse("a constant that is not per channel")
        a = a.reshape((1,) * (len(shape) - a.ndim) + a.shape)
        if a.shape[1] != c or a.size != c:
            raise _NoFuse("a constant that is not per channel")
        vec = a.reshape(c).astype(np.float32)
    rows.append(vec)
    return len(rows) - 1


FuseRequantize = tvm.transform.module_pass(opt_level=0, name="FuseRequantize")(
    FuseRequantizeLowering)
