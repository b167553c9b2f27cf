"""A SimCLR-shaped model small enough to compile in seconds: for step-level tests."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from simclr_jax import optim, step


class TinySimCLR(nn.Module):
    """Flatten, dense + batch norm, then the SimCLR outputs ``h``, ``z`` and probe ``logits``.

    Batch norm makes the step depend on global batch statistics, as the ResNet does.
    """

    num_classes: int = 3

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        h = nn.Dense(16)(images.reshape(images.shape[0], -1))
        h = nn.relu(nn.BatchNorm(use_running_average=not train)(h))
        logits = nn.Dense(self.num_classes)(jax.lax.stop_gradient(h))
        return {"h": h, "z": nn.Dense(8)(h), "logits": logits}


def tiny_step_inputs(
    lowest_label: int = 0,
) -> tuple[Callable[[Any], Any], step.TrainState, dict[str, np.ndarray]]:
    """A LARS schedule, the host-side initial state of :class:`TinySimCLR` and a batch of 16
    images of 4x4x1 (two views each) labelled from ``lowest_label`` (-1: some unlabelled) to 2."""
    schedule = optim.warmup_cosine_schedule(peak_value=0.5, warmup_steps=1, total_steps=4)
    state = jax.device_get(
        step.create_train_state(TinySimCLR(), optim.lars(schedule), jax.random.key(0), (4, 4, 1))
    )
    rng = np.random.default_rng(0)
    batch = {
        "views": rng.random((16, 2, 4, 4, 1), dtype=np.float32),
        "label": rng.integers(lowest_label, 3, 16).astype(np.int32),
    }
    return schedule, state, batch
