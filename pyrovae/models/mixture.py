"""The Gaussian mixture as a latent-variable model: a discrete z and a Gaussian p(x|z)."""

from __future__ import annotations

from typing import Optional, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from torch.distributions import constraints

from pyrovae.checks import check_data
from pyrovae.handlers import batch_device, data_plate


class GaussianMixture:
    r"""A mixture of K full-covariance Gaussians, as a Pyro model with a discrete latent site,

    .. math:: z \sim \mathrm{Categorical}(\pi), \qquad x \mid z = k \sim \mathcal N(\mu_k, \Sigma_k),
       \qquad p(x) = \sum_{k=1}^K \pi_k\, \mathcal N(x; \mu_k, \Sigma_k).

    Calling ``model(x, index, num_data)`` runs it inside the plate ``data`` (subsampled by
    ``index`` out of ``num_data`` points). The latent site ``"z"`` is marked
    ``infer={"enumerate": "parallel"}``, so ``TraceEnum_ELBO(max_plate_nesting=1)`` with an empty
    guide sums it out and its loss is exactly -log p(x); any guide that samples ``"z"`` (e.g.
    :class:`pyrovae.guides.MixturePriorGuide`, :class:`pyrovae.guides.CategoricalGuide`) turns it
    into a Monte Carlo objective instead.

    Parameters are Pyro params named ``"<prefix>.locs"`` ``(K, D)``, ``"<prefix>.scale_tril"``
    ``(K, D, D)`` (constrained to ``lower_cholesky``, so Σ_k = L_k L_kᵀ is always positive
    definite) and, with ``learn_weights``, ``"<prefix>.weights"`` ``(K,)`` on the simplex;
    otherwise π is uniform.

    :param num_components: K.
    :param dim: D, the dimension of x.
    :param learn_weights: learn π (else π_k = 1/K, fixed).
    :param init_locs: ``(K, D)`` initial means; default standard normal draws seeded by
        ``init_seed``. Their dtype is the parameters' dtype.
    :param init_scale: the initial Σ_k is ``init_scale² I``.
    :param init_seed: seed of the default initial means (a private generator, the global RNG is
        left alone).
    :param prefix: parameter-name prefix, so several mixtures can share the param store.

    **References**

    - [1] C. M. Bishop, "Pattern Recognition and Machine Learning", Springer 2006, ch. 9.
    - [2] Pyro tutorial "Gaussian Mixture Model" (enumeration of the assignment variable).
    """

    def __init__(
        self,
        num_components: int = 3,
        dim: int = 2,
        learn_weights: bool = True,
        init_locs: Optional[torch.Tensor] = None,
        init_scale: float = 1.0,
        init_seed: int = 0,
        prefix: str = "mixture",
    ) -> None:
        if num_components < 1 or dim < 1:
            raise ValueError(f"need num_components >= 1 and dim >= 1, got {num_components} and {dim}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        if init_locs is None:
            generator = torch.Generator().manual_seed(init_seed)
            init_locs = torch.randn(num_components, dim, generator=generator)
        if tuple(init_locs.shape) != (num_components, dim):
            raise ValueError(
                f"init_locs must have shape (num_components, dim) = ({num_components}, {dim}), "
                f"got {tuple(init_locs.shape)}"
            )
        self.num_components = int(num_components)
        self.dim = int(dim)
        self.learn_weights = learn_weights
        self.init_locs = init_locs.detach().clone()
        self.init_scale = float(init_scale)
        self.prefix = prefix

    @property
    def param_names(self) -> frozenset[str]:
        """The names of this mixture's Pyro params."""
        names = {f"{self.prefix}.locs", f"{self.prefix}.scale_tril"}
        if self.learn_weights:
            names.add(f"{self.prefix}.weights")
        return frozenset(names)

    def weights(self, device: torch.device | str | None = None) -> torch.Tensor:
        """π, ``(K,)``: the Pyro param if learned, else uniform."""
        device = self.init_locs.device if device is None else device

        def uniform() -> torch.Tensor:
            k = self.num_components
            return torch.full((k,), 1.0 / k, dtype=self.init_locs.dtype, device=device)

        if not self.learn_weights:
            return uniform()
        return pyro.param(f"{self.prefix}.weights", uniform, constraint=constraints.simplex)

    def locs(self, device: torch.device | str | None = None) -> torch.Tensor:
        """μ, ``(K, D)``."""
        device = self.init_locs.device if device is None else device
        return pyro.param(f"{self.prefix}.locs", lambda: self.init_locs.to(device))

    def scale_tril(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The Cholesky factors L_k of Σ_k = L_k L_kᵀ, ``(K, D, D)``."""
        device = self.init_locs.device if device is None else device
        return pyro.param(
            f"{self.prefix}.scale_tril",
            lambda: (
                self.init_scale
                * torch.eye(self.dim, dtype=self.init_locs.dtype, device=device)
                .expand(self.num_components, self.dim, self.dim)
                .clone()
            ),
            constraint=constraints.lower_cholesky,
        )

    def covariance_matrices(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Σ, ``(K, D, D)``."""
        scale_tril = self.scale_tril(device)
        return scale_tril @ scale_tril.transpose(-1, -2)

    def set_params(
        self,
        weights: Optional[torch.Tensor] = None,
        locs: Optional[torch.Tensor] = None,
        covariance_matrices: Optional[torch.Tensor] = None,
    ) -> None:
        """Overwrite the given parameters in the param store (e.g. with the true ones).

        :param weights: π, ``(K,)`` on the simplex (only with ``learn_weights``).
        :param locs: μ, ``(K, D)``.
        :param covariance_matrices: Σ, ``(K, D, D)``, symmetric positive definite.
        """
        k, d = self.num_components, self.dim
        store = pyro.get_param_store()
        values: list[tuple[str, torch.Tensor, constraints.Constraint]] = []
        if weights is not None:
            if not self.learn_weights:
                raise ValueError("this mixture has fixed uniform weights; build it with learn_weights=True")
            if tuple(weights.shape) != (k,):
                raise ValueError(f"weights must have shape ({k},), got {tuple(weights.shape)}")
            values.append((f"{self.prefix}.weights", weights, constraints.simplex))
        if locs is not None:
            if tuple(locs.shape) != (k, d):
                raise ValueError(f"locs must have shape ({k}, {d}), got {tuple(locs.shape)}")
            values.append((f"{self.prefix}.locs", locs, constraints.real))
        if covariance_matrices is not None:
            if tuple(covariance_matrices.shape) != (k, d, d):
                raise ValueError(
                    f"covariance_matrices must have shape ({k}, {d}, {d}), got {tuple(covariance_matrices.shape)}"
                )
            scale_tril = torch.linalg.cholesky(covariance_matrices)
            values.append((f"{self.prefix}.scale_tril", scale_tril, constraints.lower_cholesky))
        for name, value, constraint in values:
            if name in store:
                del store[name]
            pyro.param(name, value.detach().clone(), constraint=constraint)

    def components(self, device: torch.device | str | None = None) -> dist.MultivariateNormal:
        """The K component densities N(μ_k, Σ_k) as one distribution of batch shape ``(K,)``."""
        return dist.MultivariateNormal(self.locs(device), scale_tril=self.scale_tril(device))

    def __call__(
        self,
        x: Optional[torch.Tensor] = None,
        index: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        if x is not None and is_validation_enabled():
            check_data(x, "gaussian")
            if x.shape[1] != self.dim:
                raise ValueError(f"x has {x.shape[1]} features but the mixture has dim={self.dim}")
        device = batch_device(x, index)
        weights = self.weights(device)
        locs = self.locs(device)
        scale_tril = self.scale_tril(device)
        with data_plate(x, index, num_data):
            z = pyro.sample("z", dist.Categorical(probs=weights), infer={"enumerate": "parallel"})
            # Indexing by z keeps z's batch shape: (B,) when sampled, (K, 1) when enumerated.
            pyro.sample("x", dist.MultivariateNormal(locs[z], scale_tril=scale_tril[z]), obs=x)
        return z

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x, z=k) = log π_k + log N(x; μ_k, Σ_k) for every point and component, ``(N, K)``."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (num_points, {self.dim}), got {tuple(x.shape)}")
        log_joint = self.weights(x.device).log() + self.components(x.device).log_prob(x.unsqueeze(-2))
        assert log_joint.shape == (x.shape[0], self.num_components)
        return log_joint

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """The exact log p(x) per point, by enumerating z: logsumexp_k log p(x, z=k), ``(N,)``."""
        return torch.logsumexp(self.log_joint(x), dim=-1)

    def posterior(self, x: torch.Tensor) -> torch.Tensor:
        """The exact posterior p(z=k|x) = π_k N(x; μ_k, Σ_k) / p(x) (the responsibilities), ``(N, K)``."""
        return torch.softmax(self.log_joint(x), dim=-1)

    @torch.no_grad()
    def sample(self, num_samples: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral sampling z ~ π, x ~ N(μ_z, Σ_z).

        :return: ``(z, x)`` with shapes ``(n,)`` and ``(n, D)``.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        index = torch.arange(num_samples, device=device)
        trace = poutine.trace(self).get_trace(None, index=index, num_data=num_samples)
        return cast(torch.Tensor, trace.nodes["z"]["value"]), cast(torch.Tensor, trace.nodes["x"]["value"])
