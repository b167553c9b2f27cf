"""``train_and_evaluate(config, workdir)``: SimCLR pretraining, checkpoints and evaluation.

Importable from notebooks and tests; ``python -m simclr_jax.train`` is a thin wrapper around it.
The run is resumable: rerunning with the same workdir continues from the latest checkpoint, with
the data stream continuing where it stopped. SIGTERM/SIGINT save a checkpoint and stop cleanly
(with several processes, all of them at the next log or checkpoint step). One run at a time holds
a workdir (:mod:`simclr_jax.workdir_lock`); a checkpoint that fails to save (a full disk) stops the
run, with the previous checkpoint intact: within a step of the failure being noticed, or, with
several processes (which wait for each save), at that save on every process. The next batches are
assembled on the devices in a background thread while a step runs; the fraction of time the loop
still waits for them is logged as ``data_wait_fraction``.
"""

import contextlib
import itertools
import math
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from simclr_jax import (
    checkpointing,
    jsonio,
    parallel,
    prefetch,
    reporting,
    step,
    visualize,
    workdir_lock,
)
from simclr_jax.evaluation import features, protocols
from simclr_jax.experiment import Experiment


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
    """Turns SIGTERM/SIGINT into a request (the signal number appended to the yielded list)."""
    requested: list[int] = []
    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {}
    with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread
        for signum in handled:
            previous[signum] = signal.signal(signum, lambda s, _: requested.append(s))
    try:
        yield requested
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _on_any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process; with several, every process must call this."""
    if jax.process_count() == 1:
        return flag
    return bool(np.max(multihost_utils.process_allgather(np.array(flag, np.int32))))


def _agreed_stop(requested: bool, at_sync_point: bool) -> bool:
    """Whether every process stops now, given this process's own stop request.

    One process stops as soon as it is asked. Several processes must stop at the same step, or
    the ones still training wait forever in the step's collectives: they only stop at sync points
    (log and checkpoint steps, the same on every process), when any of them has been asked.
    """
    if jax.process_count() > 1 and not at_sync_point:
        return False
    return _on_any_process(requested)


def _save(
    checkpointer: checkpointing.Checkpointer,
    done: int,
    state: step.TrainState,
    metadata: dict[str, Any],
) -> None:
    """Starts saving checkpoint ``done``. With several processes, waits for the save and raises
    on every process when it failed on any: a process raising alone would leave the others
    waiting forever in the next collective."""
    if jax.process_count() == 1:
        checkpointer.save(done, state, metadata, force=True)
        return
    failure = None
    try:
        checkpointer.save(done, state, metadata, force=True)
        checkpointer.wait_until_finished()
    except Exception as error:  # raised below, once every process knows
        failure = error
    if _on_any_process(failure is not None):
        raise failure or checkpointing.CheckpointError(
            f"saving checkpoint {os.path.join(checkpointer.directory, str(done))} failed on "
            "another process (its error says why); fix the cause, then rerun the same command "
            "to resume."
        )


class _WaitFraction:
    """The fraction of wall time the loop spent waiting for input since the last call."""

    def __init__(self, batches: prefetch.DevicePrefetcher):
        self._batches = batches
        self._mark = (time.perf_counter(), batches.wait_seconds)

    def since_last(self) -> float:
        now, waited = time.perf_counter(), self._batches.wait_seconds
        (then, waited_then), self._mark = self._mark, (now, waited)
        return (waited - waited_then) / max(now - then, 1e-9)


def _write_json(path: str, payload: dict[str, Any]) -> None:
    """Writes ``payload`` atomically (temporary file, then rename) from the first process only."""
    if jax.process_index() == 0:
        jsonio.write_json(path, payload)


def _log_step(
    done: int,
    metrics: step.Metrics,
    log: reporting.MetricsLog,
    waits: _WaitFraction,
    checkpointer: checkpointing.Checkpointer,
) -> None:
    """Logs step ``done``'s metrics; raises TrainingDivergedError if the loss is not finite."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(values["loss"]):
        last_good = checkpointer.latest_step()
        where = (
            f"the last good checkpoint is step {last_good} in {checkpointer.directory}"
            if last_good is not None
            else "no checkpoint was written before it"
        )
        raise TrainingDivergedError(
            f"the loss is {values['loss']} at step {done}; {where}. Lower the "
            "learning rate or raise the temperature, then rerun."
        )
    log.write(done, {**values, "data_wait_fraction": waits.since_last()})


