# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. The ELBO, the gap = KL, and two ways to differentiate it
#
# For any distribution q(z | x), Jensen's inequality gives the **evidence lower bound**
#
#     ELBO(q) = E_q[log p(x, z) − log q(z | x)] ≤ log p(x),
#
# and the gap is exactly a KL divergence to the true posterior:
#
#     log p(x) − ELBO(q) = KL(q(z | x) ‖ p(z | x)).
#
# So maximising the ELBO over q *is* posterior inference, and maximising it over the model's
# parameters is approximate maximum likelihood. A VAE does both at once, with q an encoder network.
#
# We check the identity numerically on the one model where every term is known in closed form, the
# **linear-Gaussian model** z ~ N(0, I), x | z ~ N(Wz + b, σ²I) (`pyrovae.LinearGaussian`, with
# exact `log_marginal(x)` and `posterior(x)`). Then we compare the two gradient estimators of the
# ELBO: the **reparameterization** (pathwise) trick z = m + s·ε, and the **log-derivative**
# (score-function, REINFORCE) trick (f − b)·∇ log q, and finally train the same VAE with each.

# %%
import math
import os
import time

import matplotlib.pyplot as plt
import pyro
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from pyrovae import (
    AmortizedGuide,
    ExactPosteriorGuide,
    GaussianEncoder,
    LinearGaussian,
    PerDatapointGuide,
    fit,
    importance_sampling,
    linear_gaussian,
    make_objective,
)
from pyrovae.infer.loop import Hook

SMALL = os.environ.get("PYROVAE_TUTORIAL_SMALL") == "1"  # CI-sized settings
HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else "."
FIGURES = os.environ.get("PYROVAE_TUTORIAL_FIGURES", os.path.join(HERE, "figures"))  # the tests write elsewhere
os.makedirs(FIGURES, exist_ok=True)
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)  # exact identities are checked to 1e-6
pyro.set_rng_seed(0)
start_time = time.time()

NUM_POINTS = 100 if SMALL else 500
ELBO_SAMPLES = 200 if SMALL else 2000    # Monte Carlo draws per point for the ELBO
REPLICATES = 500 if SMALL else 4000      # independent gradient estimates
GRAD_KS = [2, 8] if SMALL else [2, 4, 8, 16, 32]
EPOCHS = 3 if SMALL else 150
X_DIM, Z_DIM, LR = 20, 5, 5e-3      # the VAE of the last section

# %% [markdown]
# ## The gap is the KL
#
# `LinearGaussian.random` builds a model and draws points from it. `ExactPosteriorGuide(model)`
# is q = p(z | x) itself; with a `transform` it is a Gaussian we perturb on purpose, so that
# KL(q ‖ p(z | x)) is known in closed form (`torch.distributions.kl_divergence`). Four guides:
#
# * **exact**: q = p(z | x), so the gap should be 0 for every single draw;
# * **shifted**: the posterior moved by one posterior standard deviation in every coordinate;
# * **widened**: the posterior with twice its standard deviations;
# * **mean-field**: the best *factorised* Gaussian, N(μ, diag(1/Λ_jj)) with Λ the posterior
#   precision. It is the KL-optimal diagonal q, and still has a gap because p(z | x) is correlated.
#
# For each we compute the ELBO twice: by pyrovae's Monte Carlo estimator (`importance_sampling(...)
# .elbo`, the average of log w = log p(x, z) − log q(z | x) over draws, with its standard error) and
# in closed form, E_q[log p(x | z)] − KL(q ‖ p(z)) (both terms are Gaussian integrals).

# %%
model, x = LinearGaussian.random(z_dim=2, x_dim=10, num_points=NUM_POINTS, noise_scale=1.0, seed=0)
index = torch.arange(NUM_POINTS)
W, b, sigma = model.decoder.weight.detach(), model.decoder.bias.detach(), 1.0
with torch.no_grad():
    log_px = model.log_marginal(x)
    posterior = model.posterior(x)
