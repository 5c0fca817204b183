"""Full-covariance and normalizing-flow guides (``pyrovae/guides/flows.py``) against exact answers:

- log q(z|x) of every flow guide equals the change of variables log N(ε) − log|det ∂z/∂ε| with the
  Jacobian taken by autograd (float64, to rounding);
- Pyro's own ``Sylvester`` misreports its log-determinant (why pyrovae has its own layer);
- on a linear-Gaussian model held fixed, the trained full-covariance guide's gap log p(x) − ELBO
  goes to 0 while the diagonal guide's stays at the closed-form minimum KL of a diagonal Gaussian
  to p(z|x), 0.5 (Σ_i log Λ_ii + log det Σ), both within Monte Carlo error;
- every guide trains through ``fit``, evaluates, checkpoints, and is reachable from the CLI; STL and
  DReG refuse flows with the reason.
"""

from __future__ import annotations

import json
import math

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch
from pyro.infer import SVI

from pyrovae import AmortizedGuide, GaussianEncoder, LinearGaussian, evaluate_dataset, fit, importance_sampling
from pyrovae.app.cli import main
from pyrovae import params
from pyrovae.guides.flows import (
    FLOW_KINDS,
    LOCAL_FLOW_KINDS,
    FlowGuide,
    FlowNet,
    FullCovarianceGuide,
    PerDatapointFlowGuide,
    PerDatapointFullCovarianceGuide,
    full_covariance_guide,
)
from pyrovae.infer.objectives import make_objective
from pyrovae.nets import FullCovEncoder

X_DIM, Z_DIM = 6, 3


def _perturbed(net: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    # Away from the near-identity initialisation, so the log-determinants are far from 0.
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, scale)
    return net


@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_flow_log_density_is_the_change_of_variables(kind: str, float64) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = _perturbed(FlowNet.build(kind, X_DIM, Z_DIM, hidden_sizes=(8,), num_layers=3))
    x = torch.randn(4, X_DIM)
    z_loc, z_scale, transforms = net(x)
    q = dist.TransformedDistribution(dist.Normal(z_loc, z_scale).to_event(1), transforms)
    eps = dist.Normal(z_loc, z_scale).sample()
    # Chain rule: log|det ∂z/∂ε| = Σ_k log|det J_k|, each layer's Jacobian by autograd (block-diagonal
    # over the batch: point i's output depends on its own input only).
    log_det = torch.zeros(4)
    value = eps
    for t in transforms:
        jacobian = torch.autograd.functional.jacobian(lambda v, t=t: t(v), value)  # (4, Z, 4, Z)
        blocks = torch.stack([jacobian[i, :, i, :] for i in range(4)])
        for i in range(4):
            jacobian[i, :, i, :] = 0
        assert jacobian.abs().max() == 0
        log_det = log_det + torch.linalg.slogdet(blocks)[1]
        value = t(value)
    expected = dist.Normal(z_loc, z_scale).log_prob(eps).sum(-1) - log_det
    torch.testing.assert_close(q.log_prob(value), expected, rtol=0, atol=1e-8)
    assert log_det.abs().max() > 0.1  # the check has something to check


def test_pyros_sylvester_misreports_its_log_determinant(float64) -> None:  # type: ignore[no-untyped-def]
    # Why pyrovae has ConditionalSylvester: Pyro 1.9's row-form Sylvester reports Σ log(1 + h' R_ii S_ii),
    # which is not log|det J| of the map it computes. If this starts failing, Pyro fixed it.
    torch.manual_seed(0)
    layer = _perturbed(T.Sylvester(3, count_transforms=2), 0.7)
    worst = 0.0
    for _ in range(5):
        x = torch.randn(3)
        y = layer(x)
        exact = torch.linalg.slogdet(torch.autograd.functional.jacobian(layer, x))[1]
        worst = max(worst, abs(float(layer.log_abs_det_jacobian(x, y).detach() - exact)))
    assert worst > 0.05


def _fit_guide_to_fixed_model(model: LinearGaussian, guide, x: torch.Tensor, steps: int = 600) -> None:  # type: ignore[no-untyped-def]
    # Only the guide trains (the model's W, b stay the truth), with the STL estimator: its variance
    # vanishes where q = p(z|x), so Adam lands on the exact posterior rather than near it.
    n = x.shape[0]

    def fixed_model(x, index=None, num_data=None):  # type: ignore[no-untyped-def]
        with pyro.poutine.block(hide_types=["param"]):
            return model(x, index, num_data)

    svi = SVI(fixed_model, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.993}), make_objective("elbo-stl", 4))
    for _ in range(steps):
        svi.step(x, torch.arange(n), n)


