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
# # 1. Latent-variable models: the Gaussian mixture three ways
#
# A latent-variable model explains an observation x through an unobserved z:
#
#     p(x) = Σ_z p(z) p(x | z).
#
# The Gaussian mixture is the simplest one. z ∈ {0, …, K−1} picks a component with probability
# π_z, and x | z ~ N(μ_z, Σ_z). Because z takes only K values, the sum can be computed exactly
# (**enumeration**). That makes the mixture a test bed for the two estimators that are all we have
# once z is continuous or high-dimensional:
#
# * **Monte Carlo from the prior**: p̂(x) = (1/K) Σ_k p(x | z_k), z_k ~ p(z).
# * **Importance sampling** from a proposal q(z | x): p̂(x) = (1/K) Σ_k p(x, z_k) / q(z_k | x), z_k ~ q.
#
# Both p̂(x) are unbiased for p(x). Their logarithms are not: by Jensen's inequality
# E[log p̂(x)] ≤ log p(x), so log p̂ is a *stochastic lower bound* (the IWAE bound) whose bias shrinks
# as K grows and as q approaches the posterior p(z | x).
#
# This tutorial uses pyrovae's public API only: `GaussianMixture` (the model, with `log_marginal`
# and `posterior` in closed form), `MixturePriorGuide` (q = p(z)), `CategoricalGuide` (an amortized
# q(z | x)), `importance_sampling` (per-point log p̂, ELBO and effective sample size) and `fit`.

# %%
import os
import time

import matplotlib.pyplot as plt
import pyro
import torch
from pyro.infer import TraceEnum_ELBO

from pyrovae import (
    MLP,
    CategoricalGuide,
    GaussianMixture,
    MixturePriorGuide,
    fit,
    gaussian_mixture,
    importance_sampling,
    make_objective,
    no_latents,
)
from pyrovae.infer.loop import Hook

SMALL = os.environ.get("PYROVAE_TUTORIAL_SMALL") == "1"  # CI-sized settings
HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else "."
FIGURES = os.environ.get("PYROVAE_TUTORIAL_FIGURES", os.path.join(HERE, "figures"))  # the tests write elsewhere
os.makedirs(FIGURES, exist_ok=True)
torch.set_num_threads(1)
pyro.set_rng_seed(0)
start_time = time.time()

EPOCHS = 8 if SMALL else 100          # 15 steps of 200 points per epoch
REPEATS = 5 if SMALL else 50          # independent estimates per point, to measure bias and spread
KS = [1, 2, 5, 10, 100] if SMALL else [1, 2, 5, 10, 100, 1000]

# %% [markdown]
# ## The data and the exact log-likelihood
#
# `gaussian_mixture` draws points from a fixed 3-component mixture in R² with weights
# π = (0.5, 0.3, 0.2) and well-separated, rotated components; `truth` holds its parameters. We
# load them into a `GaussianMixture` and compute log p(x) exactly in two ways: by the closed form
# `log_marginal` (a logsumexp over components), and by Pyro's `TraceEnum_ELBO` with an empty guide
# (`no_latents`). With no latent site in the guide the "ELBO" has no gap: its loss is −Σ log p(x).

# %%
data = gaussian_mixture(3000, 1000, seed=0)
x_test = data.test
n_test = len(x_test)
index = torch.arange(n_test)

true_model = GaussianMixture(3, 2, prefix="true")
true_model.set_params(**data.truth)
log_px = true_model.log_marginal(x_test).detach()                  # (1000,), exact
enum_loss = TraceEnum_ELBO(max_plate_nesting=1).loss(true_model, no_latents, x_test, index, n_test)
print(f"exact held-out log p(x), closed form:    {log_px.mean():.5f} nats/point")
print(f"exact held-out log p(x), TraceEnum_ELBO: {-enum_loss / n_test:.5f} nats/point")

