r"""Reparameterization against the log-derivative trick: bias, variance and signal-to-noise ratio of
three estimators of ∇ELBO, and what they do to training.

The three estimators, all of the same K-particle ELBO (1/K) Σ_k [log p(x, z_k) - log q(z_k|x)]:

- ``reparameterized``: pathwise, z = m + s ε (Pyro ``Trace_ELBO``);
- ``score``: log-derivative trick with no baseline, f ∇ log q (``ScoreFunctionELBO(baseline="none")``);
- ``score-baseline``: (f - b) ∇ log q with b the mean of the other K - 1 particles' f for the same
  data point (leave-one-out, K >= 2) or, for K = 1, an exponential moving average of past batch
  means of f (``ScoreFunctionELBO(baseline="auto")``).

On the linear-Gaussian model z ~ N(0, I_d), x | z ~ N(W z + b, σ² I_D) with a fixed diagonal
Gaussian guide q = N(m, diag s²) the ELBO is analytic,

.. math:: \mathrm{ELBO} = -\frac{\lVert x - W m - b\rVert^2 + \sum_j s_j^2 \lVert W_{:,j}\rVert^2}{2σ^2}
   - \frac D2 \log(2πσ^2) - \frac12 \sum_j (s_j^2 + m_j^2 - 1 - 2 \log s_j),

so its exact gradient wrt (m, log s, W, b) is autograd on :func:`analytic_elbo`, and every estimator's
bias is measured against it. R independent replicates of each estimator come from one vectorized call:
the batch holds R copies of the data point, each with its own guide parameters (a per-datapoint guide)
and its own copy of the decoder (:class:`ReplicatedLinear`), all equal, so copy r's gradient is an
independent draw of the one-point estimator.

On MNIST the same estimators are compared at a fixed, briefly trained VAE (encoder and decoder
parameter groups, no exact gradient: the SNR uses a debiased |mean|), and trained from the same
initialization for the same wall-clock budget.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import pyro
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from pyro.infer import ELBO
from torch import Tensor, nn
from torch.distributions import constraints

from pyrovae.data import Dataset, linear_gaussian
from pyrovae.guides import AmortizedGuide, PerDatapointGuide
from pyrovae.infer.evaluate import importance_sampling
from pyrovae.infer.loop import (
    EvalSchedule,
    Hook,
    StepBudget,
    StepResult,
    TimeBudget,
    Trainer,
    TrainState,
)
from pyrovae.infer.objectives import make_objective
from pyrovae.infer.optim import make_pyro_optimizer
from pyrovae.infer.weights import rng_preserved
from pyrovae.models import VAE
from pyrovae.models.linear_gaussian import linear_gaussian_posterior
from pyrovae.nets import Decoder, GaussianEncoder
from pyrovae.train.step import GradientStep

#: estimator name -> description
ESTIMATORS: dict[str, str] = {
    "reparameterized": "pathwise gradient, z = m + s ε (Pyro Trace_ELBO)",
    "score": "log-derivative trick, no baseline: f ∇log q",
    "score-baseline": "log-derivative trick with a baseline: leave-one-out mean of the other "
    "particles' f (K >= 2), moving average of past batch means of f (K = 1)",
}
LINEAR_GROUPS: tuple[str, ...] = ("guide loc", "guide log-scale", "decoder")
VAE_GROUPS: tuple[str, ...] = ("encoder", "decoder")


def baseline_name(estimator: str, num_particles: int) -> str:
    """The baseline an estimator uses with ``num_particles`` particles."""
    if estimator != "score-baseline":
        return "none"
    return "leave-one-out" if num_particles > 1 else "moving-average"


def make_estimator(estimator: str, num_particles: int) -> ELBO:
    """The Pyro objective whose gradient is the named estimator of ∇ELBO with K particles."""
    if estimator == "reparameterized":
        return make_objective("elbo", num_particles)
    if estimator == "score":
        return make_objective("score", num_particles, baseline="none")
    if estimator == "score-baseline":
        return make_objective("score", num_particles, baseline="auto")
    if estimator in ("elbo-stl", "iwae", "iwae-stl", "iwae-dreg"):
        return make_objective(estimator, num_particles)
    raise ValueError(f"unknown estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Set torch's default dtype inside the block, restoring it afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ------------------------------------------------------------------------------------------------
# statistics of replicated gradients


def gradient_statistics(
    grads: Tensor,
    exact: Optional[Tensor] = None,
    reference: Optional[tuple[Tensor, Tensor]] = None,
    chunk: int = 16384,
) -> tuple[dict[str, float], Tensor, Tensor]:
    """Variance, signal-to-noise ratio and bias of R independent replicates of a gradient.

    - ``variance``: the per-coordinate sample variance, averaged over the n coordinates;
      ``variance_se`` its standard error from the spread of the per-replicate squared deviations
      u_r = (1/n) Σ_i (g_ri - ḡ_i)² (valid for any tails with a finite fourth moment; for Gaussian
      gradients it reduces to the F-test's sqrt(2/(R-1)) relative error).
    - ``snr``: |E g_i| / sd(g_i) averaged over coordinates, with E g the ``exact`` gradient when
      given, else the debiased sqrt(max(ḡ_i² - se_i², 0)); ``snr_pooled`` = ‖E g‖ / sqrt(Σ_i var_i),
      which coordinates with a near-zero variance cannot dominate.
    - with ``exact``: ``max_abs_z`` = max_i |ḡ_i - g*_i| / se_i, ``frac_abs_z_gt_3`` (0.0027 expected
      for an unbiased estimator), ``relative_bias`` = ‖ḡ - g*‖ / ‖g*‖ and ``power`` =
      max_i |g*_i| / se_i (how many SEs the largest true coordinate is: a bias check with power
      needs it well above 5).
    - with ``reference = (mean, se)`` of another estimator: the same z statistics against it.

    :param grads: ``(R, n)``.
    :return: the statistics, and the per-coordinate mean and standard error ``(n,)``.
    """
    num_replicates, num_coords = grads.shape
    if num_replicates < 3:
        raise ValueError(f"need at least 3 replicates to estimate a variance, got {num_replicates}")
    mean = torch.empty(num_coords, dtype=torch.float64, device=grads.device)
    var = torch.empty_like(mean)
    sq_dev = torch.zeros(num_replicates, dtype=torch.float64, device=grads.device)
    for start in range(0, num_coords, chunk):
        block = grads[:, start : start + chunk].double()
        block_mean = block.mean(0)
        dev2 = (block - block_mean) ** 2
        mean[start : start + chunk] = block_mean
        var[start : start + chunk] = dev2.sum(0) / (num_replicates - 1)
        sq_dev += dev2.sum(1)
    u = sq_dev / num_coords
    correction = num_replicates / (num_replicates - 1)
    sd = var.sqrt()
    se = sd / math.sqrt(num_replicates)
    live = sd > 0
    stats: dict[str, float] = {
        "num_coords": int(num_coords),
        "num_replicates": int(num_replicates),
        "variance": var.mean().item(),
        "variance_se": (correction * u.std() / math.sqrt(num_replicates)).item(),
    }
    if exact is not None:
        exact = exact.double().to(grads.device)
        z = (mean - exact)[live] / se[live]
        stats.update(
            snr=(exact.abs()[live] / sd[live]).mean().item(),
            snr_pooled=(exact.norm() / var.sum().sqrt()).item(),
            max_abs_z=z.abs().max().item(),
            frac_abs_z_gt_3=(z.abs() > 3).double().mean().item(),
            relative_bias=((mean - exact).norm() / exact.norm()).item(),
            power=(exact.abs()[live] / se[live]).max().item(),
            exact_rms=exact.pow(2).mean().sqrt().item(),
        )
    else:
        signal = (mean**2 - se**2).clamp(min=0).sqrt()
        stats["snr"] = (signal[live] / sd[live]).mean().item()
        stats["snr_pooled"] = ((mean**2 - se**2).sum().clamp(min=0).sqrt() / var.sum().sqrt()).item()
    if reference is not None:
        ref_mean, ref_se = reference
        scale = (se**2 + ref_se**2).sqrt()
        ok = scale > 0
        z = (mean - ref_mean)[ok] / scale[ok]
        stats.update(
            max_abs_z_vs_reference=z.abs().max().item(),
            frac_abs_z_gt_3_vs_reference=(z.abs() > 3).double().mean().item(),
        )
    return stats, mean, se


def log_variance_ratio(a: dict[str, float], b: dict[str, float]) -> tuple[float, float]:
    """log(variance_a / variance_b) and its z statistic (delta method on the two independent
    variance estimates, with the SEs of :func:`gradient_statistics`)."""
    log_ratio = math.log(a["variance"] / b["variance"])
    se = math.hypot(a["variance_se"] / a["variance"], b["variance_se"] / b["variance"])
    return log_ratio, log_ratio / se


# ------------------------------------------------------------------------------------------------
# the linear-Gaussian model: exact gradients and replicated estimators


def analytic_elbo(
    x: Tensor, loc: Tensor, log_scale: Tensor, weight: Tensor, bias: Tensor, noise_scale: float
) -> Tensor:
    r"""The ELBO of the linear-Gaussian model for q = N(loc, diag exp(log_scale)²), per row of x:
    E_q log N(x; W z + b, σ² I) - KL(q ‖ N(0, I)), both in closed form.

    :param x: ``(P, D)``; ``loc``, ``log_scale``: ``(P, d)``; ``weight``: ``(D, d)``; ``bias``: ``(D,)``.
    :return: ``(P,)``.
    """
    x_dim = x.shape[-1]
    scale_sq = torch.exp(2 * log_scale)
    resid = x - loc @ weight.T - bias
    trace = (scale_sq * (weight**2).sum(0)).sum(-1)  # tr(Wᵀ W diag s²)
    expected_log_lik = -0.5 * ((resid**2).sum(-1) + trace) / noise_scale**2 - 0.5 * x_dim * math.log(
        2 * math.pi * noise_scale**2
    )
    kl = 0.5 * (scale_sq + loc**2 - 1 - 2 * log_scale).sum(-1)
    assert expected_log_lik.shape == kl.shape == (x.shape[0],)
    return expected_log_lik - kl


@dataclass
class LinearGaussianProblem:
    """P data points of a linear-Gaussian model and a fixed, mis-fit diagonal Gaussian guide q_p.

    :ivar x: ``(P, D)``.
    :ivar weight: W ``(D, d)``; ``bias``: b ``(D,)``; ``noise_scale``: σ.
    :ivar loc: guide means ``(P, d)``; ``scale``: guide standard deviations ``(P, d)``.
    """

    x: Tensor
    weight: Tensor
    bias: Tensor
    noise_scale: float
    loc: Tensor
    scale: Tensor

    @classmethod
    def make(
        cls,
        z_dim: int,
        x_dim: int = 64,
        num_points: int = 1,
        noise_scale: float = 0.5,
        seed: int = 0,
        shift: float = 0.8,
        widen: float = 1.4,
        device: str | torch.device = "cpu",
    ) -> "LinearGaussianProblem":
        """Data from :func:`pyrovae.data.linear_gaussian` (W, b ~ N(0, 1)) and the guide
        m = posterior mean ± ``shift`` posterior sds (alternating signs), s = ``widen`` posterior sds.
        Tensors in the default dtype."""
        ds = linear_gaussian(
            num_train=num_points, num_test=1, x_dim=x_dim, z_dim=z_dim, noise_scale=noise_scale, seed=seed
        )
        dtype = torch.get_default_dtype()
        x = ds.train.to(device, dtype)
        weight = ds.truth["weight"].to(device, dtype)
        bias = ds.truth["bias"].to(device, dtype)
        posterior = linear_gaussian_posterior(x, weight, bias, noise_scale)
        post_sd = posterior.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
        signs = torch.tensor([(-1.0) ** j for j in range(z_dim)], device=device, dtype=dtype)
        loc = posterior.loc + shift * post_sd * signs
        return cls(x, weight, bias, float(noise_scale), loc, widen * post_sd)

    @property
    def num_points(self) -> int:
        return self.x.shape[0]

    @property
    def z_dim(self) -> int:
        return self.weight.shape[1]

    def elbo(self) -> Tensor:
        """The exact ELBO Σ_p ELBO_p / P (per data point) at the fixed guide."""
        return analytic_elbo(self.x, self.loc, self.scale.log(), self.weight, self.bias, self.noise_scale).mean()

    def exact_gradients(self) -> dict[str, Tensor]:
        """∇ of the per-point ELBO (1/P) Σ_p ELBO_p wrt guide loc, guide log-scale and the decoder
        (W then b, flattened), by autograd on :func:`analytic_elbo`."""
        params = [
            t.detach().clone().requires_grad_(True)
            for t in (self.loc, self.scale.log(), self.weight, self.bias)
        ]
        elbo = analytic_elbo(self.x, *params, self.noise_scale).mean()
        d_loc, d_log_scale, d_weight, d_bias = torch.autograd.grad(elbo, params)
        return {
            "guide loc": d_loc.reshape(-1),
            "guide log-scale": d_log_scale.reshape(-1),
            "decoder": torch.cat([d_weight.reshape(-1), d_bias]),
        }


class ReplicatedLinear(nn.Module):
    """R independent copies of the linear map z -> W z + b for a batch of R·P rows, rows
    r·P .. r·P + P - 1 using copy r: the gradient wrt copy r is replicate r of the estimator.

    :param weight: W ``(D, d)``, copied R times; ``bias``: b ``(D,)``.
    """

    def __init__(self, weight: Tensor, bias: Tensor, num_replicates: int, points_per_replicate: int) -> None:
        super().__init__()
        self.num_replicates = int(num_replicates)
        self.points = int(points_per_replicate)
        self.weight = nn.Parameter(weight.detach().expand(num_replicates, *weight.shape).clone())
        self.bias = nn.Parameter(bias.detach().expand(num_replicates, *bias.shape).clone())

    def forward(self, z: Tensor) -> Tensor:
        batch, rows, z_dim = z.shape[:-2], z.shape[-2], z.shape[-1]
        assert rows == self.num_replicates * self.points, (rows, self.num_replicates, self.points)
        z = z.reshape(*batch, self.num_replicates, self.points, z_dim)
        out = torch.einsum("...rpj,rij->...rpi", z, self.weight) + self.bias.unsqueeze(-2)
        return out.reshape(*batch, rows, self.weight.shape[1])


def linear_gaussian_gradients(
    problem: LinearGaussianProblem,
    estimator: str,
    num_particles: int,
    num_replicates: int,
) -> dict[str, Tensor]:
    """R independent draws of an estimator of ∇ (1/P) Σ_p ELBO_p, from one vectorized call.

    Uses :class:`~pyrovae.models.VAE` with a Gaussian likelihood and a :class:`ReplicatedLinear`
    decoder, and a :class:`~pyrovae.guides.PerDatapointGuide` holding R copies of the fixed guide.
    For the moving-average baseline (K = 1) one warm-up call sets the average first: the baseline
    of the measured call is then the batch mean of f from an independent earlier draw.
    Clears Pyro's param store.

    :return: group -> ``(R, n)`` gradients of the ELBO (not the loss).
    """
    num_points, z_dim = problem.num_points, problem.z_dim
    rows = num_replicates * num_points
    pyro.clear_param_store()
    pyro.param("local.z_loc", problem.loc.repeat(num_replicates, 1).clone())
    pyro.param("local.z_scale", problem.scale.repeat(num_replicates, 1).clone(), constraint=constraints.positive)
    guide = PerDatapointGuide(rows, z_dim)
    decoder = ReplicatedLinear(problem.weight, problem.bias, num_replicates, num_points)
    model = VAE(decoder, z_dim, likelihood="gaussian", x_scale=problem.noise_scale)
    x = problem.x.repeat(num_replicates, 1)
    objective = make_estimator(estimator, num_particles)
    if baseline_name(estimator, num_particles) == "moving-average":
        objective.differentiable_loss(model, guide, x)
    loss = objective.differentiable_loss(model, guide, x)
    store = dict(pyro.get_param_store().named_parameters())
    params = [store["local.z_loc"], store["local.z_scale"], decoder.weight, decoder.bias]
    grads = torch.autograd.grad(-loss / num_points, params)
    d_loc, d_log_scale, d_weight, d_bias = (g.detach() for g in grads)
    return {
        "guide loc": d_loc.reshape(num_replicates, num_points * z_dim),
        "guide log-scale": d_log_scale.reshape(num_replicates, num_points * z_dim),
        "decoder": torch.cat([d_weight.reshape(num_replicates, -1), d_bias], dim=1),
    }


def linear_gaussian_study(
    dims: Sequence[int],
    particles: Sequence[int],
    num_replicates: int,
    x_dim: int = 64,
    num_points: int = 1,
    noise_scale: float = 0.5,
    seed: int = 0,
    device: str = "cpu",
    estimators: Sequence[str] = tuple(ESTIMATORS),
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Bias, variance and SNR of every estimator for every latent dimension d and particle count K,
    against the exact gradient (float64).

    :return: ``{"runs": [...], ...}``; each run has ``z_dim``, ``num_particles``, ``estimator``,
        ``baseline``, ``seconds`` and ``groups`` (group -> :func:`gradient_statistics`).
    """
    runs = []
    problems = {}
    with default_dtype(torch.float64):
        for z_dim in dims:
            problem = LinearGaussianProblem.make(z_dim, x_dim, num_points, noise_scale, seed + z_dim, device=device)
            exact = problem.exact_gradients()
            problems[z_dim] = {"elbo": problem.elbo().item(), "exact_rms": {g: v.pow(2).mean().sqrt().item() for g, v in exact.items()}}
            for num_particles in particles:
                for e, estimator in enumerate(estimators):
                    pyro.set_rng_seed(seed + 1000 * z_dim + 10 * num_particles + e)
                    start = time.perf_counter()
                    grads = linear_gaussian_gradients(problem, estimator, num_particles, num_replicates)
                    groups = {g: gradient_statistics(grads[g], exact[g])[0] for g in LINEAR_GROUPS}
                    runs.append(
                        {
                            "z_dim": z_dim,
                            "num_particles": num_particles,
                            "estimator": estimator,
                            "baseline": baseline_name(estimator, num_particles),
                            "seconds": time.perf_counter() - start,
                            "groups": groups,
                        }
                    )
                    if progress is not None:
                        worst = max(s["max_abs_z"] for s in groups.values())
                        progress(f"d={z_dim} K={num_particles} {estimator}: max|z|={worst:.2f} "
                                 + " ".join(f"{g}={s['variance']:.3g}" for g, s in groups.items()))
    pyro.clear_param_store()
    return {
        "x_dim": x_dim,
        "num_points": num_points,
        "noise_scale": noise_scale,
        "num_replicates": num_replicates,
        "guide": "m = posterior mean ± 0.8 posterior sd (alternating signs), s = 1.4 posterior sd",
        "problems": {str(d): v for d, v in problems.items()},
        "runs": runs,
    }


# ------------------------------------------------------------------------------------------------
# MNIST


def build_vae(x_dim: int, z_dim: int, hidden: Sequence[int], seed: int, device: str = "cpu") -> tuple[VAE, AmortizedGuide]:
    """A Bernoulli VAE and its amortized Gaussian guide, initialized from ``seed``
    (so every estimator starts from the same networks). Clears Pyro's param store."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    decoder = Decoder(z_dim, x_dim, hidden).to(device)
    encoder = GaussianEncoder(x_dim, z_dim, hidden).to(device)
    return VAE(decoder, z_dim, likelihood="bernoulli"), AmortizedGuide(encoder)


@torch.no_grad()
def heldout_elbo(model: VAE, guide: AmortizedGuide, x: Tensor, num_samples: int = 1) -> tuple[float, float]:
    """Monte Carlo ELBO per test point (mean of ``num_samples`` draws per point) averaged over
    the points of ``x``, and its standard error over points."""
    index = torch.arange(x.shape[0], device=x.device)
    elbo = importance_sampling(model, guide, x, index, x.shape[0], num_samples=num_samples).elbo
    return elbo.mean().item(), (elbo.std() / math.sqrt(len(elbo))).item()


class _RunningBound(Hook):
    # The mean per-point training bound of the steps since the last record.
    def __init__(self, running: dict[str, Any], num_data: int) -> None:
        self.running, self.num_data = running, num_data

    def on_step_end(self, trainer: Trainer, state: TrainState, result: StepResult) -> None:
        self.running["total"] += -result.loss / self.num_data
        self.running["count"] += 1


def train_for(
    model: VAE,
    guide: AmortizedGuide,
    dataset: Dataset,
    x_test: Tensor,
    objective: ELBO,
    *,
    seconds: float = float("inf"),
    max_steps: Optional[int] = None,
    batch_size: int = 100,
    lr: float = 1e-3,
    eval_every: float = float("inf"),
    seed: int = 0,
    clock: str = "cpu",
) -> dict[str, list]:
    """Adam on shuffled, dynamically binarized minibatches until ``seconds`` of training time
    (the clock runs during steps only, not during evaluations) or ``max_steps`` steps: a
    :class:`~pyrovae.infer.loop.Trainer` with a time or step budget and an evaluation schedule.

    ``clock="cpu"`` budgets the process's CPU time (on one thread, the wall-clock time the run
    would take on an idle core: fair between runs when other jobs share the machine);
    ``clock="wall"`` budgets wall-clock time.

    Every ``eval_every`` seconds of training and at the end it records the training time (wall
    clock and process CPU time), the step count, the mean training bound since the last record
    and the test ELBO (one draw per test point, from a forked random stream).

    :return: lists ``seconds``, ``cpu_seconds``, ``steps``, ``train_bound``, ``test_elbo``.
    """
    if not math.isfinite(seconds) and max_steps is None:
        raise ValueError("give a time budget (seconds) or max_steps")
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")
    device = dataset.train.device
    num_data = dataset.num_train
    pyro.set_rng_seed(seed)
    step = GradientStep(model, guide, objective, make_pyro_optimizer(lr))
    history: dict[str, list] = {"seconds": [], "cpu_seconds": [], "steps": [], "train_bound": [], "test_elbo": []}
    running = {"total": 0.0, "count": 0, "next": eval_every}

    def spent(state: TrainState) -> float:
        return state.step_cpu_seconds if clock == "cpu" else state.step_seconds

    def record(state: TrainState) -> None:
        history["seconds"].append(state.step_seconds)
        history["cpu_seconds"].append(state.step_cpu_seconds)
        history["steps"].append(state.global_step)
        history["train_bound"].append(running["total"] / running["count"] if running["count"] else None)
        # Evaluation draws come from a forked RNG, so the training trajectory does not depend on
        # when (on the clock) the evaluations happen.
        with pyro.validation_enabled(False), rng_preserved():
            history["test_elbo"].append(heldout_elbo(model, guide, x_test)[0])
        running.update(total=0.0, count=0)

    def due(state: TrainState) -> bool:
        if state.stop is None and spent(state) < running["next"]:
            return False
        running["next"] += eval_every
        return True

    budgets = ([TimeBudget(seconds, clock)] if math.isfinite(seconds) else []) + (
        [StepBudget(max_steps)] if max_steps is not None else [])
    hooks = [*budgets, _RunningBound(running, num_data), EvalSchedule(record, due, at_end=False)]
    trainer = Trainer(lambda x, index: step(x, index, num_data), dataset.train, batch_size=batch_size,
                      prepare=dataset.batch, hooks=hooks,
                      advice=f"Lower lr (now {lr}).")
    with pyro.validation_enabled(False):
        trainer.run(TrainState(generator=torch.Generator(device=device).manual_seed(seed)))
    return history


def network_gradients(
    model: VAE,
    guide: AmortizedGuide,
    x: Tensor,
    estimator: str,
    num_particles: int,
    num_replicates: int,
    warmup: int = 10,
) -> dict[str, Tensor]:
    """R independent draws of an estimator of ∇ of the batch's per-point ELBO wrt the encoder and
    the decoder, at the networks' current weights (one call each; nothing is updated).

    For the moving-average baseline (K = 1), ``warmup`` calls first bring the average to the
    batch's mean f; each later draw uses the average of earlier, independent draws.

    :return: group -> ``(R, n)`` float32 gradients of the ELBO.
    """
    objective = make_estimator(estimator, num_particles)
    if baseline_name(estimator, num_particles) == "moving-average":
        for _ in range(warmup):
            objective.differentiable_loss(model, guide, x)
    out: dict[str, list[Tensor]] = {group: [] for group in VAE_GROUPS}
    for _ in range(num_replicates):
        loss = objective.differentiable_loss(model, guide, x) / x.shape[0]
        modules = {"encoder": guide.encoder, "decoder": model.decoder}
        params = [p for group in VAE_GROUPS for p in modules[group].parameters()]
        grads = torch.autograd.grad(-loss, params)
        start = 0
        for group in VAE_GROUPS:
            n = len(list(modules[group].parameters()))
            out[group].append(torch.cat([g.reshape(-1) for g in grads[start : start + n]]).float())
            start += n
    return {group: torch.stack(v) for group, v in out.items()}


def mnist_variance_study(
    model: VAE,
    guide: AmortizedGuide,
    x: Tensor,
    particles: Sequence[int],
    num_replicates: int,
    seed: int = 0,
    estimators: Sequence[str] = tuple(ESTIMATORS),
    progress: Optional[Callable[[str], None]] = None,
) -> list[dict[str, Any]]:
    """Variance and SNR of each estimator's encoder and decoder gradients at the current weights
    on the fixed batch ``x``; score estimators are also z-tested against the reparameterized mean
    (no exact gradient here)."""
    runs = []
    with pyro.validation_enabled(False):
        for num_particles in particles:
            reference: dict[str, tuple[Tensor, Tensor]] = {}
            for e, estimator in enumerate(estimators):
                pyro.set_rng_seed(seed + 10 * num_particles + e)
                start = time.perf_counter()
                grads = network_gradients(model, guide, x, estimator, num_particles, num_replicates)
                groups = {}
                for group in VAE_GROUPS:
                    stats, mean, se = gradient_statistics(grads[group], reference=reference.get(group))
                    if estimator == "reparameterized":
                        reference[group] = (mean, se)
                    groups[group] = stats
                del grads
                runs.append(
                    {
                        "num_particles": num_particles,
                        "estimator": estimator,
                        "baseline": baseline_name(estimator, num_particles),
                        "seconds": time.perf_counter() - start,
                        "groups": groups,
                    }
                )
                if progress is not None:
                    progress(f"MNIST K={num_particles} {estimator}: "
                             + " ".join(f"{g} var={s['variance']:.3g} snr={s['snr']:.3g}" for g, s in groups.items()))
    return runs


# ------------------------------------------------------------------------------------------------
# figures (Agg canvas, no pyplot, as in pyrovae.app.plots)

COLORS = {"reparameterized": "tab:blue", "score": "tab:red", "score-baseline": "tab:green"}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Any) -> None:
    try:
        fig.savefig(path, format="png", dpi=100)
    finally:
        fig.clear()


def run_label(estimator: str, num_particles: int) -> str:
    """A legend label naming the estimator and, for score-baseline, which baseline K gives it."""
    base = baseline_name(estimator, num_particles)
    return estimator if base == "none" else f"score + {base} baseline"


LEGEND = {
    "reparameterized": "reparameterized (pathwise)",
    "score": "score function, no baseline",
    "score-baseline": "score function + baseline (moving average for K = 1, leave-one-out for K ≥ 2)",
}


def _log_axes(ax: Any) -> None:
    """Log y axis, call after plotting: minor tick labels only when the axis spans under a decade."""
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    if high / low >= 10:
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.15)


def _figure_legend(fig: Figure, ncol: Optional[int] = None) -> None:
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol or len(labels), fontsize=9, frameon=False)


def plot_linear_gaussian(study: dict[str, Any], key: str, path: Any, ylabel: str, title: str) -> None:
    """One panel per (K, group): ``key`` (``variance`` or ``snr``) against d, log-log, one line
    per estimator; variance panels show ±2 SE bars."""
    runs = study["runs"]
    particles = sorted({r["num_particles"] for r in runs})
    dims = sorted({r["z_dim"] for r in runs})
    fig = _figure(4.0 * len(LINEAR_GROUPS), 3.0 * len(particles))
    axes = fig.subplots(len(particles), len(LINEAR_GROUPS), squeeze=False, sharex=True)
    for i, num_particles in enumerate(particles):
        for j, group in enumerate(LINEAR_GROUPS):
            ax = axes[i][j]
            for estimator in ESTIMATORS:
                sel = sorted((r for r in runs if r["num_particles"] == num_particles and r["estimator"] == estimator),
                             key=lambda r: r["z_dim"])
                if not sel:
                    continue
                xs = [r["z_dim"] for r in sel]
                ys = [r["groups"][group][key] for r in sel]
                err = [2 * r["groups"][group]["variance_se"] for r in sel] if key == "variance" else None
                ax.errorbar(xs, ys, yerr=err, marker="o", markersize=4, capsize=2, color=COLORS[estimator],
                            label=LEGEND[estimator])
            ax.set_xscale("log", base=2)
            _log_axes(ax)
            ax.set_xticks(dims, [str(d) for d in dims])
            note = " (all three coincide)" if group == "decoder" else ""
            ax.set_title(f"{group}, K = {num_particles}{note}", fontsize=10)
            if i == len(particles) - 1:
                ax.set_xlabel("latent dimension d")
            if j == 0:
                ax.set_ylabel(ylabel)
    _figure_legend(fig)
    fig.suptitle(title)
    _save(fig, path)


def plot_mnist_variance(runs: list[dict[str, Any]], path: Any, title: str) -> None:
    """Variance (top) and SNR (bottom) of encoder and decoder gradients against K."""
    fig = _figure(10.0, 7.0)
    axes = fig.subplots(2, len(VAE_GROUPS), squeeze=False, sharex=True)
    for j, group in enumerate(VAE_GROUPS):
        for i, key in enumerate(("variance", "snr")):
            ax = axes[i][j]
            for estimator in ESTIMATORS:
                sel = sorted((r for r in runs if r["estimator"] == estimator), key=lambda r: r["num_particles"])
                if not sel:
                    continue
                xs = [r["num_particles"] for r in sel]
                ys = [r["groups"][group][key] for r in sel]
                ax.plot(xs, ys, marker="o", color=COLORS[estimator], label=LEGEND[estimator])
            ax.set_xscale("log", base=2)
            _log_axes(ax)
            ks = sorted({r["num_particles"] for r in runs})
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.set_title(f"{group}: {'mean per-coordinate variance' if key == 'variance' else 'mean SNR |E g| / sd(g)'}",
                         fontsize=10)
            if i == 1:
                ax.set_xlabel("particles K")
    _figure_legend(fig, ncol=2)
    fig.suptitle(title)
    _save(fig, path)


def plot_training(runs: list[dict[str, Any]], path: Any, title: str, clock: str = "cpu") -> None:
    """Test ELBO against training time on the budget's clock (left) and against Adam steps (right):
    one colour per configuration (``run["label"]``), one line style per seed (``run["seed"]``).

    The vertical axis covers the runs that kept improving; a run that fell far below them leaves
    the chart, and every legend entry gives the run's final test ELBO."""
    fig = _figure(12.0, 5.6)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    palette = ["tab:blue", "tab:green", "tab:olive", "tab:orange", "tab:purple", "tab:brown"]
    styles = ["-", "--", ":", "-."]
    labels = list(dict.fromkeys(r["label"] for r in runs))
    seeds = list(dict.fromkeys(r.get("seed", 0) for r in runs))
    time_key = "cpu_seconds" if clock == "cpu" else "seconds"
    best = max(r["final_test_elbo"] for r in runs)
    shown = [v for r in runs for v in r["history"]["test_elbo"][1:] if v >= best - 100.0]
    for run in runs:
        h = run["history"]
        color = palette[labels.index(run["label"]) % len(palette)]
        style = styles[seeds.index(run.get("seed", 0)) % len(styles)]
        label = f"{run['label']}, seed {run.get('seed', 0)}: final {run['final_test_elbo']:.1f}"
        for ax, xkey in zip(axes, (time_key, "steps")):
            ax.plot(h[xkey], h["test_elbo"], linestyle=style, marker="o", markersize=2.5, color=color, label=label)
    for ax, xlabel in zip(axes, (f"training time (s, {'process CPU' if clock == 'cpu' else 'wall clock'})", "Adam steps")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test ELBO (nats per image)")
        ax.grid(True, alpha=0.3)
        if shown:
            low, high = min(shown), max(shown)
            ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    _figure_legend(fig, ncol=2)
    fig.suptitle(title)
    _save(fig, path)
