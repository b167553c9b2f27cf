"""The layers a network is built from: which convolution and batch-norm functions it computes with.

Models receive a :class:`Layers` value instead of choosing kernels themselves, so the choice is
made once, by the code that knows the mesh and the platform the program is compiled for
(:func:`simclr_jax.kernels.for_mesh`). Every ``Layers`` gives the same parameters and, within
float32 rounding, the same numbers; :data:`XLA_LAYERS` is JAX's own convolution and the portable
batch norm, right on every platform.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from simclr_jax.models.batch_norm import TrainFn, batch_norm_train


@dataclasses.dataclass(frozen=True)
class Layers:
    """How a network computes its convolutions and its training-mode batch norms.

    Attributes:
      name: what the choice is called in logs and results (e.g. ``"xla"``, ``"onednn"``).
      conv_general_dilated: a function with ``lax.conv_general_dilated``'s signature and numbers
        (it is passed to ``flax.linen.Conv``).
      batch_norm_train: the training function of every
        :class:`~simclr_jax.models.batch_norm.BatchNorm` (signature and numbers of
        :func:`~simclr_jax.models.batch_norm.batch_norm_train`).
    """

    name: str = "xla"
    conv_general_dilated: Callable[..., jax.Array] = lax.conv_general_dilated
    batch_norm_train: TrainFn = batch_norm_train


XLA_LAYERS = Layers()

CONV_PRECISIONS = ("float32", "bfloat16")


def check_conv_precision(conv_precision: str) -> None:
    """Raise ValueError naming the valid values unless ``conv_precision`` is one of them."""
    if conv_precision not in CONV_PRECISIONS:
        raise ValueError(
            f"Unknown conv_precision {conv_precision!r}; valid values: {list(CONV_PRECISIONS)}."
        )


def with_conv_precision(layers: Layers, conv_precision: str) -> Layers:
    """``layers`` whose convolutions multiply in ``conv_precision``.

    "float32" returns ``layers`` unchanged. "bfloat16" rounds each convolution's two operands to
    bfloat16 and keeps the sums and the result in the input's type (mixed precision for the
    convolutions only: batch norms, heads, loss and parameters stay as they were). oneDNN's
    convolutions compute these natively, which pays on CPUs with bfloat16 instructions; GPUs and
    TPUs get XLA's bfloat16 convolutions.

    Raises:
      ValueError: an unknown ``conv_precision``.
    """
    check_conv_precision(conv_precision)
    if conv_precision == "float32":
        return layers
    conv = layers.conv_general_dilated

    def conv_bfloat16_products(
        lhs: jax.Array, rhs: jax.Array, window_strides: Any, padding: Any, **options: Any
    ) -> jax.Array:
        options["preferred_element_type"] = lhs.dtype
        return conv(
            lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), window_strides, padding, **options
        )

    return dataclasses.replace(
        layers, name=f"{layers.name}+bfloat16", conv_general_dilated=conv_bfloat16_products
    )
