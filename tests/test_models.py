"""Tests for simclr_jax.models: ResNet encoders, heads and the SimCLR network.

Compiling is what costs time on CPU, so the numerical tests share one tiny SimCLR network
(ResNet-18 of base width 4, CIFAR stem, 8x8 images) and everything that only depends on shapes
uses `jax.eval_shape`.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conv_cases import skip_without_extension
from flax import traverse_util
from jax import lax

from simclr_jax import cpu, parallel
from simclr_jax.models import (
    XLA_LAYERS,
    Layers,
    LinearProbe,
    ProjectionHead,
    ResNet,
    SimCLR,
    resnet_feature_dim,
    simclr_resnet,
)
from simclr_jax.models.batch_norm import BatchNorm, batch_norm_train
from simclr_jax.models.resnet import (
    BasicBlock,
    BottleneckBlock,
    SelectiveKernel,
    SqueezeExcite,
    _conv,
)

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# Parameters are initialised from RngBitGenerator keys: on CPU they compile far faster than the
# default threefry keys, and the tests only need some valid initial values.
INIT_KEY = jax.random.key(1, impl="rbg")
# Keras/Flax truncated normal: truncated at 2 std, rescaled by this factor to keep the variance.
TRUNCATED_NORMAL_STD = 0.87962566103423978


@dataclasses.dataclass(frozen=True)
class Tiny:
    model: SimCLR
    encoder: ResNet
    x: jax.Array
    variables: dict

    @property
    def encoder_variables(self) -> dict:
        return {
            collection: self.variables[collection]["encoder"]
            for collection in ("params", "batch_stats")
        }


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    model = simclr_resnet(18, 1.0, "cifar", num_classes=5, base_width=4)
    encoder = ResNet(depth=18, base_width=4, stem="cifar")
    assert model.encoder == encoder
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
    variables = model.init(INIT_KEY, x, train=False)
    return Tiny(model, encoder, x, variables)


def _param_count(module, channels: int = 3) -> int:
    """Number of trainable parameters (not BN statistics), computed from shapes only."""
    variables = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, 224, 224, channels)), train=False)
    )
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))


def _flat(tree) -> dict[tuple[str, ...], np.ndarray]:
    return {path: np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(tree).items()}


def _block_outputs(module, variables, x) -> dict[str, jax.Array]:
    """Output of every residual block, by block name, in eval mode."""
    _, state = module.apply(
        variables,
        x,
        train=False,
        capture_intermediates=lambda mdl, _: mdl.name is not None and "_block" in mdl.name,
    )
    return {name: value["__call__"][0] for name, value in state["intermediates"].items()}


def _numpy_conv(x: np.ndarray, kernel: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Cross-correlation with `pad` zeros on every side, as a sum over kernel offsets."""
    k = kernel.shape[0]
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_h = (x.shape[1] + 2 * pad - k) // stride + 1
    out_w = (x.shape[2] + 2 * pad - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
    for di in range(k):
        for dj in range(k):
            window = padded[:, di : di + stride * out_h : stride, dj : dj + stride * out_w : stride]
            out += window @ kernel[di, dj]
    return out


def _numpy_bn(x, mean, var, scale, bias=0.0):
    return (x - mean) / np.sqrt(var + BN_EPSILON) * scale + bias


# ----------------------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize(
    ("stem", "channels", "image_size", "last_map_size"),
    [
        ("imagenet", 3, 64, 2),  # 64 -conv/2-> 32 -pool/2-> 16 -> groups 16, 8, 4, 2
        ("imagenet", 1, 64, 2),
        ("imagenet", 3, 224, 7),
        ("cifar", 3, 32, 4),  # 32 -> groups 32, 16, 8, 4
        ("cifar", 1, 28, 4),
    ],
)
def test_resnet_output_shapes(stem, channels, image_size, last_map_size):
    model = ResNet(depth=18, base_width=8, stem=stem)
    x = jnp.zeros((2, image_size, image_size, channels))
    h, variables = jax.eval_shape(
        lambda: model.init_with_output(
            jax.random.key(0), x, train=False, capture_intermediates=True
        )
    )
    assert h.shape == (2, resnet_feature_dim(18, base_width=8)) == (2, 64)
    assert h.dtype == jnp.float32
    (last_map,) = variables["intermediates"]["group4_block2"]["__call__"]
    assert last_map.shape == (2, last_map_size, last_map_size, 64)


def test_bottleneck_output_shape():
    model = ResNet(depth=50, base_width=4, stem="cifar")
    x = jnp.zeros((2, 32, 32, 3))
    h, _ = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False))
    assert h.shape == (2, resnet_feature_dim(50, base_width=4)) == (2, 4 * 8 * 4)


