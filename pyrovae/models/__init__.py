"""Generative models: one file per model family."""

from pyrovae.models.cvae import CVAE, CVAEBaseline
from pyrovae.models.hierarchical import HierarchicalVAE, latent_site_names
from pyrovae.models.linear_gaussian import LinearGaussian
from pyrovae.models.m2 import M2, join_labels, split_labels
from pyrovae.models.mixture import GaussianMixture
from pyrovae.models.priors import FlowPrior, MixturePrior, StandardNormalPrior, VampPrior
from pyrovae.models.quadrants import join_quadrants, quadrant_mask, split_quadrants
from pyrovae.models.vae import LIKELIHOODS, VAE

__all__ = [
    "CVAE",
    "CVAEBaseline",
    "FlowPrior",
    "GaussianMixture",
    "HierarchicalVAE",
    "LIKELIHOODS",
    "LinearGaussian",
    "M2",
    "MixturePrior",
    "StandardNormalPrior",
    "VAE",
    "VampPrior",
    "join_labels",
    "join_quadrants",
    "latent_site_names",
    "quadrant_mask",
    "split_labels",
    "split_quadrants",
]
