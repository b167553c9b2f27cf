"""What the command lines (``simclr_jax.train``, ``simclr_jax.evaluate``) share: the repository's
``configs/`` on the import path, and flag parsing that reports a bad override in one line."""

import ast
import contextlib
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

REPO_ROOT = Path(__file__).resolve().parent.parent


def add_configs_to_path() -> None:
    """Recipes in configs/ import configs/default.py as ``configs.default``: make that
    importable from any working directory."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)


def _exit_with_flag_error(error: Exception) -> None:
    detail = str(error.args[0] if error.args else error)
    with contextlib.suppress(ValueError, SyntaxError):
        detail = str(ast.literal_eval(detail))  # ml_collections nests a KeyError's repr
    sys.exit(f"error: invalid command line or config override: {' '.join(detail.split())}")


def parse_flags(argv: list[str]) -> list[str]:
    """Parses the command line; a misspelt or mistyped config override is one clear error line."""
    try:
        return flags.FLAGS(argv)
    except _FLAG_ERRORS as error:
        _exit_with_flag_error(error)


def define_config_file(default_path: str, help_string: str) -> flags.FlagHolder:
    """``--config`` as a locked config file. Its default is loaded (and the overrides on the
    command line applied) while the flag is defined, so a bad override fails here: one line."""
    try:
        return config_flags.DEFINE_config_file(
            "config", default_path, help_string, lock_config=True
        )
    except _FLAG_ERRORS as error:
        _exit_with_flag_error(error)
