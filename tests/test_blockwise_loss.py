"""Blockwise NT-Xent and contrastive metrics: the dense values and gradients, in less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import tiny_step_inputs

from simclr_jax import losses, parallel, step


def _z(num_images: int, dim: int = 8, seed: int = 0) -> jax.Array:
    # Noisy copies of a shared vector per image, so accuracy is neither 0 nor 1 in general.
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_images, 1, dim))
    z = (centres + 1.2 * rng.normal(size=(num_images, 2, dim))).reshape(2 * num_images, dim)
    return jnp.asarray(z, jnp.float32)


@jax.jit(static_argnums=2)
def _value_and_grad(z, temperature, block_size):
    return jax.value_and_grad(lambda z: losses.nt_xent(z, temperature, block_size))(z)


_metrics = jax.jit(losses.contrastive_metrics, static_argnums=2)


# Block sizes that divide 2N, do not divide it (padded last block), equal it and exceed it.
@pytest.mark.parametrize(("num_images", "block_size"), [(2, 1), (3, 4), (3, 6), (8, 5), (8, 21)])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_blockwise_matches_dense_value_gradient_and_metrics(num_images, block_size, temperature):
    z = _z(num_images, seed=num_images)
    loss, grad = _value_and_grad(z, temperature, block_size)
    dense_loss, dense_grad = _value_and_grad(z, temperature, 0)
    np.testing.assert_allclose(loss, dense_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, dense_grad, rtol=1e-5, atol=1e-7)
    assert np.abs(dense_grad).max() > 1e-3  # the gradients compared are not trivially zero
    metrics = _metrics(z, temperature, block_size)
    for name, value in _metrics(z, temperature, 0).items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("block_size", [-1, 2.0, "auto"])
def test_invalid_block_size_is_a_clear_error(block_size):
    with pytest.raises(ValueError, match="block_size"):
        losses.nt_xent(_z(2), 0.5, block_size)


def test_global_blockwise_loss_over_a_batch_sharded_array():
    z = _z(16)
    mesh = parallel.data_mesh()
    assert mesh.devices.size == 8
    sharded = jax.device_put(z, parallel.batch_sharded(mesh))
    loss, grad = _value_and_grad(sharded, 0.2, 12)
    one_device = jax.device_put(z, jax.devices()[0])
    expected_loss, expected_grad = _value_and_grad(one_device, 0.2, 0)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)


def _temporary_bytes(num_images: int, block_size: int) -> int:
    """Scratch memory XLA plans for the loss and its gradient on a ``[2N, 128]`` input."""
    shape = jax.ShapeDtypeStruct((2 * num_images, 128), jnp.float32)
    compiled = _value_and_grad.lower(shape, 0.1, block_size)
    return compiled.compile().memory_analysis().temp_size_in_bytes


def test_blockwise_gradient_never_holds_the_similarity_matrix():
    num_images, block_size = 4096, 256
    matrix_bytes = (2 * num_images) ** 2 * 4  # 256 MiB
    dense = _temporary_bytes(num_images, 0)
    blockwise = _temporary_bytes(num_images, block_size)
    assert dense >= matrix_bytes
    assert blockwise < matrix_bytes / 4
    assert blockwise < dense / 8


def test_train_step_with_blockwise_loss_equals_dense_step_on_the_mesh():
    mesh = parallel.data_mesh()
    schedule, initial, host_batch = tiny_step_inputs()
    results = []
    for block_size in (0, 12):  # 12 does not divide the 32 rows of z
        train = step.jit_train_step(
            mesh, temperature=0.5, learning_rate_fn=schedule, loss_block_size=block_size
        )
        state = jax.device_put(initial, parallel.replicated(mesh))
        for i in range(2):
            state, metrics = train(
                state, parallel.host_batch_to_global(host_batch, mesh), jax.random.key(i)
            )
        results.append(jax.device_get((state.params, metrics)))
    (dense_params, dense_metrics), (block_params, block_metrics) = results
    for name in ("loss", "contrastive_loss", "contrastive_accuracy", "contrastive_entropy"):
        np.testing.assert_allclose(block_metrics[name], dense_metrics[name], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        block_params,
        dense_params,
    )
