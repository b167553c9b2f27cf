"""k-nearest-neighbour classification on frozen features, the kNN monitor of SSL libraries.

Similarity is cosine (both sides L2-normalised); each query takes the ``k`` most similar labelled
train examples and votes:

- ``temperature=None``: plain majority, one vote per neighbour (lightly's monitor, k=200);
- ``temperature=T``: each neighbour votes ``exp(similarity / T)`` (solo-learn: k=20, T=0.07).

The predicted class is the one with the largest vote total; ties go to the lowest class index.
Among train examples equally similar to a query, the one with the lower row index is taken first.
Several vote rules (k, temperature) share one similarity pass (:func:`knn_predictions`).
Queries are processed in chunks of ``query_batch_size``, so memory is bounded by a
``[query_batch_size, n_train]`` similarity block whatever the number of queries.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.losses import l2_normalize


def _neighbours(bank: jax.Array, queries: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Indices ``[b, k]`` of the most cosine-similar rows of the L2-normalised ``bank`` to each
    query (lower index first among equals), and their similarities."""
    similarity = jnp.matmul(l2_normalize(queries), bank.T, precision=jax.lax.Precision.HIGHEST)
    # Only the indices are taken from top_k: using its values too makes XLA:CPU sort whole rows.
    neighbours = jax.lax.top_k(similarity, k)[1]
    return neighbours, jnp.take_along_axis(similarity, neighbours, axis=-1)


def nearest_neighbours(
    bank_features: jax.Array | np.ndarray, query_features: jax.Array | np.ndarray, k: int
) -> np.ndarray:
    """Rows ``[n_query, k]`` of ``bank_features`` most cosine-similar to each query, best first
    (e.g. the train images to show next to a test image)."""
    if not 1 <= k <= len(bank_features):
        raise ValueError(f"k={k} must be between 1 and the bank size ({len(bank_features)}).")
    bank = l2_normalize(jnp.asarray(bank_features, jnp.float32))
    neighbours, _ = jax.jit(_neighbours, static_argnums=2)(
        bank, jnp.asarray(query_features, jnp.float32), k
    )
    return np.asarray(neighbours)


Vote = tuple[int, float | None]
"""A kNN vote rule: ``(k, temperature)``, ``temperature=None`` for a plain majority."""


@functools.partial(jax.jit, static_argnames=("num_classes", "votes"))
def _predict_chunk(
    bank: jax.Array,
    bank_labels: jax.Array,
    queries: jax.Array,
    num_classes: int,
    votes: tuple[Vote, ...],
) -> jax.Array:
    """Predicted labels ``[len(votes), b]`` of ``queries [b, d]`` against the L2-normalised
    ``bank [n, d]``, one row per vote rule. The similarities and the neighbours are computed
    once, for the largest k: the first k of those are the k nearest (top_k is stable)."""
    neighbours, top_similarity = _neighbours(bank, queries, max(k for k, _ in votes))
    neighbour_labels = bank_labels[neighbours]

    def tally(labels, weights):
        return jnp.zeros(num_classes, weights.dtype).at[labels].add(weights)

    predictions = []
    for k, temperature in votes:
        similarity = top_similarity[:, :k]
        if temperature is None:
            weights = jnp.ones_like(similarity)
        else:
            # Shifting by each query's best similarity rescales its votes without changing the
            # winner, and keeps exp() finite for any temperature.
            weights = jnp.exp((similarity - similarity[:, :1]) / temperature)
        scores = jax.vmap(tally)(neighbour_labels[:, :k], weights)
        predictions.append(jnp.argmax(scores, axis=-1).astype(jnp.int32))
    return jnp.stack(predictions)


