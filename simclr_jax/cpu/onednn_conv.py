"""2-D convolution computed by oneDNN on XLA:CPU, forward and both gradients.

XLA:CPU's own convolution kernels run a ResNet's convolutions several times slower than oneDNN,
the library PyTorch and TensorFlow use on CPUs (docs/cpu_performance.md).
:func:`conv_general_dilated` has the signature of ``lax.conv_general_dilated`` (it plugs into
``flax.linen.Conv(conv_general_dilated=...)``) and computes NHWC/HWIO convolutions with explicit
padding, window strides, no dilation and one feature group as XLA custom calls into oneDNN
(:mod:`.extension`); a ``custom_vjp`` makes the gradients oneDNN's too. The operands are float32,
or bfloat16 with a float32 result (``preferred_element_type``): products in bfloat16, sums in
float32, as are the gradients' (their output gradient is rounded to bfloat16). Any other call
goes to :func:`.convolution.conv_general_dilated`.

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
    dy = dy.astype(x.dtype)  # the operands' type: the products are computed in it
    dx = _custom_call("simclr_onednn_conv_input_gradient", dy, kernel, x.shape, strides, padding)
    dkernel = _custom_call(
        "simclr_onednn_conv_kernel_gradient", x, dy, kernel.shape, strides, padding
    )
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_onednn_conv.defvjp(_forward, _backward)


def conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any, **options: Any
) -> jax.Array:
    """``lax.conv_general_dilated`` (same arguments) computed by oneDNN where it applies.

    Applies to plain convolutions (:func:`.convolution.plain_conv_padding`) of float32 operands,
    or of bfloat16 operands with ``preferred_element_type=float32``; every other call goes to
    :func:`.convolution.conv_general_dilated`. Strided 1x1 convolutions without padding are
    computed at stride 1 on the pixels they read.
    """
    result_type = options.pop("preferred_element_type", None)
    explicit_padding = conv_lib.plain_conv_padding(lhs, rhs, padding, **options)
    operands = {jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype)}
    supported = (operands == {jnp.dtype(jnp.float32)} and result_type in (None, jnp.float32)) or (
        operands == {jnp.dtype(jnp.bfloat16)} and result_type == jnp.float32
    )
    if explicit_padding is None or not supported:
        return conv_lib.conv_general_dilated(
            lhs, rhs, window_strides, padding, preferred_element_type=result_type, **options
        )
    strides = tuple(int(s) for s in window_strides)
    if rhs.shape[:2] == (1, 1) and explicit_padding == ((0, 0), (0, 0)):
        # A strided 1x1 convolution reads every stride-th pixel: the same convolution at stride
        # 1 of those pixels. Handing oneDNN the stride-1 form also keeps clear of its strided 1x1
        # kernel gradient for NHWC inputs with fewer channels than its block, which writes past
        # its workspace and returns wrong values on AVX2 CPUs (oneDNN issue #6035).
        lhs, strides = lhs[:, :: strides[0], :: strides[1], :], (1, 1)
    return _onednn_conv(lhs, rhs, strides, explicit_padding)