def test_features_are_the_global_average_pool(tiny):
    blocks = _block_outputs(tiny.encoder, tiny.encoder_variables, tiny.x)
    h = tiny.encoder.apply(tiny.encoder_variables, tiny.x, train=False)
    assert np.all(np.isfinite(h))
    assert blocks["group4_block2"].shape == (4, 1, 1, 32)
    np.testing.assert_allclose(h, blocks["group4_block2"].mean(axis=(1, 2)), rtol=1e-6)


def test_feature_dims():
    assert resnet_feature_dim(18) == resnet_feature_dim(34) == 512
    assert resnet_feature_dim(50) == resnet_feature_dim(152) == 2048
    assert resnet_feature_dim(50, width_multiplier=2) == 4096
    assert resnet_feature_dim(50, width_multiplier=4) == 8192
    assert resnet_feature_dim(18, width_multiplier=2, base_width=8) == 128


def test_resnet18_parameter_count():
    # torchvision resnet18: 11,689,512 parameters, of which the fc layer holds 512*1000 + 1000.
    torchvision_without_fc = 11_689_512 - 513_000
    # The official SimCLR ResNet also projects the shortcut of the first block of the first group
    # (64 -> 64 channels, stride 1), where torchvision keeps the identity: a 1x1 conv + BN.
    first_group_projection = 64 * 64 + 2 * 64
    assert _param_count(ResNet(depth=18)) == torchvision_without_fc + first_group_projection
    assert _param_count(ResNet(depth=18)) == 11_180_736


def test_resnet50_parameter_count():
    # torchvision resnet50: 25,557,032 parameters, of which the fc layer holds 2048*1000 + 1000.
    # Every first block of a ResNet-50 group changes width, so both have the same shortcuts.
    assert _param_count(ResNet(depth=50)) == 25_557_032 - 2_049_000


@pytest.mark.parametrize(("width", "millions"), [(2, 94), (4, 375)])
def test_wide_resnet50_parameter_count_matches_paper(width, millions):
    # SimCLR paper, Table 6: ResNet-50 (2x) has 94M parameters, ResNet-50 (4x) 375M.
    count = _param_count(ResNet(depth=50, width_multiplier=width))
    assert round(count / 1e6) == millions


def test_input_channels_only_change_the_stem():
    rgb, gray = _param_count(ResNet(depth=18), 3), _param_count(ResNet(depth=18), 1)
    assert rgb - gray == 2 * (7 * 7 * 64)


# ----------------------------------------------------------------------------- initialisation


def _check_zero_init(module, variables, x, last_bn: str, num_blocks: int):
    scales = {
        path: leaf for path, leaf in _flat(variables["params"]).items() if path[-1] == "scale"
    }
    zero = [path for path, leaf in scales.items() if np.all(leaf == 0)]
    one = [path for path, leaf in scales.items() if np.all(leaf == 1)]
    assert len(zero) == num_blocks
    assert all(path[-2] == last_bn for path in zero)
    assert len(zero) + len(one) == len(scales)

    # Hence every block without a projection starts as the identity on its (non-negative) input.
    outputs = _block_outputs(module, variables, x)
    assert len(outputs) == num_blocks
    checked = 0
    for name, output in outputs.items():
        group, block = name.removeprefix("group").split("_block")
        if block != "1":
            np.testing.assert_array_equal(output, outputs[f"group{group}_block{int(block) - 1}"])
            checked += 1
    assert checked == num_blocks - 4


def test_last_bn_of_every_basic_branch_starts_at_zero(tiny):
    _check_zero_init(tiny.encoder, tiny.encoder_variables, tiny.x, "bn2", num_blocks=8)


def test_last_bn_of_every_bottleneck_branch_starts_at_zero():
    model = ResNet(depth=50, base_width=2, stem="cifar")
    x = jax.random.uniform(jax.random.key(0), (2, 4, 4, 3))
    variables = model.init(INIT_KEY, x, train=False)
    _check_zero_init(model, variables, x, "bn3", num_blocks=16)


def test_without_zero_init_every_bn_scale_starts_at_one_and_nothing_else_changes(tiny):
    plain = tiny.encoder.clone(zero_init_residual=False)
    variables = _flat(plain.init(INIT_KEY, tiny.x, train=False)["params"])
    zero_init = _flat(tiny.encoder.init(INIT_KEY, tiny.x, train=False)["params"])
    assert variables.keys() == zero_init.keys()
    for path, leaf in variables.items():
        if path[-1] == "scale":
            np.testing.assert_array_equal(leaf, np.ones_like(leaf))
        else:
            np.testing.assert_array_equal(leaf, zero_init[path])


