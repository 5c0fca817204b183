"""Training: the SVI loop with shuffled index batches, progress bar, history and checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pyro
import torch
from pyro.infer import ELBO
from tqdm.auto import tqdm

from pyrovae.app.build import modules_of
from pyrovae.app.config import config_differences
from pyrovae.data import Dataset, check_data, index_batches
from pyrovae.infer.local import frozen_params
from pyrovae.infer.optim import make_pyro_optimizer
from pyrovae.infer.weights import rng_preserved
from pyrovae.runtime.checkpoint import (
    load_checkpoint,
    remove_stale_temporaries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pyrovae.runtime.distributed import (
    World,
    all_gather_objects,
    all_reduce_sum_,
    barrier,
    broadcast_tensors_,
    current_world,
    rank_seed,
    run_on_main,
    shard,
)
from pyrovae.runtime.interrupt import StopSignals, TrainingInterrupted
from pyrovae.train.step import GradientStep

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


def data_fingerprint(x: torch.Tensor) -> dict[str, Any]:
    """A cheap summary of a training set that changes when its points or their order change:
    the shape, the sum, and a position-weighted sum of the rows (float64)."""
    rows = x.double().sum(1)
    weights = torch.arange(1, x.shape[0] + 1, dtype=torch.float64, device=x.device)
    return {"shape": list(x.shape), "sum": rows.sum().item(), "weighted_sum": (rows * weights).sum().item()}


def _same_fingerprint(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["shape"] != b["shape"]:
        return False
    # Sums on another device or with another reduction order may differ in the last digits.
    return all(math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-6) for k in ("sum", "weighted_sum"))


#: Config fields a resumed run may change: the number of epochs, and evaluation settings, which
#: do not touch training.
RESUMABLE_CHANGES = frozenset({"epochs", "eval_samples", "eval_chunk", "eval_batch", "test_time_steps"})


def _check_resumable(
    state: dict[str, Any], path: Any, config: Optional[dict[str, Any]], dataset: Dataset, epochs: int
) -> None:
    saved_config = state.get("config")
    if config is not None and saved_config is not None:
        differ = config_differences(saved_config, config, RESUMABLE_CHANGES)
        if differ:
            raise ValueError(
                f"cannot resume {path}: its config differs in {differ} "
                "(saved, requested); use another --out or drop --resume"
            )
    saved_data = (state.get("dataset") or {}).get("fingerprint")
    if saved_data is not None and not _same_fingerprint(saved_data, data_fingerprint(dataset.train)):
        raise ValueError(
            f"cannot resume {path}: it was trained on other training data (shape {saved_data['shape']}, "
            f"now {list(dataset.train.shape)}, or the same shape with other values or order), so its "
            "per-datapoint parameters and batch order would not match; use the same data (--data-dir, "
            "--num-train) or start a new run in another --out"
        )
    missing = sorted({"epoch", "modules", "params", "optimizer", "generator", "history"} - set(state))
    if missing:
        raise ValueError(
            f"cannot resume {path}: it is a pyrovae checkpoint but not one written by fit() (it lacks "
            f"{missing}); point --out at a training run, or drop --resume"
        )
    if state["epoch"] > epochs:
        raise ValueError(
            f"cannot resume {path}: it has already trained {state['epoch']} epochs, more than the "
            f"{epochs} asked for; pass --epochs {state['epoch']} or more"
        )


def _load_modules(modules: dict[str, torch.nn.Module], saved: dict[str, Any], path: Any) -> None:
    if set(saved) != set(modules):
        raise ValueError(
            f"{path} holds networks {sorted(saved)} but this model and guide have {sorted(modules)}; "
            "it was written for another model or guide"
        )
    for name, module in modules.items():
        try:
            module.load_state_dict(saved[name])
        except RuntimeError as error:
            summary = " ".join(str(error).split())[:300]
            raise ValueError(
                f"the {name!r} weights in {path} do not fit this network ({summary}); the checkpoint "
                "was written for another architecture"
            ) from None


def _to_device(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {key: _to_device(value, device) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_device(value, device) for value in tree)
    return tree


def _sharded_bound(
    model: Callable, guide: Callable, objective: ELBO, x: torch.Tensor, world: World, batch_size: int = 500
) -> float:
    # dataset_bound, with the points split across processes and the sums added up.
    if not world.is_distributed:
        return dataset_bound(model, guide, objective, x, batch_size)
    num_data = x.shape[0]
    total = torch.zeros(1, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for index in shard(torch.arange(num_data, device=x.device), world).split(batch_size):
            total += objective.loss(model, guide, x[index], index, num_data) * len(index) / num_data
    all_reduce_sum_([total], world)
    return -total.item() / num_data


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
    clip_norm: Optional[float] = None,
    handle_signals: bool = True,
    local_steps: int = 0,
    local_lr: float = 3e-2,
) -> History:
    """Train ``model`` and ``guide`` by stochastic variational inference (Pyro's SVI step).

    The training set stays on its device as one tensor; each epoch visits it in shuffled index
    batches (no per-item ``DataLoader``), dynamically binarized when the data set says so. Each
    step passes ``(x_batch, index, N)`` to model and guide, so the data plate scales the minibatch
    loss by N/B. Adam (:class:`pyrovae.infer.optim.LazyAdam`, lazy for per-datapoint parameters so rows
    outside the batch never move) with a per-epoch learning-rate factor ``lr_decay``.

    After every epoch the history gets the mean training bound and, for guides that generalise to
    new points, the test bound; the checkpoint (network weights, per-datapoint parameters,
    optimizer state, config, epoch, history, RNG states) is written atomically.

    **Faults.** A non-finite loss or gradient stops training with a ``FloatingPointError`` naming
    the epoch and step, before the update, so neither the parameters in memory nor the last
    checkpoint hold NaNs. SIGINT (Ctrl-C) or SIGTERM stops at the end of the current step, writes a
    checkpoint that records the position inside the epoch (and every RNG state), and raises
    :class:`pyrovae.runtime.interrupt.TrainingInterrupted`; ``resume=True`` then continues so that the
    final parameters equal those of an uninterrupted run.

    **Data parallel.** Inside a ``torch.distributed`` process group (see
    :mod:`pyrovae.runtime.distributed`; launched with torchrun) every process draws the same global batch
    of ``batch_size`` points, works on its own slice, and the gradients are all-reduced
    (:class:`pyrovae.train.step.GradientStep`), so the run equals one process with the same batch size
    up to floating-point summation order. Rank 0 alone writes the checkpoint; each process samples
    with its own seed (:func:`pyrovae.runtime.distributed.rank_seed`), and their RNG states are all saved.

    :param objective: a ``pyro.infer.ELBO``, e.g. from :func:`pyrovae.make_objective`.
    :param batch_size: points per step (the global batch, summed over processes).
    :param resume: continue from ``checkpoint_path`` if it exists (to ``epochs`` in total).
    :param config: saved in the checkpoint; on resume it must match the saved one (except epochs
        and the evaluation settings, :data:`RESUMABLE_CHANGES`).
    :param test_bound: compute the test-set bound each epoch (amortized guides only).
    :param validate: keep Pyro's argument validation on in the training loop (slower).
    :param clip_norm: clip the global L2 norm of the gradient to this value (``None``: no clipping).
    :param handle_signals: turn SIGINT/SIGTERM into a checkpoint and :class:`TrainingInterrupted`
        (main thread only).
    :param local_steps: per-datapoint guides only: before each step, the batch's rows take this
        many Adam steps (rate ``local_lr``) on their own ELBO with the model fixed
        (:meth:`pyrovae.guides.PerDatapointGuide.refine_rows`); the step then updates the model
        alone, the rows held fixed (stochastic variational inference with local and global steps,
        Hoffman et al. 2013). 0: the rows take one Adam step with the model, like any parameter.
    :return: the :class:`History`, also stored in the checkpoint.
    """
    world = current_world()
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not lr > 0 or not 0 < lr_decay <= 1:
        raise ValueError(f"need lr > 0 and 0 < lr_decay <= 1, got lr={lr}, lr_decay={lr_decay}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive (or None for no clipping), got {clip_norm}")
    check_data(dataset.train, dataset.likelihood, name=f"{dataset.name} train")
    num_data = dataset.num_train
    if batch_size > num_data:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {num_data} training points; use "
            f"--batch-size {num_data} or less"
        )
    if batch_size < world.world_size:
        raise ValueError(
            f"batch_size={batch_size} is smaller than the {world.world_size} processes; each process "
            f"needs points of every batch: use --batch-size {world.world_size} or more"
        )
    guide_points = getattr(guide, "num_data", None)
    if not getattr(guide, "amortized", True) and guide_points is not None and guide_points != num_data:
        raise ValueError(
            f"the per-datapoint guide holds parameters for {guide_points} points but the training set "
            f"has {num_data}; build it for this data set, e.g. PerDatapointGuide(num_data={num_data}, ...)"
        )
    device = dataset.train.device
    steps_per_epoch = math.ceil(num_data / batch_size)
    local_params = getattr(guide, "local_param_names", frozenset())
    _check_local_steps(guide, local_steps, local_lr, world)
    optimizer = make_pyro_optimizer(lr, lr_decay ** (1.0 / steps_per_epoch), lazy_params=local_params)
    step_fn = GradientStep(model, guide, objective, optimizer, local_params=local_params,
                           clip_norm=clip_norm, world=world)
    modules = modules_of(model, guide)
    generator = torch.Generator(device=device)
    history = History(bound_name=bound_name(objective))
    start_epoch = 0
    position: Optional[dict[str, Any]] = None
    last_saved: Optional[int] = None

    def load_if_any() -> Optional[dict[str, Any]]:
        if not (resume and checkpoint_path is not None and os.path.exists(checkpoint_path)):
            return None
        loaded = load_checkpoint(checkpoint_path, map_location="cpu")
        _check_resumable(loaded, checkpoint_path, config, dataset, epochs)
        return loaded

    # Rank 0 reads the checkpoint and hands it to the others, so only it needs the file.
    state = run_on_main(load_if_any, world)
    if state is not None:
        _load_modules(modules, state["modules"], checkpoint_path)
        pyro.get_param_store().set_state(_to_device(state["params"], device))
        optimizer.set_state(_to_device(state["optimizer"], device))
        generator.set_state(state["generator"].cpu())
        rank_states = state.get("rank_states")
        if rank_states is not None and len(rank_states) == world.world_size:
            _set_rank_state(rank_states[world.rank], objective)
        elif rank_states is None and not world.is_distributed:
            set_rng_state(state["rng"])  # written by a pyrovae without rank_states
        else:
            saved = 1 if rank_states is None else len(rank_states)
            warnings.warn(
                f"{checkpoint_path} was written by {saved} process(es) and is resumed by "
                f"{world.world_size}: training continues correctly, but the sampling noise after "
                "this point will not repeat the uninterrupted run bit for bit"
            )
            pyro.set_rng_seed(rank_seed((seed + 1_000_003 * (state["epoch"] + 1)) % 2**32, world.rank))
        history = History.from_dict(state["history"])
        start_epoch = state["epoch"]
        position = state.get("position")
        last_saved = start_epoch
        if world.is_main:
            where = f", step {position['step']}" if position else ""
            logger.info("resumed %s at epoch %d%s", checkpoint_path, start_epoch, where)
    else:
        if resume and world.is_main:
            warnings.warn(f"--resume: no checkpoint at {checkpoint_path}; starting from scratch")
        pyro.set_rng_seed(rank_seed(seed, world.rank))
        generator.manual_seed(seed)
        # Every process starts from rank 0's networks, as DistributedDataParallel does.
        broadcast_tensors_([t for m in modules.values() for t in m.state_dict().values()], world)
    if checkpoint_path is not None and world.is_main:
        remove_stale_temporaries(checkpoint_path)

    if objective.max_plate_nesting == float("inf"):
        # Guess now, without consuming random numbers, so a resumed run replays an uninterrupted one.
        index = torch.arange(min(batch_size, num_data), device=device)
        # Without gradients: a guide that updates state in training steps (an EMA codebook) must not here.
        with rng_preserved(), torch.no_grad():
            objective._guess_max_plate_nesting(model, guide, (dataset.train[index], index, num_data), {})

    def save(epoch: int, at: Optional[dict[str, Any]]) -> None:
        # Every process contributes its RNG state; rank 0 alone writes.
        if checkpoint_path is None:
            return
        rank_states = all_gather_objects(_rank_state(objective), world)
        if not world.is_main:
            return
        save_checkpoint(
            checkpoint_path,
            {
                "config": config,
                "epoch": epoch,
                "position": at,
                "history": history.to_dict(),
                "modules": {name: m.state_dict() for name, m in modules.items()},
                "params": _param_state(),
                "optimizer": optimizer.get_state(),
                "rng": rank_states[0]["rng"],
                "rank_states": rank_states,
                "world_size": world.world_size,
                "generator": generator.get_state(),
                "dataset": {
                    "name": dataset.name,
                    "x_dim": dataset.x_dim,
                    "likelihood": dataset.likelihood,
                    "image_shape": list(dataset.image_shape) if dataset.image_shape else None,
                    "fingerprint": data_fingerprint(dataset.train),
                },
            },
        )

    def interrupted(signals: StopSignals, epoch: int, step: int) -> TrainingInterrupted:
        signum = signals.signum or signal.SIGINT
        if checkpoint_path is None:
            saved = "no checkpoint_path was given, so nothing was saved"
        else:
            saved = f"saved {checkpoint_path}; continue with --resume (resume=True) for exactly the same result"
        where = f"epoch {epoch + 1}, step {step} of {steps_per_epoch}" if step else f"the end of epoch {epoch}"
        return TrainingInterrupted(
            f"interrupted by {signal.Signals(signum).name} at {where}: {saved}",
            signum=signum, epoch=epoch + (1 if step else 0), step=step,
            checkpoint_path=None if checkpoint_path is None else str(checkpoint_path),
        )

    def agree_to_stop(signals: StopSignals) -> bool:
        flag = torch.tensor([float(signals.requested)], dtype=torch.float64, device=device)
        all_reduce_sum_([flag], world)
        return flag.item() > 0

    x_test = evaluation_data(dataset, "test", seed) if test_bound else None
    generalises = getattr(guide, "amortized", True)
    show = progress and world.is_main
    epoch_bar = tqdm(range(start_epoch, epochs), desc="epochs", disable=not show, initial=start_epoch, total=epochs)
    with pyro.validation_enabled(validate), StopSignals(handle_signals) as signals:
        for epoch in epoch_bar:
            if position is not None:
                order, first = position["order"].to(device), position["step"]
                total, seen = position["total"], position["seen"]
                start = time.perf_counter() - position["seconds"]
                position = None
            else:
                # index_batches draws the epoch's permutation from `generator`, the same on every rank.
                order = torch.cat(list(index_batches(num_data, batch_size, generator=generator, device=device)))
                first, total, seen, start = 0, 0.0, 0, time.perf_counter()
            batches = order.split(batch_size)
            step_bar = tqdm(total=steps_per_epoch, initial=first, desc=f"epoch {epoch + 1}", leave=False, disable=not show)
            for step in range(first, steps_per_epoch):
                batch_index = batches[step]
                # The whole batch is binarized on every rank, so `generator` stays in step everywhere.
                x_batch = dataset.batch(dataset.train[batch_index], generator)
                index, x = shard(batch_index, world), shard(x_batch, world)
                weight = None
                if len(index) == 0:  # a last batch smaller than the number of processes
                    index, x, weight = batch_index[:1], x_batch[:1], 0.0
                if local_steps:
                    with frozen_params(lambda name: True):
                        guide.refine_rows(model, x, index, local_steps, local_lr)
                # With local steps the rows are held fixed while the model steps.
                with frozen_params(local_params.__contains__) if local_steps else contextlib.nullcontext():
                    result = step_fn(x, index, num_data, batch_index=batch_index, weight=weight, stop=signals.requested)
                if result.problem is not None:
                    kept = (
                        f"The last checkpoint, {checkpoint_path} (epoch {last_saved}), is intact."
                        if checkpoint_path is not None and last_saved is not None
                        else "No checkpoint had been written yet."
                    )
                    raise FloatingPointError(
                        f"{result.problem} at epoch {epoch + 1}, step {step + 1} of {steps_per_epoch}; "
                        f"this step was not applied. {kept} Lower --lr (now {lr}), clip gradients "
                        "(--clip-norm), or check the data."
                    )
                total += result.loss * len(batch_index) / num_data
                seen += len(batch_index)
                step_bar.update()
                step_bar.set_postfix(bound=f"{-total / seen:.2f}")
                if result.stop and step + 1 < steps_per_epoch:
                    save(epoch, {
                        "step": step + 1, "order": order.cpu(), "total": total, "seen": seen,
                        "seconds": time.perf_counter() - start,
                    })
                    barrier(world)
                    raise interrupted(signals, epoch, step + 1)
            step_bar.close()
            history.epoch.append(epoch + 1)
            history.train_bound.append(-total / seen)
            history.test_bound.append(
                _sharded_bound(model, guide, objective, x_test, world) if x_test is not None and generalises else None
            )
            history.seconds.append(time.perf_counter() - start)
            epoch_bar.set_postfix(train=f"{history.train_bound[-1]:.2f}", test=f"{history.test_bound[-1] or float('nan'):.2f}")
            if not progress and world.is_main:
                logger.info(
                    "epoch %d/%d: train %s %.3f, test %s (%.1f s)", epoch + 1, epochs, history.bound_name,
                    history.train_bound[-1],
                    "n/a" if history.test_bound[-1] is None else f"{history.test_bound[-1]:.3f}",
                    history.seconds[-1],
                )
            save(epoch + 1, None)
            last_saved = epoch + 1
            if agree_to_stop(signals):
                barrier(world)
                raise interrupted(signals, epoch + 1, 0)
    return history


def _check_local_steps(guide: Callable, local_steps: int, local_lr: float, world: World) -> None:
    if not isinstance(local_steps, int) or isinstance(local_steps, bool) or local_steps < 0:
        raise ValueError(f"local_steps must be an integer >= 0, got {local_steps!r}")
    if not local_steps:
        return
    if not local_lr > 0:
        raise ValueError(f"local_lr must be positive, got {local_lr}")
    if not callable(getattr(guide, "refine_rows", None)):
        raise ValueError(
            f"local_steps={local_steps} needs a per-datapoint guide (PerDatapointGuide, --guide per-datapoint); "
            f"{type(guide).__name__} has no rows to refine: use local_steps=0"
        )
    if world.is_distributed:
        raise ValueError(
            "local_steps is not supported in data-parallel training (each process would refine only its "
            "slice's rows); train in one process, or use local_steps=0"
        )


def _rank_state(objective: ELBO) -> dict[str, Any]:
    # What differs between processes: the global RNGs, and the state of stateful objectives (the
    # moving-average baseline of the score-function ELBO).
    get_state = getattr(objective, "get_state", None)
    return {"rng": rng_state(), "objective": get_state() if callable(get_state) else None}


def _set_rank_state(state: dict[str, Any], objective: ELBO) -> None:
    set_rng_state(state["rng"])
    set_state = getattr(objective, "set_state", None)
    if state.get("objective") is not None and callable(set_state):
        set_state(state["objective"])
