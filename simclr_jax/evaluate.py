"""Command line: ``python -m simclr_jax.evaluate --workdir=DIR [--protocol=...]``.

Restores a pretraining run from its workdir (``config.json`` and the latest or the given
checkpoint) and runs evaluation protocols (``--protocol``, comma-separated; default all):

  linear        logistic regression on frozen h (L-BFGS) and the paper's SGD linear head
  knn           cosine kNN, k in evaluation.knn_ks, majority and temperature-weighted votes
  label_budget  the logistic-regression probe with n labels per class
  finetune      fine-tuning on fractions of the labels, against training from scratch
  pictures      training curves, t-SNE of test h, augmented view pairs, retrieval grid (PNG)
  export        the encoder alone, to WORKDIR/eval/encoder.msgpack

Each protocol writes ``WORKDIR/eval/PROTOCOL.json``; a summary table ends the output. Any config
field can be overridden for the evaluation, e.g. ``--config.evaluation.finetune.epochs=(1,1,1)``.
"""

import os
import sys
import time
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from simclr_jax import cli
from simclr_jax.configs import default

PROTOCOL_NAMES = ("linear", "knn", "label_budget", "finetune", "pictures", "export")

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a pretraining run.")
_CHECKPOINT = flags.DEFINE_integer(
    "checkpoint", None, "Checkpoint step to evaluate (default: the latest)."
)
_PROTOCOL = flags.DEFINE_list(
    "protocol", list(PROTOCOL_NAMES), f"Protocols to run: any of {', '.join(PROTOCOL_NAMES)}."
)
with cli.one_line_flag_errors():
    _CONFIG = config_flags.DEFINE_config_dict(
        "config", default.get_config(), "Overrides of the run's config.json (--config.FIELD=VALUE)."
    )


def run_protocols(
    workdir: str,
    protocols: list[str] | tuple[str, ...] = PROTOCOL_NAMES,
    checkpoint: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Restores the run in ``workdir`` and runs ``protocols``.

    ``overrides`` maps flattened config field names (``"evaluation.seed"``) to values that
    replace the run's own. Returns ``{protocol: {"results", "seconds", "checkpoint_step"}}``;
    each entry is also written to ``WORKDIR/eval/PROTOCOL.json`` as soon as it is done.
    """
    unknown = sorted(set(protocols) - set(PROTOCOL_NAMES))
    if unknown or not protocols:
        raise ValueError(
            f"unknown protocol(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(PROTOCOL_NAMES)}."
        )
    import jax

    from simclr_jax import encoder, jsonio, parallel
    from simclr_jax.evaluation import protocols as protocol_lib
    from simclr_jax.experiment import Experiment

    workdir = os.path.abspath(workdir)
    config = encoder.read_run_config(workdir)
    config.update_from_flattened_dict(overrides or {})
    mesh = parallel.data_mesh()
    parallel.check_global_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    # Every protocol but export reads the dataset: only then are its images checked.
    experiment = Experiment(config, mesh, check_images=set(protocols) != {"export"})
    state = encoder.restore_state(experiment, workdir, checkpoint)
    run = protocol_lib.Run(experiment, state, workdir)
    if jax.process_index() == 0:
        print(f"evaluating step {int(state.step)} of {workdir}", flush=True)
    outcomes = {}
    for name in protocols:
        started = time.perf_counter()
        results = protocol_lib.PROTOCOLS[name](run)
        outcomes[name] = {
            "results": results,
            "seconds": time.perf_counter() - started,
            "checkpoint_step": int(state.step),
        }
        if jax.process_index() == 0:
            jsonio.write_json(os.path.join(run.output_dir, f"{name}.json"), outcomes[name])
            print(f"{name}: done in {outcomes[name]['seconds']:.0f}s", flush=True)
    return outcomes


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        sys.exit("error: --workdir is required (the workdir of a pretraining run).")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)

    from simclr_jax.evaluation import protocols as protocol_lib

    cli.quiet_orbax()
    try:
        outcomes = run_protocols(
            _WORKDIR.value,
            _PROTOCOL.value,
            _CHECKPOINT.value,
            config_flags.get_override_values(flags.FLAGS["config"]),
        )
    except (ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    results = {name: outcome["results"] for name, outcome in outcomes.items()}
    print(protocol_lib.format_table(protocol_lib.summary_rows(results)), flush=True)


if __name__ == "__main__":
    cli.restart_with_huge_pages()
    app.run(main, flags_parser=cli.parse_flags)
