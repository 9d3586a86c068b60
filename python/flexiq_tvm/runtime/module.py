"""The deployable side of a FlexiQ module: call it, switch ratios, profile it, export it.

:class:`FlexiQModule` wraps a built Relax executable holding one entry function per ratio
(``main_r000``, ``main_r050``, ...). It imports neither torch nor the quantizer, so a module
loaded from an artifact (:func:`flexiq_tvm.load`) runs with TVM and numpy alone.

Thread safety: each thread gets its own ``VirtualMachine`` over the shared executable (a VM
keeps per-call state), so concurrent calls return exactly what serial calls return. The
module-wide ratio is one attribute write (``set_ratio``); a call may also name its own ratio
without touching the module-wide one.

Switch mode (``metadata["ratio_switch"] = {"entry": ..., "function": ...}``, the flexiq_npu
target): the ratio lives in the device's instruction memory; ``function(i)`` patches it to the
``i``-th compiled ratio. One entry function serves every ratio (``entry``), or, when some
layers run FlexiQ kernels on the CPU too, the per-ratio entries (``entry`` None). Calls are
serialized (one simulated device), and a call at another ratio patches before it runs.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..plan import variant_name
from .artifact import library_bytes, load_library, read_verified, write
from .policy import pareto_ratios


def median_ms(fn, repeat: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


class FlexiQModule:
    """A compiled FlexiQ module: ``mod(x)``, ``mod(x, ratio=r)``, ``mod.set_ratio(r)``.

    Parameters
    ----------
    executable
        A ``relax`` Executable or a runtime Module loaded from an exported library.
    ratios
        The compiled ratios (each has an entry function ``variant_name(r)``).
    input_shape, input_dtype
        What the module was compiled for; calls with anything else raise before running.
    metadata
        Free-form facts kept with the module (profile, accuracy, plan summary, target, ...).
    exportable
        What :meth:`export` writes when ``executable`` is a library jitted from it (default:
        ``executable`` itself).
    library
        The library's bytes when the module was loaded from an artifact: :meth:`export`
        writes them again (a loaded runtime module cannot serialize itself).
    """

    def __init__(self, executable, ratios, input_shape, input_dtype: str = "float32",
                 device=None, metadata: dict | None = None, exportable=None,
                 library: bytes | None = None) -> None:
        import tvm

        self.executable = executable
        # what export writes: the executable itself, or the one a jitted library came from
        self.exportable = executable if exportable is None else exportable
        self._library = library
        self.device = device or tvm.cpu()
        self._ratios = tuple(float(r) for r in ratios)
        if not self._ratios:
            raise ValueError("a FlexiQ module needs at least one ratio")
        self.input_shape = tuple(int(d) for d in input_shape)
        self.input_dtype = str(input_dtype)
        self.metadata = dict(metadata or {})
        self.ratio = self._ratios[0]
        self._local = threading.local()
        self._switch = self.metadata.get("ratio_switch")
        self._device_lock = threading.Lock()
        self._loaded_ratio = None
        if self.device.exist:  # fail early if an entry function is missing
            self._vm()
        self._switch_fn = (self.library_function(self._switch["function"]) if self._switch
                           else None)
        if self._switch:
            self.set_ratio(self.ratio)

    # ------------------------------------------------------------------ ratios
    @property
    def ratios(self) -> tuple[float, ...]:
        """The compiled low-bit ratios, ascending."""
        return self._ratios

    def _checked(self, ratio: float) -> float:
        r = float(ratio)
        if r not in self._ratios:
            raise ValueError(f"ratio {ratio} was not compiled; compiled ratios: "
                             f"{list(self._ratios)}")
        return r

    def set_ratio(self, ratio: float) -> None:
        """Make ``ratio`` the module-wide default (a validated attribute write: microseconds;
        in switch mode also the device's instruction-memory patch)."""
        r = self._checked(ratio)
        if self._switch:
            with self._device_lock:
                self._patch(r)
        self.ratio = r

    def _patch(self, r: float) -> None:
        """Switch mode: write ratio ``r`` into the device program (caller holds the lock)."""
        if self._loaded_ratio != r:
            self._switch_fn(self._ratios.index(r))
            self._loaded_ratio = r

    def library_function(self, name: str):
        """A function of the compiled library (or of a module it imports), by name."""
        self._vm()
        lib = getattr(self.executable, "mod", self.executable)
        fn = lib.get_function(name, query_imports=True)
        if fn is None:
            raise KeyError(f"the compiled library has no function {name!r}")
        return fn

    # ------------------------------------------------------------------ calls
    def _vm(self):
        funcs = getattr(self._local, "funcs", None)
        if funcs is None:
            from tvm.runtime.vm import VirtualMachine  # no compiler needed: runtime-only TVM

            if not self.device.exist:
                tgt = self.metadata.get("target")
                what = (f"{tgt.get('kind')} {tgt.get('arch', '')}".strip()
                        if isinstance(tgt, dict) else str(tgt))
                raise RuntimeError(f"this module runs on {self.device}, which this machine "
                                   f"does not have (it was compiled for {what})")

            vm = VirtualMachine(self.executable, self.device)
            if self._switch and self._switch.get("entry"):
                funcs = dict.fromkeys(self._ratios, vm[self._switch["entry"]])
            else:
                funcs = {r: vm[variant_name(r)] for r in self._ratios}
            self._local.vm, self._local.funcs = vm, funcs
        return funcs

    def _check(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype != np.dtype(self.input_dtype):
            raise TypeError(f"input dtype {x.dtype}; the module was compiled for "
                            f"{self.input_dtype}")
        if tuple(x.shape) != self.input_shape:
            raise ValueError(f"input shape {tuple(x.shape)}; the module was compiled for "
                             f"{self.input_shape}")
        return np.ascontiguousarray(x)

    def run(self, x, ratio: float | None = None):
        """Raw outputs of one variant (``ratio`` for this call only; default the module's)."""
        import tvm

        r = self.ratio if ratio is None else self._checked(ratio)
        fn = self._vm()[r]
        x = tvm.runtime.tensor(self._check(x), self.device)
        if not self._switch:
            return fn(x)
        with self._device_lock:
            self._patch(r)
            return fn(x)

    @property
    def num_outputs(self) -> int:
        """How many outputs the model has (``__call__`` returns a tuple when more than one)."""
        return int(self.metadata.get("num_outputs", 1))

    def __call__(self, x, ratio: float | None = None):
        """The model's output, or the tuple of its outputs when it has several (a module with
        exposed layer tensors returns them after the model's output)."""
        out = self.run(x, ratio)
        n = self.num_outputs
        if n > 1:
            if self.metadata.get("expose_layers"):
                out = out[0]
            return tuple(out[i].numpy() for i in range(n))
        while not hasattr(out, "numpy"):
            out = out[0]
        return out.numpy()

    # ------------------------------------------------------------------ profile / export
    def layer_tensors(self, x, ratio: float) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per covered layer ``(input, int32 accumulator)`` of a module compiled with
        ``expose_layers=True`` (its outputs are ``(model output, [in, acc, in, acc, ...])``)."""
        out = self.run(x, ratio)
        try:
            exposed = [a.numpy() for a in out[1]]
        except (IndexError, TypeError) as e:
            raise ValueError("this module exposes no layer tensors (compile it with "
                             "expose_layers=True)") from e
        return list(zip(exposed[0::2], exposed[1::2], strict=True))

    def profile(self, x=None, repeat: int = 20, warmup: int = 3) -> dict[str, float]:
        """Median latency (ms) of each ratio on ``x`` (zeros of the input shape by default).

        The ratios are timed in interleaved rounds (one call of each per round), so that a
        slow spell of a shared machine hits every ratio alike instead of one ratio's whole
        series: the policy drops ratios that measure no faster than a more accurate one."""
        x = np.zeros(self.input_shape, self.input_dtype) if x is None else self._check(x)
        for r in self._ratios:
            for _ in range(warmup):
                self(x, r)
        times: dict[float, list[float]] = {r: [] for r in self._ratios}
        for _ in range(repeat):
            for r in self._ratios:
                t = time.perf_counter()
                self(x, r)
                times[r].append(time.perf_counter() - t)
        return {f"{r:g}": 1e3 * float(np.median(v)) for r, v in times.items()}

    def export(self, path, key: bytes | str | None = None, accuracy: dict | None = None,
               profile: dict | None = None, metadata: dict | None = None):
        """Write one artifact file: the library of every ratio variant plus metadata (ratios,
        input, latency profile, accuracy per ratio, target, versions), checksummed and, with
        ``key``, signed (HMAC-SHA256). See :mod:`flexiq_tvm.runtime.artifact`.

        The profile is measured now unless given or already known; a module built for a device
        this machine lacks (CUDA compiled on a CPU machine) is exported with an empty one."""
        meta = {**self.metadata, **(metadata or {})}
        meta.pop("versions", None)  # the header records the exporting versions
        if profile is None:  # measured here, unless the module's device is elsewhere
            profile = meta.get("profile_ms") or (self.profile() if self.device.exist else {})
        meta["profile_ms"] = profile
        if accuracy is not None:
            meta["accuracy"] = {f"{float(k):g}": v for k, v in accuracy.items()}
        if profile:  # which ratios pay on the machine that measured the profile
            front = pareto_ratios(profile)
            meta["ratios_that_pay"] = [f"{r:g}" for r in front]
        payload = self._library if self._library is not None else library_bytes(self.exportable)
        return write(path, payload, ratios=self._ratios, input_shape=self.input_shape,
                     input_dtype=self.input_dtype, metadata=meta, key=key)


def load(path, key=None, device=None) -> FlexiQModule:
    """Load an artifact as a :class:`FlexiQModule` (no torch needed): every check of
    :func:`~flexiq_tvm.runtime.artifact.read_verified` runs before its library loads."""
    header, payload = read_verified(path, key)
    rt, device = load_library(path, header, payload, device)
    meta = dict(header["metadata"])
    meta["versions"] = {"flexiq_tvm": header.get("flexiq_tvm"), "tvm": header.get("tvm")}
    return FlexiQModule(rt, header["ratios"], header["input_shape"], header["input_dtype"],
                        device=device, metadata=meta, library=payload)
