"""The evaluation suite end to end on a tiny pretraining run of the real (offline) Fashion-MNIST."""

import json
import os
import shutil
import subprocess
import sys

import cli_runs
import jax
import numpy as np
import pytest
from PIL import Image

from simclr_jax import checkpointing, encoder, evaluate, parallel, step, trainer, workdir_lock
from simclr_jax.configs import tiny
from simclr_jax.data import pipeline
from simclr_jax.evaluation import protocols
from simclr_jax.experiment import Experiment

# Every protocol sized to a few steps on the tiny run (train[:256], test[:100], 16 px).
SMALL = {
    "evaluation.knn_ks": (5, 10),
    "evaluation.label_budgets": (3,),
    "evaluation.linear_sgd.epochs": 0.25,
    "evaluation.linear_sgd.batch_size": 64,
    "evaluation.finetune.fractions": (0.5,),
    "evaluation.finetune.epochs": (1.0,),
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
    config.eval_every_steps = 4  # and at the end (step 8): two points of quality_vs_time.png
    config.eval_linear_probe = True
    workdir = tmp_path_factory.mktemp("run")
    trainer.train_and_evaluate(config, str(workdir))
    return workdir


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def test_every_protocol_writes_results_and_pictures(run_dir):
    outcomes = evaluate.run_protocols(str(run_dir), overrides=SMALL)
    eval_dir = run_dir / "eval"
    for name in evaluate.PROTOCOL_NAMES:
        stored = json.loads((eval_dir / f"{name}.json").read_text())
        assert stored["results"] == json.loads(json.dumps(outcomes[name]["results"]))
        assert stored["checkpoint_step"] == 8 and stored["seconds"] > 0
    results = {name: outcome["results"] for name, outcome in outcomes.items()}

    def accuracy(entry):
        assert 0.0 <= entry["top1"] <= entry["top5"] <= 1.0
        return entry["top1"]

    accuracy(results["linear"]["lbfgs"])
    accuracy(results["linear"]["sgd"])
    assert results["linear"]["sgd"]["steps"] == 1  # 256 labelled examples, 1/4 epoch, B=64
    assert set(results["knn"]) == {
        "k=5 majority",
        "k=5 T=0.07",
        "k=10 majority",
        "k=10 T=0.07",
    }
    assert results["label_budget"]["3"]["num_labels"] == 30
    accuracy(results["label_budget"]["3"])
    entry = results["finetune"]["0.5"]
    assert 126 <= entry["num_labels"] <= 130  # half of each class of train[:256]
    assert entry["pretrained"]["steps"] == entry["scratch"]["steps"] == 2
    accuracy(entry["pretrained"])
    accuracy(entry["scratch"])

    # Pictures: 16 px cells, 2 px padding, scaled 3x; figures at 100 dpi.
    assert _png_size(eval_dir / "augmented_views.png") == (3 * (4 * 18 + 2), 3 * (2 * 18 + 2))
    assert _png_size(eval_dir / "retrieval.png") == (3 * (5 * 18 + 2), 3 * (3 * 18 + 2))
    assert results["export"]["path"] == str(eval_dir / "encoder.msgpack")
    assert _png_size(eval_dir / "training_curves.png") == (1000, 700)
    assert _png_size(eval_dir / "quality_vs_time.png") == (2 * 450, 400)  # linear probe, kNN k=10
    assert _png_size(eval_dir / "embedding_tsne.png") == (700, 700)

    rows = protocols.summary_rows(results)
    assert len(rows) == 2 + 4 + 1 + 2  # linear, kNN, budget, fraction x (pretrained, scratch)
    table = protocols.format_table(rows).splitlines()
    assert table[0].split() == ["protocol", "setting", "top-1", "top-5"] and len(table) == 10


def test_exported_encoder_reproduces_the_checkpoint_features(run_dir, tmp_path):
    restored = encoder.from_checkpoint(str(run_dir))
    loaded = encoder.load_encoder(encoder.export_encoder(restored, tmp_path / "enc.msgpack"))
    images = np.random.default_rng(0).uniform(size=(16, *restored.image_shape)).astype(np.float32)
    for output in ("h", "z"):
        np.testing.assert_array_equal(
            np.asarray(loaded(images, output)), np.asarray(restored(images, output))
        )
    # The same features as the trainer's batch-sharded embed step on the checkpoint's state.
    mesh = parallel.data_mesh()
    state = encoder.restore_state(
        Experiment(encoder.read_run_config(str(run_dir)), mesh), str(run_dir)
    )
    sharded = step.jit_embed_step(mesh)(state, jax.device_put(images, parallel.batch_sharded(mesh)))
    np.testing.assert_allclose(np.asarray(loaded(images)), np.asarray(sharded["h"]), atol=1e-5)


def test_features_count_every_example_once_when_batches_do_not_divide(run_dir):
    config = encoder.read_run_config(str(run_dir))
    config.eval_batch_size = 64  # test[:100]: one full batch and one padded with 28 rows
    plan = Experiment(config, parallel.data_mesh())
    state = encoder.restore_state(plan, str(run_dir))
    extracted = protocols.Run(plan, state, str(run_dir)).test
    assert extracted["h"].shape[0] == plan.eval_info.num_examples == 100
    np.testing.assert_array_equal(
        extracted["label"],
        pipeline.split_labels(config.dataset, config.eval_split, data_dir=config.data_dir),
    )


def _corrupt_copy(run_dir, tmp_path):
    """A copy of the run whose newest checkpoint (step 8) has lost its array metadata."""
    workdir = tmp_path / "copy"
    shutil.copytree(run_dir, workdir, ignore=shutil.ignore_patterns("eval", "lock"))
    (workdir / "checkpoints" / "8" / "state" / "_METADATA").unlink()
    return workdir


def test_a_damaged_checkpoint_names_the_earlier_step_to_evaluate(run_dir, tmp_path):
    workdir = _corrupt_copy(run_dir, tmp_path)
    plan = Experiment(encoder.read_run_config(str(workdir)), parallel.data_mesh())
    with pytest.raises(checkpointing.CheckpointError) as error:
        encoder.restore_state(plan, str(workdir))
    message = str(error.value)
    assert message.startswith(f"checkpoint {workdir}/checkpoints/8 cannot be read")
    assert message.endswith(
        "Evaluate an earlier step with --checkpoint=4 (steps found: [4]), or delete that "
        "directory to fall back to step 4."
    )
    assert int(encoder.restore_state(plan, str(workdir), 4).step) == 4


def test_a_damaged_checkpoint_of_a_run_still_training_is_not_to_be_deleted(run_dir, tmp_path):
    workdir = _corrupt_copy(run_dir, tmp_path)
    plan = Experiment(encoder.read_run_config(str(workdir)), parallel.data_mesh())
    with workdir_lock.hold(str(workdir)), pytest.raises(checkpointing.CheckpointError) as error:
        encoder.restore_state(plan, str(workdir))  # as evaluate does while the run trains
    message = str(error.value)
    assert message.startswith(
        f"checkpoint {workdir}/checkpoints/8 cannot be read while the run that holds {workdir} "
        f"(pid {os.getpid()} on "
    )
    assert "do not delete it" in message and "--checkpoint=STEP" in message
    assert "delete that directory" not in message
    assert (workdir / "checkpoints" / "8").is_dir()


def test_evaluate_cli_on_a_workdir_without_checkpoints_is_one_line_and_writes_nothing(
    run_dir, tmp_path
):
    workdir = tmp_path / "untrained"
    workdir.mkdir()
    shutil.copy(run_dir / "config.json", workdir)
    result = cli_runs.run("simclr_jax.evaluate", f"--workdir={workdir}", "--protocol=knn")
    assert result.returncode == 1
    assert cli_runs.error_lines(result.stderr) == [
        f"error: no checkpoint in {workdir / 'checkpoints'}; train the run first."
    ]
    assert sorted(p.name for p in workdir.iterdir()) == ["config.json"]


def test_evaluate_cli_rejects_a_misspelt_override_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "simclr_jax.evaluate", f"--workdir={tmp_path}", "--config.knn_kk=5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "knn_kk" in result.stderr
    assert "Traceback" not in result.stderr


def _brute_force_knn(train_x, train_y, test_x, test_y, k, temperature, num_classes):
    """Weighted cosine kNN in float64 NumPy: each of the k most similar train rows (lower index
    first among equals) votes exp(similarity / T); ties between classes go to the lower one."""
    normalise = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    similarity = normalise(test_x.astype(np.float64)) @ normalise(train_x.astype(np.float64)).T
    correct = 0
    for row, label in zip(similarity, test_y, strict=True):
        nearest = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(num_classes)
        np.add.at(votes, train_y[nearest], np.exp(row[nearest] / temperature))
        correct += int(np.argmax(votes) == label)
    return correct / len(test_y)


def test_raw_pixel_knn_baseline_equals_a_brute_force_numpy_knn(run_dir):
    config = encoder.read_run_config(str(run_dir))
    config.update_from_flattened_dict({"evaluation.knn_ks": (3, 10)})
    config.random_encoder_baseline = False
    plan = Experiment(config, parallel.data_mesh())
    run = protocols.Run(plan, encoder.restore_state(plan, str(run_dir)))
    results = protocols.baselines(run)
    assert "baseline_random_encoder_top1" not in results

    def images(split):
        batches = list(plan.eval_batches(split))
        pixels = np.concatenate(
            [b["image"][b["mask"]].reshape(b["mask"].sum(), -1) for b in batches]
        )
        return pixels, np.concatenate([b["label"][b["mask"]] for b in batches])

    (train_x, train_y), (test_x, test_y) = images("train[:256]"), images("test[:100]")
    for k in (3, 10):
        expected = _brute_force_knn(train_x, train_y, test_x, test_y, k, 0.07, plan.num_classes)
        assert results[f"baseline_raw_pixels_knn_k{k}_top1"] == pytest.approx(expected, abs=1e-6)
    assert 0.0 <= results["baseline_raw_pixels_top1"] <= 1.0
