"""What the command lines (``simclr_jax.train``, ``simclr_jax.evaluate``) share: the repository's
``configs/`` on the import path, and flag parsing that reports a bad override in one line."""

import ast
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from absl import flags

REPO_ROOT = Path(__file__).resolve().parent.parent


def add_configs_to_path() -> None:
    """Recipes in configs/ import configs/default.py as ``configs.default``: make that
    importable from any working directory."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


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


def parse_flags(argv: list[str]) -> list[str]:
    """Parses the command line; a misspelt or mistyped config override is one clear error line."""
    with one_line_flag_errors():
        return flags.FLAGS(argv)
