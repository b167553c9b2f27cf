"""The SimCLR network: encoder f, projection head g, and an online linear probe on h."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from simclr_jax.models.heads import LinearProbe, ProjectionHead
from simclr_jax.models.layers import XLA_LAYERS, Layers
from simclr_jax.models.resnet import ResNet


class SimCLR(nn.Module):
    """Encoder + projection head + stop-gradient linear probe.

    Attributes:
      encoder: any Flax module called as `encoder(x, train=train)` that returns features `[B, d]`.
      projection_head: a module called as `projection_head(h, train=train)`, e.g.
        `ProjectionHead`.
      num_classes: number of classes of the online linear probe (at least 1).
      reconstruction_head: optional module called as `head(h, image_shape, train=train)` that
        returns a dict (e.g. `{"reconstruction": [B, H, W, C]}`, see `models.decoder`) merged
        into the outputs; None (default) gives plain SimCLR.

    `__call__(x, train)` returns `{"h": [B, d], "z": [B, output_dim], "logits": [B, num_classes]}`,
    all float32. h is the representation kept after pretraining, z feeds the contrastive loss, and
    the logits come from `LinearProbe` on `stop_gradient(h)`, so a loss on them trains the probe
    alone. Parameters live under `encoder`, `projection_head` and `linear_probe` (and
    `reconstruction_head`).
    """

    encoder: nn.Module
    projection_head: nn.Module
    num_classes: int
    reconstruction_head: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {self.num_classes}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> dict[str, jnp.ndarray]:
        h = self.encoder(x, train=train).astype(jnp.float32)
        z = self.projection_head(h, train=train).astype(jnp.float32)
        logits = LinearProbe(self.num_classes, name="linear_probe")(h)
        outputs = {"h": h, "z": z, "logits": logits}
        if self.reconstruction_head is not None:
            outputs.update(self.reconstruction_head(h, x.shape[1:], train=train))
        return outputs


def simclr_resnet(
    depth: int,
    width_multiplier: float,
    stem: str,
    num_classes: int,
    projection_layers: int = 2,
    projection_dim: int = 128,
    projection_hidden_dim: int | None = None,
    base_width: int = 64,
    sk_ratio: float = 0.0,
    se_ratio: float = 0.0,
    zero_init_residual: bool = True,
    dtype: Any = jnp.float32,
    layers: Layers = XLA_LAYERS,
    reconstruction_head: nn.Module | None = None,
) -> SimCLR:
    """SimCLR with a `ResNet` encoder (computing with `layers`; `sk_ratio` and `se_ratio` > 0 turn
    on SimCLRv2's selective kernels and squeeze-and-excitation; `zero_init_residual` as in
    `ResNet`) and a `ProjectionHead` whose
    hidden layers are `projection_hidden_dim` wide (None: the width d of h, as officially)."""
    return SimCLR(
        encoder=ResNet(
            depth=depth,
            width_multiplier=width_multiplier,
            base_width=base_width,
            stem=stem,
            sk_ratio=sk_ratio,
            se_ratio=se_ratio,
            zero_init_residual=zero_init_residual,
            dtype=dtype,
            layers=layers,
        ),
        projection_head=ProjectionHead(
            num_layers=projection_layers,
            hidden_dim=projection_hidden_dim,
            output_dim=projection_dim,
            dtype=dtype,
        ),
        num_classes=num_classes,
        reconstruction_head=reconstruction_head,
    )