# %% [markdown]
# ## Monte Carlo from the prior, and importance sampling from the posterior
#
# `importance_sampling(model, guide, x, index, N, num_samples=K)` returns, per data point,
# log p̂(x) = log (1/K) Σ_k w_k with w_k = p(x, z_k)/q(z_k | x), the ELBO (1/K) Σ_k log w_k of the
# same draws, and the effective sample size ESS = (Σ w)²/Σ w². With `MixturePriorGuide` the
# proposal is the prior, so w_k = p(x | z_k) and this is plain Monte Carlo.
#
# The best possible proposal is the posterior itself, q = p(z | x) = π_z N(x; μ_z, Σ_z)/p(x): every
# weight then equals p(x), and a single draw gives the exact answer. A Pyro guide for it is four
# lines (any guide with the model's signature and site names works with pyrovae's functions).
# We repeat each estimate `REPEATS` times and measure its bias E[log p̂] − log p(x) and its spread.


# %%
def exact_posterior_guide(model):
    def guide(x, index=None, num_data=None):
        with pyro.plate("data", num_data, subsample=index):
            pyro.sample("z", pyro.distributions.Categorical(probs=model.posterior(x).detach()))
    return guide


def bias_and_spread(model, guide, x, ks, repeats):
    """Mean over points of E[log p̂] − log p(x) and of the per-point sd of log p̂, and mean ESS/K, per K."""
    exact = model.log_marginal(x).detach()
    rows = []
    for k in ks:
        with torch.no_grad():
            runs = [importance_sampling(model, guide, x, torch.arange(len(x)), len(x), num_samples=k) for _ in range(repeats)]
        estimates = torch.stack([r.log_likelihood for r in runs])      # (repeats, N)
        ess = torch.stack([r.ess for r in runs]).mean()
        rows.append((k, float((estimates.mean(0) - exact).mean()), float(estimates.std(0).mean()), float(ess / k)))
    return rows


prior_rows = bias_and_spread(true_model, MixturePriorGuide(true_model), x_test, KS, REPEATS)
posterior_rows = bias_and_spread(true_model, exact_posterior_guide(true_model), x_test, KS[:3], 3)
print("proposal    K      bias of log p̂   sd of log p̂   ESS/K")
for name, rows in (("prior", prior_rows), ("posterior", posterior_rows)):
    for k, bias, sd, ess in rows:
        print(f"{name:10s} {k:5d}   {bias:12.4f}   {sd:11.4f}   {ess:6.3f}")
print(f"sum_c pi_c^2 = {float((data.truth['weights'] ** 2).sum()):.3f}  (the K -> infinity limit of the prior's ESS/K)")

# %% [markdown]
# **What to look for.** With the prior as proposal, log p̂ is far too low at small K: a point
# from component C is explained by a single draw only when that draw hits C, which happens with
# probability π_C = 0.2, and a miss costs tens of nats. The bias and spread shrink as K grows, and
# ESS/K settles near Σ_c π_c² ≈ 0.38: only the draws that hit a point's own component carry
# weight (ESS/K = 1 at K = 1 by definition). With the posterior as proposal the bias and spread
# are zero (to rounding) at every K and ESS/K = 1.
#
# ## Learning the mixture three ways
#
# Now we *fit* the parameters by maximum likelihood, from the same start, three ways:
#
# * (a) exact: `TraceEnum_ELBO` with the empty guide, i.e. gradient ascent on log p(x) itself;
# * (b) IWAE with K = 5 draws from the prior (`MixturePriorGuide`);
# * (c) IWAE with K = 5 draws from an amortized `CategoricalGuide` q_φ(z | x) = Categorical(MLP(x)),
#   trained jointly (its discrete z gets VIMCO's leave-one-out score-function gradient).
#
# A few Lloyd (k-means) steps give a common starting point. A `Hook` records the *exact* held-out
# log p(x) after every epoch, whatever objective is being optimised.

# %%
def kmeans(x, k, steps=20, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=generator)[:k]].clone()
    for _ in range(steps):
        labels = torch.cdist(x, centres).argmin(1)
        centres = torch.stack([x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(k)])
    return centres


class ExactHeldOut(Hook):
    def __init__(self, model):
        self.model, self.curve = model, []

    def on_epoch_end(self, trainer, state):
        with torch.no_grad():
            self.curve.append(float(self.model.log_marginal(x_test).mean()))


