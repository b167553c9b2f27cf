"""NT-Xent and contrastive metrics against literal NumPy implementations and invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from simclr_jax import losses


def _normalised_rows(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return z / np.maximum(norms, 1e-6)


def _reference_nt_xent(z: np.ndarray, temperature: float) -> float:
    """NT-Xent as written in the paper, one anchor at a time, in float64."""
    z = _normalised_rows(z)
    num_rows = len(z)

    def sim(i, j):
        return float(z[i] @ z[j]) / temperature

    per_anchor = []
    for i in range(num_rows):
        positive = i ^ 1
        numerator = np.exp(sim(i, positive))
        denominator = sum(np.exp(sim(i, j)) for j in range(num_rows) if j != i)
        per_anchor.append(-np.log(numerator / denominator))
    return float(np.mean(per_anchor))


def _reference_metrics(z: np.ndarray, temperature: float) -> dict[str, float]:
    """Each anchor against the rows of the other view: top-1 hit and softmax entropy."""
    z = _normalised_rows(z)
    num_rows = len(z)
    hits, entropies = [], []
    for i in range(num_rows):
        candidates = [j for j in range(num_rows) if j % 2 != i % 2]
        logits = np.array([z[i] @ z[j] / temperature for j in candidates])
        hits.append(candidates[int(np.argmax(logits))] == i ^ 1)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        entropies.append(-np.sum(probs * np.log(probs)))
    return {
        "contrastive_accuracy": float(np.mean(hits)),
        "contrastive_entropy": float(np.mean(entropies)),
    }


def _random_z(num_images: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(2 * num_images, dim)).astype(np.float32)


def _separated_z(num_images: int) -> np.ndarray:
    """Both views of image k equal the k-th basis vector: every positive is the nearest row."""
    return np.repeat(np.eye(num_images, dtype=np.float32), 2, axis=0)


@pytest.mark.parametrize("num_images", [1, 2, 5, 16])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5, 1.0])
def test_nt_xent_matches_reference(num_images, temperature):
    z = _random_z(num_images, seed=num_images)
    loss = losses.nt_xent(jnp.asarray(z), temperature)
    assert loss.shape == ()
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), _reference_nt_xent(z, temperature), rtol=1e-5)


def test_nt_xent_invariant_to_pair_order_view_swap_and_row_scale():
    num_images, temperature = 6, 0.2
    z = _random_z(num_images, seed=1)
    expected = float(losses.nt_xent(jnp.asarray(z), temperature))
    pairs = z.reshape(num_images, 2, -1)
    rng = np.random.default_rng(2)

    permuted = pairs[rng.permutation(num_images)].reshape(z.shape)
    swapped = pairs[:, ::-1].reshape(z.shape)
    rescaled = z * rng.uniform(0.1, 10.0, size=(len(z), 1)).astype(np.float32)
    for variant in (permuted, swapped, rescaled):
        np.testing.assert_allclose(
            float(losses.nt_xent(jnp.asarray(variant), temperature)), expected, rtol=1e-5
        )
    # A permutation that breaks the pairs changes the loss: the check above can fail.
    broken = z[rng.permutation(len(z))]
    assert abs(float(losses.nt_xent(jnp.asarray(broken), temperature)) - expected) > 1e-3


def test_nt_xent_gradients_finite_at_low_temperature_and_with_zero_row():
    z = _random_z(4, seed=3)
    z[5] = 0.0
    grad = jax.jit(jax.grad(losses.nt_xent), static_argnums=1)(jnp.asarray(z), 0.05)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.abs(np.asarray(grad)).sum() > 0
    # The zero row counts as similarity 0 with every row.
    np.testing.assert_allclose(
        float(losses.nt_xent(jnp.asarray(z), 0.05)), _reference_nt_xent(z, 0.05), rtol=1e-5
    )


def test_bfloat16_input_is_computed_in_float32():
    z = _random_z(8, dim=16, seed=4)
    z_bf16 = jnp.asarray(z, jnp.bfloat16)
    loss_bf16 = losses.nt_xent(z_bf16, 0.1)
    assert loss_bf16.dtype == jnp.float32
    # Exactly the float32 loss of the rounded inputs: no bfloat16 arithmetic inside.
    np.testing.assert_allclose(
        float(loss_bf16), float(losses.nt_xent(z_bf16.astype(jnp.float32), 0.1)), rtol=1e-6
    )
    np.testing.assert_allclose(
        float(loss_bf16), float(losses.nt_xent(jnp.asarray(z), 0.1)), rtol=1e-2
    )
    metrics = losses.contrastive_metrics(z_bf16, 0.1)
    assert all(value.dtype == jnp.float32 for value in metrics.values())


def test_perfectly_separated_embeddings():
    num_images, temperature = 4, 0.1
    z = jnp.asarray(_separated_z(num_images))
    # Positive logit 1/tau, the 2N-2 negatives 0: loss = log(e^(1/tau) + 2N-2) - 1/tau.
    expected = np.log(np.exp(1 / temperature) + 2 * num_images - 2) - 1 / temperature
    loss = float(losses.nt_xent(z, temperature))
    np.testing.assert_allclose(loss, expected, atol=1e-6)  # float32 cancellation near 0
    assert loss < 1e-3
    assert float(losses.contrastive_metrics(z, temperature)["contrastive_accuracy"]) == 1.0


@pytest.mark.parametrize("num_images", [1, 3, 16])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_contrastive_metrics_match_reference(num_images, temperature):
    # Noisy copies of a shared vector per image, so accuracy is neither 0 nor 1 in general.
    rng = np.random.default_rng(num_images)
    centres = rng.normal(size=(num_images, 1, 8))
    z = (centres + 1.2 * rng.normal(size=(num_images, 2, 8))).reshape(2 * num_images, 8)
    z = z.astype(np.float32)
    metrics = losses.contrastive_metrics(jnp.asarray(z), temperature)
    expected = _reference_metrics(z, temperature)
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-6)


def test_contrastive_accuracy_ranks_only_the_other_view():
    # Unit vectors at these angles; rows 0, 1 are image 0 and rows 2, 3 image 1. Only anchor 0 has
    # its positive as the nearest other-view row; over all 2N-1 rows it would lose to row 2.
    angles = np.deg2rad([0.0, 40.0, 10.0, 200.0])
    z = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    metrics = losses.contrastive_metrics(jnp.asarray(z), 0.1)
    assert float(metrics["contrastive_accuracy"]) == pytest.approx(0.25)


def test_global_loss_under_jit_over_a_batch_sharded_array():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    z = jnp.asarray(_random_z(len(jax.devices()), seed=5))
    sharded = jax.device_put(z, NamedSharding(mesh, PartitionSpec("data")))
    loss_and_grad = jax.jit(jax.value_and_grad(losses.nt_xent), static_argnums=1)
    loss, grad = loss_and_grad(sharded, 0.1)
    expected_loss, expected_grad = jax.value_and_grad(losses.nt_xent)(z, 0.1)
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected_grad), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(3, 4), (0, 4), (8,), (2, 2, 2)])
def test_invalid_shapes_raise(shape):
    z = jnp.ones(shape)
    with pytest.raises(ValueError, match="z must"):
        losses.nt_xent(z, 0.1)
    with pytest.raises(ValueError, match="z must"):
        losses.contrastive_metrics(z, 0.1)


def test_non_positive_temperature_raises():
    with pytest.raises(ValueError, match="temperature"):
        losses.nt_xent(jnp.ones((4, 3)), 0.0)


# --- Multi-crop ------------------------------------------------------------------------------


def _reference_multi_crop(z: np.ndarray, temperature: float, num_small: int) -> float:
    """The multi-crop loss as its docstring defines it, one (anchor, positive) at a time, in
    float64: large rows 2k and 2k + 1, small row 2N + S·k + s; a large anchor's positive is the
    other large view, a small anchor's are its image's two large views; the normaliser runs
    over the positives and every view of the other images."""
    z = _normalised_rows(z)
    num_images = len(z) // (2 + num_small)
    images = [k for k in range(num_images) for _ in range(2)]
    images += [k for k in range(num_images) for _ in range(num_small)]

    def sim(i, j):
        return float(z[i] @ z[j]) / temperature

    per_anchor = []
    for i in range(len(z)):
        large = i < 2 * num_images
        positives = [i ^ 1] if large else [2 * images[i], 2 * images[i] + 1]
        negatives = [j for j in range(len(z)) if images[j] != images[i]]
        denominator = sum(np.exp(sim(i, j)) for j in positives + negatives)
        terms = [-np.log(np.exp(sim(i, p)) / denominator) for p in positives]
        per_anchor.append(np.mean(terms))
    return float(np.mean(per_anchor))


@pytest.mark.parametrize(("num_small", "num_images"), [(0, 3), (1, 1), (1, 3), (2, 2), (5, 3)])
def test_multi_crop_nt_xent_matches_reference(num_small, num_images):
    rows = (2 + num_small) * num_images
    z = np.random.default_rng(num_small).normal(size=(rows, 8)).astype(np.float32)
    loss_fn = jax.jit(losses.multi_crop_nt_xent, static_argnums=2)  # one compilation for every τ
    for temperature in (0.1, 0.5, 1.0):
        loss = loss_fn(jnp.asarray(z), temperature, num_small)
        assert loss.dtype == jnp.float32
        expected = _reference_multi_crop(z, temperature, num_small)
        np.testing.assert_allclose(loss, expected, rtol=2e-5, err_msg=f"τ = {temperature}")


def test_multi_crop_nt_xent_without_small_crops_is_nt_xent_and_its_gradient():
    def both(z, temperature):
        multi_crop = jax.value_and_grad(losses.multi_crop_nt_xent)(z, temperature, 0)
        return multi_crop, jax.value_and_grad(losses.nt_xent)(z, temperature)

    for z in (jnp.asarray(_random_z(6)), jnp.asarray(_random_z(6)).astype(jnp.bfloat16)):
        for temperature in (0.1, 0.5):
            (loss, grad), (expected_loss, expected_grad) = jax.jit(both)(z, temperature)
            np.testing.assert_array_equal(loss, expected_loss)
            np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("shape", "num_small"), [((7, 4), 2), ((0, 4), 1), ((8,), 2), ((8, 4), -1), ((8, 4), 1.0)]
)
def test_multi_crop_rejects_bad_layouts(shape, num_small):
    with pytest.raises(ValueError):
        losses.multi_crop_nt_xent(jnp.zeros(shape), 0.5, num_small)
