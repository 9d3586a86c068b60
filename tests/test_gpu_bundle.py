"""The GPU check's bundle (scripts/gpu_check.py): built here with the compiler, run on a GPU
machine by a runtime-only TVM. Checked without a GPU: the pieces the GPU machine runs work
with a runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``, in a fresh process), a model bundle built
for the CPU runs there bit-exact with the oracle, and a kernel bundle's precompiled binary is
keyed by exactly the source the runtime will hand to its compile callback."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flexiq_tvm.schedules.cuda import emulate

from flexiq_tvm import reference as ref

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runtime_only(code: str) -> dict:
    """Run ``code`` in a fresh process whose TVM loads its runtime library alone; its last
    output line is JSON."""
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1", TVM_FFI_DISABLE_TORCH_C_DLPACK="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runtime_only_tvm_lays_out_operands_and_serves_precompiled_binaries(tmp_path):
    """Without the compiler: the host layout imports and packs; the CUDA compile callback
    that cuda_runtime() registers answers from the precompiled binaries by source hash."""
    code = "extern \"C\" __global__ void k() {}\n"
    from flexiq_tvm.runtime.cuda import source_key

    (tmp_path / f"{source_key(code)}.fatbin").write_bytes(b"\x7fprecompiled")
    out = _runtime_only(f"""
import json, numpy as np, tvm, tvm.base, tvm_ffi
from flexiq_tvm.schedules.cuda import pack
from flexiq_tvm.runtime.cuda import add_binaries, cuda_runtime
cuda_runtime()
n = add_binaries({str(tmp_path)!r})
cb = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
arrays, runs, chunks4, k8p = pack(np.ones((16, 40), np.int64), np.ones((8, 40), np.int64),
                                  np.ones((16, 3), np.int64), np.ones((8, 3), np.int64),
                                  np.array([2, 2, 5]), False)
print(json.dumps({{"runtime_only": tvm.base._RUNTIME_ONLY, "added": n,
                  "binary": bytes(cb({code!r})).hex(), "runs": runs, "k8p": k8p}}))
""")
    assert out == {"runtime_only": True, "added": 1, "binary": b"\x7fprecompiled".hex(),
                   "runs": 2, "k8p": 64}


def test_model_bundle_is_bit_exact_on_a_runtime_only_tvm(gpu_check, tmp_path):
    """The bundle's model half with the CPU standing in for the GPU: compiled here with its
    layers exposed, then loaded by a runtime-only TVM, every covered layer equals the oracle
    at ratios 0 / 0.5 / 1 (the very code the GPU machine runs)."""
    (tmp_path / "models").mkdir()
    spec = gpu_check._model(tmp_path, "llvm", "resnet20_fmnist", print, ratios=(0, 0.5, 1))
    assert spec["layers"] == 22 and spec["sources"] == []  # 19 convs, 2 shortcuts, the fc
    res = _runtime_only(f"""
import importlib.util, json, tvm, tvm.base
from pathlib import Path
s = importlib.util.spec_from_file_location("gc", {str(ROOT / "scripts" / "gpu_check.py")!r})
gc = importlib.util.module_from_spec(s); s.loader.exec_module(gc)
res = gc.run_model(Path({str(tmp_path)!r}), {spec!r}, tvm.cpu())
res["runtime_only"] = tvm.base._RUNTIME_ONLY
print(json.dumps(res))
""")
    assert res["runtime_only"] is True
    assert res["mismatches"] == {r: [[], []] for r in ("0", "0.5", "1")}
    assert res["bit_exact"] is True
    assert sorted(res["latency_ms"]) == ["0", "0.5", "1"]


@pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="nvcc is not installed")
@pytest.mark.parametrize("int4", [False, True])
def test_kernel_bundle_entry_is_consistent(gpu_check, tmp_path, int4):
    """One exactness case as prepare writes it for sm_90 (INT8 path; s4 mma.sync, which
    ptxas accepts for Hopper): the exported library holds the CUDA source whose nvcc binary is
    in bin/sm_90 under its hash, and the case's operands lay out again to the kernel's run
    table (regenerated from the seed, as the GPU machine does), their fragment emulation equal
    to the oracle the GPU run compares with."""
    import tvm
    from flexiq_tvm.schedules.cuda import mixed_gemm

    from flexiq_tvm.runtime.cuda import cuda_sources, source_key

    for sub in ("kernels", "bin/sm_90"):
        (tmp_path / sub).mkdir(parents=True)
    m, n, k = 32, 16, 256
    spec = gpu_check._kernel(tmp_path, "sm_90", "k", m, n, k, 0.5, int4, True, 3, print)
    ops = gpu_check.operands(m, n, k, 0.5, spec["seed"])
    assert gpu_check._digest(ops) == spec["operands_sha256"]
    arrays, runs, chunks4, k8p = gpu_check.layout(ops, int4)
    assert arrays["run_table"].tolist() == spec["run_table"] and runs > 1
    want = ref.mixed_matmul(ops["q"].astype(np.int32), ops["w"], ops["low"], ops["sa"],
                            ops["sw"], False)
    assert np.array_equal(emulate(arrays, m, n, k8p, runs, int4, False), want)
    # the source TVM generates for this kernel is in the library, and its binary under its key
    ex = tvm.compile(tvm.IRModule({"main": mixed_gemm(m, n, k8p, runs, chunks4, int4)}),
                     target={"kind": "cuda", "arch": "sm_90"})
    (code,) = cuda_sources(ex.mod)
    assert spec["sources"] == [source_key(code)]
    assert code.encode() in (tmp_path / "kernels" / "k.so").read_bytes()
    fatbin = (tmp_path / "bin" / "sm_90" / f"{source_key(code)}.fatbin").read_bytes()
    assert fatbin[:4] == bytes.fromhex("50ed55ba") and len(fatbin) > 1000  # fatbin magic
