"""CIFAR-10, ResNet-18 (CIFAR stem): the official SimCLR repository's CIFAR-10 recipe.

Run:   python -m simclr_jax.train --config=cifar10_resnet18 --workdir=workdirs/c10_r18
Needs: network access once (TFDS downloads cifar10), an accelerator for the 1000 epochs.
Expect: linear evaluation ≈91% top-1 on the test split after 1000 epochs (official README recipe;
solo-learn reports 90.7%); ≈85% after 100 epochs at B=1024.
"""

from simclr_jax.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "cifar10"
    config.image_size = 32
    config.augment.color_jitter_strength = 0.5
    config.augment.blur_prob = 0.0  # 32 px: no blur
    config.model.depth = 18
    config.model.stem = "cifar"
    config.temperature = 0.5
    config.base_learning_rate = 1.0  # linear scaling: 1.0 × 512/256 = 2.0
    config.weight_decay = 1e-4
    config.global_batch_size = 512
    config.epochs = 1000
    config.cache = True
    return config
