"""Representations of a whole split, extracted with the batch-sharded embed step.

Eval batches are padded to a fixed size and carry a ``mask``; padded rows are dropped here, so
every example of the split is counted exactly once whatever the batch or device count.
"""

from collections.abc import Callable, Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from simclr_jax import parallel


def _gather(tree):
    """Global arrays (sharded over devices and processes) -> NumPy arrays on every host."""
    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def extract_features(
    embed_fn: Callable,
    state,
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
    outputs: tuple[str, ...] = ("h",),
) -> dict[str, np.ndarray]:
    """Runs ``embed_fn(state, images)`` over ``batches``; returns the requested outputs and labels.

    ``embed_fn`` is e.g. :func:`simclr_jax.step.jit_embed_step` for ``mesh``; each batch is a
    process-local ``{"image", "label", "mask"}`` dict, as
    :func:`simclr_jax.data.pipeline.eval_batches` yields. The result maps each name in
    ``outputs`` (and ``"label"``) to an array over the unpadded examples, in split order.
    """
    collected: dict[str, list[np.ndarray]] = {name: [] for name in (*outputs, "label")}
    for host_batch in batches:
        batch = parallel.host_batch_to_global(host_batch, mesh)
        embedded = embed_fn(state, batch["image"])
        selected = {name: embedded[name] for name in outputs}
        result = _gather({**selected, "label": batch["label"], "mask": batch["mask"]})
        keep = result.pop("mask").astype(bool)
        for name, value in result.items():
            collected[name].append(value[keep])
    return {name: np.concatenate(values) for name, values in collected.items()}
