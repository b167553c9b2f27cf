"""Linear evaluation with SGD and fine-tuning: which parameters start pretrained, which move."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax import parallel, step
from simclr_jax.evaluation import supervised
from simclr_jax.models import SimCLR
from simclr_jax.models.heads import ProjectionHead

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 3


class TinyEncoder(nn.Module):
    """Conv -> BN -> ReLU -> global average pool: an encoder that compiles in a blink."""

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(6, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return jnp.mean(nn.relu(x), axis=(1, 2))


@pytest.fixture(scope="module")
def pretrained():
    model = SimCLR(
        encoder=TinyEncoder(),
        projection_head=ProjectionHead(num_layers=2, output_dim=4),
        num_classes=NUM_CLASSES,
    )
    state = step.create_train_state(model, optax.sgd(0.1), jax.random.key(1), IMAGE_SHAPE)
    # Non-trivial BN statistics, so that "unchanged" below is not "still at the init values".
    stats = jax.tree.map(lambda x: 1.5 * x, state.batch_stats)  # variances 1 -> 1.5
    return model, {"params": state.params, "batch_stats": stats}


def _batch(seed=0, size=16):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.uniform(size=(size, *IMAGE_SHAPE)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, size).astype(np.int32),
    }


def _state(model, variables, *, frozen, head_layers=0):
    classifier = supervised.classifier_for(
        model, NUM_CLASSES, head_layers=head_layers, frozen_encoder=frozen
    )
    return supervised.initial_state(
        classifier, jax.random.key(0), IMAGE_SHAPE, optax.constant_schedule(0.5), variables
    )


def _equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


def test_pretrained_layers_are_taken_and_the_classifier_starts_at_zero(pretrained):
    model, variables = pretrained
    state = _state(model, variables, frozen=False, head_layers=1)
    assert _equal(state.params["encoder"], variables["params"]["encoder"])
    head = state.params["projection_head"]
    assert set(head) == {"dense_0", "bn_0"}
    assert _equal(head, {k: variables["params"]["projection_head"][k] for k in head})
    assert _equal(state.batch_stats["encoder"], variables["batch_stats"]["encoder"])
    assert not np.any(state.params["classifier"]["kernel"])
    scratch = _state(model, None, frozen=False, head_layers=1)
    assert not _equal(scratch.params["encoder"], variables["params"]["encoder"])


def test_frozen_encoder_gives_the_pretrained_h_and_only_the_classifier_moves(pretrained):
    model, variables = pretrained
    mesh = parallel.data_mesh()
    state = _state(model, variables, frozen=True)
    batch = _batch()
    for _ in range(2):
        state, metrics = supervised._jit_train_step(mesh)(
            state, parallel.host_batch_to_global(batch, mesh)
        )
    assert np.isfinite(float(metrics["loss"]))
    assert _equal(state.params["encoder"], variables["params"]["encoder"])
    assert _equal(state.batch_stats, {"encoder": variables["batch_stats"]["encoder"]})
    assert np.any(state.params["classifier"]["kernel"])
    # logits = h @ W + b with h exactly the SimCLR model's inference-mode representation.
    h = model.apply(variables, batch["image"], train=False)["h"]
    classifier = state.params["classifier"]
    expected = h @ classifier["kernel"] + classifier["bias"]
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False
    )
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_fine_tuning_moves_every_layer_and_eight_devices_equal_one(pretrained):
    model, variables = pretrained
    batch = _batch(seed=1)
    states = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.data_mesh(devices)
        state = _state(model, variables, frozen=False, head_layers=1)
        # The classifier starts at zero: the first step moves only it (and the BN statistics).
        for _ in range(2):
            state, _ = supervised._jit_train_step(mesh)(
                state, parallel.host_batch_to_global(batch, mesh)
            )
        states.append(jax.device_get(state))
    one, eight = states
    assert not _equal(one.params["encoder"], variables["params"]["encoder"])
    assert not _equal(one.batch_stats["encoder"], variables["batch_stats"]["encoder"])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        (one.params, one.batch_stats),
        (eight.params, eight.batch_stats),
    )


def test_step_count_and_learning_rate():
    assert supervised.num_steps(600, 60, 256) == 141
    assert supervised.num_steps(10, 0.01, 256) == 1
    schedule = supervised.cosine_learning_rate(0.05, 512, 100)
    assert float(schedule(0)) == pytest.approx(0.1)
    assert float(schedule(50)) == pytest.approx(0.05)
    assert float(schedule(100)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="epochs"):
        supervised.num_steps(10, 0, 4)