def test_conv_kernels_use_fan_in_variance_scaling(tiny):
    # Every kernel divided by its expected std 1/sqrt(fan_in) should look like one N(0, 1)
    # truncated at 2/0.8796 (He initialisation would give std sqrt(2)).
    standardised = np.concatenate(
        [
            leaf.ravel() * math.sqrt(math.prod(leaf.shape[:-1]))
            for path, leaf in _flat(tiny.encoder_variables["params"]).items()
            if path[-1] == "kernel"
        ]
    )
    assert standardised.size > 40_000
    np.testing.assert_allclose(standardised.std(), 1.0, rtol=0.03)
    assert np.abs(standardised).max() <= 2 / TRUNCATED_NORMAL_STD


# ----------------------------------------------------------------------------- batch norm


@pytest.mark.parametrize(
    ("stem", "kernel_size", "stride", "image_size"), [("cifar", 3, 1, 8), ("imagenet", 7, 2, 32)]
)
def test_train_mode_updates_bn_statistics_from_the_batch(
    tiny, stem, kernel_size, stride, image_size
):
    model = dataclasses.replace(tiny.encoder, stem=stem)
    variables = tiny.encoder_variables
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 0.1, (kernel_size, kernel_size, 3, 4))
    params = {**variables["params"], "stem_conv": {"kernel": jnp.asarray(kernel, jnp.float32)}}
    variables = {**variables, "params": params}
    x = rng.uniform(0, 1, (4, image_size, image_size, 3))

    _, state = model.apply(
        variables,
        jnp.asarray(x, jnp.float32),
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda mdl, _: mdl.name == "stem_conv",
    )
    conv = _numpy_conv(x, kernel, stride, pad=kernel_size // 2)
    (stem_output,) = state["intermediates"]["stem_conv"]["__call__"]
    np.testing.assert_allclose(stem_output, conv, rtol=1e-4, atol=1e-5)

    # moving = 0.9 * moving + 0.1 * batch, from mean 0 and variance 1.
    new_stats = state["batch_stats"]["stem_bn"]
    np.testing.assert_allclose(
        new_stats["mean"], (1 - BN_MOMENTUM) * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(
        new_stats["var"], BN_MOMENTUM + (1 - BN_MOMENTUM) * conv.var(axis=(0, 1, 2)), rtol=1e-4
    )
    # Every BN layer of the network was updated.
    old, new = _flat(variables["batch_stats"]), _flat(state["batch_stats"])
    assert old.keys() == new.keys()
    assert all(not np.allclose(old[path], new[path]) for path in old)


def test_eval_mode_leaves_bn_statistics_and_ignores_the_batch(tiny):
    model, x = tiny.encoder, tiny.x
    # One training step gives running statistics that differ from their initial 0 and 1.
    _, updates = model.apply(tiny.encoder_variables, x, train=True, mutable=["batch_stats"])
    variables = {**tiny.encoder_variables, **updates}

    h, after_eval = model.apply(variables, x, train=False, mutable=["batch_stats"])
    for path, value in _flat(variables["batch_stats"]).items():
        np.testing.assert_array_equal(_flat(after_eval["batch_stats"])[path], value)

    # With running statistics an example's features do not depend on the rest of the batch;
    # with batch statistics they do.
    other_batch = x.at[1:].set(jax.random.uniform(jax.random.key(5), x[1:].shape))
    h_other = model.apply(variables, other_batch, train=False)
    np.testing.assert_allclose(h_other[0], h[0], rtol=1e-5, atol=1e-6)
    h_train, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    h_train_other, _ = model.apply(variables, other_batch, train=True, mutable=["batch_stats"])
    assert not np.allclose(h_train_other[0], h_train[0], rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- projection head


@pytest.mark.parametrize(
    ("num_layers", "hidden_dim", "kernel_shapes"),
    [
        (1, None, [(16, 128)]),
        (2, None, [(16, 16), (16, 128)]),
        (3, None, [(16, 16), (16, 16), (16, 128)]),
        (3, 32, [(16, 32), (32, 32), (32, 128)]),
    ],
)
def test_projection_head_structure(num_layers, hidden_dim, kernel_shapes):
    head = ProjectionHead(num_layers=num_layers, hidden_dim=hidden_dim)
    z, variables = jax.eval_shape(
        lambda: head.init_with_output(jax.random.key(0), jnp.ones((4, 16)), train=False)
    )
    params = variables["params"]
    assert z.shape == (4, 128)
    assert set(params) == {f"dense_{i}" for i in range(num_layers)} | {
        f"bn_{i}" for i in range(num_layers)
    }
    assert [params[f"dense_{i}"]["kernel"].shape for i in range(num_layers)] == kernel_shapes
    assert all(set(params[f"dense_{i}"]) == {"kernel"} for i in range(num_layers))
    assert all(set(params[f"bn_{i}"]) == {"scale", "bias"} for i in range(num_layers - 1))
    assert set(params[f"bn_{num_layers - 1}"]) == {"scale"}


def test_projection_head_dense_init():
    # Official initialisation of the head's dense kernels: N(0, 0.01^2).
    variables = ProjectionHead().init(jax.random.key(0), jnp.ones((2, 64)), train=False)
    kernels = np.concatenate([variables["params"][f"dense_{i}"]["kernel"].ravel() for i in (0, 1)])
    np.testing.assert_allclose(kernels.std(), 0.01, rtol=0.03)


def test_projection_head_rejects_zero_layers():
    with pytest.raises(ValueError, match="num_layers"):
        ProjectionHead(num_layers=0)


@pytest.mark.parametrize("train", [True, False])
def test_projection_head_matches_numpy(train):
    head = ProjectionHead(num_layers=2, output_dim=3)
    rng = np.random.default_rng(0)
    h = rng.normal(size=(6, 5))
    variables = head.init(jax.random.key(1), jnp.asarray(h, jnp.float32), train=False)
    # Non-trivial weights, BN parameters and running statistics, so each shows in the output.
    variables = jax.tree.map(
        lambda leaf: rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32), variables
    )
    p, s = variables["params"], variables["batch_stats"]
    z, _ = head.apply(variables, jnp.asarray(h, jnp.float32), train=train, mutable=["batch_stats"])

    def bn(y, name, bias):
        if train:
            return _numpy_bn(y, y.mean(0), y.var(0), p[name]["scale"], bias)
        return _numpy_bn(y, s[name]["mean"], s[name]["var"], p[name]["scale"], bias)

    hidden = np.maximum(bn(h @ p["dense_0"]["kernel"], "bn_0", p["bn_0"]["bias"]), 0)
    expected = bn(hidden @ p["dense_1"]["kernel"], "bn_1", 0.0)
    assert z.dtype == jnp.float32
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- SimCLR network


def test_simclr_outputs(tiny):
    out = tiny.model.apply(tiny.variables, tiny.x, train=False)
    assert set(out) == {"h", "z", "logits"}
    assert out["h"].shape == (4, 32)
    assert out["z"].shape == (4, 128)
    assert out["logits"].shape == (4, 5)
    assert set(tiny.variables["params"]) == {"encoder", "projection_head", "linear_probe"}
    np.testing.assert_array_equal(
        out["h"], tiny.encoder.apply(tiny.encoder_variables, tiny.x, train=False)
    )
    probe = tiny.variables["params"]["linear_probe"]["dense"]
    np.testing.assert_allclose(
        out["logits"], out["h"] @ probe["kernel"] + probe["bias"], rtol=1e-5, atol=1e-6
    )


def test_probe_and_contrastive_gradients_are_isolated(tiny):
    labels = jnp.array([0, 1, 2, 3])
    direction = jax.random.normal(jax.random.key(2), (4, 128))

    def losses(params):
        out, _ = tiny.model.apply(
            {"params": params, "batch_stats": tiny.variables["batch_stats"]},
            tiny.x,
            train=True,
            mutable=["batch_stats"],
        )
        probe_loss = optax.softmax_cross_entropy_with_integer_labels(out["logits"], labels)
        return jnp.stack([probe_loss.mean(), jnp.sum(out["z"] * direction)])

    jacobian = jax.jit(jax.jacrev(losses))(tiny.variables["params"])

    def max_abs(loss_index, part):
        return max(float(jnp.max(jnp.abs(g[loss_index]))) for g in jax.tree.leaves(jacobian[part]))

    probe, contrastive = 0, 1
    assert max_abs(probe, "encoder") == 0.0
    assert max_abs(probe, "projection_head") == 0.0
    assert max_abs(probe, "linear_probe") > 0.0
    assert max_abs(contrastive, "linear_probe") == 0.0
    assert max_abs(contrastive, "encoder") > 0.0
    assert max_abs(contrastive, "projection_head") > 0.0


def test_linear_probe_stops_gradient():
    probe = LinearProbe(num_classes=3)
    h = jnp.ones((2, 4))
    variables = probe.init(jax.random.key(0), h)
    grad_h = jax.grad(lambda h: probe.apply(variables, h).sum())(h)
    np.testing.assert_array_equal(grad_h, 0.0)


def test_bfloat16_computation_keeps_float32_params_and_outputs(tiny):
    model = simclr_resnet(18, 1.0, "cifar", num_classes=5, base_width=4, dtype=jnp.bfloat16)
    initial = jax.eval_shape(lambda: model.init(jax.random.key(1), tiny.x, train=False))
    assert {leaf.dtype for leaf in jax.tree.leaves(initial)} == {jnp.dtype(jnp.float32)}

    for train in (True, False):
        out, updates = model.apply(tiny.variables, tiny.x, train=train, mutable=["batch_stats"])
        for value in out.values():
            assert value.dtype == jnp.float32
            assert np.all(np.isfinite(value))
        assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}

    # The computation really runs in bfloat16: close to, but not equal to, float32.
    h_bf16 = model.apply(tiny.variables, tiny.x, train=False)["h"]
    h_f32 = tiny.model.apply(tiny.variables, tiny.x, train=False)["h"]
    relative_error = np.linalg.norm(h_bf16 - h_f32) / np.linalg.norm(h_f32)
    assert 0 < relative_error < 0.05


# ----------------------------------------------------------------------------- layers


def test_the_network_computes_with_the_layers_it_is_given(tiny):
    """Every convolution and every training-mode batch norm goes through ``layers``; the default
    is XLA's own, and the parameters do not depend on the choice."""
    assert tiny.encoder.layers == XLA_LAYERS == Layers()
    assert XLA_LAYERS.conv_general_dilated is lax.conv_general_dilated
    assert XLA_LAYERS.batch_norm_train is batch_norm_train
    convs, norms = [], []

    def conv(*args, **kwargs):
        convs.append(args[2])  # window strides
        return lax.conv_general_dilated(*args, **kwargs)

    def norm(x, scale, bias, residual, relu, epsilon, dtype):
        norms.append((residual is not None, relu))
        return batch_norm_train(x, scale, bias, residual, relu, epsilon, dtype)

    layers = Layers(name="spy", conv_general_dilated=conv, batch_norm_train=norm)
    model = simclr_resnet(18, 1.0, "cifar", num_classes=5, base_width=4, layers=layers)
    assert model.encoder.layers is layers
    variables = jax.eval_shape(lambda: model.init(INIT_KEY, tiny.x, train=False))
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, tiny.variables)
    assert len(convs) == 21 and norms == []  # 1 stem + 8 blocks x 2 + 4 shortcuts; eval BN
    convs.clear()
    jax.eval_shape(
        lambda v: model.apply(v, tiny.x, train=True, mutable=["batch_stats"]), tiny.variables
    )
    assert len(convs) == 21 and convs.count((2, 2)) == 6  # groups 2-4: 3x3/2 and shortcut/2
    # Stem and first BNs with a ReLU, shortcut BNs alone, each block's last with its residual.
    assert sorted(norms) == sorted([(False, True)] * 9 + [(False, False)] * 4 + [(True, True)] * 8)
    # The network's numbers are those of the functions it is given.
    h = model.apply(tiny.variables, tiny.x, train=False)["h"]
    np.testing.assert_array_equal(h, tiny.model.apply(tiny.variables, tiny.x, train=False)["h"])


