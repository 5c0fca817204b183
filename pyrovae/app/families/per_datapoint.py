"""``guide="per-datapoint"``: one Gaussian q_i(z) per training point (:class:`pyrovae.PerDatapointGuide`);
the test set gets its own, fitted with the model fixed."""

from __future__ import annotations

from typing import Any

from pyrovae.app.registry import GuideSpec


def build_per_datapoint(config: Any, dataset: Any, model: Any) -> Any:
    from pyrovae.guides import PerDatapointGuide

    return PerDatapointGuide(dataset.num_train, config.z_dim, beta=config.beta, reparameterized=config.reparameterized)


SPECS = (
    GuideSpec(
        name="per-datapoint",
        build=build_per_datapoint,
        help="one Gaussian per training point (local_steps refine a batch's rows)",
        options=("local_steps", "local_lr"),
        amortized=False,
    ),
)
