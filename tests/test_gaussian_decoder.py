"""The Gaussian decoder N(f_θ(z), σ²) with fixed, learned shared, or learned per-pixel σ on
continuous (non-binarized) MNIST."""

from __future__ import annotations

import json

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae import TrainConfig
from pyrovae.app.run import load_data
from pyrovae.models import VAE
from pyrovae.nets import Decoder


def test_per_pixel_scale_log_density() -> None:
    pyro.clear_param_store()
    decoder = Decoder(3, 10, (8,))
    model = VAE(decoder, 3, likelihood="gaussian", x_scale=0.5, learn_x_scale=True, x_scale_shape="pixel")
    x = torch.rand(4, 10)
    trace = pyro.poutine.trace(model).get_trace(x, torch.arange(4), 4)
    scale = pyro.param("x_scale")
    assert scale.shape == (10,) and torch.allclose(scale, torch.full((10,), 0.5))
    with torch.no_grad():
        pyro.get_param_store()["x_scale"] = torch.linspace(0.1, 1.0, 10)
    trace = pyro.poutine.trace(model).get_trace(x, torch.arange(4), 4)
    site = trace.nodes["x"]
    out = decoder(trace.nodes["z"]["value"])
    expected = dist.Normal(out, torch.linspace(0.1, 1.0, 10)).log_prob(x).sum(-1)
    torch.testing.assert_close(site["fn"].log_prob(x), expected)


def test_bad_settings_are_refused(mnist_root) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="learn_x_scale=True"):
        VAE(Decoder(3, 10, (8,)), 3, likelihood="gaussian", x_scale_shape="pixel")
    with pytest.raises(ValueError, match="binarize='none'"):
        load_data(TrainConfig(likelihood="gaussian"), str(mnist_root))
    data = load_data(TrainConfig(likelihood="gaussian", binarize="none", num_train=10, num_test=5), str(mnist_root))
    assert data.likelihood == "gaussian" and 0 < data.train.max() <= 1 and not set(data.train.unique().tolist()) <= {0.0, 1.0}


def test_cli_learns_a_per_pixel_scale(tmp_path, mnist_root) -> None:  # type: ignore[no-untyped-def]
    from pyrovae.app.cli import main

    code = main([
        "train", "--likelihood", "gaussian", "--binarize", "none", "--learn-x-scale", "--x-scale-shape", "pixel",
        "--x-scale", "0.3", "--z-dim", "4", "--hidden-sizes", "32", "--epochs", "1", "--num-train", "300",
        "--num-test", "20", "--eval-samples", "10", "--lr", "1e-2", "--data-dir", str(mnist_root),
        "--out", str(tmp_path), "--no-progress",
    ])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["x_scale_shape"] == "pixel"
    from pyrovae.runtime.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "checkpoint.pt")
    learned = state["params"]["params"]["x_scale"]
    assert learned.shape == (784,) and learned.std() > 0  # the pixels learned different σ
