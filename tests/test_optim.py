"""LARS against a hand-written NumPy update, parameter masks on real Flax trees, schedules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simclr_jax import optim


class _ConvBnDense(nn.Module):
    """One of each parameter kind: conv kernel, BatchNorm scale/bias, dense kernel and bias."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=False, name="bn")(x)
        return nn.Dense(3, name="dense")(jnp.mean(nn.relu(x), axis=(1, 2)))


class _Block(nn.Module):
    """Residual block as in ResNet v1: conv-BN-ReLU-conv-BN plus a projection shortcut."""

    features: int

    @nn.compact
    def __call__(self, x):
        shortcut = nn.Conv(self.features, (1, 1), use_bias=False, name="proj_conv")(x)
        shortcut = nn.BatchNorm(use_running_average=False, name="proj_bn")(shortcut)
        y = nn.Conv(self.features, (3, 3), use_bias=False, name="conv1")(x)
        y = nn.relu(nn.BatchNorm(use_running_average=False, name="bn1")(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(y)
        y = nn.BatchNorm(use_running_average=False, name="bn2")(y)
        return nn.relu(y + shortcut)


class _TinySimCLR(nn.Module):
    """Stem, two blocks, projection head (last BN without offset) and a linear probe."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), use_bias=False, name="stem_conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=False, name="stem_bn")(x))
        x = _Block(4, name="block1")(x)
        h = jnp.mean(_Block(8, name="block2")(x), axis=(1, 2))
        z = nn.Dense(8, name="head_dense1")(h)
        z = nn.relu(nn.BatchNorm(use_running_average=False, name="head_bn1")(z))
        z = nn.Dense(4, use_bias=False, name="head_dense2")(z)
        z = nn.BatchNorm(use_running_average=False, use_bias=False, name="head_bn2")(z)
        logits = nn.Dense(3, name="probe")(jax.lax.stop_gradient(h))
        return z, logits


def _init_params(module: nn.Module, seed: int = 0) -> dict:
    """The module's real parameter tree (names, nesting, shapes), filled with random normals.

    The shapes come from ``jax.eval_shape``, so no convolution is compiled.
    """
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((2, 6, 6, 3)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: jnp.asarray(rng.normal(size=leaf.shape), jnp.float32), variables["params"]
    )


@pytest.fixture(scope="module")
def resnet_like_params() -> dict:
    return _init_params(_TinySimCLR())


def _flat(tree) -> dict[str, np.ndarray]:
    return {
        "/".join(str(key.key) for key in path): np.asarray(leaf, np.float64)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


# Written out by hand for _ConvBnDense: which leaves get weight decay and trust-ratio scaling.
_CONV_BN_DENSE_DECAYED = {
    "conv/kernel": True,
    "bn/scale": False,
    "bn/bias": False,
    "dense/kernel": True,
    "dense/bias": False,
}


def _conv_bn_dense_params_and_grads():
    """A Flax parameter tree, every leaf non-zero except a zero-initialised dense kernel."""
    params = _init_params(_ConvBnDense())
    rng = np.random.default_rng(1)
    params["dense"]["kernel"] = jnp.zeros_like(params["dense"]["kernel"])
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        for _ in range(2)
    ]
    return params, grads


def _reference_lars_updates(params, grads, learning_rates, weight_decay, momentum, eta, nesterov):
    """The LARS steps written out leaf by leaf in NumPy; returns the update of each step."""
    weights = _flat(params)
    velocity = {name: np.zeros_like(w) for name, w in weights.items()}
    all_updates = []
    for grad_tree, lr in zip(grads, learning_rates, strict=True):
        step_updates = {}
        for name, g in _flat(grad_tree).items():
            w = weights[name]
            trust = 1.0
            if _CONV_BN_DENSE_DECAYED[name]:
                g = g + weight_decay * w
                w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
                if w_norm > 0 and g_norm > 0:
                    trust = eta * w_norm / g_norm
            velocity[name] = momentum * velocity[name] + lr * trust * g
            step = velocity[name]
            if nesterov:
                step = momentum * velocity[name] + lr * trust * g
            weights[name] = w - step
            step_updates[name] = -step
        all_updates.append(step_updates)
    return all_updates


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_two_steps_match_hand_computation(nesterov):
    params, grads = _conv_bn_dense_params_and_grads()
    weight_decay, momentum, eta = 0.1, 0.9, 1e-3

    def schedule(count):
        return 0.5 + 0.25 * count  # a different learning rate on each step

    tx = optim.lars(
        schedule,
        weight_decay=weight_decay,
        momentum=momentum,
        trust_coefficient=eta,
        nesterov=nesterov,
    )
    expected = _reference_lars_updates(
        params, grads, [0.5, 0.75], weight_decay, momentum, eta, nesterov
    )
    state = tx.init(params)
    for grad_tree, expected_updates in zip(grads, expected, strict=True):
        updates, state = jax.jit(tx.update)(grad_tree, state, params)
        params = optax.apply_updates(params, updates)
        actual = _flat(updates)
        assert set(actual) == set(expected_updates)
        for name, value in expected_updates.items():
            np.testing.assert_allclose(actual[name], value, rtol=1e-5, atol=1e-9, err_msg=name)
    # The zero-norm kernel took a full learning-rate step (trust 1), unlike the scaled conv.
    first = expected[0]
    assert np.abs(first["dense/kernel"]).max() > 100 * np.abs(first["conv/kernel"]).max()


def test_lars_zero_gradient_on_adapted_leaf_stays_finite():
    params, _ = _conv_bn_dense_params_and_grads()
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    tx = optim.lars(0.1, weight_decay=0.0)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(np.asarray(leaf), 0.0)


def test_mask_excludes_exactly_batchnorm_and_bias_leaves(resnet_like_params):
    params = resnet_like_params
    mask = _flat(optim.decay_and_adaptation_mask(params))
    assert set(mask) == set(_flat(params))
    batchnorm_leaves = {name for name in mask if "bn" in name.split("/")[-2]}
    bias_leaves = {name for name in mask if name.endswith("/bias")}
    excluded = {name for name, keep in mask.items() if not keep}
    assert excluded == batchnorm_leaves | bias_leaves
    # 9 BatchNorms (one without offset: 17 leaves) and the biases of 2 Dense layers; the rest are
    # the kernels of 7 convolutions and 3 Dense layers.
    assert len(excluded) == 17 + 2
    assert len(mask) - len(excluded) == 10


def test_mask_excludes_the_online_probe_entirely():
    params = {
        "encoder": {"conv": {"kernel": jnp.ones((3, 3, 1, 2))}},
        "linear_probe": {"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}},
        "projection_head": {"linear_probe_like": {"kernel": jnp.ones((2, 2))}},
    }
    mask = _flat(optim.decay_and_adaptation_mask(params))
    assert {name for name, keep in mask.items() if keep} == {
        "encoder/conv/kernel",
        "projection_head/linear_probe_like/kernel",
    }


def test_every_optimizer_updates_a_resnet_like_tree(resnet_like_params):
    params = resnet_like_params
    for name in optim.OPTIMIZERS:
        tx = optim.create_optimizer(name, 0.1, weight_decay=1e-4)
        grads = jax.tree.map(jnp.ones_like, params)
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        assert jax.tree.structure(updates) == jax.tree.structure(params)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_sgd_and_adamw_decay_only_masked_leaves(name):
    params, _ = _conv_bn_dense_params_and_grads()
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    lr, weight_decay, momentum = 0.1, 0.01, 0.9
    tx = optim.create_optimizer(name, lr, weight_decay=weight_decay, momentum=momentum)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # With a zero gradient only weight decay moves parameters. SGD: g = wd*w, first Nesterov step
    # lr*(1 + momentum)*g. AdamW: the Adam part is 0, the decoupled decay is lr*wd*w.
    factor = lr * weight_decay * ((1 + momentum) if name == "sgd" else 1.0)
    weights = _flat(params)
    for leaf_name, update in _flat(updates).items():
        if _CONV_BN_DENSE_DECAYED[leaf_name]:
            np.testing.assert_allclose(update, -factor * weights[leaf_name], rtol=1e-5)
        else:
            np.testing.assert_array_equal(update, 0.0)
    assert np.abs(_flat(updates)["conv/kernel"]).max() > 0


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match=r"lars.*sgd.*adamw"):
        optim.create_optimizer("adam", 0.1, weight_decay=0.0)


def test_warmup_cosine_schedule_shape():
    peak, warmup, total = 2.0, 10, 50
    schedule = optim.warmup_cosine_schedule(peak, warmup, total)
    values = np.array([float(schedule(step)) for step in range(total + 5)])
    assert values[0] == 0.0
    np.testing.assert_allclose(values[warmup], peak, rtol=1e-6)
    np.testing.assert_allclose(values[warmup // 2], peak / 2, rtol=1e-6)
    np.testing.assert_allclose(values[(warmup + total) // 2], peak / 2, rtol=1e-5)
    assert np.all(np.diff(values[: warmup + 1]) > 0)
    assert np.all(np.diff(values[warmup:total]) < 0)
    np.testing.assert_allclose(values[total:], 0.0, atol=1e-6)


def test_warmup_cosine_schedule_without_warmup_and_invalid_lengths():
    schedule = optim.warmup_cosine_schedule(1.0, 0, 20)
    np.testing.assert_allclose(float(schedule(0)), 1.0)
    np.testing.assert_allclose(float(schedule(10)), 0.5, rtol=1e-5)
    for warmup, total in [(20, 20), (30, 20), (-1, 20)]:
        with pytest.raises(ValueError, match="warmup_steps"):
            optim.warmup_cosine_schedule(1.0, warmup, total)


def test_scaled_learning_rate():
    assert optim.scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
    assert optim.scaled_learning_rate(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert optim.scaled_learning_rate(0.3, 512, "linear") == pytest.approx(0.6)
    assert optim.scaled_learning_rate(0.075, 256, "sqrt") == pytest.approx(1.2)
    with pytest.raises(ValueError, match="linear"):
        optim.scaled_learning_rate(0.3, 256, "cubic")


def test_step_counts():
    # ImageNet, 100 epochs at B=4096: 128116700 // 4096 = 31278, plus one.
    assert optim.total_steps(1_281_167, 100, 4096) == 31279
    assert optim.total_steps(50_000, 1000, 512) == 97657
    assert optim.total_steps(100, 1, 512) == 1
    assert optim.total_steps(60_000, 1.9, 256) == 446  # fractional epochs
    assert optim.steps_per_epoch(50_000, 512) == 97
    assert optim.steps_per_epoch(100, 512) == 1
    with pytest.raises(ValueError):
        optim.total_steps(100, 0, 512)
