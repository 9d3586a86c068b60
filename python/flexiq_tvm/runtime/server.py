"""``flexiq-tvm serve``: an HTTP inference server that trades precision for latency under load.

Standard library only: an ``asyncio`` HTTP/1.1 front end (keep-alive, one event loop thread)
and one worker thread running the module, which releases the GIL while TVM computes.

* ``POST /v1/infer``: one sample shaped like the module's input without its batch axis (or
  with it, when the batch is 1), as either
  - ``Content-Type: application/json``: ``{"input": [...], "ratio": optional}``, or
  - ``Content-Type: application/octet-stream``: the sample's raw bytes, little-endian, in the
    module's input dtype, C order (no parsing: the cheap way for real clients).
  An optional ``?ratio=R`` query asks for a compiled ratio either way. The answer is JSON
  ``{"output", "ratio", "latency_ms", "queue_ms"}``, or, with ``Accept:
  application/octet-stream``, the output's raw bytes with ``X-FlexiQ-Ratio``,
  ``X-FlexiQ-Latency-Ms``, ``X-FlexiQ-Queue-Ms``, ``X-FlexiQ-Shape`` and ``X-FlexiQ-Dtype``
  headers.
* ``GET /healthz``: ``{"status": "ok"}``; ``GET /metrics``: served and rejected counts,
  latency percentiles over the recent window, queue length, ratio counts and the recent
  (time, ratio) timeline.

Requests wait in a bounded queue; a full queue answers 503 at once (never hangs), a request
not served within ``timeout_s`` answers 504. The worker takes up to the module's batch size of
queued samples (zero-padding the rest), asks the policy for a ratio given the queue length,
runs, and reports the measured time back to the policy. Bad input (size over ``max_body``,
headers over 16 KiB, not JSON, wrong size or shape, non-finite values, a ratio that was not
compiled, chunked bodies) answers 4xx with a message and never reaches the worker. Binds to
127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import queue
import socket
import threading
import time
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .policy import Policy

log = logging.getLogger(__name__)

_MAX_HEAD = 16 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            411: "Length Required", 413: "Content Too Large", 415: "Unsupported Media Type",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable", 504: "Gateway Timeout"}
_BINARY = "application/octet-stream"


def worker_threads() -> int:
    """Default TVM threads of the inference worker: every CPU this process may use but one,
    which the HTTP front end (and, in a load test, the client) needs; at least one. With all
    of them, TVM's spinning pool and the front end fight for the CPUs: on 2 vCPUs a load test
    at 0.6x INT8 capacity then queues for a second (docs/results.md, issue 6)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) - 1)


def _configure_thread(threads: int) -> None:
    """Give the calling thread a TVM pool of ``threads`` (TVM's pools are per thread)."""
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, int(threads))  # mode 1: big cores


def worker_profile(module, threads: int | None = None, repeat: int = 30) -> dict[str, float]:
    """The module's latency profile measured as a server worker with ``threads`` (default
    :func:`worker_threads`) runs it: on a thread of its own, with that thread's TVM pool."""
    out: dict = {}
    threads = worker_threads() if threads is None else threads

    def measure() -> None:
        _configure_thread(threads)
        out.update(module.profile(repeat=repeat))

    t = threading.Thread(target=measure, name="flexiq-profile")
    t.start()
    t.join()
    return out


class _Request:
    __slots__ = ("error", "fut", "loop", "ratio", "result", "t_in", "t_start", "x")

    def __init__(self, x: np.ndarray, ratio: float | None, loop, fut) -> None:
        self.x, self.ratio, self.loop, self.fut = x, ratio, loop, fut
        self.result = self.error = None
        self.t_in = time.perf_counter()
        self.t_start = None


def _settle(reqs) -> None:
    """On the event loop: wake the handlers of served requests (unless they timed out)."""
    for r in reqs:
        if not r.fut.done():
            r.fut.set_result(None)


