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


@pytest.fixture
def float64() -> Iterator[None]:
    """torch's default dtype is float64 in the test (exact identities at float64 rounding); restored
    after. A module asks for it in every test with ``pytestmark = pytest.mark.usefixtures("float64")``."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def in_ci() -> bool:
    """Whether the tests run in continuous integration: ``$CI`` is set (GitHub Actions, GitLab CI
    and most others set ``CI=true``) to anything but ``""``, ``"0"`` or ``"false"``."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The folder holding ``MNIST/raw`` (:func:`find_mnist_root`)."""
    return find_mnist_root()


def find_mnist_root() -> Path:
    """The folder holding ``MNIST/raw``, taken from ``$PYROVAE_DATA``. When it is absent the test
    is skipped on a developer's machine but fails in CI (:func:`in_ci`): there a missing data set
    must not turn the MNIST tests into silent skips."""
    root = os.environ.get("PYROVAE_DATA")
    if not root or not (Path(root) / "MNIST" / "raw").is_dir():
        found = f"PYROVAE_DATA={root!r} holds no MNIST/raw" if root else "PYROVAE_DATA is not set"
        message = f"{found}: set PYROVAE_DATA to the folder holding MNIST/raw"
        if in_ci():
            pytest.fail(f"{message} (CI is set, so the MNIST tests must run, not skip)", pytrace=False)
        pytest.skip(message)
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


@pytest.fixture(scope="session")
def check_reevaluation():  # type: ignore[no-untyped-def]
    """``check(run_dir, metrics, data_dir=None, repeats=2)``: the test ELBO and log p̂ a ``pyrovae
    train`` run reported agree with independent re-estimates of the reloaded run (same test points,
    same K, fresh draws), within 5 Monte Carlo standard errors; returns the SE of one run's mean,
    ``{"test_elbo": ..., "test_log_likelihood": ...}``.

    The reported mean and each re-estimate's mean over the n test points are i.i.d. draws of one
    estimator, so their difference has mean 0. Its SE comes from the re-estimates' per-point spread:
    with R repeats, Var of a mean over points is Σ_i s_i² / n² (s_i² the per-point sample variance),
    and the difference of the report and the mean of R repeats has (1 + 1/R) times that variance.
    This replaces ``log p̂ ≥ ELBO`` from the same draws, which Jensen's inequality makes always true:
    a report of the wrong K, guide, model or test points is many SEs off, and the check asserts it
    can tell log p̂ from the ELBO (their gap exceeds the 5-SE tolerance)."""
    import math

    import torch

    def check(run_dir, metrics, data_dir=None, repeats=2):  # type: ignore[no-untyped-def]
        from pyrovae import importance_sampling, load_run
        from pyrovae.app.run import test_guide
        from pyrovae.train import evaluation_data

        run = load_run(run_dir, data_dir=None if data_dir is None else str(data_dir))
        x = evaluation_data(run.dataset, "test", run.config.seed)
        n, num_samples = x.shape[0], metrics["eval_samples"]
        assert metrics["num_test"] == n
        estimates = []
        for seed in range(1, repeats + 1):
            pyro.set_rng_seed(1000 + seed)
            # the evaluation's test guide (a per-datapoint one is refitted, as each evaluation does)
            guide = test_guide(run.config, run.model, run.guide, x)
            estimates.append(importance_sampling(run.model, guide, x, torch.arange(n), n, num_samples=num_samples))
        run_ses = {}
        for key, field in (("test_elbo", "elbo"), ("test_log_likelihood", "log_likelihood")):
            values = torch.stack([getattr(e, field) for e in estimates]).double()  # (R, n)
            run_se = math.sqrt(values.var(0).sum().item() / n**2)
            se = run_se * math.sqrt(1 + 1 / repeats)
            assert abs(metrics[key] - values.mean().item()) < 5 * se, (key, metrics[key], values.mean().item(), se)
            run_ses[key] = run_se
        # power: a report of the ELBO as log p̂ would be more than 5 SEs off
        gap = metrics["test_log_likelihood"] - metrics["test_elbo"]
        assert gap > 5 * max(run_ses.values()) * math.sqrt(1 + 1 / repeats), (gap, run_ses)
        assert metrics["test_gap"] == pytest.approx(metrics["test_log_likelihood"] - metrics["test_elbo"], rel=1e-5, abs=1e-4)  # float32 means
        return run_ses

    return check


@pytest.fixture(scope="session")
def drawn():  # type: ignore[no-untyped-def]
    """``drawn(path, data=True)``: ``path`` is a PNG that decodes to a picture that is not blank
    (more than one shade) and, with ``data``, holds coloured pixels (matplotlib draws axes, text and
    frames in greys and the data in its colour cycle, so an empty figure fails); returns the
    decoded ``(H, W, C)`` array."""
    import matplotlib.image
    import numpy as np

    def check(path, data=True):  # type: ignore[no-untyped-def]
        path = Path(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
        image = matplotlib.image.imread(path)
        assert image.ndim in (2, 3) and min(image.shape[:2]) >= 16, (path, image.shape)
        rgb = image[..., :3] if image.ndim == 3 else image[..., None]
        assert float(np.ptp(rgb)) > 0.1, f"{path} is blank"
        if data:
            saturation = rgb.max(-1) - rgb.min(-1)
            assert (saturation > 0.3).mean() > 1e-4, f"{path} has no coloured (data) pixels"
        return image

    return check


@pytest.fixture(scope="session")
def saved_json():  # type: ignore[no-untyped-def]
    """``saved_json(path, value)``: the JSON file ``path`` holds exactly ``value`` (what the script
    returned), compared as JSON text so NaNs compare equal."""
    import json

    def check(path, value):  # type: ignore[no-untyped-def]
        def canonical(v):  # type: ignore[no-untyped-def]
            return json.dumps(json.loads(json.dumps(v, sort_keys=True)), sort_keys=True)

        saved = json.loads(Path(path).read_text())
        assert canonical(saved) == canonical(value), path
        return saved

    return check
