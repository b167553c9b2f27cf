"""End-to-end runs of train_and_evaluate on slices of the real (offline) Fashion-MNIST."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import cli_runs
import jax
import numpy as np
import pytest

from simclr_jax import checkpointing, parallel, reporting, trainer, workdir_lock
from simclr_jax.configs import tiny
from simclr_jax.data import pipeline
from simclr_jax.experiment import Experiment


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
    config.eval_linear_probe = True
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
    assert 0.0 <= eval_record["eval_linear_probe_top1"] <= 1.0
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
    # What a run killed later would have left: records past its checkpoint, the last one torn.
    metrics = Path(resumed) / "metrics.jsonl"
    logged = metrics.read_text()
    with metrics.open("a") as f:
        f.write(json.dumps({"step": 6, "loss": -1.0}) + '\n{"step": 8, "lo')
    results = trainer.train_and_evaluate(config, resumed)
    assert results["steps"] == 8

    # The log reads as one run: its own first part, then the resumed steps, each once.
    assert metrics.read_text().startswith(logged)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert records[2]["loss"] > 0

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
    width, config.model.base_width = config.model.base_width, 8
    with pytest.raises(checkpointing.CheckpointError, match="base_width"):
        trainer.train_and_evaluate(config, str(tmp_path))
    # The same parameters under another loss: training does not resume (evaluation would).
    config.model.base_width, config.objective = width, "supcon"
    with pytest.raises(checkpointing.CheckpointError, match="objective"):
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
    with pytest.raises(workdir_lock.WorkdirError, match="a_file"):
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


def _cli(*args, patch=""):
    return cli_runs.run("simclr_jax.train", *args, patch=patch)


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


def test_cli_rejects_a_value_out_of_range_in_one_line_before_touching_the_workdir(tmp_path):
    workdir = tmp_path / "run"
    result = _cli("--config=tiny", f"--workdir={workdir}", "--config.base_learning_rate=-1")
    assert result.returncode == 1
    assert cli_runs.error_lines(result.stderr) == [
        "error: config field base_learning_rate = -1.0 is invalid: it must be a finite number "
        "above 0."
    ]
    assert not workdir.exists()


def test_cli_names_a_corrupt_image_in_one_line_before_training(tmp_path):
    from PIL import Image

    images = tmp_path / "images" / "train" / "shirts"
    images.mkdir(parents=True)
    for i in range(3):
        Image.new("L", (16, 16), color=i).save(images / f"{i}.png")
    (images / "1.png").write_bytes((images / "1.png").read_bytes()[:40])  # cut off
    result = _cli(
        "--config=tiny",
        f"--workdir={tmp_path / 'run'}",
        "--config.dataset=image_folder",
        f"--config.dataset_dir={tmp_path / 'images'}",
        "--config.train_split=train",
        "--config.eval_split=train",
        "--config.probe_train_split=train",
    )
    assert result.returncode == 1
    (line,) = cli_runs.error_lines(result.stderr)
    assert line.startswith(f"error: image folder {tmp_path / 'images' / 'train'}: 1 unreadable")
    assert str(images / "1.png") in line
    assert not (tmp_path / "run" / "checkpoints").exists()


# Run before the training command, in its process (tests/cli_runs.py): the run pauses once step 4
# is logged until the file $RESUME_WHEN exists.
PAUSE_AT_STEP_4 = """
import os, time
from simclr_jax import reporting
write = reporting.MetricsLog.write
def write_then_pause(self, step, metrics):
    record = write(self, step, metrics)
    while step == 4 and not os.path.exists(os.environ["RESUME_WHEN"]):
        time.sleep(0.1)
    return record
reporting.MetricsLog.write = write_then_pause
"""


def _wait_for_step(metrics, step, process, timeout=300):
    """Waits until ``process`` has logged ``step`` in the ``metrics`` file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if metrics.exists() and f'"step": {step},' in metrics.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} was not logged in {timeout} s")


