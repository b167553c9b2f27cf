"""The evaluation suite end to end on a tiny pretraining run of the real (offline) Fashion-MNIST."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from simclr_jax import encoder, evaluate, parallel, step, trainer
from simclr_jax.evaluation import protocols

# Every protocol sized to a few steps on the tiny run (train[:256], test[:100], 16 px).
SMALL = {
    "evaluation.knn_ks": (5, 10),
    "evaluation.label_budgets": (2, 5),
    "evaluation.linear_sgd.epochs": 1.0,
    "evaluation.linear_sgd.batch_size": 64,
    "evaluation.finetune.fractions": (0.25, 1.0),
    "evaluation.finetune.epochs": (2.0, 1.0),
    "evaluation.finetune.batch_size": 64,
    "evaluation.finetune.head_layers": 1,
    "evaluation.embedding_points": 60,
    "evaluation.retrieval_queries": 3,
    "evaluation.retrieval_k": 4,
    "evaluation.view_pairs": 4,
}


@pytest.fixture(scope="module")
def run_dir(fashion_mnist_data_dir, tmp_path_factory):
    config = tiny.get_config()
    config.data_dir = fashion_mnist_data_dir
    config.compute_baselines = False
    workdir = tmp_path_factory.mktemp("run")
    trainer.train_and_evaluate(config, str(workdir))
    return workdir


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def test_every_protocol_writes_results_and_pictures(run_dir):
    results = evaluate.run_protocols(str(run_dir), overrides=SMALL)
    eval_dir = run_dir / "eval"
    for name in evaluate.PROTOCOL_NAMES:
        stored = json.loads((eval_dir / f"{name}.json").read_text())
        assert stored == pytest.approx(json.loads(json.dumps(results[name])))
        assert stored["checkpoint_step"] == 8

    def accuracy(entry):
        assert 0.0 <= entry["top1"] <= entry["top5"] <= 1.0
        return entry["top1"]

    accuracy(results["linear"]["lbfgs"])
    accuracy(results["linear"]["sgd"])
    assert results["linear"]["sgd"]["steps"] == 4  # 256 labelled examples, 1 epoch, B=64
    assert set(results["knn"]) - {"seconds", "checkpoint_step"} == {
        "k=5 majority",
        "k=5 T=0.07",
        "k=10 majority",
        "k=10 T=0.07",
    }
    for n in (2, 5):
        assert results["label_budget"][str(n)]["num_labels"] == 10 * n
        accuracy(results["label_budget"][str(n)])
    for fraction in ("0.25", "1"):
        entry = results["finetune"][fraction]
        accuracy(entry["pretrained"])
        accuracy(entry["scratch"])
    assert results["finetune"]["1"]["num_labels"] == 256

    # Pictures: 16 px cells, 2 px padding, scaled 2x; figures at 100 dpi.
    assert _png_size(eval_dir / "augmented_views.png") == (2 * (4 * 18 + 2), 2 * (2 * 18 + 2))
    assert _png_size(eval_dir / "retrieval.png") == (2 * (5 * 18 + 2), 2 * (3 * 18 + 2))
    assert _png_size(eval_dir / "training_curves.png") == (1000, 700)
    assert _png_size(eval_dir / "embedding_tsne.png") == (700, 700)

    rows = protocols.summary_rows(results)
    assert len(rows) == 2 + 4 + 2 + 2 * 2  # linear, kNN, budgets, fractions x (pretrained, scratch)
    table = protocols.format_table(rows).splitlines()
    assert table[0].split() == ["protocol", "setting", "top-1", "top-5"] and len(table) == 13


def test_exported_encoder_reproduces_the_checkpoint_features(run_dir, tmp_path):
    restored = encoder.from_checkpoint(str(run_dir))
    loaded = encoder.load_encoder(encoder.export_encoder(restored, tmp_path / "enc.msgpack"))
    images = np.random.default_rng(0).uniform(size=(16, *restored.image_shape)).astype(np.float32)
    for output in ("h", "z"):
        np.testing.assert_array_equal(
            np.asarray(loaded(images, output)), np.asarray(restored(images, output))
        )
    # The same features as the trainer's batch-sharded embed step on the checkpoint's state.
    plan = trainer._RunPlan(encoder.read_run_config(str(run_dir)))
    mesh = parallel.data_mesh()
    state = encoder.restore_state(plan, str(run_dir), mesh)
    sharded = step.jit_embed_step(mesh)(state, jax.device_put(images, parallel.batch_sharded(mesh)))
    np.testing.assert_allclose(np.asarray(loaded(images)), np.asarray(sharded["h"]), atol=1e-5)
