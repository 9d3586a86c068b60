"""The shell path for a user's model: `flexiq-tvm compile some.onnx --calib dir --ratios
0,0.5,1 --out m.flexiq`, then `flexiq-tvm serve m.flexiq` in a subprocess answering with the
logits the Python API gives; and every bad input one line on stderr with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import flexiq_tvm
from flexiq_tvm import cli

sys.path.insert(0, str(Path(__file__).parent))
from test_onnx_only import Fire, _data, _export

CLI = [sys.executable, "-m", "flexiq_tvm.cli"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("usermodel")
    torch.manual_seed(0)
    x = _data()
    _export(Fire(), x, d / "fire.onnx")
    g = np.random.default_rng(0)
    (d / "imgs").mkdir()
    for i in range(24):  # photos of other sizes: resized and center-cropped to 16 x 16
        Image.fromarray(g.integers(0, 255, (18 + i, 24, 3), dtype=np.uint8)).save(
            d / "imgs" / f"{i:02d}.png")
    np.save(d / "calib.npy", x)
    np.save(d / "few.npy", x[:4])
    np.save(d / "small.npy", x[:, :, :8, :8])
    np.save(d / "bool.npy", x > 0)
    (d / "rand.onnx").write_bytes(np.random.default_rng(1).bytes(600))
    (d / "trunc.onnx").write_bytes((d / "fire.onnx").read_bytes()[:3000])
    (d / "notplan.npz").write_text("hello")
    p = onnx.load(str(d / "fire.onnx"))
    p.graph.node[2].domain = "com.acme"
    p.opset_import.append(onnx.helper.make_opsetid("com.acme", 1))
    onnx.save(p, str(d / "custom.onnx"))
    return d


def test_compile_an_onnx_file_then_serve_it_from_the_shell(files, tmp_path):
    out = tmp_path / "m.flexiq"
    r = subprocess.run([*CLI, "compile", str(files / "fire.onnx"), "--calib",
                        str(files / "imgs"), "--ratios", "0,0.5,1", "--out", str(out),
                        "--reconstruct"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "24 calibration samples" in lines[0] and "input (1, 3, 16, 16)" in lines[0]
    rows = [ln.split() for ln in lines[2:5]]
    assert [row[0] for row in rows] == ["0", "0.5", "1"]
    assert all(row[2] == "8" and row[3] == "0" for row in rows)  # 8 covered, none in FP32
    assert float(rows[0][4]) >= 25.0  # SQNR of ratio 0 vs onnxruntime FP32, in dB
    assert r.stderr.count("\n") <= 2, r.stderr  # quiet: no warnings flood
    mod = flexiq_tvm.load(out)
    assert mod.ratios == (0.0, 0.5, 1.0)
    x = _data(5)[:1]
    srv = subprocess.Popen([*CLI, "serve", str(out), "--ratio", "0.5", "--port", "0"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = srv.stdout.readline()
        url = line.split(" on ")[1].split(" ")[0]
        req = urllib.request.Request(url + "/v1/infer", data=x[0].astype("<f4").tobytes(),
                                     headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            doc = json.loads(resp.read())
    finally:
        srv.terminate()
        srv.wait(20)
    assert doc["ratio"] == 0.5
    assert np.array_equal(np.asarray(doc["output"], np.float32), mod(x, ratio=0.5)[0])


def _bad(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("argv,msg", [
    (["compile", "{d}/missing.onnx", "--calib", "{d}/imgs"], "no such model file"),
    (["compile", "{d}/rand.onnx", "--calib", "{d}/imgs"], "not a readable ONNX model"),
    (["compile", "{d}/trunc.onnx", "--calib", "{d}/imgs"], "not a readable ONNX model"),
    (["compile", "{d}/custom.onnx", "--calib", "{d}/imgs"], "custom domain 'com.acme'"),
    (["compile", "{d}/imgs", "--calib", "{d}/imgs"], "is a directory, not a model file"),
    (["compile", "{d}/fire.onnx"], "--calib is required"),
    (["compile", "{d}/fire.onnx", "--calib", "{d}/nowhere"], "no such calibration data"),
    (["compile", "{d}/fire.onnx", "--calib", "{d}/small.npy"],
     "shape (96, 3, 8, 8); expected (N, 3, 16, 16)"),
    (["compile", "{d}/fire.onnx", "--calib", "{d}/bool.npy"], "dtype bool; expected numbers"),
    (["compile", "{d}/fire.onnx", "--calib", "{d}/few.npy"], "4 calibration samples"),
    (["compile", "{d}/fire.onnx", "--calib", "{d}/imgs", "--ratios", "0,1.5"],
     "each ratio must be in [0, 1]"),
    (["compile", "{d}/fire.onnx", "--calib", "{d}/imgs", "--ratios", "0,half"],
     "ratio 'half' is not a number"),
    (["compile", "{d}/fire.onnx", "--calib", "{d}/imgs", "--out", "{d}/no/such/m.flexiq"],
     "does not exist"),
    (["compile", "{d}/fire.onnx", "--calib", "{d}/imgs", "--out", "{d}/imgs"],
     "is a directory; give a file name"),
    (["compile", "{d}/fire.onnx", "--calib", "{d}/imgs", "--input-size", "abc"],
     "expected H or H,W"),
    (["compile", "{d}/fire.onnx", "--calib", "{d}/imgs", "--input-size", "32"],
     "the model takes 16x16"),
    (["compile", "--model", "resnet20_fmnist", "--plan", "{d}/notplan.npz"],
     "not a FlexiQ plan"),
])
def test_bad_input_is_one_line_and_exit_2(files, capsys, argv, msg):
    t = time.perf_counter()
    code, err = _bad([a.format(d=files) for a in argv], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("flexiq-tvm compile: error:") and msg in err[0], err
    assert time.perf_counter() - t < 30  # refused before any calibration or build


def test_an_unwritable_out_is_refused_before_any_work(files, capsys, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes everywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, err = _bad(["compile", str(files / "fire.onnx"), "--calib", str(files / "imgs"),
                      "--out", str(ro / "m.flexiq")], capsys)
    assert code == 2 and "not writable" in err[0]


def test_serve_with_a_key_the_artifact_was_not_signed_with(files, capsys, tmp_path):
    out = tmp_path / "signed.flexiq"
    assert cli.main(["compile", str(files / "fire.onnx"), "--calib", str(files / "calib.npy"),
                     "--ratios", "0,1", "--out", str(out)]) == 0
    capsys.readouterr()
    key = tmp_path / "key"
    key.write_bytes(b"secret")
    code, err = _bad(["serve", str(out), "--ratio", "0", "--key-file", str(key)], capsys)
    assert code == 2 and len(err) == 1 and "not signed, but a key was given" in err[0]
    assert not list(tmp_path.glob("*.tmp"))  # nothing partial left behind


def test_a_config_value_of_the_wrong_type_is_a_clear_error():
    with pytest.raises(TypeError, match=r"ratios=0.5: must be a sequence of numbers"):
        flexiq_tvm.FlexiQConfig(ratios=0.5)
    with pytest.raises(TypeError, match=r"calib_images='64': must be an integer"):
        flexiq_tvm.FlexiQConfig(calib_images="64")
    with pytest.raises(TypeError, match=r"depthwise_low=1: must be True or False"):
        flexiq_tvm.FlexiQConfig(depthwise_low=1)
