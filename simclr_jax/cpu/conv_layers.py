"""Where a training step's convolution time goes: each distinct convolution of a model, timed.

:func:`model_convolutions` reads the convolutions a model's training-mode forward pass runs from
its jaxpr (input and kernel shapes, strides, padding, how many times each occurs), so it follows
any depth, stem or width. :func:`time_convolutions` compiles each one three ways, as the
training step needs it (the forward pass, the input gradient and the kernel gradient), with the
given layers' convolution and the CPU compiler options, and reports milliseconds and GFLOP/s per
part.
The input gradient of a convolution that reads the images themselves is never computed in
training, so it is not timed. ``python -m simclr_jax.benchmark --conv-layers`` prints the table.
"""

import collections
import statistics
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from simclr_jax import timing
from simclr_jax.cpu import compiler
from simclr_jax.cpu.convolution import NHWC
from simclr_jax.models.layers import Layers


class Convolution(NamedTuple):
    """One distinct NHWC convolution of a model, and whether it reads the model's input."""

    input_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    reads_model_input: bool


def _conv_equations(jaxpr: jax.extend.core.Jaxpr):
    """Every ``conv_general_dilated`` equation of ``jaxpr`` and of the jaxprs nested in it."""
    for equation in jaxpr.eqns:
        if equation.primitive.name == "conv_general_dilated":
            yield equation
        for param in equation.params.values():
            inner = getattr(param, "jaxpr", param)
            if isinstance(inner, jax.extend.core.Jaxpr):
                yield from _conv_equations(inner)


def model_convolutions(
    apply_fn: Callable[..., Any], variables: Any, images: jax.ShapeDtypeStruct
) -> collections.Counter[Convolution]:
    """The convolutions ``apply_fn(variables, images, train=True)`` runs, with their counts."""
    closed = jax.make_jaxpr(
        lambda variables, images: apply_fn(variables, images, train=True, mutable=["batch_stats"])
    )(variables, images)
    model_input = closed.jaxpr.invars[-1]
    found: collections.Counter[Convolution] = collections.Counter()
    for equation in _conv_equations(closed.jaxpr):
        lhs, rhs = equation.invars
        found[
            Convolution(
                tuple(lhs.aval.shape),
                tuple(rhs.aval.shape),
                tuple(equation.params["window_strides"]),
                tuple(tuple(p) for p in equation.params["padding"]),
                lhs is model_input,
            )
        ] += 1
    return found


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after one call that compiles it."""
    timing.wall_times(fn, 1)
    return 1e3 * statistics.median(timing.wall_times(fn, repeats))


def time_convolution(
    convolution: Convolution, layers: Layers, dtype: Any = jnp.float32, repeats: int = 5
) -> dict[str, float | None]:
    """Median milliseconds of the forward pass, input gradient and kernel gradient, computed by
    ``layers.conv_general_dilated``."""
    conv_fn = layers.conv_general_dilated

    def forward(x, kernel):
        return conv_fn(x, kernel, convolution.strides, convolution.padding, dimension_numbers=NHWC)

    x = jax.random.uniform(jax.random.key(0), convolution.input_shape, dtype)
    kernel = jax.random.normal(jax.random.key(1), convolution.kernel_shape, dtype)
    dy = jnp.ones_like(forward(x, kernel))
    options = compiler.compiler_options()
    input_grad = jax.jit(
        lambda x, kernel, dy: jax.vjp(lambda x: forward(x, kernel), x)[1](dy)[0],
        compiler_options=options,
    )
    kernel_grad = jax.jit(
        lambda x, kernel, dy: jax.vjp(lambda kernel: forward(x, kernel), kernel)[1](dy)[0],
        compiler_options=options,
    )
    forward_jit = jax.jit(forward, compiler_options=options)
    return {
        "forward_ms": _median_ms(lambda: forward_jit(x, kernel), repeats),
        "input_grad_ms": (
            None
            if convolution.reads_model_input
            else _median_ms(lambda: input_grad(x, kernel, dy), repeats)
        ),
        "kernel_grad_ms": _median_ms(lambda: kernel_grad(x, kernel, dy), repeats),
    }


def _gflop(convolution: Convolution) -> float:
    """Multiply-adds x 2 of the forward pass (each gradient costs the same)."""
    n, height, width, _ = convolution.input_shape
    kh, kw, cin, cout = convolution.kernel_shape
    (top, bottom), (left, right) = convolution.padding
    out_h = (height + top + bottom - kh) // convolution.strides[0] + 1
    out_w = (width + left + right - kw) // convolution.strides[1] + 1
    return 2 * n * out_h * out_w * kh * kw * cin * cout / 1e9


def time_convolutions(
    convolutions: collections.Counter[Convolution],
    layers: Layers,
    dtype: Any = jnp.float32,
    repeats: int = 5,
) -> dict[str, Any]:
    """Per-layer records (shapes, count, GFLOP, ms and GFLOP/s per part) and the step's totals:
    each part's milliseconds summed over every convolution of the model, counts included."""
    records, totals = [], {"forward_ms": 0.0, "input_grad_ms": 0.0, "kernel_grad_ms": 0.0}
    for convolution, count in convolutions.items():
        timings = time_convolution(convolution, layers, dtype, repeats)
        gflop = _gflop(convolution)
        records.append(
            {
                "input": list(convolution.input_shape),
                "kernel": list(convolution.kernel_shape),
                "strides": list(convolution.strides),
                "count": count,
                "gflop": round(gflop, 3),
                **{name: None if ms is None else round(ms, 2) for name, ms in timings.items()},
                **{
                    name.replace("_ms", "_gflop_per_s"): None
                    if ms is None
                    else round(gflop / ms * 1e3, 1)
                    for name, ms in timings.items()
                },
            }
        )
        for name, ms in timings.items():
            totals[name] += count * (ms or 0.0)
    return {"conv_layers": records, "conv_totals_ms": {k: round(v, 1) for k, v in totals.items()}}
