"""The library's CPU speed work, behind one entry: :func:`layers` and :func:`compiler_options`.

XLA:CPU runs a ResNet's training step slower than the CPU libraries PyTorch uses; this package
holds what closes the gap (docs/cpu_performance.md): oneDNN's convolutions and batch norms fused
with their ReLU and residual add, both as XLA FFI custom calls built on first use from the C++
sources here (:mod:`.extension`), strided convolutions' input gradients computed per output
phase (:mod:`.convolution`), XLA:CPU compiler options (:mod:`.compiler`), and per-layer timing
(:mod:`.conv_layers`). Only programs compiled for the CPU platform use any of it; the choice is
made by :func:`simclr_jax.kernels.for_mesh`.
"""

import functools
import logging

from simclr_jax.cpu import convolution, extension, onednn_conv
from simclr_jax.cpu.batch_norm import fused_batch_norm_train
from simclr_jax.cpu.compiler import compiler_options
from simclr_jax.models.layers import XLA_LAYERS, Layers

CONV_IMPLS = ("auto", "xla", "subpixel_input_grads", "onednn")

SUBPIXEL_LAYERS = Layers(
    name="subpixel_input_grads", conv_general_dilated=convolution.conv_general_dilated
)
ONEDNN_LAYERS = Layers(
    name="onednn",
    conv_general_dilated=onednn_conv.conv_general_dilated,
    batch_norm_train=fused_batch_norm_train,
)
# For bfloat16 convolutions where oneDNN has no bfloat16 kernels: XLA's convolutions.
ONEDNN_BATCH_NORM_LAYERS = Layers(name="onednn_batch_norm", batch_norm_train=fused_batch_norm_train)

_log = logging.getLogger(__name__)


def layers(
    conv_impl: str = "auto", device_count: int = 1, conv_precision: str = "float32"
) -> Layers:
    """The layers ``conv_impl`` stands for in a CPU program over ``device_count`` devices whose
    convolutions multiply in ``conv_precision`` (the caller applies the precision:
    :func:`simclr_jax.kernels.for_platform`).

    "auto" is "onednn" (oneDNN convolutions and fused batch norms) for a single-device program
    where the extension builds here, else "subpixel_input_grads"; the native kernels have no
    sharding rule, so multi-device programs keep JAX's. Asking for "onednn" or "auto" builds the
    extension (once per machine, then cached); when it cannot be built, "auto" logs why once and
    falls back. oneDNN has bfloat16 convolutions only on CPUs with AVX-512 or newer: elsewhere
    "auto" keeps its fused batch norms with XLA's convolutions for "bfloat16", logging why once.

    Raises:
      ValueError: an unknown ``conv_impl``, or "onednn" where the extension cannot be built or,
        for "bfloat16", has no bfloat16 convolutions (the message says why).
    """
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"Unknown conv_impl {conv_impl!r}; valid values: {list(CONV_IMPLS)}.")
    if conv_impl == "xla":
        return XLA_LAYERS
    if conv_impl == "subpixel_input_grads" or (conv_impl == "auto" and device_count > 1):
        return SUBPIXEL_LAYERS
    unavailable = extension.unavailable_reason()
    if unavailable is not None:
        if conv_impl == "onednn":
            raise ValueError(f"conv_impl='onednn' is unavailable: {unavailable}")
        _warn_once(f"oneDNN kernels are unavailable, JAX's are used instead: {unavailable}")
        return SUBPIXEL_LAYERS
    if conv_precision != "bfloat16" or extension.bfloat16_convolutions():
        return ONEDNN_LAYERS
    no_bfloat16 = "oneDNN has no bfloat16 convolutions for this CPU (they need AVX-512 or newer)"
    if conv_impl == "onednn":
        raise ValueError(
            f"conv_impl='onednn' with conv_precision='bfloat16' is unavailable: {no_bfloat16}; "
            "use conv_precision='float32', or conv_impl='auto' for XLA's bfloat16 convolutions."
        )
    _warn_once(f"{no_bfloat16}: XLA's bfloat16 convolutions are used instead")
    return ONEDNN_BATCH_NORM_LAYERS


@functools.cache
def _warn_once(message: str) -> None:
    _log.warning(message)


__all__ = ["CONV_IMPLS", "compiler_options", "layers"]
