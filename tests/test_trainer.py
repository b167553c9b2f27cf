"""End-to-end runs of train_and_evaluate on slices of the real (offline) Fashion-MNIST."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from simclr_jax import checkpointing, parallel, reporting, trainer
from simclr_jax.configs import tiny
from simclr_jax.data import pipeline
from simclr_jax.experiment import Experiment

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def config(fashion_mnist_data_dir):
    config = tiny.get_config()
    config.data_dir = fashion_mnist_data_dir
    return config


def _final_params(config, workdir):
    """Parameters of the latest checkpoint in ``workdir``, restored on one device."""
    mesh = parallel.data_mesh()
    template = jax.device_put(Experiment(config, mesh).initial_state(0), parallel.replicated(mesh))
    with checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        state, _ = ckpt.restore(template)
    return int(state.step), jax.device_get(state.params)


def test_tiny_run_writes_checkpoints_metrics_and_results(config, tmp_path):
    config.eval_every_steps = 4
    results = trainer.train_and_evaluate(config, str(tmp_path))

    assert results["kernels"] == "subpixel_input_grads"  # a CPU program on 8 (fake) devices
    for key in ("linear_probe_top1", "knn_k10_top1", "online_probe_top1"):
        assert 0.0 <= results[key] <= 1.0, key
    for key in ("baseline_raw_pixels_top1", "baseline_random_encoder_top1"):
        assert 0.0 <= results[key] <= 1.0, key
    assert results["steps"] == 8
    assert results["epochs"] == pytest.approx(1.0)  # 256 examples / 32 per step = 8 steps
    assert results["wall_time_s"] > 0 and results["views_per_s"] > 0
    assert json.loads((tmp_path / "results.json").read_text()) == pytest.approx(results)

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6, 8]
    for record in train_records:
        assert np.isfinite(record["loss"]) and np.isfinite(record["contrastive_accuracy"])
        assert 0.0 <= record["data_wait_fraction"] <= 1.0
    (eval_record,) = [r for r in records if "loss" not in r]  # every 4 steps, not at the end
    assert eval_record["step"] == 4
    assert 0.0 <= eval_record["eval_knn_k10_top1"] <= 1.0
    assert 0.0 <= eval_record["eval_online_probe_top1"] <= 1.0
    assert json.loads((tmp_path / "config.json").read_text())["model"]["base_width"] == 4
    assert list((tmp_path / "tensorboard").iterdir()), "no TensorBoard event file"
    assert _final_params(config, str(tmp_path))[0] == 8


def _stop_at_step(monkeypatch, stop_step):
    """Sends this process SIGTERM when ``stop_step`` is logged, as a cluster scheduler would."""
    write = reporting.MetricsLog.write

    def write_then_signal(self, step, metrics):
        record = write(self, step, metrics)
        if step == stop_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    monkeypatch.setattr(reporting.MetricsLog, "write", write_then_signal)


def test_resume_after_sigterm_reproduces_an_uninterrupted_run(config, tmp_path, monkeypatch):
    config.compute_baselines = False
    straight = str(tmp_path / "straight")
    trainer.train_and_evaluate(config, straight)

    resumed = str(tmp_path / "resumed")
    with monkeypatch.context() as patch:
        _stop_at_step(patch, 4)
        assert trainer.train_and_evaluate(config, resumed) is None  # stopped cleanly
    assert _final_params(config, resumed)[0] == 4
    assert not (Path(resumed) / "results.json").exists()
    results = trainer.train_and_evaluate(config, resumed)
    assert results["steps"] == 8

    step_a, params_a = _final_params(config, straight)
    step_b, params_b = _final_params(config, resumed)
    assert step_a == step_b == 8
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), params_a, params_b
    )


def test_non_finite_loss_stops_with_the_last_good_checkpoint(config, tmp_path, monkeypatch):
    pretrain_batches = pipeline.pretrain_batches

    def poisoned_after_five(*args, **kwargs):
        for i, batch in enumerate(pretrain_batches(*args, **kwargs)):
            if i >= 5:
                batch = {**batch, "views": np.full_like(batch["views"], np.nan)}
            yield batch

    monkeypatch.setattr(pipeline, "pretrain_batches", poisoned_after_five)
    with pytest.raises(
        trainer.TrainingDivergedError, match=r"at step 6; the last good checkpoint is step 4"
    ):
        trainer.train_and_evaluate(config, str(tmp_path))
    assert _final_params(config, str(tmp_path))[0] == 4


def test_checkpoint_of_an_incompatible_config_is_refused(config, tmp_path):
    config.num_train_steps = 4
    config.evaluate_at_end = False  # train only: the results hold no accuracies
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert results["steps"] == 4 and results["views_per_s"] > 0
    assert not any(key.endswith("_top1") for key in results)
    config.model.base_width = 8
    with pytest.raises(checkpointing.CheckpointError, match="base_width"):
        trainer.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dataset", "fashion_mnistt", r"fashion_mnistt.*fashion_mnist"),
        ("eval_split", "validation", r"validation.*test"),
        ("global_batch_size", 36, r"global_batch_size 36 is not divisible by the 8 devices"),
        ("eval_batch_size", 100, r"eval_batch_size 100 is not divisible by the 8 devices"),
    ],
)
def test_bad_config_fails_early_with_a_clear_message(config, tmp_path, field, value, message):
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(config, str(tmp_path))


def test_unwritable_workdir_fails_early(config, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(checkpointing.CheckpointError, match="a_file"):
        trainer.train_and_evaluate(config, str(blocker / "workdir"))


def test_missing_dataset_without_network_names_the_fix(config, tmp_path, monkeypatch):
    from simclr_jax.data import fashion_mnist_offline

    ensure = fashion_mnist_offline.ensure_fashion_mnist
    no_files = str(tmp_path / "no_debian_files")
    monkeypatch.setattr(
        fashion_mnist_offline, "ensure_fashion_mnist", lambda d: ensure(d, source_dir=no_files)
    )
    monkeypatch.setattr(fashion_mnist_offline, "download_host_reachable", lambda *a, **k: False)
    config.data_dir = str(tmp_path / "empty_tfds")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        trainer.train_and_evaluate(config, str(tmp_path / "workdir"))


def _cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "simclr_jax.train", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_rejects_a_misspelt_config_field(tmp_path):
    result = _cli("--config=tiny", f"--workdir={tmp_path}", "--config.temprature=0.2")
    assert result.returncode != 0
    assert "temprature" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_rejects_a_misspelt_field_of_the_default_config(tmp_path):
    result = _cli(f"--workdir={tmp_path}", "--config.temprature=0.2")
    assert result.returncode != 0
    assert "temprature" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    result = _cli("--config=tiny", f"--workdir={tmp_path}", "--config.dataset=cifar_10")
    assert result.returncode == 1
    assert "cifar10" in result.stderr
    assert "Traceback" not in result.stderr
