"""Logistic regression against SciPy's L-BFGS-B in float64, and the linear-probe protocol."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from simclr_jax.evaluation import (
    LogisticRegression,
    fit_logistic_regression,
    linear_probe,
    linear_probe_accuracy,
    predict,
    top_k_accuracy,
)

# Two problem shapes shared by the tests, so that the solver compiles only a few times:
# direct fits on [300, 6] features with 3 classes, and linear probes on 1000 train examples
# (900 fit + 100 held out) of [*, 8] features with 6 classes.
FIT_EXAMPLES, FIT_DIM, FIT_CLASSES = 300, 6, 3
PROBE_TRAIN, PROBE_TEST, PROBE_DIM, PROBE_CLASSES = 1000, 2000, 8, 6


def _clusters(seed, num_examples, num_classes, dim, spread):
    """Gaussian clusters around random centres; ``spread`` is the within-class deviation."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 3.0
    labels = rng.integers(0, num_classes, num_examples)
    features = centres[labels] + spread * rng.normal(size=(num_examples, dim))
    return features.astype(np.float32), labels.astype(np.int32)


def _reference_fit(features, labels, num_classes, l2):
    """The same objective, standardised features, minimised by SciPy in float64."""
    features = np.asarray(features, np.float64)
    x = (features - features.mean(0)) / features.std(0)
    num_examples, dim = x.shape
    one_hot = np.eye(num_classes)[labels]

    def objective(flat):
        weights, bias = flat[: dim * num_classes].reshape(dim, num_classes), flat[-num_classes:]
        logits = x @ weights + bias
        log_normaliser = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1))
        log_probs = logits - logits.max(1, keepdims=True) - log_normaliser[:, None]
        loss = -np.mean(np.sum(one_hot * log_probs, 1)) + 0.5 * l2 * np.sum(weights**2)
        residual = (np.exp(log_probs) - one_hot) / num_examples
        gradient = np.concatenate([(x.T @ residual + l2 * weights).ravel(), residual.sum(0)])
        return loss, gradient

    result = scipy.optimize.minimize(
        objective,
        np.zeros(dim * num_classes + num_classes),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10_000},
    )
    weights = result.x[: dim * num_classes].reshape(dim, num_classes)
    return weights, result.x[-num_classes:], result.fun, objective


def _fit_data(seed, spread=2.0):
    return _clusters(seed, FIT_EXAMPLES, FIT_CLASSES, FIT_DIM, spread)


def _probe_data(seed, spread):
    """(train features, train labels, test features, test labels) of one cluster problem."""
    features, labels = _clusters(seed, PROBE_TRAIN + PROBE_TEST, PROBE_CLASSES, PROBE_DIM, spread)
    train, test = slice(0, PROBE_TRAIN), slice(PROBE_TRAIN, None)
    return features[train], labels[train], features[test], labels[test]