# ----------------------------------------------------------------------------- validation


def test_invalid_depth_names_the_valid_depths():
    with pytest.raises(ValueError, match=r"\[18, 34, 50, 101, 152, 200\]"):
        ResNet(depth=19)
    with pytest.raises(ValueError, match=r"\[18, 34, 50, 101, 152, 200\]"):
        resnet_feature_dim(19)


def test_invalid_stem_names_the_valid_stems():
    with pytest.raises(ValueError, match=r"\['imagenet', 'cifar'\]"):
        ResNet(stem="mnist")


def test_invalid_width_and_classes():
    with pytest.raises(ValueError, match="at least 1"):
        ResNet(base_width=1, width_multiplier=0.25)
    with pytest.raises(ValueError, match="num_classes"):
        SimCLR(encoder=ResNet(), projection_head=ProjectionHead(), num_classes=0)


def test_projection_head_keep_layers_stops_after_the_hidden_layers():
    h = jax.random.normal(jax.random.key(0), (4, 6))
    variables = ProjectionHead(num_layers=3, output_dim=5).init(jax.random.key(1), h, train=False)
    kept = ProjectionHead(num_layers=3, output_dim=5, keep_layers=1)
    subset = {
        collection: {name: tree[name] for name in ("dense_0", "bn_0") if name in tree}
        for collection, tree in variables.items()
    }
    assert jax.tree.structure(kept.init(jax.random.key(1), h, train=False)) == jax.tree.structure(
        subset
    )
    # Layer 0 in inference mode with fresh BN statistics (mean 0, variance 1): relu(h W / √(1+ε)).
    expected = jax.nn.relu(h @ subset["params"]["dense_0"]["kernel"] / np.sqrt(1 + 1e-5))
    np.testing.assert_allclose(kept.apply(subset, h, train=False), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        ProjectionHead(num_layers=2, keep_layers=0).apply({}, h, train=False), h
    )
    with pytest.raises(ValueError, match="keep_layers"):
        ProjectionHead(num_layers=2, keep_layers=2)


