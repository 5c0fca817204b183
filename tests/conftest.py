"""Shared fixtures: a fixed seed, an empty param store and Pyro validation for every test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyro
import pytest


@pytest.fixture(autouse=True)
def pyro_state() -> Iterator[None]:
    """Seed Python, NumPy and torch with 0, clear Pyro's param store and enable validation.

    Validation is enabled through :func:`pyro.validation_enabled`, which calls
    ``pyro.enable_validation(True)`` and restores the distribution, inference and poutine
    validation flags to their previous values when the test ends.
    """
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    with pyro.validation_enabled(True):
        yield


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The folder holding ``MNIST/raw``, taken from ``$PYROVAE_DATA``; skips the test when absent."""
    root = os.environ.get("PYROVAE_DATA")
    if not root or not (Path(root) / "MNIST" / "raw").is_dir():
        pytest.skip("set PYROVAE_DATA to the folder holding MNIST/raw")
    return Path(root)