prior = MultivariateNormal(torch.zeros(2), torch.eye(2))


def shifted(post):
    return MultivariateNormal(post.loc + post.variance.sqrt(), scale_tril=post.scale_tril)


def widened(post):
    return MultivariateNormal(post.loc, scale_tril=2 * post.scale_tril)


def mean_field(post):
    return MultivariateNormal(post.loc, covariance_matrix=torch.diag_embed(1 / torch.diagonal(post.precision_matrix, dim1=-2, dim2=-1)))


def expected_log_likelihood(q):
    """E_q[log p(x | z)] for q = N(m, S): −(‖x − Wm − b‖² + tr(W S Wᵀ)) / 2σ² − (D/2) log 2πσ²."""
    residual = x - q.loc @ W.T - b
    trace = torch.einsum("ij,bjk,ik->b", W, q.covariance_matrix, W)
    return -(residual.pow(2).sum(-1) + trace) / (2 * sigma**2) - x.shape[1] / 2 * math.log(2 * math.pi * sigma**2)


guides = {"exact": None, "shifted": shifted, "widened": widened, "mean-field": mean_field}
gap_results = {}
print(f"exact log p(x), mean over {NUM_POINTS} points: {log_px.mean():.4f}")
print("guide        ELBO (closed)   ELBO (MC) ± SE        KL(q‖p(z|x))   max|log p − ELBO − KL|   (ELBO_MC + KL − log p)/SE")
for name, transform in guides.items():
    guide = ExactPosteriorGuide(model, transform)
    with torch.no_grad():
        q = guide.distribution(x)
        kl_post = kl_divergence(q, posterior)                                     # (N,), closed form
        elbo_closed = expected_log_likelihood(q) - kl_divergence(q, prior)
        est = importance_sampling(model, guide, x, index, NUM_POINTS, num_samples=ELBO_SAMPLES)
    residual = (log_px - elbo_closed - kl_post).abs().max()
    se = est.elbo_se.pow(2).sum().sqrt() / NUM_POINTS                                # SE of the mean ELBO
    difference = est.elbo.mean() + kl_post.mean() - log_px.mean()
    z_score = difference / se if se > 1e-9 else difference / 1e-9  # q = p(z|x): no Monte Carlo error at all
    gap_results[name] = dict(kl=kl_post, elbo_mc=est.elbo, elbo_closed=elbo_closed, residual=float(residual),
                             z=float(z_score), se=float(se), max_elbo_sd=float(est.elbo_se.max() * math.sqrt(ELBO_SAMPLES)))
    print(f"{name:11s} {elbo_closed.mean():13.4f}   {est.elbo.mean():10.4f} ± {se:.4f}   {kl_post.mean():13.4f}"
          f"   {residual:22.2e}   {z_score:12.2f}")
print(f"exact posterior: largest per-point sd of log w over draws = {gap_results['exact']['max_elbo_sd']:.1e}")

fig, ax = plt.subplots(figsize=(5.5, 5))
for name, r in gap_results.items():
    ax.scatter(r["kl"], log_px - r["elbo_mc"], s=6, label=name)
top = max(float(r["kl"].max()) for r in gap_results.values())
ax.plot([0, top], [0, top], color="black", lw=1, ls="--", label="gap = KL")
ax.set_xlabel("KL(q(z|x) ‖ p(z|x)), closed form (nats)")
ax.set_ylabel(f"log p(x) − ELBO, ELBO by Monte Carlo (K = {ELBO_SAMPLES})")
ax.set_title("one dot per data point and guide")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "02_gap_is_kl.png"), dpi=110)
plt.show()

