"""Shared fixtures: data availability and trained checkpoints are prerequisites, not skips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fmnist_test():
    from flexiq_tvm.zoo import load_fmnist

    return load_fmnist("test")


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def static_plan():
    """``get(name, calib_images=32) -> (model, static QuantPlan)``, built once per session
    (tests must not modify them)."""
    from flexiq_tvm import FlexiQConfig
    from flexiq_tvm.eval import zoo_plan
    from flexiq_tvm.zoo import registry

    cache = {}

    def get(name: str, calib_images: int = 32):
        if (name, calib_images) not in cache:
            model = registry.get_model(name)
            cfg = FlexiQConfig(selection="static", calib_images=calib_images)
            cache[name, calib_images] = (model, zoo_plan(name, model, cfg))
        return cache[name, calib_images]

    return get
