"""Ratio policies on synthetic latency profiles: SLO kept, no oscillation, quick reaction."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from flexiq_tvm.runtime.policy import AdaptivePolicy, Policy, StaticPolicy, pareto_ratios

PROFILE = {"0": 2.0, "0.25": 1.7, "0.5": 1.4, "0.75": 1.2, "1": 1.0}  # ms per request


def test_static_policy_never_moves():
    p = StaticPolicy(0.5)
    assert {p.choose(q) for q in range(100)} == {0.5}
    assert isinstance(p, Policy)


def test_adaptive_picks_the_most_accurate_ratio_that_keeps_the_slo():
    p = AdaptivePolicy(PROFILE, slo_ms=10.0, headroom=1.0, relax=1.0, patience=1)
    assert p.choose(0) == 0.0  # 2 ms alone
    assert p.choose(4) == 0.0  # 5 x 2.0 = 10.0: just fits
    assert p.choose(5) == 0.5  # 6 x 1.7 = 10.2 misses, 6 x 1.4 = 8.4 fits
    assert p.choose(20) == 1.0  # nothing fits: the fastest ratio


def test_adaptive_rule_exact():
    p = AdaptivePolicy(PROFILE, slo_ms=10.0, headroom=1.0, relax=1.0, patience=1)
    for q in range(0, 12):
        r = p.choose(q)
        want = next((k for k in sorted(p.ratios) if (q + 1) * p.profile[k] <= 10.0), 1.0)
        assert r >= want  # never slower than needed (hysteresis can only keep it faster)
        assert (q + 1) * p.profile[r] <= 10.0 or r == 1.0


def test_no_oscillation_on_a_noisy_queue_and_steps_back_when_calm():
    p = AdaptivePolicy(PROFILE, slo_ms=10.0, patience=8)
    rng = np.random.default_rng(0)
    choices = [p.choose(int(q)) for q in rng.integers(3, 6, size=400)]  # around the edge
    switches = sum(a != b for a, b in pairwise(choices))
    assert switches <= 6, switches
    # calm again: back to ratio 0 within a bounded number of requests, one step at a time
    calm = [p.choose(0) for _ in range(8 * len(p.ratios))]
    assert calm[-1] == 0.0
    steps = [b for a, b in pairwise(calm) if a != b]
    assert steps == sorted(steps, reverse=True)


def test_reacts_within_one_request_to_a_burst():
    p = AdaptivePolicy(PROFILE, slo_ms=10.0)
    assert p.choose(0) == 0.0
    assert p.choose(7) == 1.0  # 8 x 1.0 = 8 <= 9 (90 % headroom); anything slower misses


def test_measurements_correct_the_profile():
    p = AdaptivePolicy(PROFILE, slo_ms=10.0, alpha=0.5)
    assert p.choose(3) == 0.0  # 4 x 2.0 = 8 <= 9
    for _ in range(10):  # the machine is twice as slow as profiled
        p.observe(0.0, 4.0)
    assert p.scale == pytest.approx(2.0, rel=0.01)
    assert p.choose(3) == 1.0  # 4 x 2 x 1.0 = 8 fits only at ratio 1


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="slo_ms"):
        AdaptivePolicy(PROFILE, slo_ms=0)
    with pytest.raises(ValueError, match="relax"):
        AdaptivePolicy(PROFILE, slo_ms=5, headroom=0.5, relax=0.8)
    with pytest.raises(ValueError, match="profile"):
        AdaptivePolicy({}, slo_ms=5)


def test_only_ratios_on_the_pareto_front_are_served():
    # 0.25 is slower than 0 and 0.75 no faster than 0.5 (as 4-bit can be on a VNNI CPU)
    profile = {"0": 2.0, "0.25": 2.1, "0.5": 1.4, "0.75": 1.39, "1": 1.0}
    assert pareto_ratios(profile) == [0.0, 0.5, 1.0]
    assert pareto_ratios(profile, min_gain=0.0) == [0.0, 0.5, 0.75, 1.0]
    assert pareto_ratios({"0": 1.0, "1": 0.99}) == [0.0]  # 1 % is not worth 4-bit
    p = AdaptivePolicy(profile, slo_ms=10.0, headroom=1.0, relax=1.0, patience=1)
    assert p.ratios == [0.0, 0.5, 1.0] and p.skipped == [0.25, 0.75]
    chosen = {p.choose(q) for q in (0, 3, 4, 5, 6, 7, 8, 20, 6, 4, 3, 1, 0)}
    assert chosen <= {0.0, 0.5, 1.0} and {0.5, 1.0} <= chosen
