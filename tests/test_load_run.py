"""``pyrovae.load_run``: a run of ``pyrovae train`` reloads in a fresh process with its trained params
(read from the checkpoint's param store, not from attribute names), and a checkpoint whose params do
not fit its config is refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from pyrovae.app.cli import main
from pyrovae.runtime.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("runs") / "linear"
    assert main(["train", "--dataset", "linear", "--epochs", "3", "--batch-size", "100", "--lr", "0.02",
                 "--eval-samples", "20", "--out", str(out), "--no-progress"]) == 0
    return out


def test_a_run_reloads_in_a_fresh_process_with_its_trained_params(linear_run) -> None:  # type: ignore[no-untyped-def]
    metrics = json.loads((linear_run / "metrics.json").read_text())
    script = textwrap.dedent(f"""
        import json, pyro, torch, pyrovae
        run = pyrovae.load_run({str(linear_run)!r})
        exact = run.model.log_marginal(run.dataset.test).mean().item()
        store = pyro.get_param_store()
        saved = run.state["params"]["params"]
        same = all(torch.equal(store._params[name].detach(), value) for name, value in saved.items())
        elbo = pyrovae.evaluate_dataset(run.model, run.guide, run.dataset.test, num_samples=1)
        _, x_mean, _ = run.model.sample(3)
        print(json.dumps({{"exact": exact, "same": same, "names": sorted(saved), "epoch": run.state["epoch"],
                           "sample_shape": list(x_mean.shape), "elbo_finite": bool(torch.isfinite(
                               elbo.elbo).all())}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    # The exact log p(x) of the test set depends on the decoder's trained W, b only: equal to what
    # the run wrote means the weights that were trained are the ones reloaded.
    assert reloaded["exact"] == pytest.approx(metrics["test_log_likelihood_exact"], rel=0, abs=1e-4)
    assert reloaded["same"] and reloaded["epoch"] == 3
    assert any(name.startswith("decoder") for name in reloaded["names"])
    assert any(name.startswith("encoder") for name in reloaded["names"])
    assert reloaded["sample_shape"][0] == 3
    assert reloaded["elbo_finite"]


def test_the_checkpoint_file_or_its_folder_both_load(linear_run) -> None:  # type: ignore[no-untyped-def]
    from pyrovae import load_run

    a = load_run(linear_run)
    weight_a = a.model.decoder.weight.detach().clone()
    b = load_run(linear_run / "checkpoint.pt")
    assert torch.equal(weight_a, b.model.decoder.weight.detach())
    assert b.config == a.config


def test_a_checkpoint_that_does_not_fit_its_config_is_refused(linear_run, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pyrovae import load_run

    state = load_checkpoint(linear_run / "checkpoint.pt")
    for key in ("format", "version", "checksum"):
        state.pop(key, None)
    state["config"] = {**state["config"], "z_dim": state["config"]["z_dim"] + 1}
    save_checkpoint(tmp_path / "edited.pt", state)
    with pytest.raises(ValueError, match="another architecture|does not hold the params"):
        load_run(tmp_path / "edited.pt")

    state = load_checkpoint(linear_run / "checkpoint.pt")
    for key in ("format", "version", "checksum"):
        state.pop(key, None)
    dropped = sorted(state["params"]["params"])[0]
    del state["params"]["params"][dropped]
    del state["params"]["constraints"][dropped]
    save_checkpoint(tmp_path / "dropped.pt", state)
    with pytest.raises(ValueError, match="missing"):
        load_run(tmp_path / "dropped.pt")
