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
# # 3. Per-datapoint vs amortized inference: the amortization gap
#
# Variational inference picks, for each data point x_i, a q_i(z) close to the posterior p(z | x_i)
# by maximising that point's ELBO. Two ways to hold the q_i:
#
# * **per-datapoint**: free parameters (a mean and a scale per latent coordinate) for every point,
#   each optimised on its own ELBO (`PerDatapointGuide`; for new points with the model fixed,
#   `optimize_local_guide`). Flexible, but every new point needs its own optimisation.
# * **amortized**: one encoder network q_φ(z | x) that maps any x to its q in one pass
#   (`AmortizedGuide(GaussianEncoder(...))`, the VAE's encoder). Cheap, but the network has to fit
#   all points at once and may not give each the best q its family holds.
#
# Cremer, Li & Duvenaud (2018) split the encoder's gap into two parts. With q* the best diagonal
# Gaussian for a point,
#
#     log p(x) − L[q_φ]  =  (log p(x) − L[q*])  +  (L[q*] − L[q_φ])
#                           approximation gap     amortization gap
#
# the first is the price of the *family* (diagonal Gaussians), the second the price of *sharing*
# one encoder across points. We train a small VAE on MNIST, then measure both gaps on test images:
# L[q_φ] from the encoder, L[q*] from a per-datapoint guide optimised on each test image with the
# decoder fixed, and log p(x) by importance sampling with K draws from q*.

# %%
import os
import time

import matplotlib.pyplot as plt
import pyro
import torch

from pyrovae import (
    VAE,
    AmortizedGuide,
    Decoder,
    GaussianEncoder,
    fit,
    importance_sampling,
    load_mnist,
    make_objective,
    optimize_local_guide,
)

SMALL = os.environ.get("PYROVAE_TUTORIAL_SMALL") == "1"  # CI-sized settings
HERE = os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else "."
FIGURES = os.environ.get("PYROVAE_TUTORIAL_FIGURES", os.path.join(HERE, "figures"))  # the tests write elsewhere
os.makedirs(FIGURES, exist_ok=True)
torch.set_num_threads(1)
pyro.set_rng_seed(0)
start_time = time.time()

NUM_TRAIN = 2000 if SMALL else 20000
NUM_TEST = 100 if SMALL else 500
EPOCHS = 2 if SMALL else 15
Z_DIM, HIDDEN = 20, [200]
LOCAL_STEPS = 200 if SMALL else 1000     # Adam steps for q* on the test images
IS_SAMPLES = 200 if SMALL else 1000      # K for log p̂(x)

# %% [markdown]
# ## A small VAE
#
# MNIST is read from `$PYROVAE_DATA` (the folder holding `MNIST/raw`). We keep a subset, binarize
# it once with a fixed seed, and train a 784-200-20 VAE (Bernoulli decoder, N(0, I) prior,
# amortized diagonal-Gaussian encoder) with the standard one-draw ELBO.

# %%
mnist = load_mnist(os.environ.get("PYROVAE_DATA"))
generator = torch.Generator().manual_seed(0)
x_train = torch.bernoulli(mnist.train[:NUM_TRAIN], generator=generator)
x_test = torch.bernoulli(mnist.test[:NUM_TEST], generator=generator)
index = torch.arange(NUM_TEST)

model = VAE(Decoder(z_dim=Z_DIM, x_dim=784, hidden_sizes=HIDDEN), z_dim=Z_DIM, likelihood="bernoulli")
encoder_guide = AmortizedGuide(GaussianEncoder(x_dim=784, z_dim=Z_DIM, hidden_sizes=HIDDEN))
t0 = time.time()
history = fit(model, encoder_guide, (x_train, x_test), make_objective("elbo"), epochs=EPOCHS, batch_size=100,
              lr=1e-3, progress=False)
print(f"trained {EPOCHS} epochs on {NUM_TRAIN} images in {time.time() - t0:.1f} s; "
      f"test ELBO {history.test_bound[-1]:.2f} nats")

# %% [markdown]
# ## Amortized q_φ vs the per-datapoint optimum q*
#
# `optimize_local_guide(model, x, z_dim, ...)` fits a fresh per-datapoint guide to every test image
# at once, the decoder held fixed: full-batch Adam on each row's own ELBO, with the KL in closed
# form, its learning rate decaying from 0.03 to 0.003. We run it twice: from the prior N(0, I), and
# from the encoder's output (`init=guide`), and record the mean ELBO along the way
# (`return_history=True`). Both should end at (about) the same L[q*]; the encoder's start is
# already close.
#
# Every ELBO is then measured the same way, by `importance_sampling(...).elbo` with K draws, and
# log p(x) by `importance_sampling(...).log_likelihood` with q* as the proposal (a good proposal,
# so K draws give a tight estimate).

# %%
t0 = time.time()
with torch.no_grad():
    encoder_guide.encoder(x_test)                     # q_φ(z|x) for every test image: one pass
encoder_seconds = time.time() - t0
with torch.no_grad():
    encoder_estimate = importance_sampling(model, encoder_guide, x_test, index, NUM_TEST, num_samples=IS_SAMPLES)

