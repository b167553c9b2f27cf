"""How fast the pretraining input pipeline alone produces augmented pairs, without any model.

Compare its ``pairs_per_s`` with the training loop's throughput (``views_per_s / 2``): when the
pipeline is not much faster, training is input-bound (see ``data_wait_fraction`` in the metrics).
"""

import time

import ml_collections

from simclr_jax import parallel
from simclr_jax.experiment import Experiment


def measure_pretrain_throughput(
    config: ml_collections.ConfigDict, *, num_batches: int = 20, warmup_batches: int = 2
) -> dict[str, float]:
    """Times this process's pretraining batches for ``config``, exactly as the trainer reads them.

    The first ``warmup_batches`` (opening the dataset, filling tf.data's buffers) are not timed;
    the next ``num_batches`` are. Each batch holds ``global_batch_size / process_count``
    examples, each a pair of augmented views. Returns ``pairs_per_s`` (examples per second),
    ``views_per_s`` (twice that), ``seconds`` timed, ``num_batches`` and ``host_batch_size``.
    """
    if num_batches < 1 or warmup_batches < 0:
        raise ValueError(
            f"num_batches must be >= 1 and warmup_batches >= 0, got {num_batches} and "
            f"{warmup_batches}."
        )
    batches = Experiment(config, parallel.data_mesh()).pretrain_batches(start_step=0)
    for _ in range(warmup_batches):
        next(batches)
    pairs = 0
    started = time.perf_counter()
    for _ in range(num_batches):
        pairs += len(next(batches)["views"])
    seconds = time.perf_counter() - started
    return {
        "pairs_per_s": pairs / seconds,
        "views_per_s": 2 * pairs / seconds,
        "seconds": seconds,
        "num_batches": num_batches,
        "host_batch_size": pairs // num_batches,
    }
