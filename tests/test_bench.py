"""flexiq-tvm bench: the DESIGN.md keys from real runs, the summary ratios, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexiq_tvm import bench, cli

EXE = Path(sys.executable).parent / "flexiq-tvm"


def test_bench_cli_writes_design_keys_from_real_runs(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [str(EXE), "bench", "--models", "resnet20_fmnist", "--batches", "1",
         "--systems", "torch-fp32,onnxruntime-fp32,onnxruntime-int8,flexiq-llvm",
         "--repeat", "3", "--no-kernels", "--isa", "avx2", "--json", str(out)],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert {"machine", "rows", "kernels", "switch_us"} <= set(doc)
    systems = [(r["system"], r["ratio"]) for r in doc["rows"]]
    assert systems == [("torch-fp32", None), ("onnxruntime-fp32", None),
                       ("onnxruntime-int8", None)] + [("flexiq-llvm", r)
                                                      for r in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert doc["isas"] == ["avx2"]
    assert [r["isa"] for r in doc["rows"]] == [None] * 3 + ["avx2"] * 5
    for r in doc["rows"]:
        assert {"model", "batch", "system", "ratio", "median_ms", "peak_mem_mb"} <= set(r)
        assert r["model"] == "resnet20_fmnist" and r["batch"] == 1 and r["median_ms"] > 0
    assert 0 < doc["switch_us"] < 1000  # a dictionary lookup, not a rebuild
    (entry,) = doc["summary"]["models"]
    assert entry["speedup_vs_r0"]["0"] == 1.0
    assert "flexiq-llvm" in proc.stdout and "peers / flexiq r0" in proc.stdout


def test_summary_ratios_and_kernel_speedups():
    doc = {"rows": [
        {"model": "m", "batch": 1, "system": "torch-fp32", "ratio": None, "median_ms": 4.0},
        {"model": "m", "batch": 1, "system": "flexiq-llvm", "ratio": 0.0, "median_ms": 2.0},
        {"model": "m", "batch": 1, "system": "flexiq-llvm", "ratio": 1.0, "median_ms": 1.0}],
        "kernels": [{"name": "k", "ratio": 0.0, "median_us": 9.0},
                    {"name": "k", "ratio": 1.0, "median_us": 5.0}]}
    s = bench.summarize(doc)
    (m,) = s["models"]
    assert m["speedup_vs_r0"] == {"0": 1.0, "1": 2.0}
    assert m["peer_over_r0"] == {"torch-fp32": 2.0} and m["peer_over_r1"] == {"torch-fp32": 4.0}
    assert s["kernels"] == [{"name": "k", "isa": None, "speedup_r0": 1.0, "speedup_r1": 1.8}]


def test_summary_compares_the_best_isa_and_keeps_each_isas_figures():
    rows = [{"model": "m", "batch": 1, "system": "onnxruntime-int8", "ratio": None,
             "median_ms": 3.0, "isa": None}]
    for isa, t0, t1 in (("avx512vnni", 1.5, 1.5), ("avx2", 3.0, 1.5)):
        rows += [{"model": "m", "batch": 1, "system": "flexiq-llvm", "ratio": r,
                  "median_ms": t, "isa": isa} for r, t in ((0.0, t0), (1.0, t1))]
    s = bench.summarize({"rows": rows, "kernels": [], "isas": ["avx512vnni", "avx2"]})
    (m,) = s["models"]
    assert m["speedup_vs_r0"] == {"0": 1.0, "1": 1.0}  # the best ISA's
    assert m["peer_over_r0"] == {"onnxruntime-int8": 2.0}
    assert m["by_isa"]["avx2"]["speedup_vs_r0"] == {"0": 1.0, "1": 2.0}
    assert m["by_isa"]["avx2"]["peer_over_r0"] == {"onnxruntime-int8": 1.0}


def test_isa_flag_is_checked_against_this_cpu(capsys, monkeypatch):
    from flexiq_tvm import hostcpu

    monkeypatch.setattr(hostcpu, "cpu_flags", lambda: frozenset({"avx2"}))
    assert cli.main(["bench", "--isa", "avx512vnni", "--kernels-only"]) == 2
    assert "isa=avx512vnni: this CPU lacks" in capsys.readouterr().err
    assert cli.main(["loadtest", "--isa", "avx2,avx2"]) == 2
    assert "one ISA here" in capsys.readouterr().err


def test_bench_rejects_unknown_systems_and_models(capsys):
    assert cli.main(["bench", "--systems", "tensorrt"]) == 2
    assert "unknown systems" in capsys.readouterr().err
    assert cli.main(["bench", "--models", "alexnet"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_kernels_cover_the_three_shapes():
    rows = bench.bench_kernels(number=2, repeat=2)
    assert {(r["name"], r["ratio"]) for r in rows} == {
        (n, r) for n in bench.KERNEL_SHAPES for r in (0.0, 0.5, 1.0)}