# %% [markdown]
# **What to look for.** The closed-form column `max|log p − ELBO − KL|` is at rounding level for
# every guide: the identity is exact. The Monte Carlo ELBO agrees with it to within a couple of its
# standard errors (last column). For the exact posterior every draw has log w = log p(x), so the
# Monte Carlo ELBO has zero variance (its per-point sd of log w is at rounding level). In the figure
# every point lies on the diagonal: the gap of each data point, measured by sampling, is its KL.
# The mean-field guide, although the best diagonal Gaussian, keeps a gap, the price of ignoring the
# posterior's correlations.
#
# ## Reparameterization vs the log-derivative trick
#
# To *maximise* the ELBO over q's parameters φ we need ∇_φ E_{q_φ}[f(z)] with
# f = log p(x, z) − log q_φ(z | x). Two unbiased estimators:
#
# * **pathwise** (reparameterization): write z = m + s·ε with ε ~ N(0, I) and differentiate f
#   through the draw: ∇_φ f(m + s·ε). Needs a differentiable z (`make_objective("elbo", K)`).
# * **log-derivative** (score function): E[(f − b) ∇_φ log q_φ(z | x)] for any q, even a discrete
#   one. b = 0 is plain REINFORCE (`make_objective("score", K, baseline="none")`); pyrovae's default
#   uses the **leave-one-out** baseline, the mean f of the other K − 1 draws of the same point
#   (`make_objective("score", K)`), which does not depend on the draw it multiplies and so keeps the
#   estimator unbiased.
#
# We fix one data point and a deliberately wrong diagonal q (the posterior mean shifted by 0.8
# standard deviations, scales 1.4 times too wide) and draw `REPLICATES` independent gradient
# estimates in one vectorized call: a `PerDatapointGuide` with `REPLICATES` identical rows, each
# row seeing its own copy of x, so row r's gradient is the r-th independent draw. The exact gradient
# is autograd on the closed-form ELBO of a diagonal q.

# %%
x0 = x[:1]
post0 = model.posterior(x0)
m0 = (post0.loc + 0.8 * post0.variance.sqrt()).detach()[0]
s0 = (1.4 * post0.variance.sqrt()).detach()[0]


def closed_form_elbo(m, log_s):
    s = log_s.exp()
    residual = x0[0] - W @ m - b
    ell = -(residual.pow(2).sum() + (s.pow(2) * W.pow(2).sum(0)).sum()) / (2 * sigma**2) - x0.shape[1] / 2 * math.log(2 * math.pi * sigma**2)
    return ell - 0.5 * (s.pow(2) + m.pow(2) - 1 - 2 * log_s).sum()


m_var, log_s_var = m0.clone().requires_grad_(), s0.log().clone().requires_grad_()
exact_grad = torch.autograd.grad(closed_form_elbo(m_var, log_s_var), (m_var, log_s_var))
print(f"exact ∇ELBO:  d/dm = {exact_grad[0].numpy().round(3)},  d/dlog s = {exact_grad[1].numpy().round(3)}")


def gradient_draws(objective):
    """REPLICATES independent estimates of ∇_(m, log s) ELBO at x0 (rows of a PerDatapointGuide)."""
    pyro.clear_param_store()
    pyro.param("local.z_loc", m0.expand(REPLICATES, 2).clone(), event_dim=1)
    pyro.param("local.z_scale", s0.expand(REPLICATES, 2).clone(), constraint=torch.distributions.constraints.positive, event_dim=1)
    guide = PerDatapointGuide(REPLICATES, 2)
    xs, idx = x0.expand(REPLICATES, -1), torch.arange(REPLICATES)
    objective.loss_and_grads(model, guide, xs, idx, REPLICATES)
    params = dict(pyro.get_param_store().named_parameters())  # unconstrained: loc and log scale
    return -params["local.z_loc"].grad.clone(), -params["local.z_scale"].grad.clone()  # loss = −ELBO


