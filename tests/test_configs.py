"""Every recipe in configs/ loads, and its model, augmentation and optimiser can be built."""

import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from simclr_jax import optim, trainer

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")


def test_every_recipe_is_listed():
    assert {"default", "fashion_mnist", "tiny", "cifar10_resnet18", "cifar10_resnet50"} <= set(
        RECIPES
    )
    assert {"stl10_resnet18", "imagenet_resnet50"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    image_size = config.image_size or 28
    model = trainer.build_model(config, num_classes=10)
    trainer.augment_config(config, image_size)  # validates the augmentation fields
    optim.create_optimizer(config.optimizer, 0.1, weight_decay=config.weight_decay)
    optim.scaled_learning_rate(
        config.base_learning_rate, config.global_batch_size, config.learning_rate_scaling
    )
    channels = 1 if config.dataset == "fashion_mnist" else 3
    images = jnp.zeros((2, image_size, image_size, channels))
    outputs = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    assert outputs["params"]["linear_probe"]["dense"]["kernel"].shape[-1] == 10
    assert config.global_batch_size % 8 == 0 and config.eval_batch_size % 8 == 0
