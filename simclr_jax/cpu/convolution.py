"""2-D convolution whose strided input gradient is computed per output phase, for XLA:CPU.

XLA computes the input gradient of a strided convolution as a convolution over the output
gradient dilated with zeros (``lhs_dilation``): at stride 2, three quarters of its arithmetic
multiplies zeros, and XLA:CPU runs that form several times slower than a plain convolution
(docs/cpu_performance.md).
:func:`conv_general_dilated` here has the signature of ``lax.conv_general_dilated`` (so it plugs
into ``flax.linen.Conv(conv_general_dilated=...)``) and the same values and gradients, but splits
that input gradient by phase: for stride ``s`` the input rows ``h = s * m + r`` of phase ``r``
receive gradient from a fixed subset of kernel rows, so each of the ``s * s`` phases is a
stride-1 convolution of the output gradient with those taps, and the phases are interleaved back
into the input's shape. Only useful products are computed. The forward pass, the kernel gradient and
every stride-1 convolution are XLA's own.

It covers the convolutions a ResNet uses (NHWC inputs, HWIO kernels, explicit padding, window
strides, no dilation, one feature group) and hands anything else to ``lax.conv_general_dilated``
unchanged. :func:`simclr_jax.cpu.layers` picks it for CPU programs where oneDNN's convolutions
(:mod:`.onednn_conv`) are not available or not applicable (multi-device meshes); on GPUs and TPUs
XLA's convolution gradients are already fast, and those programs keep XLA's.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))

Padding = tuple[tuple[int, int], tuple[int, int]]


def xla_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding):
    """XLA's own NHWC/HWIO convolution: what every formulation here must equal."""
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


def _phase_taps(kernel_size: int, stride: int, pad_low: int, phase: int) -> list[int]:
    """Kernel indices that reach input positions ``stride * m + phase``, in window order.

    Input position ``h`` is read by output ``o`` through kernel index ``h + pad_low - stride * o``;
    for ``h = stride * m + phase`` and ``o = m - t`` that index is ``stride * t + phase + pad_low``.
    The list runs over ``t`` from its largest to its smallest valid value, i.e. over the outputs
    ``m - t`` in increasing order, which is the order a convolution window reads them in.
    """
    t_high = (kernel_size - 1 - phase - pad_low) // stride
    t_low = -((phase + pad_low) // stride)
    return [stride * t + phase + pad_low for t in range(t_high, t_low - 1, -1)]


def _phase_padding(taps: list[int], stride: int, pad_low: int, phase: int, rows: int, out: int):
    """Padding of the output gradient for one phase's stride-1 convolution with ``taps``.

    The window of phase row ``m`` starts at output ``m - t_high`` (``taps[0]`` is the tap of
    ``t_high``) and spans ``len(taps)`` outputs; ``rows`` rows are produced from ``out`` outputs.
    """
    t_high = (taps[0] - phase - pad_low) // stride
    return (t_high, rows + len(taps) - 1 - t_high - out)


def _input_gradient_by_phase(dy, kernel, input_hw, strides, padding):
    """dL/dx of a strided convolution: one stride-1 convolution of ``dy`` per output phase."""
    n, out_h, out_w, _ = dy.shape
    (height, width), (sh, sw) = input_hw, strides
    rows, cols = -(-height // sh), -(-width // sw)
    transposed = jnp.swapaxes(kernel, 2, 3)  # HWIO of the gradient convolution: out -> in
    in_features = kernel.shape[2]
    phase_rows = []
    for rh in range(sh):
        phase_cols = []
        for rw in range(sw):
            taps_h = _phase_taps(kernel.shape[0], sh, padding[0][0], rh)
            taps_w = _phase_taps(kernel.shape[1], sw, padding[1][0], rw)
            if not taps_h or not taps_w:  # no kernel tap reaches these positions
                phase_cols.append(jnp.zeros((n, rows, cols, in_features), dy.dtype))
                continue
            phase_kernel = transposed[jnp.array(taps_h)][:, jnp.array(taps_w)]
            phase_pad = (
                _phase_padding(taps_h, sh, padding[0][0], rh, rows, out_h),
                _phase_padding(taps_w, sw, padding[1][0], rw, cols, out_w),
            )
            phase_cols.append(xla_conv(dy, phase_kernel, (1, 1), phase_pad))
        phase_rows.append(jnp.stack(phase_cols, axis=3))  # [n, rows, cols, sw, in]
    interleaved = jnp.stack(phase_rows, axis=2)  # [n, rows, sh, cols, sw, in]
    return interleaved.reshape(n, rows * sh, cols * sw, in_features)[:, :height, :width]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_subpixel_input_grads(x, kernel, strides, padding):
    return xla_conv(x, kernel, strides, padding)


def _forward(x, kernel, strides, padding):
    return xla_conv(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, dy):
    x, kernel = residuals
    _, kernel_vjp = jax.vjp(lambda kernel: xla_conv(x, kernel, strides, padding), kernel)
    (dkernel,) = kernel_vjp(dy)
    dx = _input_gradient_by_phase(dy, kernel, x.shape[1:3], strides, padding)
    return dx.astype(x.dtype), dkernel


_conv_subpixel_input_grads.defvjp(_forward, _backward)


def plain_conv_padding(
    lhs: jax.Array, rhs: jax.Array, padding: Any, **options: Any
) -> Padding | None:
    """``padding`` as ``(low, high)`` int pairs if the call is a plain 2-D convolution, else None.

    Plain: NHWC inputs, HWIO kernels, explicit padding, no dilation, one feature and batch group,
    default precision and result type, which is what this module's formulations cover.
    ``options`` are ``lax.conv_general_dilated``'s keyword arguments.
    """
    if lhs.ndim != 4 or isinstance(padding, str) or len(padding) != 2:
        return None
    plain = (
        all(d == 1 for d in (options.get("lhs_dilation") or (1, 1)))
        and all(d == 1 for d in (options.get("rhs_dilation") or (1, 1)))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, options.get("dimension_numbers"))
        == NHWC
        and options.get("feature_group_count", 1) == 1
        and options.get("batch_group_count", 1) == 1
        and options.get("precision") is None
        and options.get("preferred_element_type") is None
    )
    return tuple((int(low), int(high)) for low, high in padding) if plain else None  # type: ignore[return-value]


def conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any, **options: Any
) -> jax.Array:
    """``lax.conv_general_dilated`` (same arguments) with a per-phase input gradient.

    Applies to strided plain convolutions (:func:`plain_conv_padding`); every other call goes to
    ``lax.conv_general_dilated`` unchanged.
    """
    explicit_padding = plain_conv_padding(lhs, rhs, padding, **options)
    strides = tuple(int(s) for s in window_strides)
    if explicit_padding is None or all(s == 1 for s in strides):
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **options)
    return _conv_subpixel_input_grads(lhs, rhs, strides, explicit_padding)
