"""Training progress: one line on the terminal, ``metrics.jsonl`` and TensorBoard event files.

Only the first process writes; the others keep quiet so that a multi-host run logs once.
"""

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import jax
import tensorflow as tf

from simclr_jax import jsonio


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m05s"``; ``65`` -> ``"1m05s"``; ``"?"`` when not finite."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class MetricsLog:
    """Writes logged steps to ``WORKDIR/metrics.jsonl``, TensorBoard and the terminal.

    Throughput is measured between consecutive :meth:`write` calls: ``views_per_s`` counts
    augmented views (two per example), as the benchmarks do. A run that resumes from the
    checkpoint of step ``first_step`` first drops the records an earlier run logged after that
    step, and any line a crash cut off (the file is rewritten atomically), so that
    ``metrics.jsonl`` reads as one run. ``first_step`` is 0 for a run from scratch.
    """

    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int,
        steps_per_epoch: int,
        global_batch_size: int,
        first_step: int,
        stream: TextIO | None = None,
    ):
        self._enabled = jax.process_index() == 0
        self._total_steps = total_steps
        self._steps_per_epoch = steps_per_epoch
        self._views_per_step = 2 * global_batch_size
        self._stream = stream or sys.stdout  # looked up now: redirect_stdout applies
        self._last: tuple[int, float] | None = None
        self._path = os.path.join(workdir, "metrics.jsonl")
        if self._enabled:
            if os.path.exists(self._path):
                kept = [r for r in jsonio.read_jsonl(self._path) if r.get("step", 0) <= first_step]
                jsonio.write_jsonl(self._path, kept)
            self._jsonl = open(self._path, "a")  # noqa: SIM115
            self._summary = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def start(self, step: int) -> None:
        """Marks the step from which throughput and ETA are measured (e.g. after a restore)."""
        self._last = (step, time.perf_counter())

    def write(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Logs ``metrics`` at ``step`` (steps completed); returns them with throughput added."""
        now = time.perf_counter()
        record = {"step": step, "epoch": step / self._steps_per_epoch, **metrics}
        if self._last is not None and step > self._last[0]:
            seconds_per_step = (now - self._last[1]) / (step - self._last[0])
            record["views_per_s"] = self._views_per_step / seconds_per_step
            record["eta_s"] = seconds_per_step * (self._total_steps - step)
        self._last = (step, now)
        if self._enabled:
            try:
                self._jsonl.write(json.dumps(record) + "\n")
                self._jsonl.flush()
            except OSError as error:  # a full disk, say: name the file
                # Closed now: its buffer still holds the line, which close() would fail on again.
                with contextlib.suppress(OSError):
                    self._jsonl.close()
                raise self._named(error) from error
            with self._summary.as_default(step=step):
                for name, value in record.items():
                    if name != "step":
                        tf.summary.scalar(name, value)
            self._summary.flush()
            print(self._progress_line(record), file=self._stream, flush=True)
        return record

    def _progress_line(self, record: dict[str, float]) -> str:
        parts = [f"step {record['step']}/{self._total_steps}", f"epoch {record['epoch']:.2f}"]
        if "loss" not in record:  # an evaluation record
            others = sorted(set(record) - {"step", "epoch", "views_per_s", "eta_s"})
            return "  ".join(parts + [f"{name} {record[name]:.4f}" for name in others])
        parts += [
            f"loss {record['loss']:.4f}",
            f"contrastive_loss {record.get('contrastive_loss', math.nan):.4f}",
            f"contrastive_acc {record.get('contrastive_accuracy', math.nan):.3f}",
            f"probe_acc {record.get('probe_accuracy', math.nan):.3f}",
        ]
        if "views_per_s" in record:
            parts.append(f"{record['views_per_s']:.0f} views/s")
            parts.append(f"ETA {format_duration(record['eta_s'])}")
        return "  ".join(parts)

    def _named(self, error: OSError) -> OSError:
        """``error`` naming ``metrics.jsonl``."""
        return OSError(error.errno, error.strerror, self._path)

    def close(self) -> None:
        if not self._enabled:
            return
        try:
            self._jsonl.close()
        except OSError as error:
            raise self._named(error) from error
        finally:
            self._summary.close()


def percent(value: float | None) -> str:
    """An accuracy (a fraction) as a table cell: ``0.8775`` is ``"87.8%"``, None is empty."""
    return "" if value is None else f"{100 * value:.1f}%"


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells, the first a header, as plain text: columns padded to their widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def results_table(results: dict[str, Any]) -> str:
    """The end of a run in a few lines: each accuracy of the encoder beside the same evaluation
    of raw pixels and of a random encoder (where the run computed them), then the time."""
    knn_ks = sorted(
        int(key.removeprefix("knn_k").removesuffix("_top1"))
        for key in results
        if key.startswith("knn_k") and key.endswith("_top1")
    )
    rows = [
        (
            "linear probe",
            "linear_probe_top1",
            "baseline_raw_pixels_top1",
            "baseline_random_encoder_top1",
        ),
        *(
            (f"kNN k={k} (weighted)", f"knn_k{k}_top1", f"baseline_raw_pixels_knn_k{k}_top1", None)
            for k in knn_ks
        ),
        ("online probe", "online_probe_top1", None, None),
    ]
    table = [("top-1", "encoder", "raw pixels", "random encoder")]
    table += [
        (label, *(percent(results.get(key)) if key else "" for key in keys))
        for label, *keys in rows
        if keys[0] in results
    ]
    used = [i for i in range(4) if i < 2 or any(row[i] for row in table[1:])]
    lines = [text_table([[row[i] for i in used] for row in table])] if len(table) > 1 else []
    lines.append(
        f"{results['steps']} steps ({results['epochs']:.2f} epochs), pretraining "
        f"{format_duration(results['train_time_s'])} at {results['views_per_s']:.0f} views/s, "
        f"{format_duration(results['wall_time_s'])} in all; kernels: {results['kernels']}"
    )
    return "\n".join(lines)
