"""Every shipped config loads by name and by path, and its model, augmentation and optimiser can
be built; so does the repository's example of a user's own recipe."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from simclr_jax import configs, experiment, optim

EXAMPLE_RECIPE = Path(__file__).resolve().parent.parent / "configs" / "my_recipe.py"


def test_every_recipe_is_listed():
    assert {"default", "fashion_mnist", "tiny", "cifar10_resnet18", "cifar10_resnet50"} <= set(
        configs.names()
    )
    assert {"stl10_resnet18", "imagenet_resnet50"} <= set(configs.names())


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
