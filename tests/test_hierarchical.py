"""The hierarchical VAE (two stochastic layers) and its bottom-up guide.

The exact check: with linear networks and constant scales the model is a linear-Gaussian chain
z2 → z1 → x, whose log p(x) and posterior p(z1|x) p(z2|z1) are known in closed form. Chosen with
orthogonal rows/columns, the posterior factors are diagonal Gaussians, so the guide can be set to
the exact posterior: every importance weight then equals p(x) (zero variance), and IWAE = ELBO =
log p(x) for every K.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae import TrainConfig
from pyrovae.app.build import build
from pyrovae.guides import HierarchicalGuide
from pyrovae.infer.evaluate import importance_sampling
from pyrovae.infer.objectives import make_objective
from pyrovae.infer.weights import (
    guess_max_plate_nesting,
    per_datapoint_log_weights,
    vectorized_traces,
)
from pyrovae.models import HierarchicalVAE
from pyrovae.nets import HierarchicalDecoder, HierarchicalEncoder

X_DIM, D1, D2 = 4, 3, 2


def _softplus_inv(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


def _set_gaussian_layer(layer, weight, bias, std, min_scale):  # type: ignore[no-untyped-def]
    linear = layer.net[0]
    out = weight.shape[0]
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[:out] = weight
        linear.bias[:out] = bias
        linear.bias[out:] = _softplus_inv(std - min_scale)


def _linear_chain(sigma: float = 0.3):  # type: ignore[no-untyped-def]
    """A linear-Gaussian HierarchicalVAE, its exact marginal of x, and its exact-posterior guide."""
    torch.manual_seed(0)
    A = torch.tensor([[1.2, 0.0], [0.0, -0.7], [0.0, 0.0]], dtype=torch.float64)
    a = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    s = torch.tensor([0.6, 0.8, 1.1], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(X_DIM, D1, dtype=torch.float64))
    B = Q * torch.tensor([1.5, 0.8, 1.1], dtype=torch.float64)  # orthogonal columns
    b = torch.randn(X_DIM, dtype=torch.float64)

    decoder = HierarchicalDecoder(X_DIM, (D1, D2), hidden_sizes=(), upper_hidden_sizes=()).double()
    with torch.no_grad():
        decoder.decoder[0].weight.copy_(B)
        decoder.decoder[0].bias.copy_(b)
    prior_net = decoder.priors[0]
    _set_gaussian_layer(prior_net, A, a, s, prior_net.min_scale)
    model = HierarchicalVAE(decoder, likelihood="gaussian", x_scale=sigma)

    sigma1 = torch.diag(s**2) + A @ A.T  # diagonal: the rows of A are orthogonal
    marginal = dist.MultivariateNormal(B @ a + b, B @ sigma1 @ B.T + sigma**2 * torch.eye(X_DIM, dtype=torch.float64))
    # p(z1 | x): diagonal because B has orthogonal columns and sigma1 is diagonal.
    p1 = torch.linalg.inv(sigma1) + B.T @ B / sigma**2
    c1 = torch.linalg.inv(p1)
    w1 = c1 @ B.T / sigma**2
    bias1 = c1 @ (torch.linalg.solve(sigma1, a) - B.T @ b / sigma**2)
    # p(z2 | z1) ∝ p(z2) p(z1 | z2): diagonal because the columns of A are orthogonal.
    p2 = torch.eye(D2, dtype=torch.float64) + A.T @ torch.diag(s**-2) @ A
    c2 = torch.linalg.inv(p2)
    w2 = c2 @ A.T @ torch.diag(s**-2)
    for c in (c1, c2):
        assert torch.allclose(c, torch.diag(torch.diag(c)))
    encoder = HierarchicalEncoder(X_DIM, (D1, D2), hidden_sizes=(), upper_hidden_sizes=()).double()
    _set_gaussian_layer(encoder.nets[0], w1, bias1, torch.diag(c1).sqrt(), encoder.nets[0].min_scale)
    _set_gaussian_layer(encoder.nets[1], w2, -w2 @ a, torch.diag(c2).sqrt(), encoder.nets[1].min_scale)
    return model, HierarchicalGuide(encoder), marginal


def _log_weights(model, guide, x, k):  # type: ignore[no-untyped-def]
    index = torch.arange(x.shape[0])
    args = (x, index, x.shape[0])
    nesting = guess_max_plate_nesting(model, guide, args, {})
    model_trace, guide_trace = vectorized_traces(model, guide, args, {}, k, nesting)
    return per_datapoint_log_weights(model_trace, guide_trace, k, nesting).log_w


def test_exact_posterior_guide_gives_constant_weights_equal_to_log_px() -> None:
    model, guide, marginal = _linear_chain()
    pyro.set_rng_seed(1)
    x = marginal.sample((6,))
    exact = marginal.log_prob(x)
    log_w = _log_weights(model, guide, x, 200)
    assert log_w.shape == (200, 6)
    torch.testing.assert_close(log_w, exact.expand(200, 6), rtol=0, atol=1e-9)
    # The pyrovae objectives agree: IWAE = ELBO = log p(x) for any K (zero variance).
    index = torch.arange(6)
    for name, k in (("iwae", 7), ("elbo", 3)):
        loss = make_objective(name, k).loss(model, guide, x, index, 6)
        assert loss == pytest.approx(-exact.sum().item(), abs=1e-7)


def test_importance_sampling_with_a_perturbed_guide_converges_to_exact() -> None:
    # A guide away from the posterior: log p̂ is unbiased for p(x) in the weights' mean, and the
    # estimate with K draws is within a few Monte Carlo standard errors of the exact value.
    model, guide, marginal = _linear_chain()
    with torch.no_grad():
        for net in guide.encoder.nets:
            net.net[0].bias.add_(0.2)
    pyro.set_rng_seed(2)
    x = marginal.sample((4,))
    exact = marginal.log_prob(x)
    k = 20000
    log_w = _log_weights(model, guide, x, k)
    w = torch.exp(log_w - exact)  # E[w] = 1
    se = w.std(0) / math.sqrt(k)
    z = (w.mean(0) - 1) / se
    assert (z.abs() < 4).all(), z
    est = importance_sampling(model, guide, x, torch.arange(4), 4, num_samples=k, chunk_size=5000)
    assert (est.elbo < exact).all() and (est.log_likelihood - exact).abs().max() < 5 * se.max()


def test_model_and_guide_shapes_and_sampling() -> None:
    decoder = HierarchicalDecoder(12, (5, 3), (8,), (6,), "tanh")
    model = HierarchicalVAE(decoder)
    guide = HierarchicalGuide(HierarchicalEncoder(12, (5, 3), (8,), (6,), "tanh"))
    x = torch.bernoulli(torch.rand(7, 12))
    trace = pyro.poutine.trace(guide).get_trace(x, torch.arange(7), 70)
    assert trace.nodes["z"]["value"].shape == (7, 5) and trace.nodes["z2"]["value"].shape == (7, 3)
    z, x_mean, x_sample = model.sample(9)
    assert z.shape == (9, 5) and x_mean.shape == (9, 12) and set(x_sample.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="at least two latent layers"):
        HierarchicalDecoder(12, (5,))
    with pytest.raises(TypeError, match="HierarchicalDecoder"):
        HierarchicalVAE(torch.nn.Linear(3, 12))  # type: ignore[arg-type]


def test_config_and_build() -> None:
    config = TrainConfig(model="hvae", z_dim=100, hidden_sizes=(200, 200)).resolved()
    assert config.upper_z_dims == (50,) and config.upper_hidden_sizes == (100, 100)  # Burda et al.'s
    with pytest.raises(ValueError, match="model='hvae'"):
        TrainConfig(upper_z_dims=(10,)).resolved()
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(model="hvae", upper_z_dims=(0,))
    from pyrovae.data import Dataset

    data = Dataset(name="mnist", train=torch.rand(20, 784), test=torch.rand(5, 784), likelihood="bernoulli")
    with pytest.raises(ValueError, match="guide='amortized'"):
        build(TrainConfig(model="hvae", guide="per-datapoint"), data)
    model, guide = build(TrainConfig(model="hvae", z_dim=6, hidden_sizes=(16,)), data)
    assert model.z_dims == (6, 3) and isinstance(guide, HierarchicalGuide)


def test_train_evaluate_restore_and_cli(tmp_path, mnist_root, check_reevaluation) -> None:  # type: ignore[no-untyped-def]
    from pyrovae.app.cli import main
    from pyrovae.app.run import evaluate_checkpoint

    out = tmp_path / "hvae"
    code = main([
        "train", "--model", "hvae", "--z-dim", "6", "--upper-z-dims", "4", "2", "--hidden-sizes", "32",
        "--upper-hidden-sizes", "16", "--objective", "iwae", "--num-particles", "3", "--epochs", "1",
        "--num-train", "300", "--num-test", "40", "--eval-samples", "20", "--data-dir", str(mnist_root),
        "--out", str(out), "--no-progress",
    ])
    assert code == 0
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["active_units_by_site"]) == {"z", "z2", "z3"}
    # Independent re-estimates of the reloaded run agree with the report within 5 SE, and tell
    # log p̂ from the ELBO (log p̂ >= ELBO from the same draws holds for any bug: Jensen).
    ses = check_reevaluation(out, metrics, mnist_root)
    again = evaluate_checkpoint(out / "checkpoint.pt", eval_samples=20, data_dir=str(mnist_root))
    # `pyrovae evaluate` of the checkpoint is the same estimator on the same points: fresh draws
    # within 5 SE of the difference of two runs.
    for key in ("test_elbo", "test_log_likelihood"):
        assert abs(again[key] - metrics[key]) < 5 * math.sqrt(2) * ses[key], (key, again[key], metrics[key], ses)
    assert main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--num", "4", "--out", str(tmp_path / "s.png")]) == 0