estimators = {
    "pathwise (reparameterized)": lambda k: make_objective("elbo", k),
    "score function, no baseline": lambda k: make_objective("score", k, baseline="none"),
    "score function, leave-one-out": lambda k: make_objective("score", k),
}
variances = {name: [] for name in estimators}
print(f"{'estimator':32s}  K   var d/dm   var d/dlog s   max |mean − exact|/SE")
for k in GRAD_KS:
    for name, make in estimators.items():
        g_m, g_s = gradient_draws(make(k))
        draws = torch.cat([g_m, g_s], 1)                          # (R, 4)
        exact = torch.cat(exact_grad)
        z = ((draws.mean(0) - exact) / (draws.std(0) / math.sqrt(REPLICATES))).abs().max()
        variances[name].append((float(g_m.var(0).mean()), float(g_s.var(0).mean()), float(z)))
        print(f"{name:32s} {k:2d}  {g_m.var(0).mean():9.4f}  {g_s.var(0).mean():12.4f}   {z:8.2f}")

path_rows, raw_rows, loo_rows = variances.values()
for k, p_row, r_row, l_row in zip(GRAD_KS, path_rows, raw_rows, loo_rows, strict=True):
    print(f"K={k:2d}: variance w.r.t. m relative to pathwise: no baseline {r_row[0] / p_row[0]:6.1f}x, "
          f"leave-one-out {l_row[0] / p_row[0]:4.1f}x")

fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for name, rows in variances.items():
    for ax, col in zip(axes, (0, 1), strict=True):
        ax.loglog(GRAD_KS, [r[col] for r in rows], "o-", label=name)
for ax, what in zip(axes, ("guide mean m", "guide log-scale log s"), strict=True):
    ax.set_xlabel("K (draws per estimate)")
    ax.set_xticks(GRAD_KS, [str(k) for k in GRAD_KS])
    ax.minorticks_off()
    ax.set_title(f"variance of the gradient w.r.t. the {what}")
axes[0].set_ylabel("variance per coordinate")
axes[0].legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "02_gradient_variance.png"), dpi=110)
plt.show()

# %% [markdown]
# **What to look for.** All three estimators are unbiased: the largest deviation of their mean from
# the exact gradient is a few standard errors at most (last column). Their variances differ by
# orders of magnitude. Plain REINFORCE is about a hundred times noisier than the pathwise gradient
# here; the leave-one-out baseline removes most of that, but stays a few times noisier than
# the pathwise estimator (the printed ratios). Every variance falls like 1/K (straight lines of
# slope −1 on the figure's log-log axes), so the
# ratio between estimators is what matters: a variance ratio of r costs r times more draws for the
# same precision.
#
# ## Training a VAE with each estimator
#
# Now the standard VAE on data from a linear-Gaussian model (`linear_gaussian`: x ∈ R²⁰, z ∈ R⁵,
# σ = 0.5): a linear decoder (the `LinearGaussian` model, its W and b learned) and an amortized
# encoder q_φ(z | x) = N(m_φ(x), diag s_φ(x)²) (`AmortizedGuide(GaussianEncoder(...))`), trained
# by `fit` with K = 2 draws per point, once with the pathwise gradient and once with the
# score-function gradient (`reparameterized=False` and the leave-one-out baseline). Because the
# decoder is linear, a `Hook` can record the *exact* held-out log p(x) of the model after every
# epoch, next to the held-out ELBO that `fit` reports.

# %%
data = linear_gaussian(2000, 500, x_dim=X_DIM, z_dim=Z_DIM, noise_scale=0.5, seed=0)
truth = LinearGaussian(X_DIM, Z_DIM, noise_scale=0.5, weight=data.truth["weight"], bias=data.truth["bias"], name="truth")
truth_log_px = float(truth.log_marginal(data.test).mean().detach())


class ExactHeldOut(Hook):
    def __init__(self, model):
        self.model, self.curve = model, []

    def on_epoch_end(self, trainer, state):
        with torch.no_grad():
            self.curve.append(float(self.model.log_marginal(data.test).mean()))


