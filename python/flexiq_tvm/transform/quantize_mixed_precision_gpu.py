"""QuantizeMixedPrecisionGPU: :class:`QuantizeMixedPrecision` for the CUDA kernels.

Same contract (composites in, one entry function per ratio out, ``expose_layers`` for the
oracle checks), other kernels (``flexiq_tvm.schedules.cuda.lower``):

* GEMM conv / linear: ``pack_activations -> mixed_gemm (tensor cores) -> dequantize_rows``.
  The split into 8-bit and 4-bit reduction rows, the shift runs and the weight words differ
  per ratio, so each ratio gets its own constants and GEMM (the run count is a loop bound).
  Without ``mma.sync`` (before sm_80): ``pack_effective -> dp4a_gemm -> dequantize_rows`` over
  8-bit-scale values (CUDA cores).
* Grouped / depthwise conv: ``quantize_effective -> grouped_conv -> dequantize_nchw`` over
  8-bit-scale values (no tensor-core form), with per-ratio effective weights.

``gemm`` builds the GEMM kernel: :func:`~flexiq_tvm.schedules.cuda.mixed_gemm` (or
:func:`~flexiq_tvm.schedules.cuda.lower.dp4a_gemm`) for a GPU, or their plain-loop twins
:func:`~flexiq_tvm.schedules.cuda.lower.reference_gemm` (``reference_dp4a``) to check the
whole lowering on a CPU.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .. import reference as ref
from . import _graph as g
from .quantize_mixed_precision import MixedPrecisionLowering


class _GPULowering(MixedPrecisionLowering):
    """See the module docs. ``kernels``: the module of CUDA kernel builders
    (:mod:`flexiq_tvm.schedules.cuda.lower`; passed in, so the pass imports no schedule).
    ``path`` (:func:`~flexiq_tvm.schedules.cuda.gemm_path` of an
    arch): ``"mma_s4"`` (the 4-bit block on s4 MMA, sm_80..sm_89), ``"mma_s8"`` (as INT8 MMA
    over unpacked values, sm_90) or ``"dp4a"`` (CUDA cores, sm_61..sm_75). ``exact``:
    quantize with non-fusable float32 ops (the CUDA build)."""

    def __init__(self, plan, kernels, ratios=None, path: str = "mma_s4", gemm=None,
                 exact: bool = True, func_name: str = "main", expose_layers: bool = False
                 ) -> None:
        if path not in ("mma_s4", "mma_s8", "dp4a"):
            raise ValueError(f"path={path!r}; one of mma_s4, mma_s8, dp4a")
        super().__init__(plan, {}, ratios, func_name=func_name, expose_layers=expose_layers)
        self.path, self.int4_mma, self.exact = path, path == "mma_s4", bool(exact)
        lower = kernels
        self.gemm = gemm or (lower.dp4a_gemm if path == "dp4a" else lower.mixed_gemm)
        self.lower = lower

    def _build(self, bb, kind, cfunc, call, var, k):
        layer = self._new_layer(kind, cfunc, call, var)
        lp = layer.lp
        layer.name = cfunc.attrs["flexiq.layer"].replace(".", "_")
        layer.per_ratio = {}
        consts = {"mult": relax.const(layer.mult, "float32")}
        o = lp.weight_shape[0]
        # weight bytes: the GEMM's shared words, or every ratio's effective weights
        layer.w_bytes = dict(int8=0, int4_packed=0)
        layer.weights = None
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
            build = (self._grouped_kernels if layer.grouped else self._dp4a_kernels
                     if self.path == "dp4a" else self._gemm_kernels)
            layer.per_ratio[n_low] = build(bb, kind, layer, n_low)
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
        if self.path == "dp4a":
            words = bb.emit(relax.call_tir(fns["pack"], (xin, c["shift"]), relax.TensorType(
                (lay.m, lay.kwords), "int32")))
            prod = bb.emit(relax.call_tir(fns["gemm"], (words, c["B"], c["corr"]),
                                          relax.TensorType((lay.m, lay.n), "int32")))
        else:
            words = bb.emit(relax.call_tir(fns["pack"], (xin, c["src8"], c["src4"], c["sa4"]), [
                relax.TensorType((lay.m, lay.w8_words), "uint32"),
                relax.TensorType((lay.m, lay.w4_words), "uint32")]))
            prod = bb.emit(relax.call_tir(
                fns["gemm"], (relax.TupleGetItem(words, 0), c["W8"],
                              relax.TupleGetItem(words, 1), c["W4"], c["run_table"]),
                relax.TensorType((lay.m, lay.n), "int32")))
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

    def _gemm_geometry(self, kind, layer):
        """``(conv?, taps, outputs, im2col rows, kernel input shape, conv geometry)``."""
        geo = layer.geo
        conv = kind == g.CONV
        rows = layer.x_shape[0] * geo["oh"] * geo["ow"] if conv else geo["rows"]
        return (conv, geo["kh"] * geo["kw"] if conv else 1, geo["o"], rows,
                layer.x_shape if conv else (rows, geo["c"]), dict(geo) if conv else None)

    def _around_gemm(self, bb, layer, lay, pack, gemm, conv, o, rows, tag):
        """The kernels of a GEMM layer: ``pack`` and ``gemm`` as given, dequantization and,
        with ``expose_layers``, the accumulator view."""
        lw = self.lower
        fns = {"pack": bb.add_func(pack, f"{tag}_pack"),
               "gemm": bb.add_func(gemm.without_attr("global_symbol"), f"{tag}_gemm"),
               "deq": bb.add_func(lw.dequantize_rows(lay, layer.y_shape, conv), f"{tag}_deq")}
        if self.expose_layers:
            fns["view"] = bb.add_func(lw.accumulator_view(
                lay, layer.x_shape[0] if conv else 1, o,
                layer.geo["oh"] * layer.geo["ow"] if conv else rows, conv), f"{tag}_view")
        return fns

    def _shared_weights(self, layer, o, kk):
        """The layer's GEMM weights, stored once for every compiled ratio (one pair of
        constants that each ratio's GEMM reads from its own offsets)."""
        if getattr(layer, "weights", None) is None:
            n_lows = {int(layer.lp.n_low[self.plan.check_ratio(r)]) for r in self.ratios}
            w = self.lower.gemm_weights(layer.codes.reshape(o, -1, kk), layer.rank, layer.sa,
                                        layer.sw, self.int4_mma, sorted(n_lows))
            layer.weights = (w, {k: relax.const(getattr(w, k), "uint32") for k in ("W8", "W4")})
            layer.w_bytes["int8"] += int(w.W8.nbytes) if len(w.ch8) else 0
            layer.w_bytes["int4_packed"] += int(w.W4.nbytes) if w.groups else 0
        return layer.weights

    def _gemm_kernels(self, bb, kind, layer, n_low):
        lw, lp = self.lower, layer.lp
        conv, kk, o, rows, x_shape, cgeo = self._gemm_geometry(kind, layer)
        weights, consts = self._shared_weights(layer, o, kk)
        lay = lw.ratio_layout(weights, n_low, layer.sa, rows)
        signed = bool(lp.act_signed)
        inv = float(np.float32(lp.act_inv_scale))
        fns = self._around_gemm(
            bb, layer, lay, lw.pack_activations(lay, x_shape, cgeo, inv, signed, self.exact),
            self.gemm(lay.m, lay.n, lay.k8p, lay.runs, lay.chunks4, self.int4_mma,
                      act_signed=signed, k8_first=lay.k8_first, wk8=lay.W8.shape[1],
                      wk4=lay.W4.shape[1]), conv, o, rows, f"{layer.name}_n{n_low}")
        c = {k: relax.const(getattr(lay, k), "int32") for k in ("run_table", "src8", "src4",
                                                                 "sa4")}
        c.update(consts)
        c["layout"] = lay
        return fns, c

    def _dp4a_kernels(self, bb, kind, layer, n_low):
        lw, lp = self.lower, layer.lp
        conv, kk, o, rows, x_shape, cgeo = self._gemm_geometry(kind, layer)
        signed = bool(lp.act_signed)
        lay = lw.dp4a_layout(layer.codes.reshape(o, -1, kk), self._low(layer, n_low),
                             layer.sa, layer.sw, rows, signed)
        inv = float(np.float32(lp.act_inv_scale))
        fns = self._around_gemm(
            bb, layer, lay, lw.pack_effective(lay, x_shape, cgeo, inv, signed, self.exact),
            self.gemm(lay.m, lay.n, lay.kwords), conv, o, rows, f"{layer.name}_n{n_low}")
        layer.w_bytes["int8"] += int(lay.B.nbytes)  # 8-bit-scale bytes, 4-bit channels too
        return fns, {"B": relax.const(lay.B, "int32"), "corr": relax.const(lay.corr, "int32"),
                     "shift": relax.const(lay.shift, "int32"), "layout": lay}

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
        layer.w_bytes["int8"] += int(weff.size)  # int8: w and w4 << sw both fit
        return fns, {"shift": relax.const(shift, "int32"),
                     "w": relax.const(weff.astype(np.int8), "int8")}


QuantizeMixedPrecisionGPU = tvm.transform.module_pass(
    opt_level=0, name="QuantizeMixedPrecisionGPU")(_GPULowering)
