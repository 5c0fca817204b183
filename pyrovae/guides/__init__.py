"""Guides q(z|x): all share the models' signature and latent site names, so they swap freely."""

from pyrovae.guides.amortized import AmortizedGuide
from pyrovae.guides.categorical import CategoricalGuide, MixturePriorGuide
from pyrovae.guides.cvae import CVAEGuide, cvae_pair
from pyrovae.guides.exact import ExactPosteriorGuide
from pyrovae.guides.flows import (
    FlowGuide,
    FlowNet,
    FullCovarianceGuide,
    PerDatapointFlowGuide,
    PerDatapointFullCovarianceGuide,
)
from pyrovae.guides.hierarchical import HierarchicalGuide
from pyrovae.guides.m2 import M2Guide, m2_pair
from pyrovae.guides.per_datapoint import PerDatapointGuide
from pyrovae.guides.prior import PriorGuide
from pyrovae.guides.semi_amortized import (
    SemiAmortizedGuide,
    gaussian_elbo,
    refine_gaussian,
)

__all__ = [
    "AmortizedGuide",
    "CVAEGuide",
    "CategoricalGuide",
    "ExactPosteriorGuide",
    "FlowGuide",
    "FlowNet",
    "FullCovarianceGuide",
    "HierarchicalGuide",
    "M2Guide",
    "MixturePriorGuide",
    "PerDatapointFlowGuide",
    "PerDatapointFullCovarianceGuide",
    "PerDatapointGuide",
    "PriorGuide",
    "SemiAmortizedGuide",
    "gaussian_elbo",
    "cvae_pair",
    "m2_pair",
    "refine_gaussian",
]
