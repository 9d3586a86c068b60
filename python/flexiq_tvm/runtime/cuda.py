"""Running CUDA modules with a runtime-only TVM (no ``libtvm_compiler``).

A module compiled for CUDA on a machine without a GPU keeps its kernels as CUDA source: TVM
compiles them when the module is loaded on a GPU, through the global callback
``tvm_callback_cuda_compile``. With TVM's compiler present, TVM registers that callback and
loads its CUDA runtime at ``import tvm``. A runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``, or a
deployment that ships ``libtvm_runtime`` alone) does neither, so :func:`cuda_runtime`:

- loads TVM's CUDA runtime (``libtvm_runtime_cuda``), which the ``cuda`` device needs;
- in runtime-only mode, registers a callback that answers from binaries compiled ahead of
  time (:func:`precompile`, :func:`add_binaries`; keyed by the source's SHA-256) and otherwise
  runs ``nvcc`` for the GPU it finds.

So a CUDA artifact can be built on a CPU machine and run on a GPU machine that has only the
TVM runtime (``scripts/gpu_check.py`` does exactly that).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_BINARIES: dict[str, bytes] = {}


def source_key(code: str) -> str:
    """The key of a kernel source's precompiled binary: its SHA-256 (hex)."""
    return hashlib.sha256(code.encode()).hexdigest()


def nvcc_path() -> str | None:
    """``nvcc`` on the PATH, under ``$CUDA_HOME`` or in ``/usr/local/cuda``; None if absent."""
    found = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not found and home and os.access(Path(home, "bin", "nvcc"), os.X_OK):
            found = str(Path(home, "bin", "nvcc"))
    return found


def cuda_tool(name: str) -> str | None:
    """A CUDA binary tool (``cuobjdump``, ``nvdisasm``): on the PATH, beside nvcc, or from the
    ``nvidia-cuda-cuobjdump`` / ``nvidia-cuda-nvdisasm`` wheels (``requirements.txt``)."""
    import sysconfig

    found = shutil.which(name)
    nvcc = nvcc_path()
    dirs = ([Path(nvcc).parent] if nvcc else []) + [
        Path(sysconfig.get_paths()["purelib"], "nvidia", sub, "bin") for sub in ("cu13", "")]
    for d in dirs:
        if not found and os.access(d / name, os.X_OK):
            found = str(d / name)
    return found


def sass(binary: bytes) -> str:
    """The SASS (machine code) of a cubin or fatbin, as ``cuobjdump -sass`` prints it."""
    dump, disasm = cuda_tool("cuobjdump"), cuda_tool("nvdisasm")
    if dump is None or disasm is None:
        raise RuntimeError("cuobjdump and nvdisasm are needed to read SASS (pip install "
                           "nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    with tempfile.TemporaryDirectory(prefix="flexiq_sass_") as d:
        path = Path(d, "kernels.bin")
        path.write_bytes(bytes(binary))
        r = subprocess.run([dump, "-sass", str(path)], capture_output=True, text=True,
                           env=dict(os.environ, NVDISASM_PATH=str(Path(disasm).parent)))
    if r.returncode:
        raise RuntimeError(f"cuobjdump -sass failed:\n{r.stderr[-2000:]}")
    return r.stdout


def compile_source(code: str, arch: str) -> bytes:
    """A fatbin (``sm_XY`` machine code plus its PTX) of one CUDA source, made by ``nvcc``."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda): it is needed "
                           "to compile this module's CUDA kernels")
    with tempfile.TemporaryDirectory(prefix="flexiq_nvcc_") as d:
        src, out = Path(d, "kernels.cu"), Path(d, "kernels.fatbin")
        src.write_text(code)
        r = subprocess.run([nvcc, "--fatbin", "-O3", f"-arch={arch}", "-diag-suppress=177",
                            "-o", str(out), str(src)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"nvcc -arch={arch} failed:\n{r.stderr[-2000:]}")
        return out.read_bytes()


def _device_arch() -> str:
    import tvm

    return "sm_" + tvm.cuda(0).compute_version.replace(".", "")


def _compile_callback(code, *_):
    key = source_key(str(code))
    if key not in _BINARIES:
        _BINARIES[key] = compile_source(str(code), _device_arch())
    return bytearray(_BINARIES[key])


def cuda_runtime() -> bool:
    """Make sure TVM's CUDA runtime is loaded (and, without TVM's compiler, that CUDA source
    gets compiled at load); returns whether the runtime is loaded. Loading fails quietly
    where the CUDA driver or ``libcudart`` is missing: ``tvm.cuda(0).exist`` then says so."""
    global LOAD_ERROR
    import tvm.base
    import tvm_ffi
    from tvm_ffi.libinfo import load_lib_ctypes

    if tvm.base._RUNTIME_ONLY:
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", _compile_callback,
                                     override=True)
    libs = tvm.base._LOADED_LIBS
    for attempt in range(2):
        if "tvm_runtime_cuda" in libs:
            break
        try:
            libs["tvm_runtime_cuda"] = load_lib_ctypes(
                "tvm", "tvm_runtime_cuda", "RTLD_LOCAL",
                extra_lib_paths=[Path(libs["tvm_runtime"]._name).resolve().parent])
        except (OSError, RuntimeError) as e:
            LOAD_ERROR = f"{type(e).__name__}: {e}"
            if attempt or not _preload_cuda_libs():
                return False
    return True


LOAD_ERROR: str | None = None  # why TVM's CUDA runtime did not load, if it did not


def _preload_cuda_libs() -> bool:
    """Load the CUDA driver and runtime that ``libtvm_runtime_cuda`` links (``libcuda.so.1``,
    ``libcudart.so.13``) from where a CUDA install or the ``nvidia-*`` wheels keep them,
    when the dynamic loader's path lacks them; returns whether any was loaded."""
    import ctypes
    import sysconfig

    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", "/usr/local/nvidia"]
    dirs = [Path(h, sub) for h in homes if h for sub in ("lib64", "lib")]
    sites = {sysconfig.get_paths()["purelib"], *(p for p in sys.path if p)}
    dirs += [Path(p, "nvidia", sub, "lib") for p in sites for sub in ("cu13", "cuda_runtime")]
    loaded = False
    for name in ("libcuda.so.1", "libcudart.so.13"):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)  # already on the loader's path
            continue
        except OSError:
            pass
        for d in dirs:
            if (d / name).exists():
                try:
                    ctypes.CDLL(str(d / name), mode=ctypes.RTLD_GLOBAL)
                    loaded = True
                    break
                except OSError:
                    continue
    return loaded


def add_binaries(folder) -> int:
    """Use the ``<source_key>.fatbin`` files in ``folder`` (made by :func:`precompile`) when a
    runtime-only TVM loads CUDA source; returns how many were added."""
    paths = sorted(Path(folder).glob("*.fatbin"))
    _BINARIES.update({p.stem: p.read_bytes() for p in paths})
    return len(paths)


def cuda_sources(module) -> list[str]:
    """The CUDA source of every ``cuda`` module imported by ``module`` (a compiled
    executable's ``.mod`` or any runtime module), depth first."""
    out, stack = [], [module]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            out.append(m.inspect_source(""))
        stack.extend(m.imports)
    return out


def precompile(module, arch: str, folder) -> list[str]:
    """Compile ``module``'s CUDA sources for ``arch`` with nvcc into ``folder`` as
    ``<source_key>.fatbin``; returns the keys."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    keys = []
    for code in cuda_sources(module):
        key = source_key(code)
        path = Path(folder, f"{key}.fatbin")
        if not path.exists():
            path.write_bytes(compile_source(code, arch))
        keys.append(key)
    return keys
