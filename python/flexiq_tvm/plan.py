"""``QuantPlan``: everything the compiler needs to build FlexiQ kernels, serializable.

A plan holds, per covered layer (``nn.Conv2d`` / ``nn.Linear``, named by its module path):
its geometry, the INT8 weight codes and per-output-channel scales (so every backend uses the
very same codes), the calibrated activation scale and signedness, the per-input-channel
activation and weight extraction shifts, and the nested low-bit channel sets.

Nested sets are stored as one *priority order* of the input channels plus, per ratio, how many
of them run in 4-bit: the low set at ratio ``r`` is ``order[:n_low[r]]``.  ``n_low`` is
non-decreasing in ``r`` for every layer, so lower-ratio sets are subsets of higher-ratio ones
by construction, and a compiled kernel needs only the permutation ``order`` and one boundary
per ratio.

``save``/``load`` use one ``.npz`` file (arrays plus a JSON header), no pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import reference as ref

log = logging.getLogger(__name__)

PLAN_FORMAT = 1


def ratio_key(r: float) -> str:
    """Canonical text of a ratio (``0.25 -> "0.25"``)."""
    return f"{float(r):g}"


def codes_digest(codes: np.ndarray) -> str:
    """sha256 of INT8 codes (shape and bytes)."""
    c = np.ascontiguousarray(codes, dtype=np.int8)
    return hashlib.sha256(repr(c.shape).encode() + c.tobytes()).hexdigest()


def variant_name(ratio: float) -> str:
    """``0.25 -> "main_r025"``: the entry function of a ratio in a compiled module (the
    lowering pass names them, the runtime calls them)."""
    return f"main_r{round(float(ratio) * 100):03d}"


@dataclass
class LayerPlan:
    name: str
    kind: str  # "conv2d" | "linear"
    weight_shape: tuple[int, ...]
    w_codes: np.ndarray  # int8, weight_shape
    w_scale: np.ndarray  # float32 (O,)
    bias: np.ndarray | None  # float32 (O,)
    act_scale: float
    act_inv_scale: float
    act_signed: bool
    act_shift: np.ndarray  # int8 (C,)
    w_shift: np.ndarray  # int8 (C,)
    order: np.ndarray  # int32 (C,) permutation, low-bit candidates first
    n_low: dict[str, int]  # ratio_key -> number of 4-bit channels
    eligible: bool  # False: always 8-bit (first/last layer, depthwise when disabled)
    macs_per_channel: int  # MACs per image contributed by one input channel
    reason: str = ""  # why not eligible
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, bottom, left, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    # sha256 of the nearest-rounded INT8 codes of the source weights, set when the codes were
    # learned (reconstruction): the compiler finds a layer in a graph by its weights
    weight_digest: str = ""

    @property
    def in_channels(self) -> int:
        """Input channels of the layer (the length of ``order``)."""
        return len(self.order)

    @property
    def depthwise(self) -> bool:
        """A depthwise conv: one input channel per group."""
        return self.kind == "conv2d" and self.groups > 1 and self.weight_shape[1] == 1

    def matches(self, weight: np.ndarray) -> bool:
        """Whether ``weight`` (torch layout) is this layer's source weight."""
        if tuple(self.weight_shape) != tuple(weight.shape):
            return False
        nearest = ref.quantize_weight(weight, self.w_scale)
        if self.weight_digest:
            return codes_digest(nearest) == self.weight_digest
        return bool(np.array_equal(nearest, self.w_codes))

    def low_mask(self, ratio: float) -> np.ndarray:
        """Boolean ``(C,)``: which input channels run in 4-bit at ``ratio``."""
        mask = np.zeros(self.in_channels, dtype=bool)
        mask[self.order[: self.n_low[ratio_key(ratio)]]] = True
        return mask


