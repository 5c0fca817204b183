"""Per-datapoint (individual, non-amortized) inference: one q_i(z) per data point."""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch.distributions import constraints

from pyrovae._typing import PyroFn
from pyrovae.checks import tracing
from pyrovae.distributions import diag_normal
from pyrovae.handlers import data_plate, latent_scale


class PerDatapointGuide:
    """q_i(z) = N(loc_i, diag scale_i²), one Gaussian per data point i = 0..N-1.

    The parameters ``"<prefix>.z_loc"`` and ``"<prefix>.z_scale"`` have shape ``(N, z_dim)`` and
    live inside the subsampled plate (``pyro.param(..., event_dim=1)``), so a batch reads and
    updates only its own rows — no Python loop over points. Use
    :func:`pyrovae.infer.optim.make_pyro_optimizer` with :attr:`local_param_names` so that rows outside
    the batch do not drift under Adam's momentum.

    :param num_data: N, the number of data points this guide holds parameters for.
    :param z_dim: latent dimension.
    :param init_loc: initial means (the prior mean 0 by default).
    :param init_scale: initial standard deviations (the prior's 1 by default).
    :param beta: KL weight; must equal the model's β.
    :param reparameterized: ``False`` for score-function gradients.
    :param prefix: parameter-name prefix; use a different one for a test-set guide.

    **Local steps.** Trained with one gradient step per minibatch (``pyrovae.fit``), a row moves
    once per epoch, by about one learning rate: on MNIST q_i then stays near the prior and the
    decoder learns to ignore z (a training ELBO of about −207 nats after 3 epochs for any rate from
    1e-3 to 0.3). ``fit(..., local_steps=T)`` instead refines the batch's rows by T Adam steps on
    their own ELBO (:meth:`refine_rows`) before each decoder step, as in stochastic variational
    inference with local and global steps (Hoffman et al. 2013).
    """

    amortized = False

    def __init__(
        self,
        num_data: int,
        z_dim: int,
        init_loc: float = 0.0,
        init_scale: float = 1.0,
        beta: float = 1.0,
        reparameterized: bool = True,
        prefix: str = "local",
    ) -> None:
        if num_data < 1:
            raise ValueError(f"num_data must be at least 1, got {num_data}")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        self.num_data = int(num_data)
        self.z_dim = int(z_dim)
        self.init_loc = float(init_loc)
        self.init_scale = float(init_scale)
        self.beta = float(beta)
        self.reparameterized = reparameterized
        self.prefix = prefix

    @property
    def local_param_names(self) -> frozenset[str]:
        """Names of the per-datapoint Pyro params (for lazy optimisers and checkpoints)."""
        return frozenset({f"{self.prefix}.z_loc", f"{self.prefix}.z_scale"})

    def _params(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Created on first use (inside the data plate, event_dim=1, so a batch sees its rows only).
        shape = (self.num_data, self.z_dim)
        z_loc = pyro.param(f"{self.prefix}.z_loc", lambda: torch.full(shape, self.init_loc, device=device), event_dim=1)
        z_scale = pyro.param(
            f"{self.prefix}.z_scale",
            lambda: torch.full(shape, self.init_scale, device=device),
            constraint=constraints.positive,
            event_dim=1,
        )
        return z_loc, z_scale

    def refine_rows(
        self, model: PyroFn, x: torch.Tensor, index: torch.Tensor, num_steps: int, lr: float = 3e-2
    ) -> None:
        """Move the rows ``index`` (the points ``x``) by ``num_steps`` Adam steps on each point's
        own ELBO in ``model`` (:func:`~pyrovae.guides.semi_amortized.refine_gaussian`: fresh Adam
        moments, the model held fixed) and write them back to the param store. Other rows are not
        touched; nothing is differentiated through.

        The model must have one latent site ``"z"`` (see
        :func:`~pyrovae.guides.semi_amortized.gaussian_elbo`) with the β of this guide. A subclass
        with another family (its own :meth:`distribution`) is refused: the refinement is Gaussian.
        """
        from pyrovae.guides.semi_amortized import refine_gaussian

        if type(self).distribution is not PerDatapointGuide.distribution:
            raise ValueError(
                f"local_steps refine diagonal-Gaussian rows (PerDatapointGuide) only; train a "
                f"{type(self).__name__} with local_steps=0"
            )
        if x.shape[0] != index.shape[0]:
            raise ValueError(f"x has {x.shape[0]} points but index has {index.shape[0]} positions")
        self._check_index(index)
        z_loc, z_scale = self._params(x.device)
        with torch.no_grad():
            start_loc, start_scale = z_loc[index], z_scale[index]
        new_loc, new_scale, _ = refine_gaussian(model, x, start_loc, start_scale, num_steps, lr)
        store = pyro.get_param_store()
        to_positive = torch.distributions.biject_to(constraints.positive)
        with torch.no_grad():
            store[f"{self.prefix}.z_loc"].unconstrained()[index] = new_loc  # type: ignore[attr-defined]  # Pyro's stub types store[name] as Tensor; it carries .unconstrained
            store[f"{self.prefix}.z_scale"].unconstrained()[index] = to_positive.inv(new_scale)  # type: ignore[attr-defined]  # Pyro's stub types store[name] as Tensor; it carries .unconstrained

    def _check_index(self, index: torch.Tensor) -> None:
        if index.numel() and not tracing() and (index.device.type == "cpu" or is_validation_enabled()):
            # Out-of-range rows would otherwise fail deep inside the plate's index_select (CPU) or
            # as an asynchronous device assert (GPU, hence checked there only under validation).
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= self.num_data:
                raise ValueError(
                    f"index holds positions {low}..{high}, but this per-datapoint guide holds "
                    f"parameters for points 0..{self.num_data - 1} only; pass positions in the data "
                    "set it was built for, or build a PerDatapointGuide for the other data"
                )

    def __call__(
        self,
        x: Optional[torch.Tensor],
        index: Optional[torch.Tensor] = None,
        num_data: Optional[int] = None,
    ) -> torch.Tensor:
        num_data = self.num_data if num_data is None else num_data
        if num_data != self.num_data:
            raise ValueError(
                f"this per-datapoint guide holds parameters for {self.num_data} points, but was "
                f"called with num_data={num_data}; build a PerDatapointGuide(num_data={num_data}, "
                "prefix=...) for that data set (e.g. the test set)"
            )
        if index is None and (x is None or x.shape[0] != self.num_data):
            raise ValueError("pass index= (the batch's positions in the data set) to a per-datapoint guide")
        if index is not None:
            self._check_index(index)
        device = (x if x is not None else index).device  # type: ignore[union-attr]
        with data_plate(x, index, self.num_data):
            fn = self.distribution(device)
            with latent_scale(self.beta):
                return pyro.sample("z", fn)

    def distribution(self, device: torch.device) -> dist.TorchDistribution:
        """q_i(z) for the rows of the enclosing data plate (call it inside the plate): batch shape
        ``(B,)``, event shape ``(z_dim,)``. Subclasses with other families override this."""
        z_loc, z_scale = self._params(device)
        return diag_normal(z_loc, z_scale, self.reparameterized)
