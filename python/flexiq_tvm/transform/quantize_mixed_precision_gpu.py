"""QuantizeMixedPrecisionGPU: :class:`QuantizeMixedPrecision` for the CUDA kernels.

Same contract (composites in, one entry function per ratio out, ``expose_layers`` for the
oracle checks), other kernels (``flexiq_tvm.schedules.cuda.lower``):

* GEMM conv / linear: ``pack_activations -> mixed_gemm (tensor cores) -> dequantize_rows``.
  The split into 8-bit and 4-bit reduction rows, the shift runs and the weight words differ
  per ratio, so each ratio gets its own constants and GEMM (the run count is a loop bound).
* Grouped / depthwise conv: ``quantize_effective -> grouped_conv -> dequantize_nchw`` over
  8-bit-scale values (no tensor-core form), with per-ratio effective weights.

``gemm`` builds the GEMM kernel: :func:`~flexiq_tvm.schedules.cuda.mixed_gemm` for a GPU, or
:func:`~flexiq_tvm.schedules.cuda.lower.reference_gemm` (plain loops) to check the whole
lowering on a CPU.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .. import reference as ref
from . import _graph as g
from .quantize_mixed_precision import MixedPrecisionLowering, _Layer


class _GPULowering(MixedPrecisionLowering):
    """See the module docs. ``int4_mma``: the 4-bit block on s4 MMA (sm_75..sm_89) or as
    INT8 MMA over unpacked values (sm_90). ``exact``: quantize with non-fusable float32 ops
    (the CUDA build)."""

    def __init__(self, plan, ratios=None, int4_mma: bool = True, gemm=None, exact: bool = True,
                 func_name: str = "main", expose_layers: bool = False) -> None:
        from ..schedules.cuda import lower, mixed_gemm

        super().__init__(plan, {}, ratios, func_name=func_name, expose_layers=expose_layers)
        self.int4_mma, self.exact = bool(int4_mma), bool(exact)
        self.gemm = gemm or mixed_gemm
        self.lower = lower

    def _build(self, bb, kind, cfunc, call, var, k):
        lp = self.plan.layer(str(cfunc.attrs["flexiq.layer"]))
        in_perm = np.asarray([int(i) for i in cfunc.attrs["flexiq.in_perm"]])
        out_perm = np.asarray([int(i) for i in cfunc.attrs["flexiq.out_perm"]])
        inner = g.inner_call(cfunc)
        layer = _Layer(lp, kind, in_perm, out_perm, g.shape_of(call.args[0]), g.shape_of(var),
                       inner.attrs if kind == g.CONV else None)
        layer.name = cfunc.attrs["flexiq.layer"].replace(".", "_")
        layer.per_ratio = {}
        consts = {"mult": relax.const(layer.mult, "float32")}
        o = lp.weight_shape[0]
        layer.w_bytes = dict(int8=int(layer.codes.size),
                             int4_packed=int(-(-layer.codes.size * (layer.n_max > 0) // 2)))
        if kind == g.CONV:
            a = layer.conv_attrs
            pad = [int(p) for p in a.padding]  # top, left, bottom, right
            layer.geo = dict(kh=lp.weight_shape[2], kw=lp.weight_shape[3],
                             stride=tuple(int(v) for v in a.strides),
                             dilation=tuple(int(v) for v in a.dilation),
                             pad=(pad[0], pad[1]), pad4=(pad[0], pad[2], pad[1], pad[3]),
                             oh=layer.y_shape[2], ow=layer.y_shape[3], o=o)
        else:
            layer.geo = dict(o=o, rows=int(np.prod(layer.x_shape[:-1])), c=layer.x_shape[-1])
        return {}, consts, layer

    def _emit(self, bb, x, kind, layer, gvs, consts, n_low):
        if n_low not in layer.per_ratio:
            layer.per_ratio[n_low] = (self._grouped_kernels if layer.grouped
                                      else self._gemm_kernels)(bb, kind, layer, n_low)
        fns, c = layer.per_ratio[n_low]
        geo = layer.geo
        if layer.grouped:
            n, ch, h, w = layer.x_shape
            t, b, left, r = geo["pad4"]
            q = bb.emit(relax.call_tir(fns["q"], (x, c["shift"]), relax.TensorType(
                (n, ch, h + t + b, w + left + r), "int32")))
            acc = bb.emit(relax.call_tir(fns["conv"], (q, c["w"]), relax.TensorType(
                (n, geo["o"], geo["oh"], geo["ow"]), "int32")))
            return relax.call_tir(fns["deq"], (acc, consts["mult"]),
                                  relax.TensorType(layer.y_shape, "float32")), acc
        lay = c["layout"]
        xin = x if kind == g.CONV else bb.emit(relax.op.reshape(x, (geo["rows"], geo["c"])))
        words = bb.emit(relax.call_tir(fns["pack"], (xin, c["src8"], c["src4"], c["sa4"]), [
            relax.TensorType((lay.m, lay.w8_words), "uint32"),
            relax.TensorType((lay.m, lay.w4_words), "uint32")]))
        prod = bb.emit(relax.call_tir(
            fns["gemm"], (relax.TupleGetItem(words, 0), c["W8"], relax.TupleGetItem(words, 1),
                          c["W4"], c["run_table"]), relax.TensorType((lay.m, lay.n), "int32")))
        y = relax.call_tir(fns["deq"], (prod, consts["mult"]),
                           relax.TensorType(layer.y_shape, "float32"))
        if not self.expose_layers:
            return y, prod
        if kind == g.CONV:
            n, p = layer.x_shape[0], geo["oh"] * geo["ow"]
            shape = (n, geo["o"], p)
        else:
            shape = (1, geo["rows"], geo["o"])
        acc = bb.emit(relax.call_tir(fns["view"], (prod,), relax.TensorType(shape, "int32")))
        return y, acc

    # ------------------------------------------------------------------ per layer and ratio
    def _low(self, layer, n_low) -> np.ndarray:
        return layer.rank < n_low  # the n_low lowest-ranked channels run in 4-bit

    def _gemm_kernels(self, bb, kind, layer, n_low):
        lw, geo, lp = self.lower, layer.geo, layer.lp
        conv = kind == g.CONV
        kk = geo["kh"] * geo["kw"] if conv else 1
        o = geo["o"]
        rows = layer.x_shape[0] * geo["oh"] * geo["ow"] if conv else geo["rows"]
        lay = lw.gemm_layout(layer.codes.reshape(o, -1, kk), self._low(layer, n_low),
                             layer.sa, layer.sw, self.int4_mma, rows)
        signed = bool(lp.act_signed)
        inv = float(np.float32(lp.act_inv_scale))
        tag = f"{layer.name}_n{n_low}"
        cgeo = dict(geo) if conv else None
        fns = {
            "pack": bb.add_func(lw.pack_activations(lay, layer.x_shape if conv else
                                                    (rows, geo["c"]), cgeo, inv, signed,
                                                    self.exact), f"{tag}_pack"),
            "gemm": bb.add_func(self.gemm(lay.m, lay.n, lay.k8p, lay.runs, lay.chunks4,
                                          self.int4_mma, act_signed=signed)
                                .without_attr("global_symbol"), f"{tag}_gemm"),
            "deq": bb.add_func(lw.dequantize_rows(lay, layer.y_shape, conv), f"{tag}_deq"),
        }
        if self.expose_layers:
            fns["view"] = bb.add_func(lw.accumulator_view(
                lay, layer.x_shape[0] if conv else 1, o,
                geo["oh"] * geo["ow"] if conv else rows, conv), f"{tag}_view")
        c = {k: relax.const(getattr(lay, k), str(getattr(lay, k).dtype))
             for k in ("W8", "W4", "run_table", "src8", "src4", "sa4")}
        c["layout"] = lay
        return fns, c

    def _grouped_kernels(self, bb, kind, layer, n_low):
        lw, geo, lp = self.lower, layer.geo, layer.lp
        low = self._low(layer, n_low)
        signed = bool(lp.act_signed)
        inv = float(np.float32(lp.act_inv_scale))
        shift = np.where(low, layer.sa, -1).astype(np.int32)
        # effective weights: w, or extract_bits(w) << sw on a 4-bit input channel
        chan = ref.weight_input_channels(lp.weight_shape, lp.groups)  # (O, C/groups)
        wl = low[chan][..., None, None]
        swc = layer.sw[chan][..., None, None]
        w = layer.codes.astype(np.int32)
        weff = np.where(wl, np.left_shift(ref.extract_bits(w, swc, True), swc), w)
        n, ch, h, wd = layer.x_shape
        t, b, left, r = geo["pad4"]
        tag = f"{layer.name}_n{n_low}"
        fns = {
            "q": bb.add_func(lw.quantize_effective(layer.x_shape, geo["pad4"], inv, signed,
                                                   self.exact), f"{tag}_quantize"),
            "conv": bb.add_func(lw.grouped_conv((n, ch, h + t + b, wd + left + r),
                                                lp.weight_shape, geo["stride"],
                                                geo["dilation"], (geo["oh"], geo["ow"]),
                                                lp.groups), f"{tag}_conv"),
            "deq": bb.add_func(lw.dequantize_nchw(tuple(layer.y_shape)), f"{tag}_deq"),
        }
        return fns, {"shift": relax.const(shift, "int32"),
                     "w": relax.const(weff.astype(np.int32), "int32")}


QuantizeMixedPrecisionGPU = tvm.transform.module_pass(
    opt_level=0, name="QuantizeMixedPrecisionGPU")(_GPULowering)