def test_a_second_trainer_in_the_same_workdir_is_refused_and_the_first_finishes(
    fashion_mnist_data_dir, tmp_path
):
    workdir = tmp_path / "run"
    args = [
        "--config=tiny",
        f"--workdir={workdir}",
        f"--config.data_dir={fashion_mnist_data_dir}",
        "--config.evaluate_at_end=False",
    ]
    resume_when = tmp_path / "resume"
    first = subprocess.Popen(
        cli_runs.command("simclr_jax.train", *args, patch=PAUSE_AT_STEP_4),
        cwd=cli_runs.REPO_ROOT,
        env={**cli_runs.environment(), "RESUME_WHEN": str(resume_when)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_step(workdir / "metrics.jsonl", 4, first)
        second = _cli(*args, "--config.seed=1")
    finally:
        resume_when.touch()
        out, err = first.communicate(timeout=300)

    assert second.returncode == 1
    (line,) = cli_runs.error_lines(second.stderr)
    assert line.startswith(f"error: workdir {workdir} is in use by pid {first.pid} on ")
    assert first.returncode == 0, err
    assert "Traceback" not in err and "resumed" not in out
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    assert json.loads((workdir / "config.json").read_text())["seed"] == 0
    assert json.loads((workdir / "results.json").read_text())["steps"] == 8
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "8"]
    assert workdir_lock.holder(str(workdir)) is None


# The run sends itself SIGTERM once step 2 is logged, as a cluster scheduler would.
SIGTERM_AT_STEP_2 = """
import os, signal
from simclr_jax import reporting
write = reporting.MetricsLog.write
def write_then_signal(self, step, metrics):
    record = write(self, step, metrics)
    if step == 2:
        os.kill(os.getpid(), signal.SIGTERM)
    return record
reporting.MetricsLog.write = write_then_signal
"""


def test_cli_stopped_by_sigterm_exits_75_with_its_checkpoint_saved(
    fashion_mnist_data_dir, tmp_path
):
    workdir = tmp_path / "run"
    args = ["--config=tiny", f"--workdir={workdir}", f"--config.data_dir={fashion_mnist_data_dir}"]
    result = _cli(*args, "--config.evaluate_at_end=False", patch=SIGTERM_AT_STEP_2)
    assert result.returncode == os.EX_TEMPFAIL == 75
    assert f"stopped by signal {int(signal.SIGTERM)} at step 2" in result.stdout
    assert cli_runs.error_lines(result.stderr) == []
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
    assert not (workdir / "results.json").exists()


# A full disk under the second save, which holds the run until its background part has failed:
# the next step starts after the failure.
FULL_DISK_AT_THE_SECOND_SAVE_BEFORE_THE_NEXT_STEP = (
    cli_runs.FULL_DISK_AT_THE_SECOND_SAVE
    + """
import time
from simclr_jax import checkpointing
save = checkpointing.Checkpointer.save
def save_and_wait_for_the_background_part(self, *args, **kwargs):
    started = save(self, *args, **kwargs)
    while self._manager.is_saving_in_progress():
        time.sleep(0.01)
    return started
checkpointing.Checkpointer.save = save_and_wait_for_the_background_part
"""
)


def test_a_full_disk_stops_the_run_at_the_failed_save_in_one_line(
    config, fashion_mnist_data_dir, tmp_path
):
    workdir = tmp_path / "run"
    result = _cli(
        "--config=tiny",
        f"--workdir={workdir}",
        f"--config.data_dir={fashion_mnist_data_dir}",
        "--config.checkpoint_every_steps=2",  # saves at 2, 4 (fails), 6 and 8
        "--config.log_every_steps=1",
        patch=FULL_DISK_AT_THE_SECOND_SAVE_BEFORE_THE_NEXT_STEP,
    )
    assert result.returncode == 1, result.stderr
    # Orbax logs the failure too (also at exit, from a thread of the save): none of it is shown.
    assert "Traceback" not in result.stderr, result.stderr
    assert not re.search(r"^E\d{4} ", result.stderr, re.MULTILINE), result.stderr
    # Exactly one line reports the error. Other lines (a library's warning, which may depend on
    # the machine's load) are not counted; they are shown if this fails.
    errors = [line for line in cli_runs.error_lines(result.stderr) if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    (line,) = errors
    # The size is the last checkpoint's on disk, rounded up: about 1 MB, by file system.
    size = re.search(r"a checkpoint takes about (\d+) MB", line)
    assert size and 1 <= int(size.group(1)) <= 3, line
    assert line == (
        f"error: the disk is full: saving checkpoint {workdir / 'checkpoints' / '4'} failed "
        f"(no space left on device in {workdir / 'checkpoints'}); the last complete checkpoint, "
        f"step 2, is intact. Free some space (a checkpoint takes about {size.group(1)} MB), then "
        "rerun the same command to resume."
    )
    logged = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").open()]
    assert logged == [1, 2, 3, 4]  # step 5 never started: stopped at once, not at the next save
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert _final_params(config, str(workdir))[0] == 2  # intact and restorable
