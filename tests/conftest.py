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
