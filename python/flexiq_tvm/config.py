"""``FlexiQConfig``: every choice of the quantization flow, validated when built."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Literal

SELECTIONS = ("static", "greedy", "evolutionary", "random")
EXTRACTIONS = ("effective", "naive")
SEARCH_METRICS = ("mse", "kl")

Selection = Literal["static", "greedy", "evolutionary", "random"]
Extraction = Literal["effective", "naive"]
SearchMetric = Literal["mse", "kl"]


@dataclass(frozen=True)
class FlexiQConfig:
    """Configuration of FlexiQ quantization.

    Parameters
    ----------
    ratios
        Low-bit ratios to prepare, as fractions of the eligible layers' MACs run in 4-bit
        (ascending, each in [0, 1]).  Their channel sets are nested.
    selection
        ``static`` (range order, same ratio in every layer), ``greedy`` (error-proxy order,
        ratio allocated across layers by measured sensitivity per MAC), ``evolutionary``
        (the paper's Algorithm 1, seeded from greedy) or ``random`` (a baseline).
    extraction
        ``effective`` (skip unused leading bits; shift by minimum MSE) or ``naive`` (top 4 bits).
    keep_first_8bit, keep_last_8bit
        Keep the first / last covered layer (stem conv, classifier) at 8 bits.
    depthwise_low
        Whether depthwise convolutions may run channels in 4-bit.
    calib_images
        Calibration images used (the first N of the calibration data).
    search_images
        Calibration images on which selection measures output distance (subset of the above).
    seed
        Seed of every random choice (random selection, evolutionary search).
    population, generations
        Evolutionary search size per ratio.
    search_metric
        What the search (greedy curves, evolutionary fitness) minimises over the search
        images: ``mse``, the mean squared output difference to the INT8 model, or ``kl``,
        ``KL(FP32 || candidate)`` of the softmax over each output's last axis (classifiers:
        a proxy of top-1 agreement with FP32).
    sensitivity_steps
        Points of each layer's measured sensitivity curve (greedy/evolutionary): the distance
        with 1/steps, 2/steps, ... of its channels lowered.
    reconstruct
        Learn the weight codes of the 4-bit-eligible layers by nested GPTQ on the calibration
        images (:mod:`flexiq_tvm.reconstruct`) instead of rounding each to its nearest code.
    reconstruct_alpha
        Weight of the 8-bit block's error against the 4-bit block's in that choice: larger
        keeps ratio 0 (INT8) closer to nearest rounding, smaller buys more 4-bit accuracy.
    """

    ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    selection: Selection = "evolutionary"
    extraction: Extraction = "effective"
    keep_first_8bit: bool = True
    keep_last_8bit: bool = True
    depthwise_low: bool = True
    calib_images: int = 256
    search_images: int = 64
    seed: int = 0
    population: int = 12
    generations: int = 16
    sensitivity_steps: int = 8
    search_metric: SearchMetric = "mse"
    reconstruct: bool = False
    reconstruct_alpha: float = 32.0

    def __post_init__(self) -> None:
        if isinstance(self.ratios, str | bytes) or not hasattr(self.ratios, "__iter__"):
            raise TypeError(f"ratios={self.ratios!r}: must be a sequence of numbers, e.g. "
                            "(0, 0.5, 1)")
        try:
            ratios = tuple(float(r) for r in self.ratios)
        except (TypeError, ValueError):
            raise TypeError(f"ratios={self.ratios!r}: each must be a number") from None
        for name in ("keep_first_8bit", "keep_last_8bit", "depthwise_low", "reconstruct"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r}: must be True or False")
        for name in ("calib_images", "search_images", "seed", "population", "generations",
                     "sensitivity_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name}={v!r}: must be an integer")
        a = self.reconstruct_alpha
        if isinstance(a, bool) or not isinstance(a, numbers.Real):
            raise TypeError(f"reconstruct_alpha={a!r}: must be a number")
        if not (math.isfinite(a) and a >= 0):
            raise ValueError(f"reconstruct_alpha={a}; must be a finite number >= 0")
        object.__setattr__(self, "ratios", ratios)
        if not ratios:
            raise ValueError("ratios must not be empty; e.g. (0, 0.25, 0.5, 0.75, 1)")
        if any(not 0.0 <= r <= 1.0 for r in ratios):
            raise ValueError(f"ratios={ratios}: each must be in [0, 1]")
        if list(ratios) != sorted(set(ratios)):
            raise ValueError(f"ratios={ratios}: must be strictly ascending")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r}; allowed: {SELECTIONS}")
        if self.extraction not in EXTRACTIONS:
            raise ValueError(f"extraction={self.extraction!r}; allowed: {EXTRACTIONS}")
        if self.search_metric not in SEARCH_METRICS:
            raise ValueError(f"search_metric={self.search_metric!r}; allowed: {SEARCH_METRICS}")
        for name in ("calib_images", "search_images", "population", "generations",
                     "sensitivity_steps"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}; must be positive")
        if self.population < 4:
            raise ValueError(f"population={self.population}; must be at least 4")

    def to_dict(self) -> dict:
        """The configuration as a JSON-ready dict (stored in every plan)."""
        return asdict(self)


def parse_ratios(text: str) -> tuple[float, ...]:
    """``"0,0.25,0.5"`` -> ``(0.0, 0.25, 0.5)`` with a clear error for bad items."""
    out = []
    for item in text.split(","):
        item = item.strip()
        try:
            out.append(float(item))
        except ValueError:
            raise ValueError(f"ratio {item!r} is not a number (expected e.g. 0,0.25,0.5)") from None
    return tuple(out)
