"""Training: the SVI loop with shuffled index batches, progress bar, history and checkpoints."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, SVI
from tqdm.auto import tqdm

from pyrovae.build import modules_of
from pyrovae.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pyrovae.data import Dataset, check_data, index_batches
from pyrovae.guides import PerDatapointGuide
from pyrovae.objectives.weights import rng_preserved
from pyrovae.optim import make_pyro_optimizer

logger = logging.getLogger(__name__)


@dataclass
class History:
    """Per-epoch record of a run, in nats per data point (bounds, so higher is better)."""

    epoch: list[int] = field(default_factory=list)
    train_bound: list[float] = field(default_factory=list)
    test_bound: list[Optional[float]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    bound_name: str = "ELBO"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "History":
        return cls(**data)


def bound_name(objective: ELBO) -> str:
    """A human-readable name of the bound an objective optimises, e.g. ``"IWAE (K=5)"``."""
    name = type(objective).__name__
    k = objective.num_particles
    if name == "IWAE":
        return f"IWAE (K={k})"
    return "ELBO" if k == 1 else f"ELBO (K={k})"


def evaluation_data(dataset: Dataset, split: str = "test", seed: int = 0) -> torch.Tensor:
    """The points of ``split`` as the model sees them at evaluation time: dynamically binarized
    data get one fixed Bernoulli draw (seeded), so every evaluation uses the same binary set."""
    x = getattr(dataset, split)
    if dataset.binarize != "dynamic":
        return x
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return torch.bernoulli(x, generator=generator)


@torch.no_grad()
def dataset_bound(
    model: Callable, guide: Callable, objective: ELBO, x: torch.Tensor, batch_size: int = 500
) -> float:
    """The objective's bound on a whole data set in nats per point: -Σ loss / N over batches,
    each batch scaled by N/B by the data plate."""
    num_data = x.shape[0]
    total = 0.0
    for index in torch.arange(num_data, device=x.device).split(batch_size):
        total += objective.loss(model, guide, x[index], index, num_data) * len(index) / num_data
    return -total / num_data


def _param_state() -> dict[str, Any]:
    # Module weights are saved as state dicts; the store keeps the rest (per-datapoint, x_scale).
    state = pyro.get_param_store().get_state()
    keep = [name for name in state["params"] if "$$$" not in name]
    return {
        "params": {name: state["params"][name] for name in keep},
        "constraints": {name: state["constraints"][name] for name in keep},
    }


def fit(
    model: Callable,
    guide: Callable,
    dataset: Dataset,
    objective: ELBO,
    *,
    epochs: int = 10,
    batch_size: int = 100,
    lr: float = 1e-3,
    lr_decay: float = 1.0,
    seed: int = 0,
    checkpoint_path: Optional[str | os.PathLike] = None,
    resume: bool = False,
    config: Optional[dict[str, Any]] = None,
    test_bound: bool = True,
    progress: bool = True,
    validate: bool = False,
) -> History:
    """Train ``model`` and ``guide`` by stochastic variational inference (``pyro.infer.SVI``).

    The training set stays on its device as one tensor; each epoch visits it in shuffled index
    batches (no per-item ``DataLoader``), dynamically binarized when the data set says so. Each
    step passes ``(x_batch, index, N)`` to model and guide, so the data plate scales the minibatch
    loss by N/B. Adam (:class:`pyrovae.optim.LazyAdam`, lazy for per-datapoint parameters so rows
    outside the batch never move) with a per-epoch learning-rate factor ``lr_decay``.

    After every epoch the history gets the mean training bound and, for guides that generalise to
    new points, the test bound; the checkpoint (network weights, per-datapoint parameters,
    optimizer state, config, epoch, history, RNG states) is written atomically.

    :param objective: a ``pyro.infer.ELBO``, e.g. from :func:`pyrovae.make_objective`.
    :param resume: continue from ``checkpoint_path`` if it exists (to ``epochs`` in total).
    :param config: saved in the checkpoint; on resume it must match the saved one (except epochs).
    :param test_bound: compute the test-set bound each epoch (amortized guides only).
    :param validate: keep Pyro's argument validation on in the training loop (slower).
    :return: the :class:`History`, also stored in the checkpoint.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not lr > 0 or not 0 < lr_decay <= 1:
        raise ValueError(f"need lr > 0 and 0 < lr_decay <= 1, got lr={lr}, lr_decay={lr_decay}")
    check_data(dataset.train, dataset.likelihood, name=f"{dataset.name} train")
    device = dataset.train.device
    num_data = dataset.num_train
    steps_per_epoch = math.ceil(num_data / batch_size)
    local_params = getattr(guide, "local_param_names", frozenset())
    optimizer = make_pyro_optimizer(lr, lr_decay ** (1.0 / steps_per_epoch), lazy_params=local_params)
    svi = SVI(model, guide, optimizer, loss=objective)
    modules = modules_of(model, guide)
    generator = torch.Generator(device=device)
    history = History(bound_name=bound_name(objective))
    start_epoch = 0

    if resume and checkpoint_path is not None and os.path.exists(checkpoint_path):
        state = load_checkpoint(checkpoint_path, map_location=device)
        saved_config = state.get("config")
        if config is not None and saved_config is not None:
            differ = {
                k: (saved_config.get(k), v)
                for k, v in config.items()
                if k != "epochs" and saved_config.get(k) != v
            }
            if differ:
                raise ValueError(
                    f"cannot resume {checkpoint_path}: its config differs in {differ} "
                    "(saved, requested); use another --out or drop --resume"
                )
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        pyro.get_param_store().set_state(state["params"])
        optimizer.set_state(state["optimizer"])
        set_rng_state(state["rng"])
        generator.set_state(state["generator"].cpu() if device.type == "cpu" else state["generator"])
        history = History.from_dict(state["history"])
        start_epoch = state["epoch"]
        logger.info("resumed %s at epoch %d", checkpoint_path, start_epoch)
    else:
        if resume:
            warnings.warn(f"--resume: no checkpoint at {checkpoint_path}; starting from scratch")
        pyro.set_rng_seed(seed)
        generator.manual_seed(seed)

    if objective.max_plate_nesting == float("inf"):
        # Guess now, without consuming random numbers, so a resumed run replays an uninterrupted one.
        index = torch.arange(min(batch_size, num_data), device=device)
        with rng_preserved():
            objective._guess_max_plate_nesting(model, guide, (dataset.train[index], index, num_data), {})

    x_test = evaluation_data(dataset, "test", seed) if test_bound else None
    generalises = getattr(guide, "amortized", True)
    epoch_bar = tqdm(range(start_epoch, epochs), desc="epochs", disable=not progress, initial=start_epoch, total=epochs)
    with pyro.validation_enabled(validate):
        for epoch in epoch_bar:
            start = time.perf_counter()
            total, seen = 0.0, 0
            batches = index_batches(num_data, batch_size, generator=generator, device=device)
            step_bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
            for index in step_bar:
                x = dataset.batch(dataset.train[index], generator)
                loss = svi.step(x, index, num_data)
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"the loss became {loss} at epoch {epoch + 1}; lower --lr (now {lr}) or "
                        "check the data. The last checkpoint is intact."
                    )
                total += loss * len(index) / num_data
                seen += len(index)
                step_bar.set_postfix(bound=f"{-total / seen:.2f}")
            history.epoch.append(epoch + 1)
            history.train_bound.append(-total / seen)
            history.test_bound.append(
                dataset_bound(model, guide, objective, x_test) if x_test is not None and generalises else None
            )
            history.seconds.append(time.perf_counter() - start)
            epoch_bar.set_postfix(train=f"{history.train_bound[-1]:.2f}", test=f"{history.test_bound[-1] or float('nan'):.2f}")
            if not progress:
                logger.info(
                    "epoch %d/%d: train %s %.3f, test %s (%.1f s)", epoch + 1, epochs, history.bound_name,
                    history.train_bound[-1],
                    "n/a" if history.test_bound[-1] is None else f"{history.test_bound[-1]:.3f}",
                    history.seconds[-1],
                )
            if checkpoint_path is not None:
                save_checkpoint(
                    checkpoint_path,
                    {
                        "config": config,
                        "epoch": epoch + 1,
                        "history": history.to_dict(),
                        "modules": {name: m.state_dict() for name, m in modules.items()},
                        "params": _param_state(),
                        "optimizer": optimizer.get_state(),
                        "rng": rng_state(),
                        "generator": generator.get_state(),
                        "dataset": {
                            "name": dataset.name,
                            "x_dim": dataset.x_dim,
                            "likelihood": dataset.likelihood,
                            "image_shape": list(dataset.image_shape) if dataset.image_shape else None,
                        },
                    },
                )
    return history


