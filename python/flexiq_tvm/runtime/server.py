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

Limits against hostile or broken clients (docs/http.md lists them with their flags): at most
``max_connections`` open connections (beyond it a new client gets 503 and is closed; the
refusals are logged once per interval, not per event); a connection idle longer than
``idle_timeout`` is closed, a request head not complete ``header_timeout`` after its first
byte or a body not complete ``body_timeout`` after its head answers 408 and closes; bodies
are reserved against ``max_inflight_bytes`` in all before they are read (503 without reading
when the budget is spent), JSON bodies are capped at ``max_json`` (sized from the sample, so
that decoding one never holds the event loop long: large inputs go as binary); a
Content-Length that is not plain ASCII digits answers 400, and any request the handler cannot
parse answers 400 (500 for our own bugs, logged), never silence.
"""

from __future__ import annotations

import asyncio
import collections
import errno
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
_MAX_LENGTH_DIGITS = 12  # a Content-Length longer than this is refused before int()
_LOG_INTERVAL_S = 10.0  # repeated server-side events are logged at most once per this
_REFUSE_SLOTS = 64  # connections beyond the limit being answered 503 at once; more wait in
#                     the kernel's backlog (what bounds the open files under a flood)
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
            415: "Unsupported Media Type",
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


def default_max_connections(reserve: int = 128) -> int:
    """Open connections allowed by default: what the open-files limit leaves after the files
    this process already holds and ``reserve`` more (artifacts, logs, TVM), at most 4096 and
    at least 8. Keeping under the limit is what keeps ``accept()`` from failing with EMFILE."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        return 1024
    if soft == resource.RLIM_INFINITY:
        return 4096
    try:
        held = len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - no procfs
        held = 64
    return max(8, min(4096, soft - held - reserve))


def raise_open_files_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit (what servers do at start;
    the soft default is often 1024). Returns the soft limit now in force."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, 65536) if soft != resource.RLIM_INFINITY else soft
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX / not allowed
        return -1


