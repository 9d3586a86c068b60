"""The integer oracle: FlexiQ's exact integer arithmetic in plain numpy (no TVM, no torch).

Every compiled path (llvm, CUDA, the NPU simulator) is judged against these functions,
bit-exactly on integer tensors.  The arithmetic, and the decisions the paper leaves open:

Weights
    Per-output-channel symmetric INT8: ``s_w[o] = max|W[o]| / 127``,
    ``q_w = clip(round_half_even(W / s_w), -127, 127)`` (the code -128 is never used, so the
    range is symmetric and negation is exact).

Activations
    Per-tensor, zero-point 0, calibrated scale ``s_a``.  A tensor whose calibrated minimum is
    >= 0 (after ReLU/ReLU6) is *unsigned* ``[0, 255]``, otherwise *signed* ``[-127, 127]``;
    quantization is ``clip(floor(x * inv_s + 0.5), lo, hi)`` in float32, with ``inv_s`` the
    float32 reciprocal stored in the plan (multiplication and floor reproduce exactly in any
    kernel; no division, no ties-to-even ambiguity).  Per-tensor because a per-input-channel
    activation scale cannot be factored out of the reduction over K.

Effective bit extraction (8 -> 4 bits) of input channel ``c``
    The channel's 8-bit codes are shifted right by ``shift[c]`` with rounding (add
    ``2**(shift-1)``, arithmetic shift) and clamped to 4 bits: unsigned ``[0, 15]`` or signed
    ``[-8, 7]``.  ``shift = 4`` is naive top-4-bit truncation; a smaller shift skips unused
    leading bits (FlexiQ).  A channel's activation shift ``sa[c]`` and weight-column shift
    ``sw[c]`` are chosen separately (by minimum MSE on calibration data, clipping allowed, see
    :mod:`flexiq_tvm.bitops`); the 4-bit partial product of channel ``c`` is shifted left by
    ``sa[c] + sw[c]`` (0..8) before it joins the int32 accumulator.

Shift granularity: per input channel
    The kernel stores the low-bit channels grouped by total shift (inside each nested ratio
    segment), so it sums each group's 4-bit products in a narrow accumulator and applies one
    left shift per group: at most 9 groups per segment, a handful of shift instructions per
    output tile.  Finer (per weight element) shifts would need a shift per MAC; coarser
    (per layer) shifts lose most of the precision that effective extraction buys.

Mixed GEMM / conv
    ``acc[o] = sum_{c high} qa[c] * qw[o, c] + sum_{c low} (qa4[c] * qw4[o, c]) << (sa[c] + sw[c])``
    in int32.  For convolutions the input channel ``c`` is the reduction channel of the group it
    belongs to; depthwise and grouped convolutions follow (weight ``(O, C/groups, kh, kw)``).

Requantization
    ``y = acc * (s_a * s_w[o]) + bias[o]`` to float (:func:`dequantize_acc`), or to an 8-bit code
    for a following quantized layer with a fixed-point multiplier (:func:`requantize`,
    gemmlowp-style ``(acc * m0 + round) >> (31 + n)``), exact in 64-bit integer arithmetic.
"""

from __future__ import annotations

import numpy as np

INT8_MAX = 127
UINT8_MAX = 255
INT4_MIN, INT4_MAX = -8, 7
UINT4_MAX = 15
MAX_SHIFT = 4  # extracting 4 of 8 bits: a shift above 4 would only drop more bits


def act_range(signed: bool, bits: int = 8) -> tuple[int, int]:
    """Code range of an activation of ``bits`` bits (zero-point 0)."""
    if bits == 8:
        return (-INT8_MAX, INT8_MAX) if signed else (0, UINT8_MAX)
    if bits == 4:
        return (INT4_MIN, INT4_MAX) if signed else (0, UINT4_MAX)
    raise ValueError(f"bits={bits}; allowed: 4, 8")


# ---------------------------------------------------------------------------------- weights


