"""Command line: ``python -m simclr_jax.train --config=NAME|PATH --workdir=DIR``.

``NAME`` is a config shipped in :mod:`simclr_jax.configs` (``fashion_mnist``,
``cifar10_resnet18``, ...), ``PATH`` any config file. With no arguments it pretrains and evaluates
the embedded default (Fashion-MNIST, ``fashion_mnist``) into ``workdirs/fashion_mnist``. Any config
field can be overridden, e.g. ``--config.global_batch_size=512``; the config is locked, so a
misspelt field is an error.
Rerunning the same command resumes from the latest checkpoint in the workdir. One run at a time
holds a workdir (``WORKDIR/lock``).

Exit status: 0 when the run is complete; 1 for an error, reported in one line (a bad config or
dataset, a workdir in use, a checkpoint that cannot be saved or restored, a diverged loss); 75
(``EX_TEMPFAIL``) when SIGTERM or SIGINT stopped the run after saving a checkpoint: rerun the
same command to resume (a scheduler may requeue on 75).
"""

import os
import sys
from pathlib import Path

from absl import app, flags, logging

from simclr_jax import cli

DEFAULT_CONFIG = "fashion_mnist"
EXIT_STOPPED = os.EX_TEMPFAIL  # 75: stopped by a signal with a checkpoint saved; rerun to resume

_CONFIG = cli.define_config_flag(
    DEFAULT_CONFIG, "A shipped config's name (simclr_jax.configs) or a config file's path."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and results (default: workdirs/CONFIG)."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first (multi-host runs; on Cloud TPU, SLURM or with "
    "JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID it needs no arguments).",
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # TensorFlow only feeds data: keep it off accelerators and quiet before it is imported.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset it opens at INFO
    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize()

    from simclr_jax import trainer, workdir_lock

    cli.quiet_orbax()
    config_path = flags.FLAGS["config"].config_filename
    workdir = _WORKDIR.value or os.path.join("workdirs", Path(config_path).stem)
    if jax.process_index() == 0:
        print(f"config: {config_path}\nworkdir: {os.path.abspath(workdir)}", flush=True)
    try:
        results = trainer.train_and_evaluate(_CONFIG.value, workdir)
    except (ValueError, OSError, trainer.TrainingDivergedError, workdir_lock.WorkdirError) as error:
        # Bad input (config, dataset, workdir, checkpoint), a full disk or divergence: one line.
        sys.exit(f"error: {error}")
    if results is None:
        sys.exit(EXIT_STOPPED)


if __name__ == "__main__":
    cli.restart_with_huge_pages()
    app.run(main, flags_parser=cli.parse_flags)