@dataclass
class QuantPlan:
    model: str
    ratios: tuple[float, ...]
    config: dict
    layers: list[LayerPlan]
    metrics: dict = field(default_factory=dict)  # per-ratio MAC / channel fractions, timing

    def layer(self, name: str) -> LayerPlan:
        """The layer plan of module path ``name`` (``KeyError`` if the plan has none)."""
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(f"no layer {name!r} in the plan")

    def check_ratio(self, ratio: float) -> str:
        """The canonical key of ``ratio``; ``ValueError`` naming the plan's ratios if absent."""
        key = ratio_key(ratio)
        if key not in {ratio_key(r) for r in self.ratios}:
            raise ValueError(f"ratio {ratio} is not in the plan; available: "
                             f"{', '.join(ratio_key(r) for r in self.ratios)}")
        return key

    def mac_fraction(self, ratio: float, eligible_only: bool = True) -> float:
        """Fraction of (eligible or all covered) layer MACs that run in 4-bit at ``ratio``."""
        key = self.check_ratio(ratio)
        layers = [lp for lp in self.layers if lp.eligible or not eligible_only]
        total = sum(lp.in_channels * lp.macs_per_channel for lp in layers)
        low = sum(lp.n_low[key] * lp.macs_per_channel for lp in layers)
        return low / total if total else 0.0

    def channel_fraction(self, ratio: float) -> float:
        """Fraction of the eligible layers' input channels that run in 4-bit at ``ratio``."""
        key = self.check_ratio(ratio)
        layers = [lp for lp in self.layers if lp.eligible]
        total = sum(lp.in_channels for lp in layers)
        return sum(lp.n_low[key] for lp in layers) / total if total else 0.0

    def check_nested(self) -> None:
        """Raise if any layer's low set at a lower ratio is not inside the higher one."""
        keys = [ratio_key(r) for r in self.ratios]
        for lp in self.layers:
            counts = [lp.n_low[k] for k in keys]
            if counts != sorted(counts) or not all(0 <= c <= lp.in_channels for c in counts):
                raise ValueError(f"layer {lp.name}: n_low {counts} not nested")
            if sorted(lp.order.tolist()) != list(range(lp.in_channels)):
                raise ValueError(f"layer {lp.name}: order is not a permutation")
            if not lp.eligible and any(counts):
                raise ValueError(f"layer {lp.name} is not eligible but has 4-bit channels")

    # ------------------------------------------------------------------ serialization

    _ARRAYS = ("w_codes", "w_scale", "bias", "act_shift", "w_shift", "order")

    def save(self, path: str | Path) -> Path:
        """Write the plan to one ``.npz`` (arrays + JSON header, no pickle); returns the path."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        header_layers = []
        for i, lp in enumerate(self.layers):
            meta = {k: v for k, v in lp.__dict__.items() if k not in self._ARRAYS}
            meta["weight_shape"] = list(lp.weight_shape)
            for k in ("stride", "padding", "dilation"):
                meta[k] = list(meta[k])
            meta["act_scale"] = float(lp.act_scale)
            meta["act_inv_scale"] = float(lp.act_inv_scale)
            header_layers.append(meta)
            for k in self._ARRAYS:
                v = getattr(lp, k)
                if v is not None:
                    arrays[f"{i}.{k}"] = v
        header = {"format": PLAN_FORMAT, "model": self.model, "ratios": list(self.ratios),
                  "config": self.config, "metrics": self.metrics, "layers": header_layers}
        arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> QuantPlan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such plan file: {path}" if not path.exists()
                                    else f"{path}: is a directory, not a plan file")
        try:
            z = np.load(path, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile) or "__header__" not in z:
                raise ValueError("no plan header")
        except (ValueError, OSError) as e:
            log.debug("plan %s: %s", path, e)
            raise ValueError(f"{path}: not a FlexiQ plan (`flexiq-tvm quantize --out` "
                             "writes one)") from None
        with z:
            header = json.loads(bytes(z["__header__"]).decode())
            if header.get("format") != PLAN_FORMAT:
                raise ValueError(f"{path}: plan format {header.get('format')}, "
                                 f"this version reads {PLAN_FORMAT}")
            layers = []
            for i, meta in enumerate(header["layers"]):
                arr = {k: (z[f"{i}.{k}"] if f"{i}.{k}" in z else None) for k in cls._ARRAYS}
                meta = dict(meta)
                for k in ("weight_shape", "stride", "padding", "dilation"):
                    meta[k] = tuple(meta[k])
                layers.append(LayerPlan(**meta, **arr))
        plan = cls(header["model"], tuple(header["ratios"]), header["config"], layers,
                   header["metrics"])
        plan.check_nested()
        return plan