def _train(
    experiment: Experiment,
    state: step.TrainState,
    checkpointer: checkpointing.Checkpointer,
    log: reporting.MetricsLog,
) -> tuple[step.TrainState, bool]:
    """The training loop from ``state.step`` to the end; returns (state, completed)."""
    config, mesh = experiment.config, experiment.mesh
    train_step = experiment.train_step()
    base_key = jax.random.key(config.seed)
    start = int(state.step)
    batches = prefetch.DevicePrefetcher(experiment.pretrain_batches(start), mesh)
    log.start(start)
    waits = _WaitFraction(batches)
    with _stop_requests() as stop_requests, contextlib.closing(batches):
        for current in range(start, experiment.total_steps):
            checkpointer.check_saves()  # a save that failed in the background stops the run now
            batch = next(batches)
            state, metrics = train_step(state, batch, jax.random.fold_in(base_key, current))
            done = current + 1
            is_last = done == experiment.total_steps
            at_log_step = done % config.log_every_steps == 0
            at_save_step = done % config.checkpoint_every_steps == 0
            logged = at_log_step or at_save_step or is_last  # never save a diverged state
            if logged:
                _log_step(done, metrics, log, waits, checkpointer)
            # Checked after logging, so that a signal received meanwhile stops at this step.
            stop = _agreed_stop(bool(stop_requests), at_log_step or at_save_step)
            if stop and not logged:
                _log_step(done, metrics, log, waits, checkpointer)
            should_save = at_save_step or is_last or stop
            if should_save:
                _save(checkpointer, done, state, experiment.resume_compatibility())
            if config.eval_every_steps > 0 and done % config.eval_every_steps == 0 and not is_last:
                run = protocols.Run(experiment, state)
                evaluated = protocols.monitor(run, linear=config.eval_linear_probe)
                log.write(done, {f"eval_{name}": value for name, value in evaluated.items()})
                log.start(done)  # evaluation time is not training throughput
                waits.since_last()  # nor time waiting for data
            if stop:
                checkpointer.wait_until_finished()
                cause = f"signal {stop_requests[0]}" if stop_requests else "another process"
                print(
                    f"stopped by {cause} at step {done}; checkpoint saved in "
                    f"{checkpointer.directory}. Rerun the same command to resume.",
                    flush=True,
                )
                return state, False
    checkpointer.wait_until_finished()
    return state, True


