"""Before/Expected TVMScript tests of the FlexiQ passes on hand-written Relax blocks.

Each block is written in TVMScript with integer-valued weights, and a hand-made QuantPlan
(weight scale 1, so a weight's INT8 codes are its values) says which channels each layer
wants in 4-bit. The Expected modules are written out in TVMScript too, with the permuted
weights computed here from the permutation the pass must choose:

* residual: a conv's output space joined by ``add`` with its input space (one order for all);
* concat along channels: the producers are pinned, the consumer gets an explicit gather;
* depthwise: a covered depthwise conv passes the order through (weights permuted per channel);
* attention: LayerNorm affine permuted, q/k/v outputs pinned by the activation matmuls, the
  output projection joined to the residual stream.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from flexiq_tvm.plan import LayerPlan, QuantPlan
from flexiq_tvm.transform import AnnotateChannelPrecision, ReorderChannelBlocks, prepare

RNG = np.random.default_rng(7)


def _w(*shape):
    return RNG.integers(-100, 101, size=shape).astype(np.float32)


def _lp(name, w, order, n_half, kind="conv2d", groups=1, macs=1):
    """A plan layer: 4-bit channels ``order[:n_half]`` at ratio 0.5, none at 0."""
    wt = w if kind == "conv2d" else w.T  # linear weights arrive as [K, O]
    o, c = wt.shape[0], len(order)
    return LayerPlan(
        name=name, kind=kind, weight_shape=wt.shape, w_codes=wt.astype(np.int8),
        w_scale=np.ones(o, np.float32), bias=None, act_scale=1 / 16, act_inv_scale=16.0,
        act_signed=True, act_shift=np.zeros(c, np.int8), w_shift=np.zeros(c, np.int8),
        order=np.asarray(order, np.int32), n_low={"0": 0, "0.5": n_half}, eligible=True,
        macs_per_channel=macs, groups=groups)


def _plan(*layers):
    return QuantPlan(model="blocks", ratios=(0.0, 0.5), config={}, layers=list(layers))


def _attrs(name, in_perm, out_perm, gather=False, kind="flexiq.conv2d"):
    return {"Composite": kind, "Primitive": True, "flexiq.layer": name,
            "flexiq.in_perm": [int(i) for i in in_perm],
            "flexiq.out_perm": [int(i) for i in out_perm], "flexiq.gather": gather}


def _run(plan, mod):
    annotated = AnnotateChannelPrecision(plan)(prepare()(mod))
    return annotated, ReorderChannelBlocks(plan)(annotated)


# ---------------------------------------------------------------------------- residual
W0, W1, W2 = _w(4, 3, 1, 1), _w(4, 4, 3, 3), _w(2, 4, 1, 1)


@I.ir_module
class ResidualBefore:
    @R.function
    def main(x: R.Tensor((1, 3, 6, 6), "float32")):
        with R.dataflow():
            a = R.nn.conv2d(x, R.const(W0))
            b = R.nn.relu(a)
            c = R.nn.conv2d(b, R.const(W1), padding=[1, 1, 1, 1])
            d = R.add(c, b)
            e = R.nn.relu(d)
            f = R.nn.conv2d(e, R.const(W2))
            R.output(f)
        return f


RES_PLAN = _plan(_lp("c0", W0, [0, 1, 2], 0), _lp("c1", W1, [2, 0, 3, 1], 2, macs=9),
                 _lp("c2", W2, [0, 2, 1, 3], 1))
ID3, ID4, ID2 = range(3), range(4), range(2)


def _residual_expected(p0, p1, w0, w1, w2):
    """The residual block with its convs in composites: c0's output and c1's input/output in
    order ``p0``, c2's input in ``p1`` (all one channel space), the weights as given."""

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def flexiq_conv2d_0(x: R.Tensor((1, 3, 6, 6), "float32"),
                            w: R.Tensor((4, 3, 1, 1), "float32")):
            R.func_attr(_attrs("c0", ID3, p0))
            with R.dataflow():
                y = R.nn.conv2d(x, w)
                R.output(y)
            return y

        @R.function(private=True)
        def flexiq_conv2d_1(x: R.Tensor((1, 4, 6, 6), "float32"),
                            w: R.Tensor((4, 4, 3, 3), "float32")):
            R.func_attr(_attrs("c1", p0, p0))
            with R.dataflow():
                y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1])
                R.output(y)
            return y

        @R.function(private=True)
        def flexiq_conv2d_2(x: R.Tensor((1, 4, 6, 6), "float32"),
                            w: R.Tensor((2, 4, 1, 1), "float32")):
            R.func_attr(_attrs("c2", p1, ID2))
            with R.dataflow():
                y = R.nn.conv2d(x, w)
                R.output(y)
            return y

        @R.function
        def main(x: R.Tensor((1, 3, 6, 6), "float32")):
            cls = Expected
            with R.dataflow():
                a = cls.flexiq_conv2d_0(x, R.const(w0))
                b = R.nn.relu(a)
                c = cls.flexiq_conv2d_1(b, R.const(w1))
                d = R.add(c, b)
                e = R.nn.relu(d)
                f = cls.flexiq_conv2d_2(e, R.const(w2))
                R.output(f)
            return f

    return Expected


