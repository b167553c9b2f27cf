"""Tests for the batch norm with its ReLU and residual add (simclr_jax.models.batch_norm) and its
fused native CPU kernels (simclr_jax.cpu.batch_norm).

Tests that run the native kernels skip, naming why, where the extension cannot be built here."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conv_cases import skip_without_extension

from simclr_jax import parallel
from simclr_jax.cpu.batch_norm import fused_batch_norm_train
from simclr_jax.models.batch_norm import BatchNorm, batch_norm_train

# The training functions a BatchNorm may be given: the portable JAX formula and the fused
# native kernels.
TRAIN_FNS = {"jax": batch_norm_train, "fused": fused_batch_norm_train}


def _train_fn(name):
    """The training function ``name``, skipping the test where it needs an unavailable
    extension."""
    if name == "fused":
        skip_without_extension()
    return TRAIN_FNS[name]


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


def _value_and_grads(shape, relu, with_residual, train_fn, sharding=None):
    """((y, mean, var), grads of sum(y * weights) w.r.t. x, scale, bias and the residual);
    with ``sharding``, x, the residual and the weights are placed by it."""
    x, residual, scale, bias, weights = _inputs(shape)
    if sharding is not None:
        x, residual, weights = (jax.device_put(a, sharding) for a in (x, residual, weights))

    def loss(x, scale, bias, residual):
        y, mean, var = train_fn(x, scale, bias, residual if with_residual else None, relu)
        return jnp.sum(y * weights), (y, mean, var)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)
    (_, outputs), grads = jax.jit(grad)(x, scale, bias, residual)
    return outputs, grads


@pytest.mark.parametrize(("shape", "relu", "with_residual"), CASES)
def test_native_kernels_equal_jax(shape, relu, with_residual):
    skip_without_extension()
    outputs, grads = _value_and_grads(shape, relu, with_residual, batch_norm_train)
    native_outputs, native_grads = _value_and_grads(
        shape, relu, with_residual, fused_batch_norm_train
    )
    for got, want in zip(native_outputs + native_grads, outputs + grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))
    if not with_residual:  # the residual was not used: no gradient
        np.testing.assert_array_equal(native_grads[3], 0)


def test_native_kernels_are_the_custom_calls_both_ways():
    skip_without_extension()
    x, residual, scale, bias, _ = _inputs((4, 6, 6, 16))

    def loss(x, residual):
        return fused_batch_norm_train(x, scale, bias, residual, True)[0].sum()

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, residual).as_text()
    assert "custom_call @simclr_batch_norm_add_relu_forward(" in hlo
    assert "custom_call @simclr_batch_norm_add_relu_backward(" in hlo


def test_batch_sharded_over_a_mesh_gives_the_same_numbers():
    """No sharding rule: XLA gathers the operands, and the statistics stay global."""
    skip_without_extension()
    assert len(jax.devices()) == 8
    fused = fused_batch_norm_train
    outputs, grads = _value_and_grads((8, 6, 6, 16), True, True, fused)
    sharding = parallel.batch_sharded(parallel.data_mesh(jax.devices()))
    sharded_outputs, sharded_grads = _value_and_grads((8, 6, 6, 16), True, True, fused, sharding)
    for got, want in zip(sharded_outputs + sharded_grads, outputs + grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(TRAIN_FNS))
def test_statistics_are_batch_moments_and_not_differentiable(name):
    train_fn = _train_fn(name)
    x, _, scale, bias, _ = _inputs((4, 6, 6, 16))
    _, mean, var = train_fn(x, scale, bias)
    np.testing.assert_allclose(mean, np.mean(x, axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, np.var(x, axis=(0, 1, 2)), rtol=1e-4)

    def statistics_sum(x):
        _, mean, var = train_fn(x, scale, bias)
        return mean.sum() + var.sum()

    np.testing.assert_array_equal(jax.grad(statistics_sum)(x), 0)


def test_bfloat16_runs_the_jax_formula():
    """The fused function hands bfloat16 to the JAX formula: no extension is needed for it."""
    x, residual, scale, bias, _ = _inputs((4, 6, 6, 16))
    x, residual = x.astype(jnp.bfloat16), residual.astype(jnp.bfloat16)

    def forward(x, residual):
        return fused_batch_norm_train(x, scale, bias, residual, True, dtype=jnp.bfloat16)

    assert "simclr_batch_norm" not in jax.jit(forward).lower(x, residual).as_text()
    assert forward(x, residual)[0].dtype == jnp.bfloat16


class _FlaxBlockEnd(nn.Module):
    """relu(flax BN(x) + residual): what BatchNorm(x, residual, relu=True) replaces."""

    @nn.compact
    def __call__(self, x, residual, train: bool):
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x)
        return nn.relu(y + residual)


class _BlockEnd(nn.Module):
    train_fn: object = batch_norm_train

    @nn.compact
    def __call__(self, x, residual, train: bool):
        bn = BatchNorm(not train, train_fn=self.train_fn, name="bn")
        return bn(x, residual, relu=True)


@pytest.mark.parametrize("name", list(TRAIN_FNS))
def test_module_matches_flax_batch_norm(name):
    """Same variables, outputs, running averages and gradients as flax.linen.BatchNorm."""
    x, residual, _, _, weights = _inputs((4, 6, 6, 16))
    flax_model, model = _FlaxBlockEnd(), _BlockEnd(_train_fn(name))
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


def test_a_residual_without_relu_runs_the_jax_formula():
    """The native kernels have no residual add without a ReLU: the fused function hands it to
    the JAX formula, and no extension is needed for it."""
    x, residual, scale, bias, _ = _inputs((4, 6, 6, 16))

    def forward(x, residual):
        return fused_batch_norm_train(x, scale, bias, residual, relu=False)[0]

    assert "simclr_batch_norm" not in jax.jit(forward).lower(x, residual).as_text()
    normalized = batch_norm_train(x, scale, bias)[0]
    np.testing.assert_allclose(forward(x, residual), normalized + residual, rtol=1e-6)


def test_module_computes_training_calls_with_its_train_fn_only():
    """``train_fn`` gets every training-mode call with the residual, the ReLU, epsilon and dtype;
    initialisation and evaluation keep the portable formula and the running averages."""
    x, residual, *_ = _inputs((4, 6, 6, 16))
    calls = []

    def spy(x, scale, bias, residual, relu, epsilon, dtype):
        calls.append((residual is not None, relu, epsilon, jnp.dtype(dtype)))
        return batch_norm_train(x, scale, bias, residual, relu, epsilon, dtype)

    model = _BlockEnd(spy)
    variables = model.init(jax.random.key(0), x, residual, train=True)
    assert calls == []  # initialising runs the portable formula
    model.apply(variables, x, residual, train=False)
    assert calls == []  # evaluating normalises with the running averages
    y, _ = model.apply(variables, x, residual, train=True, mutable=["batch_stats"])
    assert calls == [(True, True, 1e-5, jnp.dtype(jnp.float32))]
    want, _ = _BlockEnd().apply(variables, x, residual, train=True, mutable=["batch_stats"])
    np.testing.assert_array_equal(y, want)
