"""Choosing extraction shifts and ranking channels (numpy; builds on :mod:`reference`).

Extraction position: for every input channel the activation shift and the weight-column shift
are chosen *separately* as the one (0..4) that minimizes the mean squared error of the lowered
8-bit codes, on the calibration histogram (activations) or the weight codes (weights).  Clipping
of rare large codes is allowed: a prototype here showed that choosing the shift so that the
calibration maximum never clips was worse than naive truncation, while minimum MSE was best
(DESIGN.md).  ``naive`` extraction is ``shift = 4`` everywhere (keep the top 4 bits).

Channel ranking (which channels go 4-bit first inside a layer):

* ``range_score`` -- the paper's static order: activation code range x weight-column range;
* ``error_proxy`` -- expected squared output error of lowering the channel alone:
  ``s_a^2 * (E[da^2] * sum_o (s_w[o] w_oc)^2 + E[a^2] * sum_o (s_w[o] dw_oc)^2)``.
"""

from __future__ import annotations

import numpy as np

from . import reference as ref

SHIFTS = np.arange(ref.MAX_SHIFT + 1)


def code_values(signed: bool) -> np.ndarray:
    """All 8-bit activation codes, in histogram-bin order."""
    lo, hi = ref.act_range(signed)
    return np.arange(lo, hi + 1, dtype=np.int32)


def act_shift_errors(hist: np.ndarray, signed: bool) -> np.ndarray:
    """Per-channel mean squared error of lowering with each shift: ``(C, 5)`` float64.

    ``hist`` is ``(C, n_codes)``: counts of each 8-bit code per channel.
    """
    codes = code_values(signed)
    err = np.stack([(codes - ref.lowered_value(codes, s, signed)) ** 2 for s in SHIFTS], 1)
    total = np.maximum(hist.sum(1, keepdims=True), 1)
    return (hist @ err.astype(np.float64)) / total


def weight_shift_errors(w_codes: np.ndarray) -> np.ndarray:
    """Per-input-channel squared error of lowering the weight column with each shift.

    ``w_codes`` is ``(O, C, ...)`` INT8; returns ``(C, 5)`` float64 (sum over the column).
    """
    w = np.moveaxis(np.asarray(w_codes, np.int32), 1, 0).reshape(w_codes.shape[1], -1)
    return np.stack(
        [((w - ref.lowered_value(w, s, True)) ** 2).sum(1) for s in SHIFTS], 1
    ).astype(np.float64)


def choose_shifts(errors: np.ndarray, extraction: str) -> np.ndarray:
    """Argmin shift per channel (``effective``) or 4 everywhere (``naive``); int8 ``(C,)``."""
    if extraction == "naive":
        return np.full(errors.shape[0], ref.MAX_SHIFT, np.int8)
    if extraction != "effective":
        raise ValueError(f"extraction={extraction!r}; allowed: 'effective', 'naive'")
    return errors.argmin(1).astype(np.int8)


def weight_energy(w_codes: np.ndarray, w_scale: np.ndarray, lowered: bool = False,
                  w_shift: np.ndarray | None = None) -> np.ndarray:
    """Per input channel ``sum_o (s_w[o] * w_oc)^2`` (or of the lowering error ``dw``)."""
    w = np.asarray(w_codes, np.int32)
    if lowered:
        sh = np.asarray(w_shift, np.int32).reshape((1, -1) + (1,) * (w.ndim - 2))
        w = w - ref.lowered_value(w, sh, True)
    scaled = w.astype(np.float64) * np.asarray(w_scale, np.float64).reshape(
        (-1,) + (1,) * (w.ndim - 1))
    return (np.moveaxis(scaled, 1, 0).reshape(w.shape[1], -1) ** 2).sum(1)


def error_proxy(hist: np.ndarray, signed: bool, act_scale: float, act_shift: np.ndarray,
                w_codes: np.ndarray, w_scale: np.ndarray, w_shift: np.ndarray) -> np.ndarray:
    """Expected squared output error of lowering each input channel alone, ``(C,)``."""
    codes = code_values(signed).astype(np.float64)
    total = np.maximum(hist.sum(1), 1)
    e_a2 = (hist @ codes**2) / total
    errs = act_shift_errors(hist, signed)
    e_da2 = errs[np.arange(len(errs)), np.asarray(act_shift, np.int64)]
    s2 = float(act_scale) ** 2
    return s2 * (e_da2 * weight_energy(w_codes, w_scale)
                 + e_a2 * weight_energy(w_codes, w_scale, True, w_shift))


def range_score(hist: np.ndarray, signed: bool, w_codes: np.ndarray) -> np.ndarray:
    """Activation code range (largest |code| seen) x weight-column range, ``(C,)``."""
    codes = np.abs(code_values(signed))
    a_rng = np.where(hist > 0, codes[None, :], 0).max(1)
    w = np.abs(np.moveaxis(np.asarray(w_codes, np.int32), 1, 0).reshape(w_codes.shape[1], -1))
    return a_rng.astype(np.float64) * w.max(1)
