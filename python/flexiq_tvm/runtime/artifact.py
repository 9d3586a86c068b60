"""FlexiQ artifacts: one file holding every ratio variant's compiled library plus metadata.

Layout (all integers little-endian)::

    b"FLEXIQA\\x01"  | header length (8 bytes) | header (UTF-8 JSON) | library (shared object)

The header holds the format version, the flexiq-tvm and TVM versions, the ratios, the input
shape and dtype, free metadata (latency profile, accuracy per ratio, plan summary, target),
the library size, ``sha256`` and, when exported with a key, ``hmac`` (HMAC-SHA256). Both are
computed over the header without those two fields (canonical JSON) followed by the library.

:func:`read_verified` checks, in this order and before any byte of the library is loaded as
code: the magic, the header, the sizes (truncation), the checksum (corruption), the signature
when a key is given (tampering: an unsigned or wrongly signed artifact is refused), and the
format and TVM versions. Any failure raises :class:`ArtifactError` with what was wrong.

The library is native code: the checksum only detects accidents; only a signature verified
with a key you hold says who built it.

This module knows bytes and metadata only; :mod:`flexiq_tvm.runtime.module` builds the
runnable module on it (``FlexiQModule.export`` and :func:`~flexiq_tvm.runtime.module.load`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import tempfile
from pathlib import Path

from .._quiet import SCOPE_LOADED, SCOPE_SAVING, native_stderr
from ..hostcpu import missing_features

MAGIC = b"FLEXIQA\x01"
FORMAT = 1
_HEADER_MAX = 16 * 2**20


class ArtifactError(RuntimeError):
    """An artifact that cannot be trusted or used (corrupt, truncated, tampered, mismatched)."""


def _key_bytes(key) -> bytes | None:
    if key is None:
        return None
    k = key.encode() if isinstance(key, str) else bytes(key)
    if not k:
        raise ValueError("an empty signing key is not a key")
    return k


def _message(header: dict, payload: bytes) -> bytes:
    body = {k: v for k, v in header.items() if k not in ("sha256", "hmac")}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + payload


def _versions() -> dict:
    import tvm

    from .._version import __version__

    return {"flexiq_tvm": __version__, "tvm": tvm.__version__}


def write(path, payload: bytes, ratios, input_shape, input_dtype: str,
          metadata: dict | None = None, key=None) -> Path:
    """Write one artifact file: ``payload`` (the compiled library's bytes, every ratio
    variant) behind its header. Atomic: written to ``<path>.tmp``, then renamed."""
    path = Path(path)
    payload = bytes(payload)
    header = {"format": FORMAT, **_versions(), "ratios": [float(r) for r in ratios],
              "input_shape": [int(d) for d in input_shape], "input_dtype": str(input_dtype),
              "metadata": metadata or {}, "payload_size": len(payload)}
    msg = _message(header, payload)
    header["sha256"] = hashlib.sha256(msg).hexdigest()
    k = _key_bytes(key)
    header["hmac"] = hmac.new(k, msg, hashlib.sha256).hexdigest() if k else None
    raw = json.dumps(header, sort_keys=True).encode()
    tmp_path = path.with_name(path.name + ".tmp")
    try:
        with open(tmp_path, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(raw)) + raw + payload)
        os.replace(tmp_path, path)  # never leave a half-written artifact under the final name
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def library_bytes(executable) -> bytes:
    """The shared object ``executable.export_library`` writes, as bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        lib = Path(tmp) / "module.so"
        # the VM executable logs a "Scope Saving" warning per saved function: benign
        with native_stderr(SCOPE_SAVING):
            executable.export_library(str(lib))
        return lib.read_bytes()


def read_verified(path, key=None) -> tuple[dict, bytes]:
    """Header and library bytes of an artifact, after every check (see the module docs)."""
    data = Path(path).read_bytes()
    if len(data) < len(MAGIC) + 8 or data[: len(MAGIC)] != MAGIC:
        raise ArtifactError(f"{path}: not a FlexiQ artifact (bad magic or too short)")
    (hlen,) = struct.unpack("<Q", data[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    if hlen > _HEADER_MAX or start + hlen > len(data):
        raise ArtifactError(f"{path}: truncated or corrupt header")
    try:
        header = json.loads(data[start : start + hlen].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt header ({e})") from None
    if not isinstance(header, dict) or "sha256" not in header or "payload_size" not in header:
        raise ArtifactError(f"{path}: corrupt header (fields missing)")
    payload = data[start + hlen :]
    if len(payload) != header["payload_size"]:
        raise ArtifactError(f"{path}: truncated: library has {len(payload)} of "
                            f"{header['payload_size']} bytes")
    msg = _message(header, payload)
    if not hmac.compare_digest(hashlib.sha256(msg).hexdigest(), str(header["sha256"])):
        raise ArtifactError(f"{path}: checksum mismatch: the artifact is corrupted")
    k = _key_bytes(key)
    if k is not None:
        sig = header.get("hmac")
        if not sig:
            raise ArtifactError(f"{path}: not signed, but a key was given: refusing to load")
        if not hmac.compare_digest(hmac.new(k, msg, hashlib.sha256).hexdigest(), str(sig)):
            raise ArtifactError(f"{path}: signature mismatch: tampered, or signed with "
                                "another key: refusing to load")
    if header.get("format") != FORMAT:
        raise ArtifactError(f"{path}: artifact format {header.get('format')}; this flexiq-tvm "
                            f"reads format {FORMAT}")
    mine = _versions()
    if header.get("tvm") != mine["tvm"]:
        raise ArtifactError(f"{path}: built with TVM {header.get('tvm')}, this runtime has "
                            f"TVM {mine['tvm']}: recompile")
    meta = header.get("metadata", {})
    target = meta.get("target")
    host = target.get("host") if isinstance(target, dict) else None
    lacking = list(dict.fromkeys(
        missing_features(target) + missing_features(meta.get("host_target"))
        + missing_features(host) + missing_features(meta.get("kernel_target"))))
    if lacking:
        raise ArtifactError(f"{path}: compiled for CPU features this machine lacks "
                            f"({', '.join(lacking)}; kernels: {meta.get('isa') or '?'}): "
                            "recompile here, or on the build machine with --isa avx2")
    return header, payload


def load_library(path, header: dict, payload: bytes, device=None):
    """Load a verified artifact's library as a TVM runtime module, and the device to run it
    on (CUDA artifacts load TVM's CUDA runtime first and need a GPU)."""
    import tvm

    target = header.get("metadata", {}).get("target")
    if isinstance(target, dict) and target.get("kind") == "cuda":
        from .cuda import cuda_runtime

        cuda_runtime()  # a runtime-only TVM loads no backend by itself
        if device is None:
            device = tvm.cuda(0)
        if not device.exist:  # its library holds CUDA code: loading it needs the runtime
            raise ArtifactError(f"{path}: compiled for CUDA ({target.get('arch')}); this "
                                "machine has no CUDA GPU to run it on")
    fd, lib = tempfile.mkstemp(suffix=".so", prefix="flexiq_")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        # the VM executable logs a "Scope Loaded" warning per loaded function: benign
        with native_stderr(SCOPE_LOADED):
            rt = tvm.runtime.load_module(lib)
    finally:
        os.unlink(lib)  # the loaded code stays mapped
    return rt, device
