"""Deployable artifacts and the runtime: round trip in a fresh process without torch, every
kind of bad artifact refused before its code loads, concurrent calls equal serial ones."""

from __future__ import annotations

import hashlib
import json
import platform
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

import flexiq_tvm
from flexiq_tvm import ArtifactError, FlexiQConfig
from flexiq_tvm.runtime import artifact
from flexiq_tvm.zoo import data, registry

KEY = b"test-signing-key"


@pytest.fixture(scope="module")
def compiled():
    model = registry.get_model("resnet20_fmnist")
    cfg = FlexiQConfig(selection="static", calib_images=32, ratios=(0, 0.5, 1))
    xs, _ = data.load_fmnist("test", 8)
    cm = flexiq_tvm.compile(model, xs[:1], data.fmnist_calibration(32), config=cfg)
    return cm, xs


@pytest.fixture(scope="module")
def signed(compiled, tmp_path_factory):
    cm, _ = compiled
    path = tmp_path_factory.mktemp("art") / "resnet20.flexiq"
    cm.export(path, key=KEY, accuracy={0: 0.95, 0.5: 0.95, 1: 0.94})
    return path


def test_round_trip_in_a_fresh_process_without_torch(compiled, signed, tmp_path):
    cm, xs = compiled
    np.save(tmp_path / "x.npy", xs[:4])
    code = f"""
import sys
class NoTorch:  # a machine without torch: importing it fails
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed here")
sys.meta_path.insert(0, NoTorch())
import json, numpy as np
import flexiq_tvm
m = flexiq_tvm.load({str(signed)!r}, key={KEY!r})
xs = np.load({str(tmp_path / 'x.npy')!r})
out = {{f"{{r:g}}": [m(xs[i:i+1], ratio=r).tolist() for i in range(4)] for r in m.ratios}}
print(json.dumps({{"torch": "torch" in sys.modules, "ratios": list(m.ratios),
                  "meta": sorted(m.metadata), "acc": m.metadata["accuracy"], "out": out}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["torch"] is False
    assert doc["ratios"] == [0.0, 0.5, 1.0]
    assert {"profile_ms", "accuracy", "plan", "report", "target", "versions"} <= set(doc["meta"])
    assert doc["acc"] == {"0": 0.95, "0.5": 0.95, "1": 0.94}
    for r in cm.ratios:  # the same library on the same input: identical logits
        want = [cm(xs[i : i + 1], ratio=r).tolist() for i in range(4)]
        assert doc["out"][f"{r:g}"] == want


def _rewrite(src, dst, mutate_header=None, mutate_payload=None, resign=False, key=None):
    raw = src.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[8:16])
    header = json.loads(raw[16 : 16 + hlen])
    payload = bytearray(raw[16 + hlen :])
    if mutate_header:
        mutate_header(header)
    if mutate_payload:
        mutate_payload(payload)
    if resign:  # an attacker recomputes the checksum (but has no key)
        msg = artifact._message(header, bytes(payload))
        header["sha256"] = hashlib.sha256(msg).hexdigest()
        if key:
            import hmac

            header["hmac"] = hmac.new(key, msg, hashlib.sha256).hexdigest()
    h = json.dumps(header, sort_keys=True).encode()
    dst.write_bytes(raw[:8] + struct.pack("<Q", len(h)) + h + bytes(payload))
    return dst


def _flip(p):
    p[len(p) // 2] ^= 0xFF


@pytest.mark.parametrize("case,match", [
    ("corrupted", "checksum mismatch"),
    ("truncated", "truncated"),
    ("tampered", "signature mismatch"),
    ("wrong_key", "signature mismatch"),
    ("unsigned_with_key", "not signed"),
    ("other_tvm", "built with TVM"),
    ("not_an_artifact", "not a FlexiQ artifact"),
    ("bad_header", "corrupt header"),
    ("cpu_lacks_features", "CPU features this machine lacks"),
])
def test_bad_artifacts_are_refused_before_loading(compiled, signed, tmp_path, case, match,
                                                  monkeypatch):
    loaded = []
    import tvm

    monkeypatch.setattr(tvm.runtime, "load_module", lambda *a: loaded.append(a))
    dst = tmp_path / f"{case}.flexiq"
    key = KEY
    if case == "corrupted":
        _rewrite(signed, dst, mutate_payload=_flip)
    elif case == "truncated":
        dst.write_bytes(signed.read_bytes()[:-1000])
    elif case == "tampered":
        _rewrite(signed, dst, mutate_payload=_flip, resign=True)
    elif case == "wrong_key":
        dst, key = signed, b"another key"
    elif case == "unsigned_with_key":
        cm, _ = compiled
        cm.export(dst, profile={"0": 1.0, "0.5": 1.0, "1": 1.0})
    elif case == "other_tvm":
        _rewrite(signed, dst, mutate_header=lambda h: h.update(tvm="0.1.0"), resign=True,
                 key=KEY)
    elif case == "not_an_artifact":
        dst.write_bytes(b"\x7fELF" + b"\0" * 100)
    elif case == "bad_header":
        raw = bytearray(signed.read_bytes())
        raw[16] = ord("#")  # the header's opening brace: no longer JSON
        dst.write_bytes(bytes(raw))
    elif case == "cpu_lacks_features":  # built with VNNI kernels, loaded on a CPU without
        from flexiq_tvm import hostcpu

        def vnni_target(h):
            t = h["metadata"]["kernel_target"]
            t = dict(json.loads(t) if isinstance(t, str) else t)
            t["mattr"] = hostcpu.kernel_mattr("avx512vnni")
            h["metadata"]["kernel_target"] = t

        _rewrite(signed, dst, mutate_header=vnni_target, resign=True, key=KEY)
        monkeypatch.setattr(hostcpu, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.raises(ArtifactError, match=match):
        flexiq_tvm.load(dst, key=key)
    assert loaded == []  # no code of a refused artifact was loaded


def test_unsigned_artifact_loads_without_key_and_keeps_metadata(compiled, tmp_path):
    cm, xs = compiled
    path = cm.export(tmp_path / "u.flexiq", profile={"0": 1.0, "0.5": 0.9, "1": 0.8})
    m = flexiq_tvm.load(path)
    assert m.metadata["profile_ms"] == {"0": 1.0, "0.5": 0.9, "1": 0.8}
    assert np.array_equal(m(xs[:1], ratio=0.5), cm(xs[:1], ratio=0.5))
    assert not list(tmp_path.glob("*.tmp"))


def test_concurrent_calls_equal_serial_calls(compiled):
    cm, xs = compiled
    jobs = [(i % 8, cm.ratios[i % 3]) for i in range(48)]
    serial = [cm(xs[i : i + 1], ratio=r) for i, r in jobs]
    results = [None] * len(jobs)

    def work(k0):
        for k in range(k0, len(jobs), 4):
            i, r = jobs[k]
            results[k] = cm(xs[i : i + 1], ratio=r)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(a, b) for a, b in zip(results, serial, strict=True))


def test_per_call_ratio_leaves_the_module_ratio_alone(compiled):
    cm, xs = compiled
    cm.set_ratio(1.0)
    a = cm(xs[:1], ratio=0.0)
    assert cm.ratio == 1.0
    assert np.array_equal(a, cm(xs[:1], ratio=0.0))
    with pytest.raises(ValueError, match=r"compiled ratios: \[0.0, 0.5, 1.0\]"):
        cm(xs[:1], ratio=0.25)
    prof = cm.profile(xs[:1], repeat=3, warmup=1)
    assert set(prof) == {"0", "0.5", "1"} and all(v > 0 for v in prof.values())


def test_missing_cpu_features_are_read_from_the_target(monkeypatch):
    from flexiq_tvm import hostcpu

    monkeypatch.setattr(hostcpu, "cpu_flags", lambda: frozenset({"avx2"}))
    t = {"kind": "llvm", "mattr": ["-fma", "+avxvnni"]}
    assert hostcpu.missing_features(t) == ["avxvnni"]
    assert hostcpu.missing_features(json.dumps(t)) == ["avxvnni"]
    assert hostcpu.missing_features({"kind": "llvm", "mattr": ["-fma"]}) == []
    assert hostcpu.missing_features("flexiq_npu") == [] and hostcpu.missing_features(None) == []
    t512 = {"kind": "llvm", "mattr": hostcpu.kernel_mattr("avx512vnni")}
    assert hostcpu.missing_features(t512) == ["avx512f", "avx512bw", "avx512vl", "avx512vnni"]
    monkeypatch.setattr(hostcpu, "cpu_flags", lambda: frozenset({"avx2", "avx_vnni"}))
    assert hostcpu.missing_features(t) == []
    monkeypatch.setenv("FLEXIQ_AVXVNNI", "0")
    assert not hostcpu.avx_vnni() and hostcpu.best_isa() == "avx2"
    monkeypatch.setenv("FLEXIQ_AVXVNNI", "1")
    x86 = platform.machine() in ("x86_64", "AMD64")
    assert hostcpu.avx_vnni() == x86


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISAs")
def test_the_best_isa_follows_the_cpu_and_a_missing_one_is_one_clear_error(monkeypatch):
    from flexiq_tvm import hostcpu

    avx512 = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
    for flags, best in [({"avx2"}, "avx2"), ({"avx2", "avx_vnni"}, "avxvnni"),
                        (avx512, "avx512vnni"), (avx512 | {"avx_vnni"}, "avx512vnni")]:
        monkeypatch.setattr(hostcpu, "cpu_flags", lambda f=flags: frozenset(f))
        assert hostcpu.best_isa() == best and hostcpu.check_isa(None) == best
    assert hostcpu.check_isa("AVX-512-VNNI") == "avx512vnni"  # spelling is forgiven
    monkeypatch.setenv("FLEXIQ_ISA", "avx2")
    assert hostcpu.best_isa() == "avx2"
    monkeypatch.setattr(hostcpu, "cpu_flags", lambda: frozenset({"avx2"}))
    with pytest.raises(ValueError, match=r"isa=avx512vnni: this CPU lacks avx512f, avx512bw, "
                                         r"avx512vl, avx512_vnni \(it runs: avx2\)"):
        hostcpu.check_isa("avx512vnni")
    with pytest.raises(ValueError, match=r"isa='sse': choose one of avx2, avxvnni, avx512vnni"):
        hostcpu.check_isa("sse")


def test_export_and_load_are_quiet_and_a_loaded_artifact_exports_again(compiled, signed,
                                                                      tmp_path, capfd):
    """TVM's per-function "Scope Saving" / "Scope Loaded" warnings stay hidden, and a loaded
    artifact re-exports its own library: same code, new metadata, same outputs."""
    cm, xs = compiled
    capfd.readouterr()
    m = flexiq_tvm.load(signed, key=KEY)
    again = m.export(tmp_path / "again.flexiq", key=KEY, accuracy={0: 0.5})
    assert capfd.readouterr().err == ""
    h1, p1 = artifact.read_verified(signed, KEY)
    h2, p2 = artifact.read_verified(again, KEY)
    assert p1 == p2
    assert h2["metadata"]["accuracy"] == {"0": 0.5}
    assert h2["metadata"]["profile_ms"] == h1["metadata"]["profile_ms"]
    m2 = flexiq_tvm.load(again, key=KEY)
    for r in (0.0, 1.0):
        np.testing.assert_array_equal(m2(xs[:1], ratio=r), cm(xs[:1], ratio=r))


def test_the_artifact_marks_the_ratios_that_pay(signed):
    from flexiq_tvm.runtime.policy import pareto_ratios

    m = flexiq_tvm.load(signed, key=KEY)
    profile = m.metadata["profile_ms"]
    assert set(profile) == {"0", "0.5", "1"}
    want = [f"{r:g}" for r in pareto_ratios(profile)]
    assert m.metadata["ratios_that_pay"] == want and want[0] == "0"
