"""Every shipped config loads by name and by path, and its model, augmentation and optimiser can
be built; so does the repository's example of a user's own recipe."""

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from simclr_jax import benchmark, configs, experiment, optim, parallel
from simclr_jax.data import pipeline
from simclr_jax.models import resnet_feature_dim

EXAMPLE_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "my_recipe.py"


def test_every_recipe_is_listed():
    assert {"default", "fashion_mnist", "tiny", "cifar10_resnet18", "cifar10_resnet50"} <= set(
        configs.names()
    )
    assert {"stl10_resnet18", "imagenet_resnet50", "imagenet_resnet50_sk"} <= set(configs.names())
    assert {"fashion_mnist_multicrop", "fashion_mnist_long"} <= set(configs.names())


def drop_the_settings_pinned_before_the_eighth_round(recipe, base):
    """Recipes measured before fashion_mnist's eighth round keep its crop floor, head and colour
    jitter."""
    assert (recipe.augment.crop_area_min, base.augment.crop_area_min) == (0.4, 0.6)
    assert (recipe.model.projection_layers, base.model.projection_layers) == (2, 3)
    assert (recipe.augment.color_jitter_strength, base.augment.color_jitter_strength) == (0.5, 2.0)
    for config in (recipe, base):
        del config.augment.crop_area_min, config.model.projection_layers
        del config.augment.color_jitter_strength


def test_multi_crop_recipe_is_fashion_mnist_plus_small_crops_for_the_same_time():
    recipe, base = configs.load("fashion_mnist_multicrop"), configs.load("fashion_mnist")
    assert recipe.augment.num_small_crops == 4 and base.augment.num_small_crops == 0
    assert (recipe.epochs, base.epochs) == (2.5, 4)
    del recipe.epochs, base.epochs
    augment_config = experiment.augment_config(recipe, recipe.image_size)
    assert (augment_config.num_small_crops, augment_config.small_crop_size) == (4, 14)
    assert augment_config.small_crop_area_range == (0.05, 0.14)
    for name in ("num_small_crops", "small_crop_size", "small_crop_area"):
        del recipe.augment[name], base.augment[name]
    drop_the_settings_pinned_before_the_eighth_round(recipe, base)
    assert recipe.to_dict() == base.to_dict()


def test_long_recipe_is_fashion_mnist_twice_as_wide_in_bfloat16_for_three_times_the_epochs():
    recipe, base = configs.load("fashion_mnist_long"), configs.load("fashion_mnist")
    assert (recipe.model.base_width, base.model.base_width) == (32, 16)
    assert (recipe.model.conv_precision, base.model.conv_precision) == ("bfloat16", "float32")
    assert (recipe.epochs, base.epochs) == (12, 4)
    h_features = {
        name: resnet_feature_dim(c.model.depth, c.model.width_multiplier, c.model.base_width)
        for name, c in (("recipe", recipe), ("base", base))
    }
    for config in (recipe, base):
        del config.model.base_width, config.model.conv_precision, config.epochs
    assert recipe.to_dict() == base.to_dict()
    assert h_features == {"recipe": 256, "base": 128}


@pytest.mark.parametrize("name", [*configs.names(), str(EXAMPLE_RECIPE)])
def test_recipe_builds(name):
    config = configs.load(name)
    image_size = config.image_size or 28
    model = experiment.build_model(config, num_classes=10)
    experiment.augment_config(config, image_size)  # validates the augmentation fields
    optim.create_optimizer(config.optimizer, 0.1, weight_decay=config.weight_decay)
    optim.scaled_learning_rate(
        config.base_learning_rate, config.global_batch_size, config.learning_rate_scaling
    )
    channels = 1 if config.dataset == "fashion_mnist" else 3
    images = jnp.zeros((2, image_size, image_size, channels))
    outputs = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    assert outputs["params"]["linear_probe"]["dense"]["kernel"].shape[-1] == 10
    assert config.global_batch_size % 8 == 0 and config.eval_batch_size % 8 == 0


def test_a_config_by_name_or_path_is_the_same_file_and_values(tmp_path, monkeypatch):
    by_name = configs.config_path("fashion_mnist")
    assert configs.config_path("fashion_mnist.py") == by_name
    monkeypatch.chdir(tmp_path)  # no checkout around: the shipped file is found all the same
    assert configs.load(by_name).to_dict() == configs.load("fashion_mnist").to_dict()
    assert configs.load(str(EXAMPLE_RECIPE)).model.base_width == 32


def test_unknown_config_and_a_file_without_get_config_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"no config 'fashon_mnist'.*fashion_mnist"):
        configs.load("fashon_mnist")
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(ValueError, match="has no get_config"):
        configs.load(str(empty))


