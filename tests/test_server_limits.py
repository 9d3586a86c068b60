"""The server under slow, idle, flooding and malformed clients: every connection is answered
or closed within its timeout, the connection and in-flight byte limits hold, the log stays a
few lines under a flood, and the CLI says what is wrong with an artifact in one line."""

from __future__ import annotations

import http.client
import json
import logging
import os
import resource
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from flexiq_tvm import cli
from flexiq_tvm.runtime.policy import StaticPolicy
from flexiq_tvm.runtime.server import _BINARY, InferenceServer, _Throttled


class Echo:
    """A stand-in with the FlexiQModule calling convention (no compile needed): the first four
    input numbers, times 1 + ratio."""

    input_dtype, ratios = "float32", (0.0, 1.0)

    def __init__(self, shape=(1, 4)) -> None:
        self.input_shape = shape

    def __call__(self, x, ratio=None):
        return np.asarray(x).reshape(x.shape[0], -1)[:, :4] * (1 + ratio)


def _addr(srv) -> tuple[str, int]:
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _answer(s: socket.socket, timeout: float = 10.0) -> tuple[int | None, bytes, float]:
    """Read until the server closes: (status or None, everything it sent, seconds it took)."""
    t, got = time.perf_counter(), b""
    s.settimeout(timeout)
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    code = int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/1.1 ") else None
    return code, got, time.perf_counter() - t


def _metrics(conn: http.client.HTTPConnection) -> dict:
    conn.request("GET", "/metrics")
    return json.loads(conn.getresponse().read())


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def test_slow_idle_and_short_body_clients_are_closed_after_their_timeouts():
    # timeouts of 1 s: long enough that a loaded CI machine reads every first byte in time
    with InferenceServer(Echo(), StaticPolicy(0.0), idle_timeout=1.0, header_timeout=1.0,
                         body_timeout=1.0) as srv:
        addr = _addr(srv)
        kinds = {"slow head": b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Le",
                 "short body": b"POST /v1/infer HTTP/1.1\r\nContent-Length: 16\r\n\r\n1234",
                 "idle": b""}
        socks = []
        for kind, data in kinds.items():
            for _ in range(50 if kind != "slow head" else 100):
                s = socket.create_connection(addr)
                s.sendall(data)
                socks.append((kind, s))
        results = [(kind, *_answer(s)) for kind, s in socks]
        for kind, code, got, _ in results:
            if kind == "idle":  # closed without an answer a keep-alive client could misread
                assert got == b""
            else:
                assert code == 408 and (b"head not complete within 1 s" in got
                                        or b"bytes not received within 1 s" in got)
                assert b"Connection: close" in got
        # all are closed about when their timeouts say (reading them took the first ~2 s)
        assert max(dt for *_, dt in results) < 4.0
        for _, s in socks:
            s.close()
        conn = http.client.HTTPConnection(*addr, timeout=10)
        m = _metrics(conn)
        assert m["connections"]["timed_out"] == 200 and m["connections"]["open"] == 1
        conn.close()


def test_short_body_answer_names_the_body_timeout():
    with InferenceServer(Echo(), StaticPolicy(0.0), body_timeout=0.3) as srv:
        s = socket.create_connection(_addr(srv))
        s.sendall(b"POST /v1/infer HTTP/1.1\r\nContent-Length: 16\r\n\r\n1234")
        code, got, dt = _answer(s)
        assert code == 408 and b"body of 16 bytes not received within 0.3 s" in got
        assert 0.25 < dt < 2.0
        s.close()


