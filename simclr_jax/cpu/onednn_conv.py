"""2-D convolution computed by oneDNN on XLA:CPU, forward and both gradients.

XLA:CPU's own convolution kernels run a ResNet's convolutions several times slower than oneDNN,
the library PyTorch and TensorFlow use on CPUs (docs/cpu_performance.md).
:func:`conv_general_dilated` has the signature of ``lax.conv_general_dilated`` (it plugs into
``flax.linen.Conv(conv_general_dilated=...)``) and computes float32 NHWC/HWIO convolutions with
explicit padding, window strides, no dilation and one feature group as XLA custom calls into
oneDNN (:mod:`.extension`); a ``custom_vjp`` makes the gradients oneDNN's too. Any other call
(e.g. bfloat16) goes to :func:`.convolution.conv_general_dilated`.

The custom calls have no sharding rule: under ``jax.jit`` over a multi-device mesh XLA gathers
their operands and every device computes the whole batch, correctly but redundantly. That is why
``conv_impl="auto"`` only picks oneDNN for single-device CPU programs
(:func:`simclr_jax.cpu.layers`). The gradient is first-order only (no gradients of gradients, no
``jax.jvp``).
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from simclr_jax.cpu import convolution as conv_lib
from simclr_jax.cpu import extension


def _custom_call(target: str, a, b, out_shape, strides, padding):
    extension.register_extension()
    (top, bottom), (left, right) = padding
    return jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential"
    )(
        a,
        b,
        strides=np.array(strides, np.int64),
        padding=np.array([top, left, bottom, right], np.int64),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv(x, kernel, strides: tuple[int, int], padding: conv_lib.Padding):
    xla_conv = functools.partial(conv_lib.xla_conv, strides=strides, padding=padding)
    out_shape = jax.eval_shape(xla_conv, x, kernel).shape
    return _custom_call("simclr_onednn_conv_forward", x, kernel, out_shape, strides, padding)


def _forward(x, kernel, strides, padding):
    return _onednn_conv(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, dy):
    x, kernel = residuals
    dx = _custom_call("simclr_onednn_conv_input_gradient", dy, kernel, x.shape, strides, padding)
    dkernel = _custom_call(
        "simclr_onednn_conv_kernel_gradient", x, dy, kernel.shape, strides, padding
    )
    return dx, dkernel


_onednn_conv.defvjp(_forward, _backward)


def conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any, **options: Any
) -> jax.Array:
    """``lax.conv_general_dilated`` (same arguments) computed by oneDNN where it applies.

    Applies to float32 plain convolutions (:func:`.convolution.plain_conv_padding`); every other
    call goes to :func:`.convolution.conv_general_dilated`.
    """
    explicit_padding = conv_lib.plain_conv_padding(lhs, rhs, padding, **options)
    if explicit_padding is None or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return conv_lib.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
    return _onednn_conv(lhs, rhs, tuple(int(s) for s in window_strides), explicit_padding)
