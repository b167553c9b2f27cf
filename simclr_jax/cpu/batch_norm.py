"""Batch norm fused with its ReLU and residual add in the library's CPU kernels.

:func:`fused_batch_norm_train` is a training function for
:class:`simclr_jax.models.batch_norm.BatchNorm` (same signature and numbers as
:func:`~simclr_jax.models.batch_norm.batch_norm_train`): float32 calls run ``batch_norm.cc``'s
XLA FFI kernels, two multi-threaded passes per direction where XLA:CPU makes several
single-threaded fusions; every other call (bfloat16, a residual without a ReLU) is the portable
JAX formula. The kernels have no sharding rule (XLA gathers their operands on a multi-device
mesh) and are first-order differentiable only.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.cpu import extension
from simclr_jax.models.batch_norm import batch_norm_train


def _fusion(residual: jax.Array | None, relu: bool) -> str:
    """The native kernels' name for what follows the normalisation."""
    return "add_relu_" if residual is not None else ("relu_" if relu else "")


def _native_forward(x, residual, scale, bias, fusion: str, epsilon: float):
    extension.register_extension()
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


def fused_batch_norm_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    residual: jax.Array | None = None,
    relu: bool = False,
    epsilon: float = 1e-5,
    dtype: Any = jnp.float32,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode ``relu(bn(x) + residual)`` and its batch ``(mean, var)``, in the fused CPU
    kernels when every array and ``dtype`` are float32 and there is no residual or a residual
    and a ReLU; otherwise :func:`~simclr_jax.models.batch_norm.batch_norm_train`."""
    arrays = (x, scale, bias) if residual is None else (x, scale, bias, residual)
    if (
        (residual is not None and not relu)
        or jnp.dtype(dtype) != jnp.float32
        or any(a.dtype != jnp.float32 for a in arrays)
    ):
        return batch_norm_train(x, scale, bias, residual, relu, epsilon, dtype)
    y, mean, var = _native_batch_norm(x, residual, scale, bias, _fusion(residual, relu), epsilon)
    return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
