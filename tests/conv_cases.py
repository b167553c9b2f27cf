"""Convolution shapes, and the loss they are tested with, shared by the tests of the
convolution formulations; and the skip of tests that need the native CPU extension."""

import jax
import jax.numpy as jnp
import pytest

NHWC = ("NHWC", "HWIO", "NHWC")


def skip_without_extension() -> None:
    """Skips the calling test where the oneDNN extension (simclr_jax.cpu.extension) cannot be
    built or loaded here, naming why."""
    from simclr_jax.cpu import extension

    reason = extension.unavailable_reason()
    if reason is not None:
        pytest.skip(f"the oneDNN extension is unavailable here: {reason}")


def skip_without_bfloat16_convolutions() -> None:
    """Skips the calling test where the oneDNN extension is unavailable or has no bfloat16
    convolutions for this CPU."""
    from simclr_jax.cpu import extension

    skip_without_extension()
    if not extension.bfloat16_convolutions():
        pytest.skip("oneDNN has no bfloat16 convolutions for this CPU (no AVX-512)")


def value_and_grads(conv_fn, x, kernel, stride, padding):
    """((sum(sin(y)), y), (dx, dkernel)) of ``y = conv_fn(x, kernel)``, jitted."""

    def loss(x, kernel):
        y = conv_fn(x, kernel, (stride, stride), padding, dimension_numbers=NHWC)
        return jnp.sum(jnp.sin(y)), y

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, kernel)


STRIDED_CASES = [
    # (batch, height, width, in, out, kernel, stride, padding)
    (2, 9, 9, 3, 5, 3, 2, ((1, 1), (1, 1))),  # ResNet's 3x3/2, odd size
    (2, 8, 8, 3, 5, 3, 2, ((1, 1), (1, 1))),  # even size
    (3, 7, 6, 4, 6, 1, 2, ((0, 0), (0, 0))),  # projection shortcut 1x1/2: three phases get zeros
    (2, 10, 10, 1, 4, 7, 2, ((3, 3), (3, 3))),  # ImageNet stem 7x7/2
    (2, 10, 11, 2, 3, 3, 3, ((1, 1), (1, 1))),  # stride 3: a phase's window starts past its row
    (1, 8, 8, 2, 3, 3, 2, ((0, 1), (2, 0))),  # asymmetric padding
    (2, 12, 12, 2, 2, 4, 2, ((1, 2), (1, 2))),  # even kernel
    # 1x1/2 with fewer channels than oneDNN's block: its own kernel gradient is wrong on AVX2
    (4, 12, 12, 4, 8, 1, 2, ((0, 0), (0, 0))),
]

STRIDE_1_CASES = [
    (2, 7, 7, 3, 5, 3, 1, ((1, 1), (1, 1))),  # ResNet's 3x3/1
    (2, 5, 6, 4, 6, 1, 1, ((0, 0), (0, 0))),  # 1x1 projection
    (1, 6, 6, 1, 3, 3, 1, ((0, 2), (1, 0))),  # one input channel, asymmetric padding
]
