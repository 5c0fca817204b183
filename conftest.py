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


@pytest.fixture(scope="session")
def load_experiment():  # type: ignore[no-untyped-def]
    """A loader of experiment scripts by path, e.g. ``load_experiment("experiments/iwae_table.py")``
    (the path is spelled out so that tests/test_experiments.py finds each script's smoke test)."""
    import importlib.util

    root = Path(__file__).resolve().parent

    def load(relative: str):  # type: ignore[no-untyped-def]
        path = root / relative
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        assert spec is not None and spec.loader is not None
        spec.loader.exec_module(module)
        return module

    return load