class InferenceServer:
    """The server around a :class:`~flexiq_tvm.runtime.FlexiQModule` and a policy.

    ``start()`` / ``stop()`` (or a ``with`` block); ``url`` once constructed (the socket is
    bound at once, so ``port=0`` picks a free port). ``threads``: the worker's TVM threads
    (default :func:`worker_threads`: every CPU but one, left to the front end).
    """

    def __init__(self, module, policy: Policy, host: str = "127.0.0.1", port: int = 0,
                 max_queue: int = 64, max_body: int = 8 * 2**20, timeout_s: float = 10.0,
                 window: int = 2000, threads: int | None = None) -> None:
        self.module, self.policy = module, policy
        self.batch = module.input_shape[0]
        self.sample_shape = tuple(module.input_shape[1:])
        self.dtype = np.dtype(module.input_dtype).newbyteorder("<")
        self.sample_bytes = int(np.prod(self.sample_shape)) * self.dtype.itemsize
        self.max_body, self.timeout_s = int(max_body), float(timeout_s)
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads}: must be at least 1")
        self.threads = worker_threads() if threads is None else int(threads)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lat = collections.deque(maxlen=window)
        self._timeline = collections.deque(maxlen=window)
        self._ratio_counts: collections.Counter = collections.Counter()
        self._served = self._rejected = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=1024)
        self._address = self._sock.getsockname()[:2]
        self._loop = asyncio.new_event_loop()
        self._writers: set = set()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        host, port = self._address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def start(self) -> InferenceServer:
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(asyncio.start_server(
                self._connection, sock=self._sock, limit=_MAX_HEAD))
            ready.set()
            self._loop.run_forever()

        self._threads = [threading.Thread(target=self._worker, daemon=True, name="flexiq-worker"),
                         threading.Thread(target=serve, daemon=True, name="flexiq-http")]
        for t in self._threads:
            t.start()
        ready.wait(10)
        log.info("serving on %s (batch %d, sample %s)", self.url, self.batch, self.sample_shape)
        return self

    def stop(self) -> None:
        """Stop accepting, answer what is still queued with 503, close connections, join."""
        self._stop.set()
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        for t in self._threads:
            t.join(timeout=10)
        self._sock.close()
        if not self._loop.is_running():
            self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        left = []
        while True:
            try:
                left.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for r in left:
            r.error = (503, "server shutting down")
        _settle(left)
        await asyncio.sleep(0.05)  # let their handlers answer
        for w in list(self._writers):
            w.close()
        await asyncio.sleep(0.01)  # their handlers see the end of the stream and finish

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ worker
    def _worker(self) -> None:
        _configure_thread(self.threads)
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
            -(-self._queue.qsize() // self.batch))  # runs waiting behind this one
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
            self._wake(reqs)
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
        self._wake(reqs)

    def _wake(self, reqs) -> None:
        try:
            reqs[0].loop.call_soon_threadsafe(_settle, reqs)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    # ------------------------------------------------------------------ requests
    def parse(self, body: bytes) -> tuple[np.ndarray, float | None]:
        """Input array and ratio of a JSON request body, or ``ValueError`` with what is wrong."""
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
        return self._checked(x.reshape(self.sample_shape)), self._ratio(doc.get("ratio"))

    def parse_binary(self, body: bytes, ratio=None) -> tuple[np.ndarray, float | None]:
        """Input array of a raw (little-endian, C order) body, or ``ValueError``."""
        if len(body) != self.sample_bytes:
            raise ValueError(f"body has {len(body)} bytes; expected {self.sample_bytes} "
                             f"({self.dtype.name} sample of shape {self.sample_shape})")
        x = np.frombuffer(body, self.dtype).astype(self.module.input_dtype, copy=False)
        return self._checked(x.reshape(self.sample_shape)), self._ratio(ratio)

    @staticmethod
    def _checked(x: np.ndarray) -> np.ndarray:
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise ValueError("input contains NaN or infinity")
        return x

    def _ratio(self, ratio) -> float | None:
        if ratio is None:
            return None
        try:
            ratio = float(ratio)
        except (TypeError, ValueError):
            raise ValueError(f"ratio {ratio!r} is not a number") from None
        if ratio not in self.module.ratios:
            raise ValueError(f"ratio {ratio} was not compiled; compiled ratios: "
                             f"{list(self.module.ratios)}")
        return ratio

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

    # ------------------------------------------------------------------ HTTP
    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while not self._stop.is_set():
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break  # the client closed the connection
                except asyncio.LimitOverrunError:
                    await self._send(writer, 431, {"error": f"headers over {_MAX_HEAD} bytes"},
                                     close=True)
                    break
                try:
                    method, target, version, headers = _head(head)
                except ValueError as e:
                    await self._send(writer, 400, {"error": str(e)}, close=True)
                    break
                # HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 closes it
                keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
                if not await self._respond(method, target, headers, reader, writer, keep):
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _respond(self, method, target, headers, reader, writer, keep) -> bool:
        """Answer one request; False when the connection must close."""
        path, _, query = target.partition("?")
        if method == "GET":
            if path == "/healthz":
                return await self._send(writer, 200, {"status": "ok"}, close=not keep)
            if path == "/metrics":
                return await self._send(writer, 200, self.metrics(), close=not keep)
        if path not in ("/healthz", "/metrics", "/v1/infer"):
            return await self._send(writer, 404, {"error": f"no such endpoint {path}"},
                                    close=True)
        if method != "POST" or path != "/v1/infer":
            return await self._send(writer, 405, {"error": f"{method} {path} not allowed"},
                                    close=True)
        length = headers.get("content-length")
        if "transfer-encoding" in headers or length is None or not length.isdigit():
            return await self._send(writer, 411, {"error": "Content-Length required"},
                                    close=True)
        if int(length) > self.max_body:  # do not read a body we refuse
            return await self._send(writer, 413, {"error": f"body over {self.max_body} bytes"},
                                    close=True)
        body = await reader.readexactly(int(length))
        ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        try:
            qratio = parse_qs(urlsplit(target).query).get("ratio", [None])[-1] if query else None
            if ctype == _BINARY:
                x, ratio = self.parse_binary(body, qratio)
            elif ctype in ("application/json", "text/plain", ""):
                x, ratio = self.parse(body)
                ratio = ratio if qratio is None else self._ratio(qratio)
            else:
                return await self._send(writer, 415, {
                    "error": f"Content-Type {ctype}: send application/json or {_BINARY}"},
                    close=not keep)
        except ValueError as e:
            return await self._send(writer, 400, {"error": str(e)}, close=not keep)
        fut = self._loop.create_future()
        req = _Request(x, ratio, self._loop, fut)
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            with self._lock:
                self._rejected += 1
            return await self._send(writer, 503, {
                "error": "overloaded: request queue full, retry later"}, close=not keep)
        timer = self._loop.call_later(self.timeout_s, _settle, (req,))
        await fut
        timer.cancel()
        if req.error is not None:
            return await self._send(writer, req.error[0], {"error": req.error[1]},
                                    close=not keep)
        if req.result is None:
            return await self._send(writer, 504, {
                "error": f"not served within {self.timeout_s} s"}, close=not keep)
        out, r, ms = req.result
        queue_ms = 1e3 * (req.t_start - req.t_in)
        if _BINARY in headers.get("accept", ""):
            out = np.ascontiguousarray(out)
            extra = {"X-FlexiQ-Ratio": f"{r:g}", "X-FlexiQ-Latency-Ms": f"{ms:.4f}",
                     "X-FlexiQ-Queue-Ms": f"{queue_ms:.4f}",
                     "X-FlexiQ-Shape": ",".join(map(str, out.shape)),
                     "X-FlexiQ-Dtype": out.dtype.newbyteorder("<").str}
            return await self._send(writer, 200, out.astype(out.dtype.newbyteorder("<")).tobytes(),
                                    close=not keep, ctype=_BINARY, extra=extra)
        return await self._send(writer, 200, {"output": np.asarray(out).tolist(), "ratio": r,
                                              "latency_ms": ms, "queue_ms": queue_ms},
                                close=not keep)

    @staticmethod
    async def _send(writer, code: int, doc, close: bool = False,
                    ctype: str = "application/json", extra: dict | None = None) -> bool:
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        lines = [f"HTTP/1.1 {code} {_REASONS.get(code, '')}", f"Content-Type: {ctype}",
                 f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
        if close:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        return not close


def _head(raw: bytes) -> tuple[str, str, str, dict]:
    """Request line and headers (names lowercased) of an HTTP/1.x request head."""
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise ValueError("undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"malformed request line {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"malformed header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], parts[2], headers
