"""MetaSchedule tuning: tasks exclude the hand-scheduled FlexiQ kernels; tuning through an RPC
tracker with two servers on loopback fills the database, which compile then applies."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import flexiq_tvm
from flexiq_tvm.eval import load_eval_data
from flexiq_tvm.lowering import database_exists
from flexiq_tvm.tune import RPCConfig, lowered, tunable_tasks, tune

NAME = "resnet20_fmnist"


@pytest.fixture(scope="module")
def resnet20(static_plan):
    return static_plan(NAME)


def test_tasks_leave_flexiq_kernels_alone(resnet20):
    model, plan = resnet20
    _, x, _ = load_eval_data(NAME, 1)
    mod, target = lowered(model, x, plan, plan.ratios)
    tasks, skipped = tunable_tasks(mod, target)
    names = [t.task_name for t in tasks]
    # 22 layers: quantize + GEMM + dequantize kernels (shared across ratio variants)
    assert len(skipped) >= 22
    assert not any(n.endswith(("_gemm", "_quantize", "_dequantize")) for n in names)
    assert "mean" in names  # global average pooling is tuned


def test_rpc_parse_errors():
    assert RPCConfig.parse("10.0.0.2:9190", "zen3") == RPCConfig("10.0.0.2", 9190, "zen3")
    with pytest.raises(ValueError, match="HOST:PORT"):
        RPCConfig.parse("localhost", "k")
    with pytest.raises(ValueError, match="rpc-key"):
        RPCConfig.parse("localhost:9190", "")


def _wait_for_servers(port: int, key: str, n: int, timeout_s: float = 60.0) -> None:
    from tvm import rpc

    t0 = time.time()
    while time.time() - t0 < timeout_s:
        summary = rpc.connect_tracker("127.0.0.1", port).summary()
        free = summary.get("queue_info", {}).get(key, {}).get("free", 0)
        if free >= n:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{n} RPC servers did not register under {key!r}")


@pytest.mark.slow  # 90 s on 2 cores: a full compile with the committed database
def test_compile_applies_the_committed_database(resnet20):
    from flexiq_tvm.lowering import default_database

    model, plan = resnet20
    _, xs, _ = load_eval_data(NAME, 1)
    if not database_exists(default_database()):
        pytest.skip("no committed tuning database")
    cm = flexiq_tvm.compile(model, xs[:1], plan=plan)  # database="auto"
    assert cm.metadata["database"] == str(default_database())
    with pytest.raises(ValueError, match="no MetaSchedule database"):
        flexiq_tvm.compile(model, xs[:1], plan=plan, database="/nonexistent/db")


@pytest.mark.slow  # ~3 min on 2 cores: a MetaSchedule builder and two RPC servers start
def test_tune_through_rpc_tracker_and_apply(resnet20, tmp_path):
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    model, plan = resnet20
    key = "flexiq-test"
    tracker = Tracker(host="127.0.0.1", port=9190, port_end=9290, silent=True)
    servers = [rpc.Server(host="127.0.0.1", port=9300, port_end=9400, key=key,
                          tracker_addr=("127.0.0.1", tracker.port), silent=True)
               for _ in range(2)]
    try:
        _wait_for_servers(tracker.port, key, 2)
        res = tune(NAME, trials=4, work_dir=tmp_path, rpc=RPCConfig("127.0.0.1", tracker.port,
                                                                    key),
                   num_trials_per_iter=2)
    finally:
        for s in servers:
            s.terminate()
        tracker.terminate()
    assert res["rpc"] == f"127.0.0.1:{tracker.port}/{key}"
    assert database_exists(tmp_path)
    records = [json.loads(line) for line in
               (tmp_path / "database_tuning_record.json").read_text().splitlines()]
    timed = [r for r in records if r[1][1] and all(t < 1e9 for t in r[1][1])]
    assert len(timed) >= 3  # measured on the RPC servers (failed runs carry 1e10)
    assert any(t["best_us"] is not None and t["best_us"] > 0 for t in res["tasks"])

    # compile applies the database; the tuned glue computes the same outputs
    _, xs, _ = load_eval_data(NAME, 4)
    tuned = flexiq_tvm.compile(model, xs[:1], plan=plan, database=str(tmp_path))
    plain = flexiq_tvm.compile(model, xs[:1], plan=plan, database=None)
    assert tuned.metadata["database"] == str(tmp_path) and plain.metadata["database"] is None
    for r in (0.0, 1.0):
        for i in range(len(xs)):
            np.testing.assert_allclose(tuned(xs[i : i + 1], ratio=r),
                                       plain(xs[i : i + 1], ratio=r), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no MetaSchedule database"):
        flexiq_tvm.compile(model, xs[:1], plan=plan, database=str(tmp_path / "missing"))