class _Throttled:
    """Log a repeated event at most once per ``interval`` seconds: the first occurrence at
    once, later ones as one line with their count."""

    def __init__(self, interval: float = _LOG_INTERVAL_S) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._count: collections.Counter = collections.Counter()

    def __call__(self, key: str, level: int, msg: str, *args, exc_info=None) -> None:
        now = time.monotonic()
        self._count[key] += 1
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return
        n, self._count[key] = self._count[key], 0
        self._last[key] = now
        if last is not None and n > 1:
            msg += f" ({n} times in the last {now - last:.0f} s)"
        log.log(level, msg, *args, exc_info=exc_info)


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
                 window: int = 2000, threads: int | None = None,
                 max_connections: int | None = None, idle_timeout: float = 30.0,
                 header_timeout: float = 10.0, body_timeout: float = 30.0,
                 max_inflight_bytes: int = 64 * 2**20, max_json: int | None = None,
                 backlog: int = 1024) -> None:
        n_out = getattr(module, "num_outputs", 1)
        if n_out != 1:
            raise ValueError(f"this module has {n_out} outputs; the server answers with one "
                             "(serve a model with a single output)")
        self.module, self.policy = module, policy
        self.batch = module.input_shape[0]
        self.sample_shape = tuple(module.input_shape[1:])
        self.dtype = np.dtype(module.input_dtype).newbyteorder("<")
        self.sample_bytes = int(np.prod(self.sample_shape)) * self.dtype.itemsize
        self.max_body, self.timeout_s = int(max_body), float(timeout_s)
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads}: must be at least 1")
        self.threads = worker_threads() if threads is None else int(threads)
        self.max_connections = (default_max_connections() if max_connections is None
                                else int(max_connections))
        # a JSON sample needs at most ~25 characters per number (float repr, comma, space):
        # 48 leaves room for pretty-printing; decoding runs ~20 ms/MiB on the event loop
        numbers = int(np.prod(self.sample_shape))
        self.max_json = (min(self.max_body, 64 * 1024 + 48 * numbers) if max_json is None
                         else int(max_json))
        self.idle_timeout, self.header_timeout = float(idle_timeout), float(header_timeout)
        self.body_timeout = float(body_timeout)
        self.max_inflight_bytes = int(max_inflight_bytes)
        for name in ("max_connections", "max_json", "max_inflight_bytes", "idle_timeout",
                     "header_timeout", "body_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be positive")
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._lat = collections.deque(maxlen=window)
        self._timeline = collections.deque(maxlen=window)
        self._ratio_counts: collections.Counter = collections.Counter()
        self._served = self._rejected = 0
        self._open = self._refused = self._timed_out = self._errors = 0
        self._inflight = self._busy_refused = self._refusing = 0
        self._accepting = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._throttled = _Throttled()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=int(backlog))
        self._address = self._sock.getsockname()[:2]
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_error)
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
            # our own accept loop, not asyncio.start_server's: that one accepts up to a
            # backlog of connections per wake-up before any limit can be checked (a burst
            # then runs out of open files), and listens again with its own backlog of 100
            self._sock.setblocking(False)
            self._resume_accept()
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
        self._pause_accept()
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
        except RecursionError:
            raise ValueError("body is JSON nested too deep") from None
        except ValueError as e:  # not JSON, not UTF-8, an integer of too many digits
            raise ValueError(f"body is not JSON: {e}") from None
        if not isinstance(doc, dict) or "input" not in doc:
            raise ValueError('body must be a JSON object with an "input" array')
        try:
            x = np.asarray(doc["input"], dtype=self.module.input_dtype)
        except (TypeError, ValueError, OverflowError, RecursionError):
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
                "connections": {"open": self._open, "limit": self.max_connections,
                                "refused": self._refused, "timed_out": self._timed_out},
                "inflight_body_bytes": self._inflight,
                "inflight_body_limit": self.max_inflight_bytes,
                "busy_refused": self._busy_refused, "errors": self._errors,
                "latency_ms": None if lat is None else {
                    p: float(np.percentile(lat, q)) for p, q in (("p50", 50), ("p95", 95),
                                                                 ("p99", 99))},
                "ratio_counts": {f"{k:g}": v for k, v in sorted(self._ratio_counts.items())},
                "ratio_timeline": list(self._timeline)[-200:],
            }

    # ------------------------------------------------------------------ errors
    def _loop_error(self, loop, context) -> None:
        """asyncio's own errors (an ``accept()`` out of open files, a callback that raised):
        logged once per interval, never once per event (a flood gave millions of lines)."""
        exc = context.get("exception")
        if self._stop.is_set():  # e.g. an accept retry that fires after the socket closed
            log.debug("event loop while stopping: %s", context.get("message"))
            return
        self._throttled(f"loop:{context.get('message')}:{type(exc).__name__}", logging.ERROR,
                        "event loop: %s%s", context.get("message", "error"),
                        f": {exc!r}" if exc is not None else "")

    def _count_timeout(self) -> None:
        with self._lock:
            self._timed_out += 1

    # ------------------------------------------------------------------ accepting
    def _has_room(self) -> bool:
        """Whether another connection may be accepted: served or being refused, at most
        ``max_connections`` + :data:`_REFUSE_SLOTS` sockets are open."""
        return self._open + self._refusing < self.max_connections + _REFUSE_SLOTS

    def _resume_accept(self) -> None:
        if not self._accepting and not self._stop.is_set() and self._has_room():
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._accepting = True

    def _pause_accept(self) -> None:
        if self._accepting:
            self._loop.remove_reader(self._sock.fileno())
            self._accepting = False

    def _accept(self) -> None:
        """On the loop, when the listening socket is readable: accept a few connections, each
        counted at once as served (under ``max_connections``) or refused (503); once the
        refusals in progress fill their slots too, stop accepting until one closes."""
        for _ in range(32):  # a few per wake-up: the loop serves the open connections too
            if not self._has_room():
                self._pause_accept()
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:  # out of open files (or memory): wait, do not spin
                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                self._throttled("accept", logging.ERROR, "accept() failed: %s; new "
                                "connections wait 0.5 s (raise the open-files limit or "
                                "lower --max-connections)", e)
                self._pause_accept()
                self._loop.call_later(0.5, self._resume_accept)
                return
            refuse = self._open >= self.max_connections
            with self._lock:
                self._refused += refuse
                self._refusing += refuse
                self._open += not refuse
            self._loop.create_task(self._handle(conn, refuse))

    async def _handle(self, conn: socket.socket, refuse: bool) -> None:
        try:
            conn.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=conn, limit=_MAX_HEAD)
        except OSError:
            conn.close()
        else:
            await (self._refuse(reader, writer) if refuse else self._connection(reader, writer))
        finally:
            with self._lock:
                self._refusing -= refuse
                self._open -= not refuse
            self._resume_accept()

    # ------------------------------------------------------------------ HTTP
    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while not self._stop.is_set():
                head = await self._read_head(reader, writer)
                if head is None:
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
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass  # the client went away, or stopped reading our answer
        except Exception:  # a bug of ours: answer 500 and say so in the log (throttled)
            with self._lock:
                self._errors += 1
            self._throttled("handler", logging.ERROR, "request handler failed", exc_info=True)
            try:
                await self._send(writer, 500, {"error": "internal server error"}, close=True)
            except Exception:  # the connection is beyond saving
                pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _refuse(self, reader, writer) -> None:
        """Beyond ``max_connections``: 503 and close, without reading a request. What the
        client already sent is drained for a moment first, so that closing does not reset the
        answer away."""
        self._throttled("refused", logging.WARNING,
                        "connection limit (%d) reached: new clients get 503",
                        self.max_connections)
        try:
            writer.write(_answer(503, {"error": f"too many connections (limit "
                                                f"{self.max_connections}); retry later"},
                                 close=True))
            await asyncio.wait_for(writer.drain(), 0.5)
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.wait_for(reader.read(65536), 0.1)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _read_head(self, reader, writer) -> bytes | None:
        """The next request head, or None when the connection is to close: the client closed
        it; it sent nothing for ``idle_timeout`` (closed silently: a keep-alive client may be
        about to reuse it and would read a 408 as its answer); its head did not complete within
        ``header_timeout`` of its first byte (408); the head is over 16 KiB (431)."""
        try:
            first = await asyncio.wait_for(reader.readexactly(1), self.idle_timeout)
        except asyncio.TimeoutError:
            self._count_timeout()
            return None
        except asyncio.IncompleteReadError:
            return None
        try:
            rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.header_timeout)
        except asyncio.TimeoutError:
            self._count_timeout()
            await self._send(writer, 408, {"error": "request head not complete within "
                                                    f"{self.header_timeout:g} s"}, close=True)
            return None
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError:
            await self._send(writer, 431, {"error": f"headers over {_MAX_HEAD} bytes"},
                             close=True)
            return None
        return first + rest

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
        if "transfer-encoding" in headers or length is None:
            return await self._send(writer, 411, {"error": "Content-Length required"},
                                    close=True)
        # int() takes '²'-free Unicode digits, signs, '_' and spaces: only ASCII digits here
        if not (length.isascii() and length.isdigit()) or len(length) > _MAX_LENGTH_DIGITS:
            return await self._send(writer, 400, {
                "error": f"Content-Length {length[:24]!r} is not a byte count"}, close=True)
        n = int(length)
        ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if ctype not in (_BINARY, "application/json", "text/plain", ""):
            return await self._send(writer, 415, {
                "error": f"Content-Type {ctype}: send application/json or {_BINARY}"},
                close=True)
        if n > self.max_body:  # do not read a body we refuse
            return await self._send(writer, 413, {"error": f"body over {self.max_body} bytes"},
                                    close=True)
        if ctype != _BINARY and n > self.max_json:
            return await self._send(writer, 413, {
                "error": f"JSON body over {self.max_json} bytes (more than a sample of shape "
                         f"{self.sample_shape} needs); send large inputs as {_BINARY}"},
                close=True)
        with self._lock:
            busy = self._inflight + n > self.max_inflight_bytes
            self._busy_refused += busy
            self._inflight += 0 if busy else n
        if busy:  # refuse before reading: the body never reaches our memory
            self._throttled("budget", logging.WARNING,
                            "request bodies in flight at their budget (%d bytes): new bodies "
                            "get 503", self.max_inflight_bytes)
            return await self._send(writer, 503, {
                "error": "server busy: too many request bytes in flight; retry later"},
                close=True)
        body = b""
        try:
            try:
                body = await asyncio.wait_for(reader.readexactly(n), self.body_timeout)
            except asyncio.TimeoutError:
                self._count_timeout()
                return await self._send(writer, 408, {
                    "error": f"body of {n} bytes not received within {self.body_timeout:g} s"},
                    close=True)
            try:
                qratio = (parse_qs(urlsplit(target).query).get("ratio", [None])[-1]
                          if query else None)
                if ctype == _BINARY:
                    x, ratio = self.parse_binary(body, qratio)
                else:
                    x, ratio = self.parse(body)
                    ratio = ratio if qratio is None else self._ratio(qratio)
            except ValueError as e:
                return await self._send(writer, 400, {"error": str(e)}, close=not keep)
        finally:
            del body
            with self._lock:
                self._inflight -= n
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

    async def _send(self, writer, code: int, doc, close: bool = False,
                    ctype: str = "application/json", extra: dict | None = None) -> bool:
        """Write one answer; a client that does not take it within ``body_timeout`` is
        dropped (``asyncio.TimeoutError`` ends its connection)."""
        writer.write(_answer(code, doc, close, ctype, extra))
        await asyncio.wait_for(writer.drain(), self.body_timeout)
        return not close


def _answer(code: int, doc, close: bool = False, ctype: str = "application/json",
            extra: dict | None = None) -> bytes:
    """The bytes of one HTTP/1.1 answer (``doc``: bytes as they are, else JSON)."""
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    lines = [f"HTTP/1.1 {code} {_REASONS.get(code, '')}", f"Content-Type: {ctype}",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


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
        name = name.lower()
        if name in headers and name in ("content-length", "transfer-encoding", "host"):
            raise ValueError(f"duplicate {name} header")  # a request-smuggling ambiguity
        headers[name] = value.strip()
    return parts[0], parts[1], parts[2], headers
