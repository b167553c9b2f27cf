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


def _label_panel(axis, title: str, xlabel: str) -> None:
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")


def _save(figure, path: str | os.PathLike) -> None:
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png")
    plt.close(figure)


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
        _label_panel(axis, title, "step")
    _save(figure, path)


def quality_series(
    records: list[dict[str, float]], results: dict[str, float]
) -> dict[str, dict[str, object]]:
    """Accuracy against epochs, one series per end-of-run accuracy that the run's evaluations
    during training also logged: ``{name: {"epochs": [...], "top1": [...], "raw_pixels":
    baseline or None}}``, ``name`` in ``linear_probe`` and ``knn_k{k}``. Each series is the
    ``eval_{name}_top1`` records, then the end-of-run ``{name}_top1`` of ``results``."""
    knn_names = {key.removesuffix("_top1") for key in results if key.startswith("knn_k")}
    names = ["linear_probe", *sorted(knn_names, key=lambda name: int(name.removeprefix("knn_k")))]
    series = {}
    for name in names:
        points = [(r["epoch"], r[f"eval_{name}_top1"]) for r in records if f"eval_{name}_top1" in r]
        if not points or f"{name}_top1" not in results:
            continue
        points.append((results["epochs"], results[f"{name}_top1"]))
        baseline = (
            "baseline_raw_pixels_top1"
            if name == "linear_probe"
            else f"baseline_raw_pixels_{name}_top1"
        )
        series[name] = {
            "epochs": [epoch for epoch, _ in points],
            "top1": [top1 for _, top1 in points],
            "raw_pixels": results.get(baseline),
        }
    return series


def save_quality_vs_time(
    records: list[dict[str, float]],
    results: dict[str, float],
    path: str | os.PathLike,
    *,
    dpi: int = 100,
) -> None:
    """Writes the accuracies of :func:`quality_series` against epochs, one panel each, with the
    raw-pixel baseline of the same evaluation as a horizontal line, to the PNG ``path``."""
    series = quality_series(records, results)
    if not series:
        raise ValueError(
            "no accuracy logged during training: run with eval_every_steps > 0 "
            "(and eval_linear_probe for the linear probe)."
        )
    figure, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 4), dpi=dpi)
    for axis, (name, points) in zip(np.atleast_1d(axes), series.items(), strict=True):
        top1 = 100 * np.asarray(points["top1"])
        axis.plot(points["epochs"], top1, marker="o", label="encoder h")
        if points["raw_pixels"] is not None:
            axis.axhline(
                100 * points["raw_pixels"], color="grey", linestyle="--", label="raw pixels"
            )
        title = "linear probe" if name == "linear_probe" else f"kNN k={name.removeprefix('knn_k')}"
        _label_panel(axis, title, "epoch")
        axis.set_ylabel("top-1 (%)")
    _save(figure, path)


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
    _save(figure, path)