# ----------------------------------------------------------------------------- SimCLRv2: SK and SE

SK = 0.0625  # the ratio of SimCLRv2's models (the official code's recommended `sk_ratio`)


def _shapes(module, image_size: int, channels: int = 3):
    """(h, variables, intermediates) of ``module.init`` on zeros, as shapes only."""
    x = jnp.zeros((2, image_size, image_size, channels))
    h, variables = jax.eval_shape(
        lambda: module.init_with_output(
            jax.random.key(0), x, train=False, capture_intermediates=True
        )
    )
    return h, variables, variables.pop("intermediates")


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize(("sk_ratio", "se_ratio"), [(SK, 0.0), (0.0, SK), (SK, SK)])
def test_sk_and_se_output_shapes_and_modules(depth, sk_ratio, se_ratio):
    model = ResNet(depth=depth, base_width=8, sk_ratio=sk_ratio, se_ratio=se_ratio)
    h, variables, intermediates = _shapes(model, 64)  # 64 -> 32 -> pool 16 -> 16, 8, 4, 2
    assert h.shape == (2, resnet_feature_dim(depth, base_width=8))
    last_block = "group4_block2" if depth == 18 else "group4_block3"
    (last_map,) = intermediates[last_block]["__call__"]
    assert last_map.shape == (2, 2, 2, h.shape[-1])
    params = variables["params"]
    # SK: the three-conv stem (ResNet-D) whatever the depth; SK units in bottleneck blocks only.
    stem = sorted(name for name in params if name.startswith("stem_"))
    assert stem == (
        ["stem_bn1", "stem_bn2", "stem_bn3", "stem_conv1", "stem_conv2", "stem_conv3"]
        if sk_ratio
        else ["stem_bn", "stem_conv"]
    )
    blocks = [params[name] for name in params if "_block" in name]
    assert all(("sk" in block) == (sk_ratio > 0 and depth == 50) for block in blocks)
    assert all(("se" in block) == (se_ratio > 0) for block in blocks)