def test_beyond_the_connection_limit_new_clients_get_503_and_healthz_still_answers(caplog):
    _raise_nofile(4500)  # 2000 client ends and 2000 server ends in this one process
    caplog.set_level(logging.WARNING, logger="flexiq_tvm.runtime.server")
    with InferenceServer(Echo(), StaticPolicy(0.0), max_connections=2001) as srv:
        addr = _addr(srv)
        legit = http.client.HTTPConnection(*addr, timeout=10)  # keep-alive, before the flood
        legit.request("GET", "/healthz")
        assert legit.getresponse().read() == b'{"status": "ok"}'
        idle = [socket.create_connection(addr) for _ in range(2000)]
        deadline = time.monotonic() + 20
        while _metrics(legit)["connections"]["open"] < 2001 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _metrics(legit)["connections"]["open"] == 2001
        took = []
        for _ in range(10):
            t = time.perf_counter()
            legit.request("GET", "/healthz")
            r = legit.getresponse()
            assert r.read() == b'{"status": "ok"}' and r.status == 200
            took.append(time.perf_counter() - t)
        assert max(took) < 0.1, took
        legit.request("POST", "/v1/infer", b'{"input": [1, 2, 3, 4]}',
                      {"Content-Type": "application/json"})
        r = legit.getresponse()
        assert r.status == 200 and json.loads(r.read())["output"] == [1, 2, 3, 4]
        # a flood of 500 more: each gets 503 and is closed; the log gets one line, not 500
        refused = []
        for _ in range(500):
            s = socket.create_connection(addr)
            s.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            refused.append(s)
        answers = [_answer(s) for s in refused]
        assert all(code == 503 and b"too many connections (limit 2001)" in got
                   for code, got, _ in answers)
        assert _metrics(legit)["connections"]["refused"] == 500
        lines = [r for r in caplog.records if r.name == "flexiq_tvm.runtime.server"]
        assert len(lines) == 1 and "connection limit (2001) reached" in lines[0].getMessage()
        for s in idle + refused:
            s.close()
        legit.close()


_FLOOD_SERVER = textwrap.dedent("""
    import logging, resource, sys, time
    import numpy as np
    import tvm  # as a served artifact has it loaded
    from flexiq_tvm.runtime.policy import StaticPolicy
    from flexiq_tvm.runtime.server import InferenceServer

    class Echo:
        input_shape, input_dtype, ratios = (1, 4), "float32", (0.0,)
        def __call__(self, x, ratio=None):
            return np.asarray(x)

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    limit = None if sys.argv[1] == "default" else int(sys.argv[1])
    with InferenceServer(Echo(), StaticPolicy(0.0), max_connections=limit) as srv:
        print(srv.url, srv.max_connections, flush=True)
        sys.stdin.readline()
""")


