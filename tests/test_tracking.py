"""Experiment tracking (pyrovae.train.tracking): what TensorBoard and MLflow hold after a real run,
read back with their own readers and compared with metrics.json and the history; the optional
packages imported only when asked for, and a clear error when missing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pyro
import pytest
import torch

from pyrovae import VAE, AmortizedGuide, Decoder, GaussianEncoder, fit, make_objective
from pyrovae.app.cli import main
from pyrovae.infer.loop import Hook

GMM = ["train", "--dataset", "gmm", "--epochs", "2", "--batch-size", "500", "--eval-samples", "10",
       "--no-progress", "--log-every", "1"]
MNIST = ["train", "--dataset", "mnist", "--num-train", "300", "--num-test", "100", "--z-dim", "4",
         "--hidden-sizes", "32", "--epochs", "2", "--batch-size", "100", "--eval-samples", "10",
         "--no-progress", "--log-every", "1"]
EPOCH_TAGS = {"epoch/train_bound", "epoch/test_bound", "epoch/kl", "epoch/active_units", "epoch/lr",
              "epoch/grad_norm", "epoch/seconds"}


def _check_against_metrics(series, metrics, steps_per_epoch=None):
    """``series``: tag -> [(step, value)] as the tracker holds it."""
    assert EPOCH_TAGS <= set(series), sorted(series)
    epochs = len(metrics["train_elbo"])
    steps_per_epoch = steps_per_epoch or len(series["step/loss"]) // epochs
    assert [s for s, _ in series["epoch/train_bound"]] == list(range(1, epochs + 1))
    assert [v for _, v in series["epoch/train_bound"]] == pytest.approx(metrics["train_elbo"], rel=1e-6)
    assert [v for _, v in series["epoch/test_bound"]] == pytest.approx(metrics["test_bound_per_epoch"], rel=1e-6)
    assert [v for _, v in series["epoch/seconds"]] == pytest.approx(metrics["seconds_per_epoch"], rel=1e-6)
    lr, decay = metrics["config"]["lr"], metrics["config"]["lr_decay"]
    assert [v for _, v in series["epoch/lr"]] == pytest.approx([lr * decay**e for e in range(epochs)])
    assert all(v >= 0 for _, v in series["epoch/kl"]) and all(v > 0 for _, v in series["epoch/grad_norm"])
    # every step, in order, across epochs; each epoch's losses average to minus its training bound
    loss = series["step/loss"]
    assert [s for s, _ in loss] == list(range(1, epochs * steps_per_epoch + 1))
    for epoch in range(epochs):
        chunk = [v for _, v in loss[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]]
        assert -sum(chunk) / len(chunk) == pytest.approx(metrics["train_elbo"][epoch], rel=1e-6)
    assert len(series["step/grad_norm"]) == len(loss)
    for name in ("test_elbo", "test_log_likelihood", "test_nll", "kl", "active_units"):
        assert series[f"final/{name}"][-1][1] == pytest.approx(metrics[name], rel=1e-6), name


def _tensorboard_series(folder):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    series = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags["scalars"]}
    return acc, tags, series


def _mlflow_series(store):
    tracking = pytest.importorskip("mlflow.tracking")
    client = tracking.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("pyrovae")
    (run,) = client.search_runs([experiment.experiment_id])
    series = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
              for key in run.data.metrics}
    return client, run, series


def test_tensorboard_holds_the_run_as_metrics_json_says(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main([*GMM, "--out", str(out), "--log", "tensorboard"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    acc, tags, series = _tensorboard_series(out / "tb")
    _check_against_metrics(series, metrics)
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| z_dim | 2 |" in config and "| objective | elbo |" in config  # the resolved config
    assert not tags["images"]  # gmm points are not images


def test_tensorboard_images_of_an_image_data_set(tmp_path, mnist_root):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main([*MNIST, "--data-dir", str(mnist_root), "--out", str(out), "--log", "tensorboard"]) == 0
    acc, tags, series = _tensorboard_series(out / "tb")
    _check_against_metrics(series, json.loads((out / "metrics.json").read_text()), steps_per_epoch=3)
    assert {"images/samples", "images/reconstructions"} <= set(tags["images"])
    samples = acc.Images("images/samples")
    assert [image.step for image in samples] == [1, 2]
    assert (samples[0].width, samples[0].height) == (8 * 30 + 2, 8 * 30 + 2)  # 64 images of 28 + 2 padding


def test_mlflow_holds_the_run_as_metrics_json_says(tmp_path, mnist_root):
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    assert main([*MNIST, "--data-dir", str(mnist_root), "--out", str(out), "--log", "mlflow"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    client, run, series = _mlflow_series(f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")
    _check_against_metrics(series, metrics, steps_per_epoch=3)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["z_dim"] == "4" and run.data.params["hidden_sizes"] == "[32]"
    assert run.data.params["objective"] == "elbo"
    images = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
    assert any("samples" in p for p in images) and any("reconstructions" in p for p in images)


def test_mlflow_tracking_uri_is_used(tmp_path):
    pytest.importorskip("mlflow")
    out, store = tmp_path / "run", f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert main([*GMM, "--out", str(out), "--log", "mlflow", "--tracking-uri", store]) == 0
    assert not (out / "mlruns" / "mlflow.db").exists()
    assert (out / "mlruns" / "artifacts").is_dir()  # not MLflow's ./mlruns in the working directory
    _, _, series = _mlflow_series(store)
    _check_against_metrics(series, json.loads((out / "metrics.json").read_text()))


class _Losses(Hook):
    def __init__(self):
        self.losses = []

    def on_step_end(self, trainer, state, result):
        self.losses.append(result.loss / trainer.num_data)


def _small_fit(hooks, epochs=2):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = torch.rand(200, 6)
    model = VAE(Decoder(z_dim=2, x_dim=6, hidden_sizes=[8]), z_dim=2, likelihood="bernoulli")
    guide = AmortizedGuide(GaussianEncoder(x_dim=6, z_dim=2, hidden_sizes=[8]))
    return fit(model, guide, (x, x[:50]), make_objective("elbo"), epochs=epochs, batch_size=50, lr=1e-2,
               progress=False, hooks=hooks)


def test_a_logger_in_python_logs_the_steps_and_changes_nothing(tmp_path):
    pytest.importorskip("tensorboard")
    from pyrovae.train.tracking import TensorBoardLogger

    plain = _small_fit([])
    losses = _Losses()
    with TensorBoardLogger(tmp_path / "tb", log_every=2) as tb:
        logged = _small_fit([losses, tb])
    # the logger's evaluations draw from forked generators: the training is the same bit for bit
    assert logged.train_bound == plain.train_bound and logged.test_bound == plain.test_bound
    _, _, series = _tensorboard_series(tmp_path / "tb")
    assert [s for s, _ in series["step/loss"]] == [2, 4, 6, 8]
    assert [v for _, v in series["step/loss"]] == pytest.approx(losses.losses[1::2], rel=1e-6)
    assert [v for _, v in series["epoch/train_bound"]] == pytest.approx(logged.train_bound, rel=1e-6)


def test_logger_arguments_are_checked():
    pytest.importorskip("tensorboard")
    from pyrovae.train.tracking import TensorBoardLogger

    with pytest.raises(ValueError, match="log_every must be an integer >= 1"):
        TensorBoardLogger("x", log_every=0)


def _python(code, tmp_path):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=tmp_path)


def test_tracking_packages_are_imported_only_when_asked_for(tmp_path):
    result = _python(f"""
        import sys
        import pyrovae
        from pyrovae.app.cli import main
        assert main(["train", "--dataset", "gmm", "--epochs", "1", "--batch-size", "500", "--eval-samples", "5",
                     "--no-progress", "--out", {str(tmp_path / 'run')!r}]) == 0
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorboard", "mlflow")
                        or m.startswith("torch.utils.tensorboard"))
        assert not loaded, loaded
        print("clean")
    """, tmp_path)
    assert result.returncode == 0 and "clean" in result.stdout, result.stderr


@pytest.mark.parametrize("backend, blocked", [("tensorboard", "tensorboard"), ("mlflow", "mlflow")])
def test_a_missing_package_is_one_clear_error(tmp_path, backend, blocked):
    blocker = f"import sys; sys.modules[{blocked!r}] = None\n"
    out = tmp_path / "run"
    cli = _python(blocker + f"""