@pytest.mark.parametrize(
    ("name", "image_shape", "digest"),
    [
        (
            "default",
            (224, 224, 3),
            "e046f6dd5e537878ac048ca4271bdb45d7a43d5b52e98e8104380b4341db2ad3",
        ),
        ("tiny", (28, 28, 1), "3b3b4d3fee885e2bcb6699beb98cb0a92f931d87afbddcda9481ce671abc0130"),
    ],
    ids=["default", "tiny"],
)
def test_configs_without_sk_or_se_build_the_variables_they_always_had(name, image_shape, digest):
    """``model.sk_ratio = model.se_ratio = 0`` (the default) adds nothing: every variable's path
    and shape hash to what the model gave before these fields existed (computed then), so
    existing checkpoints still restore."""
    config = configs.load(name)
    assert config.model.sk_ratio == config.model.se_ratio == 0.0
    model = experiment.build_model(config, num_classes=10)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((2, *image_shape)), train=False)
    )
    text = "\n".join(
        f"{'/'.join(path)}:{tuple(leaf.shape)}"
        for path, leaf in sorted(traverse_util.flatten_dict(variables).items())
    )
    assert hashlib.sha256(text.encode()).hexdigest() == digest


@pytest.mark.parametrize("zero_init", [True, False])
def test_zero_init_residual_reaches_the_encoder(zero_init):
    config = configs.load("fashion_mnist")
    assert config.model.zero_init_residual  # the official code's initialisation by default
    config.model.zero_init_residual = zero_init
    model = experiment.build_model(config, num_classes=10)
    assert model.encoder.zero_init_residual is zero_init


def test_the_sk_recipe_builds_simclrv2s_encoder():
    config = configs.load("imagenet_resnet50_sk")
    assert (config.model.sk_ratio, config.model.se_ratio) == (0.0625, 0.0)
    assert config.model.projection_layers == 3
    model = experiment.build_model(config, num_classes=10)
    assert (model.encoder.sk_ratio, model.encoder.se_ratio) == (0.0625, 0.0)
    info = pipeline.DatasetInfo("imagenet2012", 1_281_167, 1000, (None, None, 3))
    setup = benchmark.setup_from_config(config, info)  # the benchmark times the SK network too
    assert (setup.sk_ratio, setup.se_ratio) == (0.0625, 0.0)


def test_checkpoints_record_sk_se_and_the_objective_only_when_not_simclrs():
    """A checkpoint must match the run's ``compatibility()`` (``resume_compatibility()`` to resume
    training); the ratios and the objective enter them only when they differ from SimCLR's, so
    checkpoints written before these fields existed still restore, and a SimCLR run does not
    resume as a SupCon one."""
    imagenet = pipeline.DatasetInfo("imagenet2012", 1_281_167, 1000, (None, None, 3))
    fashion_mnist = pipeline.DatasetInfo("fashion_mnist", 60_000, 10, (28, 28, 1))
    mesh = parallel.data_mesh(jax.devices()[:1])
    compatibility = {}
    for name, info in (
        ("imagenet_resnet50", imagenet),
        ("imagenet_resnet50_sk", imagenet),
        ("fashion_mnist", fashion_mnist),
        ("fashion_mnist_supcon", fashion_mnist),
    ):
        config = configs.load(name)
        config.model.conv_impl = "xla"
        run = experiment.Experiment(config, mesh, dataset_info=info)
        compatibility[name] = run.compatibility()
        compatibility[f"{name} resumed"] = run.resume_compatibility()
    # Evaluation needs the parameters only; resuming also needs the same loss. The SupCon recipe
    # keeps the 2-layer head fashion_mnist had when it was measured.
    supcon_parameters = {**compatibility["fashion_mnist"], "projection_layers": 2}
    assert compatibility["fashion_mnist_supcon"] == supcon_parameters
    assert compatibility["fashion_mnist resumed"] == compatibility["fashion_mnist"]
    assert compatibility["fashion_mnist_supcon resumed"] == {
        **supcon_parameters,
        "objective": "supcon",
    }
    assert "projection_hidden_dim" not in compatibility["fashion_mnist"]
    # How convolutions are computed and how parameters start are not recorded: the parameters
    # are the same.
    assert not {"conv_impl", "conv_precision", "zero_init_residual"} & set(
        compatibility["fashion_mnist"]
    )
    assert "sk_ratio" not in compatibility["imagenet_resnet50"]
    assert "se_ratio" not in compatibility["imagenet_resnet50"]
    assert compatibility["imagenet_resnet50_sk"]["sk_ratio"] == 0.0625
    assert "se_ratio" not in compatibility["imagenet_resnet50_sk"]


@pytest.mark.parametrize("hidden_dim, expected", [(0, 128), (512, 512)])
def test_projection_hidden_dim_sets_the_heads_hidden_width(hidden_dim, expected):
    """0 keeps the official head (hidden width = d of h, 128 for fashion_mnist); a width enters
    the run's compatibility record, so a checkpoint of the other head is refused."""
    config = configs.load("fashion_mnist")
    config.model.conv_impl = "xla"
    config.model.projection_hidden_dim = hidden_dim
    info = pipeline.DatasetInfo("fashion_mnist", 60_000, 10, (28, 28, 1))
    run = experiment.Experiment(config, parallel.data_mesh(jax.devices()[:1]), dataset_info=info)
    head = run.initial_state(0).params["projection_head"]
    assert head["dense_0"]["kernel"].shape == (128, expected)
    last = head[f"dense_{config.model.projection_layers - 1}"]
    assert last["kernel"].shape == (expected, config.model.projection_dim)
    assert run.compatibility().get("projection_hidden_dim", 0) == hidden_dim
