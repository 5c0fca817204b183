"""Network initialisation: Glorot-uniform weights and the decoder's data-mean output bias
(``--weight-init glorot``, ``--data-bias``), as in Burda et al.'s IWAE code."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from pyrovae import TrainConfig, glorot_init_, init_output_bias_, load_dataset
from pyrovae.app.build import build, check_combination
from pyrovae.app.cli import main
from pyrovae.nets import ConvDecoder, Decoder, GaussianEncoder, HierarchicalDecoder


def test_glorot_init_draws_uniform_weights_of_the_glorot_scale_and_zero_biases():
    net = glorot_init_(nn.Sequential(nn.Linear(784, 200), nn.Tanh(), nn.Linear(200, 50),
                                     nn.Conv2d(3, 8, 4)))
    for layer, fan_in, fan_out in ((net[0], 784, 200), (net[2], 200, 50), (net[3], 3 * 16, 8 * 16)):
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = layer.weight.detach()
        assert w.abs().max() <= bound
        # U(-a, a) has E w² = a²/3 and Var w² = 4a⁴/45: the mean of w² within 5 standard errors.
        se = math.sqrt(4.0 / 45.0) * bound**2 / math.sqrt(w.numel())
        assert abs(w.pow(2).mean().item() - bound**2 / 3) < 5 * se
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_data_bias_starts_the_decoder_at_the_mean_image():
    x_mean = torch.rand(12) * 0.9 + 0.05
    x_mean[0], x_mean[1] = 0.0, 1.0  # always-off / always-on pixels: clamped, so the logit is finite
    decoder = init_output_bias_(Decoder(3, 12, (8,), "tanh"), x_mean, "bernoulli")
    expected = x_mean.clamp(1e-3, 1 - 1e-3)
    assert torch.allclose(torch.sigmoid(decoder[-1].bias), expected, atol=1e-6)
    # With the weights of the output layer at zero, p(x|z) is the independent-pixel model of the data.
    with torch.no_grad():
        decoder[-1].weight.zero_()
    assert torch.allclose(torch.sigmoid(decoder(torch.randn(5, 3))), expected.expand(5, 12), atol=1e-6)

    gaussian = init_output_bias_(Decoder(3, 12, (8,), "tanh"), x_mean, "gaussian")
    assert torch.equal(gaussian[-1].bias.detach(), x_mean)

    hierarchical = init_output_bias_(HierarchicalDecoder(12, (4, 2), (8,), (6,)), x_mean, "bernoulli")
    assert torch.allclose(torch.sigmoid(hierarchical.decoder[-1].bias), expected, atol=1e-6)


@pytest.mark.parametrize(
    "decoder, x_mean, likelihood, message",
    [
        (ConvDecoder(3, (1, 8, 8), 16), torch.full((64,), 0.5), "bernoulli", "use --network mlp"),
        (GaussianEncoder(3, 6, (8,)), torch.full((12,), 0.5), "bernoulli", "not one"),
        (Decoder(3, 12, (8,)), torch.full((10,), 0.5), "bernoulli", "decoder outputs (12,) features"),
        (Decoder(3, 12, (8,)), torch.full((12,), 0.5), "poisson", "likelihood must be"),
    ],
)
def test_data_bias_refuses_what_it_cannot_set(decoder, x_mean, likelihood, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        init_output_bias_(decoder, x_mean, likelihood)


def test_build_applies_both_options_to_every_network():
    dataset = load_dataset("gmm", num_train=300, num_test=50)
    config = TrainConfig(dataset="gmm", weight_init="glorot", data_bias=True)
    model, guide = build(config, dataset)
    output = model.decoder[-1]
    assert torch.allclose(output.bias.detach(), dataset.train.mean(0))
    for network in (model.decoder, guide.encoder):
        layers = [m for m in network.modules() if isinstance(m, nn.Linear)]
        for layer in layers:
            assert layer.weight.abs().max() <= math.sqrt(6.0 / (layer.in_features + layer.out_features))
            if layer is not output:
                assert not layer.bias.any()
    # The default keeps torch's initialisation: nonzero hidden biases.
    default_model, _ = build(TrainConfig(dataset="gmm"), dataset)
    assert default_model.decoder[0].bias.abs().sum() > 0


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(model="vqvae"), "data_bias=True .*: drop it"),
        (dict(network="conv"), "data_bias=True .*: drop it"),
        (dict(model="linear", dataset="linear"), "data_bias=True .*: drop it"),
    ],
)
def test_data_bias_on_a_model_without_an_mlp_decoder_is_a_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        check_combination(TrainConfig(data_bias=True, **changes))


def test_cli_flags_reach_the_run_and_its_saved_config(tmp_path):
    out = tmp_path / "run"
    base = ["train", "--dataset", "gmm", "--batch-size", "500", "--eval-samples", "10", "--out", str(out),
            "--no-progress", "--weight-init", "glorot", "--data-bias"]
    assert main(base + ["--epochs", "1"]) == 0
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["weight_init"] == "glorot" and config["data_bias"] is True
    assert main(base + ["--epochs", "2", "--resume"]) == 0
    with pytest.raises(SystemExit):
        main(["train", "--dataset", "gmm", "--out", str(tmp_path / "bad"), "--weight-init", "he"])
