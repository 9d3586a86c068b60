"""The integer oracle: hand-computed cases and properties on random shapes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexiq_tvm import reference as ref


def test_weight_quantization_per_output_channel():
    w = np.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [2.0, 1.0, -0.01]], np.float32)
    s = ref.weight_scales(w)
    np.testing.assert_allclose(s, [1 / 127, 1.0, 2 / 127], rtol=1e-7)
    q = ref.quantize_weight(w, s)
    assert q.dtype == np.int8
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [127, 64, -1]]  # 63.5 -> 64 (even)


def test_activation_quantization_floor_half_up_and_clamp():
    x = np.array([-1.0, 0.0, 0.49, 0.5, 1.5, 2.5, 300.0], np.float32)
    assert ref.quantize_act(x, 1.0, signed=False).tolist() == [0, 0, 0, 1, 2, 3, 255]
    assert ref.quantize_act(x, 1.0, signed=True).tolist() == [-1, 0, 0, 1, 2, 3, 127]
    assert ref.quantize_act(np.float32([-300.0]), 1.0, True).tolist() == [-127]
    s, inv = ref.act_scale_from_range(-0.5, 2.54, signed=True)
    assert s == np.float32(2.54 / 127) and inv == np.float32(1) / s
    s, _ = ref.act_scale_from_range(0.0, 2.55, signed=False)
    assert s == np.float32(2.55 / 255)


def test_effective_bit_extraction_hand_cases():
    # unsigned code 13 = 0b00001101: top 4 bits give 0; shift 0 keeps it exactly (13 <= 15)
    assert ref.extract_bits(13, 4, False) == 1  # (13 + 8) >> 4 = 1  -> 16 (naive)
    assert ref.extract_bits(13, 0, False) == 13
    assert ref.lowered_value(np.int32(13), 0, False) == 13
    # 100 = 0b01100100: shift 3 -> (100 + 4) >> 3 = 13 -> 104; shift 2 clamps at 15 -> 60
    assert ref.lowered_value(np.int32(100), 3, False) == 104
    assert ref.lowered_value(np.int32(100), 2, False) == 60
    # signed weights: -100 with shift 4 -> (-100 + 8) >> 4 = -6 (floor) -> -96
    assert ref.extract_bits(-100, 4, True) == -6
    # 127 with shift 4 rounds to 8, clamps at 7 -> 112
    assert ref.lowered_value(np.int32(127), 4, True) == 112
    assert ref.extract_bits(-127, 4, True) == -8
    with pytest.raises(ValueError, match="shift must be in"):
        ref.extract_bits(1, 5, True)


def test_mixed_matmul_hand_computed():
    qa = np.array([[10, 200, 3, 40]], np.int32)  # unsigned activations
    qw = np.array([[1, -2, 3, 4], [-5, 6, -7, 8]], np.int8)
    low = np.array([False, True, False, True])
    sa = np.array([0, 4, 0, 2])
    sw = np.array([0, 0, 0, 0])
    # channel 1: a 200 -> (200+8)>>4 = 13 (x16); w codes -2, 6 (shift 0, fit in 4 bits)
    # channel 3: a 40 -> (40+2)>>2 = 10 (x4); w 4, 8 -> 8 clamps to 7
    acc = ref.mixed_matmul(qa, qw, low, sa, sw, act_signed=False)
    o0 = 10 * 1 + 3 * 3 + (13 * -2) * 16 + (10 * 4) * 4
    o1 = 10 * -5 + 3 * -7 + (13 * 6) * 16 + (10 * 7) * 4
    assert acc.tolist() == [[o0, o1]]
    assert acc.dtype == np.int32
    # no low channel = exact int8 GEMM
    np.testing.assert_array_equal(
        ref.mixed_matmul(qa, qw, np.zeros(4, bool), sa, sw, False), qa @ qw.T.astype(np.int32))


def test_mixed_matmul_rejects_bad_shapes():
    with pytest.raises(ValueError, match="does not match weight K"):
        ref.mixed_matmul(np.zeros((1, 3)), np.zeros((2, 4)), np.zeros(4, bool), 0, 0, False)
    with pytest.raises(ValueError, match="mask has shape"):
        ref.mixed_matmul(np.zeros((1, 4)), np.zeros((2, 4)), np.zeros(3, bool), 0, 0, False)


def _naive_conv(qa, qw, stride, pad, groups):
    n, _, h, w = qa.shape
    o, cg, kh, kw = qw.shape
    qp = np.pad(qa.astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho = (h + 2 * pad - kh) // stride + 1
    wo = (w + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, ho, wo), np.int64)
    og = o // groups
    for oc in range(o):
        g = oc // og
        for y in range(ho):
            for x in range(wo):
                win = qp[:, g * cg:(g + 1) * cg, y * stride:y * stride + kh,
                         x * stride:x * stride + kw]
                out[:, oc, y, x] = (win * qw[oc].astype(np.int64)).sum((1, 2, 3))
    return out


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_conv_matches_naive_loops_with_lowered_channels(groups):
    rng = np.random.default_rng(groups)
    c, o = 6, 6
    qa = rng.integers(0, 256, (2, c, 7, 5)).astype(np.int32)
    qw = rng.integers(-127, 128, (o, c // groups, 3, 3)).astype(np.int8)
    low = rng.random(c) < 0.5
    sa = rng.integers(0, 5, c)
    sw = rng.integers(0, 5, c)
    got = ref.mixed_conv2d(qa, qw, low, sa, sw, False, stride=2, padding=1, groups=groups)
    # the same conv on the lowered tensors, computed by plain loops
    qa_eff = np.where(low[None, :, None, None],
                      ref.lowered_value(qa, sa[None, :, None, None], False), qa)
    idx = ref.weight_input_channels(qw.shape, groups)
    qw_eff = np.where(low[idx][..., None, None],
                      ref.lowered_value(qw.astype(np.int32), sw[idx][..., None, None], True), qw)
    np.testing.assert_array_equal(got, _naive_conv(qa_eff, qw_eff, 2, 1, groups))


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 70), o=st.integers(1, 9), m=st.integers(1, 4),
    signed=st.booleans(), seed=st.integers(0, 2**31 - 1), zero_frac=st.floats(0, 1),
)
def test_mixed_matmul_equals_lowered_gemm(k, o, m, signed, seed, zero_frac):
    """For any K (not a multiple of 8/32 included) and all-zero channels, the mixed GEMM
    equals an exact int64 GEMM over the lowered operands, and is INT8 where nothing is low."""
    rng = np.random.default_rng(seed)
    lo, hi = ref.act_range(signed)
    qa = rng.integers(lo, hi + 1, (m, k)).astype(np.int32)
    qa[:, rng.random(k) < zero_frac] = 0  # all-zero channels
    qw = rng.integers(-127, 128, (o, k)).astype(np.int8)
    low = rng.random(k) < 0.5
    sa, sw = rng.integers(0, 5, k), rng.integers(0, 5, k)
    got = ref.mixed_matmul(qa, qw, low, sa, sw, signed)
    a_eff = np.where(low, ref.lowered_value(qa, sa, signed), qa).astype(np.int64)
    w_eff = np.where(low, ref.lowered_value(qw.astype(np.int32), sw, True), qw).astype(np.int64)
    np.testing.assert_array_equal(got, a_eff @ w_eff.T)
    # 4-bit codes are really 4-bit
    a4 = ref.extract_bits(qa, sa, signed)
    assert a4.min() >= ref.act_range(signed, 4)[0] and a4.max() <= ref.act_range(signed, 4)[1]


@settings(max_examples=30, deadline=None)
@given(real=st.floats(1e-6, 0.99), seed=st.integers(0, 1000), signed=st.booleans())
def test_requantize_matches_rounded_real_multiplication(real, seed, signed):
    rng = np.random.default_rng(seed)
    acc = rng.integers(-(2**20), 2**20, (5, 3)).astype(np.int32)
    m0, n = ref.quantize_multiplier(real)
    assert 2**30 <= m0 < 2**31 and n >= 0
    got = ref.requantize(acc, [m0] * 3, [n] * 3, signed)
    exact = acc.astype(np.float64) * (m0 / 2.0 ** (31 + n))
    lo, hi = ref.act_range(signed)
    np.testing.assert_array_equal(got, np.clip(np.floor(exact + 0.5), lo, hi))
    assert abs(m0 / 2.0 ** (31 + n) - real) <= real * 2**-30


def test_dequantize_acc():
    acc = np.array([[10, -20]], np.int32)
    y = ref.dequantize_acc(acc, 0.5, np.array([0.1, 0.2], np.float32), np.float32([1, 2]), -1)
    np.testing.assert_allclose(y, [[1.5, 0.0]], atol=1e-6)
