"""``fit``: SVI over shuffled index batches with checkpoints, exact resume, stop signals and data
parallelism, as a :class:`~pyrovae.train.trainer.Trainer` with hooks.

What ``fit`` knows about a model and guide comes from the param store (:mod:`pyrovae.params`):
one dry run before training tells it every param the pair uses, which are per-datapoint rows and
which networks sit behind ``pyro.module`` names, so the user's own Pyro functions and Pyro's
autoguides train, checkpoint and resume like pyrovae's classes.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union, cast

import pyro
import torch
from pyro.params.param_store import _MODULE_NAMESPACE_DIVIDER as DIVIDER
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyrovae import params
from pyrovae.data import Dataset, check_data
from pyrovae.infer.local import frozen_params
from pyrovae.infer.loop import History, StepResult, Trainer, TrainState
from pyrovae.infer.objectives.base import PerDatapointObjective
from pyrovae.infer.optim import make_pyro_optimizer
from pyrovae.infer.replay import choose_backend
from pyrovae.protocols import LocalGuide, Objective, RefinableGuide, StatefulObjective
from pyrovae.runtime.checkpoint import (
    remove_stale_temporaries,
    rng_state,
    set_rng_state,
)
from pyrovae.runtime.distributed import (
    World,
    all_gather_objects,
    all_reduce_sum_,
    broadcast_tensors_,
    current_world,
    rank_seed,
    run_on_main,
    shard,
)
from pyrovae.runtime.interrupt import StopSignals, TrainingInterrupted
from pyrovae.train import hooks as H
from pyrovae.train.resume import data_fingerprint, read_resumable
from pyrovae.train.step import GradientStep

__all__ = ["bound_name", "dataset_bound", "evaluation_data", "fit"]


def fit(
    model: Callable,
    guide: Callable,
    dataset: Dataset | torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    objective: Objective,
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
    hooks: Sequence[H.Hook] = (),
    fast_path: Union[str, bool] = "replay",
) -> History:
    """Train ``model`` and ``guide`` by stochastic variational inference.

    The training set stays on its device as one tensor; each epoch visits it in shuffled index
    batches (no per-item ``DataLoader``), dynamically binarized when the data set says so. Each
    step passes ``(x_batch, index, N)`` to model and guide, so the data plate scales the minibatch
    loss by N/B. Adam (:class:`pyrovae.infer.optim.LazyAdam`, lazy for per-datapoint parameters so
    rows outside the batch never move) with a per-epoch learning-rate factor ``lr_decay``.

    **Any Pyro model and guide.** One dry run before training (:func:`pyrovae.params.inspect`,
    on a batch prepared as training prepares it, without touching the training's random numbers)
    finds every param the pair uses: ``pyro.module`` networks, ``pyro.param`` values, autoguide
    parameters. Params inside the subsampled data plate (with ``event_dim``) are per-datapoint
    rows: stepped lazily, reduced by rows across processes, and such a guide gets no test bound.

    After every epoch the history gets the mean training bound and, for guides that generalise to
    new points, the test bound; the checkpoint (every param the run used with the networks'
    buffers, optimizer state, config, epoch, history, RNG states) is written atomically. An
    existing checkpoint is only continued with ``resume=True``, never overwritten.

    **Faults.** A non-finite loss or gradient stops training with a ``FloatingPointError`` naming
    the epoch and step, before the update, so neither the parameters in memory nor the last
    checkpoint hold NaNs. SIGINT (Ctrl-C) or SIGTERM stops at the end of the current step, writes a
    checkpoint that records the position inside the epoch (and every RNG state), and raises
    :class:`pyrovae.runtime.interrupt.TrainingInterrupted`; ``resume=True`` then continues so that
    the final parameters equal those of an uninterrupted run.

    **Data parallel.** Inside a ``torch.distributed`` process group (see
    :mod:`pyrovae.runtime.distributed`; launched with torchrun) every process draws the same global
    batch of ``batch_size`` points, works on its own slice, and the gradients are all-reduced
    (:class:`pyrovae.train.step.GradientStep`), so the run equals one process with the same batch
    size up to floating-point summation order. Rank 0 alone writes the checkpoint; each process
    samples with its own seed (:func:`pyrovae.runtime.distributed.rank_seed`), and their RNG states
    are all saved.

    :param dataset: a :class:`~pyrovae.data.Dataset`, a tensor of training points ``(N, ...)``, or a
        pair ``(x_train, x_test)`` of tensors (used as they are: no binarization).
    :param objective: a ``pyro.infer.ELBO``, e.g. from :func:`pyrovae.make_objective`.
    :param batch_size: points per step (the global batch, summed over processes).
    :param checkpoint_path: where to write the checkpoint; an existing file needs ``resume=True``.
    :param resume: continue from ``checkpoint_path`` if it exists (to ``epochs`` in total).
    :param config: saved in the checkpoint; on resume it must match the saved one (except epochs
        and the evaluation settings, :data:`pyrovae.train.resume.RESUMABLE_CHANGES`).
    :param test_bound: compute the test-set bound each epoch (guides without per-datapoint rows).
    :param progress: tqdm bars on a terminal, one line per epoch elsewhere; ``False``: one
        ``logging`` INFO line per epoch.
    :param validate: keep Pyro's argument validation on in the training loop (slower).
    :param clip_norm: clip the global L2 norm of the gradient to this value (``None``: no clipping).
    :param handle_signals: turn SIGINT/SIGTERM into a checkpoint and :class:`TrainingInterrupted`
        (main thread only).
    :param local_steps: per-datapoint guides only (:class:`pyrovae.protocols.RefinableGuide`):
        before each step, the batch's rows take this many Adam steps (rate ``local_lr``) on their
        own ELBO with the model fixed; the step then updates the model alone, the rows held fixed
        (stochastic variational inference with local and global steps, Hoffman et al. 2013).
        0: the rows take one Adam step with the model, like any parameter.
    :param hooks: more :class:`pyrovae.train.hooks.Hook` s, run after fit's own at every event; a
        :class:`~pyrovae.train.hooks.FitHook` (e.g. :class:`pyrovae.train.tracking.TensorBoardLogger`)
        is first told the model, guide and data (:class:`~pyrovae.train.hooks.FitContext`).
    :param fast_path: how each step runs (:mod:`pyrovae.infer.replay`): ``"replay"`` (default)
        traces the objective's ``loss_and_grads`` once per batch shape and replays the recorded
        tensor ops: the same kernels in the same order, so the same bits as Pyro's step (checked
        against it on the first replay); steps that cannot be traced stay eager. ``"inductor"``
        also compiles the graph (faster; equal to rounding, so a resumed run matches an
        uninterrupted one to rounding, not bit for bit). ``"eager"`` runs Pyro's code every step.
        ``True``/``False`` mean ``"replay"``/``"eager"``.
    :return: the :class:`History`, also stored in the checkpoint.
    """
    world = current_world()
    _check_arguments(epochs, batch_size, lr, lr_decay, clip_norm, local_steps, local_lr)
    data = training_data(dataset, seed if test_bound else None)
    backend = choose_backend(fast_path)  # a bad setting fails here, before anything is opened
    _check_fit(guide, data.num_train, batch_size, local_steps, world)
    saved = _open_checkpoint(checkpoint_path, resume, config, data.train, epochs, world)
    if saved is None:
        pyro.set_rng_seed(rank_seed(seed, world.rank))
    sites = dry_run(model, guide, objective, data, min(batch_size, data.num_train), seed, saved)
    _check_rows(sites.local, data.num_train)
    local = frozenset(sites.local)
    steps_per_epoch = math.ceil(data.num_train / batch_size)
    optimizer = make_pyro_optimizer(lr, lr_decay ** (1.0 / steps_per_epoch), lazy_params=local)
    state = TrainState(generator=torch.Generator(device=data.device), history=History(bound_name=bound_name(objective)))
    if saved is not None:
        _restore(saved, state, optimizer, objective, world, seed, checkpoint_path, data.device)
    else:
        state.generator.manual_seed(seed)
        _broadcast_params(sites, world)  # every process starts from rank 0's values, as DDP does
    checkpoint = H.Checkpoint(
        checkpoint_path,
        lambda: _contents(sites, optimizer, objective, world, config, data),
        world,
        last_saved=None if saved is None else saved["epoch"],
    )
    generalises = data.test is not None and not sites.local
    # generalises: data.test is not None
    bound = (
        (lambda: _sharded_bound(model, guide, objective, cast(torch.Tensor, data.test), world)) if generalises else None
    )
    with pyro.validation_enabled(validate), StopSignals(handle_signals) as signals:
        step = FitStep(
            GradientStep(
                model,
                guide,
                objective,
                optimizer,
                local_params=local,
                clip_norm=clip_norm,
                world=world,
                fast_path=backend,
            ),
            data.num_train,
            world,
            signals,
            guide,
            local_steps,
            local_lr,
        )
        show = H.Progress() if progress else H.EpochLog()
        context = H.FitContext(
            model,
            guide,
            objective,
            data.train,
            data.batch,
            data.test,
            generalises,
            tuple(data.record["image_shape"]) if data.record.get("image_shape") else None,
            lr,
            lr_decay,
            seed,
            settings=dict(
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                lr_decay=lr_decay,
                seed=seed,
                clip_norm=clip_norm,
                objective=type(objective).__name__,
                bound=state.history.bound_name,
                num_particles=objective.num_particles,
                local_steps=local_steps,
                fast_path=str(fast_path),
            ),
            config=config,
            is_main=world.is_main,
        )
        for hook in hooks:
            if isinstance(hook, H.FitHook):
                hook.bind(context)
        trainer = Trainer(
            step,
            data.train,
            batch_size=batch_size,
            prepare=data.batch,
            advice=(f"Lower lr (--lr, now {lr}), clip gradients (clip_norm, --clip-norm), or check the data."),
            hooks=[
                H.TestBound(bound),
                *([show] if world.is_main else []),
                checkpoint,
                H.StopOnSignal(signals, world, data.device),
                *hooks,
            ],
        )
        trainer.run(state, epochs)
    if state.stop == "signal":
        raise _interrupted(signals, state, checkpoint_path, steps_per_epoch)
    return state.history


# ---------------------------------------------------------------------------------------------
# The data


@dataclass
class TrainingData:
    """The training points, how a batch of them is prepared, and the test points as evaluated."""

    train: torch.Tensor
    test: Optional[torch.Tensor]
    batch: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]]
    record: dict[str, Any]

    @property
    def num_train(self) -> int:
        return self.train.shape[0]

    @property
    def device(self) -> torch.device:
        return self.train.device


def training_data(data: Any, test_seed: Optional[int]) -> TrainingData:
    """``fit``'s view of a :class:`~pyrovae.data.Dataset`, a tensor, or a ``(train, test)`` pair;
    the test points only when ``test_seed`` is given (dynamically binarized ones get one fixed
    draw with that seed, :func:`evaluation_data`)."""
    if isinstance(data, Dataset):
        check_data(data.train, data.likelihood, name=f"{data.name} train")
        test = evaluation_data(data, "test", test_seed) if test_seed is not None else None
        record = {
            "name": data.name,
            "x_dim": data.x_dim,
            "likelihood": data.likelihood,
            "image_shape": list(data.image_shape) if data.image_shape else None,
        }
        return TrainingData(
            data.train,
            test,
            data.batch if data.binarize == "dynamic" else None,
            {**record, "fingerprint": data_fingerprint(data.train)},
        )
    train, test = data if isinstance(data, tuple) and len(data) == 2 else (data, None)
    for name, x in (("the training points", train), ("the test points", test)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or len(x) == 0:
            raise ValueError(
                f"fit takes a pyrovae.data.Dataset, a tensor of training points (N, ...) or a pair "
                f"(x_train, x_test) of them; {name} are {type(x).__name__}"
                + (f" of dtype {x.dtype} and shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else "")
                + ": pass non-empty floating-point tensors, e.g. torch.as_tensor(x, dtype=torch.float32)"
            )
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} hold NaN or infinite entries; drop or impute them before fitting")
    if test is not None and test.shape[1:] != train.shape[1:]:
        raise ValueError(
            f"the test points have shape {tuple(test.shape[1:])} but the training points "
            f"{tuple(train.shape[1:])}; both must share the same layout"
        )
    record = {
        "name": "tensor",
        "x_dim": int(train[0].numel()),
        "likelihood": None,
        "image_shape": None,
        "fingerprint": data_fingerprint(train),
    }
    return TrainingData(train, test if test_seed is not None else None, None, record)


def evaluation_data(dataset: Dataset, split: str = "test", seed: int = 0) -> torch.Tensor:
    """The points of ``split`` as the model sees them at evaluation time: dynamically binarized
    data get one fixed Bernoulli draw (seeded), so every evaluation uses the same binary set."""
    x = getattr(dataset, split)
    if dataset.binarize != "dynamic":
        return x
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return torch.bernoulli(x, generator=generator)


# ---------------------------------------------------------------------------------------------
# The dry run


class _PlateDepth(Messenger):
    # The plates the sample sites sit in, as Pyro's ELBO guesses max_plate_nesting from them.
    def __init__(self) -> None:
        super().__init__()
        self.dims: list[int] = []

    def _postprocess_message(self, msg: Any) -> None:
        if msg["type"] == "sample" and not site_is_subsample(msg):
            self.dims += [frame.dim for frame in msg["cond_indep_stack"] if frame.vectorized]


def dry_run(
    model: Callable,
    guide: Callable,
    objective: Objective,
    data: TrainingData,
    size: int,
    seed: int,
    saved: Optional[dict[str, Any]],
) -> params.ParamSites:
    """One run of guide and model on a batch prepared as training prepares it (binarized by a
    generator of its own, so the training's random numbers are untouched): loads a checkpoint's
    params into the networks, creates missing params, and sets the objective's plate nesting."""
    if saved is not None:
        params.load_state({**saved["params"], "buffers": saved.get("buffers") or {}}, device=data.device)
    index = torch.arange(size, device=data.device)
    x = data.train[index]
    if data.batch is not None:
        x = data.batch(x, torch.Generator(device=data.device).manual_seed(seed))
    model_depth, guide_depth = _PlateDepth(), _PlateDepth()
    sites = params.inspect(model_depth(model), guide_depth(guide), (x, index, data.num_train))
    if saved is not None and "buffers" not in saved:  # written before fit saved the whole param store
        _load_modules(sites.modules, saved["modules"])
    if objective.max_plate_nesting == float("inf"):
        dims = model_depth.dims + guide_depth.dims
        objective.max_plate_nesting = -min(dims) if dims else 0
        # Pyro's own vectorized particles take one more dim; pyrovae's per-data-point objectives
        # put their particle plate left of max_plate_nesting themselves.
        own_particles = isinstance(objective, PerDatapointObjective)
        if objective.vectorize_particles and objective.num_particles > 1 and not own_particles:
            objective.max_plate_nesting += 1
    return sites


def _load_modules(modules: Mapping[str, torch.nn.Module], saved: dict[str, Any]) -> None:
    for name, module in modules.items():
        if name not in saved:
            raise ValueError(
                f"the checkpoint holds no weights for the network {name!r}; it was written "
                "for another model or guide: resume with the same one, or resume=False"
            )
        module.load_state_dict(saved[name])


def _check_rows(rows: Mapping[str, int], num_data: int) -> None:
    # Per-datapoint parameters (of a LocalGuide, or params with rows in the data plate) must have
    # one row per training point.
    for name, size in rows.items():
        if size != num_data:
            raise ValueError(
                f"the per-datapoint guide holds parameters for {size} points but the training set has "
                f"{num_data} ({name!r}); build it for this data set, e.g. PerDatapointGuide(num_data={num_data}, "
                "...), or clear the param store (pyro.clear_param_store()) of an earlier guide's rows"
            )


# ---------------------------------------------------------------------------------------------
# The step


class FitStep:
    """fit's step on a global batch: this process's slice (:func:`~pyrovae.runtime.distributed.shard`),
    then, with ``local_steps``, the batch's rows refined with the model fixed, then the
    :class:`~pyrovae.train.step.GradientStep` (rows held fixed if they were refined). The stop
    signal travels with the gradients' all-reduce."""

    def __init__(
        self,
        step: GradientStep,
        num_data: int,
        world: World,
        signals: StopSignals,
        guide: Any,
        local_steps: int = 0,
        local_lr: float = 0.0,
    ) -> None:
        self.step, self.num_data, self.world, self.signals = step, num_data, world, signals
        self.guide, self.local_steps, self.local_lr = guide, local_steps, local_lr

    def __call__(self, x_batch: torch.Tensor, batch_index: torch.Tensor) -> StepResult:
        index, x = shard(batch_index, self.world), shard(x_batch, self.world)
        weight = None
        if len(index) == 0:  # a last batch smaller than the number of processes
            index, x, weight = batch_index[:1], x_batch[:1], 0.0
        held: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if self.local_steps:
            with frozen_params(lambda name: True):
                self.guide.refine_rows(self.step.model, x, index, self.local_steps, self.local_lr)
            held = frozen_params(self.step.local_params.__contains__)
        with held:
            return self.step(
                x, index, self.num_data, batch_index=batch_index, weight=weight, stop=self.signals.requested
            )


# ---------------------------------------------------------------------------------------------
# Checks


def _check_arguments(
    epochs: int,
    batch_size: int,
    lr: float,
    lr_decay: float,
    clip_norm: Optional[float],
    local_steps: int,
    local_lr: float,
) -> None:
    if not isinstance(local_steps, int) or isinstance(local_steps, bool) or local_steps < 0:
        raise ValueError(f"local_steps must be an integer >= 0, got {local_steps!r}")
    if local_steps and not local_lr > 0:
        raise ValueError(f"local_lr must be positive, got {local_lr}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not lr > 0 or not 0 < lr_decay <= 1:
        raise ValueError(f"need lr > 0 and 0 < lr_decay <= 1, got lr={lr}, lr_decay={lr_decay}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive (or None for no clipping), got {clip_norm}")


def _check_batch_size(batch_size: int, num_data: int, world: World) -> None:
    if batch_size > num_data:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {num_data} training points; use "
            f"--batch-size {num_data} or less (batch_size={num_data} or less)"
        )
    if batch_size < world.world_size:
        raise ValueError(
            f"batch_size={batch_size} is smaller than the {world.world_size} processes; each process "
            f"needs points of every batch: use batch_size={world.world_size} or more"
        )


def _check_fit(guide: Callable, num_data: int, batch_size: int, local_steps: int, world: World) -> None:
    _check_batch_size(batch_size, num_data, world)
    if local_steps and not isinstance(guide, RefinableGuide):
        raise ValueError(
            f"local_steps={local_steps} needs a per-datapoint guide with refine_rows (PerDatapointGuide, "
            f"--guide per-datapoint); {type(guide).__name__} has no rows to refine: use local_steps=0"
        )
    if local_steps and world.is_distributed:
        raise ValueError(
            "local_steps is not supported in data-parallel training (each process would refine only its "
            "slice's rows); train in one process, or use local_steps=0"
        )
    _check_rows({"guide": guide.num_data} if isinstance(guide, LocalGuide) else {}, num_data)


def _open_checkpoint(
    path: Any, resume: bool, config: Optional[dict[str, Any]], x_train: torch.Tensor, epochs: int, world: World
) -> Optional[dict[str, Any]]:
    # Rank 0 reads the checkpoint and hands it to the others, so only it needs the file.
    saved = run_on_main(lambda: read_resumable(path, resume, config, x_train, epochs), world)
    if resume and saved is None and world.is_main:
        warnings.warn(f"resume=True: no checkpoint at {path}; starting from scratch", stacklevel=2)
    if path is not None and world.is_main:
        remove_stale_temporaries(path)
    return saved


# ---------------------------------------------------------------------------------------------
# Checkpoints, resume, interruption


def _rank_state(objective: Objective) -> dict[str, Any]:
    # What differs between processes: the global RNGs, and the state of stateful objectives (the
    # moving-average baseline of the score-function ELBO).
    return {
        "rng": rng_state(),
        "objective": objective.get_state() if isinstance(objective, StatefulObjective) else None,
    }


def _set_rank_state(state: dict[str, Any], objective: Objective) -> None:
    set_rng_state(state["rng"])
    if state.get("objective") is not None and isinstance(objective, StatefulObjective):
        objective.set_state(state["objective"])


def _contents(
    sites: params.ParamSites,
    optimizer: Any,
    objective: Objective,
    world: World,
    config: Optional[dict[str, Any]],
    data: TrainingData,
) -> dict[str, Any]:
    rank_states = all_gather_objects(_rank_state(objective), world)
    if not world.is_main:
        return {}
    saved = params.state(sites.names, modules=sites.modules)
    return {
        "config": config,
        # Every param the run used (network weights, per-datapoint rows, globals) in the layout of
        # Pyro's ParamStoreDict.get_state, the networks' buffers beside it, and their state dicts
        # (as readers of earlier checkpoints expect).
        "params": {"params": saved["params"], "constraints": saved["constraints"]},
        "buffers": saved["buffers"],
        "modules": _state_dicts(saved),
        "optimizer": optimizer.get_state(),
        "rng": rank_states[0]["rng"],
        "rank_states": rank_states,
        "world_size": world.world_size,
        "dataset": data.record,
    }


def _state_dicts(saved: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    # Each pyro.module network's state dict, read from the param store's "<name>$$$<param>" entries
    # and its buffers (so also for a network inspect's forward hook did not see called as a whole).
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in saved["params"].items():
        if DIVIDER in name:
            prefix, key = name.split(DIVIDER, 1)
            modules.setdefault(prefix, {})[key] = value
    for prefix, buffers in saved["buffers"].items():
        modules.setdefault(prefix, {}).update(buffers)
    return modules


def _to_device(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {key: _to_device(value, device) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to_device(value, device) for value in tree)
    return tree


def _restore(
    saved: dict[str, Any],
    state: TrainState,
    optimizer: Any,
    objective: Objective,
    world: World,
    seed: int,
    path: Any,
    device: torch.device,
) -> None:
    optimizer.set_state(_to_device(saved["optimizer"], device))
    state.generator.set_state(saved["generator"].cpu())
    rank_states = saved.get("rank_states")
    if rank_states is not None and len(rank_states) == world.world_size:
        _set_rank_state(rank_states[world.rank], objective)
    elif rank_states is None and not world.is_distributed:
        set_rng_state(saved["rng"])  # written by a pyrovae without rank_states
    else:
        written = 1 if rank_states is None else len(rank_states)
        warnings.warn(
            f"{path} was written by {written} process(es) and is resumed by {world.world_size}: training "
            "continues correctly, but the sampling noise after this point will not repeat the "
            "uninterrupted run bit for bit",
            stacklevel=2,
        )
        pyro.set_rng_seed(rank_seed((seed + 1_000_003 * (saved["epoch"] + 1)) % 2**32, world.rank))
    state.history = History.from_dict(saved["history"])
    state.epoch = saved["epoch"]
    state.restore_position(saved.get("position"), device)


def _broadcast_params(sites: params.ParamSites, world: World) -> None:
    if not world.is_distributed:
        return
    store = pyro.get_param_store()
    tensors = [store._params[name].detach() for name in sorted(sites.names)]
    buffers = [b for name in sorted(sites.modules) for b in sites.modules[name].buffers()]
    broadcast_tensors_(tensors + buffers, world)


def _interrupted(signals: StopSignals, state: TrainState, path: Any, steps_per_epoch: int) -> TrainingInterrupted:
    signum = signals.signum or signal.SIGINT
    if path is None:
        saved = "no checkpoint_path was given, so nothing was saved"
    else:
        saved = f"saved {path}; continue with --resume (resume=True) for exactly the same result"
    step = state.step if state.mid_epoch else 0
    where = f"epoch {state.epoch + 1}, step {step} of {steps_per_epoch}" if step else f"the end of epoch {state.epoch}"
    return TrainingInterrupted(
        f"interrupted by {signal.Signals(signum).name} at {where}: {saved}",
        signum=signum,
        epoch=state.epoch + (1 if step else 0),
        step=step,
        checkpoint_path=None if path is None else str(path),
    )


# ---------------------------------------------------------------------------------------------
# Bounds


def bound_name(objective: Objective) -> str:
    """A human-readable name of the bound an objective optimises, e.g. ``"IWAE (K=5)"``."""
    own = getattr(objective, "bound_name", None)
    if isinstance(own, str):  # objectives that name their bound (MIWAE, PIWAE, CIWAE)
        return own
    name = type(objective).__name__
    k = objective.num_particles
    if name == "IWAE":
        return f"IWAE (K={k})"
    return "ELBO" if k == 1 else f"ELBO (K={k})"


@torch.no_grad()
def dataset_bound(
    model: Callable, guide: Callable, objective: Objective, x: torch.Tensor, batch_size: int = 500
) -> float:
    """The objective's bound on a whole data set in nats per point: -Σ loss / N over batches,
    each batch scaled by N/B by the data plate."""
    num_data = x.shape[0]
    total = 0.0
    for index in torch.arange(num_data, device=x.device).split(batch_size):
        total += objective.loss(model, guide, x[index], index, num_data) * len(index) / num_data
    return -total / num_data


def _sharded_bound(
    model: Callable, guide: Callable, objective: Objective, x: torch.Tensor, world: World, batch_size: int = 500
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
