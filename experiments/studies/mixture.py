"""A Gaussian mixture fitted by maximum likelihood three ways, and what importance sampling with
the prior gets wrong.

The model (:class:`pyrovae.models.GaussianMixture`) has a discrete latent z ∈ {0, 1, 2}, so its
marginal likelihood p(x) = Σ_k π_k N(x; μ_k, Σ_k) is exact by enumeration. That makes it a clean
test bed for the Monte Carlo objectives used when enumeration is impossible:

(a) ``enumeration``: exact log p(x) (``TraceEnum_ELBO`` with an empty guide; the ELBO of a guide
    with no latent sites *is* log p(x));
(b) ``prior``: the K-sample estimator log (1/K) Σ_k p(x | z_k), z_k ~ p(z) (pyrovae's IWAE with
    :class:`~pyrovae.guides.MixturePriorGuide`), a lower bound in expectation that is loose
    whenever few of the K prior draws land on the component that explains x;
(c) ``guide``: the IWAE bound with an amortized q_φ(z|x) = Categorical(MLP(x))
    (:class:`~pyrovae.guides.CategoricalGuide`) trained jointly, its discrete site getting VIMCO's
    score-function gradient.

Every method is scored by the exact held-out log-likelihood and by its parameter error against the
truth up to label switching. :func:`proposal_study` measures, for test points near each true
component, the share of p(x) carried by each value of z and the effective sample size of prior
and guide proposals.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence

import pyro
import torch
from pyro.infer import TraceEnum_ELBO

from pyrovae.app import plots
from pyrovae.data import Dataset, gaussian_mixture
from pyrovae.guides import CategoricalGuide, MixturePriorGuide
from pyrovae.infer.evaluate import importance_sampling
from pyrovae.infer.loop import (
    EvalSchedule,
    Hook,
    StepBudget,
    StepResult,
    Trainer,
    TrainState,
)
from pyrovae.infer.objectives import IWAE
from pyrovae.infer.optim import make_pyro_optimizer
from pyrovae.models import GaussianMixture
from pyrovae.nets import MLP
from pyrovae.train.step import GradientStep

MethodName = Literal["enumeration", "prior", "guide"]
METHODS: tuple[str, ...] = ("enumeration", "prior", "guide")
METHOD_LABELS: dict[str, str] = {
    "enumeration": "(a) exact, by enumeration",
    "prior": "(b) IWAE, z ~ prior",
    "guide": "(c) IWAE, z ~ q(z|x) (VIMCO)",
}
COMPONENT_NAMES: tuple[str, ...] = ("A", "B", "C")


@dataclass
class ThreeWaysConfig:
    """Settings of :func:`run_three_ways`.

    :param steps: Adam steps per method.
    :param num_particles: K of the Monte Carlo objectives (b) and (c).
    :param num_train: training points drawn from the true mixture.
    :param num_test: held-out points.
    :param batch_size: points per step (subsampled plate; the loss is scaled by N/B).
    :param lr: Adam learning rate (all parameters, all methods) at the first step.
    :param final_lr_factor: the learning rate decays geometrically to ``lr * final_lr_factor`` at
        the last step, so that the final parameters are not dominated by minibatch noise.
    :param eval_every: steps between exact held-out log-likelihood evaluations.
    :param hidden_sizes: hidden layers of the guide network of method (c).
    :param learn_weights: learn the mixture weights π (else uniform and fixed).
    :param prior_gradient: how method (b) differentiates through the prior it samples from:
        ``vimco`` (the unbiased gradient of E[L_K], π getting VIMCO's score-function term) or
        ``detached`` (π read detached in the guide: a fixed proposal at each step).
    :param ess_samples: K of the importance-sampling runs that measure the ESS.
    :param points_per_component: test points taken nearest to each true component.
    :param seed: seed of the data, the initialisation and every random draw.
    :param device: ``cpu`` or ``cuda``.
    """

    steps: int = 3000
    num_particles: int = 5
    num_train: int = 3000
    num_test: int = 1000
    batch_size: int = 200
    lr: float = 0.02
    final_lr_factor: float = 0.1
    eval_every: int = 50
    hidden_sizes: tuple[int, ...] = (32,)
    learn_weights: bool = True
    prior_gradient: Literal["vimco", "detached"] = "vimco"
    ess_samples: int = 2000
    points_per_component: int = 50
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "num_particles", "num_train", "num_test", "batch_size", "eval_every",
                     "ess_samples", "points_per_component"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.num_particles < 2:
            raise ValueError(
                f"num_particles must be >= 2 (VIMCO's leave-one-out signal needs 2), got {self.num_particles}"
            )
        if self.prior_gradient not in ("vimco", "detached"):
            raise ValueError(f"prior_gradient must be 'vimco' or 'detached', got {self.prior_gradient!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 < self.final_lr_factor <= 1:
            raise ValueError(f"final_lr_factor must be in (0, 1], got {self.final_lr_factor}")
        if self.points_per_component > self.num_test // 3:
            raise ValueError(
                f"points_per_component={self.points_per_component} needs num_test >= "
                f"{3 * self.points_per_component}, got {self.num_test}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def empty_guide(
    x: Optional[torch.Tensor] = None, index: Optional[torch.Tensor] = None, num_data: Optional[int] = None
) -> None:
    """A guide with no latent sites: with ``TraceEnum_ELBO`` the model's enumerated z is summed
    out, and the ELBO equals log p(x) exactly."""


def kmeans_plus_plus(x: torch.Tensor, num_components: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: the first centre is a uniform draw from ``x``, each next one a draw with
    probability proportional to the squared distance to the nearest centre so far.

    :return: ``(num_components, D)`` centres, on the CPU.
    """
    cpu = x.detach().cpu()
    first = torch.randint(len(cpu), (1,), generator=generator)
    centres = [cpu[first[0]]]
    for _ in range(1, num_components):
        sq_dist = torch.cdist(cpu, torch.stack(centres)).pow(2).min(-1).values
        centres.append(cpu[torch.multinomial(sq_dist, 1, generator=generator)[0]])
    return torch.stack(centres)


def kmeans_init(
    x: torch.Tensor, num_components: int, generator: torch.Generator, num_inits: int = 5, iterations: int = 20
) -> torch.Tensor:
    """Initial means by k-means, as is usual for mixtures: ``num_inits`` k-means++ seedings, each
    refined by ``iterations`` Lloyd steps; the one with the smallest within-cluster sum of squares
    wins. (A single k-means++ draw puts two centres in one cluster often enough, and gradient
    ascent on the likelihood rarely moves a component across to an empty cluster.)

    **References** D. Arthur, S. Vassilvitskii, "k-means++: the advantages of careful seeding",
    SODA 2007.

    :return: ``(num_components, D)`` initial means on the device of ``x``.
    """
    cpu = x.detach().cpu()
    best, best_inertia = None, math.inf
    for _ in range(num_inits):
        centres = kmeans_plus_plus(cpu, num_components, generator)
        for _ in range(iterations):
            assign = torch.cdist(cpu, centres).argmin(-1)
            centres = torch.stack([
                cpu[assign == k].mean(0) if (assign == k).any() else centres[k] for k in range(num_components)
            ])
        inertia = torch.cdist(cpu, centres).pow(2).min(-1).values.sum().item()
        if inertia < best_inertia:
            best, best_inertia = centres, inertia
    assert best is not None
    return best.to(x.device)


@torch.no_grad()
def em_fit(
    x: torch.Tensor, init_locs: torch.Tensor, init_scale: float = 1.0, iterations: int = 500, tol: float = 1e-10
) -> dict[str, torch.Tensor]:
    """The maximum-likelihood mixture by expectation-maximisation (full batch, float64), from the
    same start as the gradient methods: the reference that separates the statistical error of the
    MLE from the optimisation error of a method.

    **References** A. P. Dempster, N. M. Laird, D. B. Rubin, "Maximum likelihood from incomplete
    data via the EM algorithm", JRSS-B 1977.

    :return: ``weights``, ``locs``, ``covariance_matrices`` (float32, on the device of ``x``), and
        ``iterations`` run.
    """
    x64 = x.detach().double()
    num_components, dim = init_locs.shape
    weights = torch.full((num_components,), 1.0 / num_components, dtype=torch.float64, device=x.device)
    locs = init_locs.detach().double().clone()
    covs = init_scale**2 * torch.eye(dim, dtype=torch.float64, device=x.device).expand(num_components, dim, dim)
    previous = -math.inf
    for iteration in range(1, iterations + 1):
        log_joint = weights.log() + dist_mvn(locs, covs).log_prob(x64.unsqueeze(-2))
        log_px = torch.logsumexp(log_joint, -1)
        resp = torch.softmax(log_joint, -1)
        counts = resp.sum(0)
        weights = counts / x64.shape[0]
        locs = (resp.T @ x64) / counts.unsqueeze(-1)
        diff = x64.unsqueeze(-2) - locs
        covs = torch.einsum("nk,nki,nkj->kij", resp, diff, diff) / counts[:, None, None]
        if log_px.mean().item() - previous < tol:
            break
        previous = log_px.mean().item()
    return {
        "weights": weights.float(), "locs": locs.float(), "covariance_matrices": covs.float(),
        "iterations": torch.tensor(iteration),
    }


def dist_mvn(locs: torch.Tensor, covariance_matrices: torch.Tensor) -> torch.distributions.MultivariateNormal:
    """N(μ_k, Σ_k) for every component, batch shape ``(K,)``."""
    return pyro.distributions.MultivariateNormal(locs, covariance_matrix=covariance_matrices)


def build_method(
    method: str,
    model: GaussianMixture,
    num_particles: int,
    hidden_sizes: Sequence[int] = (32,),
    device: str | torch.device = "cpu",
    detach_prior: bool = False,
) -> tuple[Callable, Any]:
    """The guide and the objective of a method: ``enumeration``, ``prior`` or ``guide``.

    :param detach_prior: method ``prior`` only: see :class:`~pyrovae.guides.MixturePriorGuide`.
    """
    if method == "enumeration":
        return empty_guide, TraceEnum_ELBO(max_plate_nesting=1)
    if method == "prior":
        return MixturePriorGuide(model, detach=detach_prior), IWAE(num_particles=num_particles, max_plate_nesting=1)
    if method == "guide":
        encoder = MLP(model.dim, list(hidden_sizes), model.num_components, activation="tanh").to(device)
        guide = CategoricalGuide(encoder, name=f"{model.prefix}.encoder")
        return guide, IWAE(num_particles=num_particles, max_plate_nesting=1)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


@dataclass
class TrainResult:
    """One method's run: the exact held-out log-likelihood (nats/point) every ``eval_every``
    steps, the mean training loss (the negative objective, nats/point) over the steps since the
    previous evaluation, and the wall-clock seconds spent in optimisation steps (evaluations
    excluded)."""

    steps: list[int] = field(default_factory=list)
    test_log_likelihood: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


class _RunningLoss(Hook):
    # The mean per-point training loss of the steps since the last evaluation.
    def __init__(self, running: dict[str, Any], num_data: int) -> None:
        self.running, self.num_data = running, num_data

    def on_step_end(self, trainer: Trainer, state: TrainState, result: StepResult) -> None:
        self.running["loss"] += result.loss / self.num_data
        self.running["count"] += 1


def train_mixture(
    model: GaussianMixture,
    guide: Callable,
    objective: Any,
    x_train: torch.Tensor,
    x_test: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    eval_every: int,
    final_lr_factor: float = 1.0,
    seed: int = 0,
) -> TrainResult:
    """Maximise ``objective`` by Adam on shuffled minibatches (each step passes ``(x, index, N)``,
    so the data plate scales the minibatch loss by N/B), recording the exact held-out
    log-likelihood ``model.log_marginal(x_test).mean()`` at steps 0, 1, 2, 5, 10, 20, ... (to see
    the first steps) and every ``eval_every`` steps. The learning rate decays by a constant factor
    per step, from ``lr`` to ``lr * final_lr_factor`` at the last step.

    Pyro's argument validation is off inside the loop (it dominates the cost of these small steps).
    A :class:`~pyrovae.infer.loop.Trainer` with a step budget and an evaluation schedule.
    """
    num_data = x_train.shape[0]
    batch_size = min(batch_size, num_data)
    step = GradientStep(model, guide, objective, make_pyro_optimizer(lr, final_lr_factor ** (1.0 / steps)))
    result = TrainResult()
    schedule = set(range(eval_every, steps + 1, eval_every)) | {steps}
    schedule |= {m * 10**e for e in range(8) for m in (1, 2, 5) if m * 10**e < eval_every}
    running = {"loss": 0.0, "count": 0, "start": 0.0}

    def evaluate(state: TrainState) -> None:
        if state.global_step > 0:
            result.seconds += time.perf_counter() - running["start"]
        with torch.no_grad():
            result.steps.append(state.global_step)
            result.test_log_likelihood.append(model.log_marginal(x_test).mean().item())
        if state.global_step > 0:
            result.train_loss.append(running["loss"] / running["count"])
        running.update(loss=0.0, count=0, start=time.perf_counter())

    hooks = [StepBudget(steps), _RunningLoss(running, num_data),
             EvalSchedule(evaluate, lambda state: state.global_step in schedule, at_end=False)]
    trainer = Trainer(lambda x, index: step(x, index, num_data), x_train, batch_size=batch_size, hooks=hooks,
                      advice=f"Lower the learning rate (now {lr}).")
    with pyro.validation_enabled(False):
        trainer.run(TrainState(generator=torch.Generator().manual_seed(seed)))
    return result


def match_components(locs: torch.Tensor, true_locs: torch.Tensor) -> list[int]:
    """The permutation σ (``σ[k]`` = fitted component matched to true component k) minimising
    Σ_k ‖μ̂_σ(k) - μ_k‖ over all K! permutations: the fit's labels are arbitrary."""
    num_components = true_locs.shape[0]
    best, best_cost = None, math.inf
    for perm in itertools.permutations(range(num_components)):
        cost = (locs[list(perm)] - true_locs).norm(dim=-1).sum().item()
        if cost < best_cost:
            best, best_cost = list(perm), cost
    assert best is not None
    return best


@torch.no_grad()
def fitted_params(model: GaussianMixture, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The current π, μ and Σ of a mixture, detached."""
    return {
        "weights": model.weights(device).detach().clone(),
        "locs": model.locs(device).detach().clone(),
        "covariance_matrices": model.covariance_matrices(device).detach().clone(),
    }


def parameter_errors(params: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Errors of fitted mixture parameters against the truth, after matching the labels
    (:func:`match_components`):

    - ``loc_error``: mean over components of ‖μ̂ - μ‖ (Euclidean);
    - ``covariance_error``: mean over components of ‖Σ̂ - Σ‖_F (Frobenius);
    - ``weight_error``: max over components of |π̂ - π|;
    - ``permutation``: σ, and the fitted parameters reordered to the truth's labels.
    """
    truth = {k: torch.as_tensor(v).to(params["locs"]) for k, v in truth.items() if k in params}
    perm = match_components(params["locs"], truth["locs"])
    matched = {name: value[perm] for name, value in params.items()}
    return {
        "loc_error": (matched["locs"] - truth["locs"]).norm(dim=-1).mean().item(),
        "covariance_error": torch.linalg.matrix_norm(matched["covariance_matrices"] - truth["covariance_matrices"]).mean().item(),
        "weight_error": (matched["weights"] - truth["weights"]).abs().max().item(),
        "permutation": perm,
        "matched": {name: value.cpu().tolist() for name, value in matched.items()},
    }


def mixture_log_likelihood(x: torch.Tensor, params: dict[str, torch.Tensor]) -> float:
    """The log-likelihood of the mixture with the given ``weights``, ``locs`` and
    ``covariance_matrices`` on ``x``, nats per point, by :meth:`GaussianMixture.log_marginal`."""
    model = GaussianMixture(len(params["weights"]), x.shape[1], prefix="_mixture_log_likelihood")
    model.set_params(params["weights"].to(x), params["locs"].to(x), params["covariance_matrices"].to(x))
    with torch.no_grad():
        value = model.log_marginal(x).mean().item()
    store = pyro.get_param_store()
    for name in model.param_names:
        del store[name]
    return value


def points_near_components(x: torch.Tensor, truth: dict[str, torch.Tensor], num: int) -> list[torch.Tensor]:
    """For each true component k, the indices of the ``num`` points of ``x`` with the smallest
    Mahalanobis distance to μ_k under Σ_k."""
    components = torch.distributions.MultivariateNormal(
        truth["locs"].to(x), covariance_matrix=truth["covariance_matrices"].to(x)
    )
    diff = x.unsqueeze(-2) - components.loc
    mahalanobis = torch.linalg.solve_triangular(
        components.scale_tril, diff.unsqueeze(-1), upper=False
    ).squeeze(-1).pow(2).sum(-1)
    assert mahalanobis.shape == (x.shape[0], len(truth["weights"]))
    return [mahalanobis[:, k].topk(num, largest=False).indices for k in range(mahalanobis.shape[1])]


@torch.no_grad()
def ess_limit(log_joint: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    r"""The large-K limit of ESS/K for a discrete z, exactly:
    (E_q w)² / E_q w² = p(x)² / Σ_k p(x, k)² / q_k, with w = p(x, z) / q(z|x).

    :param log_joint: ``(N, K)`` log p(x, z=k).
    :param log_q: ``(N, K)`` log q(z=k|x), or ``(K,)``.
    :return: ``(N,)``, in (0, 1]; 1 iff q(z|x) = p(z|x).
    """
    log_px = torch.logsumexp(log_joint, -1)
    return torch.exp(2 * log_px - torch.logsumexp(2 * log_joint - log_q, -1))


@torch.no_grad()
def proposal_study(
    model: GaussianMixture,
    guide: CategoricalGuide,
    x: torch.Tensor,
    truth: dict[str, torch.Tensor],
    *,
    num_samples: int,
    points_per_component: int,
    training_num_samples: Optional[int] = None,
) -> dict[str, Any]:
    """Who carries p(x), and how many importance samples count, near each true component.

    For the points of ``x`` nearest each true component (:func:`points_near_components`):

    - ``responsibilities[c][k]``: the mean over the group of p(z=k|x) = π_k N(x; μ_k, Σ_k) / p(x),
      the share of p(x) carried by z = k (components relabelled to the truth's order);
    - ``ess_over_k[proposal][c]``: the mean ESS/K, ESS = (Σ w)² / Σ w², of
      :func:`pyrovae.infer.evaluate.importance_sampling` with ``num_samples`` draws from the proposal
      ``prior`` (q = π) or ``guide`` (q = q_φ(z|x)); ``all`` averages over every point of ``x``;
    - ``ess_over_k_limit``: the same, exactly, for K → ∞ (:func:`ess_limit`). Under the prior,
      a point carried by one component c has ESS/K → π_c: only the draws with z = c count;
    - ``ess_over_k_training``: ESS/K with ``training_num_samples`` draws (the K of the training
      objective; ESS >= 1 makes small-K values biased upwards), if given.
    """
    perm = match_components(model.locs(x.device).detach(), truth["locs"].to(x))
    groups = points_near_components(x, truth, points_per_component)
    index = torch.arange(x.shape[0], device=x.device)
    log_joint = model.log_joint(x)
    posterior = torch.softmax(log_joint, -1)[:, perm]
    weights = model.weights(x.device).detach()
    log_q = {"prior": weights.log(), "guide": torch.log_softmax(guide.logits(x), -1)}
    proposals = {"prior": MixturePriorGuide(model), "guide": guide}
    ess, ess_training = {}, {}
    for name, proposal in proposals.items():
        estimate = importance_sampling(
            model, proposal, x, index, x.shape[0], num_samples=num_samples, max_plate_nesting=1
        )
        ess[name] = estimate.ess / num_samples
        if training_num_samples is not None:
            estimate = importance_sampling(
                model, proposal, x, index, x.shape[0], num_samples=training_num_samples, max_plate_nesting=1
            )
            ess_training[name] = estimate.ess / training_num_samples
    limit = {name: ess_limit(log_joint, lq) for name, lq in log_q.items()}
    names = [f"near {COMPONENT_NAMES[c]}" for c in range(len(groups))]

    def by_group(values: torch.Tensor) -> dict[str, float]:
        out = {name: values[g].mean().item() for name, g in zip(names, groups)}
        out["all"] = values.mean().item()
        return out

    results = {
        "groups": names,
        "points_per_component": points_per_component,
        "num_samples": num_samples,
        "responsibilities": {
            name: posterior[g].mean(0).tolist() for name, g in zip(names, groups)
        },
        "prior_weights_matched": weights[perm].tolist(),
        "ess_over_k": {name: by_group(values) for name, values in ess.items()},
        "ess_over_k_limit": {name: by_group(values) for name, values in limit.items()},
    }
    if training_num_samples is not None:
        results["training_num_samples"] = training_num_samples
        results["ess_over_k_training"] = {name: by_group(values) for name, values in ess_training.items()}
    return results


def run_three_ways(
    config: ThreeWaysConfig, dataset: Optional[Dataset] = None
) -> tuple[dict[str, Any], dict[str, Any], Dataset]:
    """Train the mixture by each method from the same k-means initialisation (:func:`kmeans_init`)
    and evaluate.

    :param dataset: the data (default: :func:`pyrovae.data.gaussian_mixture` with the config's
        sizes and seed); it must carry ``truth``.
    :return: ``(results, fitted, dataset)``: the JSON-ready results, per method the model, guide
        and fitted parameters (for figures), and the data.
    """
    device = torch.device(config.device)
    if dataset is None:
        dataset = gaussian_mixture(config.num_train, config.num_test, seed=config.seed, device=device)
    truth = {k: v.to(device) for k, v in dataset.truth.items()}
    x_train, x_test = dataset.train, dataset.test
    num_components, dim = truth["locs"].shape
    generator = torch.Generator().manual_seed(config.seed)
    init_locs = kmeans_init(x_train, num_components, generator)
    init_scale = 1.0

    mle = em_fit(x_train, init_locs, init_scale)
    mle_params = {k: v for k, v in mle.items() if k != "iterations"}
    results: dict[str, Any] = {
        "config": config.to_dict(),
        "question": "How do exact enumeration, IWAE with prior samples and IWAE with an amortized "
        "categorical guide compare for maximum-likelihood fitting of a Gaussian mixture?",
        "truth": {name: value.cpu().tolist() for name, value in truth.items()},
        "truth_test_log_likelihood": mixture_log_likelihood(x_test, truth),
        "init": {"locs": init_locs.cpu().tolist(), "scale": init_scale, "rule": "best of 5 k-means++ seedings + 20 Lloyd steps on the training set; covariances scale² I"},
        "mle_em": {
            "test_log_likelihood": mixture_log_likelihood(x_test, mle_params),
            "parameter_errors": parameter_errors(mle_params, truth),
            "iterations": int(mle["iterations"]),
        },
        "torch_threads": torch.get_num_threads(),
        "methods": {},
    }
    fitted: dict[str, Any] = {}
    for i, method in enumerate(METHODS):
        model = GaussianMixture(
            num_components, dim, learn_weights=config.learn_weights, init_locs=init_locs,
            init_scale=init_scale, prefix=method,
        )
        pyro.set_rng_seed(config.seed + i)
        guide, objective = build_method(
            method, model, config.num_particles, config.hidden_sizes, device,
            detach_prior=config.prior_gradient == "detached",
        )
        run = train_mixture(
            model, guide, objective, x_train, x_test, steps=config.steps, batch_size=config.batch_size,
            lr=config.lr, eval_every=config.eval_every, final_lr_factor=config.final_lr_factor, seed=config.seed,
        )
        params = fitted_params(model, device)
        results["methods"][method] = {
            "label": METHOD_LABELS[method],
            "objective": type(objective).__name__ + ("" if method == "enumeration" else f" (K={config.num_particles})"),
            "test_log_likelihood": run.test_log_likelihood[-1],
            "parameter_errors": parameter_errors(params, truth),
            "distance_to_mle": parameter_errors(params, mle_params),
            "steps": config.steps,
            "seconds": run.seconds,
            "curve": dataclasses.asdict(run),
        }
        fitted[method] = {"model": model, "guide": guide, "params": params}

    pyro.set_rng_seed(config.seed)
    results["proposals"] = proposal_study(
        fitted["guide"]["model"], fitted["guide"]["guide"], x_test, truth,
        num_samples=config.ess_samples, points_per_component=config.points_per_component,
        training_num_samples=config.num_particles,
    )
    results["proposals"]["model"] = "guide"
    return results, fitted, dataset


def save_figures(results: dict[str, Any], fitted: dict[str, Any], dataset: Dataset, out: Any, seed: int = 0) -> list[str]:
    """``fits.png`` (data, learned ellipses next to the truth's, model samples; one panel per
    method), ``curves.png`` (exact held-out log-likelihood per step) and ``proposals.png``
    (responsibilities and ESS/K under prior and guide sampling). Returns the file names."""
    truth = dataset.truth
    truth_ellipses = list(zip(truth["locs"], truth["covariance_matrices"]))
    shown = dataset.train[:1000].cpu()
    pyro.set_rng_seed(seed)
    panels = [{
        "data": shown, "samples": None, "title": "truth", "ellipses": truth_ellipses, "legend_loc": "upper right",
    }]
    for method in METHODS:
        model = fitted[method]["model"]
        params = fitted[method]["params"]
        _, samples = model.sample(500)
        errors = results["methods"][method]["parameter_errors"]
        panels.append({
            "data": shown,
            "samples": samples.cpu(),
            "title": f"{METHOD_LABELS[method]}\nheld-out {results['methods'][method]['test_log_likelihood']:.3f} nats, "
                     f"cov. err {errors['covariance_error']:.2f}",
            "ellipses": list(zip(params["locs"].cpu(), params["covariance_matrices"].cpu())),
            "reference_ellipses": truth_ellipses,
            "legend_loc": "upper right",
        })
    plots.plot_2d_panels(panels, out / "fits.png", ncols=2,
                         title=f"training data (1000 of {dataset.num_train}) and fitted components")

    curves = {
        METHOD_LABELS[m]: (r["curve"]["steps"], r["curve"]["test_log_likelihood"]) for m, r in results["methods"].items()
    }
    truth_ll = results["truth_test_log_likelihood"]
    # Zoom on the second half of the runs that end within 0.1 nats of the truth.
    tail = [truth_ll]
    for r in results["methods"].values():
        steps, values = r["curve"]["steps"], r["curve"]["test_log_likelihood"]
        if abs(values[-1] - truth_ll) < 0.1:
            tail += [v for s, v in zip(steps, values) if s >= steps[-1] / 2]
    pad = max(0.25 * (max(tail) - min(tail)), 0.001)
    mle_ll = results["mle_em"]["test_log_likelihood"]
    tail.append(mle_ll)
    plots.plot_step_curves(
        curves, out / "curves.png", ylabel="exact held-out log p(x) (nats/point)",
        title="learning curves",
        references=[("true parameters", truth_ll), ("maximum likelihood (EM)", mle_ll)],
        zoom_ylim=(min(tail) - pad, max(tail) + pad), log_steps=True,
    )

    study = results["proposals"]
    groups = study["groups"]
    k = study["num_samples"]
    responsibilities = {
        f"z = {COMPONENT_NAMES[j]}": [study["responsibilities"][g][j] for g in groups] for j in range(len(groups))
    }
    ess_groups = groups + ["all"]
    plots.plot_bar_panels([
        {
            "groups": groups, "series": responsibilities, "stacked": True, "ylim": (0, 1.05), "annotate": True,
            "ylabel": "share of p(x): p(z=k|x)", "title": f"who carries p(x)\n({study['points_per_component']} test points nearest each true component)",
        },
        {
            "groups": ess_groups,
            "series": {
                "z ~ prior π̂": [study["ess_over_k"]["prior"][g] for g in ess_groups],
                "z ~ guide q(z|x)": [study["ess_over_k"]["guide"][g] for g in ess_groups],
            },
            "markers": {
                "z ~ prior π̂": [study["ess_over_k_limit"]["prior"][g] for g in ess_groups],
                "z ~ guide q(z|x)": [study["ess_over_k_limit"]["guide"][g] for g in ess_groups],
            },
            "marker_label": "exact K → ∞ limit",
            "ylim": (0, 1.1), "ylabel": f"ESS / K  (K = {k})", "annotate": True,
            "title": "importance samples that count\n(model and guide of method (c))",
        },
    ], out / "proposals.png")
    return ["fits.png", "curves.png", "proposals.png"]