# after AnnotateChannelPrecision: every order the identity, the weights untouched
ResidualAnnotated = _residual_expected(ID4, ID4, W0, W1, W2)
# c1 (the larger consumer) sets the shared order: its 4-bit pair {2, 0} first, by index; every
# weight along that space is permuted with it
P = [0, 2, 1, 3]
ResidualReordered = _residual_expected(P, P, W0[P], W1[P][:, P], W2[:, P])


def test_residual_block_annotate_and_reorder():
    annotated, reordered = _run(RES_PLAN, ResidualBefore)
    tvm.ir.assert_structural_equal(annotated, ResidualAnnotated)
    tvm.ir.assert_structural_equal(reordered, ResidualReordered)


def test_no_plan_layer_is_a_noop():
    plan = _plan(_lp("other", _w(5, 5, 1, 1), range(5), 2))  # matches no weight
    before = prepare()(ResidualBefore)
    annotated, reordered = _run(plan, ResidualBefore)
    tvm.ir.assert_structural_equal(annotated, before)
    tvm.ir.assert_structural_equal(reordered, before)


# ---------------------------------------------------------------------------- concat
WA, WB, WC = _w(2, 3, 1, 1), _w(2, 3, 1, 1), _w(2, 4, 1, 1)


@I.ir_module
class ConcatBefore:
    @R.function
    def main(x: R.Tensor((1, 3, 5, 5), "float32")):
        with R.dataflow():
            a = R.nn.conv2d(x, R.const(WA))
            b = R.nn.conv2d(x, R.const(WB))
            c = R.concat((a, b), axis=1)
            d = R.nn.conv2d(c, R.const(WC))
            R.output(d)
        return d


CAT_PLAN = _plan(_lp("cc", WC, [3, 1, 0, 2], 2))
G = [1, 3, 0, 2]  # cc's wanted order: its 4-bit pair {3, 1} by index, then the rest


@I.ir_module
class ConcatReordered:
    @R.function(private=True)
    def flexiq_conv2d_0(x: R.Tensor((1, 4, 5, 5), "float32"), w: R.Tensor((2, 4, 1, 1), "float32")):
        R.func_attr(_attrs("cc", G, ID2, gather=True))
        with R.dataflow():
            y = R.nn.conv2d(x, w)
            R.output(y)
        return y

    @R.function
    def main(x: R.Tensor((1, 3, 5, 5), "float32")):
        cls = ConcatReordered
        with R.dataflow():
            a = R.nn.conv2d(x, R.const(WA))
            b = R.nn.conv2d(x, R.const(WB))
            c = R.concat((a, b), axis=1)
            gather = R.take(c, R.const(np.asarray(G, np.int64), "int64"), axis=1, mode="fast")
            d = cls.flexiq_conv2d_0(gather, R.const(WC[:, G]))
            R.output(d)
        return d


def test_concat_pins_its_producers_and_the_consumer_gathers():
    _, reordered = _run(CAT_PLAN, ConcatBefore)
    tvm.ir.assert_structural_equal(reordered, ConcatReordered)


# ---------------------------------------------------------------------------- depthwise
WP, WD, WQ = _w(4, 3, 1, 1), _w(4, 1, 3, 3), _w(2, 4, 1, 1)


