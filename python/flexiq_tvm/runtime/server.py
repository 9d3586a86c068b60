"""``flexiq-tvm serve``: an HTTP inference server that trades precision for latency under load.

Standard library only (``http.server``), one worker thread running the module:

* ``POST /v1/infer``: JSON ``{"input": [...], "ratio": optional}``, one sample shaped like the
  module's input without its batch axis (or with it, when the batch is 1). Answers
  ``{"output", "ratio", "latency_ms", "queue_ms"}``.
* ``GET /healthz``: ``{"status": "ok"}``; ``GET /metrics``: served and rejected counts,
  latency percentiles over the recent window, queue length, ratio counts and the recent
  (time, ratio) timeline.

Requests wait in a bounded queue; a full queue answers 503 at once (never hangs), a request
not served within ``timeout_s`` answers 504. The worker takes up to the module's batch size of
queued samples (zero-padding the rest), asks the policy for a ratio given the queue length,
runs, and reports the measured time back to the policy. Bad input (size over ``max_body``,
not JSON, wrong shape, non-finite values, a ratio that was not compiled) answers 4xx with a
message and never reaches the worker. Binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from .policy import Policy

log = logging.getLogger(__name__)


class _Request:
    __slots__ = ("done", "error", "ratio", "result", "t_in", "t_start", "x")

    def __init__(self, x: np.ndarray, ratio: float | None) -> None:
        self.x, self.ratio = x, ratio
        self.done = threading.Event()
        self.result = self.error = None
        self.t_in = time.perf_counter()
        self.t_start = None


class InferenceServer:
    """The server around a :class:`~flexiq_tvm.runtime.FlexiQModule` and a policy.

    ``start()`` / ``stop()`` (or a ``with`` block); ``url`` once started.
    """

    def __init__(self, module, policy: Policy, host: str = "127.0.0.1", port: int = 0,
                 max_queue: int = 64, max_body: int = 8 * 2**20, timeout_s: float = 10.0,
                 window: int = 2000) -> None:
        self.module, self.policy = module, policy
        self.batch = module.input_shape[0]
        self.sample_shape = tuple(module.input_shape[1:])
        self.max_body, self.timeout_s = int(max_body), float(timeout_s)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lat = collections.deque(maxlen=window)
        self._timeline = collections.deque(maxlen=window)
        self._ratio_counts: collections.Counter = collections.Counter()
        self._served = self._rejected = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> InferenceServer:
        self._threads = [threading.Thread(target=self._worker, daemon=True, name="flexiq-worker"),
                         threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                          name="flexiq-http")]
        for t in self._threads:
            t.start()
        log.info("serving on %s (batch %d, sample %s)", self.url, self.batch, self.sample_shape)
        return self

    def stop(self) -> None:
        """Stop accepting, answer what is still queued with 503, and join the threads."""
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                break
            req.error = (503, "server shutting down")
            req.done.set()
        for t in self._threads:
            t.join(timeout=10)

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ worker
    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            reqs = [first]
            while len(reqs) < self.batch:  # batch what is already waiting (no added delay)
                try:
                    reqs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._run(reqs)

    def _run(self, reqs: list[_Request]) -> None:
        asked = {r.ratio for r in reqs if r.ratio is not None}
        ratio = asked.pop() if len(asked) == 1 and len(reqs) == 1 else self.policy.choose(
            self._queue.qsize())
        if self.batch > 1:
            x = np.zeros(self.module.input_shape, self.module.input_dtype)
            for i, r in enumerate(reqs):
                x[i] = r.x
        else:
            x = reqs[0].x.reshape(self.module.input_shape)
        t = time.perf_counter()
        for r in reqs:
            r.t_start = t
        try:
            out = self.module(x, ratio=ratio)
        except Exception as e:
            log.exception("inference failed")
            for r in reqs:
                r.error = (500, f"inference failed: {e}")
                r.done.set()
            return
        ms = 1e3 * (time.perf_counter() - t)
        self.policy.observe(ratio, ms)
        now = time.perf_counter()
        with self._lock:
            self._ratio_counts[ratio] += len(reqs)
            self._timeline.append((round(now - self._t0, 4), ratio))
            for i, r in enumerate(reqs):
                r.result = (out[i], ratio, ms)  # one sample, without the batch axis
                self._lat.append(1e3 * (now - r.t_in))
                self._served += 1
        for r in reqs:
            r.done.set()

    # ------------------------------------------------------------------ requests
    def submit(self, x: np.ndarray, ratio: float | None = None) -> _Request:
        """Queue one sample (checked); raises ``queue.Full`` when overloaded."""
        req = _Request(x, ratio)
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            with self._lock:
                self._rejected += 1
            raise
        return req

    def parse(self, body: bytes) -> tuple[np.ndarray, float | None]:
        """Input array and ratio of a request body, or ``ValueError`` with what is wrong."""
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"body is not JSON: {e}") from None
        if not isinstance(doc, dict) or "input" not in doc:
            raise ValueError('body must be a JSON object with an "input" array')
        try:
            x = np.asarray(doc["input"], dtype=self.module.input_dtype)
        except (TypeError, ValueError):
            raise ValueError('"input" must be a (nested) array of numbers') from None
        shapes = {self.sample_shape}
        if self.batch == 1:  # a batch-1 module also takes its full input shape
            shapes.add(tuple(self.module.input_shape))
        if x.shape not in shapes:
            raise ValueError(f"input shape {x.shape}; expected {self.sample_shape}")
        if not np.isfinite(x).all():
            raise ValueError("input contains NaN or infinity")
        ratio = doc.get("ratio")
        if ratio is not None:
            try:
                ratio = float(ratio)
            except (TypeError, ValueError):
                raise ValueError(f"ratio {doc.get('ratio')!r} is not a number") from None
            if ratio not in self.module.ratios:
                raise ValueError(f"ratio {ratio} was not compiled; compiled ratios: "
                                 f"{list(self.module.ratios)}")
        return x.reshape(self.sample_shape), ratio

    def metrics(self) -> dict:
        with self._lock:
            lat = np.asarray(self._lat) if self._lat else None
            return {
                "served": self._served, "rejected": self._rejected,
                "queue_len": self._queue.qsize(),
                "latency_ms": None if lat is None else {
                    p: float(np.percentile(lat, q)) for p, q in (("p50", 50), ("p95", 95),
                                                                 ("p99", 99))},
                "ratio_counts": {f"{k:g}": v for k, v in sorted(self._ratio_counts.items())},
                "ratio_timeline": list(self._timeline)[-200:],
            }

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args) -> None:  # route through logging, not stderr
                log.debug("%s " + fmt, self.address_string(), *args)

            def _send(self, code: int, doc: dict) -> None:
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    self._send(200, {"status": "ok"})
                elif self.path == "/metrics":
                    self._send(200, server.metrics())
                else:
                    self._send(404, {"error": f"no such endpoint {self.path}"})

            def do_POST(self) -> None:
                if self.path != "/v1/infer":
                    self._send(404, {"error": f"no such endpoint {self.path}"})
                    return
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    self._send(411, {"error": "Content-Length required"})
                    return
                if int(length) > server.max_body:
                    self.close_connection = True  # do not read a body we refuse
                    self._send(413, {"error": f"body over {server.max_body} bytes"})
                    return
                try:
                    x, ratio = server.parse(self.rfile.read(int(length)))
                except ValueError as e:
                    self._send(400, {"error": str(e)})
                    return
                try:
                    req = server.submit(x, ratio)
                except queue.Full:
                    self._send(503, {"error": "overloaded: request queue full, retry later"})
                    return
                if not req.done.wait(server.timeout_s):
                    self._send(504, {"error": f"not served within {server.timeout_s} s"})
                    return
                if req.error is not None:
                    self._send(req.error[0], {"error": req.error[1]})
                    return
                out, r, ms = req.result
                self._send(200, {"output": np.asarray(out).tolist(), "ratio": r,
                                 "latency_ms": ms,
                                 "queue_ms": 1e3 * (req.t_start - req.t_in)})

        return Handler
