"""Checkpoints of the train state with Orbax: atomic saves, keep-last-k, restore onto any mesh.

A checkpoint step directory ``DIR/<step>/`` holds two items: ``state``, the arrays of the
:class:`simclr_jax.step.TrainState` (``step``, ``params``, ``batch_stats``, ``opt_state``; the
model function and the optimiser are code, rebuilt from the config), and ``metadata``, a JSON dict
describing the run that wrote it (what the trainer needs to check that a checkpoint fits the
current config).

Saves are atomic. Orbax writes a step into ``DIR/<step>.orbax-checkpoint-tmp``, adds a
``commit_success.txt`` marker when every file is written, and only then renames the directory to
``DIR/<step>``; steps are read from finalised (renamed) directories only, so a save interrupted by a
crash or a pre-emption is never taken for the latest checkpoint. Checkpoints beyond the newest
``max_to_keep`` are deleted only after the new one is finalised, so the previous checkpoint stays
intact until its successor is complete. Leftover temporary directories are removed when a
:class:`Checkpointer` opens the directory.

Saving is asynchronous: :meth:`Checkpointer.save` returns once the arrays are copied off the
accelerator (so the caller may donate or overwrite the state) and the files are written in the
background. Call :meth:`Checkpointer.wait_until_finished` or :meth:`Checkpointer.close` (or use the
checkpointer as a context manager) before the process exits. A multi-process training run waits
for each save (:mod:`simclr_jax.trainer`), so that all its processes learn of a failure together.

A save that fails in the background (a full disk, say) is reported by the next
:meth:`Checkpointer.check_saves`, which never waits for a save in progress: called at every
training step, it stops a run within a step of the failure being noticed, with the last complete
checkpoint intact. The next :meth:`Checkpointer.save` waits for the previous one and reports its
failure.

A :class:`Checkpointer` opened ``read_only`` (to evaluate a run, possibly while it trains) creates,
cleans up and writes nothing.

Every failure a user can fix (an unwritable directory, a full disk, a checkpoint of another config,
arrays of other shapes, a corrupt step directory) raises :class:`CheckpointError` with the path and
the fix. Orbax also logs each failure it raises, with its traceback, some of it from background
threads and as late as interpreter exit; the command lines keep Orbax's records off the terminal
(:class:`OrbaxLogFilter`), so that the one-line message is all a failure prints.
"""

import errno
import json
import logging
import math
import os
import shutil
import uuid
from os import PathLike
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from simclr_jax.step import TrainState

_STATE_ITEM = "state"
_METADATA_ITEM = "metadata"
_STATE_FIELDS = ("step", "params", "batch_stats", "opt_state")
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step directory being written
_CAUSE_CHARS = 400  # of a storage library's error message, in ours


class CheckpointError(ValueError):
    """A checkpoint cannot be written or restored; the message names the path and the fix."""


class CorruptCheckpointError(CheckpointError):
    """The step directory ``step_directory`` cannot be read."""

    def __init__(self, message: str, step_directory: str):
        super().__init__(message)
        self.step_directory = step_directory


_ORBAX_FILES = f"{os.sep}orbax{os.sep}"


def _is_orbax_record(record: logging.LogRecord) -> bool:
    """Whether Orbax logged ``record``, or asyncio did for a failure inside Orbax's code (a write
    whose failure no one retrieved once the save had failed, reported when it is collected)."""
    if _ORBAX_FILES in record.pathname:
        return True
    if record.name != "asyncio" or not record.exc_info:
        return False
    trace = record.exc_info[2]
    while trace is not None:
        if _ORBAX_FILES in trace.tb_frame.f_code.co_filename:
            return True
        trace = trace.tb_next
    return False


