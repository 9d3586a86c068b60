"""Model zoo and real data loaders (offline)."""

from .data import (
    DataUnavailableError,
    fmnist_calibration,
    load_fmnist,
    load_natural,
    natural_image_split,
)
from .registry import MODELS, get_model, spec

__all__ = [
    "MODELS",
    "DataUnavailableError",
    "fmnist_calibration",
    "get_model",
    "load_fmnist",
    "load_natural",
    "natural_image_split",
    "spec",
]
