"""Checkpointer: round trips, keep-last-k, restores across meshes, and clear errors."""

import asyncio
import gc
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import cli_runs
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorstore as ts
from absl import logging as absl_logging

from simclr_jax import cli, parallel, step
from simclr_jax.checkpointing import Checkpointer, CheckpointError, OrbaxLogFilter

IMAGE_SHAPE = (8, 8, 1)
METADATA = {"depth": 18, "stem": "cifar", "image_shape": [8, 8, 1], "base_lr": 0.3, "bn": True}


class TinyNet(nn.Module):
    """Conv, batch norm and a dense layer: params, batch statistics and an optimiser state."""

    features: int = 4

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(self.features, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(nn.relu(x).mean(axis=(1, 2)))


def mesh_of(num_devices):
    return parallel.data_mesh(jax.devices()[:num_devices])


def fresh_state(mesh, *, seed=1, features=4, tx=None):
    """A newly initialised state replicated over ``mesh``: what the trainer restores into."""
    tx = tx or optax.sgd(0.1, momentum=0.9)
    state = step.create_train_state(TinyNet(features), tx, jax.random.key(seed), IMAGE_SHAPE)
    return jax.device_put(state, parallel.replicated(mesh))


def trained_state(mesh, *, seed=0, features=4):
    """A state unlike a fresh one in every field: step 1, moved params, momentum and BN stats."""
    state = fresh_state(mesh, seed=seed, features=features)
    return state.apply_gradients(
        grads=jax.tree.map(jnp.ones_like, state.params),
        batch_stats=jax.tree.map(lambda x: x + 0.5, state.batch_stats),
    )


def assert_states_equal(actual, expected):
    for field in ("step", "params", "batch_stats", "opt_state"):
        got, want = getattr(actual, field), getattr(expected, field)
        assert jax.tree.structure(got) == jax.tree.structure(want), field
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(want))


def steps_on_disk(directory):
    return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())


def save_steps(directory, states, **options):
    """Saves ``{step: state}`` into ``directory`` and waits for the writes to finish."""
    with Checkpointer(directory, **options) as checkpointer:
        for number, state in states.items():
            assert checkpointer.save(number, state, METADATA)


def test_round_trip_restores_every_field_and_the_metadata(tmp_path):
    mesh = mesh_of(8)
    saved = trained_state(mesh)
    template = fresh_state(mesh, seed=1)
    kernel = ("Conv_0", "kernel")
    assert not np.allclose(
        saved.params[kernel[0]][kernel[1]], template.params[kernel[0]][kernel[1]]
    )

    save_steps(tmp_path, {1: saved})
    with Checkpointer(tmp_path) as checkpointer:
        restored, metadata = checkpointer.restore(template)

    assert_states_equal(restored, saved)
    assert int(restored.step) == 1
    assert metadata == METADATA
    assert restored.apply_fn is template.apply_fn and restored.tx is template.tx


def test_a_relative_directory_saves_and_restores_against_the_current_directory(
    tmp_path, monkeypatch
):
    mesh = mesh_of(1)
    saved = trained_state(mesh)
    monkeypatch.chdir(tmp_path)
    save_steps("run/checkpoints", {3: saved})
    monkeypatch.chdir(tmp_path / "run")
    with Checkpointer("checkpoints", read_only=True) as checkpointer:
        assert checkpointer.directory == str(tmp_path / "run" / "checkpoints")
        assert checkpointer.latest_step() == 3
        restored, _ = checkpointer.restore(fresh_state(mesh))

    assert_states_equal(restored, saved)


def test_keeps_the_last_k_and_reports_the_latest(tmp_path):
    mesh = mesh_of(8)
    states = {number: trained_state(mesh, seed=number) for number in range(1, 5)}
    with Checkpointer(tmp_path, max_to_keep=2) as checkpointer:
        assert checkpointer.latest_step() is None
        for number, state in states.items():
            assert checkpointer.save(number, state, METADATA)
        checkpointer.wait_until_finished()
        assert checkpointer.latest_step() == 4

    assert steps_on_disk(tmp_path) == [3, 4]
    with Checkpointer(tmp_path, max_to_keep=2) as reopened:
        assert reopened.latest_step() == 4
        restored, _ = reopened.restore(fresh_state(mesh), step=3)
        assert_states_equal(restored, states[3])
        with pytest.raises(
            CheckpointError, match=r"step 1 not found in .*; the steps found are \[3, 4\]"
        ):
            reopened.restore(fresh_state(mesh), step=1)


