"""What the command lines (``simclr_jax.train``, ``simclr_jax.evaluate``, ``simclr_jax.benchmark``)
share: the repository's ``configs/`` on the import path, flag parsing that reports a bad override
in one line, and a start with huge pages for malloc."""

import ast
import contextlib
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

from absl import flags

REPO_ROOT = Path(__file__).resolve().parent.parent


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def restart_with_huge_pages() -> None:
    """Re-executes this command once with glibc's malloc backing large allocations by
    transparent huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``).

    XLA:CPU allocates a step's buffers afresh at every execution, and the kernel maps each new
    4 KiB page on first touch: a 10-step benchmark of the Fashion-MNIST recipe took 2.5 million
    page faults at 0.78 s per step, and 220,000 at 0.57-0.62 s with 2 MiB pages (README,
    Performance). glibc reads its tunables at start-up only, hence the restart (same
    interpreter, arguments, PID). Only on Linux with glibc, only from a command line's
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
