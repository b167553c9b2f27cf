"""The layers a network is built from: which convolution and batch-norm functions it computes with.

Models receive a :class:`Layers` value instead of choosing kernels themselves, so the choice is
made once, by the code that knows the mesh and the platform the program is compiled for
(:func:`simclr_jax.kernels.for_mesh`). Every ``Layers`` gives the same parameters and, within
float32 rounding, the same numbers; :data:`XLA_LAYERS` is JAX's own convolution and the portable
batch norm, right on every platform.
"""

import dataclasses
from collections.abc import Callable

import jax
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
