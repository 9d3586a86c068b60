"""The inference server: real module round trip, every bad request answered 4xx, overload
answered 503 at once, the adaptive policy reacting to load, clean shutdown."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

import flexiq_tvm
from flexiq_tvm import FlexiQConfig
from flexiq_tvm.runtime.policy import AdaptivePolicy, StaticPolicy
from flexiq_tvm.runtime.server import InferenceServer
from flexiq_tvm.zoo import data, registry


def _post(url, body: bytes, timeout=30):
    req = urllib.request.Request(url + "/v1/infer", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url, path):
    with urllib.request.urlopen(url + path, timeout=10) as r:
        return json.loads(r.read())


class SlowModule:
    """A stand-in with the FlexiQModule calling convention: ratio 1 is twice as fast."""

    input_shape, input_dtype, ratios = (1, 4), "float32", (0.0, 1.0)

    def __call__(self, x, ratio=None):
        time.sleep(0.04 if ratio == 0.0 else 0.02)
        return np.asarray(x) * (1 + ratio)


@pytest.fixture(scope="module")
def resnet():
    model = registry.get_model("resnet20_fmnist")
    cfg = FlexiQConfig(selection="static", calib_images=16, ratios=(0, 1))
    xs, _ = data.load_fmnist("test", 4)
    return flexiq_tvm.compile(model, xs[:1], data.fmnist_calibration(16), config=cfg), xs


def test_serves_the_modules_outputs_and_metrics(resnet):
    cm, xs = resnet
    with InferenceServer(cm, StaticPolicy(0.0)) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        assert _get(srv.url, "/healthz") == {"status": "ok"}
        for i in range(3):
            code, doc = _post(srv.url, json.dumps({"input": xs[i, 0:1].tolist()}).encode())
            assert code == 200 and doc["ratio"] == 0.0
            assert np.array_equal(np.asarray(doc["output"], np.float32), cm(xs[i : i + 1])[0])
        code, doc = _post(srv.url, json.dumps({"input": xs[:1].tolist(), "ratio": 1}).encode())
        assert code == 200 and doc["ratio"] == 1.0
        m = _get(srv.url, "/metrics")
        assert m["served"] == 4 and m["rejected"] == 0 and m["ratio_counts"] == {"0": 3, "1": 1}
        assert 0 < m["latency_ms"]["p50"] <= m["latency_ms"]["p99"]


@pytest.mark.parametrize("body,code,msg", [
    (b"not json", 400, "not JSON"),
    (b'{"x": 1}', 400, '"input"'),
    (json.dumps({"input": [[1.0, 2.0]]}).encode(), 400, "expected (1, 28, 28)"),
    (json.dumps({"input": np.full((1, 28, 28), np.nan).tolist()}).encode(), 400, "NaN"),
    (json.dumps({"input": np.zeros((1, 28, 28)).tolist(), "ratio": 0.5}).encode(), 400,
     "compiled ratios"),
    (json.dumps({"input": [["a"]]}).encode(), 400, "array of numbers"),
    (b"x" * 100_000, 413, "body over"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_lives_on(resnet, body, code, msg):
    cm, xs = resnet
    with InferenceServer(cm, StaticPolicy(0.0), max_body=50_000) as srv:
        got, doc = _post(srv.url, body)
        assert got == code and msg in doc["error"]
        ok, _ = _post(srv.url, json.dumps({"input": xs[0].tolist()}).encode())
        assert ok == 200


def test_binary_bodies_both_ways_on_one_keep_alive_connection(resnet):
    import http.client

    cm, xs = resnet
    with InferenceServer(cm, StaticPolicy(0.0)) as srv:
        c = http.client.HTTPConnection("127.0.0.1", int(srv.url.rsplit(":", 1)[1]), timeout=30)
        for i, (query, ratio) in enumerate([("", 0.0), ("?ratio=1", 1.0), ("?ratio=1.0", 1.0)]):
            c.request("POST", "/v1/infer" + query, xs[i].astype("<f4").tobytes(),
                      {"Content-Type": "application/octet-stream",
                       "Accept": "application/octet-stream"})
            r = c.getresponse()
            out = np.frombuffer(r.read(), r.getheader("X-FlexiQ-Dtype"))
            assert r.status == 200 and float(r.getheader("X-FlexiQ-Ratio")) == ratio
            assert r.getheader("X-FlexiQ-Shape") == "10"
            assert np.array_equal(out, cm(xs[i : i + 1], ratio=ratio)[0])
        # a JSON answer to a binary request, and a JSON request with a ratio in the query
        c.request("POST", "/v1/infer?ratio=1", xs[3].tobytes(),
                  {"Content-Type": "application/octet-stream"})
        r = c.getresponse()
        doc = json.loads(r.read())
        assert doc["ratio"] == 1.0
        assert np.array_equal(np.asarray(doc["output"], np.float32), cm(xs[3:4], ratio=1.0)[0])
        c.request("POST", "/v1/infer?ratio=1", json.dumps({"input": xs[3].tolist()}),
                  {"Content-Type": "application/json"})
        assert json.loads(c.getresponse().read())["output"] == doc["output"]
        assert _get(srv.url, "/metrics")["served"] == 5


def _raw(url, data: bytes) -> tuple[int, bytes]:
    """Send raw bytes on a fresh connection; the status code and whole answer."""
    import socket

    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        got = b""
        while True:  # the head, then its Content-Length of body
            head, sep, body = got.partition(b"\r\n\r\n")
            if sep and len(body) >= int(head.lower().split(b"content-length: ")[1]
                                        .split(b"\r\n")[0]):
                break
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return int(got.split(b" ", 2)[1]), got


@pytest.mark.parametrize("data,code,msg", [
    (b"POST /v1/infer HTTP/1.1\r\nContent-Type: application/octet-stream\r\n"
     b"Content-Length: 12\r\n\r\n" + bytes(12), 400, b"expected 3136 (float32"),
    (b"POST /v1/infer HTTP/1.1\r\nContent-Type: text/csv\r\nContent-Length: 3\r\n\r\n1,2",
     415, b"application/octet-stream"),
    (b"POST /v1/infer?ratio=0.3 HTTP/1.1\r\nContent-Type: application/octet-stream\r\n"
     b"Content-Length: 3136\r\n\r\n" + bytes(3136), 400, b"compiled ratios"),
    (b"POST /v1/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411,
     b"Content-Length required"),
    (b"GET /v1/infer HTTP/1.1\r\n\r\n", 405, b"not allowed"),
    (b"GET /nowhere HTTP/1.1\r\n\r\n", 404, b"no such endpoint"),
    (b"HELLO\r\n\r\n", 400, b"malformed request line"),
    (b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", 400, b"malformed header"),
    (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431, b"headers over"),
])
def test_malformed_http_gets_a_clear_4xx_and_the_server_lives_on(resnet, data, code, msg):
    cm, xs = resnet
    with InferenceServer(cm, StaticPolicy(0.0)) as srv:
        got, answer = _raw(srv.url, data)
        assert got == code and msg in answer
        ok, _ = _post(srv.url, json.dumps({"input": xs[0].tolist()}).encode())
        assert ok == 200 and _get(srv.url, "/metrics")["served"] == 1


def test_overload_answers_503_at_once_and_shutdown_is_clean():
    srv = InferenceServer(SlowModule(), StaticPolicy(0.0), max_queue=2).start()
    results = []

    def call():
        t = time.perf_counter()
        results.append((_post(srv.url, b'{"input": [1, 2, 3, 4]}')[0], time.perf_counter() - t))

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(c for c, _ in results)
    assert codes.count(503) >= 1 and codes.count(200) >= 2
    assert max(dt for c, dt in results if c == 503) < 1.0  # refused, not left hanging
    assert _get(srv.url, "/metrics")["rejected"] == codes.count(503)
    srv.stop()
    with pytest.raises(urllib.error.URLError):
        _post(srv.url, b'{"input": [1, 2, 3, 4]}', timeout=2)


def test_adaptive_policy_speeds_up_under_load_and_returns_when_calm():
    policy = AdaptivePolicy({"0": 40.0, "1": 20.0}, slo_ms=100.0, patience=3)
    with InferenceServer(SlowModule(), policy, max_queue=64) as srv:
        threads = [threading.Thread(target=_post, args=(srv.url, b'{"input": [1, 2, 3, 4]}'))
                   for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        busy = _get(srv.url, "/metrics")["ratio_counts"]
        assert busy.get("1", 0) > 0  # a queue of 16 x 40 ms cannot keep 100 ms at ratio 0
        for _ in range(6):  # one at a time: back to the accurate ratio
            code, doc = _post(srv.url, b'{"input": [1, 2, 3, 4]}')
        assert code == 200 and doc["ratio"] == 0.0


def test_serve_cli_serves_a_signed_artifact_and_stops_on_sigterm(resnet, tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    cm, xs = resnet
    key = tmp_path / "key"
    key.write_bytes(b"k3y")
    art = cm.export(tmp_path / "m.flexiq", key=b"k3y")
    exe = Path(sys.executable).parent / "flexiq-tvm"
    proc = subprocess.Popen([str(exe), "serve", str(art), "--slo-ms", "50", "--port", "0",
                             "--key-file", str(key)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving" in line and "adaptive" in line
        url = line.split(" on ")[1].split(" ")[0]
        code, doc = _post(url, json.dumps({"input": xs[0].tolist()}).encode())
        assert code == 200 and doc["ratio"] in (0.0, 1.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
