"""``flexiq-tvm loadtest``: replay a fluctuating Poisson trace against static and adaptive
serving of one module, on loopback, bounded in time.

The trace is sized from what the server really sustains with this module: the capacity
``C(r)`` at ratio 0 and at the fastest ratio is measured through the HTTP path (an open-loop
burst at 1.5x the module's profile capacity, completions counted once the queue is full; the
profile alone, ``1000 / t(r)`` per batch, ignores the front end's cost, which on a small model
is most of a request's time). The base rate is ``base x C(0)``, with bursts of ``burst x C(0)``
for a ``burst_frac`` of the time (one burst per period): above INT8's capacity and below the
fastest ratio's where the two differ enough. The SLO defaults to twice the INT8 p50
measured by the server at the base rate. Each configuration (``static-0``, ``static-1``,
``adaptive``) gets a fresh server and the same arrival times, from a separate generator
process (its CPU share is reported). A request that fails (503, timeout) counts as missing the
SLO. Mean accuracy is the per-ratio accuracy averaged over the requests served.

JSON keys (DESIGN.md): ``{"slo_ms", "configs": [{"name", "p50_ms", "p99_ms",
"slo_attainment", "throughput_rps", "mean_top1"}]}``.
"""

from __future__ import annotations

import logging

import numpy as np

from .loadgen import run_in_subprocess
from .policy import AdaptivePolicy, StaticPolicy
from .server import InferenceServer, worker_profile, worker_threads

log = logging.getLogger(__name__)


def bursty_trace(duration_s: float, base_rps: float, burst_rps: float, burst_frac: float = 0.3,
                 period_s: float | None = None, seed: int = 0) -> tuple[list, list]:
    """Poisson arrival times with a piecewise-constant rate; returns (arrivals, rate steps
    ``[(t_start, rps)]``). Each period starts at the base rate and ends with a burst."""
    period = period_s or max(duration_s / 5, 2.0)
    rng = np.random.default_rng(seed)
    steps, t = [], 0.0
    while t < duration_s:
        steps.append((t, base_rps))
        steps.append((t + period * (1 - burst_frac), burst_rps))
        t += period
    arrivals = []
    for (t0, rate), nxt in zip(steps, [*steps[1:], (duration_s, 0)], strict=True):
        end = min(nxt[0], duration_s)
        t = t0
        while True:
            t += rng.exponential(1.0 / rate)
            if t >= end:
                break
            arrivals.append(t)
    return arrivals, [s for s in steps if s[0] < duration_s]


def default_burst(capacity: dict) -> float:
    """Burst rate as a multiple of the INT8 capacity: 1.4, or halfway to the fastest ratio's
    capacity when that is less than 1.4x INT8's (bursts must exceed INT8's capacity and stay
    below the fastest ratio's). ``capacity``: requests/s per ratio (text keys)."""
    gap = max(capacity.values()) / capacity["0"]
    if gap <= 1.0:
        log.warning("no ratio is faster than INT8 here: bursts at 1.4x cannot be absorbed")
        return 1.4
    return min(1.4, (1.0 + gap) / 2)


def _replay(module, policy, arrivals, x, threads=None, timeout_s=5.0) -> tuple[list, dict]:
    with InferenceServer(module, policy, max_queue=1024, timeout_s=timeout_s,
                         threads=threads) as srv:
        doc = run_in_subprocess(srv.url, arrivals, x)
    return doc["requests"], {"wall_s": doc["wall_s"], "cpu_s": doc["cpu_s"]}


def served_capacity(module, ratio: float, modelled_rps: float, x, threads=None,
                    seconds: float = 2.0, settle_s: float = 0.5) -> float:
    """Requests/s the server completes at a static ``ratio`` when saturated: an open-loop
    trace at 1.5x ``modelled_rps`` (the profile's capacity) for ``seconds``; completions
    counted after ``settle_s``, once the queue holds a backlog."""
    rate = 1.5 * modelled_rps
    arrivals, _ = bursty_trace(seconds, rate, rate, 0.0, seed=7)
    reqs, _ = _replay(module, StaticPolicy(ratio), arrivals, x, threads)
    done = sorted(r[0] + r[1] / 1e3 for r in reqs if r and r[2] == 200)
    window = [t for t in done if t >= settle_s]
    if len(window) < 2:
        return modelled_rps
    return (len(window) - 1) / (window[-1] - window[0])


def _summary(name, reqs, slo_ms, duration_s, accuracy) -> dict:
    ok = [r for r in reqs if r and r[2] == 200]
    lat = np.asarray([r[1] for r in ok]) if ok else np.asarray([np.inf])
    within = sum(1 for r in ok if r[1] <= slo_ms)
    acc = [accuracy.get(f"{float(r[3]):g}") for r in ok]
    acc = [a for a in acc if a is not None]
    return {"name": name, "requests": len(reqs), "served": len(ok),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "slo_attainment": within / max(len(reqs), 1),
            "throughput_rps": len(ok) / duration_s,
            "mean_top1": float(np.mean(acc)) if acc else None,
            "ratio_share": {f"{k:g}": float(np.mean([r[3] == k for r in ok])) for k in
                            sorted({r[3] for r in ok})}}