def _gap_and_se(model: LinearGaussian, guide, x: torch.Tensor, draws: int = 4000) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """The mean over points of log p(x) − ELBO (the ELBO from ``draws`` draws of q per point) and
    its Monte Carlo standard error, from two independent replicates (their difference has √2 SE)."""
    with torch.no_grad():
        first, second = (evaluate_dataset(model, guide, x, num_samples=draws).elbo for _ in range(2))
        gap = model.log_marginal(x) - first
    return float(gap.mean()), float((first - second).std() / math.sqrt(2 * len(x)))


def test_the_gap_closes_for_the_full_covariance_guide_and_not_for_the_diagonal_one(float64) -> None:  # type: ignore[no-untyped-def]
    pyro.clear_param_store()
    model, x = LinearGaussian.random(Z_DIM, X_DIM, num_points=64, signal=4.0, noise_scale=0.7, seed=11)
    posterior = model.posterior(x)
    precision, covariance = posterior.precision_matrix[0], posterior.covariance_matrix[0]
    # The least KL(q ‖ p(z|x)) a diagonal Gaussian reaches (mean μ, variances 1/Λ_ii): the same for
    # every point, since Σ does not depend on x.
    diagonal_floor = 0.5 * float((torch.log(torch.diagonal(precision)).sum() + torch.logdet(covariance)).detach())
    assert diagonal_floor > 0.2  # a correlated posterior: the diagonal family cannot reach it

    torch.manual_seed(0)
    # Linear encoders (no hidden layer): the posterior mean is linear in x and Σ constant, so each
    # family holds its best member exactly.
    full = FullCovarianceGuide(FullCovEncoder(X_DIM, Z_DIM, hidden_sizes=()), name="full")
    _fit_guide_to_fixed_model(model, full, x)
    gap_full, se_full = _gap_and_se(model, full, x)
    diagonal = AmortizedGuide(GaussianEncoder(X_DIM, Z_DIM, hidden_sizes=()), name="diag")
    _fit_guide_to_fixed_model(model, diagonal, x)
    gap_diag, se_diag = _gap_and_se(model, diagonal, x)
    # q = p(z|x): log w is the same for every draw, so the gap is 0 with (almost) no MC error.
    assert abs(gap_full) < 1e-6 and se_full < 1e-6, (gap_full, se_full)
    # The diagonal guide stops at the floor: within 5 MC SEs plus what 600 steps leave (measured 3e-3).
    assert abs(gap_diag - diagonal_floor) < 5 * se_diag + 5e-3, (gap_diag, diagonal_floor, se_diag)


