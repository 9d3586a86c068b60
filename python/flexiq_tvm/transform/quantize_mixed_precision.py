"""QuantizeMixedPrecision: lower the FlexiQ composites to mixed-precision ``call_tir`` kernels
and emit one entry function per ratio (``main_r000``, ``main_r050``, ...).

Runs after :class:`ReorderChannelBlocks`. Per covered layer, from the plan (weights are the
plan's INT8 codes, permuted by the composite's ``flexiq.in_perm`` / ``flexiq.out_perm``):

* GEMM conv: ``quantize_nhwc -> mixed_gemm (implicit GEMM) -> dequantize``; linear (a 1x1
  conv over its rows): ``quantize_rows -> mixed_gemm -> dequantize``; grouped/depthwise conv:
  ``quantize_padded -> mixed_grouped_conv -> dequantize``.
* Weights are quantized, reordered and packed once at compile time (INT8 in the kernel's
  row-pair order plus the 4-bit codes of the largest ratio's low block, two per byte) and
  every ratio variant calls the same kernels with the same constants: a variant differs only
  in the ``n_low`` scalars.

The kernels come from a target's kernel library (``flexiq_tvm.schedules.<target>``), so the
pass itself is target-independent. ``expose_layers=True`` makes each variant also return every
covered layer's input and int32 accumulator (the bit-exactness tests compare them with the
integer oracle).
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax

from .. import reference as ref
from ..plan import QuantPlan, variant_name
from . import _graph as g


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def pack_int4_flat(codes: np.ndarray) -> np.ndarray:
    """4-bit codes (any shape) -> uint8, element ``i`` in byte ``i // 2``, nibble ``i % 2``."""
    flat = (codes.reshape(-1).astype(np.int32) & 15).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


CODES = "_codes"  # suffix of the var a covered layer's input codes are bound to


def _tag(func, role: str, *args, **rec):
    """``func`` marked with its role and generator arguments (``flexiq.requant``, JSON) for
    :class:`~.fuse_requantize.FuseRequantize`, which rebuilds fused kernels from them."""
    args = [list(a) if isinstance(a, tuple) else a for a in args]
    return func.with_attr("flexiq.requant", json.dumps({"role": role, "args": args, **rec},
                                                       default=lambda v: v.item()))


class _Layer:
    """Compile-time data of one covered layer (constants shared by all variants)."""

    def __init__(self, lp, kind, in_perm, out_perm, x_shape, y_shape, conv_attrs) -> None:
        self.lp, self.kind = lp, kind
        self.in_perm, self.out_perm = in_perm, out_perm
        self.x_shape, self.y_shape = x_shape, y_shape
        self.conv_attrs = conv_attrs
        codes = lp.w_codes[out_perm][:, in_perm] if lp.groups == 1 else lp.w_codes[out_perm]
        self.codes = codes
        self.sa = lp.act_shift.astype(np.int32)[in_perm]
        self.sw = lp.w_shift.astype(np.int32)[in_perm]
        self.mult = (np.float32(lp.act_scale) * lp.w_scale.astype(np.float32))[out_perm]
        pos = np.empty(lp.in_channels, np.int64)
        pos[np.asarray(lp.order)] = np.arange(lp.in_channels)
        self.rank = pos[in_perm].astype(np.int32)  # rank of each (reordered) channel
        self.grouped = lp.groups > 1
        if not self.grouped:
            for r, n in lp.n_low.items():
                if set(in_perm[:n].tolist()) != set(np.asarray(lp.order[:n]).tolist()):
                    raise ValueError(f"layer {lp.name}: ratio {r} low set is not a prefix of the "
                                     "input order; run ReorderChannelBlocks first")
        self.n_max = max(lp.n_low.values())