from pyrovae.app.cli import main
main(["train", "--dataset", "gmm", "--epochs", "1", "--out", {str(out)!r}, "--log", {backend!r}])
""", tmp_path)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr
    assert f'--log {backend} needs the {backend} package' in cli.stderr
    assert f'pip install "pyrovae[{backend}]"' in cli.stderr
    assert not out.exists()  # refused before any work
    cls = {"tensorboard": "TensorBoardLogger", "mlflow": "MLflowLogger"}[backend]
    python = _python(blocker + f"""
from pyrovae.train.tracking import {cls}, MissingExtraError
try:
    {cls}()
except MissingExtraError as error:
    assert isinstance(error, ImportError)
    print(error)
""", tmp_path)
    assert f"{cls} (log={backend!r}) needs the {backend} package" in python.stdout, python.stderr
    assert f'pip install "pyrovae[{backend}]"' in python.stdout


@pytest.mark.parametrize("args, message", [
    (["--tracking-uri", "sqlite:///x.db"], "--tracking-uri sqlite:///x.db is MLflow's; set --log mlflow"),
    (["--log", "tensorboard", "--tracking-uri", "x"], "set --log mlflow"),
    (["--log-dir", "x"], "--log-dir x needs a tracker"),
    (["--log", "wandb"], "invalid choice"),
    (["--log", "tensorboard", "--log-every", "0"], "log_every must be an integer >= 1"),
])
def test_bad_tracking_flags_are_clear_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--dataset", "gmm", "--out", str(tmp_path / "o"), *args])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def _one_epoch_then_resume(out, backend):
    """The GMM run for one epoch, then resumed to its two; returns the finished run's metrics."""
    one = [a if a != "2" or i != GMM.index("--epochs") + 1 else "1" for i, a in enumerate(GMM)]
    assert main([*one, "--out", str(out), "--log", backend]) == 0
    assert main([*GMM, "--out", str(out), "--log", backend, "--resume"]) == 0
    return json.loads((out / "metrics.json").read_text())


