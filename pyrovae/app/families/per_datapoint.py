"""The non-amortized guides: one posterior per training point, and the test set gets its own of the
same family, fitted with the model fixed (:attr:`~pyrovae.app.registry.GuideSpec.fit_test`).

- ``guide="per-datapoint"``: a diagonal Gaussian per point (:class:`pyrovae.PerDatapointGuide`);
- ``"per-datapoint-full-cov"``: a full-covariance Gaussian per point
  (:class:`pyrovae.guides.flows.PerDatapointFullCovarianceGuide`);
- ``"per-datapoint-planar"``, ``"per-datapoint-sylvester"``: a planar or Sylvester flow per point
  on its own diagonal Gaussian (:class:`pyrovae.guides.flows.PerDatapointFlowGuide`): the q* of
  Cremer, Li & Duvenaud (2018).
"""

from __future__ import annotations

from typing import Any

from pyrovae.app.config import ConfigError
from pyrovae.app.registry import GuideSpec


def build_per_datapoint(config: Any, dataset: Any, model: Any) -> Any:
    from pyrovae.guides import PerDatapointGuide

    return PerDatapointGuide(dataset.num_train, config.z_dim, beta=config.beta, reparameterized=config.reparameterized)


def fit_test_gaussian(config: Any, model: Any, x_test: Any) -> Any:
    from pyrovae.infer.local import optimize_local_guide

    return optimize_local_guide(model, x_test, config.z_dim, steps=max(config.test_time_steps, 1), beta=config.beta)


def _family(config: Any, num_data: int, prefix: str) -> Any:
    """The per-datapoint guide of ``config.guide``'s family (not the diagonal one) with ``num_data`` rows."""
    from pyrovae.guides.flows import PerDatapointFlowGuide, PerDatapointFullCovarianceGuide

    if config.guide == "per-datapoint-full-cov":
        return PerDatapointFullCovarianceGuide(num_data, config.z_dim, beta=config.beta, prefix=prefix)
    kind = config.guide.removeprefix("per-datapoint-")
    return PerDatapointFlowGuide(
        num_data,
        config.z_dim,
        kind=kind,
        num_layers=config.flow_layers,
        seed=config.seed,
        beta=config.beta,
        prefix=prefix,
    )


def build_family(config: Any, dataset: Any, model: Any) -> Any:
    return _family(config, dataset.num_train, "guide")


def fit_test_family(config: Any, model: Any, x_test: Any) -> Any:
    import pyro

    from pyrovae.infer.local import fit_local_guide

    guide = _family(config, x_test.shape[0], "test")
    store = pyro.get_param_store()
    for name in guide.local_param_names:  # a fresh fit, not the rows of an earlier one
        if name in store:
            del store[name]
    # STL for the full-covariance Gaussian, which holds the linear-Gaussian posterior: its gradient
    # vanishes there, so the fit lands on it; flows cannot re-score their draws with detached parameters.
    objective = "elbo-stl" if config.guide == "per-datapoint-full-cov" else "elbo"
    fit_local_guide(model, guide, x_test, steps=max(config.test_time_steps, 1), objective=objective)
    return guide


def check_family(config: Any) -> None:
    if not config.reparameterized:
        raise ConfigError(
            f"guide={config.guide!r} is trained with pathwise gradients; reparameterized=False is not available "
            "for it: drop it, or choose guide='per-datapoint'",
            "reparameterized",
            "guide",
        )


SPECS = (
    GuideSpec(
        name="per-datapoint",
        build=build_per_datapoint,
        help="one Gaussian per training point (local_steps refine a batch's rows)",
        options=("local_steps", "local_lr"),
        amortized=False,
        fit_test=fit_test_gaussian,
    ),
    GuideSpec(
        name="per-datapoint-full-cov",
        build=build_family,
        help="one full-covariance Gaussian per training point",
        amortized=False,
        fit_test=fit_test_family,
        check=check_family,
    ),
    *(
        GuideSpec(
            name=f"per-datapoint-{kind}",
            build=build_family,
            help=f"one {kind} flow per training point, on its own diagonal Gaussian",
            options=("flow_layers",),
            amortized=False,
            fit_test=fit_test_family,
            check=check_family,
        )
        for kind in ("planar", "sylvester")
    ),
)
