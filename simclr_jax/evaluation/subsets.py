"""Class-balanced labelled subsets of a split: label budgets and label fractions.

Each class's examples are put in a random order fixed by ``seed`` and the first ones are taken,
so a subset is deterministic, and for one seed a smaller budget (or fraction) is contained in a
larger one. Subsets are positions in the split they are drawn from (the train split), never in
the split accuracies are reported on.
"""

import numpy as np


def class_orders(labels: np.ndarray, seed: int) -> dict[int, np.ndarray]:
    """For each class present (label >= 0), its positions in a random order fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    return {
        int(label): rng.permutation(np.flatnonzero(labels == label))
        for label in np.unique(labels[labels >= 0])
    }


def per_class_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted positions of ``per_class`` examples of every class (a label budget).

    Raises a ValueError when a class has fewer than ``per_class`` labelled examples.
    """
    labels = np.asarray(labels)
    if per_class < 1:
        raise ValueError(f"the label budget must be at least 1 per class, got {per_class}.")
    orders = class_orders(labels, seed)
    smallest = min((len(members) for members in orders.values()), default=0)
    if per_class > smallest:
        raise ValueError(
            f"a budget of {per_class} labels per class exceeds the smallest class "
            f"({smallest} labelled examples)."
        )
    return np.sort(np.concatenate([members[:per_class] for members in orders.values()]))


def fraction_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of ``round(fraction * n_c)`` examples of each class ``c`` (at least one).

    ``fraction`` in (0, 1]; 1 takes every labelled example.
    """
    labels = np.asarray(labels)
    if not 0 < fraction <= 1:
        raise ValueError(f"the label fraction must be in (0, 1], got {fraction}.")
    orders = class_orders(labels, seed)
    if not orders:
        raise ValueError("the split has no labelled examples.")
    return np.sort(
        np.concatenate(
            [members[: max(1, round(fraction * len(members)))] for members in orders.values()]
        )
    )
