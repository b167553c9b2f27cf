"""Batch norm with the ReLU and residual add that follow it in a ResNet, as one layer.

:class:`BatchNorm` has the variables and the numbers of ``flax.linen.BatchNorm`` (feature axis
last, batch statistics over every other axis, ``scale``/``bias`` params, ``mean``/``var`` running
averages in ``batch_stats``), and applies ``relu(bn(x) + residual)`` in one call, so that a
backend-specific training function (``train_fn``, e.g. the fused CPU kernels of
:mod:`simclr_jax.cpu`) can compute the three as one operation. :func:`batch_norm_train` is the
portable training function, in plain JAX.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _statistics(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Batch mean and (biased) variance over all axes but the last, in float32 or wider."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.maximum(0.0, jnp.mean(x * x, axes) - mean * mean)
    return mean, var


def _normalize(x, mean, var, scale, bias, residual, relu: bool, epsilon: float, dtype):
    """``relu((x - mean) * rsqrt(var + epsilon) * scale + bias + residual)`` in ``dtype``."""
    multiplier = jax.lax.rsqrt(var + epsilon) * scale
    y = ((x - mean) * multiplier + bias).astype(dtype)
    if residual is not None:
        y = y + residual
    return nn.relu(y) if relu else y


def batch_norm_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    residual: jax.Array | None = None,
    relu: bool = False,
    epsilon: float = 1e-5,
    dtype: Any = jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode ``relu(bn(x) + residual)`` and the batch ``(mean, var)`` it used.

    Statistics are over every axis but the last, in float32 or wider, and not differentiable
    (they only feed running averages). Every training function a :class:`BatchNorm` is given
    has this signature and these numbers.
    """
    mean, var = _statistics(x)
    y = _normalize(x, mean, var, scale, bias, residual, relu, epsilon, dtype)
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


TrainFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


class BatchNorm(nn.Module):
    """``relu(bn(x) + residual)`` with ``flax.linen.BatchNorm``'s variables and numbers.

    Attributes:
      use_running_average: normalise with the running averages (evaluation) instead of the
        batch statistics (training, which also updates the averages).
      momentum: running-average decay.
      epsilon: variance epsilon.
      dtype: dtype of the output; statistics, scale and bias stay float32.
      scale_init: initialiser of ``scale`` (zeros for a residual branch's last BN).
      train_fn: computes training-mode calls (signature and numbers of
        :func:`batch_norm_train`, which is the default).
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    scale_init: Callable[..., jax.Array] = nn.initializers.ones
    train_fn: TrainFn = batch_norm_train

    @nn.compact
    def __call__(
        self, x: jax.Array, residual: jax.Array | None = None, relu: bool = False
    ) -> jax.Array:
        features = (x.shape[-1],)
        running_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32)
        )
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
        scale = self.param("scale", self.scale_init, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        if self.use_running_average:
            mean, var = running_mean.value, running_var.value
            return _normalize(x, mean, var, scale, bias, residual, relu, self.epsilon, self.dtype)
        train_fn = batch_norm_train if self.is_initializing() else self.train_fn
        y, mean, var = train_fn(x, scale, bias, residual, relu, self.epsilon, self.dtype)
        if not self.is_initializing():
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        return y
