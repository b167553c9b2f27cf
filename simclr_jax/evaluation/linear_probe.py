"""Linear evaluation on frozen features: ℓ2-regularised multinomial logistic regression.

This is the SimCLR paper's transfer-learning protocol: L-BFGS on fixed features, no augmentation,
the regularisation strength chosen on a held-out part of the training split. The objective is

    mean over labelled examples of cross_entropy(softmax(x_std @ W + b), y) + l2 / 2 * ||W||^2

with ``x_std`` the features standardised by the training mean and standard deviation (stored in
the model, so prediction applies the same transform) and the bias unregularised. Examples whose
label is negative are unlabelled and ignored everywhere.

The solver is ``optax.lbfgs`` with its zoom line search inside a ``jax.lax.while_loop`` under
``jax.jit``, stopping when the gradient norm (with respect to ``W`` and ``b``) falls below a
tolerance. It runs on a change of variables ``W = P V`` with ``P = (C / K + l2 I)^(-1/2)``, ``C``
the feature covariance and ``K`` the number of classes: a cheap approximation of the inverse
square root of the Hessian at the uniform prediction, which removes most of the ill-conditioning
due to correlated features. The minimiser is the same; only the path to it is shorter.
"""

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from simclr_jax.evaluation import subsets

# One value per decade. Fits run from the strongest regularisation down, each warm-started from
# the previous solution, so the weakly regularised (slowly converging) fits start close.
DEFAULT_L2_GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)

# The path stops once this many consecutive ℓ2 values have not beaten the best held-out accuracy:
# past its peak the accuracy seldom recovers, and the weakest penalties are the slowest fits.
DEFAULT_PATIENCE = 2

# A feature whose standard deviation is below this fraction of max(|mean|, 1) is treated as
# constant (float32 round-off) and only centred, not scaled.
_RELATIVE_STD_FLOOR = 1e-5

# The preconditioner only needs the rough shape of the covariance: estimate it from at most about
# this many evenly spaced examples, which keeps it cheap at ImageNet scale.
_PRECONDITIONER_ROWS = 16384

# Full float32 matrix products, also on accelerators whose default is a reduced precision.
_PRECISION = jax.lax.Precision.HIGHEST


class LogisticRegression(NamedTuple):
    """A linear classifier on standardised features: ``((x - mean) / std) @ weights + bias``.

    A NamedTuple, hence a pytree: it can be passed through ``jax.jit`` and saved as arrays.
    """

    weights: jax.Array  # [d, num_classes]
    bias: jax.Array  # [num_classes]
    feature_mean: jax.Array  # [d]
    feature_std: jax.Array  # [d]


