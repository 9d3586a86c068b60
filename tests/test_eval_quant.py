"""FlexiQ accuracy on a trained zoo model, with the baselines (real figures)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexiq_tvm.eval import evaluate_quantized

EXE = Path(sys.executable).parent / "flexiq-tvm"


@pytest.fixture(scope="module")
def resnet_doc():
    return evaluate_quantized("resnet20_fmnist", ratios=(0.0, 0.5, 1.0),
                              selections=("static", "greedy"), limit=1000, progress=False)


def _get(doc, method, ratio):
    (row,) = [r for r in doc["results"] if r["method"] == method and r["ratio"] == ratio]
    return row


def test_int8_and_half_ratio_stay_close_to_fp32(resnet_doc):
    fp32 = resnet_doc["fp32"]["top1"]
    assert fp32 >= 0.90
    int8 = _get(resnet_doc, "flexiq-greedy", 0.0)
    assert int8["top1"] >= fp32 - 0.003 and int8["agreement"] >= 0.99
    half = _get(resnet_doc, "flexiq-greedy", 0.5)
    assert half["top1"] >= fp32 - 0.01
    assert 0.5 <= half["mac_fraction"] <= 0.51


def test_effective_extraction_beats_naive_truncation_at_full_ratio(resnet_doc):
    eff = _get(resnet_doc, "flexiq-static", 1.0)
    naive = _get(resnet_doc, "naive-truncation", 1.0)
    assert eff["top1"] > naive["top1"]
    assert eff["kl"] < naive["kl"]
    # every FlexiQ row at 4-bit beats plain uniform W4A4
    w4a4 = _get(resnet_doc, "uniform-w4a4", None)
    assert eff["top1"] > w4a4["top1"]


@pytest.mark.slow  # 45 s; tests/test_cli.py checks the eval CLI and its keys by default
def test_eval_cli_with_ratios_writes_all_rows(tmp_path):
    out = tmp_path / "q.json"
    proc = subprocess.run(
        [str(EXE), "eval", "--model", "resnet20_fmnist", "--ratios", "0,1", "--selection",
         "static", "--limit", "200", "--json", str(out), "--save-plans", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    methods = [(r["method"], r["ratio"]) for r in doc["results"]]
    assert methods == [("flexiq-static", 0.0), ("flexiq-static", 1.0), ("random", 0.0),
                       ("random", 1.0), ("naive-truncation", 0.0), ("naive-truncation", 1.0),
                       ("uniform-w4a4", None)]
    for r in doc["results"]:
        assert 0.0 <= r["top1"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0
    # at ratio 0 every FlexiQ variant is the same INT8 model
    assert len({r["top1"] for r in doc["results"] if r["ratio"] == 0.0}) == 1
    assert (tmp_path / "resnet20_fmnist.flexiq-static.npz").exists()
    assert "flexiq-static" in proc.stdout and "uniform-w4a4" in proc.stdout
    bad = subprocess.run([str(EXE), "eval", "--model", "resnet20_fmnist", "--ratios", "0,2"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "must be in [0, 1]" in bad.stderr
