"""
Autotuning, locally and across machines
=======================================

The FlexiQ kernels are hand-scheduled TensorIR. Everything else in a compiled model can be
tuned with MetaSchedule: the FP32 glue between layers, pooling, layer norms, softmax, and
attention's matmuls. ``flexiq-tvm tune`` measures candidates and keeps the best in a JSON
database. ``compile`` applies ``schedules/llvm/tuned`` when it exists, or any work dir you name.

Tuning across machines uses TVM's RPC tracker. Each device runs an RPC server registered
under a key. The tuner builds candidates locally and measures them on whichever device of that
key is free::

    # on the machine that coordinates (any host reachable by the devices)
    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190
    # on every device (same CPU kind per key)
    python -m tvm.exec.rpc_server --tracker TRACKER_HOST:9190 --key zen3
    # check what registered
    python -m tvm.exec.query_rpc_tracker --host TRACKER_HOST --port 9190
    # tune, measuring on the devices
    flexiq-tvm tune --model vit_fmnist --trials 200 --rpc-tracker TRACKER_HOST:9190 --rpc-key zen3

The candidates are compiled for the target of the machine that runs ``tune``. Devices under
one key should share that CPU, or pass a work dir per device kind.

Below, a tracker and two servers start on loopback, as if they were two devices.

Run it by hand: ``.venv/bin/python tutorials/05_autotuning.py`` (about 10 minutes).
"""

# %%
# Local tuning
# ------------
import time

import numpy as np
from _common import FAST, OUT, pick

import flexiq_tvm
from flexiq_tvm.tune import RPCConfig, tune
from flexiq_tvm.zoo import fmnist_calibration, get_model, load_fmnist

name = "vit_fmnist"
local_db = OUT / "tuned_local"
res = tune(name, trials=pick(2, 24), work_dir=local_db, num_trials_per_iter=pick(2, 8))
done = [t for t in res["tasks"] if t["best_us"] is not None]
print(f"{len(res['tasks'])} tasks ({res['skipped_flexiq_kernels']} FlexiQ kernels left alone), "
      f"{len(done)} measured, {res['seconds']:.0f} s")

# %%
# Across machines: a tracker and two RPC servers
# ----------------------------------------------
# (By hand only: the test suite covers the same path in tests/test_tune.py.)
if not FAST:
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    tracker = Tracker(host="127.0.0.1", port=9190, port_end=9290, silent=True)
    servers = [rpc.Server(host="127.0.0.1", port=9300, port_end=9400, key="tutorial",
                          tracker_addr=("127.0.0.1", tracker.port), silent=True)
               for _ in range(2)]
    try:
        time.sleep(2)
        print(rpc.connect_tracker("127.0.0.1", tracker.port).text_summary())
        remote = tune(name, trials=16, work_dir=OUT / "tuned_rpc", num_trials_per_iter=8,
                      rpc=RPCConfig("127.0.0.1", tracker.port, "tutorial"))
        print(f"via RPC: {len(remote['tasks'])} tasks, {remote['seconds']:.0f} s")
    finally:
        for s in servers:
            s.terminate()
        tracker.terminate()

# %%
# Apply the database
# ------------------
model = get_model(name)
x, _ = load_fmnist("test", limit=1)
cfg = flexiq_tvm.FlexiQConfig(selection="static", calib_images=32)
calib = fmnist_calibration(32)
tuned = flexiq_tvm.compile(model, x, calib, config=cfg, database=str(local_db))
plain = flexiq_tvm.compile(model, x, calib, config=cfg, database=None)
for r in (0.0, 1.0):
    t, p = tuned.profile(x, repeat=pick(5, 50))[f"{r:g}"], plain.profile(x, repeat=pick(5, 50))[
        f"{r:g}"]
    diff = np.abs(tuned(x, ratio=r) - plain(x, ratio=r)).max()
    print(f"ratio {r:g}: tuned {t:.3f} ms, untuned {p:.3f} ms, max |logit diff| {diff:.1e}")