def run(module, accuracy: dict, duration_s: float = 30.0, slo_ms: float | None = None,
        base: float = 0.6, burst: float | None = None, burst_frac: float = 0.3, x=None,
        seed: int = 0, plot: str | None = None, threads: int | None = None) -> dict:
    """The load test as the DESIGN.md ``loadtest`` document (see the module docs).

    ``base`` and ``burst`` are multiples of the INT8 capacity. ``burst`` defaults to 1.4, or,
    where the fastest ratio's capacity is less than 1.4x INT8's, to halfway between the two
    capacities, so that bursts stay above INT8's capacity and below the fastest ratio's.
    ``threads``: the server worker's TVM pool (the profile is measured with the same)."""
    x = np.zeros(module.input_shape[1:], module.input_dtype) if x is None else np.asarray(x)
    accuracy = {f"{float(k):g}": v for k, v in accuracy.items()}  # keys: ratios or their text
    threads = worker_threads() if threads is None else threads
    profile = worker_profile(module, threads, repeat=30)
    modelled = {k: 1000.0 * module.input_shape[0] / v for k, v in profile.items()}
    fastest = max(module.ratios)
    capacity = {f"{r:g}": served_capacity(module, r, modelled[f"{r:g}"], x, threads)
                for r in sorted({0.0, fastest})}
    cap0 = capacity["0"]
    burst = default_burst(capacity) if burst is None else burst
    arrivals, steps = bursty_trace(duration_s, base * cap0, burst * cap0, burst_frac, seed=seed)
    if slo_ms is None:  # 2x the INT8 p50 at the base rate, measured through the server
        calib, _ = bursty_trace(min(4.0, duration_s / 4), base * cap0, base * cap0, 0.0,
                                seed=seed + 1)
        reqs, _ = _replay(module, StaticPolicy(0.0), calib, x, threads)
        ok = [r[1] for r in reqs if r and r[2] == 200]
        slo_ms = 2.0 * float(np.median(ok))
    doc = {"slo_ms": slo_ms, "duration_s": duration_s, "profile_ms": profile,
           "capacity_rps": capacity, "profile_capacity_rps": modelled,
           "capacity_source": "served through HTTP (open-loop saturation)",
           "server_threads": threads,
           "trace": {"kind": "bursty", "base_rps": base * cap0, "burst_rps": burst * cap0,
                     "base_x_int8": base, "burst_x_int8": burst, "burst_frac": burst_frac,
                     "requests": len(arrivals)},
           "configs": [], "timelines": {}}
    adaptive = AdaptivePolicy(profile, slo_ms)
    doc["adaptive_ratios"] = adaptive.ratios  # the Pareto front it serves
    doc["adaptive_skipped"] = adaptive.skipped
    for name, policy in (("static-0", StaticPolicy(0.0)), ("static-1", StaticPolicy(fastest)),
                         ("adaptive", adaptive)):
        reqs, gen = _replay(module, policy, arrivals, x, threads)
        s = _summary(name, reqs, slo_ms, duration_s, accuracy)
        s["generator_cpu_share"] = gen["cpu_s"] / max(gen["wall_s"], 1e-9)
        doc["configs"].append(s)
        doc["timelines"][name] = [r for r in reqs if r]
        log.info("%s: p50 %.2f ms p99 %.2f ms, SLO %.1f %%, %.0f rps, top-1 %s", name,
                 s["p50_ms"], s["p99_ms"], 100 * s["slo_attainment"], s["throughput_rps"],
                 s["mean_top1"])
    doc["rate_steps"] = steps
    if plot:
        draw(doc, plot)
    return doc


def draw(doc: dict, path: str) -> None:
    """Offered load, chosen ratio and latency over time, one column per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c["name"] for c in doc["configs"]]
    fig, axes = plt.subplots(3, len(names), figsize=(5 * len(names), 8), sharex=True,
                             squeeze=False)
    steps = doc["rate_steps"]
    ts = [s[0] for s in steps] + [doc["duration_s"]]
    rates = [s[1] for s in steps] + [steps[-1][1]]
    for j, name in enumerate(names):
        tl = np.asarray([[r[0], r[1], r[3] if r[3] is not None else np.nan, r[2]]
                         for r in doc["timelines"][name]], dtype=float)
        axes[0, j].step(ts, rates, where="post")
        axes[0, j].set_title(name)
        axes[0, j].set_ylabel("offered load (req/s)")
        ok = tl[:, 3] == 200
        axes[1, j].plot(tl[ok, 0], tl[ok, 2], ".", ms=2)
        axes[1, j].set_ylabel("ratio")
        axes[2, j].plot(tl[ok, 0], tl[ok, 1], ".", ms=2, label="served")
        axes[2, j].plot(tl[~ok, 0], np.full((~ok).sum(), doc["slo_ms"]), "rx", ms=3,
                        label="failed")
        axes[2, j].axhline(doc["slo_ms"], color="k", lw=0.8, ls="--", label="SLO")
        axes[2, j].set_yscale("log")
        axes[2, j].set_ylabel("latency (ms)")
        axes[2, j].set_xlabel("time (s)")
        axes[2, j].legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
