"""Command line: ``python -m simclr_jax.distill --teacher_workdir=DIR --workdir=DIR``.

SimCLRv2's distillation (README, "Distillation (SimCLRv2)"): fine-tunes the pretraining run in
``--teacher_workdir`` (its ``config.json`` and latest or ``--checkpoint`` checkpoint, only read)
on a class-balanced fraction of the labels, then trains a student from random init on the
teacher's soft targets for every image of the split, and scores both on the eval split.

The data, model and evaluation settings are the teacher run's; ``--config=NAME|PATH`` (default
``fashion_mnist_distill``) supplies the ``distillation`` fields only, and ``--config.FIELD=VALUE``
overrides any field, e.g. ``--config.distillation.label_fraction=0.1``. Writes
``WORKDIR/config.json`` and ``WORKDIR/distill_results.json``, holding ``WORKDIR/lock``; a table of
both accuracies ends the output. A bad input (config, a teacher workdir without a run or a
checkpoint, a workdir in use) is one error line and exit status 1.
"""

import os
import sys
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from simclr_jax import cli

DEFAULT_CONFIG = "fashion_mnist_distill"

_CONFIG = cli.define_config_flag(
    DEFAULT_CONFIG,
    "A shipped config's name (simclr_jax.configs) or a config file's path: its distillation "
    "fields are used.",
)
_TEACHER_WORKDIR = flags.DEFINE_string(
    "teacher_workdir", None, "Workdir of the pretraining run to fine-tune into the teacher."
)
_CHECKPOINT = flags.DEFINE_integer(
    "checkpoint", None, "Checkpoint step of the teacher's run (default: the latest)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the config and the results.")


def _overrides(recipe: ml_collections.ConfigDict, command_line: dict[str, Any]) -> dict[str, Any]:
    """The config fields replacing the teacher run's: every ``distillation`` field of ``recipe``,
    then the command line's ``--config.FIELD=VALUE`` overrides."""
    fields = {f"distillation.{name}": value for name, value in recipe.distillation.items()}
    return {**fields, **command_line}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    for name, flag in (("teacher_workdir", _TEACHER_WORKDIR), ("workdir", _WORKDIR)):
        if not flag.value:
            sys.exit(f"error: --{name} is required.")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)

    import jax

    from simclr_jax import distillation, workdir_lock

    cli.quiet_orbax()
    with cli.errors_as_one_line(ValueError, OSError, workdir_lock.WorkdirError):
        results = distillation.distill(
            _TEACHER_WORKDIR.value,
            _WORKDIR.value,
            _overrides(_CONFIG.value, config_flags.get_override_values(flags.FLAGS["config"])),
            _CHECKPOINT.value,
        )
    if jax.process_index() == 0:
        print(distillation.results_table(results), flush=True)


if __name__ == "__main__":
    cli.restart_with_huge_pages()
    app.run(main, flags_parser=cli.parse_flags)
