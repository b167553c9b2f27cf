"""The command lines run as a user runs them, in a subprocess, optionally with a patch applied
first (to stop, pause or break a run at a chosen moment); and their stderr without the start-up
lines TensorFlow prints before anything else."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

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


def environment() -> dict[str, str]:
    """This process's environment, with its XLA compilation cache (tests/conftest.py): a command
    line compiling what a test here compiled already loads it instead."""
    import jax

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if jax.config.jax_compilation_cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


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
