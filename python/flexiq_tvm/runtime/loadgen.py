"""Open-loop HTTP load generator (run as a separate process so it cannot starve the server).

``python -m flexiq_tvm.runtime.loadgen URL TRACE.json OUT.json``: sends one request per
arrival time of the trace (seconds from start), whatever the server's state (open loop: a
slow server does not slow the arrivals), on loopback only, and writes per request
``[t_sent, latency_ms, status, ratio]`` plus the process's own CPU time.

One ``asyncio`` loop, keep-alive connections (a request takes an idle one or opens another),
and binary bodies both ways (``application/octet-stream``), so the generator stays light.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from urllib.parse import urlparse

import numpy as np


async def _replay(host: str, port: int, arrivals: list[float], body: bytes,
                  timeout: float) -> tuple[list, float]:
    request = (f"POST /v1/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
               "Content-Type: application/octet-stream\r\nAccept: application/octet-stream\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    idle: list = []
    results: list = [None] * len(arrivals)

    async def exchange(conn) -> tuple[int, float | None]:
        reader, writer = conn
        writer.write(request)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split(" ")[1])
        fields = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
        await reader.readexactly(int(fields.get("Content-Length", 0)))
        ratio = fields.get("X-FlexiQ-Ratio")
        if fields.get("Connection", "").lower() == "close":
            writer.close()
        else:
            idle.append(conn)
        return status, None if ratio is None else float(ratio)

    async def send(i: int, t0: float) -> None:
        t = time.perf_counter()
        status, ratio, conn = 0, None, None
        try:
            conn = idle.pop() if idle else await asyncio.open_connection(host, port)
            status, ratio = await asyncio.wait_for(exchange(conn), timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            if conn is not None:  # counted as failed (status 0); the connection is dropped
                conn[1].close()
        results[i] = [t - t0, 1e3 * (time.perf_counter() - t), status, ratio]

    tasks = []
    t0 = time.perf_counter()
    for i, at in enumerate(arrivals):
        delay = at - (time.perf_counter() - t0)
        # the loop's timers have ~1 ms resolution: sleep only when the next arrival is later
        await asyncio.sleep(delay if delay > 5e-4 else 0)
        tasks.append(asyncio.ensure_future(send(i, t0)))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    for _, writer in idle:
        writer.close()
    return results, wall


def run(url: str, arrivals: list[float], sample: np.ndarray, timeout: float = 10.0) -> dict:
    u = urlparse(url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the load generator only targets loopback, not {u.hostname}")
    body = np.ascontiguousarray(sample).astype(sample.dtype.newbyteorder("<")).tobytes()
    results, wall = asyncio.run(_replay(u.hostname, u.port, arrivals, body, timeout))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"requests": results, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime}


def run_in_subprocess(url: str, arrivals: list[float], sample: np.ndarray) -> dict:
    """:func:`run` in a process of its own (``python -m flexiq_tvm.runtime.loadgen``), so that
    the generator does not share a GIL with the caller: its document (``requests``,
    ``wall_s``, ``cpu_s``)."""
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        trace, out = Path(tmp) / "trace.json", Path(tmp) / "out.json"
        trace.write_text(json.dumps({"arrivals": list(arrivals), "input": sample.tolist(),
                                     "dtype": str(sample.dtype)}))
        subprocess.run([sys.executable, "-m", "flexiq_tvm.runtime.loadgen", url, str(trace),
                        str(out)], check=True, timeout=max(arrivals, default=0) + 120)
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    url, trace_path, out_path = (argv or sys.argv[1:])[:3]
    with open(trace_path) as f:
        trace = json.load(f)
    sample = np.asarray(trace["input"], dtype=trace.get("dtype", "float32"))
    doc = run(url, trace["arrivals"], sample)
    with open(out_path, "w") as f:
        json.dump(doc, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