def weight_scales(w: np.ndarray) -> np.ndarray:
    """Per-output-channel symmetric INT8 scales (float32, shape ``(O,)``); zero rows get 1."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    return np.where(amax > 0, amax / np.float32(INT8_MAX), np.float32(1.0)).astype(np.float32)


def quantize_weight(w: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """INT8 weight codes ``clip(rint(w / s[o]), -127, 127)`` (int8, shape of ``w``)."""
    w = np.asarray(w, dtype=np.float32)
    s = np.asarray(scales, dtype=np.float32).reshape((-1,) + (1,) * (w.ndim - 1))
    return np.clip(np.rint(w / s), -INT8_MAX, INT8_MAX).astype(np.int8)


# ------------------------------------------------------------------------------ activations


def quantize_act(x: np.ndarray, inv_scale: float, signed: bool) -> np.ndarray:
    """8-bit activation codes ``clip(floor(x * inv_scale + 0.5), lo, hi)`` as int32."""
    lo, hi = act_range(signed)
    v = np.floor(np.asarray(x, np.float32) * np.float32(inv_scale) + np.float32(0.5))
    return np.clip(v, lo, hi).astype(np.int32)


def act_scale_from_range(lo: float, hi: float, signed: bool) -> tuple[np.float32, np.float32]:
    """``(scale, inv_scale)`` mapping the calibrated range onto the 8-bit code range."""
    amax = max(abs(float(lo)), abs(float(hi))) if signed else max(float(hi), 0.0)
    top = INT8_MAX if signed else UINT8_MAX
    scale = np.float32(amax / top) if amax > 0 else np.float32(1.0)
    return scale, np.float32(1.0) / scale


# ----------------------------------------------------------------------- bit extraction


def extract_bits(q: np.ndarray, shift: np.ndarray | int, signed: bool) -> np.ndarray:
    """Effective bit extraction: ``clip((q + 2**(shift-1)) >> shift, 4-bit range)``.

    ``shift`` broadcasts against ``q`` (e.g. one shift per input channel); values 0..4.
    Returns int32 4-bit codes; ``codes << shift`` approximates ``q``.
    """
    q = np.asarray(q, dtype=np.int32)
    sh = np.asarray(shift, dtype=np.int32)
    if sh.size and (sh.min() < 0 or sh.max() > MAX_SHIFT):
        raise ValueError(f"shift must be in [0, {MAX_SHIFT}], got [{sh.min()}, {sh.max()}]")
    half = np.where(sh > 0, np.left_shift(1, np.maximum(sh - 1, 0)), 0).astype(np.int32)
    lo, hi = act_range(signed, 4)
    return np.clip(np.right_shift(q + half, sh), lo, hi).astype(np.int32)


def lowered_value(q: np.ndarray, shift, signed: bool) -> np.ndarray:
    """The 8-bit-scale value that a 4-bit channel represents: ``extract_bits(q) << shift``."""
    return np.left_shift(extract_bits(q, shift, signed), np.asarray(shift, np.int32))


# ----------------------------------------------------------------------- mixed kernels


def _split_channels(low: np.ndarray, k: int) -> np.ndarray:
    low = np.asarray(low, dtype=bool)
    if low.shape != (k,):
        raise ValueError(f"low-channel mask has shape {low.shape}, expected ({k},)")
    return low


def mixed_matmul(
    qa: np.ndarray, qw: np.ndarray, low: np.ndarray, sa: np.ndarray, sw: np.ndarray,
    act_signed: bool,
) -> np.ndarray:
    """Mixed-precision ``qa @ qw.T`` in int32.

    qa: (..., K) 8-bit activation codes; qw: (O, K) INT8 weight codes; ``low`` (K,) marks the
    4-bit input channels; ``sa``/``sw`` (K,) are their activation/weight extraction shifts.
    Returns int32 ``(..., O)``: INT8 block + shifted INT4 block.
    """
    qa = np.asarray(qa, dtype=np.int64)
    qw = np.asarray(qw, dtype=np.int64)
    k = qw.shape[1]
    if qa.shape[-1] != k:
        raise ValueError(f"activation K={qa.shape[-1]} does not match weight K={k}")
    low = _split_channels(low, k)
    high = ~low
    acc = qa[..., high] @ qw[:, high].T
    if low.any():
        sa_l = np.asarray(sa, np.int32)[low]
        sw_l = np.asarray(sw, np.int32)[low]
        a4 = extract_bits(qa[..., low], sa_l, act_signed).astype(np.int64)
        w4 = extract_bits(qw[:, low], sw_l, True).astype(np.int64)
        for s in np.unique(sa_l + sw_l):  # one shift per group of channels, as a kernel does
            g = (sa_l + sw_l) == s
            acc += (a4[..., g] @ w4[:, g].T) << int(s)
    return _to_int32(acc)


def _to_int32(acc: np.ndarray) -> np.ndarray:
    if acc.size and (acc.max() > np.iinfo(np.int32).max or acc.min() < np.iinfo(np.int32).min):
        raise OverflowError("int32 accumulator overflow")
    return acc.astype(np.int32)


def _im2col(q: np.ndarray, kh: int, kw: int, stride, padding, dilation) -> np.ndarray:
    """(N, C, H, W) -> (N, Ho, Wo, C, kh, kw) windows (zero padding = code 0).

    ``padding`` is ``(top, bottom, left, right)``.
    """
    n, c, _, _ = q.shape
    sh, sw_ = stride
    dh, dw = dilation
    top, bottom, left, right = padding
    qp = np.pad(q, ((0, 0), (0, 0), (top, bottom), (left, right)))
    h, w = qp.shape[2:]
    ho = (h - dh * (kh - 1) - 1) // sh + 1
    wo = (w - dw * (kw - 1) - 1) // sw_ + 1
    cols = np.empty((n, ho, wo, c, kh, kw), dtype=q.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[..., i, j] = qp[:, :, i * dh : i * dh + sh * ho : sh,
                                 j * dw : j * dw + sw_ * wo : sw_].transpose(0, 2, 3, 1)
    return cols


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def pad4(padding) -> tuple[int, int, int, int]:
    """Padding as ``(top, bottom, left, right)`` from an int, ``(ph, pw)`` or a 4-tuple."""
    if np.isscalar(padding):
        p = int(padding)
        return (p, p, p, p)
    if len(padding) == 2:
        return (int(padding[0]), int(padding[0]), int(padding[1]), int(padding[1]))
    if len(padding) == 4:
        return tuple(int(p) for p in padding)
    raise ValueError(f"padding={padding!r}; expected an int, (ph, pw) or (t, b, l, r)")


def mixed_conv2d(
    qa: np.ndarray, qw: np.ndarray, low: np.ndarray, sa: np.ndarray, sw: np.ndarray,
    act_signed: bool, stride=1, padding=0, dilation=1, groups: int = 1,
) -> np.ndarray:
    """Mixed-precision conv2d (NCHW / OIHW, grouped and depthwise included) in int32.

    ``padding``: an int, ``(ph, pw)`` or ``(top, bottom, left, right)`` (zero padding, which is
    code 0 since activations have zero-point 0).
    ``low``, ``sa``, ``sw`` are indexed by *input* channel ``c`` (length C); for grouped convs
    channel ``c`` belongs to group ``c // (C / groups)`` and is reduction channel
    ``c % (C / groups)`` of that group's weights.
    """
    qa = np.asarray(qa, dtype=np.int32)
    qw = np.asarray(qw, dtype=np.int32)
    _, c, _, _ = qa.shape
    o, cg, kh, kw = qw.shape
    if c % groups or o % groups or c // groups != cg:
        raise ValueError(f"conv shapes: input C={c}, weight {qw.shape}, groups={groups}")
    low = _split_channels(low, c)
    sa = np.asarray(sa, np.int32)
    sw = np.asarray(sw, np.int32)
    cols = _im2col(qa, kh, kw, _pair(stride), pad4(padding), _pair(dilation))
    og = o // groups
    outs = []
    for g in range(groups):
        ci = slice(g * cg, (g + 1) * cg)
        a = cols[:, :, :, ci]  # (N, Ho, Wo, cg, kh, kw)
        w = qw[g * og : (g + 1) * og]  # (og, cg, kh, kw)
        # the reduction axis K = (cg, kh, kw): expand the per-channel mask/shifts over kh*kw
        rep = kh * kw
        outs.append(mixed_matmul(
            a.reshape(*a.shape[:3], cg * rep), w.reshape(og, cg * rep),
            np.repeat(low[ci], rep), np.repeat(sa[ci], rep), np.repeat(sw[ci], rep),
            act_signed,
        ))
    acc = np.concatenate(outs, axis=-1)  # (N, Ho, Wo, O)
    return acc.transpose(0, 3, 1, 2)


def weight_input_channels(weight_shape: tuple[int, ...], groups: int = 1) -> np.ndarray:
    """Input channel of each weight element row/column: int ``(O, C/groups)``.

    Row ``o`` of a grouped conv belongs to group ``o // (O/groups)``, whose reduction column
    ``j`` is input channel ``group * C/groups + j``.  For linear layers / ``groups=1`` it is
    simply ``j``.
    """
    o, cg = int(weight_shape[0]), int(weight_shape[1])
    og = o // groups
    return (np.arange(o)[:, None] // og) * cg + np.arange(cg)[None, :]


def per_weight(values: np.ndarray, weight_shape: tuple[int, ...], groups: int = 1) -> np.ndarray:
    """Per-input-channel ``values`` broadcast to the weight layout ``(O, C/groups, 1, ...)``."""
    idx = weight_input_channels(weight_shape, groups)
    return np.asarray(values)[idx].reshape(idx.shape + (1,) * (len(weight_shape) - 2))


# ------------------------------------------------------------------------ requantization


def dequantize_acc(acc: np.ndarray, act_scale: float, w_scales: np.ndarray,
                   bias: np.ndarray | None, channel_axis: int) -> np.ndarray:
    """float32 ``acc * (s_a * s_w[o]) + bias[o]`` along ``channel_axis``."""
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    mult = (np.float32(act_scale) * np.asarray(w_scales, np.float32)).reshape(shape)
    y = acc.astype(np.float32) * mult
    if bias is not None:
        y = y + np.asarray(bias, np.float32).reshape(shape)
    return y


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``real = m0 * 2**(-31 - n)`` with ``m0`` in ``[2**30, 2**31)``; returns ``(m0, n)``."""
    if not real > 0:
        raise ValueError(f"multiplier must be positive, got {real}")
    mant, exp = np.frexp(real)  # real = mant * 2**exp, mant in [0.5, 1)
    m0 = round(float(mant) * 2**31)
    if m0 == 2**31:
        m0, exp = 2**30, exp + 1
    return m0, -int(exp)


