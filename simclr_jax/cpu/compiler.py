"""XLA:CPU compiler options for the library's programs: convolutions stay XLA's own.

XLA:CPU hands convolutions, matrix products and reductions to the YNNPACK library by default.
For a ResNet's convolutions at 16-512 channels XLA's own kernels are the faster of the two on the
CPUs measured, kernel gradients most of all (docs/cpu_performance.md); YNNPACK keeps the matrix
products and reductions.
"""

import functools
import os

import jax
import jax.numpy as jnp

_YNN_FUSION_TYPES = "xla_cpu_experimental_ynn_fusion_type"
_YNN_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def compiler_options() -> dict[str, str] | None:
    """Options for ``jax.jit(..., compiler_options=...)`` of a program compiled for XLA:CPU.

    YNNPACK for matrix products and reductions only. None (XLA's defaults) when ``XLA_FLAGS``
    sets the YNNPACK fusion types itself (the user's choice wins), and when this version of XLA
    does not know the option.
    """
    if _YNN_FUSION_TYPES in os.environ.get("XLA_FLAGS", ""):
        return None
    return _supported_options()


@functools.cache
def _supported_options() -> dict[str, str] | None:
    """The options if XLA:CPU accepts them (checked once on a trivial program), else None."""
    options = {_YNN_FUSION_TYPES: _YNN_WITHOUT_CONVOLUTIONS}
    try:
        cpu = jax.devices("cpu")[0]
        jax.jit(lambda x: x + 1, compiler_options=options).lower(
            jax.device_put(jnp.zeros(()), cpu)
        ).compile()
    except jax.errors.JaxRuntimeError:
        return None
    return options