def test_sk_and_se_parameter_shapes():
    """Widths of SK and SE in a bottleneck block of inner width f = 64, as in the official code:
    SK reduces to max(int(f * sk_ratio), 32), SE to max(1, int(f * se_ratio)) (f, not 4f)."""
    _, variables, _ = _shapes(ResNet(depth=50, sk_ratio=SK, se_ratio=SK), 64)
    params = variables["params"]
    shapes = {
        "/".join(path): leaf.shape for path, leaf in traverse_util.flatten_dict(params).items()
    }
    assert shapes["stem_conv1/kernel"] == (3, 3, 3, 32)
    assert shapes["stem_conv2/kernel"] == (3, 3, 32, 32)
    assert shapes["stem_conv3/kernel"] == (3, 3, 32, 64)
    block = {k.split("/", 1)[1]: v for k, v in shapes.items() if k.startswith("group1_block1/")}
    assert block == {
        "shortcut_conv/kernel": (1, 1, 64, 256),
        "shortcut_bn/scale": (256,),
        "shortcut_bn/bias": (256,),
        "conv1/kernel": (1, 1, 64, 64),
        "bn1/scale": (64,),
        "bn1/bias": (64,),
        "sk/conv/kernel": (3, 3, 64, 128),  # both 3x3 paths in one convolution
        "sk/bn/scale": (128,),
        "sk/bn/bias": (128,),
        "sk/reduce_conv/kernel": (1, 1, 64, 32),  # int(64 * 0.0625) = 4 < min_dim 32
        "sk/reduce_bn/scale": (32,),
        "sk/reduce_bn/bias": (32,),
        "sk/expand_conv/kernel": (1, 1, 32, 128),
        "conv3/kernel": (1, 1, 64, 256),
        "bn3/scale": (256,),
        "bn3/bias": (256,),
        "se/reduce_conv/kernel": (1, 1, 256, 4),  # int(64 * 0.0625) = 4
        "se/reduce_conv/bias": (4,),
        "se/expand_conv/kernel": (1, 1, 4, 256),
        "se/expand_conv/bias": (256,),
    }
    assert shapes["group4_block1/sk/reduce_conv/kernel"] == (1, 1, 512, 32)  # int(512/16) = 32


