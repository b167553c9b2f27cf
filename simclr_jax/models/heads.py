"""Heads on top of the encoder's representation h: the projection head g and the online probe."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The official SimCLR code initialises every dense kernel of its heads with N(0, 0.01^2).
_DENSE_INIT = nn.initializers.normal(stddev=0.01)


class ProjectionHead(nn.Module):
    """MLP g mapping h `[B, d]` to z `[B, output_dim]`, the space where NT-Xent is computed.

    Structure of the official SimCLR (TF2) head: `num_layers - 1` times
    [dense without bias -> BN -> ReLU], then dense without bias -> BN without beta. The BN
    offset plays the role of the dense bias. SimCLRv1 uses `num_layers=2`; `num_layers=1` is a
    linear projection (dense + BN).

    Attributes:
      num_layers: number of dense layers, at least 1.
      hidden_dim: width of the hidden layers; None keeps the input width d (official behaviour).
      output_dim: width of z.
      bn_momentum: BN moving-average decay.
      bn_epsilon: BN variance epsilon.
      dtype: computation dtype; parameters stay float32 and z is returned in float32.
      keep_layers: None for the whole head (z); ``k < num_layers`` applies only the first ``k``
        hidden layers and returns their output (0: h itself), for fine-tuning from the middle of
        the head (SimCLRv2's ``ft_proj_selector``) with the pretrained parameter names.

    Parameters live under `dense_{i}` (`kernel`) and `bn_{i}` (`scale`, and `bias` except on
    the last layer), i = 0 .. num_layers-1.
    """

    num_layers: int = 2
    hidden_dim: int | None = None
    output_dim: int = 128
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    keep_layers: int | None = None

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}.")
        if self.keep_layers is not None and not 0 <= self.keep_layers < self.num_layers:
            raise ValueError(
                f"keep_layers must be in [0, {self.num_layers}) (hidden layers), "
                f"got {self.keep_layers}."
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, h: jnp.ndarray, train: bool) -> jnp.ndarray:
        hidden_dim = h.shape[-1] if self.hidden_dim is None else self.hidden_dim
        x = h
        for i in range(self.num_layers if self.keep_layers is None else self.keep_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(
                self.output_dim if last else hidden_dim,
                use_bias=False,
                kernel_init=_DENSE_INIT,
                dtype=self.dtype,
                name=f"dense_{i}",
            )(x)
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                use_bias=not last,
                dtype=self.dtype,
                name=f"bn_{i}",
            )(x)
            if not last:
                x = nn.relu(x)
        return x.astype(jnp.float32)


class LinearProbe(nn.Module):
    """Linear classifier on `stop_gradient(h)`: the online linear evaluation during pretraining.

    The stop-gradient means its loss trains only this layer and never changes the encoder.
    Computed in float32; kernel initialised N(0, 0.01^2), bias zero, as in the official code.
    """

    num_classes: int

    @nn.compact
    def __call__(self, h: jnp.ndarray) -> jnp.ndarray:
        features = jax.lax.stop_gradient(h).astype(jnp.float32)
        return nn.Dense(self.num_classes, kernel_init=_DENSE_INIT, name="dense")(features)
