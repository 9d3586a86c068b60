"""Open-loop HTTP load generator (run as a separate process so it cannot starve the server).

``python -m flexiq_tvm.runtime.loadgen URL TRACE.json OUT.json``: sends one request per
arrival time of the trace (seconds from start), whatever the server's state (open loop: a
slow server does not slow the arrivals), on loopback only, and writes per request
``[t_sent, latency_ms, status, ratio]`` plus the process's own CPU time.
"""

from __future__ import annotations

import http.client
import json
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse


def run(url: str, arrivals: list[float], body: bytes, timeout: float = 10.0,
        workers: int = 64) -> dict:
    u = urlparse(url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the load generator only targets loopback, not {u.hostname}")
    local = threading.local()
    results = [None] * len(arrivals)

    def conn():
        c = getattr(local, "c", None)
        if c is None:
            c = local.c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        return c

    def send(i: int, t0: float) -> None:
        t = time.perf_counter()
        status, ratio = 0, None
        try:
            c = conn()
            c.request("POST", "/v1/infer", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            doc = json.loads(r.read())
            status = r.status
            ratio = doc.get("ratio")
        except (OSError, http.client.HTTPException, ValueError):
            local.c = None  # reconnect next time
        results[i] = [t - t0, 1e3 * (time.perf_counter() - t), status, ratio]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for i, at in enumerate(arrivals):
            delay = at - (time.perf_counter() - t0)
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, i, t0)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"requests": results, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime}


def main(argv: list[str] | None = None) -> int:
    url, trace_path, out_path = (argv or sys.argv[1:])[:3]
    with open(trace_path) as f:
        trace = json.load(f)
    doc = run(url, trace["arrivals"], json.dumps({"input": trace["input"]}).encode())
    with open(out_path, "w") as f:
        json.dump(doc, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