def requantize(acc: np.ndarray, m0: np.ndarray, n: np.ndarray, signed: bool,
               channel_axis: int = -1) -> np.ndarray:
    """Fixed-point requantization of int32 accumulators to 8-bit codes.

    ``code = clip((acc * m0 + 2**(30+n)) >> (31+n), lo, hi)`` in int64, with per-output-channel
    ``(m0, n)`` from :func:`quantize_multiplier` (``n >= 0``; right shift rounds half up).
    """
    acc = np.asarray(acc, dtype=np.int64)
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    m0 = np.asarray(m0, np.int64).reshape(shape)
    total = 31 + np.asarray(n, np.int64).reshape(shape)
    if (total < 31).any() or (total > 62).any():
        raise ValueError("requantize shift out of range: n must be in [0, 31]")
    v = (acc * m0 + np.left_shift(np.int64(1), total - 1)) >> total
    lo, hi = act_range(signed)
    return np.clip(v, lo, hi).astype(np.int32)


# ----------------------------------------------------------------------------- one layer


def layer_forward(x: np.ndarray, layer, low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One covered layer of a plan (``plan.LayerPlan`` or any object with its fields).

    Quantizes the float input, runs the mixed conv/linear with the 4-bit channels ``low``
    and dequantizes.  Returns ``(acc int32, y float32)``; for linears ``x`` is ``(..., K)``.
    """
    qa = quantize_act(x, layer.act_inv_scale, layer.act_signed)
    if layer.kind == "conv2d":
        acc = mixed_conv2d(qa, layer.w_codes, low, layer.act_shift, layer.w_shift,
                           layer.act_signed, layer.stride, layer.padding, layer.dilation,
                           layer.groups)
        axis = 1
    elif layer.kind == "linear":
        acc = mixed_matmul(qa, layer.w_codes, low, layer.act_shift, layer.w_shift,
                           layer.act_signed)
        axis = -1
    else:
        raise ValueError(f"layer kind {layer.kind!r}; allowed: 'conv2d', 'linear'")
    return acc, dequantize_acc(acc, layer.act_scale, layer.w_scale, layer.bias, axis)
