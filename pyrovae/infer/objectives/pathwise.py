r"""Lower-variance pathwise gradients: "sticking the landing" (STL) and doubly reparameterized
gradients (DReG).

With a reparameterized guide, z = g_φ(ε), the ELBO's gradient has two φ-paths through
log q_φ(z|x): the path through z, and the direct dependence of the density's parameters on φ (the
score term, whose expectation is zero). **STL** (Roeder, Wu & Duvenaud 2017) drops the score term
by evaluating log q with its parameters detached: the estimator stays unbiased for the ELBO and
its variance vanishes when q is the exact posterior. For the IWAE bound the same trick is biased
for K > 1; **DReG** (Tucker, Lawson, Gu & Maddison 2019) rewrites the score term by a second
reparameterization, giving the unbiased encoder gradient

.. math:: \nabla_φ \mathcal L_K = \mathbb E\Big[\sum_k \tilde w_k^2\,
   \frac{\partial \log w_k}{\partial z_k} \frac{\partial z_k}{\partial φ}\Big],
   \qquad \tilde w_k = w_k / \textstyle\sum_j w_j,

(log q with detached parameters) while the decoder keeps the IWAE gradient Σ_k w̃_k ∇_θ log w_k.
pyrovae computes both with one backward pass: the surrogate is the IWAE bound, and a gradient hook
on each sample z_k multiplies the gradient reaching it by w̃_k (detached), which turns the
encoder's Σ_k w̃_k ∂log w_k into Σ_k w̃_k² ∂log w_k and leaves the decoder's alone.

Both need a guide whose latent sites are reparameterized and whose parameters do not depend on
other latent sites (a single-layer guide, amortized or per-datapoint): detaching the parameters of
q(z_2 | z_1) would also cut their dependence on z_1, which is not a score term.

**References**

- [1] G. Roeder, Y. Wu, D. Duvenaud, "Sticking the Landing: Simple, Lower-Variance Gradient
  Estimators for Variational Inference", NeurIPS 2017.
- [2] G. Tucker, D. Lawson, S. Gu, C. J. Maddison, "Doubly Reparameterized Gradient Estimators for
  Monte Carlo Objectives", ICLR 2019.
- [3] T. Rainforth et al., "Tighter Variational Bounds are Not Necessarily Better", ICML 2018.
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch

__all__ = ["detach_params", "stick_the_landing_"]


def detach_params(fn: Any) -> Any:
    """A copy of distribution ``fn`` with its parameters detached from the graph: the same
    log-density values, no gradient to the parameters (only through the value it is evaluated at).

    Supports ``Independent`` wrappers, ``MultivariateNormal`` and distributions whose constructor
    takes their ``arg_constraints`` by name (``Normal``, ``Laplace``, ``Gamma``, ...)."""
    if isinstance(fn, torch.distributions.Independent):
        return dist.Independent(detach_params(fn.base_dist), fn.reinterpreted_batch_ndims)
    if isinstance(fn, torch.distributions.TransformedDistribution):
        raise ValueError(
            f"STL/DReG need log q at z with q's parameters detached; for a normalizing flow "
            f"({type(fn).__name__} with {[type(t).__name__ for t in fn.transforms]}) that means inverting the "
            "detached flow at z, which its layers' cache cannot do (planar and Sylvester layers have no "
            "inverse): train flow guides with 'elbo' or 'iwae' (the full-covariance guide supports STL/DReG)"
        )
    if isinstance(fn, torch.distributions.MultivariateNormal):
        return dist.MultivariateNormal(fn.loc.detach(), scale_tril=fn.scale_tril.detach())
    names = [name for name in fn.arg_constraints if name in fn.__dict__]
    if not names:
        raise ValueError(
            f"cannot detach the parameters of {type(fn).__name__}; STL/DReG need guide sites whose "
            "distribution takes its parameters by name (e.g. Normal(loc, scale).to_event(1))"
        )
    cls = type(fn)
    if cls.__module__.startswith("torch.distributions") and hasattr(dist, cls.__name__):
        cls = getattr(dist, cls.__name__)
    return cls(**{name: getattr(fn, name).detach() for name in names}, validate_args=False)


def stick_the_landing_(guide_trace: Any) -> list[str]:
    """Replace, in place, the log q of every reparameterized latent site of a guide trace (with
    log-probs computed) by its value under parameter-detached densities.

    :return: the names of the sites changed.
    :raises ValueError: a latent site is not reparameterized, or more than one latent site (the
        parameters of one would depend on another).
    """
    sites = [
        (name, site) for name, site in guide_trace.nodes.items() if site["type"] == "sample" and not site["is_observed"]
    ]
    for name, site in sites:
        if not site["fn"].has_rsample or site["infer"].get("pyrovae_score"):
            raise ValueError(
                f"guide site {name!r} is not reparameterized; STL and DReG are pathwise estimators "
                "(use 'iwae' with VIMCO or 'score' for non-reparameterized sites)"
            )
    if len(sites) > 1:
        raise ValueError(
            f"STL and DReG support guides with one latent site; this guide has {[n for n, _ in sites]} "
            "(detaching q(z2|z1) would also cut its dependence on z1). Use 'iwae' or 'elbo'"
        )
    for _, site in sites:
        site["unscaled_log_prob"] = detach_params(site["fn"]).log_prob(site["value"])
    return [name for name, _ in sites]