@I.ir_module
class DepthwiseBefore:
    @R.function
    def main(x: R.Tensor((1, 3, 6, 6), "float32")):
        with R.dataflow():
            a = R.nn.conv2d(x, R.const(WP))
            b = R.nn.relu(a)
            c = R.nn.conv2d(b, R.const(WD), padding=[1, 1, 1, 1], groups=4)
            d = R.nn.relu(c)
            e = R.nn.conv2d(d, R.const(WQ))
            R.output(e)
        return e


DW_PLAN = _plan(_lp("dw", WD, [1, 0, 2, 3], 1, groups=4), _lp("pj", WQ, [3, 1, 0, 2], 2))


@I.ir_module
class DepthwiseReordered:
    @R.function(private=True)
    def flexiq_conv2d_0(x: R.Tensor((1, 4, 6, 6), "float32"), w: R.Tensor((4, 1, 3, 3), "float32")):
        R.func_attr(_attrs("dw", G, G))
        with R.dataflow():
            y = R.nn.conv2d(x, w, padding=[1, 1, 1, 1], groups=4)
            R.output(y)
        return y

    @R.function(private=True)
    def flexiq_conv2d_1(x: R.Tensor((1, 4, 6, 6), "float32"), w: R.Tensor((2, 4, 1, 1), "float32")):
        R.func_attr(_attrs("pj", G, ID2))
        with R.dataflow():
            y = R.nn.conv2d(x, w)
            R.output(y)
        return y

    @R.function
    def main(x: R.Tensor((1, 3, 6, 6), "float32")):
        cls = DepthwiseReordered
        with R.dataflow():
            a = R.nn.conv2d(x, R.const(WP[G]))  # FP32 producer: output channels permuted
            b = R.nn.relu(a)
            c = cls.flexiq_conv2d_0(b, R.const(WD[G]))
            d = R.nn.relu(c)
            e = cls.flexiq_conv2d_1(d, R.const(WQ[:, G]))
            R.output(e)
        return e


def test_depthwise_passes_the_order_through():
    _, reordered = _run(DW_PLAN, DepthwiseBefore)
    tvm.ir.assert_structural_equal(reordered, DepthwiseReordered)


# ---------------------------------------------------------------------------- attention
D = 4
WI, WQK, WK, WV, WO, WH = (_w(D, D) for _ in range(6))  # [K, O], as Relax sees linears
GAMMA = RNG.uniform(0.5, 1.5, D).astype(np.float32)
BETA = RNG.uniform(-1, 1, D).astype(np.float32)


@I.ir_module
class AttentionBefore:
    @R.function
    def main(x: R.Tensor((3, D), "float32")):
        with R.dataflow():
            h = R.matmul(x, R.const(WI))
            y = R.nn.layer_norm(h, R.const(GAMMA), R.const(BETA), axes=[-1])
            q = R.matmul(y, R.const(WQK))
            k = R.matmul(y, R.const(WK))
            v = R.matmul(y, R.const(WV))
            s = R.nn.softmax(R.matmul(q, R.permute_dims(k)), axis=-1)
            a = R.matmul(s, v)
            o = R.matmul(a, R.const(WO))
            h2 = R.add(h, o)
            out = R.matmul(h2, R.const(WH))
            R.output(out)
        return out


ATT_PLAN = _plan(_lp("q", WQK, [2, 0, 1, 3], 2, kind="linear", macs=3),
                 _lp("k", WK, [0, 2, 1, 3], 1, kind="linear"),
                 _lp("o", WO, [0, 1, 2, 3], 1, kind="linear"),
                 _lp("head", WH, [2, 0, 3, 1], 2, kind="linear"))
# one space: the residual stream h, its LayerNorm y, o's output and h2. q, the largest 4-bit
# consumer, sets its order; k's and head's 4-bit sets are prefixes of it too (no gather)
PA = [0, 2, 1, 3]