init_locs = kmeans(data.train, 3)
methods = {
    "(a) exact (enumeration)": lambda m: (no_latents, TraceEnum_ELBO(max_plate_nesting=1)),
    "(b) IWAE, z ~ prior, K=5": lambda m: (MixturePriorGuide(m), make_objective("iwae", num_particles=5)),
    "(c) IWAE, z ~ q(z|x), K=5": lambda m: (CategoricalGuide(MLP(2, [32], 3, activation="tanh")), make_objective("iwae", num_particles=5)),
}
fitted, curves, seconds = {}, {}, {}
for name, make in methods.items():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model = GaussianMixture(3, 2, init_locs=init_locs, prefix="fit")
    guide, objective = make(model)
    hook = ExactHeldOut(model)
    t0 = time.time()
    fit(model, guide, (data.train, data.test), objective, epochs=EPOCHS, batch_size=200, lr=0.02,
        lr_decay=0.1 ** (1 / EPOCHS), progress=False, test_bound=False, hooks=[hook])
    seconds[name] = time.time() - t0
    fitted[name] = (model, guide, {k: v.detach().clone() for k, v in pyro.get_param_store().items()})
    curves[name] = hook.curve
    print(f"{name:28s} exact held-out log p(x) = {hook.curve[-1]:.4f}   ({seconds[name]:.1f} s)")
print(f"{'true parameters':28s} exact held-out log p(x) = {log_px.mean():.4f}")

# %% [markdown]
# **What to look for.** (a) and (c) end at the same held-out log-likelihood, a hair below the
# truth's (the maximum-likelihood estimate from 3000 points is not the truth itself). (b) ends well
# below: with K = 5 prior draws, a point often finds none of its component among the draws, and
# the best insurance the objective can buy is broad components that give every point some density.
# The model it fits is the optimum of a *loose* bound, not of the likelihood: in the curves, (b)
# even moves *away* from the k-means start as it trains.

# %%
def ellipse(loc, cov, radius=1.0):
    angle = torch.linspace(0, 2 * torch.pi, 100)
    circle = torch.stack([angle.cos(), angle.sin()], -1) * radius
    return loc + circle @ torch.linalg.cholesky(cov).T


fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharex=True, sharey=True)
for ax, (name, (_, _, store)) in zip(axes, fitted.items(), strict=True):
    ax.scatter(*data.train[:1000].T, s=3, alpha=0.3, color="tab:blue", label="training data")
    for loc, cov in zip(data.truth["locs"], data.truth["covariance_matrices"], strict=True):
        ax.plot(*ellipse(loc, cov).T, color="red", lw=4, alpha=0.35)
    locs, tril = store["fit.locs"], store["fit.scale_tril"]
    for loc, cov in zip(locs, tril @ tril.transpose(-1, -2), strict=True):
        for r in (1, 2):
            ax.plot(*ellipse(loc, cov, r).T, color="black", lw=1)
    ax.set_title(f"{name}\nheld-out log p(x) = {curves[name][-1]:.3f}")
    ax.set_aspect("equal")
axes[0].plot([], [], color="red", lw=4, alpha=0.35, label="truth (1 sd)")
axes[0].plot([], [], color="black", lw=1, label="fit (1 and 2 sd)")
axes[0].legend(loc="lower left", fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "01_fits.png"), dpi=110)
plt.show()

fig, ax = plt.subplots(figsize=(6.5, 4))
for name, curve in curves.items():
    ax.plot(range(1, len(curve) + 1), curve, label=name)
ax.axhline(float(log_px.mean()), color="black", ls="--", lw=1, label="true parameters")
ax.set_ylim(float(log_px.mean()) - 1.0, float(log_px.mean()) + 0.1)
ax.set_xlabel("epoch (15 steps of 200 points)")
ax.set_ylabel("exact held-out log p(x) (nats/point)")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "01_curves.png"), dpi=110)
plt.show()

