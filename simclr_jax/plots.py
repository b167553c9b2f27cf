"""Figures of a run as PNG files, with matplotlib: training curves and a 2-D embedding map.

(Image mosaics, such as augmented views or retrieved neighbours, are in :mod:`visualize`.)
"""

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import numpy as np

from simclr_jax import jsonio

# Panels of the training-curve figure: (title, metrics.jsonl keys drawn in it).
CURVE_PANELS = (
    ("loss", ("loss", "contrastive_loss", "probe_loss")),
    ("contrastive accuracy", ("contrastive_accuracy",)),
    ("probe accuracy", ("probe_accuracy", "eval_online_probe_top1", "eval_knn_top1")),
    ("learning rate", ("learning_rate",)),
)


def read_metrics(path: str | os.PathLike) -> list[dict[str, float]]:
    """The records of a ``metrics.jsonl`` file, one dict per line (a line cut off by a crash is
    skipped with a warning: :func:`simclr_jax.jsonio.read_jsonl`)."""
    return jsonio.read_jsonl(path)


def save_training_curves(
    records: list[dict[str, float]], path: str | os.PathLike, *, dpi: int = 100
) -> None:
    """Writes a 2×2 figure of loss, contrastive accuracy, probe accuracy and learning rate
    against step (each series from the records that have it) to the PNG ``path``."""
    if not any("loss" in record for record in records):
        raise ValueError("no training record (with a 'loss') to plot.")
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=dpi)
    for axis, (title, keys) in zip(axes.flat, CURVE_PANELS, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, marker="." if len(points) < 30 else None, label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png")
    plt.close(figure)


def embedding_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """t-SNE of ``features [n, d]`` (cosine distance, PCA initialisation) -> ``[n, 2]``."""
    from sklearn.manifold import TSNE

    features = np.asarray(features, np.float32)
    perplexity = min(30.0, (len(features) - 1) / 3)
    return TSNE(
        n_components=2, metric="cosine", init="pca", perplexity=perplexity, random_state=seed
    ).fit_transform(features)


def save_embedding_map(
    points: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike,
    *,
    class_names: list[str] | None = None,
    dpi: int = 100,
) -> None:
    """Writes a scatter plot of 2-D ``points`` coloured by ``labels`` to the PNG ``path``."""
    points, labels = np.asarray(points), np.asarray(labels)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) != len(labels):
        raise ValueError(
            f"expected points [n, 2] and labels [n], got {points.shape} and {labels.shape}."
        )
    figure, axis = plt.subplots(figsize=(7, 7), dpi=dpi)
    colours = plt.get_cmap("tab10" if labels.max(initial=0) < 10 else "tab20")
    for label in np.unique(labels):
        chosen = labels == label
        name = class_names[label] if class_names else str(label)
        axis.scatter(*points[chosen].T, s=4, color=colours(label % colours.N), label=name)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.legend(markerscale=3, fontsize="small", loc="best")
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png")
    plt.close(figure)