class MixedPrecisionLowering:
    """Replace the composites by mixed-precision kernels; one entry per ratio.

    Parameters
    ----------
    plan : QuantPlan
    kernels : dict
        The target's kernel library (e.g. ``flexiq_tvm.schedules.llvm.kernels("avx2")``):
        kernel generators by name plus ``"gemm_tiles"``, the ``(outputs, positions)``
        multiples the GEMM operands are padded to, and the 8-bit operand layout of its ISA
        (``"q8_dtype"``, ``"k_group"``, ``"pack_w8"``, ``"corr8"``).
    ratios : sequence of float, optional
        Ratios to emit (default: all of the plan's).
    expose_layers : bool
        Also return each covered layer's input and int32 accumulator.
    """

    def __init__(self, plan: QuantPlan, kernels: dict, ratios=None, func_name: str = "main",
                 expose_layers: bool = False) -> None:
        self.plan = plan
        self.kernels = kernels
        self.ratios = [float(r) for r in (ratios if ratios is not None else plan.ratios)]
        for r in self.ratios:
            plan.check_ratio(r)
        self.func_name = func_name
        self.expose_layers = expose_layers
        self.layers: list[_Layer] = []  # covered layers, in program order (after a run)

    def transform_module(self, mod: tvm.IRModule, ctx) -> tvm.IRModule:
        k = self.kernels
        cache: dict = {}  # composite name -> (kernel gvs, constants, layer)
        out = mod
        for ratio in self.ratios:
            exposed: list = []

            def visit(bb, var, value, ratio=ratio, exposed=exposed):
                comp = g.composite_kind(mod, value)
                if comp is None:
                    return value
                kind, cfunc = comp
                key = value.op.name_hint
                if key not in cache:
                    cache[key] = self._build(bb, kind, cfunc, value, var, k)
                    cache[key][2].gather = bool(cfunc.attrs["flexiq.gather"])
                    self.layers.append(cache[key][2])
                gvs, consts, layer = cache[key]
                n_low = int(layer.lp.n_low[self.plan.check_ratio(ratio)])
                y, acc = self._emit(bb, value.args[0], kind, layer, gvs, consts, n_low)
                if self.expose_layers:  # as dataflow outputs: used after the block
                    exposed.extend([bb.emit_output(value.args[0]), bb.emit_output(acc)])
                return y

            def ret(bb, body, exposed=exposed):
                if not self.expose_layers:
                    return body
                return relax.Tuple([body, relax.Tuple(exposed)])

            out = g.rebuild(out, self.func_name, visit, ret=ret,
                            new_name=variant_name(ratio))
        funcs = {gv: f for gv, f in out.functions.items()
                 if gv.name_hint != self.func_name
                 and not (isinstance(f, relax.Function) and f.attrs is not None
                          and g.COMPOSITE_ATTR in f.attrs)}
        return relax.transform.Normalize()(tvm.IRModule(funcs, attrs=out.attrs))

    # ------------------------------------------------------------------ per layer
    def _new_layer(self, kind, cfunc, call, var) -> _Layer:
        """The compile-time data of the composite ``cfunc`` called as ``var = call``."""
        lp = self.plan.layer(str(cfunc.attrs["flexiq.layer"]))
        in_perm = np.asarray([int(i) for i in cfunc.attrs["flexiq.in_perm"]])
        out_perm = np.asarray([int(i) for i in cfunc.attrs["flexiq.out_perm"]])
        return _Layer(lp, kind, in_perm, out_perm, g.shape_of(call.args[0]), g.shape_of(var),
                      g.inner_call(cfunc).attrs if kind == g.CONV else None)

    def _build(self, bb, kind, cfunc, call, var, k):
        layer = self._new_layer(kind, cfunc, call, var)
        lp = layer.lp
        signed = bool(lp.act_signed)
        inv = float(np.float32(lp.act_inv_scale))
        name = cfunc.attrs["flexiq.layer"].replace(".", "_")
        gvs, consts = {}, {}
        consts["mult"] = relax.const(layer.mult, "float32")
        consts["sa"] = relax.const(layer.sa, "int32")
        w4codes = ref.extract_bits(layer.codes.astype(np.int32),
                                   ref.per_weight(layer.sw, lp.weight_shape, lp.groups), True)
        if kind == g.CONV and layer.grouped:
            n, c, h, w = layer.x_shape
            a = layer.conv_attrs
            pad = [int(p) for p in a.padding]  # top, left, bottom, right
            pad4 = (pad[0], pad[2], pad[1], pad[3])
            o, cg, kh, kw = lp.weight_shape
            oh, ow = layer.y_shape[2], layer.y_shape[3]
            hp, wp = h + pad4[0] + pad4[1], w + pad4[2] + pad4[3]
            gvs["q"] = bb.add_func(_tag(k["quantize_padded"](n, c, h, w, pad4, inv, signed),
                                        "quantize_padded", n, c, h, w, pad4, inv, signed),
                                   f"{name}_quantize")
            gvs["conv"] = bb.add_func(k["mixed_grouped_conv"](
                n, c, hp, wp, o, cg, kh, kw, tuple(int(s) for s in a.strides),
                tuple(int(d) for d in a.dilation), oh, ow, lp.groups), f"{name}_conv")
            gvs["deq"] = bb.add_func(_tag(k["dequantize"](n, o, oh * ow, o, oh * ow, "OP",
                                                          layer.y_shape), "dequantize",
                                          layout="OP"),
                                     f"{name}_dequantize")
            consts["w8"] = relax.const(layer.codes.astype(np.int8), "int8")
            consts["w4"] = relax.const(pack_int4_flat(w4codes), "uint8")
            consts["rank"] = relax.const(layer.rank, "int32")
            consts["st"] = relax.const((layer.sa + layer.sw).astype(np.int32), "int32")
            layer.geo = dict(hp=hp, wp=wp, o=o, oh=oh, ow=ow, kk=kh * kw)
            layer.w_bytes = dict(int8=layer.codes.size, int4_packed=consts["w4"].value.numpy().size)
            return gvs, consts, layer
        to, tp = k["gemm_tiles"]
        o = lp.weight_shape[0]
        opad = _round_up(o, to)
        if kind == g.CONV:
            n, c, h, w = layer.x_shape
            a = layer.conv_attrs
            pad = [int(p) for p in a.padding]
            pad4 = (pad[0], pad[2], pad[1], pad[3])
            _, _, kh, kw = lp.weight_shape
            oh, ow = layer.y_shape[2], layer.y_shape[3]
            hp, wp = h + pad4[0] + pad4[1], w + pad4[2] + pad4[3]
            stride = tuple(int(v) for v in a.strides)
            dil = tuple(int(v) for v in a.dilation)
            cpad = _round_up(c, k["k_group"])
        else:  # a linear layer: a 1x1 conv over the m rows
            c = layer.x_shape[-1]
            n, kh, kw, stride, dil = 1, 1, 1, (1, 1), (1, 1)
            oh, ow = 1, int(np.prod(layer.x_shape[:-1]))
            hp, wp = 1, ow
            cpad = _round_up(c, k["k_group"])
        kk = kh * kw
        p = oh * ow
        ppad = _round_up(p, tp)
        st = (layer.sa + layer.sw).astype(np.int32)
        low = k["low_layout"](st, layer.n_max, kk)
        layer.low = low
        if kind == g.CONV:
            gvs["q"] = bb.add_func(_tag(k["quantize_nhwc"](n, c, h, w, pad4, cpad, low.slots,
                                                           inv, signed), "quantize_nhwc",
                                        n, c, h, w, pad4, cpad, low.slots, inv, signed),
                                   f"{name}_quantize")
        else:
            gvs["q"] = bb.add_func(_tag(k["quantize_rows"](ow, c, cpad, low.slots, inv, signed),
                                        "quantize_rows"), f"{name}_quantize")
        layer.geo = dict(n=n, c=c, hp=hp, wp=wp, cpad=cpad, p=p, ppad=ppad, oh=oh, ow=ow, o=o,
                         opad=opad, kk=kk, slots=low.slots, ngmax=low.max_chunks())
        layout = "OP" if kind == g.CONV else "PO"
        gemm_args = (n, hp, wp, cpad, low.slots, low.max_chunks(), kh, kw, stride, dil, oh, ow,
                     opad, layout)
        gvs["gemm"] = bb.add_func(_tag(k["mixed_gemm"](*gemm_args), "mixed_gemm", *gemm_args),
                                  f"{name}_gemm")
        gvs["deq"] = bb.add_func(_tag(k["dequantize"](n, o, p, opad, ppad, layout,
                                                      layer.y_shape), "dequantize",
                                      layout=layout),
                                 f"{name}_dequantize")
        # 8-bit rows k = (ky*kw + kx)*cpad + c, row pairs (quads on VNNI) interleaved per output
        w_rc = np.zeros((kh, kw, cpad, opad), np.int8)
        w_rc[:, :, :c, :o] = layer.codes.reshape(o, c, kh, kw).transpose(2, 3, 1, 0)
        consts["w8"] = relax.const(k["pack_w8"](w_rc.reshape(kk * cpad, opad)), "int8")
        layer.w8taps = w_rc.reshape(kk, cpad, opad)[:, :, :o]
        # 4-bit codes [taps, c, o] in the kernel's slot layout, two per byte
        layer.w4taps = w4codes.reshape(o, c, kk).transpose(2, 1, 0)
        consts["w4"] = relax.const(low.pack(layer.w4taps, opad), "uint8")
        consts["slot_chan"] = relax.const(low.slot_chan, "int32")
        consts["slot_wshift"] = relax.const(low.slot_shift(layer.sw), "int32")
        layer.w_bytes = dict(int8=int(o * c * kk),
                             int4_packed=int(consts["w4"].value.numpy().size) if layer.n_max
                             else 0)
        return gvs, consts, layer

    def _variant_consts(self, layer, n_low):
        """Per-ratio operands of the GEMM kernel: the 4-bit chunk table, its length, and the
        offset correction of signed activations (the +8 of their 4-bit codes, and on VNNI the
        +128 of their 8-bit codes)."""
        low, geo = layer.low, layer.geo
        rows = low.chunks(n_low)
        ng = int((rows[:, 1] > 0).sum())
        table = np.zeros((geo["ngmax"], 3), np.int32)
        table[: len(rows)] = rows
        corr = np.zeros(geo["opad"], np.int32)
        if layer.lp.act_signed and n_low:
            corr = low.correction(layer.w4taps, layer.sa + layer.sw, n_low, geo["opad"])
        corr = corr + self.kernels["corr8"](layer.w8taps, n_low, bool(layer.lp.act_signed),
                                            geo["opad"])
        return relax.const(table, "int32"), ng, relax.const(corr.astype(np.int32), "int32")

    def _emit(self, bb, x, kind, layer, gvs, consts, n_low):
        geo = layer.geo
        nl = tvm.tirx.IntImm("int32", n_low)
        codes = layer.lp.name.replace(".", "_") + CODES  # named: FuseRequantize reports it
        if kind == g.CONV and layer.grouped:
            n, c = layer.x_shape[:2]
            q = bb.emit(relax.call_tir(gvs["q"], (x, consts["sa"], consts["st"], consts["rank"],
                                                  nl),
                                       relax.TensorType((n, c, geo["hp"], geo["wp"]), "int16")),
                        name_hint=codes)
            acc = bb.emit(relax.call_tir(
                gvs["conv"], (q, consts["w8"], consts["w4"], consts["rank"], nl),
                relax.TensorType((n, geo["o"], geo["oh"], geo["ow"]), "int32")))
            acc3 = bb.emit(relax.op.reshape(acc, (n, geo["o"], geo["oh"] * geo["ow"])))
            return relax.call_tir(gvs["deq"], (acc3, consts["mult"]),
                                  relax.TensorType(layer.y_shape, "float32")), acc
        xin = x if kind == g.CONV else bb.emit(relax.op.reshape(x, (geo["p"], geo["c"])))
        q8_dtype = self.kernels["q8_dtype"]
        qq = bb.emit(relax.call_tir(
            gvs["q"], (xin, consts["sa"], consts["slot_chan"], nl),
            [relax.TensorType((geo["n"], geo["hp"], geo["wp"], geo["cpad"]), q8_dtype),
             relax.TensorType((geo["n"], geo["hp"], geo["wp"], geo["slots"]), "uint8")]),
            name_hint=codes)
        q8 = bb.emit(relax.TupleGetItem(qq, 0))
        q4 = bb.emit(relax.TupleGetItem(qq, 1))
        chunks, ng, corr = self._variant_consts(layer, n_low)
        shape = ((geo["n"], geo["opad"], geo["ppad"]) if kind == g.CONV
                 else (1, geo["ppad"], geo["opad"]))
        acc = bb.emit(relax.call_tir(
            gvs["gemm"], (q8, q4, consts["w8"], consts["w4"], consts["slot_wshift"], chunks,
                          tvm.tirx.IntImm("int32", ng), corr, nl),
            relax.TensorType(shape, "int32")))
        return relax.call_tir(gvs["deq"], (acc, consts["mult"]),
                              relax.TensorType(layer.y_shape, "float32")), acc


QuantizeMixedPrecision = tvm.transform.module_pass(opt_level=0, name="QuantizeMixedPrecision")(
    MixedPrecisionLowering)
