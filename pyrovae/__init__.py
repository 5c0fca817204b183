"""pyrovae: variational autoencoders and latent-variable inference on Pyro.

Models and guides are Pyro functions with the signature ``fn(x, index=None, num_data=None)``
and share their latent site names, so any guide swaps into any model; objectives are
``pyro.infer.ELBO`` objects chosen by name; :func:`fit` runs ``pyro.infer.SVI``.
"""

from pyrovae.app.build import build
from pyrovae.app.config import TrainConfig
from pyrovae.app.run import Run, load_run
from pyrovae.data import (
    DataNotFoundError,
    Dataset,
    balanced_label_subset,
    gaussian_mixture,
    linear_gaussian,
    load_dataset,
    load_mnist,
    partial_labels,
)
from pyrovae.guides import (
    AmortizedGuide,
    CategoricalGuide,
    CVAEGuide,
    ExactPosteriorGuide,
    FlowGuide,
    FlowNet,
    FullCovarianceGuide,
    HierarchicalGuide,
    M2Guide,
    MixturePriorGuide,
    PerDatapointFlowGuide,
    PerDatapointFullCovarianceGuide,
    PerDatapointGuide,
    PriorGuide,
    SemiAmortizedGuide,
    cvae_pair,
    m2_pair,
)
from pyrovae.infer.conditional import baseline_log_likelihood, no_latents
from pyrovae.infer.evaluate import (
    ImportanceEstimate,
    active_units,
    evaluate_dataset,
    importance_sampling,
    kl_to_prior,
    log_likelihood,
    posterior_means,
)
from pyrovae.infer.local import LocalFitHistory, fit_local_guide, optimize_local_guide
from pyrovae.infer.objectives import CIWAE, IWAE, MIWAE, OBJECTIVES, PIWAE, ScoreFunctionELBO, make_objective
from pyrovae.infer.optim import LazyAdam, make_pyro_optimizer
from pyrovae.infer.replay import LossAndGradsReplay, ReplayedELBO
from pyrovae.infer.semi_supervised import classification_error, unlabelled_elbo
from pyrovae.models import (
    CVAE,
    M2,
    VAE,
    CVAEBaseline,
    FlowPrior,
    GaussianMixture,
    HierarchicalVAE,
    LinearGaussian,
    MixturePrior,
    VampPrior,
    join_labels,
    join_quadrants,
    quadrant_mask,
    split_quadrants,
)
from pyrovae.nets import MLP, Decoder, GaussianEncoder, glorot_init_, init_output_bias_
from pyrovae.runtime.checkpoint import load_params, save_params
from pyrovae.train import History, fit
from pyrovae.train.baseline import fit_baseline

__version__ = "0.1.0"

__all__ = [
    "AmortizedGuide",
    "CIWAE",
    "CVAE",
    "CVAEBaseline",
    "CVAEGuide",
    "CategoricalGuide",
    "DataNotFoundError",
    "Dataset",
    "Decoder",
    "ExactPosteriorGuide",
    "FlowGuide",
    "FlowNet",
    "FlowPrior",
    "FullCovarianceGuide",
    "GaussianEncoder",
    "GaussianMixture",
    "HierarchicalGuide",
    "HierarchicalVAE",
    "History",
    "IWAE",
    "ImportanceEstimate",
    "LazyAdam",
    "LinearGaussian",
    "LocalFitHistory",
    "LossAndGradsReplay",
    "M2",
    "M2Guide",
    "MIWAE",
    "MLP",
    "MixturePrior",
    "MixturePriorGuide",
    "OBJECTIVES",
    "PIWAE",
    "PerDatapointFlowGuide",
    "PerDatapointFullCovarianceGuide",
    "PerDatapointGuide",
    "PriorGuide",
    "ReplayedELBO",
    "Run",
    "ScoreFunctionELBO",
    "SemiAmortizedGuide",
    "TrainConfig",
    "VAE",
    "VampPrior",
    "active_units",
    "balanced_label_subset",
    "baseline_log_likelihood",
    "build",
    "classification_error",
    "cvae_pair",
    "evaluate_dataset",
    "fit",
    "fit_baseline",
    "fit_local_guide",
    "gaussian_mixture",
    "glorot_init_",
    "importance_sampling",
    "init_output_bias_",
    "join_labels",
    "join_quadrants",
    "kl_to_prior",
    "linear_gaussian",
    "load_dataset",
    "load_mnist",
    "load_params",
    "load_run",
    "log_likelihood",
    "m2_pair",
    "make_objective",
    "make_pyro_optimizer",
    "no_latents",
    "optimize_local_guide",
    "partial_labels",
    "posterior_means",
    "quadrant_mask",
    "save_params",
    "split_quadrants",
    "unlabelled_elbo",
]
