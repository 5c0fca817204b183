"""``model="m2"``: Kingma et al. (2014)'s semi-supervised M2 (:mod:`pyrovae.models.m2`) with its guide
q(y|x) q(z|x, y) (:class:`pyrovae.guides.m2.M2Guide`), trained on a data set whose training points
carry ``labels`` of their labels (balanced, chosen with the run's seed) as one-hot columns; the
test set is evaluated as unlabelled points, and ``test_error`` is the error of q(y|x)'s argmax."""

from __future__ import annotations

from typing import Any

from pyrovae.app.config import ConfigError
from pyrovae.app.registry import ModelSpec

#: The classes of the labels (MNIST's digits); the label columns of the data are this many.
NUM_CLASSES = 10

#: The objectives each way of treating y trains with: the enumerated ELBO (TraceEnum_ELBO); for a
#: sampled y the ELBO (Trace_ELBO: per-point learning signal, no baseline) or pyrovae's IWAE (K >= 2:
#: VIMCO's leave-one-out signal for y, the pathwise gradient for z; K = 1 is the ELBO).
OBJECTIVES_OF_Y_MODE = {"enum": ("elbo-enum",), "score": ("elbo", "iwae"), "gumbel": ("elbo", "iwae")}


def semi_supervised_data(config: Any, dataset: Any) -> Any:
    """The data set with ``config.labels`` balanced training labels joined to the points (the others
    unlabelled; the labelled ones appended ``labelled_copies - 1`` more times) and the test points
    joined to empty label columns (unlabelled)."""
    import torch

    from pyrovae.data import Dataset, partial_labels
    from pyrovae.models.m2 import join_labels

    if dataset.train_labels is None:
        raise ConfigError(f"model='m2' learns from labels; the {dataset.name} data set has none", "model", "dataset")
    seen = partial_labels(dataset.train_labels, config.labels, NUM_CLASSES, seed=config.seed)
    train, train_labels = join_labels(dataset.train, seen, NUM_CLASSES), dataset.train_labels
    copies = config.labelled_copies - 1
    if copies:
        known = seen >= 0
        train = torch.cat([train, train[known].repeat(copies, 1)])
        train_labels = torch.cat([train_labels, train_labels[known].repeat(copies)])
    return Dataset(
        name=dataset.name,
        train=train,
        test=join_labels(dataset.test, None, NUM_CLASSES),
        likelihood=dataset.likelihood,
        binarize=dataset.binarize,
        train_labels=train_labels,
        test_labels=dataset.test_labels,
        image_shape=None,
        truth=dict(dataset.truth),
    )


def m2_alpha(config: Any, num_data: int) -> float:
    """``m2_alpha``, or Kingma et al.'s 0.1 N / labels with N the training points before any copies."""
    from pyrovae.models.m2 import paper_alpha

    distinct = num_data - (config.labelled_copies - 1) * config.labels
    return config.m2_alpha if config.m2_alpha is not None else paper_alpha(distinct, config.labels)


def build_m2(config: Any, dataset: Any) -> Any:
    from pyrovae.models.m2 import M2
    from pyrovae.nets import MLP

    x_dim = dataset.x_dim - NUM_CLASSES
    classifier = MLP(x_dim, config.hidden_sizes, NUM_CLASSES, config.activation)
    decoder = MLP(config.z_dim + NUM_CLASSES, config.hidden_sizes, x_dim, config.activation)
    return M2(
        decoder.to(config.device),
        classifier.to(config.device),
        x_dim,
        config.z_dim,
        NUM_CLASSES,
        alpha=m2_alpha(config, dataset.num_train),
        labelled_weight=1.0 / config.labelled_copies,
    )


def build_m2_guide(config: Any, dataset: Any, model: Any) -> Any:
    from pyrovae.guides.m2 import M2Guide
    from pyrovae.nets import GaussianEncoder

    encoder = GaussianEncoder(model.x_dim + NUM_CLASSES, config.z_dim, config.hidden_sizes, config.activation)
    return M2Guide(
        model.classifier,
        encoder.to(config.device),
        model.x_dim,
        NUM_CLASSES,
        y_mode=config.y_mode,
        temperature=config.gumbel_temperature,
        labelled_weight=model.labelled_weight,
    )


def check_m2(config: Any) -> None:
    wanted = OBJECTIVES_OF_Y_MODE[config.y_mode]
    if config.objective not in wanted:
        choices = " or ".join(f"objective={name!r}" for name in wanted)
        raise ConfigError(
            f"model='m2' with y_mode={config.y_mode!r} trains with {choices} (pyrovae's per-data-point "
            f"objectives sample every site and refuse an enumerated one); got objective={config.objective!r}: use "
            f"{choices}",
            "objective",
            "y_mode",
        )
    if config.labelled_copies > 1 and config.objective == "iwae":
        raise ConfigError(
            f"labelled_copies={config.labelled_copies} weights a labelled point's terms by 1/copies, which inside "
            "IWAE's log-mean-exp tempers its weights instead of keeping the objective: use objective='elbo', or "
            "labelled_copies=1",
            "labelled_copies",
            "objective",
        )
    if config.labels % NUM_CLASSES:
        raise ConfigError(
            f"labels={config.labels} must be a multiple of {NUM_CLASSES} (the same number per class)", "labels"
        )
    if config.network != "mlp" or config.beta != 1.0:
        raise ConfigError("model='m2' has MLP networks and no KL weight: drop network and beta", "network", "beta")


def m2_defaults(flat: dict[str, Any]) -> dict[str, Any]:
    return {"labels": 100} if flat.get("labels") is None else {}


def m2_label_metrics(config: Any, model: Any, guide: Any, x_test: Any, test_labels: Any) -> dict[str, Any]:
    """``test_error`` of q(y|x)'s argmax and the test ELBO with y summed out exactly (one z per class)."""
    from pyrovae.infer.semi_supervised import classification_error, unlabelled_elbo

    elbo = unlabelled_elbo(model, guide, x_test, num_particles=1, batch_size=config.eval_batch)
    return {
        "test_error": classification_error(guide, x_test, test_labels),
        "test_elbo_enumerated": elbo.mean().item(),
        "test_elbo_enumerated_se": (elbo.std() / len(elbo) ** 0.5).item(),
        "labels": config.labels,
        "m2_alpha": model.alpha,
        "y_mode": config.y_mode,
    }


SPECS = (
    ModelSpec(
        name="m2",
        build=build_m2,
        help="semi-supervised M2 (Kingma et al. 2014): y ~ Cat, z ~ N(0, I), x ~ p(x|y, z); labels labelled points",
        options=("labels", "m2_alpha", "labelled_copies", "y_mode", "gumbel_temperature"),
        guides=("amortized",),
        likelihoods=("bernoulli",),
        amortized_guide=build_m2_guide,
        check=check_m2,
        defaults=m2_defaults,
        prepare_data=semi_supervised_data,
        label_metrics=m2_label_metrics,
    ),
)
