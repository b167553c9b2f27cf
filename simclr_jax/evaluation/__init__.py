"""Evaluation of frozen representations: feature extraction, linear probe and k-NN."""

from simclr_jax.evaluation.features import extract_features
from simclr_jax.evaluation.knn import (
    knn_accuracies,
    knn_accuracy,
    knn_predict,
    knn_predictions,
    nearest_neighbours,
)
from simclr_jax.evaluation.linear_probe import (
    DEFAULT_L2_GRID,
    LogisticRegression,
    fit_logistic_regression,
    linear_probe_accuracy,
    predict,
    top_k_accuracy,
)

__all__ = [
    "DEFAULT_L2_GRID",
    "LogisticRegression",
    "extract_features",
    "fit_logistic_regression",
    "knn_accuracies",
    "knn_accuracy",
    "knn_predict",
    "knn_predictions",
    "linear_probe_accuracy",
    "nearest_neighbours",
    "predict",
    "top_k_accuracy",
]
