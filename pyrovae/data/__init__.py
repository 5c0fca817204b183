"""Data sets for pyrovae: MNIST, generated data with known truth, and index batching.

Every data set is held as two dense tensors ``(num_points, num_features)`` on one device, so a
training step is an index lookup rather than a trip through a ``DataLoader``.

Generated data sets carry the parameters that generated them in :attr:`Dataset.truth`, which is what
lets the tests compare fitted models with exact answers (the linear-Gaussian marginal likelihood and
posterior have closed forms, see
:mod:`pyrovae.models.linear_gaussian`).

**References**

- Y. LeCun, L. Bottou, Y. Bengio, P. Haffner, *Gradient-based learning applied to document
  recognition* (1998) — MNIST.
- R. Salakhutdinov, I. Murray, *On the quantitative analysis of deep belief networks* (ICML 2008) —
  the statically binarized MNIST.
- Y. Burda, R. Grosse, R. Salakhutdinov, *Importance weighted autoencoders* (ICLR 2016) — dynamic
  binarization, resampled at every minibatch.
- M. E. Tipping, C. M. Bishop, *Probabilistic principal component analysis* (JRSS-B 1999) — the
  linear-Gaussian model and its closed-form marginal and posterior.
"""

from __future__ import annotations

from pyrovae.checks import Likelihood, check_data
from pyrovae.data.batching import index_batches
from pyrovae.data.dataset import Binarize, Dataset, DatasetName
from pyrovae.data.labels import balanced_label_subset, partial_labels
from pyrovae.data.load import load_dataset
from pyrovae.data.mnist import (
    DATA_ENV_VAR,
    DataNotFoundError,
    load_mnist,
    resolve_data_dir,
)
from pyrovae.data.synthetic import gaussian_mixture, linear_gaussian

__all__ = [
    "DATA_ENV_VAR",
    "Binarize",
    "DataNotFoundError",
    "Dataset",
    "DatasetName",
    "Likelihood",
    "balanced_label_subset",
    "check_data",
    "gaussian_mixture",
    "index_batches",
    "linear_gaussian",
    "load_dataset",
    "load_mnist",
    "partial_labels",
    "resolve_data_dir",
]
