"""The FlexiNPU simulator as a host library (ctypes): unit tests, per-layer oracle checks
and cycle reports run programs here without TVM.

``library()`` compiles ``flexinpu.c`` with the system C compiler on first use (cached by the
source's hash under ``$FLEXIQ_CACHE`` or ``~/.cache/flexiq_tvm``); the TVM runtime modules
of the ``flexiq_npu`` target embed the same source.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "flexinpu.h", HERE / "flexinpu.c")
CFLAGS = ["-O2", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared", "-std=c99"]
STATS = ("compute_cycles", "dma_cycles", "vector_cycles", "total_cycles", "macs", "low_macs")

_lib = None


class Stats(ctypes.Structure):
    _fields_ = [(k, ctypes.c_int64) for k in STATS]


def compiler() -> str:
    """The system C compiler (``$CC``, cc, gcc or clang); a clear error if there is none."""
    for c in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if c and shutil.which(c):
            return shutil.which(c)
    raise RuntimeError("the FlexiNPU simulator needs a C compiler: install gcc "
                       "(apt-get install gcc) or set CC")


def library() -> ctypes.CDLL:
    """The compiled simulator (built once per source version)."""
    global _lib
    if _lib is not None:
        return _lib
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:16]
    cache = Path(os.environ.get("FLEXIQ_CACHE", Path.home() / ".cache" / "flexiq_tvm"))
    so = cache / f"libflexinpu-{digest}.so"
    if not so.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            out = Path(tmp) / so.name
            cmd = [compiler(), *CFLAGS, str(HERE / "flexinpu.c"), "-o", str(out), "-lm"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"building the FlexiNPU simulator failed:\n{res.stderr}")
            os.replace(out, so)
    lib = ctypes.CDLL(str(so))
    fp = ctypes.POINTER(ctypes.c_float)
    lib.fnpu_run.argtypes = [ctypes.c_char_p, fp, fp, fp, ctypes.POINTER(Stats),
                             ctypes.POINTER(ctypes.c_int32)]
    lib.fnpu_run.restype = ctypes.c_int
    lib.fnpu_patch_boundaries.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.fnpu_patch_boundaries.restype = ctypes.c_int
    lib.fnpu_error_string.argtypes = [ctypes.c_int]
    lib.fnpu_error_string.restype = ctypes.c_char_p
    _lib = lib
    return lib


class SimulatorError(RuntimeError):
    pass


def _fptr(a):
    return None if a is None else a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))


def patch(program: bytes, ratio_index: int) -> bytes:
    """The program with ratio ``ratio_index``'s boundaries written into its SETB words."""
    buf = ctypes.create_string_buffer(bytes(program), len(program))
    rc = library().fnpu_patch_boundaries(buf, ratio_index)
    if rc:
        raise SimulatorError(library().fnpu_error_string(rc).decode())
    return buf.raw


def run(program: bytes, out_shape, in0: np.ndarray, in1: np.ndarray | None = None,
        acc_size: int | None = None) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """Run ``program``: ``(output float32, stats, last CONV/GEMM accumulators or None)``."""
    lib = library()
    a = np.ascontiguousarray(in0, np.float32)
    b = None if in1 is None else np.ascontiguousarray(in1, np.float32)
    out = np.zeros(out_shape, np.float32)
    acc = None if acc_size is None else np.zeros(acc_size, np.int32)
    st = Stats()
    rc = lib.fnpu_run(bytes(program), _fptr(a), _fptr(b), _fptr(out), ctypes.byref(st),
                      None if acc is None else acc.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)))
    if rc:
        raise SimulatorError(lib.fnpu_error_string(rc).decode())
    return out, {k: int(getattr(st, k)) for k in STATS}, acc
