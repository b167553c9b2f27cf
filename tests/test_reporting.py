"""Progress reporting: durations, metrics.jsonl records, throughput and the terminal line."""

import io
import json

import pytest

from simclr_jax import reporting


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.4, "59s"), (65, "1m05s"), (3725, "1h02m05s"), (float("inf"), "?")],
)
def test_format_duration(seconds, text):
    assert reporting.format_duration(seconds) == text


def test_metrics_log_writes_records_throughput_and_progress(tmp_path, monkeypatch):
    clock = iter([100.0, 110.0, 115.0])
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: next(clock))
    terminal = io.StringIO()
    log = reporting.MetricsLog(
        str(tmp_path), total_steps=100, steps_per_epoch=20, global_batch_size=8, stream=terminal
    )
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

    assert first["images_per_s"] == pytest.approx(16.0)
    assert first["eta_s"] == pytest.approx(90.0)
    assert first["epoch"] == pytest.approx(0.5)
    assert "images_per_s" not in second
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [first, second]
    lines = terminal.getvalue().splitlines()
    assert lines[0].startswith("step 10/100  epoch 0.50  loss 2.5000  contrastive_loss 2.0000")
    assert lines[0].endswith("16 img/s  ETA 1m30s")
    assert lines[1] == "step 10/100  epoch 0.50  eval_knn_top1 0.7500"
    assert list((tmp_path / "tensorboard").iterdir())