@pytest.mark.parametrize("kind", ["full-cov", *FLOW_KINDS])
def test_every_guide_trains_evaluates_and_checkpoints(kind: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pyro.clear_param_store()
    torch.manual_seed(0)
    model, x = LinearGaussian.random(Z_DIM, X_DIM, num_points=120, seed=2)
    guide = full_covariance_guide(X_DIM, Z_DIM, (16,)) if kind == "full-cov" else \
        FlowGuide(FlowNet.build(kind, X_DIM, Z_DIM, hidden_sizes=(16,), num_layers=2))
    history = fit(model, guide, x, make_objective("iwae", num_particles=3), epochs=10, batch_size=40, lr=2e-2,
                  checkpoint_path=tmp_path / "c.pt", progress=False)
    assert history.train_bound[-1] > history.train_bound[0] + 0.5
    state = torch.load(tmp_path / "c.pt", weights_only=False)
    assert any(name.startswith("encoder$$$") for name in state["params"]["params"])
    # The importance-sampled log p(x) with the trained guide as proposal is consistent: within 5 of
    # its standard errors of the closed form at every point, SE² ≈ 1/ESS − 1/K by the delta method
    # (a log q off by a constant, or a wrong log-determinant, would not be).
    k = 4000
    with torch.no_grad():
        estimate = importance_sampling(model, guide, x[:10], torch.arange(10), 10, num_samples=k, chunk_size=1000)
        exact = model.log_marginal(x[:10])
    se = (1 / estimate.ess - 1 / k).clamp_min(0).sqrt()
    assert ((estimate.log_likelihood - exact).abs() < 5 * se + 1e-3).all(), (estimate.log_likelihood - exact, se)
    assert estimate.ess.median() > 100  # a trained proposal, so the check has power


@pytest.mark.parametrize("objective", ["elbo-stl", "iwae-dreg"])
def test_stl_and_dreg_refuse_flows_with_the_reason_and_take_the_full_covariance_guide(objective: str) -> None:
    pyro.clear_param_store()
    model, x = LinearGaussian.random(Z_DIM, X_DIM, num_points=8, seed=0)
    flow = FlowGuide(FlowNet.build("planar", X_DIM, Z_DIM, hidden_sizes=(8,)))
    with pytest.raises(ValueError, match="normalizing flow"):
        make_objective(objective, 2).loss(model, flow, x, torch.arange(8), 8)
    full = full_covariance_guide(X_DIM, Z_DIM, (8,))
    assert math.isfinite(make_objective(objective, 2).loss(model, full, x, torch.arange(8), 8))


def test_the_cli_trains_each_new_guide_and_refuses_what_does_not_apply(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    for guide in ("full-cov", "sylvester"):
        out = tmp_path / guide
        assert main(["train", "--dataset", "linear", "--guide", guide, "--epochs", "2", "--eval-samples", "20",
                     *(["--flow-layers", "3"] if guide != "full-cov" else []), "--out", str(out),
                     "--no-progress"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["config"]["guide"] == guide and math.isfinite(metrics["test_elbo"])
    assert metrics["config"]["flow_layers"] == 3
    for args, message in ((["--guide", "amortized", "--flow-layers", "3"], "flow_layers|flow-layers"),
                          (["--guide", "iaf", "--z-dim", "1"], "z_dim|z-dim"),
                          (["--guide", "planar", "--no-reparameterize"], "reparameterize")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--dataset", "linear", *args, "--out", str(tmp_path / "x"), "--no-progress"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert __import__("re").search(message, err) and "Traceback" not in err, err


def test_the_reported_standard_errors_match_the_spread_of_replicates(float64) -> None:  # type: ignore[no-untyped-def]
    # 300 independent runs of importance sampling on fixed points: the SEs each run reports must match
    # the spread of its estimates across runs (the SD of an SD from 300 draws is ≈ 4 %, so 20 % is 5
    # of them). The ELBO's SE is exact for any proposal; log p̂'s delta-method SE needs a proposal that
    # covers the posterior, here p(z|x) widened by 1.5.
    from torch.distributions import MultivariateNormal

    from pyrovae.guides import ExactPosteriorGuide

    pyro.clear_param_store()
    torch.manual_seed(0)
    model, x = LinearGaussian.random(2, 4, num_points=3, seed=5)
    untrained = AmortizedGuide(GaussianEncoder(4, 2, hidden_sizes=(8,)))
    widened = ExactPosteriorGuide(model, lambda p: MultivariateNormal(p.loc, scale_tril=1.5 * p.scale_tril))
    for guide, values, reported in ((untrained, "elbo", "elbo_se"), (widened, "elbo", "elbo_se"),
                                    (widened, "log_likelihood", "log_likelihood_se")):
        runs = [importance_sampling(model, guide, x, torch.arange(3), 3, num_samples=50) for _ in range(300)]
        spread = torch.stack([getattr(r, values) for r in runs]).std(0)
        claimed = torch.stack([getattr(r, reported) for r in runs]).mean(0)
        assert ((claimed / spread - 1).abs() < 0.2).all(), (values, claimed, spread)
    report = evaluate_dataset(model, untrained, x, num_samples=20).summary()
    assert report["elbo_se"] > 0 and report["log_likelihood_se"] > 0


@pytest.mark.parametrize("kind", LOCAL_FLOW_KINDS)
def test_per_datapoint_flow_log_density_is_the_change_of_variables(kind: str, float64) -> None:  # type: ignore[no-untyped-def]
    pyro.clear_param_store()
    guide = PerDatapointFlowGuide(10, Z_DIM, kind, num_layers=3, seed=1)
    index = torch.tensor([7, 2, 5, 0])
    guide(None, index, 10)  # creates the rows
    with torch.no_grad():  # away from the initialisation, every row different
        for name in guide.local_param_names:
            raw = pyro.get_param_store()._params[name]
            raw.add_(0.5 * torch.randn_like(raw))
    site = pyro.poutine.trace(guide).get_trace(None, index, 10).nodes["z"]
    q = site["fn"]
    base = q.base_dist.base_dist  # Independent(Normal)
    eps = base.sample()
    log_det = torch.zeros(4)
    value = eps
    for t in q.transforms:
        jacobian = torch.autograd.functional.jacobian(lambda v, t=t: t(v), value)
        log_det = log_det + torch.linalg.slogdet(torch.stack([jacobian[i, :, i, :] for i in range(4)]))[1]
        value = t(value)
    expected = base.log_prob(eps).sum(-1) - log_det
    torch.testing.assert_close(q.log_prob(value), expected, rtol=0, atol=1e-8)
    assert log_det.abs().max() > 0.1


@pytest.mark.parametrize("make", [lambda: PerDatapointFullCovarianceGuide(30, Z_DIM),
                                  lambda: PerDatapointFlowGuide(30, Z_DIM, "planar"),
                                  lambda: PerDatapointFlowGuide(30, Z_DIM, "sylvester")])
def test_per_datapoint_guides_are_rows_that_fit_updates_lazily(make) -> None:  # type: ignore[no-untyped-def]
    pyro.clear_param_store()
    model, x = LinearGaussian.random(Z_DIM, X_DIM, num_points=30, seed=3)
    guide = make()
    # Every parameter is a per-datapoint row (what fit's lazy Adam and the data-parallel row
    # exchange act on), with the data set's 30 rows.
    sites = params.inspect(model, guide, (x[:5], torch.arange(5), 30))
    assert {n: r for n, r in sites.local.items() if n.startswith(guide.prefix)} == dict.fromkeys(guide.local_param_names, 30)
    before = {n: pyro.get_param_store()._params[n].detach().clone() for n in guide.local_param_names}
    fit(model, guide, x, make_objective("elbo", num_particles=2), epochs=1, batch_size=10, lr=1e-2, progress=False)
    for name, value in before.items():  # one pass over the data: every row took its steps
        moved = (pyro.get_param_store()._params[name].detach() - value).flatten(1).abs().amax(1)
        assert (moved > 0).all(), name


def test_the_per_datapoint_full_covariance_guide_closes_the_gap(float64) -> None:  # type: ignore[no-untyped-def]
    pyro.clear_param_store()
    model, x = LinearGaussian.random(Z_DIM, X_DIM, num_points=16, signal=4.0, noise_scale=0.7, seed=11)
    guide = PerDatapointFullCovarianceGuide(16, Z_DIM)
    _fit_guide_to_fixed_model(model, guide, x, steps=800)
    gap, se = _gap_and_se(model, guide, x)
    assert abs(gap) < 1e-5 and se < 1e-5, (gap, se)  # the diagonal family's floor here is 0.3


@pytest.mark.parametrize("guide", ["full-cov", "iaf"])
def test_glorot_init_reaches_the_new_guides_networks(guide: str) -> None:
    # build() applies --weight-init glorot to the pyrovae networks it builds: the flow's hypernetworks
    # and encoder too (zero biases are Glorot's mark here).
    from pyrovae.app.build import build
    from pyrovae.app.config import TrainConfig
    from pyrovae.data import linear_gaussian

    pyro.clear_param_store()
    data = linear_gaussian(50, 10)
    _, q = build(TrainConfig(dataset="linear", guide=guide, weight_init="glorot"), data)
    linears = [m for m in q.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(float(m.bias.abs().max()) == 0 for m in linears)


@pytest.mark.parametrize("make", [lambda: PerDatapointFullCovarianceGuide(8, Z_DIM),
                                  lambda: PerDatapointFlowGuide(8, Z_DIM, "planar")])
def test_local_steps_are_refused_for_the_non_diagonal_per_datapoint_guides(make) -> None:  # type: ignore[no-untyped-def]
    # refine_rows is a Gaussian refinement of diagonal rows; another family is refused, not refined wrongly.
    pyro.clear_param_store()
    model, x = LinearGaussian.random(Z_DIM, X_DIM, num_points=8, seed=0)
    guide = make()
    with pytest.raises(ValueError, match=f"train a {type(guide).__name__} with local_steps=0"):
        guide.refine_rows(model, x[:4], torch.arange(4), num_steps=2)


def test_the_sylvester_layer_is_the_dense_formula_with_q_the_product_of_its_reflections(float64) -> None:  # type: ignore[no-untyped-def]
    # The layer applies H_1 ⋯ H_M to vectors without forming Q; with Q formed from explicit
    # reflection matrices, y = x + Q R tanh(S Qᵀ x + b) must hold, and Q must be orthogonal.
    from pyrovae.guides.flows import ConditionalSylvester, _ConditionedSylvester, householder_product, sylvester_matrices

    d, m = 4, 3
    torch.manual_seed(0)
    raw = [torch.randn(5, size) for size in ConditionalSylvester.param_dims(d, m)]
    u, r, s, b = sylvester_matrices(raw, d, m)
    q = householder_product(u)
    explicit = torch.eye(d).expand(5, d, d)
    for k in range(m):
        uk = u[:, k, :]
        explicit = explicit @ (torch.eye(d) - 2 * uk.unsqueeze(-1) * uk.unsqueeze(-2))
    assert torch.allclose(q, explicit, atol=1e-12)
    assert torch.allclose(q.transpose(-1, -2) @ q, torch.eye(d).expand(5, d, d), atol=1e-12)
    x = torch.randn(7, 5, d)  # draws in front of the batch of points
    y = _ConditionedSylvester(lambda: (u, r, s, b))(x)
    pre = (s @ (q.transpose(-1, -2) @ x.unsqueeze(-1))).squeeze(-1) + b
    dense = x + (q @ r @ torch.tanh(pre).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(y, dense, atol=1e-12)


@pytest.mark.parametrize("m_shape, v_shape", [((5, 4, 4), (7, 5, 4)), ((5, 4, 4), (2, 3, 5, 4)), ((4, 4), (6, 4)),
                                              ((5, 4, 4), (5, 4)), ((1, 4, 4), (3, 5, 4)), ((2, 5, 4, 4), (3, 2, 5, 4))])
def test_matvec_is_the_broadcast_matrix_vector_product(float64, m_shape, v_shape) -> None:  # type: ignore[no-untyped-def]
    # The Sylvester layer multiplies each point's matrices by all its draws as one block (no copy
    # of the matrices per draw); every broadcast the plain product allows must give its answer.
    from pyrovae.guides.flows import _matvec

    torch.manual_seed(0)
    m, v = torch.randn(m_shape), torch.randn(v_shape)
    assert torch.allclose(_matvec(m, v), (m @ v.unsqueeze(-1)).squeeze(-1), atol=1e-12)


def test_fit_local_guide_lands_a_full_covariance_row_per_point_on_the_posterior_and_leaves_the_model(float64) -> None:  # type: ignore[no-untyped-def]
    # The library's fixed-model fit (what the CLI's test set gets for guide='per-datapoint-full-cov'):
    # with STL it lands on the exact posterior (gap 0 within MC error, 1e-5), and the model's own
    # params (W, b: pyro.params of LinearGaussian) do not move.
    from pyrovae import fit_local_guide

    pyro.clear_param_store()
    model, x = LinearGaussian.random(Z_DIM, X_DIM, num_points=16, signal=4.0, noise_scale=0.7, seed=11)
    guide = PerDatapointFullCovarianceGuide(16, Z_DIM, prefix="test")
    params.inspect(model, guide, (x[:2], torch.arange(2), 16))  # create every param
    store = pyro.get_param_store()
    model_params = {n: store[n].detach().clone() for n in store.keys() if not n.startswith("test.")}
    assert model_params
    seconds = fit_local_guide(model, guide, x, steps=800, lr=0.05, num_particles=4, objective="elbo-stl")
    assert seconds > 0
    gap, se = _gap_and_se(model, guide, x)
    assert abs(gap) < 1e-5 and se < 1e-5, (gap, se)
    for name, value in model_params.items():
        assert torch.equal(store[name].detach(), value), name
    with pytest.raises(ValueError, match="has 16 rows but x has 8 points"):
        fit_local_guide(model, guide, x[:8])


@pytest.mark.parametrize("glorot", [False, True])
def test_the_full_covariance_encoder_starts_diagonal_and_learns_its_correlations(glorot: bool) -> None:
    # The off-diagonal head is a ZeroLinear: L(x) starts diagonal (also under --weight-init glorot,
    # which would otherwise give the later coordinates of z variances up to 2.5 times the first's),
    # and its entries still get gradients, so the correlations are learned.
    from pyrovae.nets import FullCovEncoder, glorot_init_

    torch.manual_seed(0)
    encoder = FullCovEncoder(20, 4, (16,))
    if glorot:
        glorot_init_(encoder)
    x = torch.randn(8, 20)
    _, tril = encoder(x)
    assert torch.equal(torch.tril(tril, -1), torch.zeros_like(tril))
    assert (torch.diagonal(tril, dim1=-2, dim2=-1) > 0).all()
    target = torch.tril(torch.ones(4, 4), -1)
    ((tril - target) ** 2).sum().backward()
    assert encoder.off_diagonal.weight.grad.abs().sum() > 0