def knn_predictions(
    train_features: jax.Array | np.ndarray,
    train_labels: jax.Array | np.ndarray,
    query_features: jax.Array | np.ndarray,
    num_classes: int,
    votes: Sequence[Vote],
    query_batch_size: int = 512,
) -> dict[Vote, jax.Array]:
    """Labels ``[n_query]`` (int32) predicted by a k-NN vote over the labelled train examples,
    for each vote rule ``(k, temperature)`` in ``votes``, from one similarity pass.

    Args:
      train_features: ``[n_train, d]`` features of the reference set.
      train_labels: ``[n_train]`` labels in ``[0, num_classes)``; rows with a negative label are
        unlabelled and never used as neighbours.
      query_features: ``[n_query, d]`` features to classify (a NumPy array is moved to the
        device one chunk at a time).
      num_classes: number of classes.
      votes: ``(k, temperature)`` pairs: ``k`` neighbours, at most the number of labelled train
        examples; ``temperature`` ``None`` for a plain majority vote, else ``T > 0`` for
        ``exp(sim / T)`` votes.
      query_batch_size: number of queries per chunk.
    """
    labels = np.asarray(train_labels)
    labelled = labels >= 0
    num_labelled = int(np.sum(labelled))
    votes = tuple(dict.fromkeys((k, temperature) for k, temperature in votes))
    if not votes:
        raise ValueError("votes is empty: give at least one (k, temperature) pair.")
    for k, temperature in votes:
        if not 1 <= k <= num_labelled:
            raise ValueError(
                f"k={k} must be between 1 and the number of labelled train examples "
                f"({num_labelled})."
            )
        if temperature is not None and not temperature > 0:
            raise ValueError(f"temperature must be positive or None, got {temperature}.")
    if query_batch_size < 1:
        raise ValueError(f"query_batch_size must be positive, got {query_batch_size}.")
    bank = l2_normalize(jnp.asarray(train_features, jnp.float32)[labelled])
    bank_labels = jnp.asarray(labels[labelled], jnp.int32)

    num_queries = len(query_features)
    chunk_size = max(1, min(query_batch_size, num_queries))
    chunks = []
    for start in range(0, num_queries, chunk_size):
        chunk = jnp.asarray(query_features[start : start + chunk_size], jnp.float32)
        num_valid = chunk.shape[0]
        # Pad the last chunk to the common size so that one compilation serves every chunk.
        chunk = jnp.pad(chunk, ((0, chunk_size - num_valid), (0, 0)))
        chunks.append(_predict_chunk(bank, bank_labels, chunk, num_classes, votes)[:, :num_valid])
    if not chunks:
        return {vote: jnp.zeros((0,), jnp.int32) for vote in votes}
    predicted = jnp.concatenate(chunks, axis=1)
    return {vote: predicted[i] for i, vote in enumerate(votes)}


def knn_predict(
    train_features: jax.Array | np.ndarray,
    train_labels: jax.Array | np.ndarray,
    query_features: jax.Array | np.ndarray,
    num_classes: int,
    k: int = 200,
    temperature: float | None = None,
    query_batch_size: int = 512,
) -> jax.Array:
    """Labels ``[n_query]`` (int32) of :func:`knn_predictions` for the one vote rule
    ``(k, temperature)``."""
    vote = (k, temperature)
    return knn_predictions(
        train_features, train_labels, query_features, num_classes, [vote], query_batch_size
    )[vote]


def knn_accuracies(
    train_features: jax.Array | np.ndarray,
    train_labels: jax.Array | np.ndarray,
    query_features: jax.Array | np.ndarray,
    query_labels: jax.Array | np.ndarray,
    num_classes: int,
    votes: Sequence[Vote],
    query_batch_size: int = 512,
) -> dict[Vote, float]:
    """Top-1 accuracy of :func:`knn_predictions` over the labelled queries (negative labels
    skipped), for each vote rule."""
    predictions = knn_predictions(
        train_features, train_labels, query_features, num_classes, votes, query_batch_size
    )
    labels = jnp.asarray(query_labels)
    labelled = labels >= 0
    return {
        vote: float(jnp.sum((predicted == labels) & labelled) / jnp.sum(labelled))
        for vote, predicted in predictions.items()
    }


def knn_accuracy(
    train_features: jax.Array | np.ndarray,
    train_labels: jax.Array | np.ndarray,
    query_features: jax.Array | np.ndarray,
    query_labels: jax.Array | np.ndarray,
    num_classes: int,
    k: int = 200,
    temperature: float | None = None,
    query_batch_size: int = 512,
) -> float:
    """Top-1 accuracy of :func:`knn_predict` over the labelled queries (negative labels skipped)."""
    vote = (k, temperature)
    return knn_accuracies(
        train_features,
        train_labels,
        query_features,
        query_labels,
        num_classes,
        [vote],
        query_batch_size,
    )[vote]
