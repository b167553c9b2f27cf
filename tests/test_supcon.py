"""The supervised contrastive loss (SupCon): a literal NumPy reference, NT-Xent as its special
case, blockwise and sharded computation, and the step and trainer with ``objective="supcon"``."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import tiny_step_inputs

from simclr_jax import losses, parallel, step, trainer
from simclr_jax.configs import tiny


def _reference_supcon(z: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """SupCon ``L_out`` as written in the paper, one anchor at a time, in float64.

    The positives of anchor i: its other view, and every other row of its class when it has one
    (label >= 0).
    """
    z = np.asarray(z, np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    num_rows = len(z)
    per_anchor = []
    for i in range(num_rows):
        others = [a for a in range(num_rows) if a != i]
        denominator = sum(np.exp(z[i] @ z[a] / temperature) for a in others)
        positives = [
            p for p in others if p // 2 == i // 2 or (labels[i] >= 0 and labels[p] == labels[i])
        ]
        log_probs = [np.log(np.exp(z[i] @ z[p] / temperature) / denominator) for p in positives]
        per_anchor.append(-np.mean(log_probs))
    return float(np.mean(per_anchor))


def _z(num_images: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2 * num_images, dim)).astype(np.float32)


def _row_labels(image_labels) -> jax.Array:
    """One label per image -> one per row (both views of an image share its label)."""
    return jnp.repeat(jnp.asarray(image_labels, jnp.int32), 2)


# One label per image (6 images).
LAYOUTS = {
    "all_unique": [0, 1, 2, 3, 4, 5],
    "two_classes": [0, 1, 1, 0, 1, 0],
    "one_class": [3, 3, 3, 3, 3, 3],
    "some_unlabelled": [0, -1, 0, 2, -1, 2],
    "all_unlabelled": [-1] * 6,
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("temperature", [0.05, 0.2, 1.0])
def test_supcon_matches_reference(layout, temperature):
    z = _z(6, seed=len(layout))
    labels = _row_labels(LAYOUTS[layout])
    loss = losses.supcon(jnp.asarray(z), labels, temperature)
    assert loss.shape == () and loss.dtype == jnp.float32
    expected = _reference_supcon(z, np.asarray(labels), temperature)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("layout", ["all_unique", "all_unlabelled"])
@pytest.mark.parametrize("block_size", [0, 5])
def test_supcon_with_one_class_per_image_or_no_labels_is_nt_xent(layout, block_size):
    z = jnp.asarray(_z(6, seed=3))
    labels = _row_labels(LAYOUTS[layout])
    np.testing.assert_allclose(
        losses.supcon(z, labels, 0.2, block_size), losses.nt_xent(z, 0.2, block_size), rtol=1e-6
    )


@jax.jit(static_argnums=(2, 3))
def _value_and_grad(z, labels, temperature, block_size):
    return jax.value_and_grad(lambda z: losses.supcon(z, labels, temperature, block_size))(z)


def _class_labels(num_images: int, seed: int) -> jax.Array:
    """Three classes and some unlabelled images."""
    return _row_labels(np.random.default_rng(seed).integers(-1, 3, num_images))


# Block sizes that divide 2N, do not divide it (padded last block), equal it and exceed it.
@pytest.mark.parametrize(("num_images", "block_size"), [(2, 1), (3, 4), (3, 6), (8, 5), (8, 21)])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_blockwise_matches_dense_value_and_gradient(num_images, block_size, temperature):
    z = jnp.asarray(_z(num_images, seed=num_images))
    labels = _class_labels(num_images, seed=num_images)
    loss, grad = _value_and_grad(z, labels, temperature, block_size)
    dense_loss, dense_grad = _value_and_grad(z, labels, temperature, 0)
    np.testing.assert_allclose(loss, dense_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, dense_grad, rtol=1e-5, atol=1e-7)
    assert np.abs(dense_grad).max() > 1e-3  # the gradients compared are not trivially zero


@pytest.mark.parametrize("block_size", [0, 12])
def test_sharded_over_eight_devices_equals_one_device(block_size):
    z = jnp.asarray(_z(16, seed=4))
    labels = _class_labels(16, seed=4)
    mesh = parallel.data_mesh()
    assert mesh.devices.size == 8
    sharded = jax.device_put((z, labels), parallel.batch_sharded(mesh))
    loss, grad = _value_and_grad(*sharded, 0.2, block_size)
    one_device = jax.device_put((z, labels), jax.devices()[0])
    expected_loss, expected_grad = _value_and_grad(*one_device, 0.2, 0)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_bad_inputs_are_clear_errors():
    z = jnp.asarray(_z(3))
    with pytest.raises(ValueError, match=r"labels must be integers of shape \[2N\] = \(6,\)"):
        losses.supcon(z, jnp.zeros(3, jnp.int32), 0.5)  # one label per image, not per row
    with pytest.raises(ValueError, match="labels must be integers"):
        losses.supcon(z, jnp.zeros(6, jnp.float32), 0.5)
    with pytest.raises(ValueError, match="2·N rows"):
        losses.supcon(z[:5], jnp.zeros(5, jnp.int32), 0.5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        losses.supcon(z, jnp.zeros(6, jnp.int32), 0.0)
    with pytest.raises(ValueError, match="block_size"):
        losses.supcon(z, jnp.zeros(6, jnp.int32), 0.5, -1)
    with pytest.raises(ValueError, match=r"objective must be one of .*'simclr'"):
        losses.contrastive_loss(z, jnp.zeros(6, jnp.int32), 0.5, objective="simclr")


def test_supcon_step_on_eight_devices_equals_one_device_and_logs_the_loss():
    schedule, initial, host_batch = tiny_step_inputs(lowest_label=-1)
    results = []
    for mesh in (parallel.data_mesh(), parallel.data_mesh(jax.devices()[:1])):
        train = step.jit_train_step(
            mesh, temperature=0.5, learning_rate_fn=schedule, objective="supcon"
        )
        state = jax.device_put(initial, parallel.replicated(mesh))
        for i in range(2):
            batch = parallel.host_batch_to_global(host_batch, mesh)
            state, metrics = train(state, batch, jax.random.key(i))
        results.append(jax.device_get((state.params, metrics)))
    (params8, metrics8), (params1, metrics1) = results
    for name in ("loss", "contrastive_loss", "contrastive_accuracy", "contrastive_entropy"):
        np.testing.assert_allclose(metrics8[name], metrics1[name], rtol=1e-5, err_msg=name)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params8, params1
    )


def test_supcon_step_optimises_supcon_on_the_batch_labels():
    _, initial, batch = tiny_step_inputs(lowest_label=-1)
    batch = jax.tree.map(jnp.asarray, batch)

    @jax.jit(static_argnums=0)
    def contrastive_loss(objective, labels):
        (_, aux), grads = step.loss_and_gradients(
            initial,
            {**batch, "label": labels},
            jax.random.key(0),
            temperature=0.5,
            objective=objective,
        )
        return aux, grads

    aux, _ = contrastive_loss("supcon", batch["label"])
    expected = losses.supcon(aux["outputs"]["z"], jnp.repeat(batch["label"], 2), 0.5)
    np.testing.assert_allclose(aux["contrastive_loss"], expected, rtol=1e-6)
    # One class per image: the same loss and gradients as NT-Xent.
    unique = jnp.arange(16, dtype=jnp.int32)
    supcon_aux, supcon_grads = contrastive_loss("supcon", unique)
    nt_xent_aux, nt_xent_grads = contrastive_loss("nt_xent", unique)
    np.testing.assert_allclose(
        supcon_aux["contrastive_loss"], nt_xent_aux["contrastive_loss"], rtol=1e-6
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        supcon_grads,
        nt_xent_grads,
    )


def test_tiny_supcon_run_trains(fashion_mnist_data_dir, tmp_path):
    config = tiny.get_config()
    config.data_dir = fashion_mnist_data_dir
    config.objective = "supcon"
    config.num_train_steps = 4
    config.evaluate_at_end = False
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert results["steps"] == 4
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "loss" in r]
    assert [r["step"] for r in records] == [2, 4]
    assert all(np.isfinite(r["contrastive_loss"]) for r in records)
