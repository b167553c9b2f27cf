"""Batch norm with the ReLU and residual add that follow it in a ResNet, as one layer.

:class:`BatchNorm` has the variables and the numbers of ``flax.linen.BatchNorm`` (feature axis
last, batch statistics over every other axis, ``scale``/``bias`` params, ``mean``/``var`` running
averages in ``batch_stats``), and applies ``relu(bn(x) + residual)`` in one call. With
``native_kernels=True``, training-mode float32 calls run the library's fused CPU kernels
(``native/batch_norm.cc``: two multi-threaded passes per direction, where XLA:CPU makes several
single-threaded ones); every other call, and every other backend, computes the same formula in
JAX. Like the oneDNN convolutions, the native kernels have no sharding rule (XLA gathers their
operands on a multi-device mesh) and are first-order differentiable only.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax import native


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


def _fusion(residual: jax.Array | None, relu: bool) -> str:
    """The native kernels' name for what follows the normalisation."""
    return "add_relu_" if residual is not None else ("relu_" if relu else "")


def _native_forward(x, residual, scale, bias, fusion: str, epsilon: float):
    native.register_extension()
    features = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
    y, mean, var = jax.ffi.ffi_call(
        f"simclr_batch_norm_{fusion}forward",
        (jax.ShapeDtypeStruct(x.shape, jnp.float32), features, features),
    )(x, x if residual is None else residual, scale, bias, epsilon=np.float32(epsilon))
    return (y, mean, var), (x, y, mean, var, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _native_batch_norm(x, residual, scale, bias, fusion: str, epsilon: float):
    return _native_forward(x, residual, scale, bias, fusion, epsilon)[0]


def _native_backward(fusion, epsilon, saved, cotangents):
    x, y, mean, var, scale = saved
    dy = cotangents[0]  # the statistics leave through stop_gradient: their cotangents are zero
    has_residual = fusion == "add_relu_"
    features = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
    dx, dscale, dbias, dresidual = jax.ffi.ffi_call(
        f"simclr_batch_norm_{fusion}backward",
        (
            jax.ShapeDtypeStruct(x.shape, jnp.float32),
            features,
            features,
            jax.ShapeDtypeStruct(x.shape if has_residual else (0,), jnp.float32),
        ),
    )(dy, x, y, mean, var, scale, epsilon=np.float32(epsilon))
    return dx, dresidual if has_residual else None, dscale, dbias


_native_batch_norm.defvjp(_native_forward, _native_backward)


def batch_norm_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    residual: jax.Array | None = None,
    relu: bool = False,
    epsilon: float = 1e-5,
    dtype: Any = jnp.float32,
    native_kernels: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode ``relu(bn(x) + residual)`` and the batch ``(mean, var)`` it used.

    Statistics are over every axis but the last, in float32 or wider, and not differentiable
    (they only feed running averages). ``native_kernels`` uses the fused CPU kernels when every
    array and ``dtype`` are float32 and there is no residual or a residual and a ReLU; otherwise
    JAX computes the same formula.
    """
    arrays = (x, scale, bias) if residual is None else (x, scale, bias, residual)
    native_kernels = (
        native_kernels
        and (residual is None or relu)
        and jnp.dtype(dtype) == jnp.float32
        and all(a.dtype == jnp.float32 for a in arrays)
    )
    if native_kernels:
        fusion = _fusion(residual, relu)
        y, mean, var = _native_batch_norm(x, residual, scale, bias, fusion, epsilon)
    else:
        mean, var = _statistics(x)
        y = _normalize(x, mean, var, scale, bias, residual, relu, epsilon, dtype)
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


class BatchNorm(nn.Module):
    """``relu(bn(x) + residual)`` with ``flax.linen.BatchNorm``'s variables and numbers.

    Attributes:
      use_running_average: normalise with the running averages (evaluation) instead of the
        batch statistics (training, which also updates the averages).
      momentum: running-average decay.
      epsilon: variance epsilon.
      dtype: dtype of the output; statistics, scale and bias stay float32.
      scale_init: initialiser of ``scale`` (zeros for a residual branch's last BN).
      native_kernels: use the library's fused CPU kernels where they apply (CPU only).
    """

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32
    scale_init: Callable[..., jax.Array] = nn.initializers.ones
    native_kernels: bool = False

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
        native_kernels = self.native_kernels and not self.is_initializing()
        y, mean, var = batch_norm_train(
            x, scale, bias, residual, relu, self.epsilon, self.dtype, native_kernels
        )
        if not self.is_initializing():
            running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
            running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        return y
