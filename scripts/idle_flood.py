"""Real traffic beside hostile connections, against `flexiq-tvm serve` on a real artifact.

    .venv/bin/python scripts/idle_flood.py [--idle 2000] [--rate 200] [--seconds 8] [--json F]

Compiles ResNet-20 (ratios 0 and 1), exports it, starts the CLI server (static ratio 0,
``--max-connections`` = the idle connections + 10 for the legitimate clients) and runs three
phases of the same open-loop Poisson traffic (the project's load generator,
``flexiq_tvm.runtime.loadgen``, in a process of its own: binary bodies over keep-alive
connections it opens as it needs them) with a /healthz probe every 50 ms:

1. ``baseline``: the traffic alone;
2. ``idle``: with ``--idle`` idle connections held (the server then at its connection limit);
3. ``flood``: and new connections arriving as fast as one client process can make them, each
   expected to get 503.

Prints one line per phase and writes the figures as JSON: requests, share answered 200,
p50 / p99 latency, /healthz p50 / max, open and refused connections (the server's /metrics),
the lines the server logged during the phase, and its resident memory.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _probe(addr, stop: threading.Event, out: list) -> None:
    c = http.client.HTTPConnection(*addr, timeout=10)
    while not stop.is_set():
        t = time.perf_counter()
        c.request("GET", "/healthz")
        c.getresponse().read()
        out.append(1e3 * (time.perf_counter() - t))
        time.sleep(0.05)
    c.close()


def _flood_child(host: str, port: int, seconds: float) -> None:
    """In a process of its own (so that it does not take the traffic client's GIL): new
    connections one after another for ``seconds``, each sending a request and reading the
    answer; prints the count of each status as JSON."""
    codes: dict = {}
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
                got = s.recv(4096)
            code = got.split(b" ", 2)[1].decode() if got.startswith(b"HTTP/1.1") else "none"
        except OSError as e:
            code = type(e).__name__
        codes[code] = codes.get(code, 0) + 1
    print(json.dumps(codes), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle", type=int, default=2000, help="idle connections held")
    ap.add_argument("--rate", type=float, default=200.0, help="real requests/s")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--flood-child", nargs=3, metavar=("HOST", "PORT", "SECONDS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.flood_child:
        host, port, seconds = args.flood_child
        _flood_child(host, int(port), float(seconds))
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.idle + 512
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))

    import flexiq_tvm
    from flexiq_tvm import FlexiQConfig
    from flexiq_tvm.runtime.loadgen import run_in_subprocess
    from flexiq_tvm.runtime.loadtest import bursty_trace
    from flexiq_tvm.zoo import data, registry

    model = registry.get_model("resnet20_fmnist")
    xs, _ = data.load_fmnist("test", 1)
    cfg = FlexiQConfig(selection="static", calib_images=64, ratios=(0, 1))
    tmp = Path(tempfile.mkdtemp(prefix="flexiq-flood-"))
    art = tmp / "resnet20.flexiq"
    flexiq_tvm.compile(model, xs, data.fmnist_calibration(64), config=cfg).export(art)

    legit = 8 + 1 + 1  # the generator's connections (at most 8 at this rate), the probe and
    # the metrics reader: with the idle ones about the limit, so that the flood is refused
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / "server.log", "w+")
    cmd = [sys.executable, "-m", "flexiq_tvm.cli", "serve", str(art), "--ratio", "0",
           "--port", str(port), "--max-connections", str(args.idle + legit)]
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    srv.stdout.readline()  # "serving ... on ..."
    addr = ("127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    arrivals, _ = bursty_trace(args.seconds, args.rate, args.rate, 0.0, seed=1)  # constant
    meter = http.client.HTTPConnection(*addr, timeout=10)  # /metrics, between phases

    def metrics() -> dict:
        meter.request("GET", "/metrics")
        return json.loads(meter.getresponse().read())

    results, idle_socks = [], []
    try:
        for phase in ("baseline", "idle", "flood"):
            time.sleep(0.5)  # the last phase's connections are closed
            if phase == "idle":
                idle_socks = [socket.create_connection(addr) for _ in range(args.idle)]
                time.sleep(0.5)
            log.seek(0, os.SEEK_END)
            log_at = log.tell()
            before = metrics()["connections"]["refused"]
            stop, probe, flood = threading.Event(), [], {}
            helpers = [threading.Thread(target=_probe, args=(addr, stop, probe))]
            for t in helpers:
                t.start()
            child = None
            if phase == "flood":
                child = subprocess.Popen([sys.executable, __file__, "--flood-child", *map(
                    str, addr), str(args.seconds + 1)], stdout=subprocess.PIPE, text=True)
            reqs = run_in_subprocess(url, arrivals, xs[0])["requests"]
            if child is not None:
                flood = json.loads(child.communicate(timeout=60)[0])
            m = metrics()
            stop.set()
            for t in helpers:
                t.join()
            log.seek(log_at)
            lines = [ln for ln in log.read().splitlines() if ln.strip()]
            ok = [r[1] for r in reqs if r and r[2] == 200]
            row = {"phase": phase, "requests": len(reqs),
                   "ok_pct": 100.0 * len(ok) / max(1, len(reqs)),
                   "p50_ms": float(np.percentile(ok, 50)), "p99_ms": float(np.percentile(ok, 99)),
                   "healthz_p50_ms": float(np.median(probe)), "healthz_max_ms": float(max(probe)),
                   "open_connections": m["connections"]["open"],
                   "refused": m["connections"]["refused"] - before,
                   "flood_connections": sum(flood.values()), "flood_answers": flood,
                   "server_log_lines": len(lines), "server_rss_mib": _rss_mib(srv.pid)}
            results.append(row)
            print(f"{phase:8s}  {row['requests']:5d} req  {row['ok_pct']:5.1f} % ok  "
                  f"p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:7.2f} ms  healthz p50 "
                  f"{row['healthz_p50_ms']:5.2f} max {row['healthz_max_ms']:6.2f} ms  open "
                  f"{row['open_connections']:5d}  refused {row['refused']:5d}  "
                  f"log {row['server_log_lines']} lines  rss {row['server_rss_mib']:.0f} MiB"
                  + (f"  flood {flood}" if flood else ""),
                  flush=True)
    finally:
        for s in idle_socks:
            s.close()
        meter.close()
        srv.terminate()
        srv.wait(20)
    doc = {"idle": args.idle, "rate_rps": args.rate, "seconds": args.seconds,
           "max_connections": args.idle + legit + 2, "phases": results}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