runs = {}
for start in ("prior", "encoder"):
    t0 = time.time()
    local_guide, local_history = optimize_local_guide(
        model, x_test, Z_DIM, steps=LOCAL_STEPS, lr=3e-2, lr_decay=0.1 ** (1 / LOCAL_STEPS), prefix=f"q_star_{start}",
        init="prior" if start == "prior" else encoder_guide, return_history=True, check_every=max(LOCAL_STEPS // 30, 1))
    seconds = time.time() - t0
    with torch.no_grad():
        estimate = importance_sampling(model, local_guide, x_test, index, NUM_TEST, num_samples=IS_SAMPLES)
    runs[start] = dict(guide=local_guide, history=local_history, estimate=estimate, seconds=seconds)
    print(f"q* from the {start:7s}: mean ELBO {estimate.elbo.mean():.3f}  ({LOCAL_STEPS} Adam steps, {seconds:.1f} s)")

q_star = runs["encoder"]["estimate"] if runs["encoder"]["estimate"].elbo.mean() >= runs["prior"]["estimate"].elbo.mean() \
    else runs["prior"]["estimate"]
log_px = q_star.log_likelihood
elbo_encoder, elbo_star = encoder_estimate.elbo, q_star.elbo
approximation_gap = log_px - elbo_star
amortization_gap = elbo_star - elbo_encoder
print(f"\ntest images: {NUM_TEST}, K = {IS_SAMPLES}")
print(f"log p̂(x)          {log_px.mean():9.3f} nats  (importance sampling from q*)")
print(f"L[q*]  per-point   {elbo_star.mean():9.3f}")
print(f"L[q_φ] encoder     {elbo_encoder.mean():9.3f}  (one encoder pass: {encoder_seconds * 1000:.1f} ms for all points)")
print(f"approximation gap  {approximation_gap.mean():9.3f}  = log p̂ − L[q*]")
print(f"amortization gap   {amortization_gap.mean():9.3f}  = L[q*] − L[q_φ]")
print(f"inference gap      {(log_px - elbo_encoder).mean():9.3f}  = log p̂ − L[q_φ]; "
      f"amortization share {float(amortization_gap.mean() / (log_px - elbo_encoder).mean()):.0%}")
print(f"points with L[q*] > L[q_φ]: {float((amortization_gap > 0).float().mean()):.0%}")
print(f"per image: approximation gap sd {approximation_gap.std():.2f}, amortization gap sd {amortization_gap.std():.2f} nats")
prior_history = runs["prior"]["history"]
passed = [step for step, elbo in zip(prior_history.step, prior_history.elbo, strict=True) if elbo > elbo_encoder.mean()]
print(f"from the prior, q* first beats the encoder's mean ELBO at step {passed[0] if passed else 'never'} (checks every "
      f"{prior_history.step[1] - prior_history.step[0]} steps)")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
for start, r in runs.items():
    axes[0].plot(r["history"].step, r["history"].elbo, "o-", ms=3, label=f"q* optimised from the {start}")
axes[0].axhline(float(elbo_encoder.mean()), color="black", ls="--", lw=1, label="encoder q_φ (one pass)")
axes[0].axhline(float(log_px.mean()), color="black", ls=":", lw=1, label="log p̂(x)")
axes[0].set_ylim(float(elbo_encoder.mean()) - 15, float(log_px.mean()) + 2)
axes[0].set_xlabel("Adam steps of the per-datapoint guide (decoder fixed)")
axes[0].set_ylabel("mean test ELBO (nats)")
axes[0].set_title("per-datapoint optimisation vs the encoder")
axes[0].legend(fontsize=8, loc="lower right")
bins = torch.linspace(min(0.0, float(amortization_gap.min())), float(max(approximation_gap.max(), amortization_gap.max())), 40)
axes[1].hist(approximation_gap.numpy(), bins=bins.numpy(), alpha=0.6, label="approximation gap  log p̂ − L[q*]")
axes[1].hist(amortization_gap.numpy(), bins=bins.numpy(), alpha=0.6, label="amortization gap  L[q*] − L[q_φ]")
axes[1].set_xlabel("nats per test image")
axes[1].set_ylabel("test images")
axes[1].set_title("the two gaps, per test image")
axes[1].legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "03_amortization_gap.png"), dpi=110)
plt.show()

# %% [markdown]
# **What to look for.** In the left panel, the per-datapoint guide started from the prior climbs
# from far below (the prior explains no image) and needs the printed number of steps to pass the
# encoder's ELBO (dashed); started from the encoder's output it begins at the dashed line and
# rises from there. Both end near the same L[q*], and the
# printed numbers give the split: between log p̂(x) (dotted) and L[q*] lies the approximation gap,
# what no diagonal Gaussian can close; between L[q*] and the encoder lies the amortization gap,
# what a better encoder could still close. The right panel shows both gaps per test image: every
# image gains from its own q* (the printed share with L[q*] > L[q_φ]). The approximation gap is
# much the same for every image, while the amortization gap varies widely (compare the printed
# standard deviations): the encoder serves some images far worse than others.
#
# The trade-off is cost: the encoder gives every test image its q in one pass, while q* took
# the printed number of full-batch Adam steps and seconds. Amortization buys speed and
# generalisation to new points with some ELBO; semi-amortized guides (`SemiAmortizedGuide`) refine
# the encoder's output with a few such steps to get part of it back.
#
# The amortization gap depends on how well the encoder was trained: the small settings (few
# epochs) leave a larger one. The tutorial checks its own claims:

# %%
assert torch.isfinite(log_px).all() and torch.isfinite(elbo_encoder).all()
assert (log_px.mean() > elbo_star.mean() > elbo_encoder.mean()), "log p̂ ≥ L[q*] ≥ L[q_φ] on average"
assert float((amortization_gap > 0).float().mean()) > 0.8, "most test images gain from their own q*"
enc_run = runs["encoder"]["history"]
assert enc_run.elbo[-1] > enc_run.elbo[0], "optimising from the encoder's output improves the ELBO"
if not SMALL:
    assert abs(runs["prior"]["estimate"].elbo.mean() - runs["encoder"]["estimate"].elbo.mean()) < 2.0, \
        "both starts reach about the same q*"
print(f"all checks passed; total run time {time.time() - start_time:.1f} s")
