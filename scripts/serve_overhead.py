"""Where a served request's time goes: a constant-rate Poisson trace at one static ratio
against the HTTP server, with the worker's own timings beside the module's isolated profile.

    .venv/bin/python scripts/serve_overhead.py --rate 1200 --ratio 1 [--duration 5]

Prints one JSON document: client latency p50/p99, the module's time per call inside the
server (median, mean) and isolated (the profile the load test sizes its trace with), the
worker's idle-to-busy gap between calls (Python, queue and GIL hand-offs), and so the
sustainable rate the server can actually reach at that ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import flexiq_tvm
from flexiq_tvm.config import FlexiQConfig
from flexiq_tvm.eval import load_calibration, load_eval_data
from flexiq_tvm.runtime.loadtest import bursty_trace
from flexiq_tvm.runtime.policy import StaticPolicy
from flexiq_tvm.runtime.server import InferenceServer, worker_profile, worker_threads
from flexiq_tvm.zoo import registry


class TimedStatic(StaticPolicy):
    """A static policy that records when each call starts and ends."""

    def __init__(self, ratio: float) -> None:
        super().__init__(ratio)
        self.spans: list = []
        self.ms: list = []

    def choose(self, queue_len: int) -> float:
        self.spans.append([time.perf_counter(), None])
        return self.ratio

    def observe(self, ratio: float, latency_ms: float) -> None:
        self.spans[-1][1] = time.perf_counter()
        self.ms.append(latency_ms)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20_fmnist")
    ap.add_argument("--rate", type=float, default=1200.0, help="requests per second")
    ap.add_argument("--ratio", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="worker TVM threads")
    args = ap.parse_args()
    model = registry.get_model(args.model)
    _, xs, _ = load_eval_data(args.model, 1)
    cfg = FlexiQConfig(selection="static", calib_images=32, ratios=tuple(sorted({0.0, args.ratio})))
    cm = flexiq_tvm.compile(model, xs[:1], load_calibration(args.model, 32), config=cfg)
    threads = worker_threads() if args.threads is None else args.threads
    isolated = worker_profile(cm, threads, repeat=50)[f"{args.ratio:g}"]
    arrivals, _ = bursty_trace(args.duration, args.rate, args.rate, 0.0)
    policy = TimedStatic(args.ratio)
    with InferenceServer(cm, policy, max_queue=100_000, threads=threads) as srv, \
            tempfile.TemporaryDirectory() as tmp:
        trace, out = Path(tmp) / "trace.json", Path(tmp) / "out.json"
        trace.write_text(json.dumps({"arrivals": arrivals, "input": xs[0].tolist(),
                                     "dtype": str(xs.dtype)}))
        subprocess.run([sys.executable, "-m", "flexiq_tvm.runtime.loadgen", srv.url,
                        str(trace), str(out)], check=True)
        lat = np.asarray([r[1] for r in json.loads(out.read_text())["requests"]])
    spans = np.asarray([s for s in policy.spans if s[1] is not None])
    gaps = 1e3 * (spans[1:, 0] - spans[:-1, 1])
    per_call = float(np.mean(policy.ms) + np.median(gaps))
    print(json.dumps({
        "model": args.model, "ratio": args.ratio, "rate_rps": args.rate, "threads": threads,
        "client_p50_ms": float(np.median(lat)), "client_p99_ms": float(np.percentile(lat, 99)),
        "module_ms_isolated": isolated,
        "module_ms_in_server": {"median": float(np.median(policy.ms)),
                                "mean": float(np.mean(policy.ms))},
        "gap_between_calls_ms": {"median": float(np.median(gaps)), "mean": float(np.mean(gaps))},
        "capacity_rps": {"profile": 1000.0 / isolated, "server": 1000.0 / per_call},
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
