"""2-D convolution whose kernel gradient is computed as matrix products, for XLA:CPU.

XLA:CPU runs a convolution's forward pass and its input gradient at close to matrix-multiply
speed, but its kernel gradient (a convolution that contracts over the batch and spatial axes)
several times slower: in a ResNet training step on a CPU that one operation takes most of the
time. :func:`conv_general_dilated` here has the signature of ``lax.conv_general_dilated`` (so it
plugs into ``flax.linen.Conv(conv_general_dilated=...)``) and the same values and gradients, but
computes the kernel gradient as one matrix product per kernel tap: ``dW[i, j] = X_ij^T · dY``,
where ``X_ij`` is the input window that tap ``(i, j)`` sees at every output position. The forward
pass and the input gradient are XLA's own.

It covers the convolutions a ResNet uses (NHWC inputs, HWIO kernels, explicit padding, window
strides, no dilation, one feature group) and hands anything else to ``lax.conv_general_dilated``
unchanged. :func:`resolve_conv_impl` picks it on the CPU backend only: on GPUs and TPUs XLA's
convolution gradients are already fast, and those paths stay exactly XLA's.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "matmul_grads")
_NHWC = lax.ConvDimensionNumbers(
    lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2)
)

Padding = tuple[tuple[int, int], tuple[int, int]]


def resolve_conv_impl(conv_impl: str, backend: str | None = None) -> str:
    """ "auto" -> "matmul_grads" on the CPU backend and "xla" elsewhere; others unchanged."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"Unknown conv_impl {conv_impl!r}; valid values: {list(CONV_IMPLS)}.")
    if conv_impl != "auto":
        return conv_impl
    return "matmul_grads" if (backend or jax.default_backend()) == "cpu" else "xla"


def _xla_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding):
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


def _kernel_gradient_strided(x, dy, kernel_hw, strides, padding):
    """``dW[i, j] = X_ij^T · dY``, each tap's window cut from a channel-major copy of the input."""
    (kh, kw), (sh, sw) = kernel_hw, strides
    _, ho, wo, out_features = dy.shape
    padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    channel_major = jnp.transpose(padded, (3, 0, 1, 2))
    dy_rows = dy.reshape(-1, out_features)
    return jnp.stack(
        [
            jnp.stack(
                [
                    _matmul(
                        channel_major[
                            :, :, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw
                        ].reshape(x.shape[-1], -1),
                        dy_rows,
                    )
                    for j in range(kw)
                ]
            )
            for i in range(kh)
        ]
    )


def _kernel_gradient_unit_stride(x, dy, kernel_hw, padding):
    """``dW[i, j]`` for stride 1 without cutting windows out of the input.

    In the padded input flattened to one axis ``p = (n * Hp + h) * Wp + w``, tap ``(i, j)`` reads
    position ``q + i * Wp + j`` for the output at ``q``. So with ``G`` the output gradient laid
    out on the same padded grid (zeros off the output positions), ``dW[i, j] = X^T · G`` shifted by
    that offset: one channel-major copy of the input, and per tap only a contiguous row range of
    ``G``. Windows never cross images, since ``G`` is zero wherever they would.
    """
    kh, kw = kernel_hw
    _, ho, wo, out_features = dy.shape
    padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    _, hp, wp, in_features = padded.shape
    channel_major = jnp.transpose(padded, (3, 0, 1, 2)).reshape(in_features, -1)
    grid = jnp.pad(dy, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0))).reshape(-1, out_features)
    max_offset = (kh - 1) * wp + kw - 1
    shifted = jnp.pad(grid, ((max_offset, 0), (0, 0)))
    rows = grid.shape[0]

    def tap(i, j):
        start = max_offset - (i * wp + j)
        return _matmul(channel_major, shifted[start : start + rows])

    return jnp.stack([jnp.stack([tap(i, j) for j in range(kw)]) for i in range(kh)])


# Above this ratio of padded-grid to output positions (maps smaller than about 16x16 for a 3x3
# kernel), the windows' copies cost less than the extra products of the unit-stride method.
_MAX_GRID_WASTE = 1.3


def _grid_waste(spatial: tuple[int, int], padding: Padding) -> float:
    """Padded grid positions per output position of a unit-stride convolution."""
    (height, width), ((top, bottom), (left, right)) = spatial, padding
    return (height + top + bottom) * (width + left + right) / (height * width)


def _matmul(a, b):
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_grads(x, kernel, strides, padding):
    return _xla_conv(x, kernel, strides, padding)


def _forward(x, kernel, strides, padding):
    return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _backward(strides, padding, residuals, dy):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _xla_conv(x, kernel, strides, padding), x)
    (dx,) = input_vjp(dy)
    if strides == (1, 1) and _grid_waste(x.shape[1:3], padding) <= _MAX_GRID_WASTE:
        dkernel = _kernel_gradient_unit_stride(x, dy, kernel.shape[:2], padding)
    else:
        dkernel = _kernel_gradient_strided(x, dy, kernel.shape[:2], strides, padding)
    return dx, dkernel.astype(kernel.dtype)


_conv_matmul_grads.defvjp(_forward, _backward)


def _explicit_padding(padding: Any) -> Padding | None:
    """``padding`` as two ``(low, high)`` int pairs, or None when it is a string or not 2-D."""
    if isinstance(padding, str) or len(padding) != 2:
        return None
    return tuple((int(low), int(high)) for low, high in padding)  # type: ignore[return-value]


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` with matrix-product kernel gradients where it applies.

    Applies to NHWC/HWIO 2-D convolutions with explicit padding, no dilation, one feature and
    batch group, default precision; every other call goes to ``lax.conv_general_dilated``.
    """
    explicit_padding = _explicit_padding(padding)
    applies = (
        lhs.ndim == 4
        and explicit_padding is not None
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC
        and feature_group_count == 1
        and batch_group_count == 1
        and precision is None
        and preferred_element_type is None
    )
    if not applies:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    return _conv_matmul_grads(lhs, rhs, tuple(int(s) for s in window_strides), explicit_padding)
