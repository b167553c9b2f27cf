"""Class-balanced label budgets and fractions: balanced, deterministic, nested, within the split."""

import numpy as np
import pytest

from simclr_jax.evaluation import subsets


def _labels(seed=0, sizes=(30, 50, 40)):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    return np.random.default_rng(seed).permutation(labels)


def test_per_class_subset_is_balanced_deterministic_and_nested():
    labels = _labels()
    small = subsets.per_class_subset(labels, 5, seed=3)
    large = subsets.per_class_subset(labels, 20, seed=3)
    np.testing.assert_array_equal(np.bincount(labels[small]), [5, 5, 5])
    np.testing.assert_array_equal(np.bincount(labels[large]), [20, 20, 20])
    np.testing.assert_array_equal(small, subsets.per_class_subset(labels, 5, seed=3))
    assert set(small) <= set(large)
    assert len(np.unique(large)) == len(large) and large.max() < len(labels)
    assert not np.array_equal(small, subsets.per_class_subset(labels, 5, seed=4))


def test_fraction_subset_takes_the_fraction_of_every_class():
    labels = _labels()
    chosen = subsets.fraction_subset(labels, 0.1, seed=0)
    np.testing.assert_array_equal(np.bincount(labels[chosen]), [3, 5, 4])
    np.testing.assert_array_equal(chosen, subsets.fraction_subset(labels, 0.1, seed=0))
    # At least one example per class, and everything at 1.
    np.testing.assert_array_equal(np.bincount(labels[subsets.fraction_subset(labels, 1e-6, 0)]), 1)
    np.testing.assert_array_equal(subsets.fraction_subset(labels, 1.0, 0), np.arange(len(labels)))


def test_unlabelled_examples_are_never_chosen():
    labels = np.array([0, -1, 1, 0, -1, 1, 1])
    chosen = subsets.fraction_subset(labels, 1.0, seed=0)
    np.testing.assert_array_equal(chosen, [0, 2, 3, 5, 6])
    assert np.all(labels[subsets.per_class_subset(labels, 2, seed=0)] >= 0)


def test_invalid_budgets_error():
    labels = _labels()
    with pytest.raises(ValueError, match="exceeds the smallest class"):
        subsets.per_class_subset(labels, 31, seed=0)
    with pytest.raises(ValueError, match="at least 1"):
        subsets.per_class_subset(labels, 0, seed=0)
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        subsets.fraction_subset(labels, 1.5, seed=0)