def test_attention_block_reorders_layernorm_and_residual_stream():
    _, reordered = _run(ATT_PLAN, AttentionBefore)

    @I.ir_module
    class AttentionReordered:
        @R.function(private=True)
        def flexiq_linear_0(x: R.Tensor((3, D), "float32"), w: R.Tensor((D, D), "float32")):
            R.func_attr(_attrs("q", PA, range(D), kind="flexiq.linear"))
            with R.dataflow():
                y = R.matmul(x, w)
                R.output(y)
            return y

        @R.function(private=True)
        def flexiq_linear_1(x: R.Tensor((3, D), "float32"), w: R.Tensor((D, D), "float32")):
            R.func_attr(_attrs("k", PA, range(D), kind="flexiq.linear"))
            with R.dataflow():
                y = R.matmul(x, w)
                R.output(y)
            return y

        @R.function(private=True)
        def flexiq_linear_2(x: R.Tensor((3, D), "float32"), w: R.Tensor((D, D), "float32")):
            R.func_attr(_attrs("o", range(D), PA, kind="flexiq.linear"))
            with R.dataflow():
                y = R.matmul(x, w)
                R.output(y)
            return y

        @R.function(private=True)
        def flexiq_linear_3(x: R.Tensor((3, D), "float32"), w: R.Tensor((D, D), "float32")):
            R.func_attr(_attrs("head", PA, range(D), kind="flexiq.linear"))
            with R.dataflow():
                y = R.matmul(x, w)
                R.output(y)
            return y

        @R.function
        def main(x: R.Tensor((3, D), "float32")):
            cls = AttentionReordered
            with R.dataflow():
                h = R.matmul(x, R.const(WI[:, PA]))  # FP32 producer of the residual stream
                y = R.nn.layer_norm(h, R.const(GAMMA[PA]), R.const(BETA[PA]), axes=[-1])
                q = cls.flexiq_linear_0(y, R.const(WQK[PA]))
                k = cls.flexiq_linear_1(y, R.const(WK[PA]))
                v = R.matmul(y, R.const(WV[PA]))  # FP32 consumer: input rows permuted
                s = R.nn.softmax(R.matmul(q, R.permute_dims(k)), axis=-1)
                a = R.matmul(s, v)
                o = cls.flexiq_linear_2(a, R.const(WO[:, PA]))
                h2 = R.add(h, o)
                out = cls.flexiq_linear_3(h2, R.const(WH[PA]))
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(reordered, AttentionReordered)


# ---------------------------------------------------------------------------- lowering
WL = _w(4, 6)  # a linear layer [K=4, O=6] on 3 tokens
LIN_PLAN = _plan(_lp("fc", WL, [0, 1, 2, 3], 2, kind="linear"))


@I.ir_module
class LinearBefore:
    @R.function
    def main(x: R.Tensor((3, 4), "float32")):
        with R.dataflow():
            y = R.matmul(x, R.const(WL))
            R.output(y)
        return y


