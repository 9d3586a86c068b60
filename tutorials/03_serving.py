"""
Deployment and serving under fluctuating load
=============================================

A server facing a load spike can either miss its latency target or drop accuracy for a
moment. FlexiQ makes the second choice cheap. The adaptive policy picks, for each batch, the
most accurate ratio whose predicted latency still meets the SLO for the queue it sees. The
prediction comes from the latency profile measured at compile time and stored in the
artifact.

This walkthrough exports a compiled ResNet-20, serves it over HTTP on loopback, sends it a
request, and replays a bursty Poisson trace against static ratio 0, static ratio 1 and the
adaptive policy.

Run it by hand: ``.venv/bin/python tutorials/03_serving.py`` (about 3 minutes).
"""

# %%
# Compile, measure accuracy per ratio, export one artifact
# --------------------------------------------------------
import json
import urllib.request

import numpy as np
from _common import OUT, pick

import flexiq_tvm
from flexiq_tvm.demo import top1_per_ratio
from flexiq_tvm.runtime import AdaptivePolicy, loadtest
from flexiq_tvm.runtime.server import InferenceServer
from flexiq_tvm.zoo import fmnist_calibration, get_model, load_fmnist

model = get_model("resnet20_fmnist")
x, y = load_fmnist("test", limit=pick(100, 1000))
cfg = flexiq_tvm.FlexiQConfig(selection="static", calib_images=64)
mod = flexiq_tvm.compile(model, x[:1], fmnist_calibration(64), config=cfg)
accuracy = top1_per_ratio(mod, x, y)
path = mod.export(OUT / "resnet20_serving.flexiq", accuracy=accuracy)
print("accuracy per ratio:", {k: round(v, 4) for k, v in accuracy.items()})

# %%
# Serve it
# --------
# The same thing from a shell: ``flexiq-tvm serve resnet20_serving.flexiq --slo-ms 5``.
# A request is JSON: ``{"input": [...]}`` with one image of the compiled shape, plus an
# optional ``"ratio"``, or, cheaper, the image's raw little-endian bytes with
# ``Content-Type: application/octet-stream`` (``?ratio=R`` asks for a ratio either way). The
# answer carries the output, the ratio the policy chose and the latency (raw bytes plus
# ``X-FlexiQ-*`` headers with ``Accept: application/octet-stream``). ``/metrics`` reports
# latency percentiles and the ratios used.
served = flexiq_tvm.load(path)
profile = served.metadata["profile_ms"]
slo_ms = 3 * profile["0"]
with InferenceServer(served, AdaptivePolicy(profile, slo_ms)) as server:
    body = json.dumps({"input": x[0].tolist()}).encode()
    req = urllib.request.Request(server.url + "/v1/infer", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer = json.loads(resp.read())
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
        metrics = json.loads(resp.read())
print("answer:", {k: answer[k] for k in answer if k != "output"},
      "class", int(np.argmax(answer["output"])), "label", int(y[0]))
print("server metrics:", {k: metrics[k] for k in ("served", "ratio_counts") if k in metrics})

# %%
# A bursty trace: static vs adaptive
# ----------------------------------
# The trace runs at 0.6x the INT8 capacity, with bursts at 1.4x for 30 % of the time (or
# halfway to the fastest ratio's capacity when that is closer). The SLO defaults to twice
# the INT8 median at the base rate. ``flexiq-tvm loadtest`` does the same from
# a shell and draws the plot.
doc = loadtest.run(served, accuracy, duration_s=pick(3.0, 30.0), x=x[0],
                   plot=str(OUT / "serving_loadtest.png"))
print(f"SLO {doc['slo_ms']:.2f} ms")
for c in doc["configs"]:
    print(f"  {c['name']:<9} p50 {c['p50_ms']:6.2f} ms  p99 {c['p99_ms']:6.2f} ms  "
          f"SLO met {100 * c['slo_attainment']:5.1f} %  {c['throughput_rps']:6.0f} req/s  "
          f"mean top-1 {100 * c['mean_top1']:.2f} %")
assert {c["name"] for c in doc["configs"]} == {"static-0", "static-1", "adaptive"}