@pytest.mark.parametrize(
    ("depth", "width", "exact", "millions"),
    [
        (50, 1, 23_508_032, 24),
        (50, 1, 35_215_584, 35),
        (50, 2, 140_306_048, 140),
        (101, 1, 64_662_304, 65),
        (152, 1, 88_940_896, 89),
    ],
    ids=["r50_1x", "r50_1x_sk", "r50_2x_sk", "r101_1x_sk", "r152_1x_sk"],
)
def test_simclrv2_parameter_counts_match_the_official_table(depth, width, exact, millions):
    """The official SimCLRv2 README (github.com/google-research/simclr, "Pre-trained models for
    SimCLRv2", the SimCLRv2 paper's Table 1) gives the encoder's parameters in millions only:
    ResNet-50 1x 24M without SK and 35M with SK; ResNet-50 2x SK 140M; ResNet-101 1x SK 65M;
    ResNet-152 1x SK 89M. They count the encoder alone (no projection head, no classifier): the
    counts pinned here are this model's exact encoder parameters, and each rounds to the table's
    figure. The r50_1x row is the plain ResNet-50 (sk_ratio 0)."""
    sk_ratio = 0.0 if (depth, exact) == (50, 23_508_032) else SK
    count = _param_count(ResNet(depth=depth, width_multiplier=width, sk_ratio=sk_ratio))
    assert count == exact
    assert round(count / 1e6) == millions


def test_ratios_default_to_off_and_negative_ratios_are_refused():
    # With both ratios 0 the model is the plain ResNet (tests/test_configs.py pins its tree).
    assert ResNet(depth=50, sk_ratio=0.0, se_ratio=0.0) == ResNet(depth=50)
    for name in ("sk_ratio", "se_ratio"):
        for bad in (-0.0625, math.nan, math.inf):
            with pytest.raises(ValueError, match=rf"^{name} must be .* got {bad!r}\.$"):
                ResNet(**{name: bad})


def _eval_bn(x, variables, name):
    return _numpy_bn(
        x,
        variables["batch_stats"][name]["mean"],
        variables["batch_stats"][name]["var"],
        variables["params"][name]["scale"],
        variables["params"][name]["bias"],
    )


