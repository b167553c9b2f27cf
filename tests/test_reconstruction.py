"""The hybrid objective: its loss terms, its gradients, and an end-to-end trainer run."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax import experiment, reconstruction, step, trainer
from simclr_jax.configs import tiny
from simclr_jax.models import ProjectionHead, SimCLR, decoder

IMAGE_SHAPE = (16, 16, 1)
BATCH_SIZE = 4
TEMPERATURE = 0.5


def _numerical_kl(mu: np.ndarray, sigma: np.ndarray) -> float:
    """Mean over rows of Σ_j ∫ q_j log(q_j / p) on a float64 grid: no closed form used."""
    x = np.linspace(-30.0, 30.0, 600_001)
    total = 0.0
    for m, s in zip(mu.ravel(), sigma.ravel(), strict=True):
        log_q = -0.5 * ((x - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
        log_p = -0.5 * x**2 - 0.5 * np.log(2 * np.pi)
        total += np.trapezoid(np.exp(log_q) * (log_q - log_p), x)
    return total / mu.shape[0]


def test_gaussian_kl_equals_the_divergence_integrated_numerically():
    mu = np.array([[0.0, 1.5, -0.7], [2.0, -0.3, 0.1]])
    sigma = np.array([[1.0, 0.5, 2.0], [0.8, 1.3, 0.2]])
    kl = reconstruction.gaussian_kl(jnp.asarray(mu), jnp.asarray(np.log(sigma**2)))
    np.testing.assert_allclose(kl, _numerical_kl(mu, sigma), rtol=1e-5)


def test_gaussian_kl_is_zero_at_the_prior():
    assert float(reconstruction.gaussian_kl(jnp.zeros((3, 5)), jnp.zeros((3, 5)))) == 0.0


def test_mean_squared_error_and_shape_check():
    rng = np.random.default_rng(0)
    a, b = rng.random((2, 4, 4, 1)), rng.random((2, 4, 4, 1))
    np.testing.assert_allclose(
        reconstruction.mean_squared_error(jnp.asarray(a), jnp.asarray(b)),
        np.mean((a - b) ** 2),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="shape"):
        reconstruction.mean_squared_error(jnp.zeros((2, 4, 4, 1)), jnp.zeros((2, 4, 4, 3)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "original"}, "target"),
        ({"reconstruction_weight": -1.0}, "reconstruction_weight"),
        ({"kl_weight": -0.1}, "kl_weight"),
    ],
)
def test_objective_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        reconstruction.HybridObjective(**kwargs)


def _batch(seed: int) -> dict[str, jnp.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "views": jnp.asarray(rng.random((BATCH_SIZE, 2, *IMAGE_SHAPE), dtype=np.float32)),
        "label": jnp.asarray(rng.integers(0, 10, BATCH_SIZE).astype(np.int32)),
        "image": jnp.asarray(rng.random((BATCH_SIZE, *IMAGE_SHAPE), dtype=np.float32)),
    }


class _SmallEncoder(nn.Module):
    """conv -> batch norm -> ReLU -> global mean: a fast stand-in for the ResNet."""

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(8, (3, 3), strides=(2, 2))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return jnp.mean(nn.relu(x), axis=(1, 2))


@functools.cache
def _states():
    """A VAE-hybrid state and the plain SimCLR state holding the same shared parameters."""

    def model(head):
        return SimCLR(
            encoder=_SmallEncoder(),
            projection_head=ProjectionHead(output_dim=8),
            num_classes=10,
            reconstruction_head=head,
        )

    head = decoder.VariationalHead(latent_dim=4, channels=4)
    hybrid = step.create_train_state(model(head), optax.sgd(0.1), jax.random.key(0), IMAGE_SHAPE)
    shared = {k: v for k, v in hybrid.params.items() if k != "reconstruction_head"}
    plain = step.TrainState.create(
        apply_fn=model(None).apply,
        params=shared,
        batch_stats=hybrid.batch_stats,
        tx=optax.sgd(0.1),
    )
    return plain, hybrid


def _gradients(state, objective, jit=True):
    fn = functools.partial(step.loss_and_gradients, temperature=TEMPERATURE, hybrid=objective)
    (loss, aux), grads = (jax.jit(fn) if jit else fn)(state, _batch(0), jax.random.key(3))
    return jax.device_get((loss, aux["batch_stats"], aux["hybrid_terms"], grads))


@pytest.mark.parametrize("jit", [False, True])
def test_zero_weights_give_the_plain_simclr_gradients(jit):
    """Op by op (no jit) the gradients are bit-identical to plain SimCLR's; compiled, XLA may
    fuse the two programs differently, which reorders float sums: equal to rounding."""
    plain, hybrid = _states()
    off = reconstruction.HybridObjective(reconstruction_weight=0.0, kl_weight=0.0)
    plain_loss, plain_stats, _, plain_grads = _gradients(plain, None, jit)
    loss, stats, terms, grads = _gradients(hybrid, off, jit)
    assert terms["reconstruction_loss"] > 0 and terms["kl_divergence"] > 0
    decoder_grads = grads.pop("reconstruction_head")
    assert all(not np.any(g) for g in jax.tree.leaves(decoder_grads))
    if jit:
        compare = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)
    else:
        compare = np.testing.assert_array_equal
    compare(loss, plain_loss)
    jax.tree.map(compare, stats, plain_stats)
    jax.tree.map(compare, grads, plain_grads)


def test_reconstruction_terms_reach_the_encoder_and_the_head():
    plain, hybrid = _states()
    on = reconstruction.HybridObjective(reconstruction_weight=1.0, kl_weight=0.1)
    plain_loss, _, _, plain_grads = _gradients(plain, None)
    loss, _, terms, grads = _gradients(hybrid, on)
    np.testing.assert_allclose(
        loss, plain_loss + terms["reconstruction_loss"] + 0.1 * terms["kl_divergence"], rtol=1e-6
    )
    assert all(np.any(g) for g in jax.tree.leaves(grads["reconstruction_head"]))
    encoder_change = jax.tree.map(
        lambda a, b: np.max(np.abs(a - b)), grads["encoder"], plain_grads["encoder"]
    )
    assert max(jax.tree.leaves(encoder_change)) > 1e-6
    # The probe still sees stop_gradient(h): its gradient is unchanged by the new terms.
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
        grads["linear_probe"],
        plain_grads["linear_probe"],
    )


def test_input_target_needs_the_input_image_in_the_batch():
    _, hybrid = _states()
    batch = _batch(0)
    del batch["image"]
    with pytest.raises(ValueError, match='"image"'):
        step.loss_and_gradients(
            hybrid,
            batch,
            jax.random.key(0),
            temperature=TEMPERATURE,
            hybrid=reconstruction.HybridObjective(target="input"),
        )


def test_tiny_vae_run_writes_reconstructions_and_finite_metrics(fashion_mnist_data_dir, tmp_path):
    config = tiny.get_config()
    config.data_dir = fashion_mnist_data_dir
    config.num_train_steps = 4
    config.compute_baselines = False
    config.augment.rotation_degrees = 15.0
    config.hybrid.decoder = "vae"
    config.hybrid.target = "input"
    config.hybrid.decoder_channels = 4
    config.hybrid.latent_dim = 8
    results = trainer.train_and_evaluate(config, str(tmp_path))
    assert 0.0 <= results["linear_probe_top1"] <= 1.0

    from PIL import Image

    png = Image.open(tmp_path / "reconstructions.png")
    side = 2 * (16 + 2) * 2  # rows of inputs and of reconstructions, 16 px, padding 2, scale 2
    assert png.size[1] == 2 * side + 2 * 2  # two pairs of rows of 8
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert train_records
    for record in train_records:
        assert np.isfinite(record["reconstruction_loss"]) and record["reconstruction_loss"] > 0
        assert np.isfinite(record["kl_divergence"])
        assert np.isfinite(record["loss"])
    assert json.loads((tmp_path / "config.json").read_text())["hybrid"]["decoder"] == "vae"


def test_unknown_decoder_is_rejected():
    config = tiny.get_config()
    config.hybrid.decoder = "gan"
    with pytest.raises(ValueError, match=r"hybrid\.decoder"):
        experiment.build_model(config, num_classes=10)
