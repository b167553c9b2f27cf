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
checkpointer as a context manager) before the process exits.

Every failure a user can fix (an unwritable directory, a checkpoint of another config, arrays of
other shapes, a corrupt step directory) raises :class:`CheckpointError` with the path and the fix.
"""

import json
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


class CheckpointError(ValueError):
    """A checkpoint cannot be written or restored; the message names the path and the fix."""


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
    or when forced. The directory is created and checked for writing here, before any training.
    """

    def __init__(
        self,
        directory: str | PathLike[str],
        *,
        max_to_keep: int | None = 3,
        save_interval_steps: int = 1,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be at least 1 (or None for all), not {max_to_keep}")
        path = epath.Path(directory)
        _check_writable(path)
        self.directory = str(path)
        self._manager = ocp.CheckpointManager(
            path,
            item_handlers={
                _STATE_ITEM: ocp.StandardCheckpointHandler(),
                _METADATA_ITEM: ocp.JsonCheckpointHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                save_interval_steps=save_interval_steps,
                cleanup_tmp_directories=True,
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
        ``step`` or when a checkpoint at or after ``step`` exists (unless ``force``).
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
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE_ITEM: ocp.args.StandardSave(_state_arrays(state)),
                    _METADATA_ITEM: ocp.args.JsonSave(metadata),
                }
            ),
            force=force,
        )

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

    def wait_until_finished(self) -> None:
        """Blocks until every save in progress is written and finalised."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for saves in progress, then releases Orbax's resources."""
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

    def _corrupt(self, step: int, error: Exception) -> CheckpointError:
        """The error for an unreadable step directory, suggesting the fallback checkpoint."""
        earlier = [s for s in self._manager.all_steps() if s < step]
        fallback = f"to fall back to step {max(earlier)}" if earlier else "to start from scratch"
        # The first line of the cause, without TensorStore's long JSON spec of the array.
        cause = str(error).split(" [tensorstore_spec")[0].split("\n")[0][:300]
        return CheckpointError(
            f"checkpoint {self._step_directory(step)} cannot be read; it is corrupt or "
            f"incomplete ({type(error).__name__}: {cause}). Delete that directory {fallback}."
        )