def test_a_resumed_run_continues_the_curves(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    metrics = _one_epoch_then_resume(out, "tensorboard")
    _, _, series = _tensorboard_series(out / "tb")
    # both sessions' event files: epochs 1 and 2 once each, the steps numbered across the sessions
    _check_against_metrics(series, metrics)


def test_a_run_that_fails_after_training_is_marked_failed_in_mlflow(tmp_path, monkeypatch):
    # The trackers are held by the run: an error after they opened (here in the evaluation) ends
    # the MLflow run as FAILED, not FINISHED or left RUNNING.
    pytest.importorskip("mlflow")
    from pyrovae.app import run as run_module
    from pyrovae.app.cli import build_parser, config_from_args, tracking_from_args

    args = build_parser().parse_args([*GMM, "--out", str(tmp_path / "run"), "--log", "mlflow"])

    def broken_evaluation(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(run_module, "evaluate_run", broken_evaluation)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        run_module.train_and_evaluate(config_from_args(args), args.out, progress=False,
                                      tracking=tracking_from_args(args))
    _, run, _ = _mlflow_series(f"sqlite:///{tmp_path / 'run' / 'mlruns' / 'mlflow.db'}")
    assert run.info.status == "FAILED"


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    # --resume goes on logging into the same MLflow run (one run, its curves across both sessions).
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    metrics = _one_epoch_then_resume(out, "mlflow")
    _, run, series = _mlflow_series(f"sqlite:///{out / 'mlruns' / 'mlflow.db'}")  # exactly one run
    _check_against_metrics(series, metrics)
    assert run.info.status == "FINISHED"


@pytest.mark.parametrize("backend,folder", [("tensorboard", "tb"), ("mlflow", "mlruns")])
def test_overwrite_replaces_the_tracking_logs_in_the_run_folder(tmp_path, backend, folder):
    # --overwrite starts the run again, so its tracker starts again too: only the new run's curves.
    pytest.importorskip(backend)
    out = tmp_path / "run"
    assert main([*GMM, "--out", str(out), "--log", backend]) == 0
    (out / "notes.txt").write_text("mine")
    assert main([*GMM, "--out", str(out), "--log", backend, "--overwrite", "--seed", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    if backend == "tensorboard":
        _, _, series = _tensorboard_series(out / folder)
    else:
        _, _, series = _mlflow_series(f"sqlite:///{out / folder / 'mlflow.db'}")
    _check_against_metrics(series, metrics)
    assert (out / "notes.txt").read_text() == "mine"  # what is not the run's own stays