def test_matches_scipy_reference():
    features, labels = _fit_data(seed=0, spread=3.0)
    features = features * np.array([1.0, 10.0, 0.1, 5.0, 2.0, 1.0], np.float32) + 7.0
    l2 = 0.05
    model = fit_logistic_regression(
        features, labels, FIT_CLASSES, l2, max_iters=1000, tolerance=1e-6
    )
    weights, bias, loss, objective = _reference_fit(features, labels, FIT_CLASSES, l2)

    np.testing.assert_allclose(model.feature_mean, features.astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(model.feature_std, features.astype(np.float64).std(0), rtol=1e-5)
    np.testing.assert_allclose(model.weights, weights, atol=2e-5)
    # The softmax ignores a common shift of the (unregularised) bias.
    np.testing.assert_allclose(model.bias - model.bias.mean(), bias - bias.mean(), atol=2e-5)
    ours = np.concatenate([np.ravel(model.weights), np.asarray(model.bias)]).astype(np.float64)
    assert objective(ours)[0] == pytest.approx(loss, rel=1e-7)


def test_separable_features_are_classified_perfectly():
    features, labels = _fit_data(seed=1, spread=0.3)
    test_features, test_labels = _clusters(1, 2 * FIT_EXAMPLES, FIT_CLASSES, FIT_DIM, 0.3)
    model = fit_logistic_regression(features, labels, FIT_CLASSES, l2=1e-3)
    logits = predict(model, test_features[FIT_EXAMPLES:])
    assert float(top_k_accuracy(logits, test_labels[FIT_EXAMPLES:], 1)) == 1.0


def test_random_labels_give_chance_accuracy():
    rng = np.random.default_rng(2)
    features = rng.normal(size=(PROBE_TRAIN + PROBE_TEST, PROBE_DIM)).astype(np.float32)
    labels = rng.integers(0, PROBE_CLASSES, len(features)).astype(np.int32)
    train, test = slice(0, PROBE_TRAIN), slice(PROBE_TRAIN, None)
    result = linear_probe_accuracy(
        features[train], labels[train], features[test], labels[test], PROBE_CLASSES
    )
    # Chance is 1/6; the standard deviation over 2000 test examples is about 0.008.
    assert abs(result["top1"] - 1 / PROBE_CLASSES) < 0.035


def test_linear_probe_on_clusters_reports_every_score():
    l2_grid = (1e-1, 1e-2, 1e-3)
    result = linear_probe_accuracy(*_probe_data(seed=3, spread=4.0), PROBE_CLASSES, l2_grid=l2_grid)
    assert set(result) == {"top1", "top5", "l2", "holdout_top1"}
    assert set(result["holdout_top1"]) == set(l2_grid)
    assert result["l2"] == max(l2_grid, key=lambda l2: (result["holdout_top1"][l2], l2))
    assert 0.6 < result["top1"] < result["top5"] <= 1.0


def test_l2_path_stops_after_patience_values_without_improvement():
    # Clusters this far apart: l2=10 underfits (36% held out), every smaller l2 separates them.
    data = _probe_data(seed=5, spread=0.1)
    l2_grid = (10.0, 1.0, 1e-1, 1e-2, 1e-3)
    stopped = linear_probe_accuracy(*data, PROBE_CLASSES, l2_grid=l2_grid, patience=2)
    whole = linear_probe_accuracy(*data, PROBE_CLASSES, l2_grid=l2_grid, patience=None)
    assert list(whole["holdout_top1"]) == list(l2_grid)
    assert whole["holdout_top1"][10.0] < 0.5
    assert [whole["holdout_top1"][l2] for l2 in l2_grid[1:]] == [1.0] * 4
    # 1.0 improves on 10; 0.1 and 0.01 do not: the path stops there.
    assert list(stopped["holdout_top1"]) == [10.0, 1.0, 1e-1, 1e-2]
    assert stopped["l2"] == whole["l2"] == 1.0  # ties go to the larger l2
    assert stopped["top1"] == whole["top1"]


def test_l2_choice_never_looks_at_the_test_split():
    train_features, train_labels, test_features, test_labels = _probe_data(seed=4, spread=4.0)
    kwargs = {"num_classes": PROBE_CLASSES, "l2_grid": (1.0, 1e-1, 1e-2, 1e-3)}
    honest = linear_probe_accuracy(
        train_features, train_labels, test_features, test_labels, **kwargs
    )
    shuffled_labels = np.random.default_rng(0).permutation(test_labels)
    shuffled = linear_probe_accuracy(
        train_features, train_labels, test_features, shuffled_labels, **kwargs
    )
    assert shuffled["top1"] < honest["top1"] - 0.2  # the test labels do matter for the score,
    assert shuffled["l2"] == honest["l2"]  # but not for the choice of l2.
    assert shuffled["holdout_top1"] == honest["holdout_top1"]


def test_larger_l2_shrinks_the_weights():
    features, labels = _fit_data(seed=5)
    norms = [
        float(jnp.linalg.norm(fit_logistic_regression(features, labels, FIT_CLASSES, l2).weights))
        for l2 in (1e-3, 1e-2, 1e-1, 1.0)
    ]
    assert all(a > b for a, b in itertools.pairwise(norms))


def test_unlabelled_examples_are_ignored():
    features, labels = _fit_data(seed=6)
    noise = (100.0 * np.random.default_rng(0).normal(size=(100, FIT_DIM))).astype(np.float32)
    with_unlabelled = np.concatenate([features, noise])
    all_labels = np.concatenate([labels, np.full(100, -1, np.int32)])
    expected = fit_logistic_regression(features, labels, FIT_CLASSES, 1e-2)
    model = fit_logistic_regression(with_unlabelled, all_labels, FIT_CLASSES, 1e-2)
    for ours, reference in zip(model, expected, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


def test_prediction_is_invariant_to_per_feature_affine_rescaling():
    features, labels = _fit_data(seed=7)
    scale = np.array([1e-3, 1.0, 50.0, 2.0, 1.0, 0.5], np.float32)
    shift = np.array([100.0, -3.0, 0.0, 1.0, 0.0, 5.0], np.float32)
    rescaled = features * scale + shift
    model = fit_logistic_regression(features, labels, FIT_CLASSES, 1e-2, tolerance=1e-5)
    other = fit_logistic_regression(rescaled, labels, FIT_CLASSES, 1e-2, tolerance=1e-5)
    np.testing.assert_allclose(predict(other, rescaled), predict(model, features), atol=2e-3)


def test_warm_start_is_reexpressed_for_new_standardisation():
    rng = np.random.default_rng(8)
    model = LogisticRegression(
        weights=jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
        bias=jnp.asarray(rng.normal(size=3), jnp.float32),
        feature_mean=jnp.asarray(rng.normal(size=5), jnp.float32),
        feature_std=jnp.asarray(rng.uniform(0.5, 2.0, size=5), jnp.float32),
    )
    mean = jnp.asarray(rng.normal(size=5), jnp.float32)
    std = jnp.asarray(rng.uniform(0.5, 2.0, size=5), jnp.float32)
    weights, bias = linear_probe._reexpress(model, mean, std)
    features = rng.normal(size=(20, 5)).astype(np.float32)
    moved = LogisticRegression(weights, bias, mean, std)
    np.testing.assert_allclose(predict(moved, features), predict(model, features), atol=1e-5)


def test_constant_features_are_centred_not_scaled():
    base_features, labels = _fit_data(seed=9)
    logits = []
    for constant in (42.0, -1e4):
        # A fresh array each time: on a CPU, JAX may read an aligned NumPy array in place when
        # the (asynchronous) computation runs, so the array must not change after the call.
        features = base_features.copy()
        features[:, 1] = constant
        model = fit_logistic_regression(features, labels, FIT_CLASSES, 1e-2)
        assert float(model.feature_std[1]) == 1.0
        assert np.all(np.isfinite(model.weights))
        logits.append(predict(model, features))
    # Centred, a constant is zero whatever its value: it cannot change the classifier.
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-6)


def test_top_k_accuracy_matches_numpy():
    rng = np.random.default_rng(10)
    logits = rng.normal(size=(50, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 50).astype(np.int32)
    labels[:5] = -1
    labelled = labels >= 0
    ranking = np.argsort(-logits, axis=1)
    for k in (1, 3, 7):
        hits = [label in row[:k] for row, label in zip(ranking, labels, strict=True)]
        expected = np.mean(np.array(hits)[labelled])
        assert float(top_k_accuracy(logits, labels, k)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="k must be"):
        top_k_accuracy(logits, labels, 8)


def test_stratified_holdout_takes_the_fraction_of_every_class():
    labels = np.repeat(np.arange(4), [100, 50, 20, 1])
    holdout = linear_probe._stratified_holdout(labels, 0.1, seed=0)
    assert [int(np.sum(holdout[labels == c])) for c in range(4)] == [10, 5, 2, 0]
    np.testing.assert_array_equal(holdout, linear_probe._stratified_holdout(labels, 0.1, seed=0))
    assert not np.array_equal(holdout, linear_probe._stratified_holdout(labels, 0.1, seed=1))


def test_invalid_arguments_error():
    features, labels = _fit_data(seed=11)
    with pytest.raises(ValueError, match="l2 must be positive"):
        fit_logistic_regression(features, labels, FIT_CLASSES, 0.0)
    with pytest.raises(ValueError, match="below num_classes"):
        fit_logistic_regression(features, labels, FIT_CLASSES - 1, 1e-2)
    with pytest.raises(ValueError, match="holdout_fraction"):
        linear_probe_accuracy(features, labels, features, labels, FIT_CLASSES, holdout_fraction=1)
    with pytest.raises(ValueError, match="patience"):
        linear_probe_accuracy(features, labels, features, labels, FIT_CLASSES, patience=0)
