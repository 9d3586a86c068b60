"""AnnotateChannelPrecision: wrap every conv2d / linear that a QuantPlan covers in a composite.

Runs on a bound, prepared module (weights are constants, BatchNorm decomposed: see
:func:`flexiq_tvm.transform.prepare`), before :class:`ReorderChannelBlocks`.

A plan layer is found by its weights, not by names (the frontends name parameters
differently): a ``R.nn.conv2d(x, W)`` or ``R.matmul(x, W)`` with a constant ``W`` is covered
by the plan layer whose INT8 codes equal ``quantize_weight(W, layer.w_scale)``, or, for codes
learned by reconstruction, whose ``weight_digest`` is those nearest codes' digest (linear
weights arrive transposed, ``[K, O]``). The call becomes a call of a private composite function

    @R.function(private=True)
    def flexiq_conv2d_3(x, w):  # attrs: Composite, flexiq.layer, flexiq.in_perm/out_perm
        return R.nn.conv2d(x, w, ...)

whose attributes name the plan layer and carry the input/output channel permutations
(identity here; :class:`ReorderChannelBlocks` changes them). Conv/matmul calls that no plan
layer matches stay as they are: they run in FP32 and the compile report lists them.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..plan import QuantPlan
from . import _graph as g


def weight_oihw(op: str, w: np.ndarray) -> np.ndarray:
    """The torch-layout weight of a conv2d (OIHW) or matmul (``[K, O]`` -> ``[O, K]``)."""
    return w if op == "relax.nn.conv2d" else w.T


def match_layer(plan: QuantPlan, w_torch: np.ndarray, used: set[str]):
    """The unused plan layer whose source weight is ``w_torch`` (:meth:`LayerPlan.matches`),
    else ``None``."""
    for lp in plan.layers:
        if lp.name not in used and lp.matches(w_torch):
            return lp
    return None


@tvm.transform.module_pass(opt_level=0, name="AnnotateChannelPrecision")
class AnnotateChannelPrecision:
    """Wrap the plan's layers into ``flexiq.conv2d`` / ``flexiq.linear`` composites.

    Parameters
    ----------
    plan : QuantPlan
        The plan whose layers to cover.
    func_name : str
        The entry function to rewrite.
    """

    def __init__(self, plan: QuantPlan, func_name: str = "main") -> None:
        self.plan = plan
        self.func_name = func_name

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        used: set[str] = set()

        def visit(bb, var, value):
            op = g.op_name(value)
            if op not in ("relax.nn.conv2d", "relax.matmul"):
                return value
            w = g.const_np(value.args[1])
            if w is None or not g.is_tensor(value.args[0]):
                return value
            if op == "relax.matmul" and w.ndim != 2:
                return value
            lp = match_layer(self.plan, weight_oihw(op, w), used)
            if lp is None:
                return value
            used.add(lp.name)
            kind = g.CONV if op == "relax.nn.conv2d" else g.LINEAR
            name = f"flexiq_{kind.split('.')[1]}_{len(used) - 1}"
            gv = bb.add_func(_composite(value, kind, lp, name), name)
            return relax.Call(gv, value.args)

        return relax.transform.Normalize()(g.rebuild(mod, self.func_name, visit))


def _composite(call, kind: str, lp, name: str) -> relax.Function:
    x = relax.Var("x", call.args[0].ty)
    w = relax.Var("w", call.args[1].ty)
    bb = relax.BlockBuilder()
    c_in = lp.in_channels
    o = lp.weight_shape[0]
    attrs = {
        g.COMPOSITE_ATTR: kind,
        "Primitive": True,
        "flexiq.layer": lp.name,
        "flexiq.in_perm": [int(i) for i in range(c_in)],
        "flexiq.out_perm": [int(i) for i in range(o)],
        "flexiq.gather": False,
    }
    with bb.function(name, [x, w], attrs=attrs, private=True):
        with bb.dataflow():
            out = bb.emit_output(relax.Call(call.op, [x, w], call.attrs, call.ty_args))
        bb.emit_func_output(out)
    return bb.get()[name]