class OrbaxLogFilter(logging.Filter):
    """Drops Orbax's log records, on the ``absl`` logger (Orbax's) and the ``asyncio`` logger
    (that of the event loops Orbax writes in).

    The :class:`Checkpointer` raises each failure Orbax reports as a one-line
    :class:`CheckpointError`, which the command lines print; Orbax also logs the failure, with
    its traceback, from the thread that met it, and its background threads and event loops may
    log more of it, up to interpreter exit. Its other records are warnings about options this
    module sets on purpose (e.g. that a read-only checkpoint directory is read only). The command
    lines install this filter so that none of that surrounds their output.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not _is_orbax_record(record)


def _describe(error: BaseException) -> str:
    """The innermost cause of ``error`` on one line, without TensorStore's long JSON spec."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split(" [tensorstore_spec")[0].split())
    if len(text) > _CAUSE_CHARS:
        text = text[:_CAUSE_CHARS].rsplit(" ", 1)[0] + " …"
    return f"{type(error).__name__}: {text}"


def _is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` or one of its causes says the disk (or the user's quota) is full."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "Disk quota exceeded" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _size_on_disk(directory: str) -> int:
    """Bytes in the files under the local ``directory``."""
    return sum(
        os.path.getsize(os.path.join(parent, name))
        for parent, _, names in os.walk(directory)
        for name in names
    )


def _state_arrays(state: TrainState) -> dict[str, Any]:
    """The saved part of ``state``: its array fields, each leaf a ``jax.Array``."""
    return {field: jax.tree.map(jnp.asarray, getattr(state, field)) for field in _STATE_FIELDS}


def _abstract_arrays(arrays: Any) -> Any:
    """Shapes, dtypes and shardings of ``arrays``: where and how Orbax restores each leaf."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), arrays
    )


def _leaf_specs(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{"params.Conv_0.kernel": (shape, dtype name), ...}`` for every leaf of ``tree``."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        jax.tree_util.keystr(path, simple=True, separator="."): (
            tuple(leaf.shape),
            jnp.dtype(leaf.dtype).name,
        )
        for path, leaf in leaves
    }


def _first_array_mismatch(expected: Any, stored: Any) -> str | None:
    """Describes the first leaf whose path, shape or dtype differs between the trees, or None."""
    expected_specs, stored_specs = _leaf_specs(expected), _leaf_specs(stored)
    for path, spec in expected_specs.items():
        if path not in stored_specs:
            return f"{path} is missing from the checkpoint"
        if stored_specs[path] != spec:
            (stored_shape, stored_dtype), (shape, dtype) = stored_specs[path], spec
            return (
                f"{path} is {stored_dtype}{list(stored_shape)} in the checkpoint but "
                f"{dtype}{list(shape)} in the current model"
            )
    extra = sorted(set(stored_specs) - set(expected_specs))
    return f"{extra[0]} is in the checkpoint but not in the current model" if extra else None


def _as_json(value: Any) -> Any:
    """``value`` as JSON stores it (tuples become lists), so stored and fresh values compare."""
    return json.loads(json.dumps(value))


def _remove_unfinished_saves(directory: epath.Path) -> None:
    """Deletes the step directories of saves that never finished (by the first process only).

    Done here, before any save, rather than by Orbax in a background thread that a process
    exiting early would leave to fail noisily at interpreter shutdown.
    """
    if jax.process_index() != 0:
        return
    for path in directory.iterdir():
        if _TMP_SUFFIX in path.name and path.is_dir():
            # Errors ignored: what stays behind is never taken for a checkpoint.
            shutil.rmtree(os.fspath(path), ignore_errors=True)


def _check_writable(directory: epath.Path) -> None:
    """Creates ``directory`` if needed and proves it writable by writing and deleting a file.

    A real write is the only reliable test: permission bits do not stop root, and read-only
    mounts or full disks pass ``os.access``.
    """
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(
            f"checkpoint directory {directory} exists and is not a directory; "
            "choose another workdir."
        )
    probe = directory / f".write_check.{uuid.uuid4().hex}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise CheckpointError(
            f"checkpoint directory {directory} is not writable "
            f"({error.strerror or error}: {error.filename or directory}); choose a workdir "
            "you can write to."
        ) from error


class Checkpointer:
    """Saves and restores :class:`~simclr_jax.step.TrainState` checkpoints in one directory.

    ``max_to_keep`` newest checkpoints are kept (``None``: all). ``save`` writes a checkpoint when
    ``step`` is a multiple of ``save_interval_steps``, for the first save into an empty directory,
    or when forced. The directory is created and checked for writing here, before any training,
    and what unfinished saves left in it is removed; ``read_only`` skips all three.
    """

    def __init__(
        self,
        directory: str | PathLike[str],
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
        read_only: bool = False,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be at least 1 (or None for all), not {max_to_keep}")
        path = epath.Path(directory)
        if not path.is_absolute():
            # Orbax takes only absolute paths (a relative one would fail at restore as if the
            # checkpoint were corrupt); cloud paths are absolute already.
            path = path.absolute()
        if not read_only:
            _check_writable(path)
            _remove_unfinished_saves(path)
        self.directory = str(path)
        self._saving: int | None = None  # the step of the save in progress
        self._manager = ocp.CheckpointManager(
            path,
            item_handlers={
                _STATE_ITEM: ocp.StandardCheckpointHandler(),
                _METADATA_ITEM: ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                save_interval_steps=save_interval_steps,
                read_only=read_only,
                create=not read_only,
            ),
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def save(
        self, step: int, state: TrainState, metadata: dict[str, Any], force: bool = False
    ) -> bool:
        """Starts saving ``state`` and the JSON-serialisable ``metadata`` as checkpoint ``step``.

        Returns whether a checkpoint is being written: False when the save interval skips
        ``step`` or when a checkpoint at or after ``step`` exists (unless ``force``). A save that
        is written first waits for the previous one (as Orbax would), so that a failure of either
        names its own step directory; a skipped one reports a failure that has already ended.
        """
        try:
            json.dumps(metadata)
        except TypeError as error:
            raise CheckpointError(
                f"checkpoint metadata must be JSON-serialisable: {error}"
            ) from error
        if force and step in self._manager.all_steps():
            raise CheckpointError(
                f"checkpoint step {step} already exists in {self.directory}; delete "
                f"{self._step_directory(step)} to overwrite it."
            )
        if force or self._manager.should_save(step):
            self.wait_until_finished()
        else:
            self.check_saves()
        try:
            started = self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{
                        _STATE_ITEM: ocp.args.StandardSave(_state_arrays(state)),
                        _METADATA_ITEM: ocp.args.JsonSave(metadata),
                    }
                ),
                force=force,
            )
        except Exception as error:
            raise self._save_failed(step, error) from error
        if started:
            self._saving = step
        return started

    def restore(
        self,
        template: TrainState,
        step: int | None = None,
        *,
        compatibility: dict[str, Any] | None = None,
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restores checkpoint ``step`` (default: the latest) into ``template``'s layout.

        ``template`` is a state of the current model and optimiser placed on the current mesh
        (e.g. ``jax.device_put(state, parallel.replicated(mesh))``): each array is restored with
        the template's shape, dtype and sharding, whatever the mesh that wrote the checkpoint.
        Returns the template with its ``step``, ``params``, ``batch_stats`` and ``opt_state``
        replaced, and the checkpoint's metadata. Every key of ``compatibility`` must equal the
        checkpoint's metadata entry of the same name.
        """
        step = self._existing_step(step)
        metadata = self._read(step, {_METADATA_ITEM: ocp.args.JsonRestore()})[_METADATA_ITEM]
        if compatibility is not None:
            self._check_compatible(step, metadata, compatibility)
        expected = _state_arrays(template)
        self._check_arrays_match(step, expected)
        restored = self._read(
            step, {_STATE_ITEM: ocp.args.StandardRestore(_abstract_arrays(expected))}
        )
        return template.replace(**restored[_STATE_ITEM]), metadata

    def check_saves(self) -> None:
        """Raises the :class:`CheckpointError` of a save that failed in the background; returns at
        once when none did, or while one is still being written."""
        if self._saving is not None and not self._manager.is_saving_in_progress():
            self.wait_until_finished()  # it has ended: returns at once, or raises its failure

    def wait_until_finished(self) -> None:
        """Blocks until every save in progress is written and finalised.

        Raises:
          CheckpointError: the save failed (the message names its directory and the cause).
        """
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._save_failed(self._saving, error) from error
        finally:
            self._saving = None

    def close(self) -> None:
        """Waits for saves in progress, then releases Orbax's resources, even when a save failed."""
        try:
            self.wait_until_finished()
        finally:
            self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _step_directory(self, step: int) -> str:
        return str(epath.Path(self.directory) / str(step))

    def _existing_step(self, step: int | None) -> int:
        """``step``, or the latest step when None; raises unless that checkpoint exists."""
        steps = sorted(self._manager.all_steps())
        if step is None and steps:
            return steps[-1]
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}.")
        if step not in steps:
            raise CheckpointError(
                f"checkpoint step {step} not found in {self.directory}; "
                f"the steps found are {steps}."
            )
        return step

    def _read(self, step: int, items: dict[str, ocp.args.CheckpointArgs]) -> Any:
        """Restores ``items`` of checkpoint ``step``; any failure is reported as corruption."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:
            raise self._corrupt(step, error) from error

    def _stored_array_metadata(self, step: int) -> Any:
        """The tree of shapes and dtypes that checkpoint ``step`` holds."""
        try:
            stored = self._manager.item_metadata(step)[_STATE_ITEM]
        except Exception as error:
            raise self._corrupt(step, error) from error
        if stored is None:
            raise self._corrupt(step, FileNotFoundError("the array metadata is missing"))
        return stored.tree

    def _check_arrays_match(self, step: int, expected: dict[str, Any]) -> None:
        mismatch = _first_array_mismatch(expected, self._stored_array_metadata(step))
        if mismatch is not None:
            raise CheckpointError(
                f"checkpoint {self._step_directory(step)} does not fit the current model: "
                f"{mismatch}. Use a new workdir, or the config that wrote the checkpoint."
            )

    def _check_compatible(
        self, step: int, metadata: dict[str, Any], compatibility: dict[str, Any]
    ) -> None:
        differences = []
        for key, value in _as_json(compatibility).items():
            if key not in metadata:
                differences.append(f"{key}: not recorded in the checkpoint, current {value!r}")
            elif metadata[key] != value:
                differences.append(f"{key}: checkpoint {metadata[key]!r}, current {value!r}")
        if differences:
            raise CheckpointError(
                f"checkpoint {self._step_directory(step)} was written with a different "
                f"configuration ({'; '.join(differences)}). Use a new workdir, or rerun with the "
                "configuration that wrote the checkpoint."
            )

    def _corrupt(self, step: int, error: Exception) -> CorruptCheckpointError:
        """The error for an unreadable step directory, suggesting the fallback checkpoint."""
        earlier = sorted(s for s in self._manager.all_steps() if s < step)
        fallback = (
            f"Evaluate an earlier step with --checkpoint={earlier[-1]} (steps found: "
            f"{earlier}), or delete that directory to fall back to step {earlier[-1]}."
            if earlier
            else "Delete that directory to start from scratch."
        )
        directory = self._step_directory(step)
        return CorruptCheckpointError(
            f"checkpoint {directory} cannot be read; it is corrupt or incomplete "
            f"({_describe(error)}). {fallback}",
            directory,
        )

    def _save_failed(self, step: int | None, error: Exception) -> CheckpointError:
        """The error for a save that failed, naming its directory and the last good checkpoint."""
        directory = self._step_directory(step) if step is not None else self.directory
        self._manager.reload()  # the steps on disk now
        complete = sorted(s for s in self._manager.all_steps() if s != step)
        if complete:
            last = complete[-1]
            kept = f"the last complete checkpoint, step {last}, is intact"
        else:
            kept = "no earlier checkpoint was written"
        if not _is_disk_full(error):
            return CheckpointError(
                f"saving checkpoint {directory} failed ({_describe(error)}); {kept}."
            )
        needed = ""
        if complete:
            megabytes = math.ceil(_size_on_disk(self._step_directory(last)) / 1e6)
            needed = f" (a checkpoint takes about {megabytes} MB)"
        return CheckpointError(
            f"the disk is full: saving checkpoint {directory} failed (no space left on device "
            f"in {self.directory}); {kept}. Free some space{needed}, then rerun the same command "
            "to resume."
        )
