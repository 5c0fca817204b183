"""The Gaussian-mixture study fitted three ways (``experiments/studies/mixture.py``): its helpers,
maximum likelihood by enumeration against EM and the truth, and a smoke run of
``experiments/gmm_three_ways.py``. The model and guides it uses are tested in
``tests/test_mixture.py``.

Every tolerance below is either a floating-point one (exact identities, checked in float64) or
five standard errors.
"""

from __future__ import annotations

import json

import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from studies.mixture import (
    em_fit,
    empty_guide,
    ess_limit,
    kmeans_init,
    match_components,
    parameter_errors,
    train_mixture,
)

from pyrovae.data import gaussian_mixture
from pyrovae.models import GaussianMixture

TRUTH = gaussian_mixture(10, 10).truth


def truth_model(dtype: torch.dtype = torch.float32, prefix: str = "truth") -> GaussianMixture:
    model = GaussianMixture(3, 2, init_locs=TRUTH["locs"].to(dtype), prefix=prefix)
    model.set_params(*(TRUTH[k].to(dtype) for k in ("weights", "locs", "covariance_matrices")))
    return model


# The study's helpers


def test_parameter_errors_are_invariant_to_label_switching():
    truth = {k: TRUTH[k] for k in ("weights", "locs", "covariance_matrices")}
    perm = [2, 0, 1]
    permuted = {k: v[perm] for k, v in truth.items()}
    errors = parameter_errors(permuted, truth)
    assert errors["loc_error"] == errors["covariance_error"] == errors["weight_error"] == 0
    assert [perm[j] for j in errors["permutation"]] == [0, 1, 2]
    assert match_components(truth["locs"], truth["locs"]) == [0, 1, 2]


def test_ess_limit():
    model = truth_model(torch.float64)
    x = torch.tensor([[0.0, 5.0], [-2.0, 2.5]], dtype=torch.float64)
    log_joint = model.log_joint(x)
    posterior = log_joint - torch.logsumexp(log_joint, -1, keepdim=True)
    assert torch.allclose(ess_limit(log_joint, posterior), torch.ones(2, dtype=torch.float64))
    # Under the prior, a point carried by component C alone keeps a share π_C of the samples.
    prior = ess_limit(log_joint, TRUTH["weights"].double().log())
    assert abs(prior[0].item() - TRUTH["weights"][2].item()) < 1e-6
    assert TRUTH["weights"][2] < prior[1] < 1


# (v) Maximum likelihood by enumeration recovers the truth


@pytest.fixture
def one_thread():
    """Small tensors: one thread avoids the cost of thread synchronisation on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_enumeration_training_recovers_the_truth(one_thread):
    """Adam on the exact log-likelihood (TraceEnum_ELBO) reaches the maximum-likelihood estimate
    (EM from the same start) and, through it, the truth up to sampling error.

    Bounds: the components are > 5 standard deviations apart, so the mixture MLE is, to high
    accuracy, the per-component MLE with known labels, whose standard errors are
    SE(μ̂_k) = sqrt(tr Σ_k / n_k), SE(π̂_k) = sqrt(π_k (1 - π_k) / N) and, entrywise,
    SE(Σ̂_k,ij) = sqrt((Σ_ii Σ_jj + Σ_ij²) / n_k) with n_k = π_k N; each error must be below 5 SE
    (covariance errors are Frobenius norms, so against 5 sqrt(Σ_ij SE_ij²)). The fit must agree
    with EM to 0.02 (optimisation accuracy).
    """
    num_data = 1500
    data = gaussian_mixture(num_data, 10, seed=2)
    x = data.train
    init_locs = kmeans_init(x, 3, torch.Generator().manual_seed(0))
    model = GaussianMixture(3, 2, init_locs=init_locs, prefix="fit")
    run = train_mixture(
        model, empty_guide, TraceEnum_ELBO(max_plate_nesting=1), x, data.test,
        steps=400, batch_size=num_data, lr=0.05, eval_every=400, final_lr_factor=0.1,
    )
    assert run.test_log_likelihood[-1] > run.test_log_likelihood[0]
    fitted = {"weights": model.weights(), "locs": model.locs(), "covariance_matrices": model.covariance_matrices()}
    fitted = {k: v.detach() for k, v in fitted.items()}
    mle = em_fit(x, init_locs)
    to_mle = parameter_errors(fitted, mle)
    assert max(to_mle["loc_error"], to_mle["covariance_error"], to_mle["weight_error"]) < 0.02, to_mle

    perm = match_components(fitted["locs"], TRUTH["locs"])
    w, mu, cov = TRUTH["weights"], TRUTH["locs"], TRUTH["covariance_matrices"]
    n = w * num_data
    var = torch.diagonal(cov, dim1=-2, dim2=-1)
    se_loc = (var.sum(-1) / n).sqrt()
    se_weight = (w * (1 - w) / num_data).sqrt()
    se_cov = ((var.unsqueeze(-1) * var.unsqueeze(-2) + cov**2).sum((-1, -2)) / n).sqrt()
    assert ((fitted["locs"][perm] - mu).norm(dim=-1) < 5 * se_loc).all()
    assert ((fitted["weights"][perm] - w).abs() < 5 * se_weight).all()
    assert (torch.linalg.matrix_norm(fitted["covariance_matrices"][perm] - cov) < 5 * se_cov).all()


# (iv) Smoke run of experiments/gmm_three_ways.py


def test_gmm_three_ways_experiment_smoke(load_experiment, tmp_path, one_thread):
    module = load_experiment("experiments/gmm_three_ways.py")
    args = module.build_parser().parse_args([
        "--steps", "6", "--num-particles", "2", "--num-train", "60", "--num-test", "30",
        "--batch-size", "20", "--lr", "0.05", "--eval-every", "3", "--ess-samples", "10",
        "--points-per-component", "5", "--seed", "1", "--threads", "1", "--device", "cpu", "--out", str(tmp_path),
    ])
    module.main(args)
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]) == {"enumeration", "prior", "guide"}
    for method in results["methods"].values():
        assert {"test_log_likelihood", "parameter_errors", "steps", "seconds", "curve"} <= set(method)
        assert {"loc_error", "covariance_error", "weight_error"} <= set(method["parameter_errors"])
        assert method["steps"] == 6 and method["curve"]["steps"][-1] == 6
    assert {"truth_test_log_likelihood", "mle_em", "proposals", "config"} <= set(results)
    assert set(results["proposals"]["ess_over_k"]) == {"prior", "guide"}
    for name in ("fits.png", "curves.png", "proposals.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
