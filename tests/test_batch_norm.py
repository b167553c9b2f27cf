"""Tests for the fused batch norm (simclr_jax.models.batch_norm and its native CPU kernels)."""

import platform
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simclr_jax import parallel
from simclr_jax.models.batch_norm import BatchNorm, batch_norm_train

NATIVE = sys.platform == "linux" and platform.machine() == "x86_64"
needs_native = pytest.mark.skipif(not NATIVE, reason="the onednn extra is x86-64 Linux only")

# (shape, relu, with residual): 16 channels take the kernels' vector path, 5 and 24 their scalar
# one, 48 several vector blocks; 75 and 3 rows do not split evenly between threads.
CASES = [
    ((4, 6, 6, 16), False, False),
    ((4, 6, 6, 16), True, False),
    ((4, 6, 6, 16), True, True),
    ((3, 5, 5, 5), True, True),
    ((75, 24), True, False),
    ((2, 3, 3, 48), True, True),
    ((3, 48), False, False),
]


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    residual = rng.normal(size=shape).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    bias = rng.normal(size=channels).astype(np.float32)
    weights = rng.normal(size=shape).astype(np.float32)
    return tuple(map(jnp.asarray, (x, residual, scale, bias, weights)))


def _value_and_grads(shape, relu, with_residual, native_kernels, sharding=None):
    """((y, mean, var), grads of sum(y * weights) w.r.t. x, scale, bias and the residual);
    with ``sharding``, x, the residual and the weights are placed by it."""
    x, residual, scale, bias, weights = _inputs(shape)
    if sharding is not None:
        x, residual, weights = (jax.device_put(a, sharding) for a in (x, residual, weights))

    def loss(x, scale, bias, residual):
        y, mean, var = batch_norm_train(
            x, scale, bias, residual if with_residual else None, relu,
            native_kernels=native_kernels,
        )  # fmt: skip
        return jnp.sum(y * weights), (y, mean, var)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    (_, outputs), grads = jax.jit(grad)(x, scale, bias, residual)
    return outputs, grads


@needs_native
@pytest.mark.parametrize(("shape", "relu", "with_residual"), CASES)
def test_native_kernels_equal_jax(shape, relu, with_residual):
    outputs, grads = _value_and_grads(shape, relu, with_residual, native_kernels=False)
    native_outputs, native_grads = _value_and_grads(shape, relu, with_residual, True)
    for got, want in zip(native_outputs + native_grads, outputs + grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))
    if not with_residual:  # the residual was not used: no gradient
        np.testing.assert_array_equal(native_grads[3], 0)


@needs_native
def test_native_kernels_are_the_custom_calls_both_ways():
    x, residual, scale, bias, _ = _inputs((4, 6, 6, 16))

    def loss(x, residual):
        return batch_norm_train(x, scale, bias, residual, True, native_kernels=True)[0].sum()

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, residual).as_text()
    assert "custom_call @simclr_batch_norm_add_relu_forward(" in hlo
    assert "custom_call @simclr_batch_norm_add_relu_backward(" in hlo


@needs_native
def test_batch_sharded_over_a_mesh_gives_the_same_numbers():
    """No sharding rule: XLA gathers the operands, and the statistics stay global."""
    assert len(jax.devices()) == 8
    outputs, grads = _value_and_grads((8, 6, 6, 16), True, True, native_kernels=True)
    sharding = parallel.batch_sharded(parallel.data_mesh(jax.devices()))
    sharded_outputs, sharded_grads = _value_and_grads((8, 6, 6, 16), True, True, True, sharding)
    for got, want in zip(sharded_outputs + sharded_grads, outputs + grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("native_kernels", [False, pytest.param(True, marks=needs_native)])
def test_statistics_are_batch_moments_and_not_differentiable(native_kernels):
    x, _, scale, bias, _ = _inputs((4, 6, 6, 16))
    _, mean, var = batch_norm_train(x, scale, bias, native_kernels=native_kernels)
    np.testing.assert_allclose(mean, np.mean(x, axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, np.var(x, axis=(0, 1, 2)), rtol=1e-4)

    def statistics_sum(x):
        _, mean, var = batch_norm_train(x, scale, bias, native_kernels=native_kernels)
        return mean.sum() + var.sum()

    np.testing.assert_array_equal(jax.grad(statistics_sum)(x), 0)


@needs_native
def test_bfloat16_runs_the_jax_formula():
    x, residual, scale, bias, _ = _inputs((4, 6, 6, 16))
    x, residual = x.astype(jnp.bfloat16), residual.astype(jnp.bfloat16)

    def forward(x, residual):
        return batch_norm_train(
            x, scale, bias, residual, True, dtype=jnp.bfloat16, native_kernels=True
        )

    assert "simclr_batch_norm" not in jax.jit(forward).lower(x, residual).as_text()
    assert forward(x, residual)[0].dtype == jnp.bfloat16


class _FlaxBlockEnd(nn.Module):
    """relu(flax BN(x) + residual): what BatchNorm(x, residual, relu=True) replaces."""

    @nn.compact
    def __call__(self, x, residual, train: bool):
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x)
        return nn.relu(y + residual)


class _BlockEnd(nn.Module):
    native_kernels: bool = False

    @nn.compact
    def __call__(self, x, residual, train: bool):
        bn = BatchNorm(not train, native_kernels=self.native_kernels, name="bn")
        return bn(x, residual, relu=True)


@pytest.mark.parametrize("native_kernels", [False, pytest.param(True, marks=needs_native)])
def test_module_matches_flax_batch_norm(native_kernels):
    """Same variables, outputs, running averages and gradients as flax.linen.BatchNorm."""
    x, residual, _, _, weights = _inputs((4, 6, 6, 16))
    flax_model, model = _FlaxBlockEnd(), _BlockEnd(native_kernels)
    variables = flax_model.init(jax.random.key(0), x, residual, train=False)
    ours = model.init(jax.random.key(0), x, residual, train=False)
    assert jax.tree.structure(ours) == jax.tree.structure(variables)
    # Non-trivial parameters and running averages.
    params = {"bn": {"scale": jnp.linspace(0.5, 1.5, 16), "bias": jnp.linspace(-1, 1, 16)}}
    stats = {"bn": {"mean": jnp.linspace(-0.2, 0.2, 16), "var": jnp.linspace(0.5, 2.0, 16)}}
    variables = {"params": params, "batch_stats": stats}

    def train_loss(apply, params):
        y, updates = apply(
            {**variables, "params": params}, x, residual, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(y * weights), (y, updates["batch_stats"])

    results = []
    for apply in (flax_model.apply, model.apply):
        (_, (y, new_stats)), grads = jax.jit(
            jax.value_and_grad(lambda p, apply=apply: train_loss(apply, p), has_aux=True)
        )(params)
        y_eval = apply(variables, x, residual, train=False)
        results.append((y, new_stats, grads, y_eval))
    for got, want in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[0]), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)


@needs_native
def test_a_residual_without_relu_runs_the_jax_formula():
    x, residual, scale, bias, _ = _inputs((4, 6, 6, 16))

    def forward(x, residual):
        return batch_norm_train(x, scale, bias, residual, relu=False, native_kernels=True)[0]

    assert "simclr_batch_norm" not in jax.jit(forward).lower(x, residual).as_text()
    normalized = batch_norm_train(x, scale, bias)[0]
    np.testing.assert_allclose(forward(x, residual), normalized + residual, rtol=1e-6)
