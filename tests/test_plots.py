"""Figures: training curves and the 2-D embedding map, written as PNGs of the expected size."""

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
