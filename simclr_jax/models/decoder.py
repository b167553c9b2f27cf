"""Reconstruction heads on the representation h, for the hybrid contrastive + reconstruction loss.

``ConvDecoder`` maps a vector to an image: a dense layer to a small spatial map, then stride-2
transposed convolutions up to at least the target size, a 3×3 convolution to the target channel
count, a centre crop to exactly ``H × W`` and a sigmoid, so outputs lie in (0, 1) like the
pipeline's images. The number of upsamplings adapts to the image side (28 px: 7 → 14 → 28;
32 px: 4 → 8 → 16 → 32; 96 px: 6 → ... → 96).

``AutoencoderHead`` decodes h itself. ``VariationalHead`` predicts the mean μ and log-variance
log σ² of a Gaussian posterior q(u | h), decodes a sample ``u = μ + σ·ε`` (reparameterisation,
ε drawn from the ``sample`` RNG stream) in training, and decodes μ at inference, so evaluation is
deterministic. Both return a dict merged into the SimCLR model's outputs.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Name of the Flax RNG stream the variational head samples ε from.
SAMPLE_RNG = "sample"
# The smallest side the decoder's first feature map starts from (before upsampling).
_MIN_START_SIDE = 4


def upsampling_plan(height: int, width: int) -> tuple[int, int, int]:
    """``(num_upsamplings, start_height, start_width)`` of a decoder reaching ``height × width``.

    As many ×2 upsamplings as keep the starting map at least 4 px on its shorter side; the
    starting map is the target size divided by ``2**num_upsamplings``, rounded up (the excess
    is cropped at the end).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image height and width must be positive, got {height}×{width}")
    num_upsamplings = max(0, (min(height, width) // _MIN_START_SIDE).bit_length() - 1)
    factor = 2**num_upsamplings
    return num_upsamplings, -(-height // factor), -(-width // factor)


class ConvDecoder(nn.Module):
    """Vector ``[B, d]`` -> image ``[B, H, W, C]`` in (0, 1), float32.

    Attributes:
      channels: channels of the last upsampled map; each earlier map has twice as many.
      dtype: computation dtype; parameters stay float32.
    """

    channels: int = 32
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError(f"decoder channels must be at least 1, got {self.channels}")
        super().__post_init__()

    @nn.compact
    def __call__(self, u: jnp.ndarray, image_shape: Sequence[int]) -> jnp.ndarray:
        height, width, out_channels = image_shape
        num_upsamplings, start_height, start_width = upsampling_plan(height, width)
        start_channels = self.channels * 2**num_upsamplings
        x = nn.Dense(start_height * start_width * start_channels, dtype=self.dtype, name="dense")(u)
        x = nn.relu(x.reshape(u.shape[0], start_height, start_width, start_channels))
        for i in range(num_upsamplings):
            x = nn.ConvTranspose(
                self.channels * 2 ** (num_upsamplings - 1 - i),
                (4, 4),
                strides=(2, 2),
                padding="SAME",
                dtype=self.dtype,
                name=f"upsample_{i}",
            )(x)
            x = nn.relu(x)
        x = nn.Conv(out_channels, (3, 3), padding="SAME", dtype=self.dtype, name="output")(x)
        top = (x.shape[1] - height) // 2
        left = (x.shape[2] - width) // 2
        x = x[:, top : top + height, left : left + width]
        return nn.sigmoid(x.astype(jnp.float32))


class AutoencoderHead(nn.Module):
    """Decodes h: returns ``{"reconstruction": [B, H, W, C]}``."""

    channels: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, h: jnp.ndarray, image_shape: Sequence[int], train: bool
    ) -> dict[str, jnp.ndarray]:
        del train  # same computation in training and inference
        decoder = ConvDecoder(channels=self.channels, dtype=self.dtype, name="decoder")
        return {"reconstruction": decoder(h, image_shape)}


class VariationalHead(nn.Module):
    """μ, log σ² from h; decodes a reparameterised sample (training) or μ (inference).

    Returns ``{"reconstruction", "mu", "log_var"}``; ``mu`` and ``log_var`` are ``[B,
    latent_dim]`` float32. Training requires the ``sample`` RNG stream.
    """

    latent_dim: int = 64
    channels: int = 32
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be at least 1, got {self.latent_dim}")
        super().__post_init__()

    @nn.compact
    def __call__(
        self, h: jnp.ndarray, image_shape: Sequence[int], train: bool
    ) -> dict[str, jnp.ndarray]:
        mu = nn.Dense(self.latent_dim, name="mu")(h.astype(jnp.float32))
        log_var = nn.Dense(self.latent_dim, name="log_var")(h.astype(jnp.float32))
        if train:
            epsilon = jax.random.normal(self.make_rng(SAMPLE_RNG), mu.shape, mu.dtype)
            u = mu + jnp.exp(0.5 * log_var) * epsilon
        else:
            u = mu
        decoder = ConvDecoder(channels=self.channels, dtype=self.dtype, name="decoder")
        return {"reconstruction": decoder(u, image_shape), "mu": mu, "log_var": log_var}
