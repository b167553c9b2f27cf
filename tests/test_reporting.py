"""Progress reporting: durations, metrics.jsonl records, throughput and the terminal line."""

import contextlib
import errno
import io
import json
import os

import pytest

from simclr_jax import reporting


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.4, "59s"), (65, "1m05s"), (3725, "1h02m05s"), (float("inf"), "?")],
)
def test_format_duration(seconds, text):
    assert reporting.format_duration(seconds) == text


def _metrics_log(
    workdir, *, total_steps=8, steps_per_epoch=8, first_step=0, stream=None
) -> reporting.MetricsLog:
    """A log of a run of ``total_steps`` steps of 8 examples in ``workdir``, from ``first_step``,
    printing to ``stream`` (default: a buffer of its own)."""
    return reporting.MetricsLog(
        str(workdir),
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        global_batch_size=8,
        first_step=first_step,
        stream=io.StringIO() if stream is None else stream,
    )


def test_metrics_log_writes_records_throughput_and_progress(tmp_path, monkeypatch):
    clock = iter([100.0, 110.0, 115.0])
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: next(clock))
    terminal = io.StringIO()
    log = _metrics_log(tmp_path, total_steps=100, steps_per_epoch=20, stream=terminal)
    log.start(0)
    train = {
        "loss": 2.5,
        "contrastive_loss": 2.0,
        "contrastive_accuracy": 0.5,
        "probe_accuracy": 0.25,
    }
    first = log.write(10, train)  # 10 steps in 10 s: 1 step/s, 16 views per step
    second = log.write(10, {"eval_knn_top1": 0.75})  # same step: no throughput
    log.close()

    assert first["views_per_s"] == pytest.approx(16.0)
    assert first["eta_s"] == pytest.approx(90.0)
    assert first["epoch"] == pytest.approx(0.5)
    assert "views_per_s" not in second
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [first, second]
    lines = terminal.getvalue().splitlines()
    assert lines[0].startswith("step 10/100  epoch 0.50  loss 2.5000  contrastive_loss 2.0000")
    assert lines[0].endswith("16 views/s  ETA 1m30s")
    assert lines[1] == "step 10/100  epoch 0.50  eval_knn_top1 0.7500"
    assert list((tmp_path / "tensorboard").iterdir())


def test_a_resumed_log_drops_records_past_its_checkpoint_and_a_torn_line(tmp_path, caplog):
    # What a run killed after logging step 6 leaves, its checkpoint being step 4: steps 5 and 6
    # will be trained (and logged) again, and the crash cut the last line in half.
    path = tmp_path / "metrics.jsonl"
    earlier = [{"step": s, "loss": 10.0 - s} for s in (2, 4)] + [{"step": 4, "eval_knn": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in [*earlier, {"step": 6, "loss": 1.0}]))
    with path.open("a") as f:
        f.write('{"step": 8, "lo')
    log = _metrics_log(tmp_path, first_step=4)
    log.start(4)
    resumed = log.write(6, {"loss": 3.0})
    log.close()

    assert [json.loads(line) for line in path.read_text().splitlines()] == [*earlier, resumed]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"{path}: skipped 1 line(s)") and "(line 5)" in warning


class FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails with ENOSPC."""

    def writable(self):
        return True

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_metrics_jsonl_and_still_closes_the_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(
        reporting, "open", lambda *_: io.TextIOWrapper(io.BufferedWriter(FullDisk())), raising=False
    )
    closed = []
    create_file_writer = reporting.tf.summary.create_file_writer

    def recording_file_writer(logdir):
        writer = create_file_writer(logdir)
        close = writer.close
        writer.close = lambda: closed.append(logdir) or close()
        return writer

    monkeypatch.setattr(reporting.tf.summary, "create_file_writer", recording_file_writer)
    log = _metrics_log(tmp_path)
    # As in the trainer: the log is closed while the error unwinds, and must not replace it.
    with pytest.raises(OSError) as error, contextlib.closing(log):
        log.write(2, {"loss": 1.0})
    path = tmp_path / "metrics.jsonl"
    assert str(error.value) == f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}: '{path}'"
    assert closed == [str(tmp_path / "tensorboard")]


RUN = {
    "steps": 938,
    "epochs": 4.0,
    "train_time_s": 548.0,
    "wall_time_s": 694.0,
    "views_per_s": 876.2,
    "kernels": "onednn",
}


def test_results_table_puts_each_accuracy_beside_its_baselines():
    results = {
        **RUN,
        "linear_probe_top1": 0.8589,
        "knn_k20_top1": 0.825,
        "knn_k200_top1": 0.80,
        "online_probe_top1": 0.795,
        "baseline_raw_pixels_top1": 0.8436,
        "baseline_random_encoder_top1": 0.5988,
        "baseline_raw_pixels_knn_k20_top1": 0.846,
        "baseline_raw_pixels_knn_k200_top1": 0.791,
    }
    lines = reporting.results_table(results).splitlines()
    assert lines[0].split() == ["top-1", "encoder", "raw", "pixels", "random", "encoder"]
    assert lines[1].split() == ["linear", "probe", "85.9%", "84.4%", "59.9%"]
    assert lines[2].split() == ["kNN", "k=20", "(weighted)", "82.5%", "84.6%"]
    assert lines[3].split() == ["kNN", "k=200", "(weighted)", "80.0%", "79.1%"]
    assert lines[4].split() == ["online", "probe", "79.5%"]
    assert lines[5] == (
        "938 steps (4.00 epochs), pretraining 9m08s at 876 views/s, 11m34s in all; kernels: onednn"
    )


def test_results_table_without_baselines_or_without_evaluation():
    lines = reporting.results_table({**RUN, "linear_probe_top1": 0.5, "knn_k10_top1": 0.4})
    assert [line.split() for line in lines.splitlines()[:3]] == [
        ["top-1", "encoder"],
        ["linear", "probe", "50.0%"],
        ["kNN", "k=10", "(weighted)", "40.0%"],
    ]
    (only_time,) = reporting.results_table(RUN).splitlines()
    assert only_time.startswith("938 steps (4.00 epochs)")