def test_selective_kernel_and_squeeze_excite_match_numpy():
    """The SK unit and SE, in eval mode with random statistics, against their formulas."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(3, 5, 5, 4)).astype(np.float32)
    conv = functools.partial(
        _conv, dtype=jnp.float32, conv_general_dilated=lax.conv_general_dilated
    )
    norm = functools.partial(BatchNorm, use_running_average=True)
    sk = SelectiveKernel(filters=3, strides=2, sk_ratio=1.0, conv=conv, norm=norm, min_dim=2)
    variables = sk.init(INIT_KEY, x)
    # Random BN statistics, scales and biases (1-D leaves); the kernels stay as initialised.
    variables = jax.tree.map(
        lambda v: v + rng.uniform(0.5, 1.5, v.shape).astype(v.dtype) if v.ndim == 1 else v,
        variables,
    )
    p = variables["params"]
    y = np.maximum(
        _eval_bn(_numpy_conv(x, np.asarray(p["conv"]["kernel"]), 2, 1), variables, "bn"), 0
    )
    a, b = y[..., :3], y[..., 3:]
    pooled = (a + b).mean(axis=(1, 2), keepdims=True)
    hidden = np.maximum(
        _eval_bn(pooled @ p["reduce_conv"]["kernel"][0, 0], variables, "reduce_bn"), 0
    )
    assert p["reduce_conv"]["kernel"].shape[-1] == 3  # max(int(3 * 1.0), 2)
    logits = hidden @ p["expand_conv"]["kernel"][0, 0]
    weights = np.exp(np.stack([logits[..., :3], logits[..., 3:]]))
    weight_a = weights[0] / weights.sum(axis=0)  # softmax over the two paths, channel by channel
    assert weight_a.min() > 0.01 and weight_a.max() < 0.99  # both paths matter
    expected = weight_a * a + (1 - weight_a) * b
    np.testing.assert_allclose(sk.apply(variables, x), expected, rtol=1e-5, atol=1e-6)

    se = SqueezeExcite(hidden=2, conv=conv)
    se_params = se.init(INIT_KEY, x)["params"]
    squeezed = np.maximum(
        x.mean(axis=(1, 2), keepdims=True) @ se_params["reduce_conv"]["kernel"][0, 0]
        + se_params["reduce_conv"]["bias"],
        0,
    )
    gate = 1 / (
        1
        + np.exp(
            -(
                squeezed @ se_params["expand_conv"]["kernel"][0, 0]
                + se_params["expand_conv"]["bias"]
            )
        )
    )
    np.testing.assert_allclose(se.apply({"params": se_params}, x), x * gate, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("size", "stride"), [(5, 2), (4, 2), (4, 1)])
def test_resnet_d_shortcut_average_pools_like_the_official_code(size, stride):
    """With SK, a projection shortcut averages 2x2 windows before its 1x1 convolution: at stride 2
    over the input with a zero row and column appended (counted in the average, as the official
    fixed padding + VALID pooling does); at stride 1 with TF's "SAME" (padding left out)."""
    x = np.random.default_rng(1).uniform(size=(2, size, size, 3)).astype(np.float32)
    block = BasicBlock(
        filters=3,
        strides=stride,
        project_shortcut=True,
        conv=functools.partial(
            _conv, dtype=jnp.float32, conv_general_dilated=lax.conv_general_dilated
        ),
        norm=functools.partial(BatchNorm, use_running_average=True),
        sk_ratio=SK,
    )
    variables = block.init(INIT_KEY, x)
    _, state = block.apply(variables, x, capture_intermediates=True)
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    windows = padded[:, :-1, :-1] + padded[:, 1:, :-1] + padded[:, :-1, 1:] + padded[:, 1:, 1:]
    if stride == 2:
        pooled = windows[:, ::2, ::2] / 4
    else:
        ones = np.pad(np.ones((size, size)), ((0, 1), (0, 1)))
        counts = ones[:-1, :-1] + ones[1:, :-1] + ones[:-1, 1:] + ones[1:, 1:]
        pooled = windows / counts[None, :, :, None]
    kernel = np.asarray(variables["params"]["shortcut_conv"]["kernel"][0, 0])
    expected = _eval_bn(pooled @ kernel, variables, "shortcut_bn")
    (out,) = state["intermediates"]["shortcut_bn"]["__call__"]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def _sk_se_block_train(layers, mesh):
    """Output, BN statistics and parameter gradients of an SK + SE bottleneck block with a
    ResNet-D projection shortcut, in train mode, with the batch sharded over ``mesh``.

    One block rather than a whole SK ResNet-50: it holds every new layer (the SK unit with its
    batch norm over pooled [B, 1, 1, C] features, SE, the average-pooled shortcut) and compiles
    in seconds on CPU, where two compilations of the whole network's gradient take minutes.
    """
    conv = functools.partial(
        _conv, dtype=jnp.float32, conv_general_dilated=layers.conv_general_dilated
    )
    block = BottleneckBlock(
        filters=4,
        strides=2,
        project_shortcut=True,
        conv=conv,
        norm=functools.partial(
            BatchNorm, use_running_average=False, train_fn=layers.batch_norm_train
        ),
        sk_ratio=SK,
        se_ratio=0.5,
    )
    x = jax.random.uniform(jax.random.key(0), (8, 7, 7, 8))
    variables = jax.jit(block.init)(INIT_KEY, x)  # eager, each of its small ops would compile

    def loss(params, x):
        y, updates = block.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.sin(y)), (y, updates["batch_stats"])

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True), out_shardings=parallel.replicated(mesh))
    x = jax.device_put(x, parallel.batch_sharded(mesh))
    params = jax.device_put(variables["params"], parallel.replicated(mesh))
    (_, (y, stats)), grads = fn(params, x)
    return jax.device_get((y, stats, grads))


def _assert_trees_close(a, b):
    """Leaf by leaf, equal within float32 rounding of sums in another order (relative to each
    leaf's largest value)."""
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(
            u, v, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(v).max()))
        ),
        a,
        b,
    )


def test_sk_se_block_sharded_over_eight_devices_equals_one_device():
    """SK's and SE's pooled features and the SK unit's batch norms see the global batch when it
    is sharded: eight fake CPU devices give one device's numbers, forward and backward."""
    eight = _sk_se_block_train(XLA_LAYERS, parallel.data_mesh())
    one = _sk_se_block_train(XLA_LAYERS, parallel.data_mesh(jax.devices()[:1]))
    _assert_trees_close(eight, one)


def test_sk_se_block_with_the_cpu_kernels_equals_xla():
    """The CPU kernels (oneDNN convolutions, fused batch norm) also compute SK's and SE's 1x1
    convolutions and batch norms over 1x1 maps, with XLA's numbers."""
    skip_without_extension()
    mesh = parallel.data_mesh(jax.devices()[:1])
    _assert_trees_close(
        _sk_se_block_train(cpu.ONEDNN_LAYERS, mesh), _sk_se_block_train(XLA_LAYERS, mesh)
    )