runs = {}
for name, reparameterized, objective in (("pathwise", True, make_objective("elbo", 2)),
                                         ("score function (leave-one-out)", False, make_objective("score", 2))):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.manual_seed(0)
    vae = LinearGaussian(X_DIM, Z_DIM, noise_scale=0.5)
    guide = AmortizedGuide(GaussianEncoder(X_DIM, Z_DIM, hidden_sizes=[64]), reparameterized=reparameterized)
    hook = ExactHeldOut(vae)
    t0 = time.time()
    history = fit(vae, guide, data, objective, epochs=EPOCHS, batch_size=100, lr=LR, progress=False, hooks=[hook])
    with torch.no_grad():
        loc, scale = guide.encoder(data.test)
        q = MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))
        kl = float(kl_divergence(q, vae.posterior(data.test)).mean())
    runs[name] = dict(log_px=hook.curve, elbo=history.test_bound, kl=kl, seconds=time.time() - t0)
    print(f"{name:32s} held-out: exact log p(x) {hook.curve[-1]:.4f}, ELBO {history.test_bound[-1]:.4f}, "
          f"gap {hook.curve[-1] - history.test_bound[-1]:.4f}, KL(q‖p(z|x)) {kl:.4f}  ({time.time() - t0:.1f} s)")
print(f"{'true parameters':32s} held-out: exact log p(x) {truth_log_px:.4f}")

fig, ax = plt.subplots(figsize=(6.5, 4.2))
for (name, r), color in zip(runs.items(), ("tab:blue", "tab:orange"), strict=True):
    epochs = range(1, len(r["log_px"]) + 1)
    ax.plot(epochs, r["log_px"], color=color, label=f"{name}: exact log p(x)")
    ax.plot(epochs, r["elbo"], color=color, ls="--", label=f"{name}: ELBO")
ax.axhline(truth_log_px, color="black", lw=1, ls=":", label="true parameters")
ax.set_ylim(truth_log_px - 3, truth_log_px + 0.3)
ax.set_xlabel("epoch (20 steps of 100 points)")
ax.set_ylabel("held-out nats per point")
ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "02_training.png"), dpi=110)
plt.show()

# %% [markdown]
# **What to look for.** The printed lines and the figure separate the two halves of a VAE. The
# *decoder* gets the same kind of gradient in both runs, ∇_θ log p(x | z) at sampled z, so the exact
# log p(x) of the two models (solid) climbs alike towards the true parameters' value. The *encoder*
# is where the estimators differ: with the noisier score-function gradient it ends further from the
# posterior, so the ELBO (dashed) sits lower and the gap, log p(x) − ELBO, is larger. The printed
# KL(q ‖ p(z | x)) of each trained encoder, computed in closed form, matches its gap: the gap of a
# trained VAE is the KL of its encoder to the true posterior. The log-derivative
# trick is what we use when z is discrete (tutorial 1's `CategoricalGuide`); for continuous z the
# reparameterization trick is why VAEs train well.
#
# The tutorial checks its own claims:

# %%
for name, r in gap_results.items():
    assert r["residual"] < 1e-6, f"{name}: ELBO + KL(q‖p(z|x)) must equal log p(x) in closed form"
    assert abs(r["z"]) < 5, f"{name}: the Monte Carlo ELBO must match the closed form"
assert gap_results["exact"]["max_elbo_sd"] < 1e-6, "q = p(z|x) gives a zero-variance ELBO"
path, raw, loo = (variances[name][-1] for name in estimators)
assert all(row[2] < 5 for rows in variances.values() for row in rows), "all estimators are unbiased"
assert path[0] < loo[0] < raw[0], "variance: pathwise < score with baseline < score without"
final = {name: (r["log_px"][-1], r["elbo"][-1], r["kl"]) for name, r in runs.items()}
for name, (lp, elbo, kl) in final.items():
    assert abs((lp - elbo) - kl) < 0.05 + 0.1 * kl, f"{name}: held-out gap = KL up to Monte Carlo error of the ELBO"
if not SMALL:
    assert final["pathwise"][0] > truth_log_px - 0.5, "the pathwise VAE gets close to the true likelihood"
    assert final["pathwise"][2] < final["score function (leave-one-out)"][2], "pathwise training gets the better encoder"
print(f"all checks passed; total run time {time.time() - start_time:.1f} s")
