"""The command lines run as a user runs them, in a subprocess, optionally with a patch applied
first (to stop, pause or break a run at a chosen moment); and their stderr without the start-up
lines TensorFlow prints before anything else. Also a full disk under a checkpoint save, for tests
in this process and in a command line's."""

import errno
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent

# Runs ``patch`` (Python source), then the module as ``python -m MODULE ARGS`` would.
_PATCHED = """
import runpy
{patch}
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""
# What TensorFlow's C++ logging prints at import whatever TF_CPP_MIN_LOG_LEVEL says: an INFO line
# (glog format) and the warning that precedes it.
_START_UP_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|I\d{4} )")


def command(module: str, *args: str, patch: str = "") -> list[str]:
    """``python -m module args``, or the same after ``patch`` when one is given."""
    if not patch:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-c", _PATCHED.format(patch=patch, module=module), *args]


def compilation_cache_environment() -> dict[str, str]:
    """The variables that give another process this one's XLA compilation cache
    (tests/conftest.py): a child compiling what a test here compiled already loads it instead."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        return {}
    return {
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(
            jax.config.jax_persistent_cache_min_compile_time_secs
        ),
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": str(
            jax.config.jax_persistent_cache_min_entry_size_bytes
        ),
        "JAX_COMPILATION_CACHE_MAX_SIZE": str(jax.config.jax_compilation_cache_max_size),
    }


def environment() -> dict[str, str]:
    """This process's environment on the CPU, with its XLA compilation cache."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", **compilation_cache_environment()}


def run(
    module: str, *args: str, patch: str = "", timeout: int = 300
) -> subprocess.CompletedProcess:
    """Runs the command line to its end; returns its exit status and output."""
    return subprocess.run(
        command(module, *args, patch=patch),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env=environment(),
        timeout=timeout,
    )


def error_lines(stderr: str) -> list[str]:
    """The non-empty lines of ``stderr`` other than TensorFlow's start-up lines."""
    lines = stderr.splitlines()
    return [line for line in lines if line.strip() and not _START_UP_NOISE.match(line)]


def fail_the_second_metadata_write(set_attribute: Callable[[object, str, object], None]) -> None:
    """Makes the background part of the second checkpoint save fail as on a full disk, installed
    with ``set_attribute`` (``setattr``, or a test's ``monkeypatch.setattr``)."""
    import orbax.checkpoint as ocp

    save = ocp.JsonCheckpointHandler.async_save
    calls = []

    async def save_until_the_disk_is_full(self, directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) < 2:
            return await save(self, directory, *args, **kwargs)

        async def write():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))

        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="full_disk")]

    set_attribute(ocp.JsonCheckpointHandler, "async_save", save_until_the_disk_is_full)


# The same as a patch for run().
FULL_DISK_AT_THE_SECOND_SAVE = f"""
import sys
sys.path.insert(0, {str(TESTS_DIR)!r})
import cli_runs
del sys.path[0]
cli_runs.fail_the_second_metadata_write(setattr)
"""
