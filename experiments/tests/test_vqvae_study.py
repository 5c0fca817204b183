"""The VQ study's code priors (``experiments/studies/vq.py``): a PixelCNN prior over a trained
VQ-VAE's codes fitted with ``fit`` beats the uniform prior on test codes and samples images; the
two priors of a VQ-VAE-2 trained from the CLI fit and sample. The VQ-VAE models themselves are
tested in ``tests/test_vqvae.py``.
"""

from __future__ import annotations

import json

import torch

from pyrovae import TrainConfig
from pyrovae.app.build import build


def test_code_prior_fits_with_fit(mnist_root) -> None:  # type: ignore[no-untyped-def]
    from studies import vq

    from pyrovae.app.run import load_data

    config = TrainConfig(model="vqvae", z_dim=4, num_codes=8, num_train=200, num_test=40)
    data = load_data(config, str(mnist_root))
    model, guide = build(config, data)
    prior, history, codes = vq.fit_code_prior(model, guide, data, epochs=2, batch_size=50)
    assert history.test_bound[-1] > history.test_bound[0]  # maximum likelihood improves the test codes
    metrics = vq.prior_metrics(model, guide, prior, torch.bernoulli(data.test), codes.test)
    assert metrics["log_prior_codes"] > metrics["uniform_log_prior_codes"]
    grid, images = vq.sample_images(model, prior, 3)
    assert grid.shape == (3, 7, 7) and images.shape == (3, 784)


def test_cli_trains_a_vqvae2_and_its_priors(tmp_path, mnist_root) -> None:  # type: ignore[no-untyped-def]
    from studies import vq

    from pyrovae.app.cli import main
    from pyrovae.app.run import restore

    out = tmp_path / "vq2"
    assert main([
        "train", "--model", "vqvae2", "--z-dim", "4", "--num-codes", "16", "--num-codes-top", "8", "--epochs", "1",
        "--num-train", "200", "--num-test", "30", "--data-dir", str(mnist_root), "--out", str(out), "--no-progress",
    ]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_codes_top"] == 8 and 1 <= metrics["perplexity_top"] <= 8
    config, data, model, guide, _ = restore(out / "checkpoint.pt", data_dir=str(mnist_root))
    priors = vq.fit_code_priors_2(model, guide, data, epochs=1, batch_size=50, channels=8, layers=1)
    images = vq.sample_images_2(model, priors["top"], priors["bottom"], 3)
    assert images.shape == (3, 784) and (images >= 0).all() and (images <= 1).all()