# %% [markdown]
# ## Importance sampling with the learned q(z | x)
#
# Method (c) trained a proposal as a by-product. On the model it fitted (its parameters are still
# in Pyro's param store), we compare the two estimators of log p(x) again: draws from the fitted
# prior π̂ against draws from the learned q_φ(z | x).

# %%
model_c, guide_c, _ = fitted["(c) IWAE, z ~ q(z|x), K=5"]
prior_rows_c = bias_and_spread(model_c, MixturePriorGuide(model_c), x_test, KS, REPEATS)
guide_rows_c = bias_and_spread(model_c, guide_c, x_test, KS, REPEATS)
print("on the model fitted by (c):")
print("proposal    K      bias of log p̂   sd of log p̂   ESS/K")
for name, rows in (("prior", prior_rows_c), ("q(z|x)", guide_rows_c)):
    for k, bias, sd, ess in rows:
        print(f"{name:10s} {k:5d}   {bias:12.4f}   {sd:11.4f}   {ess:6.3f}")

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for label, rows, style in (("prior (true model)", prior_rows, "o-"), ("prior (model (c))", prior_rows_c, "s--"),
                           ("learned q(z|x) (model (c))", guide_rows_c, "^-")):
    ks = [r[0] for r in rows]
    axes[0].loglog(ks, [max(-r[1], 1e-7) for r in rows], style, label=label)
    axes[1].semilogx(ks, [r[3] for r in rows], style, label=label)
axes[0].set_xlabel("K (draws per point)")
axes[0].set_ylabel("bias  log p(x) − E[log p̂(x)]  (nats)")
axes[0].set_title("Jensen bias of log p̂ (the posterior as q: exactly 0)")
axes[1].set_xlabel("K (draws per point)")
axes[1].set_ylabel("ESS / K")
axes[1].set_ylim(0, 1.05)
axes[1].set_title("effective sample size per draw")
axes[0].legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "01_estimators.png"), dpi=110)
plt.show()

# %% [markdown]
# **What to look for.** In the left panel the prior's bias falls with K from tens of nats, while
# the learned q(z | x) starts close to zero already at K = 1: for a well-separated mixture the
# posterior is almost one-hot, and a guide that learned it turns importance sampling into nearly
# exact evaluation (ESS/K ≈ 1 in the right panel). The prior's ESS/K tends to about 0.38, the
# chance that a draw hits a point's own component. (Biases below about 10⁻³ nats are smaller than
# the Monte Carlo error of their own estimate, so the learned guide's curve is noise there.)
#
# **Take-aways.** Enumeration is exact when z is small and discrete. Sampling z from the prior is
# unbiased for p(x) but wastes most draws, and its log is biased low; used as a *training*
# objective at small K it fits the wrong model. Importance sampling from a proposal close to
# p(z | x) fixes both, and learning that proposal is what amortized inference (tutorial 3) and the
# VAE (tutorial 2) are about.
#
# The tutorial checks its own claims, so a broken library breaks it:

# %%
assert abs(float(log_px.mean()) + enum_loss / n_test) < 1e-4, "enumeration must equal the closed form"
assert all(abs(b) < 1e-5 and s < 1e-5 for _, b, s, _ in posterior_rows), "q = p(z|x) must give exact log p(x)"
assert prior_rows[0][1] < -1.0 and prior_rows[-1][1] > prior_rows[0][1] / 20, "prior MC: large bias at K=1, shrinking"
assert abs(guide_rows_c[0][1]) < 0.1 * abs(prior_rows_c[0][1]), "the learned proposal beats the prior"
exact_a, prior_b, guide_c_ll = (curves[name][-1] for name in methods)
assert abs(exact_a - float(log_px.mean())) < 0.02, "enumeration reaches (about) the true likelihood"
assert prior_b < exact_a - 0.1, "IWAE with K=5 prior draws fits a worse model"
if not SMALL:
    assert abs(guide_c_ll - exact_a) < 0.01, "IWAE with a learned q(z|x) reaches the same fit as enumeration"
print(f"all checks passed; total run time {time.time() - start_time:.1f} s")
