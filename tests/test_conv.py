"""Convolutional encoder/decoder option (``--network conv``) for the image models."""

from __future__ import annotations

import json

import pyro
import pytest
import torch

from pyrovae import TrainConfig
from pyrovae.app.build import build
from pyrovae.data import Dataset
from pyrovae.infer.objectives import make_objective
from pyrovae.nets import ConvDecoder, ConvGaussianEncoder, ConvTrunk


def _mnist_like(n: int = 12) -> Dataset:
    return Dataset(name="mnist", train=torch.rand(n, 784), test=torch.rand(4, 784), likelihood="bernoulli",
                   image_shape=(1, 28, 28))


def test_shapes_with_particle_dims() -> None:
    encoder = ConvGaussianEncoder((1, 28, 28), z_dim=5, hidden=32, channels=(4, 8))
    decoder = ConvDecoder(5, (28, 28), hidden=32, channels=(4, 8))
    x = torch.rand(3, 7, 784)  # (particles, batch, pixels)
    loc, scale = encoder(x)
    assert loc.shape == scale.shape == (3, 7, 5) and (scale > 0).all()
    assert decoder(loc).shape == (3, 7, 784)
    # Folding leading dims is only a reshape: each image is encoded on its own.
    torch.testing.assert_close(encoder(x[1, 2])[0], loc[1, 2])
    with pytest.raises(ValueError, match="multiples of 4"):
        ConvTrunk((1, 30, 30), 8)


@pytest.mark.parametrize("model", ["vae", "hvae"])
def test_build_and_one_step(model: str) -> None:
    pyro.clear_param_store()
    config = TrainConfig(model=model, network="conv", z_dim=6, hidden_sizes=(32,))
    vae, guide = build(config, _mnist_like())
    assert isinstance(vae.decoder if model == "vae" else vae.decoder.decoder, ConvDecoder)
    x = torch.bernoulli(torch.rand(5, 784))
    loss = make_objective("iwae", 3).differentiable_loss(vae, guide, x, torch.arange(5), 12)
    loss.backward()
    encoder = guide.encoder if model == "vae" else guide.encoder.nets[0]
    assert isinstance(encoder, ConvGaussianEncoder)
    assert all(p.grad is not None for p in encoder.parameters())


def test_conv_needs_images() -> None:
    data = Dataset(name="gmm", train=torch.rand(10, 2), test=torch.rand(3, 2), likelihood="gaussian")
    with pytest.raises(ValueError, match="needs image data"):
        build(TrainConfig(dataset="gmm", network="conv"), data)


def test_cli_trains_a_conv_vae(tmp_path, mnist_root, drawn, check_reevaluation) -> None:  # type: ignore[no-untyped-def]
    from pyrovae.app.cli import main

    code = main([
        "train", "--network", "conv", "--z-dim", "4", "--hidden-sizes", "32", "--epochs", "1",
        "--num-train", "200", "--num-test", "20", "--eval-samples", "10", "--data-dir", str(mnist_root),
        "--out", str(tmp_path), "--no-progress",
    ])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["network"] == "conv"
    check_reevaluation(tmp_path, metrics, mnist_root)  # the reported test ELBO and log p̂ are the saved run's
    drawn(tmp_path / "samples.png", data=False)  # grey digits
