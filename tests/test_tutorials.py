"""Every tutorial runs, in fast mode, as a user would run it (a fresh interpreter in
tutorials/), and leaves the files it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
EXPECTED = {  # files each tutorial writes into its output folder
    "01_quickstart.py": ["resnet20.flexiq"],
    "02_onnx_efficientnet.py": ["efficientnet_lite0.onnx", "efficientnet_lite0_tradeoff.png"],
    "03_serving.py": ["resnet20_serving.flexiq", "serving_loadtest.png"],
    "04_npu.py": [],
    "05_autotuning.py": ["tuned_local/database_tuning_record.json"],
    "06_your_own_onnx.py": ["my_model.onnx", "my_model.flexiq"],
}


def test_every_tutorial_is_listed():
    assert sorted(p.name for p in TUTORIALS.glob("[0-9]*.py")) == sorted(EXPECTED)


# tutorial 05 tunes (a MetaSchedule builder starts in ~40 s): under `make test-slow`, like the
# RPC tuning and database tests of tests/test_tune.py (its task extraction runs by default).
# Tutorial 06's three commands (compile an ONNX file, serve it, ask it) run in the default
# suite through tests/test_cli_usermodel.py
# 02 (ONNX EfficientNet, 50 s) and 03 (serving, 60 s) are slow too: their paths run in the
# default suite through tests/test_onnx_only.py and tests/test_server.py
SLOW = {"02_onnx_efficientnet.py", "03_serving.py", "05_autotuning.py", "06_your_own_onnx.py"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(EXPECTED)])
def test_tutorial_runs(name, tmp_path):
    env = {**os.environ, "FLEXIQ_TUTORIAL_FAST": "1", "FLEXIQ_TUTORIAL_OUT": str(tmp_path)}
    res = subprocess.run([sys.executable, name], cwd=TUTORIALS, env=env, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for f in EXPECTED[name]:
        assert (tmp_path / f).stat().st_size > 0, f
