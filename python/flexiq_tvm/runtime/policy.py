"""Ratio policies: which low-bit ratio to run the next request (or batch) at.

A policy sees the queue and the latencies actually measured, and answers with a compiled
ratio. Two are provided; any object with ``choose(queue_len) -> ratio`` and
``observe(ratio, latency_ms)`` plugs into the server (subclass :class:`Policy`).

* :class:`StaticPolicy`: always the same ratio.
* :class:`AdaptivePolicy`: the most accurate (lowest) ratio whose *predicted* latency keeps the
  SLO. Prediction: a request waits for the ``queue_len`` requests ahead of it and then runs,
  so ``(queue_len + 1) * t(r)``, where ``t(r)`` is the module's latency profile at ratio ``r``
  (measured at export) times a correction factor tracking recent measurements (an
  exponential moving average of measured / profiled time, so a slower or busier machine is
  seen within a few requests).

  Hysteresis keeps it from oscillating on a noisy queue: moving to a *faster* ratio happens at
  once (the SLO is at stake), moving back to a *more accurate* one only after the lower ratio
  has been predicted safe, with a margin (``relax``, e.g. 80 % of the budget), for
  ``patience`` consecutive decisions.

  It serves only the ratios on the latency / accuracy Pareto front (:func:`pareto_ratios`): a
  ratio that is not at least ``min_gain`` faster than every more accurate one buys nothing
  (on a VNNI CPU, 4-bit often does not pay on small layers) and is skipped.
"""

from __future__ import annotations

import threading


class Policy:
    """Interface: ``choose(queue_len)`` before a run, ``observe(ratio, ms)`` after it."""

    def choose(self, queue_len: int) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def observe(self, ratio: float, latency_ms: float) -> None:
        """Record a measured service time (default: ignored)."""


class StaticPolicy(Policy):
    """Always ``ratio``."""

    def __init__(self, ratio: float) -> None:
        self.ratio = float(ratio)

    def choose(self, queue_len: int) -> float:
        return self.ratio


def pareto_ratios(profile: dict, min_gain: float = 0.03) -> list[float]:
    """The ratios worth serving, most accurate first. Walking up from ratio 0, a ratio is kept
    when its latency is below ``(1 - min_gain)`` times that of every ratio kept before it.
    Accuracy is taken as falling with the ratio: the channel sets are nested, so a higher
    ratio runs a superset of the lower one's channels in 4-bit (measured top-1 differences of
    a tenth of a point between neighbours are sampling noise, not an order). Ratio 0 (the
    lowest) is always kept."""
    lat = {float(k): float(v) for k, v in profile.items()}
    kept: list[float] = []
    for r in sorted(lat):
        if not kept or lat[r] < (1.0 - min_gain) * min(lat[k] for k in kept):
            kept.append(r)
    return kept


class AdaptivePolicy(Policy):
    """Lowest ratio predicted to keep the SLO, with hysteresis (see the module docs).

    Parameters
    ----------
    profile : dict
        Latency per ratio in ms (keys: ratios as floats or their text, e.g. an artifact's
        ``metadata["profile_ms"]``).
    slo_ms : float
        The latency target of a request (queueing included).
    headroom : float
        Fraction of the SLO a choice may use (safety margin for jitter).
    relax : float
        Fraction of the SLO under which a more accurate ratio must be predicted before the
        policy steps back to it.
    patience : int
        Consecutive such predictions needed to step back.
    alpha : float
        Weight of a new measurement in the correction factor's moving average.
    min_gain : float
        Speed-up a less accurate ratio must bring to be served (see :func:`pareto_ratios`);
        the ratios left out are in ``skipped``.
    """

    def __init__(self, profile: dict, slo_ms: float, headroom: float = 0.9, relax: float = 0.75,
                 patience: int = 8, alpha: float = 0.2, min_gain: float = 0.03) -> None:
        if slo_ms <= 0:
            raise ValueError(f"slo_ms={slo_ms}: must be positive")
        if not 0 < relax <= headroom <= 1:
            raise ValueError("need 0 < relax <= headroom <= 1")
        if not profile:
            raise ValueError("an adaptive policy needs a latency profile")
        self.profile = {float(k): float(v) for k, v in profile.items()}
        if any(v <= 0 for v in self.profile.values()):
            raise ValueError("profile latencies must be positive")
        self.ratios = pareto_ratios(self.profile, min_gain)  # most accurate first
        self.skipped = sorted(set(self.profile) - set(self.ratios))
        self.slo_ms, self.headroom, self.relax = float(slo_ms), headroom, relax
        self.patience, self.alpha = int(patience), float(alpha)
        self.scale = 1.0  # measured / profiled, moving average
        self.current = self.ratios[0]
        self._calm = 0
        self._lock = threading.Lock()

    def predicted_ms(self, ratio: float, queue_len: int) -> float:
        return (max(int(queue_len), 0) + 1) * self.profile[ratio] * self.scale

    def _lowest_within(self, queue_len: int, budget: float) -> float | None:
        for r in self.ratios:
            if self.predicted_ms(r, queue_len) <= budget:
                return r
        return None

    def choose(self, queue_len: int) -> float:
        with self._lock:
            fits = self._lowest_within(queue_len, self.headroom * self.slo_ms)
            if fits is None:  # nothing keeps the SLO: the fastest ratio limits the damage
                fits = min(self.ratios, key=lambda r: self.profile[r])
            cur = self.ratios.index(self.current)
            if self.ratios.index(fits) > cur:  # need more speed: move now
                self.current, self._calm = fits, 0
            elif self.ratios.index(fits) < cur:  # could be more accurate: only when calm
                calm = self._lowest_within(queue_len, self.relax * self.slo_ms)
                if calm is not None and self.ratios.index(calm) < cur:
                    self._calm += 1
                    if self._calm >= self.patience:
                        self.current = self.ratios[cur - 1]  # one step at a time
                        self._calm = 0
                else:
                    self._calm = 0
            else:
                self._calm = 0
            return self.current

    def observe(self, ratio: float, latency_ms: float) -> None:
        r = float(ratio)
        if r not in self.profile or latency_ms <= 0:
            return
        with self._lock:
            self.scale += self.alpha * (latency_ms / self.profile[r] - self.scale)
