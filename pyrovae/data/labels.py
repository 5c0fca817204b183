"""Labelled subsets for semi-supervised learning: a fixed, class-balanced choice of the points whose
labels a model may see (Kingma et al. 2014 use 100, 600, 1000 and 3000 MNIST labels)."""

from __future__ import annotations

import torch


def balanced_label_subset(labels: torch.Tensor, num_labels: int, num_classes: int = 10, seed: int = 0) -> torch.Tensor:
    """The positions of ``num_labels`` points, ``num_labels / num_classes`` of each class, drawn
    without replacement by a generator seeded with ``seed`` (the global RNG is left alone), sorted.
    Each class's points are permuted once whatever ``num_labels``, so under one seed a larger
    subset holds every smaller one (100 ⊂ 600 ⊂ 1000 ⊂ 3000).

    :param labels: ``(N,)`` integer class labels in 0..C-1 of the whole training set.
    :param num_labels: how many labelled points; a multiple of ``num_classes``.
    :raises ValueError: ``num_labels`` is not a positive multiple of ``num_classes``, or a class has
        fewer points than its share.
    """
    if labels.dim() != 1 or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    if num_labels < num_classes or num_labels % num_classes:
        raise ValueError(
            f"num_labels={num_labels} must be a positive multiple of num_classes={num_classes} (the same "
            f"number of labels per class), e.g. {num_classes * max(1, round(num_labels / num_classes))}"
        )
    per_class = num_labels // num_classes
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    chosen = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).squeeze(-1)
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} points, fewer than the {per_class} labels it needs")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    index = torch.cat(chosen).sort().values
    assert index.shape == (num_labels,)
    return index


def partial_labels(labels: torch.Tensor, num_labels: int, num_classes: int = 10, seed: int = 0) -> torch.Tensor:
    """``labels`` with all but a balanced subset (:func:`balanced_label_subset`) set to -1, "unknown",
    on ``labels``' device: what a semi-supervised model sees of the training labels."""
    known = balanced_label_subset(labels, num_labels, num_classes, seed).to(labels.device)
    seen = torch.full_like(labels, -1)
    seen[known] = labels[known]
    return seen