def _standardise(features: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    return (features - mean) / std


@jax.jit
def predict(model: LogisticRegression, features: jax.Array) -> jax.Array:
    """Class logits ``[n, num_classes]`` (float32) for raw (unstandardised) ``features [n, d]``."""
    x = _standardise(jnp.asarray(features, jnp.float32), model.feature_mean, model.feature_std)
    return jnp.matmul(x, model.weights, precision=_PRECISION) + model.bias


def top_k_accuracy(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Fraction of labelled examples whose label is among the ``k`` largest logits.

    Examples with a negative label are unlabelled and not counted (NaN when none is labelled).
    """
    num_classes = logits.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be in [1, {num_classes}] for {num_classes} classes, got {k}.")
    labels = jnp.asarray(labels)
    _, top_classes = jax.lax.top_k(logits, k)
    hit = jnp.any(top_classes == labels[:, None], axis=-1)
    labelled = labels >= 0
    return jnp.sum(hit & labelled) / jnp.sum(labelled)


def _feature_statistics(features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-feature mean and standard deviation; constant features get a deviation of 1 and, as
    their mean, their first value, so that they centre to exactly zero (a float32 mean of a
    large constant can be off by a rounding error): the column is then exactly zero, and the fit
    does not depend on the constant's value."""
    mean = jnp.mean(features, axis=0)
    std = jnp.std(features, axis=0)
    is_constant = std <= _RELATIVE_STD_FLOOR * jnp.maximum(jnp.abs(mean), 1.0)
    return jnp.where(is_constant, features[0], mean), jnp.where(is_constant, 1.0, std)


def _reexpress(
    model: LogisticRegression, mean: jax.Array, std: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Weights and bias on features standardised by ``mean``, ``std`` giving ``model``'s logits."""
    weights = (std / model.feature_std)[:, None] * model.weights
    shift = (mean - model.feature_mean) / model.feature_std
    return weights, model.bias + jnp.matmul(shift, model.weights, precision=_PRECISION)


def _preconditioner(x: jax.Array, l2: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
    """``P = (covariance / num_classes + l2 I)^(-1/2)`` and its inverse, both symmetric."""
    rows = x[:: max(1, x.shape[0] // _PRECONDITIONER_ROWS)]
    covariance = jnp.matmul(rows.T, rows, precision=_PRECISION) / rows.shape[0]
    eigenvalues, eigenvectors = jnp.linalg.eigh(covariance)
    curvature = jnp.maximum(eigenvalues, 0.0) / num_classes + l2
    precondition = jnp.matmul(eigenvectors * curvature**-0.5, eigenvectors.T, precision=_PRECISION)
    inverse = jnp.matmul(eigenvectors * curvature**0.5, eigenvectors.T, precision=_PRECISION)
    return precondition, inverse


@jax.jit
def _fit(
    features: jax.Array,
    labels: jax.Array,
    l2: jax.Array,
    init: LogisticRegression,
    max_iters: jax.Array,
    tolerance: jax.Array,
) -> tuple[LogisticRegression, jax.Array, jax.Array]:
    """Minimises the regularised objective from ``init``; returns (model, iterations, |grad|)."""
    mean, std = _feature_statistics(features)
    x = _standardise(features, mean, std)
    num_classes = init.weights.shape[-1]
    precondition, inverse = _preconditioner(x, l2, num_classes)

    # The solver works on the transposed weights ``V^T`` [num_classes, d]. Their gradient
    # ``r^T @ x`` then keeps the large features as the right-hand operand in their stored layout;
    # for ``W`` [d, num_classes] it would be ``x^T @ r``, which XLA:CPU computes more slowly
    # (docs/cpu_performance.md). Same minimiser, other rounding.
    def objective(params):
        v_transposed, bias = params
        weights_transposed = jnp.matmul(v_transposed, precondition, precision=_PRECISION)
        logits = jnp.matmul(x, weights_transposed.T, precision=_PRECISION) + bias
        cross_entropy = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.mean(cross_entropy) + 0.5 * l2 * jnp.sum(jnp.square(weights_transposed))

    def gradient_norm(state):
        # The state holds the gradient with respect to (V^T, b); d/dW^T = d/dV^T P^-1 as P = P^T.
        grad_v_transposed, grad_bias = optax.tree_utils.tree_get(state, "grad")
        grad_weights = jnp.matmul(grad_v_transposed, inverse, precision=_PRECISION)
        return jnp.sqrt(jnp.sum(jnp.square(grad_weights)) + jnp.sum(jnp.square(grad_bias)))

    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(
            grad, state, params, value=value, grad=grad, value_fn=objective
        )
        return optax.apply_updates(params, updates), state

    def keep_going(carry):
        _, state = carry
        iteration = optax.tree_utils.tree_get(state, "count")
        # NaN compares false, so a diverged solve stops too.
        return (iteration == 0) | ((iteration < max_iters) & (gradient_norm(state) >= tolerance))

    weights, bias = _reexpress(init, mean, std)
    params = (jnp.matmul(weights.T, inverse, precision=_PRECISION), bias)
    params, state = jax.lax.while_loop(keep_going, step, (params, solver.init(params)))
    v_transposed, bias = params
    weights = jnp.matmul(v_transposed, precondition, precision=_PRECISION).T
    model = LogisticRegression(weights, bias, mean, std)
    return model, optax.tree_utils.tree_get(state, "count"), gradient_norm(state)


def _labelled_examples(features, labels) -> tuple[jax.Array, jax.Array]:
    """Float32 features and int32 labels of the examples whose label is not negative."""
    labels = np.asarray(labels)
    keep = labels >= 0
    return jnp.asarray(features, jnp.float32)[keep], jnp.asarray(labels[keep], jnp.int32)


def fit_logistic_regression(
    features: jax.Array | np.ndarray,
    labels: jax.Array | np.ndarray,
    num_classes: int,
    l2: float,
    max_iters: int = 500,
    tolerance: float = 1e-3,
    init: LogisticRegression | None = None,
) -> LogisticRegression:
    """Fits ℓ2-regularised multinomial logistic regression with L-BFGS.

    Args:
      features: ``[n, d]`` frozen features (any float dtype; computed in float32).
      labels: ``[n]`` integer labels in ``[0, num_classes)``; negative labels mark unlabelled
        examples, which are ignored (also for the standardisation statistics).
      num_classes: number of classes.
      l2: strength ``> 0`` of the penalty ``l2 / 2 * ||W||^2`` added to the mean cross-entropy.
      max_iters: cap on L-BFGS iterations (a warning is logged when it stops the solve).
      tolerance: stop once the gradient norm with respect to ``(W, b)`` is below this.
      init: a model to start from (warm start), e.g. the solution for a nearby ``l2``; it is
        re-expressed exactly for this data's standardisation. Default: all zeros.

    Returns:
      The fitted :class:`LogisticRegression`.
    """
    if not l2 > 0:
        raise ValueError(f"l2 must be positive, got {l2}.")
    features, labels = _labelled_examples(features, labels)
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"Need labelled features of shape [n > 0, d], got {features.shape}.")
    if int(jnp.max(labels)) >= num_classes:
        raise ValueError(f"Labels must be below num_classes={num_classes}, got {jnp.max(labels)}.")
    dim = features.shape[1]
    if init is None:
        init = LogisticRegression(
            weights=jnp.zeros((dim, num_classes)),
            bias=jnp.zeros(num_classes),
            feature_mean=jnp.zeros(dim),
            feature_std=jnp.ones(dim),
        )
    model, iterations, gradient_norm = _fit(features, labels, l2, init, max_iters, tolerance)
    if int(iterations) >= max_iters and float(gradient_norm) >= tolerance:
        logging.warning(
            "Logistic regression (l2=%g) stopped at max_iters=%d with gradient norm %.2e > %.2e.",
            l2,
            max_iters,
            float(gradient_norm),
            tolerance,
        )
    return model


def _stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask holding out ``round(fraction * count)`` random examples of each class."""
    holdout = np.zeros(len(labels), dtype=bool)
    for members in subsets.class_orders(labels, seed).values():
        holdout[members[: round(fraction * len(members))]] = True
    if holdout.all() or not holdout.any():
        raise ValueError(
            f"holdout_fraction={fraction} leaves no examples to fit or none to hold out."
        )
    return holdout


def linear_probe_accuracy(
    train_features: jax.Array | np.ndarray,
    train_labels: jax.Array | np.ndarray,
    test_features: jax.Array | np.ndarray,
    test_labels: jax.Array | np.ndarray,
    num_classes: int,
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    max_iters: int = 500,
    tolerance: float = 1e-3,
    patience: int | None = DEFAULT_PATIENCE,
) -> dict:
    """Linear evaluation: picks ℓ2 on held-out TRAIN examples, refits, scores the test split.

    The labelled train examples are split per class (``holdout_fraction`` of each class held
    out, at random with ``seed``); one model per ``l2`` in ``l2_grid`` is fit on the rest, from
    the largest ``l2`` to the smallest, each warm-started from the previous one, until
    ``patience`` consecutive values have not improved on the best held-out top-1 accuracy so far
    (``None``: the whole grid). The ``l2`` with the best held-out top-1 accuracy wins (ties: the
    larger ``l2``); the final model is refit on all labelled train examples with it,
    warm-started from its held-out fit. The test split is used only for the final scores.

    Returns:
      ``{"top1", "top5" (only when num_classes >= 5), "l2", "holdout_top1": {l2: accuracy}}``,
      all Python floats; ``holdout_top1`` has the ``l2`` values that were fit.
    """
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}.")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be a positive integer or None, got {patience}.")
    features, labels = _labelled_examples(train_features, train_labels)
    holdout = _stratified_holdout(np.asarray(labels), holdout_fraction, seed)
    fit_features, fit_labels = features[~holdout], labels[~holdout]
    holdout_features, holdout_labels = features[holdout], labels[holdout]

    def fit(features, labels, l2, init):
        return fit_logistic_regression(
            features, labels, num_classes, l2, max_iters=max_iters, tolerance=tolerance, init=init
        )

    models: dict[float, LogisticRegression] = {}
    holdout_top1: dict[float, float] = {}
    previous = None
    best_l2, without_improvement = None, 0
    for l2 in sorted({float(l2) for l2 in l2_grid}, reverse=True):
        previous = models[l2] = fit(fit_features, fit_labels, l2, previous)
        logits = predict(previous, holdout_features)
        holdout_top1[l2] = float(top_k_accuracy(logits, holdout_labels, 1))
        if best_l2 is None or holdout_top1[l2] > holdout_top1[best_l2]:
            best_l2, without_improvement = l2, 0
        else:
            without_improvement += 1
            if patience is not None and without_improvement >= patience:
                break

    final = fit(features, labels, best_l2, models[best_l2])
    test_logits = predict(final, test_features)
    result = {
        "top1": float(top_k_accuracy(test_logits, test_labels, 1)),
        "l2": best_l2,
        "holdout_top1": holdout_top1,
    }
    if num_classes >= 5:
        result["top5"] = float(top_k_accuracy(test_logits, test_labels, 5))
    return result