def test_save_interval_skips_steps_unless_forced(tmp_path):
    state = trained_state(mesh_of(8))
    with Checkpointer(tmp_path, max_to_keep=None, save_interval_steps=3) as checkpointer:
        saved = [n for n in range(1, 8) if checkpointer.save(n, state, METADATA)]
        assert checkpointer.save(8, state, METADATA, force=True)
    # The first save into an empty directory always happens, then every third step.
    assert saved == [1, 3, 6]
    assert steps_on_disk(tmp_path) == [1, 3, 6, 8]


@pytest.mark.parametrize(("save_devices", "restore_devices"), [(8, 1), (1, 8)])
def test_restores_onto_a_mesh_of_another_size(tmp_path, save_devices, restore_devices):
    saved = trained_state(mesh_of(save_devices))
    save_steps(tmp_path, {1: saved})

    template = fresh_state(mesh_of(restore_devices))
    with Checkpointer(tmp_path) as checkpointer:
        restored, _ = checkpointer.restore(template)

    assert_states_equal(restored, saved)
    restored_leaves = jax.tree.leaves((restored.params, restored.batch_stats, restored.opt_state))
    template_leaves = jax.tree.leaves((template.params, template.batch_stats, template.opt_state))
    for got, want in zip(restored_leaves, template_leaves, strict=True):
        assert got.sharding == want.sharding
        assert len(got.sharding.device_set) == restore_devices
    assert restored.step.sharding == template.step.sharding


@pytest.mark.parametrize("blocker", ["parent_is_a_file", "path_is_a_file"])
def test_unwritable_directory_fails_at_construction(tmp_path, blocker):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    directory = a_file / "checkpoints" if blocker == "parent_is_a_file" else a_file
    with pytest.raises(CheckpointError, match=rf"{a_file}.*(not writable|not a directory)"):
        Checkpointer(directory)
    assert a_file.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root from writing")
def test_read_only_directory_fails_at_construction(tmp_path):
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    try:
        with pytest.raises(CheckpointError, match=rf"{read_only}.*not writable.*Permission denied"):
            Checkpointer(read_only / "checkpoints")
    finally:
        read_only.chmod(0o700)


def test_metadata_of_another_config_is_refused_naming_the_fields(tmp_path):
    mesh = mesh_of(8)
    save_steps(tmp_path, {1: trained_state(mesh)})
    current = {**METADATA, "image_shape": IMAGE_SHAPE}  # a tuple matches the stored JSON list

    with Checkpointer(tmp_path) as checkpointer:
        restored, _ = checkpointer.restore(fresh_state(mesh), compatibility=current)
        assert int(restored.step) == 1
        with pytest.raises(CheckpointError) as error:
            checkpointer.restore(
                fresh_state(mesh), compatibility={**current, "depth": 50, "width_multiplier": 2}
            )

    message = str(error.value)
    assert "depth: checkpoint 18, current 50" in message
    assert "width_multiplier: not recorded in the checkpoint, current 2" in message
    assert "image_shape" not in message and "stem" not in message
    assert str(tmp_path / "1") in message and "new workdir" in message


def test_arrays_of_another_shape_are_refused_naming_the_first_path(tmp_path):
    mesh = mesh_of(8)
    save_steps(tmp_path, {1: trained_state(mesh, features=4)})
    with (
        Checkpointer(tmp_path) as checkpointer,
        pytest.raises(
            CheckpointError,
            match=r"batch_stats\.BatchNorm_0\.mean is float32\[4\] in "
            r"the checkpoint but float32\[5\] in the current model",
        ),
    ):
        checkpointer.restore(fresh_state(mesh, features=5))


def test_optimizer_state_of_another_structure_is_refused(tmp_path):
    mesh = mesh_of(8)
    save_steps(tmp_path, {1: trained_state(mesh)})  # SGD with momentum: a trace per parameter
    with (
        Checkpointer(tmp_path) as checkpointer,
        pytest.raises(CheckpointError, match=r"opt_state\.0\.count is missing from the checkpoint"),
    ):
        checkpointer.restore(fresh_state(mesh, tx=optax.adam(1e-3)))


