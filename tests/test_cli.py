import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from flexiq_tvm import cli
from flexiq_tvm.eval import evaluate_fp32

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).parent / "flexiq-tvm"


def test_eval_cli_writes_design_keys(tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [str(EXE), "eval", "--model", "resnet20_fmnist", "--limit", "300", "--tvm-limit", "40",
         "--via", "onnx", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert {"model", "dataset", "n_images", "fp32", "results"} <= set(doc)
    assert doc["model"] == "resnet20_fmnist" and doc["n_images"] == 300
    assert 0.85 <= doc["fp32"]["top1"] <= 1.0
    (row,) = doc["results"]
    assert {"method", "ratio", "top1", "agreement"} <= set(row)
    assert row["method"] == "tvm-fp32" and row["ratio"] is None and row["frontend"] == "onnx"
    assert row["agreement"] == 1.0 and row["n_images"] == 40
    assert f"FP32 top-1 {100 * doc['fp32']['top1']:.2f}%" in proc.stdout
    # the CLI reports what the API computes
    api = evaluate_fp32("resnet20_fmnist", limit=300, tvm_limit=0)
    assert api["fp32"]["top1"] == doc["fp32"]["top1"] and api["results"] == []


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    env = {**os.environ, "FLEXIQ_FMNIST_DIR": str(tmp_path)}
    proc = subprocess.run([str(EXE), "eval", "--model", "vit_fmnist", "--tvm-limit", "0"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"flexiq-tvm eval: error: Fashion-MNIST not found in {tmp_path}: run `sudo apt-get "
        "install -y dataset-fashion-mnist` (or set FLEXIQ_FMNIST_DIR)"
    ]
    assert cli.main(["eval", "--model", "vit_fmnist", "--limit", "-3"]) == 2
    assert "limit=-3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", "nope"])


def test_every_subcommand_has_help(capsys):
    for sub in ("train", "eval", "quantize", "demo"):
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0
        assert "usage: flexiq-tvm " + sub in capsys.readouterr().out


def test_wheel_installs_schedules_target_checkpoints_and_script(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    (whl,) = tmp_path.glob("flexiq_tvm-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    for must in ("flexiq_tvm/__init__.py", "flexiq_tvm/schedules/__init__.py",
                 "flexiq_tvm/target/__init__.py", "flexiq_tvm/zoo/checkpoints/manifest.json",
                 "flexiq_tvm/zoo/checkpoints/resnet20_fmnist.pt", "flexiq_tvm/cli.py"):
        assert must in names, must
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(whl).read(entry).decode()
    assert "flexiq-tvm = flexiq_tvm.cli:main" in text
