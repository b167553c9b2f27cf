"""Figures: training curves, accuracy against epochs and the 2-D embedding map, written as PNGs of
the expected size."""

import json

import numpy as np
import pytest
from PIL import Image

from simclr_jax import plots


def _size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_training_curves_from_metrics_jsonl(tmp_path):
    records = [
        {"step": s, "loss": 5 - s / 10, "contrastive_accuracy": s / 20, "probe_accuracy": s / 30,
         "learning_rate": 0.1} for s in range(1, 11)
    ] + [{"step": 10, "eval_knn_top1": 0.5}]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plots.read_metrics(path) == records
    plots.save_training_curves(records, tmp_path / "curves.png", dpi=50)
    assert _size(tmp_path / "curves.png") == (500, 350)
    with pytest.raises(ValueError, match="no training record"):
        plots.save_training_curves(records[-1:], tmp_path / "none.png")


def test_quality_vs_time_joins_the_evaluations_during_training_to_the_end_of_run(tmp_path):
    records = [
        {"step": 50, "epoch": 0.5, "loss": 3.0},
        {"step": 100, "epoch": 1.0, "eval_linear_probe_top1": 0.80, "eval_knn_k20_top1": 0.75,
         "eval_knn_k200_top1": 0.70, "eval_online_probe_top1": 0.6},
        {"step": 200, "epoch": 2.0, "eval_linear_probe_top1": 0.85, "eval_knn_k20_top1": 0.82,
         "eval_knn_k200_top1": 0.78},
    ]  # fmt: skip
    results = {
        "epochs": 3.0, "linear_probe_top1": 0.87, "knn_k20_top1": 0.84, "knn_k200_top1": 0.80,
        "online_probe_top1": 0.8, "baseline_raw_pixels_top1": 0.84,
        "baseline_raw_pixels_knn_k20_top1": 0.846, "baseline_raw_pixels_knn_k200_top1": 0.79,
    }  # fmt: skip
    series = plots.quality_series(records, results)
    assert list(series) == ["linear_probe", "knn_k20", "knn_k200"]  # kNN by k, not as text
    assert series["linear_probe"] == {
        "epochs": [1.0, 2.0, 3.0], "top1": [0.80, 0.85, 0.87], "raw_pixels": 0.84
    }  # fmt: skip
    assert series["knn_k200"] == {
        "epochs": [1.0, 2.0, 3.0], "top1": [0.70, 0.78, 0.80], "raw_pixels": 0.79
    }  # fmt: skip
    plots.save_quality_vs_time(records, results, tmp_path / "quality.png", dpi=50)
    assert _size(tmp_path / "quality.png") == (3 * 225, 200)

    # Without baselines: the series have no raw-pixel line; a run that only logged kNN during
    # training has no linear-probe panel.
    without_probe = [{k: v for k, v in r.items() if "linear" not in k} for r in records]
    bare = {k: v for k, v in results.items() if not k.startswith("baseline")}
    series = plots.quality_series(without_probe, bare)
    assert list(series) == ["knn_k20", "knn_k200"]
    assert series["knn_k20"]["raw_pixels"] is None
    plots.save_quality_vs_time(without_probe, bare, tmp_path / "knn_only.png", dpi=50)
    assert _size(tmp_path / "knn_only.png") == (2 * 225, 200)
    with pytest.raises(ValueError, match="eval_every_steps"):
        plots.save_quality_vs_time(records[:1], results, tmp_path / "none.png")


def test_embedding_map_separates_clusters(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    features = 10 * np.eye(8)[labels] + rng.normal(size=(60, 8))
    points = plots.embedding_2d(features, seed=0)
    assert points.shape == (60, 2)
    # Each point's nearest other point in the map has the same class.
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.diag([np.inf] * 60)
    assert np.mean(labels[np.argmin(distances, axis=1)] == labels) > 0.95
    plots.save_embedding_map(points, labels, tmp_path / "map.png", dpi=40)
    assert _size(tmp_path / "map.png") == (280, 280)
    with pytest.raises(ValueError, match="expected points"):
        plots.save_embedding_map(points[:, :1], labels, tmp_path / "bad.png")
