"""``make demo`` end to end (slow: about a minute on 2 cores): the table, the load test, the
plot and the artifact, and output a person can read (no line three times, at most two
warnings). Its time is a figure of docs/results.md, not an assertion here."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import pytest

import flexiq_tvm

EXE = Path(sys.executable).parent / "flexiq-tvm"


@pytest.mark.slow
def test_demo_shows_the_ratios_serving_and_stays_quiet(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([str(EXE), "demo", "--duration", "3", "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    repeated = [(k, n) for k, n in collections.Counter(lines).items() if n >= 3 and k.strip()]
    assert repeated == []
    assert sum("warning" in line.lower() for line in lines) <= 2
    rows = [line.split() for line in lines if line.lstrip().startswith("FlexiQ ")]
    assert [float(r[1]) for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert any(line.lstrip().startswith("onnxruntime INT8") for line in lines)
    assert any(line.lstrip().startswith("torch FP32") for line in lines)
    policies = [line.split()[0] for line in lines
                if line.lstrip().startswith(("static-0", "static-1", "adaptive"))]
    assert policies == ["static-0", "static-1", "adaptive"]
    png = out / "loadtest.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = flexiq_tvm.load(out / "resnet20_fmnist.flexiq")
    assert m.ratios == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert set(m.metadata["accuracy"]) == {"0", "0.25", "0.5", "0.75", "1"}
    assert all(v > 0 for v in m.metadata["profile_ms"].values())
    assert str(png) in proc.stdout and "serve" in proc.stdout
