"""A SimCLR-shaped model small enough to compile in seconds: for step-level tests."""

import flax.linen as nn
import jax


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
