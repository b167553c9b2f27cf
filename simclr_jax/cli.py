"""What the command lines (``simclr_jax.train``, ``simclr_jax.evaluate``, ``simclr_jax.benchmark``)
share: the ``--config`` flag (a shipped config's name or a file's path, with
``--config.FIELD=VALUE`` overrides), flag parsing that reports a bad override in one line, a
start with huge pages for malloc, and, for the two that read checkpoints (training and
evaluation), Orbax's logging kept off the terminal."""

import ast
import contextlib
import logging
import os
import platform
import sys
from collections.abc import Iterator

import ml_collections
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from simclr_jax import configs

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def restart_with_huge_pages() -> None:
    """Re-executes this command once with glibc's malloc backing large allocations by
    transparent huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``).

    XLA:CPU allocates a step's buffers afresh at every execution, and the kernel maps each new
    4 KiB page on first touch; with 2 MiB pages a step takes a small fraction of those page
    faults (docs/cpu_performance.md). glibc reads its tunables at start-up only, hence the
    restart (same interpreter, arguments, PID). Only on Linux with glibc, only from a command line's
    ``__main__``, and never when ``GLIBC_TUNABLES`` already sets ``glibc.malloc.hugetlb`` or
    ``SIMCLR_JAX_HUGE_PAGES=0`` opts out.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (
        sys.platform != "linux"
        or platform.libc_ver()[0] != "glibc"
        or "glibc.malloc.hugetlb" in tunables
        or os.environ.get("SIMCLR_JAX_HUGE_PAGES") == "0"
    ):
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, (tunables, HUGE_PAGES_TUNABLE)))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, sys.orig_argv)


def quiet_orbax() -> None:
    """Keeps Orbax's output off the terminal, so that a failure the command reports in one line
    is that line only.

    That is Orbax's log records (some logged by its background threads up to interpreter exit),
    and asyncio's records of writes in Orbax's event loops whose failure no one retrieved (both:
    :class:`simclr_jax.checkpointing.OrbaxLogFilter`); and the ``RuntimeError: Event loop is
    closed`` tracebacks, printed as unraisable exceptions, of storage writes that end after Orbax
    has closed the event loop of a failed save. For the command lines only (a library user's
    logging is left alone), and not when ``--verbosity`` is given: then everything is shown, for
    debugging.
    """
    if flags.FLAGS["verbosity"].present:
        return
    from simclr_jax import checkpointing  # imports JAX: only once the command runs

    for logger in (absl_logging.get_absl_logger(), logging.getLogger("asyncio")):
        logger.addFilter(checkpointing.OrbaxLogFilter())
    print_unraisable = sys.unraisablehook

    def drop_writes_ending_after_their_save(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            print_unraisable(unraisable)

    sys.unraisablehook = drop_writes_ending_after_their_save


@contextlib.contextmanager
def one_line_flag_errors() -> Iterator[None]:
    """Turns a bad command line or config override inside the block into one error line.

    Config flags load their default and apply the overrides on the command line as soon as
    they are defined, so their definitions need this as much as the parsing does.
    """
    try:
        yield
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
        detail = str(error.args[0] if error.args else error)
        with contextlib.suppress(ValueError, SyntaxError):
            detail = str(ast.literal_eval(detail))  # ml_collections nests a KeyError's repr
        sys.exit(f"error: invalid command line or config override: {' '.join(detail.split())}")


@contextlib.contextmanager
def errors_as_one_line(*error_types: type[Exception]) -> Iterator[None]:
    """Ends the command with one line, ``error: MESSAGE`` (the message's lines joined), when the
    block raises one of ``error_types``: what a bad input (config, files, devices) gets."""
    try:
        yield
    except error_types as error:
        sys.exit(f"error: {' '.join(str(error).split())}")


def resolve_config_argument(argv: list[str]) -> list[str]:
    """``argv`` with the value of ``--config`` (a shipped config's name or a file's path) turned
    into the config file's path (:func:`simclr_jax.configs.config_path`)."""
    resolved = list(argv)
    for i, arg in enumerate(resolved):
        if arg.startswith("--config="):
            resolved[i] = "--config=" + configs.config_path(arg.removeprefix("--config="))
        elif arg == "--config" and i + 1 < len(resolved):
            resolved[i + 1] = configs.config_path(resolved[i + 1])
    return resolved


def apply_config_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Applies ``FIELD=VALUE`` overrides (as after ``--config.``) to ``config``, with the type
    checks of ``--config.FIELD=VALUE`` on the training command line; ``config`` is locked, as
    there, so that a misspelt field is an error.

    Raises:
      ValueError: an override without ``=``, an unknown field, or a value of the wrong type.
    """
    config.lock()
    for override in overrides:
        field, separator, text = override.partition("=")
        if not separator:
            raise ValueError(f"config override {override!r} is not FIELD=VALUE.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a plain string, as on the training command line
        try:
            config.update_from_flattened_dict({field: value})
        except (AttributeError, KeyError, TypeError) as error:
            raise ValueError(f"config override {override!r}: {error}") from None


def define_config_flag(default: str | None, help_string: str) -> flags.FlagHolder:
    """``--config=NAME|PATH`` (default: the config ``default``, or none) and its locked
    ``--config.FIELD=VALUE`` overrides, so a misspelt field is an error."""
    with one_line_flag_errors():
        return config_flags.DEFINE_config_file(
            "config",
            configs.config_path(default) if default else None,
            help_string,
            lock_config=True,
            sys_argv=resolve_config_argument(sys.argv),
        )


def parse_flags(argv: list[str]) -> list[str]:
    """Parses the command line; a misspelt or mistyped config override, or an unknown config, is
    one clear error line."""
    with one_line_flag_errors():
        return flags.FLAGS(resolve_config_argument(argv))