@pytest.mark.parametrize("isa", ["avx2", "avx512vnni"])  # lowering only: no CPU needed
def test_quantize_mixed_precision_lowers_to_kernels_with_one_variant_per_ratio(isa):
    from flexiq_tvm.schedules.llvm import kernels
    from flexiq_tvm.schedules.llvm.mixed import LowLayout
    from tvm.script import tirx as T

    from flexiq_tvm.transform import QuantizeMixedPrecision
    from flexiq_tvm.transform.quantize_mixed_precision import _tag

    _, reordered = _run(LIN_PLAN, LinearBefore)
    KERNELS = kernels(isa)
    got = QuantizeMixedPrecision(LIN_PLAN, KERNELS)(reordered)

    # expected operands: INT8 weights in row-pair order (row quads on VNNI), the 4-bit block
    # (channels 0, 1 at ratio 0.5; shift 0, so a 4-bit code is the clamped INT8 code) in one
    # quad of slots
    w8 = np.zeros((4, 16), np.int8)
    w8[:, :6] = WL
    W8 = w8.reshape(2, 2, 16).transpose(0, 2, 1).reshape(2, 32) if isa == "avx2" else \
        w8.T.reshape(1, 64)
    Q8 = "int16" if isa == "avx2" else "uint8"
    low = LowLayout(np.zeros(4, np.int32), 2, taps=1)
    assert low.slot_chan.tolist() == [0, 1, -1, -1]
    w4 = np.clip(WL, -8, 7).astype(np.int32)[None]  # [taps, K, O]
    W4, SLOTS = low.pack(w4, 16), low.slot_chan
    WSH = low.slot_shift(np.zeros(4, np.int32))  # the GEMM's per-slot weight shifts
    SA = np.zeros(4, np.int32)
    MULT = np.full(6, 1 / 16, np.float32)
    T000, T050 = np.zeros((1, 3), np.int32), np.array([[0, 1, 0]], np.int32)
    C000 = np.zeros(16, np.int32)
    C050 = np.zeros(16, np.int32)
    C050[:6] = 8 * w4[0, :2].sum(0)  # signed 4-bit activations are stored + 8
    if isa != "avx2":  # signed 8-bit codes are stored + 128, over the quads read (all 4 rows)
        C000[:6] += 128 * WL.astype(np.int64).sum(0)
        C050[:6] += 128 * WL.astype(np.int64).sum(0)

    @I.ir_module(check_well_formed=False)  # stub kernels until they are put in below
    class LinearLowered:
        @T.prim_func(private=True)
        def fc_quantize():  # placeholders: the kernel library's PrimFuncs are put in below
            T.evaluate(0)

        @T.prim_func(private=True)
        def fc_gemm():
            T.evaluate(0)

        @T.prim_func(private=True)
        def fc_dequantize():
            T.evaluate(0)

        @R.function
        def main_r000(x: R.Tensor((3, 4), "float32")):
            cls = LinearLowered
            with R.dataflow():
                x2 = R.reshape(x, R.shape([3, 4]))
                qq = R.call_tir(cls.fc_quantize, (x2, R.const(SA), R.const(SLOTS),
                                                  R.prim_value(T.int32(0))),
                                out_ty=[R.Tensor((1, 1, 3, 4), Q8),
                                        R.Tensor((1, 1, 3, 4), "uint8")])
                q8 = qq[0]
                q4 = qq[1]
                acc = R.call_tir(cls.fc_gemm, (q8, q4, R.const(W8), R.const(W4), R.const(WSH),
                                               R.const(T000), R.prim_value(T.int32(0)),
                                               R.const(C000), R.prim_value(T.int32(0))),
                                 out_ty=R.Tensor((1, 6, 16), "int32"))
                y = R.call_tir(cls.fc_dequantize, (acc, R.const(MULT)),
                               out_ty=R.Tensor((3, 6), "float32"))
                R.output(y)
            return y

        @R.function
        def main_r050(x: R.Tensor((3, 4), "float32")):
            cls = LinearLowered
            with R.dataflow():
                x2 = R.reshape(x, R.shape([3, 4]))
                qq = R.call_tir(cls.fc_quantize, (x2, R.const(SA), R.const(SLOTS),
                                                  R.prim_value(T.int32(2))),
                                out_ty=[R.Tensor((1, 1, 3, 4), Q8),
                                        R.Tensor((1, 1, 3, 4), "uint8")])
                q8 = qq[0]
                q4 = qq[1]
                acc = R.call_tir(cls.fc_gemm, (q8, q4, R.const(W8), R.const(W4), R.const(WSH),
                                               R.const(T050), R.prim_value(T.int32(1)),
                                               R.const(C050), R.prim_value(T.int32(2))),
                                 out_ty=R.Tensor((1, 6, 16), "int32"))
                y = R.call_tir(cls.fc_dequantize, (acc, R.const(MULT)),
                               out_ty=R.Tensor((3, 6), "float32"))
                R.output(y)
            return y

    expected = LinearLowered
    gemm = (1, 1, 3, 4, 4, 1, 1, 1, (1, 1), (1, 1), 1, 3, 16, "PO")
    # each marked with its role for FuseRequantize (which leaves a linear layer unfused)
    kernels = {"fc_quantize": _tag(KERNELS["quantize_rows"](3, 4, 4, 4, 16.0, True),
                                   "quantize_rows"),
               "fc_gemm": _tag(KERNELS["mixed_gemm"](*gemm), "mixed_gemm", *gemm),
               "fc_dequantize": _tag(KERNELS["dequantize"](1, 6, 3, 16, 6, "PO", (3, 6)),
                                     "dequantize", layout="PO")}
    for name, func in kernels.items():
        expected.update_func(expected.get_global_var(name), func)
    tvm.ir.assert_structural_equal(got, expected)
