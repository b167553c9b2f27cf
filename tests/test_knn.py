"""k-NN classification against a brute-force NumPy implementation, one query at a time."""

import numpy as np
import pytest

from simclr_jax.evaluation import (
    knn_accuracies,
    knn_accuracy,
    knn_predict,
    knn_predictions,
    nearest_neighbours,
)

NUM_CLASSES = 5


def _reference_knn(train, train_labels, queries, k, temperature):
    """Cosine similarity in float64, stable sort, vote totals, lowest class index on ties."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    predictions = []
    for query in queries:
        similarity = train @ (query / np.linalg.norm(query))
        neighbours = np.argsort(-similarity, kind="stable")[:k]
        scores = np.zeros(NUM_CLASSES)
        for neighbour in neighbours:
            vote = 1.0 if temperature is None else np.exp(similarity[neighbour] / temperature)
            scores[train_labels[neighbour]] += vote
        predictions.append(int(np.argmax(scores)))
    return np.array(predictions)


def _data(seed, num_train=300, num_queries=60, dim=16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(NUM_CLASSES, dim))
    train_labels = rng.integers(0, NUM_CLASSES, num_train)
    query_labels = rng.integers(0, NUM_CLASSES, num_queries)
    train = centres[train_labels] + 1.5 * rng.normal(size=(num_train, dim))
    queries = centres[query_labels] + 1.5 * rng.normal(size=(num_queries, dim))
    return (
        train.astype(np.float32),
        train_labels.astype(np.int32),
        queries.astype(np.float32),
        query_labels.astype(np.int32),
    )


@pytest.mark.parametrize("temperature", [None, 0.07])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_matches_brute_force(k, temperature):
    train, train_labels, queries, _ = _data(seed=k)
    predicted = knn_predict(train, train_labels, queries, NUM_CLASSES, k=k, temperature=temperature)
    expected = _reference_knn(train, train_labels, queries, k, temperature)
    np.testing.assert_array_equal(np.asarray(predicted), expected)


def test_several_vote_rules_from_one_pass_match_brute_force_each():
    train, train_labels, queries, _ = _data(seed=11)
    # Exact copies of train rows tie in similarity; with k=5 or 20 the nearest of them may sit
    # across the cut, where only the lower row index may be taken.
    train = np.concatenate([train, train[:100]])
    train_labels = np.concatenate([train_labels, (train_labels[:100] + 1) % NUM_CLASSES])
    votes = [(20, 0.07), (1, None), (5, None), (20, None), (5, 0.5)]
    predicted = knn_predictions(
        train, train_labels, queries, NUM_CLASSES, votes, query_batch_size=16
    )
    assert list(predicted) == votes
    for k, temperature in votes:
        expected = _reference_knn(train, train_labels, queries, k, temperature)
        np.testing.assert_array_equal(np.asarray(predicted[(k, temperature)]), expected)


def test_accuracies_of_several_vote_rules_equal_one_rule_at_a_time():
    train, train_labels, queries, query_labels = _data(seed=13)
    votes = [(3, None), (30, 0.1), (3, 0.1)]
    accuracies = knn_accuracies(train, train_labels, queries, query_labels, NUM_CLASSES, votes)
    for k, temperature in votes:
        alone = knn_accuracy(
            train, train_labels, queries, query_labels, NUM_CLASSES, k=k, temperature=temperature
        )
        assert accuracies[(k, temperature)] == alone


def test_any_bad_vote_rule_is_refused_before_any_work():
    train, train_labels, queries, _ = _data(seed=0, num_train=10)
    with pytest.raises(ValueError, match=r"k=11 .* \(10\)"):
        knn_predictions(train, train_labels, queries, NUM_CLASSES, [(5, None), (11, 0.1)])
    with pytest.raises(ValueError, match="temperature must be positive"):
        knn_predictions(train, train_labels, queries, NUM_CLASSES, [(5, None), (5, -1.0)])
    with pytest.raises(ValueError, match="votes is empty"):
        knn_predictions(train, train_labels, queries, NUM_CLASSES, [])


def test_majority_ties_go_to_lowest_class():
    # Two neighbours, one vote each for classes 3 and 1: the tie goes to class 1.
    train = np.array([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0]], np.float32)
    labels = np.array([3, 1, 0], np.int32)
    predicted = knn_predict(train, labels, np.array([[1.0, 0.05]], np.float32), 4, k=2)
    np.testing.assert_array_equal(np.asarray(predicted), [1])


@pytest.mark.parametrize("temperature", [None, 0.1])
def test_chunked_equals_unchunked(temperature):
    train, train_labels, queries, _ = _data(seed=7, num_queries=53)
    whole = knn_predict(train, train_labels, queries, NUM_CLASSES, k=10, temperature=temperature)
    chunked = knn_predict(
        train,
        train_labels,
        queries,
        NUM_CLASSES,
        k=10,
        temperature=temperature,
        query_batch_size=8,
    )
    assert whole.shape == (53,)
    np.testing.assert_array_equal(np.asarray(chunked), np.asarray(whole))


def test_unlabelled_train_examples_are_never_neighbours():
    train, train_labels, queries, _ = _data(seed=3)
    # Unlabelled copies of the queries would be every query's nearest neighbour.
    with_unlabelled = np.concatenate([train, queries])
    labels = np.concatenate([train_labels, np.full(len(queries), -1, np.int32)])
    expected = knn_predict(train, train_labels, queries, NUM_CLASSES, k=5)
    predicted = knn_predict(with_unlabelled, labels, queries, NUM_CLASSES, k=5)
    np.testing.assert_array_equal(np.asarray(predicted), np.asarray(expected))


def test_accuracy_counts_labelled_queries_only():
    train, train_labels, queries, query_labels = _data(seed=5)
    predicted = _reference_knn(train, train_labels, queries, 5, None)
    query_labels[:10] = -1
    labelled = query_labels >= 0
    expected = np.mean(predicted[labelled] == query_labels[labelled])
    accuracy = knn_accuracy(train, train_labels, queries, query_labels, NUM_CLASSES, k=5)
    assert accuracy == pytest.approx(expected)
    assert 0.4 < accuracy < 1.0  # well above chance (0.2) on these clusters


def test_k_larger_than_labelled_train_set_errors():
    train, train_labels, queries, _ = _data(seed=0, num_train=10)
    train_labels[:2] = -1
    with pytest.raises(ValueError, match=r"k=9 .* labelled train examples \(8\)"):
        knn_predict(train, train_labels, queries, NUM_CLASSES, k=9)
    with pytest.raises(ValueError, match="k=0"):
        knn_predict(train, train_labels, queries, NUM_CLASSES, k=0)


def test_non_positive_temperature_errors():
    train, train_labels, queries, _ = _data(seed=0)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(train, train_labels, queries, NUM_CLASSES, k=5, temperature=0.0)


def test_nearest_neighbours_match_brute_force():
    train, _, queries, _ = _data(seed=3)
    expected = np.argsort(
        -(train / np.linalg.norm(train, axis=1, keepdims=True)) @ queries.T, axis=0, kind="stable"
    )[:7].T
    np.testing.assert_array_equal(nearest_neighbours(train, queries, 7), expected)
    with pytest.raises(ValueError, match="bank size"):
        nearest_neighbours(train, queries, len(train) + 1)
