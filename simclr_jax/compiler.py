"""Compiler options for the library's jitted programs: on XLA:CPU, convolutions stay XLA's own.

XLA:CPU hands convolutions, matrix products and reductions to the YNNPACK library by default.
For a ResNet's convolutions at 16-512 channels, XLA's own (Eigen) kernels are the faster of the
two on the CPUs measured, kernel gradients most of all: summed over the Fashion-MNIST recipe's
convolutions (forward, input and kernel gradients), 1.02 s instead of 1.40 s on a 2-core x86 CPU
(README, Performance). YNNPACK keeps the matrix products and reductions. Pass
:func:`compiler_options` to ``jax.jit(..., compiler_options=...)``; it changes nothing on GPUs and
TPUs.
"""

import functools
import os

import jax
import jax.numpy as jnp

_YNN_FUSION_TYPES = "xla_cpu_experimental_ynn_fusion_type"
_YNN_WITHOUT_CONVOLUTIONS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def compiler_options(backend: str | None = None) -> dict[str, str] | None:
    """XLA options for a program compiled for ``backend`` (default: JAX's default backend).

    On CPU: YNNPACK for matrix products and reductions only. None (XLA's defaults) on other
    backends, when ``XLA_FLAGS`` sets the YNNPACK fusion types itself (the user's choice wins),
    and when this version of XLA does not know the option.
    """
    if (backend or jax.default_backend()) != "cpu":
        return None
    if _YNN_FUSION_TYPES in os.environ.get("XLA_FLAGS", ""):
        return None
    return _supported_cpu_options()


@functools.cache
def _supported_cpu_options() -> dict[str, str] | None:
    """The CPU options if XLA accepts them (checked once on a trivial program), else None."""
    options = {_YNN_FUSION_TYPES: _YNN_WITHOUT_CONVOLUTIONS}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.zeros(())).compile()
    except jax.errors.JaxRuntimeError:
        return None
    return options
