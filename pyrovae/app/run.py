"""The main job end to end: load data, build, train, evaluate, write metrics and figures.

The CLI (:mod:`pyrovae.app.cli`) only parses flags and calls these functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any, NamedTuple, Optional

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs into one folder are not guarded there
    fcntl = None  # type: ignore[assignment]

import pyro
import torch

from pyrovae import params
from pyrovae.app import plots
from pyrovae.app.build import build, build_model
from pyrovae.app.config import ConfigError, TrackingConfig, TrainConfig, check_device_name, objective_options
from pyrovae.app.registry import guide_spec, model_spec
from pyrovae.data import Dataset, load_dataset
from pyrovae.infer.evaluate import evaluate_dataset, posterior_means
from pyrovae.infer.objectives import make_objective
from pyrovae.protocols import ExactLikelihood, Reconstructs
from pyrovae.runtime import distributed
from pyrovae.runtime.checkpoint import load_checkpoint, remove_stale_temporaries
from pyrovae.train import evaluation_data, fit
from pyrovae.train.tracking import MissingExtraError, TrackingLogger, make_logger

CHECKPOINT = "checkpoint.pt"
#: The checkpoint of a model family's training before the main one (:attr:`ModelSpec.pretrain`).
PRETRAIN_CHECKPOINT = "baseline_checkpoint.pt"
METRICS = "metrics.json"
#: Everything `pyrovae train` writes into its output folder; ``overwrite=True`` removes these and nothing else.
#: The run folder's record of its MLflow run (:class:`~pyrovae.train.tracking.MLflowLogger`'s
#: ``run_file``): a resumed run goes on logging into it, an overwriting one replaces it.
MLFLOW_RUN = "mlflow_run.json"
RESULT_FILES = (
    METRICS,
    CHECKPOINT,
    PRETRAIN_CHECKPOINT,
    "samples.png",
    "reconstructions.png",
    "curves.png",
    "completions.png",
)
#: The image formats :func:`sample_checkpoint` writes, by file suffix (no suffix: PNG).
IMAGE_FORMATS = {"": "png", ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}

logger = logging.getLogger(__name__)


class OutputBusyError(ConfigError):
    """Another process is training into the same output folder (see :func:`lock_output`)."""


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically (temporary file + ``os.replace``)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_data(config: TrainConfig, data_dir: Optional[str] = None, download: bool = False) -> Dataset:
    """The data set ``config`` names, on ``config.device``, cut to ``num_train``/``num_test``."""
    config = config.resolved()
    dataset = load_dataset(
        config.dataset,
        data_dir=data_dir,
        download=download,
        binarize=config.binarize,
        seed=config.seed,
        device=config.device,
    )
    if config.dataset == "mnist" and config.likelihood == "gaussian":
        dataset = dataclasses.replace(dataset, likelihood="gaussian")  # continuous MNIST in [0, 1]
    for name, part, points in (("num_train", "training", dataset.train), ("num_test", "test", dataset.test)):
        size, wanted = points.shape[0], getattr(config, name)
        if wanted is not None and wanted > size:
            raise ConfigError(
                f"{name}={wanted} is more than the {size} {part} points of the {dataset.name} data set; "
                f"ask for at most {size}, or leave `{name}` unset for all of them",
                name,
            )
    if config.num_train is not None or config.num_test is not None:
        dataset = Dataset(
            name=dataset.name,
            train=dataset.train[: config.num_train],
            test=dataset.test[: config.num_test],
            likelihood=dataset.likelihood,
            binarize=dataset.binarize,
            train_labels=None if dataset.train_labels is None else dataset.train_labels[: config.num_train],
            test_labels=None if dataset.test_labels is None else dataset.test_labels[: config.num_test],
            image_shape=dataset.image_shape,
            truth=dataset.truth,
        )
    prepare = model_spec(config.model).prepare_data
    return dataset if prepare is None else prepare(config, dataset)


def _can_write_in(folder: pathlib.Path) -> bool:
    """Whether this process can create files in ``folder`` (tried, since permission bits do not bind
    root and a read-only file system binds everyone)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".pyrovae-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def check_can_create(path: pathlib.Path, param: str = "out") -> None:
    """Refuse, before any work, a ``path`` whose folder cannot exist or cannot be written: its nearest
    existing ancestor must be a folder this process can write in.

    :raises ConfigError: naming ``param``.
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise ConfigError(
            f"{existing} is a file, not a folder, so {param}={str(path)!r} cannot be created under it; "
            f"choose another `{param}`",
            param,
        )
    folder = existing if existing.is_dir() else existing.parent
    if not _can_write_in(folder):
        raise ConfigError(
            f"cannot write into {folder} (it is read-only or not ours), so {param}={str(path)!r} cannot be "
            f"written; choose another `{param}`",
            param,
        )


def check_output_file(out: str | os.PathLike, param: str = "out") -> pathlib.Path:
    """Refuse, before any work, an output file that is a folder or cannot be written."""
    out = pathlib.Path(out)
    if out.is_dir():
        raise ConfigError(
            f"{param}={str(out)!r} is a folder; name a file to write (e.g. {param}={str(out / 'file')!r})",
            param,
        )
    check_can_create(out, param)
    return out


def _output_folder(out: str | os.PathLike) -> pathlib.Path:
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={str(out)!r} is a file, not a folder; choose another `out`", "out")
    check_can_create(out)
    return out


def prepare_output(out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> pathlib.Path:
    """Make ``out`` ready for a training run without ever silently replacing earlier results.

    A missing or empty folder is fine. A folder that holds anything is refused, unless
    ``resume`` (and it holds a checkpoint to continue) or ``overwrite`` (then the files
    :data:`RESULT_FILES` of the earlier run and its TensorBoard logs in the folder are deleted
    first, other files are left alone; an MLflow run recorded in :data:`MLFLOW_RUN` is replaced
    by the new run's logger).
    """
    if resume and overwrite:
        raise ConfigError(
            "resume=True continues the run in `out` and overwrite=True replaces it; pass only one of them",
            "resume",
            "overwrite",
        )
    out = _output_folder(out)
    present = sorted(path.name for path in out.iterdir()) if out.is_dir() else []
    if present:
        if overwrite:
            removed = [name for name in RESULT_FILES if (out / name).is_file()]
            for name in removed:
                (out / name).unlink()
            # The earlier run's TensorBoard logs (the new run starts its curves afresh). MLflow's
            # store stays: the logger marks the earlier run deleted when it makes the new one.
            tensorboard = out / TRACKING_DIRS["tensorboard"]
            if tensorboard.is_dir():
                shutil.rmtree(tensorboard)
                removed.append(f"{tensorboard.name}/")
            remove_stale_temporaries(out / CHECKPOINT)
            if removed:
                logger.info("overwrite: removed %s from %s", ", ".join(removed), out)
        elif not (resume and any((out / name).is_file() for name in (CHECKPOINT, PRETRAIN_CHECKPOINT))):
            listed = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
            fix = (
                "resume=True needs a checkpoint.pt there; pass overwrite=True to start again in it"
                if resume
                else "pass resume=True to continue that run, overwrite=True to replace its results"
            )
            raise ConfigError(
                f"the output folder {out} already holds {listed}; {fix}, or choose another `out`",
                "out",
                "resume",
                "overwrite",
            )
    out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def lock_output(out: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Hold an exclusive lock on the folder ``out`` (created if missing) while the block runs.

    Two processes training into one folder would overwrite each other's checkpoint, each
    believing it continues the run. The lock is ``flock`` on the folder itself, so no file is
    left behind and the operating system releases it when the process dies, however it dies.

    :raises OutputBusyError: (a ``ValueError``) when another process holds the lock.
    """
    out = _output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield out
        return
    fd = os.open(out, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusyError(
                f"another process is training into {out} (it holds the folder's lock); wait for it to "
                "finish or stop it, or choose another `out`",
                "out",
            ) from None
        except OSError as error:  # a file system without flock (some network mounts)
            logger.warning("could not lock %s (%s); make sure no other run writes into it", out, error)
        yield out
    finally:
        os.close(fd)  # releases the lock


def check_device(device: str) -> None:
    """Fail early, with the fix, for a device pyrovae does not run on or a CUDA device that is not here."""
    check_device_name(device)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was requested but CUDA is not available here; use device='cpu'", "device")


def test_guide(config: TrainConfig, model: Any, guide: Any, x_test: torch.Tensor) -> Any:
    """The guide to evaluate the test set with: the trained guide if it generalises to new points,
    else a guide of the same family fitted to the test points with the model fixed (the guide
    family's spec says which and how, :attr:`pyrovae.app.registry.GuideSpec.fit_test`)."""
    spec = guide_spec(config.guide)
    if spec.amortized:
        return guide
    assert spec.fit_test is not None  # GuideSpec requires it of a non-amortized family
    return spec.fit_test(config, model, x_test)


def evaluate_run(
    config: TrainConfig, dataset: Dataset, model: Any, guide: Any, progress: bool = False
) -> tuple[dict[str, Any], Any]:
    """Test-set metrics of a trained pair (nats per data point), and the guide used for them."""
    config = config.resolved()
    x_test = evaluation_data(dataset, "test", config.seed)
    start = time.perf_counter()
    spec = model_spec(config.model)
    labelled: dict[str, Any] = {}
    if spec.label_metrics is not None and dataset.test_labels is not None:
        labelled = spec.label_metrics(config, model, guide, x_test, dataset.test_labels)
    if spec.evaluate is not None:  # e.g. the VQ-VAE's point-mass guide: importance sampling would repeat one draw
        return {**spec.evaluate(model, guide, x_test), **labelled, "eval_seconds": time.perf_counter() - start}, guide
    guide_test = test_guide(config, model, guide, x_test)
    result = evaluate_dataset(
        model,
        guide_test,
        x_test,
        num_samples=config.eval_samples,
        chunk_size=min(config.eval_chunk, config.eval_samples),
        batch_size=config.eval_batch,
        progress=progress,
        fast_path=config.fast_path,
    )
    summary = result.summary()
    metrics: dict[str, Any] = {
        "test_elbo": summary["elbo"],
        "test_elbo_se": summary["elbo_se"],
        "test_log_likelihood": summary["log_likelihood"],
        "test_log_likelihood_se": summary["log_likelihood_se"],
        "test_nll": summary["nll"],
        "test_gap": summary["gap"],
        "test_ess": summary["ess"],
        "kl": summary["kl"],
        "active_units": sum(result.active_units.values()),
        "active_units_by_site": summary["active_units"],
        "eval_samples": config.eval_samples,
        "num_test": int(x_test.shape[0]),
        "test_guide": "amortized"
        if guide_test is guide
        else f"{config.guide}, {config.test_time_steps} Adam steps on the test set",
    }
    if isinstance(model, ExactLikelihood):
        with torch.no_grad():
            metrics["test_log_likelihood_exact"] = model.log_marginal(x_test).mean().item()
    if spec.metrics is not None:
        metrics.update(spec.metrics(config, model, guide_test, x_test, result))
    metrics.update(labelled)
    metrics["eval_seconds"] = time.perf_counter() - start
    return metrics, guide_test


def save_figures(
    out: pathlib.Path, dataset: Dataset, model: Any, guide: Any, history: Optional[dict[str, Any]] = None, seed: int = 0
) -> None:
    """``samples.png``, ``reconstructions.png`` and (with a history) ``curves.png``."""
    x_test = evaluation_data(dataset, "test", seed)
    n = min(50, x_test.shape[0])
    index = torch.arange(n, device=x_test.device)
    with torch.no_grad():
        _, x_mean, _ = model.sample(100, device=x_test.device)
        if isinstance(model, Reconstructs):  # VQ models: decode the guide's codes
            reconstruction = model.reconstruct(guide, x_test[:n])
        else:
            z_mean = posterior_means(guide, x_test[:n], index, x_test.shape[0])["z"]
            reconstruction = model.decode(z_mean)
    if dataset.image_shape is not None:
        plots.save_image_grid(x_mean.cpu(), out / "samples.png", dataset.image_shape)
        plots.save_reconstructions(
            x_test[:n].cpu(), reconstruction.cpu(), out / "reconstructions.png", dataset.image_shape
        )
    else:
        _, _, x_sample = model.sample(1000, device=x_test.device)
        plots.plot_2d_samples(x_test.cpu(), x_sample.cpu(), out / "samples.png", title="test data and model samples")
        plots.plot_2d_samples(
            x_test[:n].cpu(), reconstruction.cpu(), out / "reconstructions.png", title="test points and reconstructions"
        )
    if history is not None:
        plots.plot_curves(history, out / "curves.png", title=f"{dataset.name}")


#: The default folder of each tracker inside the run folder.
TRACKING_DIRS = {"tensorboard": "tb", "mlflow": "mlruns"}


def make_trackers(
    tracking: Optional[TrackingConfig], out: str | os.PathLike, config: TrainConfig, resume: bool = False
) -> list[TrackingLogger]:
    """The tracking hooks ``tracking`` asks for (none for ``log='none'``), logging ``config`` resolved,
    into ``tracking.log_dir`` or the run folder's :data:`TRACKING_DIRS` entry; with ``resume``, an
    MLflow logger continues the run recorded in ``out`` (:data:`MLFLOW_RUN`).

    :raises ConfigError: naming ``log`` when the tracker's package is not installed.
    """
    if tracking is None or tracking.log == "none":
        return []
    log_dir = tracking.log_dir or pathlib.Path(out) / TRACKING_DIRS[tracking.log]
    options: dict[str, Any] = {"log_every": tracking.log_every, "config": config.resolved().to_dict()}
    if tracking.log == "mlflow":
        options["run_name"] = pathlib.Path(out).name or None
        options["run_file"] = pathlib.Path(out) / MLFLOW_RUN  # continued by a resumed run
        options["resume"] = resume
    try:
        return [make_logger(tracking.log, log_dir, tracking.tracking_uri, **options)]
    except MissingExtraError as error:
        raise ConfigError(
            f"log={tracking.log!r} needs the {error.extra} package, which is not installed: "
            f'pip install "pyrovae[{error.extra}]"',
            "log",
        ) from None


def train_and_evaluate(
    config: TrainConfig,
    out: str | os.PathLike,
    *,
    data_dir: Optional[str] = None,
    download: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    tracking: Optional[TrackingConfig] = None,
) -> Optional[dict[str, Any]]:
    """The main job: train per ``config``, evaluate on the test set, write into ``out``:
    ``metrics.json``, ``checkpoint.pt``, ``samples.png``, ``reconstructions.png``, ``curves.png``.

    ``out`` must be empty or new, unless ``resume`` (continue the checkpoint there) or
    ``overwrite`` (replace the earlier results), see :func:`prepare_output`. The run holds
    ``out``'s lock (:func:`lock_output`) from start to end, so a second run into the same folder
    fails with :class:`OutputBusyError` instead of overwriting this one's checkpoint.

    Under torchrun (``RANK``/``WORLD_SIZE`` set) this joins the process group and trains data
    parallel (:mod:`pyrovae.runtime.distributed`); rank 0 then evaluates and writes every file, and the
    other ranks return ``None`` once training is done.

    ``tracking`` logs the run to TensorBoard or MLflow as it trains (:func:`make_trackers`), and the
    test metrics of ``metrics.json`` after it (as ``final/...``).

    :return: the metrics written to ``metrics.json`` (``None`` on ranks other than 0).
    """
    config = config.resolved()  # a TrainConfig is checked when made: before anything is written to `out`
    check_device(config.device)
    trackers = make_trackers(tracking, out, config, resume)  # a missing package is refused before any work
    world, device = distributed.init_process_group(config.device)
    with contextlib.ExitStack() as held:
        for tracker in trackers:  # an error or interruption ends the tracked run as FAILED / KILLED
            held.enter_context(tracker)

        def claim() -> pathlib.Path:  # on rank 0: lock the folder for the whole run, then check it
            held.enter_context(lock_output(out))
            return prepare_output(out, resume=resume, overwrite=overwrite)

        local = config.replace(device=device)
        if download and world.is_distributed:
            # One download per machine: local rank 0 fetches, the others then read what it wrote.
            if world.local_rank == 0:
                load_data(local, data_dir, download)
            distributed.barrier(world)
        # The data first: a data set that does not suit the config (too few points, not found) is
        # refused before `out` is created or touched.
        dataset = load_data(local, data_dir, download and not world.is_distributed)
        out = distributed.run_on_main(claim, world)
        pyro.clear_param_store()
        pyro.set_rng_seed(config.seed)
        model, guide = build(local, dataset)
        family = model_spec(config.model)
        if family.pretrain is not None and not (resume and (out / CHECKPOINT).is_file()):
            # a resumed main run holds the pretrained part in its checkpoint
            family.pretrain(
                local, dataset, model, checkpoint_path=out / PRETRAIN_CHECKPOINT, resume=resume, progress=progress
            )
        objective = make_objective(config.objective, num_particles=config.num_particles, **objective_options(config))
        history = fit(
            model,
            guide,
            dataset,
            objective,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            lr_decay=config.lr_decay,
            seed=config.seed,
            checkpoint_path=out / CHECKPOINT,
            resume=resume,
            config=config.to_dict(),
            progress=progress,
            clip_norm=config.clip_norm,
            fast_path=config.fast_path,
            local_steps=config.local_steps,
            local_lr=config.local_lr,
            hooks=trackers,
        )
        # Summed over epochs, so a run resumed across sessions counts every part (wall-clock of this
        # call alone would count the last part only).
        train_seconds = float(sum(history.seconds))
        if not world.is_main:
            return None
        metrics, guide_test = evaluate_run(local, dataset, model, guide, progress=progress)
        metrics = {
            "train_elbo": history.train_bound,
            "test_bound_per_epoch": history.test_bound,
            "bound_name": history.bound_name,
            "epochs": len(history.epoch),
            **metrics,
            "seconds": train_seconds + metrics["eval_seconds"],
            "train_seconds": train_seconds,
            "seconds_per_epoch": history.seconds,
            "device": config.device,
            "world_size": world.world_size,
            "torch_threads": torch.get_num_threads(),
            "config": config.to_dict(),
        }
        if family.figures is not None:
            family.figures(out, dataset, model, guide_test, config.seed)
            plots.plot_curves(history.to_dict(), out / "curves.png", title=f"{dataset.name}")
        else:
            save_figures(out, dataset, model, guide_test, history.to_dict(), config.seed)
        write_json(out / METRICS, metrics)
        for tracker in trackers:
            tracker.log_metrics(metrics)
            tracker.close()
        return metrics


def load_run_checkpoint(
    checkpoint: str | os.PathLike, device: Optional[str] = None
) -> tuple[TrainConfig, dict[str, Any]]:
    """Read a checkpoint written by ``pyrovae train`` (safely: ``weights_only``) and its config.

    :raises ValueError: for a file that is not such a checkpoint (truncated, corrupt, foreign, or a
        pyrovae checkpoint of something else), naming what is wrong.
    """
    if device is not None:
        check_device(device)  # before the file is read: a missing CUDA is not the file's fault
    state = load_checkpoint(checkpoint, map_location=device or "cpu")
    missing = sorted({"config", "modules", "params", "epoch", "dataset"} - set(state))
    if missing or not isinstance(state.get("config"), dict):
        raise ConfigError(
            f"{checkpoint} is a pyrovae checkpoint but not one written by `pyrovae train` (it lacks "
            f"{missing or ['a config']}); point `checkpoint` at OUT/checkpoint.pt of a training run",
            "checkpoint",
        )
    try:
        config = TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"the config saved in {checkpoint} is not valid for this pyrovae ({error}); it was written "
            "by another version or edited"
        ) from None
    if device is not None:
        config = config.replace(device=device)
    check_device(config.device)
    return config, state


class Run(NamedTuple):
    """A training run reloaded by :func:`load_run`: its config, data, trained model and guide (their
    params in Pyro's param store) and the checkpoint's other entries (epoch, history, ...)."""

    config: TrainConfig
    dataset: Dataset
    model: Any
    guide: Any
    state: dict[str, Any]


def _load_run_params(
    state: dict[str, Any], checkpoint: Any, device: Any, model: Any, guide: Any, args: tuple, exact: bool = True
) -> None:
    """Put the checkpoint's param store into Pyro's and bind it into the pair's networks (a dry run
    through :func:`pyrovae.params.inspect`), refusing a file that lacks a param the pair reads or
    (``exact``) holds one it does not: the config and the weights would not describe the same run."""
    entry = params.param_entry(state)
    try:
        params.load_state(entry, device=device)
        sites = params.inspect(model, guide, args)
    except ValueError as error:
        raise ValueError(
            f"{checkpoint}: its params do not fit the model and guide its config describes: {error}"
        ) from None
    missing = sorted(set(sites.names) - set(entry["params"]))
    extra = sorted(set(entry["params"]) - set(sites.names)) if exact else []
    if missing or extra:
        raise ValueError(
            f"{checkpoint} does not hold the params its config's model and guide use (missing "
            f"{missing[:5]}, unused {extra[:5]}); the file was altered or written by another version"
        )


def load_run(
    path: str | os.PathLike, *, data_dir: Optional[str] = None, download: bool = False, device: Optional[str] = None
) -> Run:
    """Reload a run of ``pyrovae train`` (its output folder or its ``checkpoint.pt``) in a fresh
    process: the data set, and the model and guide with the trained params in Pyro's param store,
    ready for :func:`pyrovae.log_likelihood`, :func:`pyrovae.evaluate_dataset`, ``model.sample``,
    ``pyro.infer.Predictive`` or more training.

    The param store is cleared first. ``device`` moves the run (e.g. a GPU run to ``"cpu"``).

    :raises FileNotFoundError: when there is no checkpoint at ``path``.
    :raises ValueError: for a file that is not a ``pyrovae train`` checkpoint, or whose params do not
        fit the model and guide its config describes.
    """
    path = pathlib.Path(path)
    checkpoint = path / CHECKPOINT if path.is_dir() else path
    config, state = load_run_checkpoint(checkpoint, device)
    dataset = load_data(config, data_dir, download)
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    model, guide = build(config, dataset)
    size = min(2, len(dataset.train))
    index = torch.arange(size, device=dataset.train.device)
    x = evaluation_data(dataset, "train", config.seed)[:size]
    _load_run_params(state, checkpoint, config.device, model, guide, (x, index, len(dataset.train)))
    return Run(config, dataset, model, guide, state)


def restore(
    checkpoint: str | os.PathLike, data_dir: Optional[str] = None, download: bool = False, device: Optional[str] = None
) -> Run:
    """:func:`load_run` with positional arguments (what the experiment scripts call)."""
    return load_run(checkpoint, data_dir=data_dir, download=download, device=device)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    *,
    eval_samples: Optional[int] = None,
    data_dir: Optional[str] = None,
    download: bool = False,
    device: Optional[str] = None,
    progress: bool = True,
    out: Optional[str | os.PathLike] = None,
) -> dict[str, Any]:
    """Test-set metrics of a saved run (``pyrovae evaluate``), also written to the JSON file ``out``
    if given (checked before the evaluation runs, so a bad ``out`` costs nothing)."""
    if out is not None:
        check_output_file(out)
    if eval_samples is not None:
        TrainConfig(eval_samples=eval_samples)  # its check, before the work
    config, dataset, model, guide, state = restore(checkpoint, data_dir, download, device)
    if eval_samples is not None:
        config = config.replace(eval_samples=eval_samples)
    metrics, _ = evaluate_run(config, dataset, model, guide, progress=progress)
    metrics = {"checkpoint": str(checkpoint), "epoch": state["epoch"], **metrics}
    if out is not None:
        write_json(out, metrics)
    return metrics