def optimize_local_guide(
    model: Callable,
    x: torch.Tensor,
    z_dim: int,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    num_particles: int = 1,
    prefix: str = "test",
    beta: float = 1.0,
    progress: bool = False,
) -> PerDatapointGuide:
    """Fit a fresh per-datapoint guide to every point of ``x`` at once, the model held fixed.

    Full-batch Adam on the ELBO of all points together (vectorised over points: one tensor of
    ``(N, z_dim)`` means and scales), starting from the prior. This is how a per-datapoint guide
    gets a posterior for points it was not trained on, e.g. the test set.

    :return: the guide, its params ``"<prefix>.z_loc"``/``"<prefix>.z_scale"`` in the param store.
    """
    from pyrovae.objectives import make_objective

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    num_data = x.shape[0]
    guide = PerDatapointGuide(num_data, z_dim, beta=beta, prefix=prefix)
    store = pyro.get_param_store()
    for name in guide.local_param_names:
        if name in store:
            del store[name]
    frozen_model = poutine.block(model, hide_types=["param"])
    svi = SVI(frozen_model, guide, make_pyro_optimizer(lr), loss=make_objective("elbo-analytic", num_particles))
    index = torch.arange(num_data, device=x.device)
    with pyro.validation_enabled(False):
        for _ in tqdm(range(steps), desc="test-time inference", leave=False, disable=not progress):
            svi.step(x, index, num_data)
    return guide