def _truncate_every_file(step_dir):
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return files


def _delete_array_data(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    for path in files:
        path.unlink()
    return files


def _garble_json_metadata(step_dir):
    path = step_dir / "metadata" / "metadata"
    path.write_text("{not json")
    return [path]


def _delete_array_metadata(step_dir):
    path = step_dir / "state" / "_METADATA"
    path.unlink()
    return [path]


# TensorStore reads still in flight when Orbax gives up report to an event loop already closed;
# Python prints those as "Event loop is closed" noise, which pytest would turn into warnings.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "corrupt",
    [_truncate_every_file, _delete_array_data, _garble_json_metadata, _delete_array_metadata],
)
def test_corrupt_checkpoint_names_its_directory_and_the_fallback(tmp_path, corrupt):
    mesh = mesh_of(8)
    first = trained_state(mesh, seed=1)
    save_steps(tmp_path, {1: first, 2: trained_state(mesh, seed=2)})
    step_dir = tmp_path / "2"
    assert corrupt(step_dir), "the checkpoint layout changed: nothing was corrupted"

    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step() == 2
        with pytest.raises(CheckpointError) as error:
            checkpointer.restore(fresh_state(mesh))
    message = str(error.value)
    assert f"checkpoint {step_dir} cannot be read" in message
    assert "Evaluate an earlier step with --checkpoint=1 (steps found: [1])" in message
    assert "or delete that directory to fall back to step 1." in message
    assert "\n" not in message  # one line, no storage-library traceback

    shutil.rmtree(step_dir)  # the suggested fix
    with Checkpointer(tmp_path) as checkpointer:
        restored, _ = checkpointer.restore(fresh_state(mesh))
    assert_states_equal(restored, first)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_array_chunk_is_named_without_storage_library_internals(tmp_path):
    # Arrays this large are stored in chunk files of their own; Orbax wraps a failed chunk read
    # in an error whose text ends with the repr of a C++ method instead of the cause.
    mesh = mesh_of(8)
    save_steps(tmp_path, {n: trained_state(mesh, seed=n, features=256) for n in (1, 2)})
    chunks = [p for p in (tmp_path / "2" / "state").rglob("*") if p.parent.name == "d"]
    largest = max(chunks, key=lambda p: p.stat().st_size)
    data = largest.read_bytes()
    largest.write_bytes(data[: len(data) // 2] + bytes(b ^ 0xFF for b in data[len(data) // 2 :]))

    with Checkpointer(tmp_path) as checkpointer, pytest.raises(CheckpointError) as error:
        checkpointer.restore(fresh_state(mesh, features=256))
    gc.collect()  # the reads of the other arrays, abandoned, report here (filtered above)
    message = str(error.value)
    assert "Conv_0.kernel" in message  # the array whose chunk is damaged
    assert "bound method" not in message and "pybind11" not in message
    assert "--checkpoint=1" in message and "\n" not in message


def test_read_only_creates_and_cleans_up_nothing(tmp_path):
    missing = tmp_path / "missing"
    with Checkpointer(missing, read_only=True) as checkpointer:
        assert checkpointer.latest_step() is None
    assert not missing.exists()

    mesh = mesh_of(8)
    save_steps(tmp_path / "run", {1: trained_state(mesh)})
    in_progress = tmp_path / "run" / "2.orbax-checkpoint-tmp"  # another process's save
    in_progress.mkdir()
    with Checkpointer(tmp_path / "run", read_only=True) as checkpointer:
        restored, _ = checkpointer.restore(fresh_state(mesh))
    assert_states_equal(restored, trained_state(mesh))
    assert in_progress.is_dir()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["1", in_progress.name]


def test_a_save_failing_in_the_background_on_a_full_disk_is_reported_at_once(tmp_path, monkeypatch):
    mesh = mesh_of(8)
    first = trained_state(mesh, seed=1)
    cli_runs.fail_the_second_metadata_write(monkeypatch.setattr)
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.save(1, first, METADATA)
        checkpointer.wait_until_finished()
        assert checkpointer.save(2, trained_state(mesh, seed=2), METADATA)
        with pytest.raises(CheckpointError) as error:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # what the trainer does at every step
                checkpointer.check_saves()
                time.sleep(0.01)
    message = str(error.value)
    assert message.startswith(f"the disk is full: saving checkpoint {tmp_path / '2'} failed")
    assert "the last complete checkpoint, step 1, is intact" in message
    assert "a checkpoint takes about 1 MB" in message and "\n" not in message
    assert steps_on_disk(tmp_path) == [1]
    with Checkpointer(tmp_path, read_only=True) as checkpointer:
        restored, _ = checkpointer.restore(fresh_state(mesh))
    assert_states_equal(restored, first)


def test_interrupted_save_is_not_the_latest_and_does_not_block_the_next(tmp_path):
    mesh = mesh_of(8)
    states = {n: trained_state(mesh, seed=n) for n in (1, 2, 3)}
    save_steps(tmp_path, {1: states[1], 2: states[2]})
    # What a crash during the save of step 3 leaves behind: a partial, unrenamed directory.
    partial = tmp_path / "3.orbax-checkpoint-tmp"
    shutil.copytree(tmp_path / "2", partial)
    for path in partial.rglob("commit_success.txt"):
        path.unlink()
    _delete_array_data(partial)

    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step() == 2
        restored, _ = checkpointer.restore(fresh_state(mesh))
        assert_states_equal(restored, states[2])
        assert checkpointer.save(3, states[3], METADATA, force=True)
    assert steps_on_disk(tmp_path) == [1, 2, 3]
    assert not partial.exists()
    with Checkpointer(tmp_path) as checkpointer:
        restored, _ = checkpointer.restore(fresh_state(mesh))
    assert_states_equal(restored, states[3])


def test_save_refuses_bad_metadata_and_existing_steps(tmp_path):
    state = trained_state(mesh_of(8))
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(CheckpointError, match="JSON-serialisable"):
            checkpointer.save(1, state, {"dtype": jnp.float32})
        assert checkpointer.save(1, state, METADATA)
        checkpointer.wait_until_finished()
        assert not checkpointer.save(1, state, METADATA)  # not forced: skipped
        with pytest.raises(CheckpointError, match=rf"step 1 already exists.*{tmp_path / '1'}"):
            checkpointer.save(1, state, METADATA, force=True)


def _error_raised_in(filename):
    """``exc_info`` of an error raised by code in ``filename``."""
    try:
        exec(compile("raise OSError('No space left on device')", filename, "exec"))
    except OSError as error:
        return type(error), error, error.__traceback__


ORBAX_FILE = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "manager.py")
OUR_FILE = os.path.join(os.sep, "simclr_jax", "checkpointing.py")


def test_the_orbax_log_filter_drops_orbax_records_and_asyncio_reports_of_orbax_writes():
    def record(logger, path, level, exc_info):
        return logging.LogRecord(logger, level, path, 1, "save of %s failed", ("4",), exc_info)

    keep = OrbaxLogFilter().filter
    in_orbax, in_ours = _error_raised_in(ORBAX_FILE), _error_raised_in(OUR_FILE)
    for level in (logging.WARNING, logging.ERROR):
        assert not keep(record("absl", ORBAX_FILE, level, None))
        assert not keep(record("absl", ORBAX_FILE, level, in_orbax))
    asyncio_file = asyncio.base_events.__file__  # where "exception was never retrieved" is logged
    assert not keep(record("asyncio", asyncio_file, logging.ERROR, in_orbax))
    assert keep(record("asyncio", asyncio_file, logging.ERROR, in_ours))
    assert keep(record("absl", OUR_FILE, logging.ERROR, in_orbax))


def test_the_command_lines_drop_writes_that_end_after_their_event_loop_closed(monkeypatch):
    """What a full disk leaves once Orbax has given up on a save: TensorStore writes that end
    later call back into the save's event loop, closed by then; Python prints each such error
    (unraisable, in a callback) with its traceback."""
    printed = []
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    for logger in (absl_logging.get_absl_logger(), logging.getLogger("asyncio")):
        monkeypatch.setattr(logger, "filters", [])
    cli.quiet_orbax()
    loop = asyncio.new_event_loop()
    loop.close()
    for callback in (lambda _: loop.call_soon_threadsafe(print), lambda _: 1 / 0):
        promise, future = ts.Promise.new()
        future.add_done_callback(callback)
        promise.set_result(None)
    assert [type(u.exc_value) for u in printed] == [ZeroDivisionError]
