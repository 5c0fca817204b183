"""Experiment tracking: a run's curves, images and config in TensorBoard or MLflow, as hooks of
:func:`pyrovae.fit`.

:class:`TrackingLogger` decides *what* is logged; each backend (:class:`TensorBoardLogger`,
:class:`MLflowLogger`) only *how* it is written:

==========================  =======================================================================
``step/loss``               the step's loss in nats per data point (the negative bound of its
                            batch), every ``log_every`` steps; its x-axis is the step of the whole
                            run (epochs before included, also across resumes)
``step/grad_norm``          the global L2 norm of the gradient before clipping, on the same steps
``epoch/train_bound``       the history's values (:class:`~pyrovae.infer.loop.History`), x-axis
``epoch/test_bound``        the epoch (1-based); the test bound only when fit computes it
``epoch/kl``                KL(q(z|x) ‖ p(z)) and the number of active units (Burda et al. 2016) of
``epoch/active_units``      the first ``summary_points`` test points (training points for a guide
                            with per-datapoint rows), :func:`pyrovae.infer.evaluate.kl_to_prior`,
                            :func:`~pyrovae.infer.evaluate.active_units`
``epoch/lr``                Adam's step size at the start of the epoch (it decays by ``lr_decay``
                            over the epoch)
``epoch/grad_norm``         the mean gradient norm over the epoch's steps
``epoch/seconds``           the epoch's wall-clock time
``images/samples``          image grids (``torchvision.utils.make_grid``) of the decoder's means
``images/reconstructions``  of prior draws, and of test points (odd rows) above their
                            reconstructions, when the data are images and the model can
``config``                  the resolved config (fit's settings, then ``config``): TensorBoard text
                            and hparams, MLflow params and a ``config.json`` artifact
``final/...``               what :meth:`TrackingLogger.log_metrics` is given after training
                            (``pyrovae train`` gives it the test metrics of ``metrics.json``)
==========================  =======================================================================

**Cost.** A logged step appends one tuple to a buffer: the loss is already a float (the step reads
it to check it is finite), the gradient norm stays a tensor on the device. The buffer is written at
each epoch's end, and every ``flush_seconds`` during an epoch, with one device read for all its
gradient norms. The per-epoch values are computed after the epoch's checkpoint, with the random
number generators forked and seeded, so logging changes neither the training nor its resume.

TensorBoard (``pip install "pyrovae[tensorboard]"``) and MLflow (``pip install "pyrovae[mlflow]"``)
are optional and imported only when a logger is built; a missing one is a
:class:`MissingExtraError` (an ``ImportError``) that names the extra to install.

Example::

    from pyrovae.train.tracking import TensorBoardLogger
    with TensorBoardLogger("runs/tb", log_every=10) as tb:
        fit(model, guide, data, objective, epochs=10, hooks=[tb])
"""

from __future__ import annotations

import importlib
import json
import math
import os
import pathlib
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any, Optional

import torch
import torchvision.utils

from pyrovae.infer.evaluate import active_units, kl_to_prior, posterior_means
from pyrovae.infer.loop import StepResult, Trainer, TrainState
from pyrovae.protocols import Decodes, Reconstructs, SamplesData
from pyrovae.train.hooks import FitHook

__all__ = ["LOGGERS", "MLflowLogger", "MissingExtraError", "TensorBoardLogger", "TrackingLogger", "make_logger"]

#: The tracking backends by name: ``(what it writes, the pip extra that installs it)``.
LOGGERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("TensorBoard event files (the run folder's tb/ by default)", "tensorboard"),
    "mlflow": ("an MLflow run (a SQLite store in the run folder's mlruns/ by default, or tracking_uri)", "mlflow"),
}


class MissingExtraError(ImportError):
    """A tracking backend's package is not installed; the message names the pip extra that installs it."""

    def __init__(self, message: str, extra: str) -> None:
        super().__init__(message)
        self.extra = extra


