"""The sharded train step: global batch-norm and global negatives on any number of devices."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax import losses, optim, parallel, step
from simclr_jax.models import simclr_resnet

IMAGE_SHAPE = (16, 16, 3)
BATCH_SIZE = 16  # images: 32 views, four per device on the 8-device mesh
TEMPERATURE = 0.5


def _batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "views": rng.random((BATCH_SIZE, 2, *IMAGE_SHAPE), dtype=np.float32),
        "label": rng.integers(0, 10, BATCH_SIZE).astype(np.int32),
    }


def _schedule():
    return optim.warmup_cosine_schedule(peak_value=0.5, warmup_steps=2, total_steps=10)


@functools.cache
def _initial_host_state() -> step.TrainState:
    model = simclr_resnet(
        depth=18, width_multiplier=1.0, base_width=8, stem="cifar", num_classes=10
    )
    tx = optim.lars(_schedule(), weight_decay=1e-4)
    return jax.device_get(step.create_train_state(model, tx, jax.random.key(0), IMAGE_SHAPE))


def _initial_state() -> step.TrainState:
    """A fresh device copy each time: the jitted step donates (deletes) the state it is given."""
    return jax.device_put(_initial_host_state())


def _on_mesh(mesh, tree):
    return jax.device_put(tree, parallel.replicated(mesh))


def _run_steps(mesh, num_steps):
    """``num_steps`` steps of the jitted step on ``mesh``; returns host copies of all results."""
    train = step.jit_train_step(mesh, temperature=TEMPERATURE, learning_rate_fn=_schedule())
    state = _on_mesh(mesh, _initial_state())
    metrics = []
    for i in range(num_steps):
        batch = parallel.host_batch_to_global(_batch(i), mesh)
        state, m = train(state, batch, jax.random.key(i))
        metrics.append(jax.device_get(m))
    return jax.device_get((state.params, state.batch_stats, state.opt_state)), metrics


def _gradients(mesh):
    fn = jax.jit(
        functools.partial(step.loss_and_gradients, temperature=TEMPERATURE),
        in_shardings=(
            parallel.replicated(mesh),
            parallel.batch_sharded(mesh),
            parallel.replicated(mesh),
        ),
        out_shardings=parallel.replicated(mesh),
    )
    batch = parallel.host_batch_to_global(_batch(0), mesh)
    (loss, aux), grads = fn(_on_mesh(mesh, _initial_state()), batch, jax.random.key(0))
    return jax.device_get((loss, aux["batch_stats"], grads))


def _assert_trees_close(actual, expected, rtol=1e-5):
    """Leaf-wise closeness, with an absolute floor scaled to each leaf's magnitude."""

    def check(path, a, e):
        scale = float(np.max(np.abs(e))) if np.size(e) else 0.0
        np.testing.assert_allclose(
            a, e, rtol=rtol, atol=rtol * scale + 1e-7, err_msg=jax.tree_util.keystr(path)
        )

    jax.tree_util.tree_map_with_path(check, actual, expected)


def test_gradients_on_eight_devices_equal_one_device():
    loss8, stats8, grads8 = _gradients(parallel.data_mesh())
    loss1, stats1, grads1 = _gradients(parallel.data_mesh(jax.devices()[:1]))
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    _assert_trees_close(stats8, stats1)
    _assert_trees_close(grads8, grads1)


def test_steps_on_eight_devices_equal_one_device():
    """Global BN statistics and global negatives: sharding the batch changes nothing."""
    results8, metrics8 = _run_steps(parallel.data_mesh(), num_steps=2)
    results1, metrics1 = _run_steps(parallel.data_mesh(jax.devices()[:1]), num_steps=2)
    _assert_trees_close(results8, results1)
    _assert_trees_close(metrics8, metrics1)