def save_reconstructions(
    experiment: Experiment, state: step.TrainState, path: str, num_images: int = 16
) -> None:
    """PNG of the first ``num_images`` eval-split images and their reconstructions.

    Rows alternate: inputs, then their reconstructions (inference mode: the VAE decodes μ), in
    rows of 8. Needs a model with a reconstruction head.
    """
    mesh = experiment.mesh
    embed = step.jit_embed_step(mesh)

    def inputs_and_reconstructions(state, images):
        return {"input": images, "reconstruction": embed(state, images)["reconstruction"]}

    first_batch = itertools.islice(experiment.eval_batches(experiment.config.eval_split), 1)
    pairs = features.extract_features(
        inputs_and_reconstructions, state, first_batch, mesh, ("input", "reconstruction")
    )
    columns = min(8, num_images, len(pairs["input"]))
    rows = max(1, min(num_images, len(pairs["input"])) // columns)
    grid = []
    for r in range(rows):
        for name in ("input", "reconstruction"):
            grid.append(pairs[name][r * columns : (r + 1) * columns])
    if jax.process_index() == 0:
        visualize.save_image_grid(path, np.stack(grid), scale=2)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
    """Pretrains, checkpoints and evaluates; returns the results (None if stopped by a signal).

    Writes ``WORKDIR/config.json``, ``metrics.jsonl``, TensorBoard files under ``tensorboard/``,
    checkpoints under ``checkpoints/`` and, at the end, ``results.json`` (and, with a decoder,
    ``reconstructions.png``). With ``config.evaluate_at_end`` off, the results hold the run's
    steps, times and throughput only. The config and the data are checked first (by
    :class:`~simclr_jax.experiment.Experiment`: a bad value or image fails before the workdir is
    touched), then the workdir's lock is taken (``WORKDIR/lock``) and held to the end.

    Raises:
      simclr_jax.workdir_lock.WorkdirError: the workdir cannot be created, or another live run
        holds it (:class:`~simclr_jax.workdir_lock.WorkdirInUseError`).
      ValueError: a config value out of range, bad data, or a checkpoint that cannot be saved
        or restored (:class:`~simclr_jax.checkpointing.CheckpointError`).
    """
    started = time.perf_counter()
    mesh = parallel.data_mesh()
    experiment = Experiment(config, mesh)  # checks the config and the data
    parallel.check_global_batch_size(config.global_batch_size, mesh, "global_batch_size")
    parallel.check_global_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    workdir = os.path.abspath(workdir)
    with workdir_lock.hold_on_first_process(workdir):
        return _locked_train_and_evaluate(experiment, workdir, started)


def _locked_train_and_evaluate(
    experiment: Experiment, workdir: str, started: float
) -> dict[str, Any] | None:
    """:func:`train_and_evaluate` in a workdir this run holds."""
    config, mesh = experiment.config, experiment.mesh
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints
    )
    with contextlib.closing(checkpointer):
        if jax.process_index() == 0:
            print(
                f"kernels: {experiment.layers.name} (conv_impl={config.model.conv_impl!r}, "
                f"conv_precision={config.model.conv_precision!r})",
                flush=True,
            )
        _write_json(os.path.join(workdir, "config.json"), config.to_dict())
        state = jax.device_put(experiment.initial_state(config.seed), parallel.replicated(mesh))
        if checkpointer.latest_step() is not None:
            state, _ = checkpointer.restore(state, compatibility=experiment.resume_compatibility())
            print(f"resumed from step {int(state.step)} in {checkpointer.directory}", flush=True)
        log = reporting.MetricsLog(
            workdir,
            total_steps=experiment.total_steps,
            steps_per_epoch=experiment.steps_per_epoch,
            global_batch_size=config.global_batch_size,
            first_step=int(state.step),
        )
        with contextlib.closing(log):
            train_started = time.perf_counter()
            start_step = int(state.step)
            state, completed = _train(experiment, state, checkpointer, log)
            train_seconds = time.perf_counter() - train_started
        if not completed:
            return None
        if experiment.hybrid is not None:
            save_reconstructions(experiment, state, os.path.join(workdir, "reconstructions.png"))
        evaluated = (
            protocols.end_of_run(protocols.Run(experiment, state, workdir))
            if config.evaluate_at_end
            else {}
        )
        results = {
            **evaluated,
            "kernels": experiment.layers.name,
            "steps": experiment.total_steps,
            "epochs": experiment.total_steps / experiment.steps_per_epoch,
            "wall_time_s": time.perf_counter() - started,
            "train_time_s": train_seconds,
            "views_per_s": 2
            * config.global_batch_size
            * (experiment.total_steps - start_step)
            / max(train_seconds, 1e-9),
        }
    _write_json(os.path.join(workdir, "results.json"), results)
    if jax.process_index() == 0:
        print(reporting.results_table(results), flush=True)
    return results