@pytest.mark.parametrize("limit", ["default", "100000"])
def test_a_connection_flood_past_the_open_files_limit_logs_a_few_lines(limit):
    """A server with 256 open files, flooded with 600 connections held for 3 s. With the
    default limit (under the open files) the flood gets 503s and one log line; with a limit
    set above what the open files allow, accept() fails with EMFILE over and over: the server
    logs one line per 10 s instead of one per failure, and waits instead of spinning."""
    _raise_nofile(1400)
    p = subprocess.Popen([sys.executable, "-c", _FLOOD_SERVER, limit], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url, max_conn = p.stdout.readline().split()
        assert int(max_conn) < 256 if limit == "default" else int(max_conn) == 100000
        host, port = url.removeprefix("http://").rsplit(":", 1)
        socks = []
        t_end = time.monotonic() + 3.0
        while time.monotonic() < t_end:
            if len(socks) < 600:
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex((host, int(port)))
                socks.append(s)
            else:
                time.sleep(0.01)
        for s in socks:
            s.close()
        p.stdin.write("\n")
        p.stdin.flush()
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 0, err[-2000:]
    if limit == "default":
        assert len(lines) == 1 and "connection limit" in lines[0], lines
    else:  # one "out of system resource" report per 10 s (and no other noise)
        assert 1 <= len(lines) <= 3 and "accept() failed: [Errno 24]" in lines[0], lines


def test_the_loop_error_handler_logs_once_per_interval(caplog):
    caplog.set_level(logging.ERROR, logger="flexiq_tvm.runtime.server")
    srv = InferenceServer(Echo(), StaticPolicy(0.0))
    ctx = {"message": "socket.accept() out of system resource",
           "exception": OSError(24, "Too many open files")}
    for _ in range(10000):
        srv._loop_error(srv._loop, ctx)
    assert len(caplog.records) == 1
    srv.stop()
    throttled, now = _Throttled(interval=0.05), time.monotonic()
    caplog.clear()
    while time.monotonic() - now < 0.12:
        throttled("k", logging.ERROR, "again")
    assert 2 <= len(caplog.records) <= 4 and "times in the last" in caplog.records[-1].message


@pytest.mark.parametrize("length", ["²", "1_0", "+10", "0x10", "1" * 13, "-1", "١٠"])
def test_a_content_length_that_is_not_ascii_digits_gets_400(length):
    with InferenceServer(Echo(), StaticPolicy(0.0)) as srv:
        s = socket.create_connection(_addr(srv))
        head = f"POST /v1/infer HTTP/1.1\r\nContent-Length: {length}\r\n\r\n"
        try:  # '²' as one latin-1 byte: a digit to str.isdigit(), not to int()
            s.sendall(head.encode("latin-1"))
        except UnicodeEncodeError:
            s.sendall(head.encode())
        code, got, _ = _answer(s)
        assert code == 400 and b"is not a byte count" in got
        s.close()


def test_duplicate_content_length_gets_400():
    with InferenceServer(Echo(), StaticPolicy(0.0)) as srv:
        s = socket.create_connection(_addr(srv))
        s.sendall(b"POST /v1/infer HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\n")
        code, got, _ = _answer(s)
        assert code == 400 and b"duplicate content-length" in got
        s.close()


def test_deep_json_gets_400_and_oversized_json_413_with_the_binary_hint():
    deep = b"[" * 200000 + b"]" * 200000
    with InferenceServer(Echo(), StaticPolicy(0.0), max_json=2**20) as srv:
        conn = http.client.HTTPConnection(*_addr(srv), timeout=10)
        conn.request("POST", "/v1/infer", deep, {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 400 and b"nested too deep" in r.read()
        conn.close()
    with InferenceServer(Echo(), StaticPolicy(0.0)) as srv:  # default: what a sample needs
        assert srv.max_json == 64 * 1024 + 48 * 4
        conn = http.client.HTTPConnection(*_addr(srv), timeout=10)
        conn.request("POST", "/v1/infer", deep, {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 413 and b"send large inputs as application/octet-stream" in r.read()
        conn.close()
        ok = http.client.HTTPConnection(*_addr(srv), timeout=10)
        ok.request("POST", "/v1/infer", b'{"input": [1, 2, 3, 4]}')
        assert json.loads(ok.getresponse().read())["output"] == [1, 2, 3, 4]
        ok.close()


def test_a_bug_in_the_handler_answers_500_and_the_server_lives_on(caplog):
    caplog.set_level(logging.ERROR, logger="flexiq_tvm.runtime.server")
    with InferenceServer(Echo(), StaticPolicy(0.0)) as srv:
        srv.metrics = lambda: 1 / 0
        conn = http.client.HTTPConnection(*_addr(srv), timeout=10)
        for _ in range(3):
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            assert r.status == 500 and json.loads(r.read()) == {"error": "internal server error"}
            conn.close()
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b'{"status": "ok"}'
        conn.close()
    records = [r for r in caplog.records if r.name == "flexiq_tvm.runtime.server"]
    assert len(records) == 1 and records[0].exc_info[0] is ZeroDivisionError


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_held_large_bodies_stay_within_the_in_flight_budget():
    """40 clients each announce a 4 MiB body, send 3 MiB of it and hold. Without a budget the
    server would hold 120 MiB; with 16 MiB, four are read and the rest get 503 unread."""
    mib = 2**20
    sample = (1, mib)  # 4 MiB of float32
    with InferenceServer(Echo(sample), StaticPolicy(0.0), max_inflight_bytes=16 * mib,
                         body_timeout=20) as srv:
        addr = _addr(srv)
        conn = http.client.HTTPConnection(*addr, timeout=10)
        conn.request("POST", "/v1/infer", bytes(4 * mib), {"Content-Type": _BINARY})
        assert conn.getresponse().read()  # the worker is up (its TVM pool, its imports)
        base = _rss()
        head = b"POST /v1/infer HTTP/1.1\r\nContent-Type: application/octet-stream\r\n" \
               b"Content-Length: %d\r\n\r\n" % (4 * mib)
        message = head + bytes(3 * mib)  # one copy, shared by the 40 clients
        socks = []

        def hold(s):
            try:
                s.sendall(message)
            except OSError:  # refused: the server closed it without reading
                pass

        threads = []
        for _ in range(40):
            s = socket.create_connection(addr)
            s.settimeout(10)
            socks.append(s)
            threads.append(threading.Thread(target=hold, args=(s,)))
            threads[-1].start()
        deadline, peak = time.monotonic() + 10, 0
        while time.monotonic() < deadline:
            m = _metrics(conn)
            peak = max(peak, _rss() - base)
            if m["busy_refused"] == 36 and m["inflight_body_bytes"] == 16 * mib:
                break
            time.sleep(0.05)
        for t in threads:
            t.join(10)
        time.sleep(0.3)
        peak = max(peak, _rss() - base)
        assert m["busy_refused"] == 36 and m["inflight_body_bytes"] == 16 * mib, m
        print(f"server grew {peak / mib:.1f} MiB")
        assert peak < 32 * mib, f"server grew {peak / mib:.0f} MiB"
        held = []
        for s in socks:  # the four that were admitted finish their bodies and are served
            try:
                s.sendall(bytes(mib))
                held.append(s)
            except OSError:
                pass
        served = 0
        for s in held:
            s.settimeout(10)
            try:
                got = s.recv(65536)
            except OSError:
                got = b""
            served += got.startswith(b"HTTP/1.1 200")
        assert served == 4
        assert _metrics(conn)["inflight_body_bytes"] == 0
        for s in socks:
            s.close()
        conn.close()


def test_healthz_stays_fast_while_clients_send_the_largest_json_bodies():
    with InferenceServer(Echo(), StaticPolicy(0.0)) as srv:
        body = json.dumps({"input": [1.2345678e-3] * 4, "pad": "x" * (srv.max_json - 100)})
        assert len(body) <= srv.max_json
        stop = threading.Event()

        def send():
            conn = http.client.HTTPConnection(*_addr(srv), timeout=10)
            while not stop.is_set():
                conn.request("POST", "/v1/infer", body, {"Content-Type": "application/json"})
                conn.getresponse().read()
            conn.close()

        clients = [threading.Thread(target=send) for _ in range(8)]
        for t in clients:
            t.start()
        conn = http.client.HTTPConnection(*_addr(srv), timeout=10)
        took = []
        for _ in range(20):
            t = time.perf_counter()
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            took.append(time.perf_counter() - t)
        stop.set()
        for t in clients:
            t.join()
        conn.close()
        assert float(np.median(took)) < 0.1, took


def test_the_listen_backlog_asked_for_is_the_one_applied():
    """With the loop busy, 300 clients connect at once: all complete their handshake in the
    kernel's accept queue (asyncio's own default would re-listen with 100, and the rest would
    wait for a SYN retransmit, a second or more)."""
    with InferenceServer(Echo(), StaticPolicy(0.0), backlog=1024) as srv:
        srv._loop.call_soon_threadsafe(time.sleep, 1.5)  # the front end is busy
        time.sleep(0.05)
        socks = []
        for _ in range(300):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(_addr(srv))
            socks.append(s)
        _, writable, _ = select.select([], socks, [], 0.5)
        connected = sum(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                        for s in writable)
        for s in socks:
            s.close()
        assert connected == 300


@pytest.mark.parametrize("make", ["not an artifact", "directory", "missing"])
@pytest.mark.parametrize("command", ["serve", "loadtest"])
def test_the_cli_says_what_is_wrong_with_an_artifact_in_one_line(tmp_path, capsys, make,
                                                                   command):
    path = tmp_path / "model.flexiq"
    if make == "not an artifact":
        path.write_bytes(b"PK\x03\x04 a zip file")
    elif make == "directory":
        path.mkdir()
    argv = ["serve", str(path), "--ratio", "0"] if command == "serve" else \
        ["loadtest", "--artifact", str(path), "--duration", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flexiq-tvm {command}: error:"), err
    assert {"not an artifact": "not a FlexiQ artifact", "directory": "Is a directory",
            "missing": "No such file"}[make] in err[0]