def test_sharded_step_equals_the_pure_step():
    """The jit wrapper adds shardings and donation only: results match the pure function,
    compiled for one device without either."""
    mesh = parallel.data_mesh()
    (params, stats, _), metrics = _run_steps(mesh, num_steps=1)
    pure_step = jax.jit(
        functools.partial(step.train_step, temperature=TEMPERATURE, learning_rate_fn=_schedule())
    )
    state, expected = pure_step(
        _initial_state(), jax.tree.map(jnp.asarray, _batch(0)), jax.random.key(0)
    )
    _assert_trees_close((params, stats), jax.device_get((state.params, state.batch_stats)), 1e-4)
    _assert_trees_close(metrics[0], jax.device_get(expected), 1e-4)


def test_step_metrics_are_finite_and_complete():
    _, metrics = _run_steps(parallel.data_mesh(), num_steps=1)
    expected_keys = {
        "loss",
        "contrastive_loss",
        "contrastive_accuracy",
        "contrastive_entropy",
        "probe_loss",
        "probe_accuracy",
        "learning_rate",
        "grad_norm",
        "param_norm",
    }
    assert set(metrics[0]) == expected_keys
    for name, value in metrics[0].items():
        assert np.ndim(value) == 0 and np.isfinite(value), name
    assert metrics[0]["learning_rate"] == 0.0  # warm-up starts from zero
    np.testing.assert_allclose(
        metrics[0]["loss"], metrics[0]["contrastive_loss"] + metrics[0]["probe_loss"], rtol=1e-6
    )


def test_state_is_donated():
    mesh = parallel.data_mesh()
    train = step.jit_train_step(mesh, temperature=TEMPERATURE, learning_rate_fn=_schedule())
    state = _on_mesh(mesh, _initial_state())
    new_state, _ = train(state, parallel.host_batch_to_global(_batch(0), mesh), jax.random.key(0))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state.params))
    assert int(new_state.step) == 1


