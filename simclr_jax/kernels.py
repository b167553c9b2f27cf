"""Which kernels a program computes with, chosen for the platform it is compiled for.

The choice is made once, from the mesh a program is compiled over, never from JAX's default
backend: a step compiled on a CPU host for a TPU mesh (ahead of time, through
``jax.experimental.topologies``) gets XLA's kernels, and only CPU programs get the CPU ones
(:mod:`simclr_jax.cpu`).
"""

from jax.sharding import Mesh

from simclr_jax import cpu
from simclr_jax.models.layers import XLA_LAYERS, Layers, check_conv_precision, with_conv_precision

CONV_IMPLS = cpu.CONV_IMPLS
# Formulations in plain JAX, valid on every platform (the per-phase gradients only pay on CPUs).
_PORTABLE = ("auto", "xla", "subpixel_input_grads")


def platform(mesh: Mesh) -> str:
    """The platform (``"cpu"``, ``"gpu"``, ``"tpu"``, ...) of the devices of ``mesh``."""
    platforms = {device.platform for device in mesh.devices.flat}
    if len(platforms) != 1:
        raise ValueError(f"a mesh must hold devices of one platform, got {sorted(platforms)}.")
    return platforms.pop()


def for_platform(
    conv_impl: str, platform_name: str, device_count: int, conv_precision: str = "float32"
) -> Layers:
    """The layers ``conv_impl`` stands for in a ``platform_name`` program over ``device_count``
    devices (:func:`simclr_jax.cpu.layers` on CPU, XLA's own elsewhere), multiplying in
    ``conv_precision`` (:func:`~simclr_jax.models.layers.with_conv_precision`).

    Raises:
      ValueError: an unknown ``conv_impl`` or ``conv_precision``, or "onednn" for a program that
        is not a CPU one or that it cannot serve (:func:`simclr_jax.cpu.layers`).
    """
    check_conv_precision(conv_precision)  # before any kernel is built
    layers = _layers(conv_impl, platform_name, device_count, conv_precision)
    return with_conv_precision(layers, conv_precision)


def _layers(conv_impl: str, platform_name: str, device_count: int, conv_precision: str) -> Layers:
    if platform_name == "cpu":
        return cpu.layers(conv_impl, device_count, conv_precision)
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"Unknown conv_impl {conv_impl!r}; valid values: {list(CONV_IMPLS)}.")
    if conv_impl not in _PORTABLE:
        raise ValueError(
            f"conv_impl={conv_impl!r} runs in CPU programs only, and this one is compiled for "
            f"{platform_name!r}; use 'auto' or 'xla'."
        )
    return cpu.SUBPIXEL_LAYERS if conv_impl == "subpixel_input_grads" else XLA_LAYERS


def for_mesh(conv_impl: str, mesh: Mesh, conv_precision: str = "float32") -> Layers:
    """The layers ``conv_impl`` stands for in a program compiled over ``mesh``, multiplying in
    ``conv_precision``."""
    return for_platform(conv_impl, platform(mesh), mesh.devices.size, conv_precision)


def compiler_options(mesh: Mesh) -> dict[str, str] | None:
    """XLA options for a program compiled over ``mesh`` (None: XLA's defaults)."""
    return cpu.compiler_options() if platform(mesh) == "cpu" else None