def _require(module: str, extra: str, who: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f'{who} needs the {extra} package, which is not installed: pip install "pyrovae[{extra}]"', extra
        ) from None


class TrackingLogger(FitHook):
    """What a run logs (see :mod:`pyrovae.train.tracking`); a backend says how, in :meth:`_open`,
    :meth:`_write_scalars`, :meth:`_write_params`, :meth:`_write_image` and :meth:`_close`.

    Pass it to ``fit(..., hooks=[logger])``; only rank 0 of a data-parallel run writes. The writer
    is opened when the run starts and closed when it ends; :meth:`log_metrics` after that reopens it
    for the final values, and :meth:`close` (or a ``with`` block) closes it for good.

    :param log_every: log the step's loss and gradient norm every this many steps (the buffer is
        written at each epoch's end, so any value costs no measurable time per step).
    :param config: the config to log (e.g. ``TrainConfig.resolved().to_dict()``); default: the
        ``config`` given to ``fit``. fit's own settings (epochs, lr, objective, ...) are logged too.
    :param summary_points: points of the per-epoch KL and active units (0: neither).
    :param images: log sample and reconstruction grids each epoch (image data only).
    :param num_images: images per grid.
    :param flush_seconds: also write the step buffer during an epoch when this much time passed.
    """

    def __init__(
        self,
        *,
        log_every: int = 10,
        config: Optional[dict[str, Any]] = None,
        summary_points: int = 1000,
        images: bool = True,
        num_images: int = 64,
        flush_seconds: float = 30.0,
    ) -> None:
        for name, value, least in (
            ("log_every", log_every, 1),
            ("summary_points", summary_points, 0),
            ("num_images", num_images, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if not flush_seconds > 0:
            raise ValueError(f"flush_seconds must be positive, got {flush_seconds!r}")
        self.log_every, self.config, self.summary_points = log_every, config, summary_points
        self.images, self.num_images, self.flush_seconds = images, num_images, flush_seconds
        self._pending: list[tuple[int, float, Optional[torch.Tensor]]] = []
        self._norm_sum: Optional[torch.Tensor] = None
        self._norm_steps = 0
        self._opened = False
        self._last_flush = time.perf_counter()
        self._last_step = 0

    # -- what is logged ---------------------------------------------------------------------------

    @property
    def _active(self) -> bool:
        return self.context is not None and self.context.is_main

    def on_start(self, trainer: Trainer, state: TrainState) -> None:
        if not self._active:
            return
        self._ensure_open()
        self._write_params(self.params())

    def on_step_end(self, trainer: Trainer, state: TrainState, result: StepResult) -> None:
        if not self._active:
            return
        if result.grad_norm is not None:
            self._norm_sum = result.grad_norm if self._norm_sum is None else self._norm_sum + result.grad_norm
            self._norm_steps += 1
        step = self._run_step(trainer, state)
        self._last_step = step
        if step % self.log_every == 0:
            self._pending.append((step, result.loss / trainer.num_data, result.grad_norm))
            if time.perf_counter() - self._last_flush > self.flush_seconds:
                self.flush()

    def on_epoch_end(self, trainer: Trainer, state: TrainState) -> None:
        if not self._active:
            return
        self.flush()
        assert self.context is not None  # _active
        epoch = state.epoch
        with torch.random.fork_rng(devices=self._cuda_devices()), torch.no_grad():
            torch.manual_seed(self.context.seed + epoch)
            values = self.epoch_values(state)
            grids = self.image_grids() if self.images else {}
        self._write_scalars([(f"epoch/{name}", value, epoch) for name, value in values.items()])
        for tag, grid in grids.items():
            self._write_image(f"images/{tag}", grid, epoch)

    def on_end(self, trainer: Trainer, state: TrainState) -> None:
        if not self._active:
            return
        self.flush()
        self.close(status="KILLED" if state.stop == "signal" else "FINISHED")

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None, prefix: str = "final/") -> None:
        """Log the numbers of ``metrics`` (others are skipped) as ``prefix + name`` at ``step``
        (default: the last training step), e.g. the test metrics after training."""
        if not self._active:
            return
        step = self._last_step if step is None else step
        rows = [
            (prefix + name, float(value), step)
            for name, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ]
        self._ensure_open()
        self._write_scalars(rows)
        self._flush_backend()

    def params(self) -> dict[str, Any]:
        """The settings and config to log, flat: fit's settings, then the config's options."""
        assert self.context is not None
        config = self.config if self.config is not None else (self.context.config or {})
        flat = {**self.context.settings, **{k: v for k, v in config.items() if k != "extra"}}
        for key, value in (config.get("extra") or {}).items():
            flat[f"extra.{key}"] = value
        return flat

    def epoch_values(self, state: TrainState) -> dict[str, float]:
        """The per-epoch scalars (see the table of :mod:`pyrovae.train.tracking`)."""
        assert self.context is not None
        history = state.history
        values = {"train_bound": history.train_bound[-1]}
        if history.test_bound and history.test_bound[-1] is not None:
            values["test_bound"] = history.test_bound[-1]
        values.update(self.latent_summary())
        values["lr"] = self.context.epoch_lr(state.epoch)
        if self._norm_sum is not None and self._norm_steps:
            values["grad_norm"] = self._norm_sum.item() / self._norm_steps
        self._norm_sum, self._norm_steps = None, 0
        values["seconds"] = history.seconds[-1]
        return values

    def _summary_data(self) -> tuple[torch.Tensor, int]:
        # Test points for a guide that generalises, else the first training points with their
        # own rows (binarized once, with the run's seed).
        context = self.context
        assert context is not None
        if context.generalises and context.test is not None:
            return context.test[: self.summary_points], context.test.shape[0]
        x = context.train[: self.summary_points]
        if context.prepare is not None:
            x = context.prepare(x, torch.Generator(device=x.device).manual_seed(context.seed))
        return x, context.train.shape[0]

    def latent_summary(self, batch_size: int = 500) -> dict[str, float]:
        """``kl``: the mean KL(q(z|x) ‖ p(z)); ``active_units``: the active units summed over the
        latent sites, over the summary points (nothing when there are fewer than 2)."""
        assert self.context is not None
        if self.summary_points < 2:
            return {}
        x, num_data = self._summary_data()
        if x.shape[0] < 2:
            return {}
        model, guide = self.context.model, self.context.guide
        kl: list[torch.Tensor] = []
        means: dict[str, list[torch.Tensor]] = {}
        for index in torch.arange(x.shape[0], device=x.device).split(batch_size):
            args = (x[index], index, num_data)
            kl.append(kl_to_prior(model, guide, *args, num_samples=10))
            for name, mean in posterior_means(guide, *args, num_samples=100).items():
                means.setdefault(name, []).append(mean.reshape(len(index), -1))
        units = sum(int(active_units(torch.cat(parts)).sum()) for parts in means.values())
        return {"kl": torch.cat(kl).mean().item(), "active_units": float(units)}

    def image_grids(self) -> dict[str, torch.Tensor]:
        """``samples`` and ``reconstructions`` as ``(3, H, W)`` grids in [0, 1], for image data and
        a model that samples (:class:`~pyrovae.protocols.SamplesData`) / reconstructs
        (:class:`~pyrovae.protocols.Reconstructs`, or :class:`~pyrovae.protocols.Decodes` the
        guide's posterior mean of ``z``)."""
        context = self.context
        assert context is not None
        shape = context.image_shape
        if shape is None:
            return {}
        model, guide = context.model, context.guide
        nrow = max(1, int(math.sqrt(self.num_images)))
        grids: dict[str, torch.Tensor] = {}
        if isinstance(model, SamplesData):
            _, x_mean, _ = model.sample(self.num_images, device=context.train.device)
            grids["samples"] = _grid(x_mean, shape, nrow)
        x, num_data = self._summary_data()
        width = min(nrow, x.shape[0])  # whole rows only, so each reconstruction sits under its point
        x = x[: width * max(1, min(x.shape[0], self.num_images // 2) // width)]
        reconstruction = None
        if isinstance(model, Reconstructs):
            reconstruction = model.reconstruct(guide, x)
        elif isinstance(model, Decodes):
            z = posterior_means(guide, x, torch.arange(x.shape[0], device=x.device), num_data).get("z")
            reconstruction = None if z is None else model.decode(z)
        if reconstruction is not None:
            pairs = torch.stack([x, reconstruction.reshape(x.shape)], 1)  # each point above its reconstruction
            rows = [pairs[i : i + width].transpose(0, 1).reshape(-1, *x.shape[1:]) for i in range(0, len(x), width)]
            grids["reconstructions"] = _grid(torch.cat(rows), shape, width)
        return grids

    # -- plumbing ---------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write the buffered step values."""
        self._last_flush = time.perf_counter()
        if not self._pending:
            return
        norms = [norm for _, _, norm in self._pending if norm is not None]
        read = iter(torch.stack(norms).tolist() if norms else [])
        rows = []
        for step, loss, norm in self._pending:
            rows.append(("step/loss", loss, step))
            if norm is not None:
                rows.append(("step/grad_norm", next(read), step))
        self._pending = []
        self._ensure_open()
        self._write_scalars(rows)
        self._flush_backend()

    def close(self, status: str = "FINISHED") -> None:
        """Write what is buffered and close the writer (``status``: MLflow's run status)."""
        if self._opened:
            self.flush()
            self._close(status)
            self._opened = False

    def __enter__(self) -> TrackingLogger:
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is None:
            self.close()
        else:  # Ctrl-C / SIGTERM (pyrovae's TrainingInterrupted is a KeyboardInterrupt) or an error
            self.fail("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")

    def fail(self, status: str = "FAILED") -> None:
        """End the run with ``status`` (MLflow's), also when training had closed it already and the
        error came later (in the evaluation): the run must not stay FINISHED or RUNNING."""
        if self._opened:
            self.close(status)
        else:
            self._mark(status)

    def _ensure_open(self) -> None:
        if not self._opened:
            self._open()
            self._opened = True

    @staticmethod
    def _run_step(trainer: Trainer, state: TrainState) -> int:
        steps = trainer.steps_per_epoch
        return state.epoch * steps + state.step if steps else state.global_step

    def _cuda_devices(self) -> list[int]:
        assert self.context is not None
        device = self.context.train.device
        return [device.index or 0] if device.type == "cuda" else []

    # -- the backend ------------------------------------------------------------------------------

    def _open(self) -> None:
        raise NotImplementedError

    def _write_scalars(self, rows: Sequence[tuple[str, float, int]]) -> None:
        """``(tag, value, step)`` rows."""
        raise NotImplementedError

    def _write_params(self, params: dict[str, Any]) -> None:
        raise NotImplementedError

    def _write_image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """``grid``: ``(3, H, W)`` in [0, 1] on the CPU."""
        raise NotImplementedError

    def _flush_backend(self) -> None: ...

    def _close(self, status: str) -> None:
        raise NotImplementedError

    def _mark(self, status: str) -> None:
        """Set the status of a closed run (backends without one: nothing)."""


def _grid(x: torch.Tensor, shape: tuple[int, ...], nrow: int) -> torch.Tensor:
    images = x.detach().reshape(-1, *shape).clamp(0, 1).float().cpu()
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=2)
    assert grid.dim() == 3 and grid.shape[0] == 3, grid.shape
    return grid


def _param_text(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple, dict)) or value is None else str(value)


class TensorBoardLogger(TrackingLogger):
    """Write the run as TensorBoard event files in ``log_dir`` (``torch.utils.tensorboard``): the
    scalars, the image grids, and the config as text (tag ``config``) and as hparams.

    :param log_dir: the folder of the event files (``tensorboard --logdir`` it).
    :raises MissingExtraError: when TensorBoard is not installed (``pip install "pyrovae[tensorboard]"``).
    """

    def __init__(self, log_dir: str | os.PathLike = "runs", **options: Any) -> None:
        self._tb = _require("torch.utils.tensorboard", "tensorboard", "TensorBoardLogger (log='tensorboard')")
        super().__init__(**options)
        self.log_dir = pathlib.Path(log_dir)
        self._writer: Any = None

    def _open(self) -> None:
        self._writer = self._tb.SummaryWriter(log_dir=str(self.log_dir))

    def _write_scalars(self, rows: Sequence[tuple[str, float, int]]) -> None:
        for tag, value, step in rows:
            self._writer.add_scalar(tag, value, step)

    def _write_params(self, params: dict[str, Any]) -> None:
        lines = ["| option | value |", "|---|---|", *(f"| {k} | {_param_text(v)} |" for k, v in params.items())]
        self._writer.add_text("config", "\n".join(lines))
        from torch.utils.tensorboard.summary import hparams

        simple = {k: v if isinstance(v, (int, float, str, bool)) else _param_text(v) for k, v in params.items()}
        metrics = {f"epoch/{name}": 0.0 for name in ("train_bound", "test_bound", "kl", "active_units")}
        for summary in hparams(simple, metrics):
            self._writer.file_writer.add_summary(summary)

    def _write_image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        self._writer.add_image(tag, grid, step)

    def _flush_backend(self) -> None:
        self._writer.flush()

    def _close(self, status: str) -> None:
        self._writer.close()
        self._writer = None


class MLflowLogger(TrackingLogger):
    """Log the run as an MLflow run (``mlflow.tracking.MlflowClient``, no global state): metrics
    with their steps, the config as params and as the artifact ``config.json``, the image grids as
    images (``MlflowClient.log_image``).

    Without ``tracking_uri`` the run goes into a local store in ``log_dir``, no server needed: the
    SQLite database ``log_dir/mlflow.db`` and the artifacts under ``log_dir/artifacts`` (also those
    of a new experiment in a ``sqlite:`` or ``file:`` store given as ``tracking_uri``; MLflow 3
    refuses its plain-file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set); look at it with
    ``mlflow ui --backend-store-uri sqlite:///LOG_DIR/mlflow.db``.

    :param tracking_uri: an MLflow tracking URI (``http://host:5000``, ``sqlite:///...``,
        ``file:...``); it takes precedence over ``log_dir``.
    :param log_dir: the folder of the local store.
    :param experiment: the experiment's name (created if missing).
    :param run_name: the run's name (MLflow picks one if ``None``).
    :param run_file: a JSON file that names the run (its id and tracking URI), written when the
        run is made. When it already names a run of this store: with ``resume=True`` logging goes
        on in that run (a resumed training continues its curves; params whose value changed, such
        as ``epochs``, are kept as tags ``resumed.<name>``, since MLflow params cannot change);
        otherwise that run is marked deleted (MLflow's soft delete: ``restore_run`` brings it
        back) and replaced by a new one, as ``pyrovae train --overwrite`` replaces a run.
    :param resume: continue the run ``run_file`` names.
    :raises MissingExtraError: when MLflow is not installed (``pip install "pyrovae[mlflow]"``).
    """

    def __init__(
        self,
        tracking_uri: Optional[str] = None,
        *,
        log_dir: str | os.PathLike = "mlruns",
        experiment: str = "pyrovae",
        run_name: Optional[str] = None,
        run_file: Optional[str | os.PathLike] = None,
        resume: bool = False,
        **options: Any,
    ) -> None:
        self._tracking = _require("mlflow.tracking", "mlflow", "MLflowLogger (log='mlflow')")
        self._entities = _require("mlflow.entities", "mlflow", "MLflowLogger (log='mlflow')")
        super().__init__(**options)
        self.log_dir = pathlib.Path(log_dir).absolute()
        # A local store (ours, or a sqlite/file URI given) keeps its artifacts in log_dir, not in
        # MLflow's default ./mlruns of the working directory; a server keeps its own.
        self._local = tracking_uri is None or tracking_uri.startswith(("sqlite:", "file:"))
        self.tracking_uri = tracking_uri or f"sqlite:///{self.log_dir / 'mlflow.db'}"
        self.experiment, self.run_name = experiment, run_name
        self.run_file = None if run_file is None else pathlib.Path(run_file)
        self.resume = bool(resume)
        self._continued = False  # logging into a run made by an earlier process
        self.client: Any = None
        self.run_id: Optional[str] = None

    def _open(self) -> None:
        if self.client is None:
            if self._local:
                self.log_dir.mkdir(parents=True, exist_ok=True)
            self.client = self._tracking.MlflowClient(tracking_uri=self.tracking_uri)
        if self.run_id is None:
            recorded = self._recorded_run()
            if recorded is not None and self.resume:
                self.run_id, self._continued = recorded, True
                self.client.update_run(self.run_id, status="RUNNING")
            elif recorded is not None:
                self.client.delete_run(recorded)  # the run this one replaces
        if self.run_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                artifacts = (self.log_dir / "artifacts").as_uri() if self._local else None
                experiment_id = self.client.create_experiment(self.experiment, artifact_location=artifacts)
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
            if self.run_file is not None:
                self.run_file.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri}))
        else:
            self.client.update_run(self.run_id, status="RUNNING")

    def _recorded_run(self) -> Optional[str]:
        """The id in ``run_file`` if it names a run of this tracking URI and experiment."""
        if self.run_file is None or not self.run_file.is_file():
            return None
        try:
            record = json.loads(self.run_file.read_text())
            if record.get("tracking_uri") != self.tracking_uri:
                return None
            run = self.client.get_run(record["run_id"])
        except Exception:  # unreadable, or a run this store does not hold: start a new one
            return None
        found = self.client.get_experiment_by_name(self.experiment)
        return run.info.run_id if found is not None and run.info.experiment_id == found.experiment_id else None

    def _write_scalars(self, rows: Sequence[tuple[str, float, int]]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._entities.Metric(tag, value, now, step) for tag, value, step in rows]
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def _write_params(self, params: dict[str, Any]) -> None:
        texts = {k: _param_text(v)[:6000] for k, v in params.items()}
        if self._continued:  # MLflow params cannot change: a changed value becomes a tag
            logged = self.client.get_run(self.run_id).data.params
            for key in [k for k in texts if k in logged]:
                value = texts.pop(key)
                if value != logged[key]:
                    self.client.set_tag(self.run_id, f"resumed.{key}", value)
        entries = [self._entities.Param(k, v) for k, v in texts.items()]
        for start in range(0, len(entries), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=entries[start : start + 100])
        self.client.log_dict(self.run_id, params, "config.json")

    def _write_image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        pixels = grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        self.client.log_image(self.run_id, pixels, key=tag.replace("/", "_"), step=step)

    def _close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)

    def _mark(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)


def make_logger(
    name: str, log_dir: str | os.PathLike, tracking_uri: Optional[str] = None, **options: Any
) -> TrackingLogger:
    """The logger ``name`` of :data:`LOGGERS` writing into ``log_dir`` (MLflow: or to ``tracking_uri``)."""
    if name == "tensorboard":
        if tracking_uri is not None:
            raise ValueError("tracking_uri is MLflow's; TensorBoard writes into log_dir: leave tracking_uri unset")
        return TensorBoardLogger(log_dir, **options)
    if name == "mlflow":
        return MLflowLogger(tracking_uri, log_dir=log_dir, **options)
    raise ValueError(f"no logger {name!r}; the loggers are {sorted(LOGGERS)}")