def test_training_on_a_fixed_batch_lowers_the_contrastive_loss():
    model = simclr_resnet(
        depth=18, width_multiplier=1.0, base_width=8, stem="cifar", num_classes=10
    )
    state = step.create_train_state(model, optax.adam(3e-3), jax.random.key(1), IMAGE_SHAPE)
    mesh = parallel.data_mesh()
    train = step.jit_train_step(mesh, temperature=TEMPERATURE, learning_rate_fn=lambda _: 3e-3)
    state = _on_mesh(mesh, state)
    batch = parallel.host_batch_to_global(_batch(7), mesh)
    losses = []
    for i in range(12):
        state, metrics = train(state, batch, jax.random.key(i))
        losses.append(float(metrics["contrastive_loss"]))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize(
    ("labels", "expected_accuracy"),
    [([0, 1, -1, -1], 0.5), ([-1, -1, -1, -1], 0.0), ([0, 0, 1, 1], 1.0), ([0, 1, 1, 0], 0.5)],
)
def test_probe_ignores_unlabelled_examples(labels, expected_accuracy):
    logits = jnp.array([[2.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = jnp.array(labels)
    loss, accuracy = step.probe_loss_and_accuracy(logits, labels)
    log_probs = jax.nn.log_softmax(logits)
    labelled = [i for i, y in enumerate(labels.tolist()) if y >= 0]
    expected_loss = -np.mean([log_probs[i, labels[i]] for i in labelled]) if labelled else 0.0
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    np.testing.assert_allclose(accuracy, expected_accuracy)


def _structured_batch(rng: np.random.Generator, size: int, shape: tuple[int, int, int]):
    """Smooth images (bilinear upsamplings of 3x3 noise), two noisy views each.

    Pure-noise images give deep features that barely differ across the batch, which batch norm
    then blows up: on those, even rounding the input to bfloat16 changes the float32 gradients
    by most of their size. Images that differ on large scales keep the step well conditioned.
    """
    coarse = rng.random((size, 1, 3, 3, shape[-1]), dtype=np.float32)
    images = np.asarray(jax.image.resize(coarse, (size, 1, *shape), "linear"))
    noise = 0.05 * rng.standard_normal((size, 2, *shape)).astype(np.float32)
    return {"views": images + noise, "label": rng.integers(0, 10, size).astype(np.int32)}


def test_bfloat16_steps_track_float32_with_float32_state_and_loss():
    """Five SGD steps in bfloat16 from the float32 run's initial state: the loss stays within
    5% of float32's at every step (measured: 0.02% at the first, at most 2% later, as the
    trajectories part), the first update points the same way (measured cosine 0.99), and
    everything the optimiser keeps or the loss reports stays float32."""
    shape, learning_rate = (16, 16, 3), 0.01

    def model(dtype):
        return simclr_resnet(
            depth=18, width_multiplier=1.0, base_width=4, stem="cifar", num_classes=10, dtype=dtype
        )

    tx = optim.create_optimizer("sgd", learning_rate, weight_decay=1e-4)
    initial = step.create_train_state(model(jnp.float32), tx, jax.random.key(0, impl="rbg"), shape)
    train = jax.jit(
        functools.partial(
            step.train_step, temperature=TEMPERATURE, learning_rate_fn=lambda _: learning_rate
        )
    )
    rng = np.random.default_rng(0)
    batches = [_structured_batch(rng, 16, shape) for _ in range(5)]
    runs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        state = initial.replace(apply_fn=model(dtype).apply)
        losses, first_update = [], None
        for i, batch in enumerate(batches):
            state, metrics = train(state, batch, jax.random.key(i))
            for name in ("loss", "contrastive_loss", "probe_loss", "contrastive_entropy"):
                assert metrics[name].dtype == jnp.float32, (dtype, name)
            kept = (state.params, state.batch_stats, state.opt_state)
            assert {leaf.dtype for leaf in jax.tree.leaves(kept)} == {jnp.dtype(jnp.float32)}
            if first_update is None:
                first_update = jax.tree.map(lambda a, b: a - b, state.params, initial.params)
            losses.append(float(metrics["loss"]))
        runs[dtype] = np.array(losses), first_update

    (losses32, update32), (losses16, update16) = runs[jnp.float32], runs[jnp.bfloat16]
    assert not np.array_equal(losses16, losses32)  # the bfloat16 path really ran
    np.testing.assert_allclose(losses16[0], losses32[0], rtol=5e-3)
    np.testing.assert_allclose(losses16, losses32, rtol=0.05)
    flat32 = np.concatenate([np.ravel(u) for u in jax.tree.leaves(update32)])
    flat16 = np.concatenate([np.ravel(u) for u in jax.tree.leaves(update16)])
    cosine = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
    assert cosine > 0.95, cosine


# --- Multi-crop: small views through the same encoder ---------------------------------------

NUM_SMALL_CROPS = 2
SMALL_SHAPE = (8, 8, 3)


class _TinyConvSimCLR(nn.Module):
    """Convolution, batch norm and a global mean: a SimCLR-shaped model that compiles in seconds
    and, like the ResNet, takes views of any resolution."""

    @nn.compact
    def __call__(self, images: jax.Array, train: bool) -> dict[str, jax.Array]:
        x = nn.Conv(8, (3, 3), strides=2)(images)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        h = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(10)(jax.lax.stop_gradient(h))
        return {"h": h, "z": nn.Dense(8)(nn.relu(nn.Dense(8)(h))), "logits": logits}


@functools.cache
def _tiny_host_state() -> step.TrainState:
    tx = optim.lars(_schedule(), weight_decay=1e-4)
    return jax.device_get(
        step.create_train_state(_TinyConvSimCLR(), tx, jax.random.key(0), IMAGE_SHAPE)
    )


def _multi_crop_batch(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    small = rng.random((BATCH_SIZE, NUM_SMALL_CROPS, *SMALL_SHAPE), dtype=np.float32)
    return {**_batch(seed), "small_views": small}


@functools.cache
def _sharded_multi_crop_steps(num_steps: int = 3):
    """``num_steps`` jitted steps on the 8-device mesh from the initial state: host copies of
    the state after the first step, each step's metrics, and how often the step was traced."""
    traces = []

    def schedule(count):
        traces.append(1)  # called once per trace of the step, never when a compiled step runs
        return _schedule()(count)

    mesh = parallel.data_mesh()
    train = step.jit_train_step(mesh, temperature=TEMPERATURE, learning_rate_fn=schedule)
    state = _on_mesh(mesh, jax.device_put(_tiny_host_state()))
    first_state, metrics = None, []
    for i in range(num_steps):
        batch = parallel.host_batch_to_global(_multi_crop_batch(i), mesh)
        state, m = train(state, batch, jax.random.key(i))
        metrics.append(jax.device_get(m))
        if first_state is None:
            first_state = jax.device_get((state.params, state.batch_stats, state.opt_state))
    return first_state, metrics, len(traces)


@functools.cache
def _one_device_multi_crop_reference():
    """On one device, for batch 0: the multi-crop loss recomputed from the model's projections
    (large and small views batch-normalised separately), the pure train step's new state and
    metrics, and the plain step's terms on the same batch without small views."""
    state = jax.device_put(_tiny_host_state())
    batch = jax.tree.map(jnp.asarray, _multi_crop_batch(0))
    plain_batch = {k: v for k, v in batch.items() if k != "small_views"}

    @jax.jit
    def compute(state, batch, plain_batch):
        def z_of(views):
            outputs, _ = state.apply_fn(
                {"params": state.params, "batch_stats": state.batch_stats},
                step.flatten_views(views),
                train=True,
                mutable=["batch_stats"],
            )
            return outputs["z"]

        z = jnp.concatenate([z_of(batch["views"]), z_of(batch["small_views"])])
        expected = losses.multi_crop_nt_xent(z, TEMPERATURE, NUM_SMALL_CROPS)
        new_state, metrics = step.train_step(
            state,
            batch,
            jax.random.key(0),
            temperature=TEMPERATURE,
            learning_rate_fn=_schedule(),
        )
        new_state = (new_state.params, new_state.batch_stats, new_state.opt_state)
        (_, plain_aux), _ = step.loss_and_gradients(
            state, plain_batch, jax.random.key(0), temperature=TEMPERATURE
        )
        plain_terms = {k: plain_aux[k] for k in ("batch_stats", "probe_loss", "contrastive_loss")}
        return expected, new_state, metrics, plain_terms

    return jax.device_get(compute(state, batch, plain_batch))


def test_multi_crop_steps_on_eight_devices_equal_one_device_and_compile_once():
    first_state, metrics, traces = _sharded_multi_crop_steps()
    assert traces == 1  # shapes are fixed per run: one compilation for every batch
    assert all(np.isfinite(m["loss"]) for m in metrics)
    _, expected_state, expected_metrics, _ = _one_device_multi_crop_reference()
    _assert_trees_close(first_state, expected_state, 1e-4)
    _assert_trees_close(metrics[0], expected_metrics, 1e-4)


def test_multi_crop_loss_sees_both_resolutions_and_keeps_the_large_views_statistics():
    """The loss is `multi_crop_nt_xent` of the large then the small views' projections, each
    resolution batch-normalised on its own; the running statistics and the probe's loss are
    those of the plain step on the large views."""
    expected_loss, (_, batch_stats, _), metrics, plain = _one_device_multi_crop_reference()
    np.testing.assert_allclose(metrics["contrastive_loss"], expected_loss, rtol=1e-6)
    assert not np.isclose(metrics["contrastive_loss"], plain["contrastive_loss"])
    np.testing.assert_allclose(metrics["probe_loss"], plain["probe_loss"], rtol=1e-6)
    _assert_trees_close(batch_stats, plain["batch_stats"], 1e-6)
