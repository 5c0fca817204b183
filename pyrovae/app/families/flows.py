"""``guide="full-cov"`` and the flow guides ``"iaf"``, ``"planar"``, ``"sylvester"``, ``"spline"``:
amortized posteriors richer than a diagonal Gaussian (:mod:`pyrovae.guides.flows`), with MLP
encoders of the config's ``hidden_sizes``."""

from __future__ import annotations

from typing import Any

from pyrovae.app.config import ConfigError
from pyrovae.app.registry import GuideSpec

#: What each flow guide is, for the command line's help.
_FLOW_HELP = {
    "iaf": "inverse autoregressive flow on an encoder's Gaussian (Kingma et al. 2016)",
    "planar": "planar flow on an encoder's Gaussian (Rezende & Mohamed 2015)",
    "sylvester": "Householder Sylvester flow on an encoder's Gaussian (van den Berg et al. 2018)",
    "spline": "rational-quadratic autoregressive spline flow on an encoder's Gaussian (Durkan et al. 2019)",
}


def _check_mlp(config: Any) -> None:
    if config.network != "mlp":
        raise ConfigError(
            f"guide={config.guide!r} has an MLP encoder; network={config.network!r} is not available for it: "
            "choose network='mlp', or guide='amortized' for a convolutional encoder",
            "network",
            "guide",
        )


def check_flow(config: Any) -> None:
    _check_mlp(config)
    if not config.reparameterized:
        raise ConfigError(
            f"guide={config.guide!r} is a pathwise flow; reparameterized=False (score-function gradients) is "
            "not available for it: drop it, or choose guide='amortized' or 'full-cov'",
            "reparameterized",
            "guide",
        )
    if config.guide in ("iaf", "spline") and config.z_dim < 2:
        raise ConfigError(
            f"guide={config.guide!r} is autoregressive and needs z_dim ≥ 2, got z_dim={config.z_dim}: choose "
            "guide='planar' or 'sylvester' for one latent dimension",
            "z_dim",
            "guide",
        )


def build_full_cov(config: Any, dataset: Any, model: Any) -> Any:
    from pyrovae.guides.flows import full_covariance_guide

    guide = full_covariance_guide(
        dataset.x_dim,
        config.z_dim,
        config.hidden_sizes,
        config.activation,
        beta=config.beta,
        reparameterized=config.reparameterized,
    )
    guide.encoder.to(config.device)
    return guide


def build_flow(config: Any, dataset: Any, model: Any) -> Any:
    from pyrovae.guides.flows import flow_guide

    guide = flow_guide(
        config.guide,
        dataset.x_dim,
        config.z_dim,
        hidden_sizes=config.hidden_sizes,
        num_layers=config.flow_layers,
        activation=config.activation,
        beta=config.beta,
        flow_hidden=config.flow_hidden_sizes,
    )
    guide.encoder.to(config.device)
    return guide


SPECS = (
    GuideSpec(
        name="full-cov",
        build=build_full_cov,
        help="an encoder of a full-covariance Gaussian q(z|x)",
        options=(),
        check=_check_mlp,
    ),
    *(
        GuideSpec(
            name=kind, build=build_flow, help=text, options=("flow_layers", "flow_hidden_sizes"), check=check_flow
        )
        for kind, text in _FLOW_HELP.items()
    ),
)