def _no_latents(*args: Any, **kwargs: Any) -> None:
    """A guide with no sites: the model's dry run draws its latents from the prior."""


def sample_checkpoint(
    checkpoint: str | os.PathLike, num: int, out: str | os.PathLike, *, device: Optional[str] = None, seed: int = 0
) -> torch.Tensor:
    """Draw ``num`` samples from a saved model (no data needed) and write them as an image grid,
    or as a scatter of the first two coordinates for non-image data (``pyrovae sample``), as PNG or
    JPEG by the suffix of ``out`` (:data:`IMAGE_FORMATS`).

    :return: the means of p(x|z) of the samples, ``(num, x_dim)``.
    """
    if num < 1:
        raise ConfigError(f"num={num} samples: ask for at least 1", "num")
    out = check_output_file(out)
    image_format = IMAGE_FORMATS.get(out.suffix.lower())
    if image_format is None:
        raise ConfigError(
            f"out={str(out)!r}: cannot write {out.suffix} images; name a "
            f"{', '.join(s for s in IMAGE_FORMATS if s)} file",
            "out",
        )
    config, state = load_run_checkpoint(checkpoint, device)
    config = config.resolved()
    if model_spec(config.model).conditional:
        raise ConfigError(
            f"model={config.model!r} models the unobserved part of each image given the observed part, so it has "
            "no unconditional samples: see completions.png in the run's folder, or draw completions with "
            "pyrovae.load_run(...).model.complete(x)",
            "checkpoint",
        )
    info = state["dataset"]
    image_shape = tuple(info["image_shape"]) if info["image_shape"] else None
    stub = Dataset(
        name=info["name"],
        train=torch.zeros(1, info["x_dim"], device=config.device),
        test=torch.zeros(1, info["x_dim"], device=config.device),
        likelihood=info["likelihood"],
        image_shape=image_shape,
    )
    pyro.clear_param_store()
    model = build_model(config, stub)
    _load_run_params(state, checkpoint, config.device, model, _no_latents, (None, torch.arange(1), 1), exact=False)
    pyro.set_rng_seed(seed)
    _, x_mean, x_sample = model.sample(num, device=config.device)
    if image_shape is not None:
        plots.save_image_grid(x_mean.cpu(), out, image_shape, image_format=image_format)
    else:
        plots.plot_2d_samples(x_sample.cpu(), x_sample.cpu(), out, title="model samples", image_format=image_format)
    return x_mean
