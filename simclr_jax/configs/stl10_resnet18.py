"""STL-10, ResNet-18 at 96 px, pretrained on the 100k `unlabelled` split.

Run:   python -m simclr_jax.train --config=stl10_resnet18 --workdir=workdirs/stl10_r18
Needs: network access once (TFDS downloads stl10, 2.6 GB), an accelerator.
Expect: logistic regression on frozen features with all 500 labels per class ≈81% top-1
(10/20/50/100/200/500 labels per class: 62.2/68.5/73.7/76.8/79.0/81.1%, a published JAX
tutorial's ResNet-18 after 500 epochs with the same protocol).
"""

from simclr_jax.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "stl10"
    config.train_split = "unlabelled"  # labels are -1: the online probe ignores them
    config.probe_train_split = "train"
    config.image_size = 96
    config.cache = False
    config.augment.color_jitter_strength = 0.625  # brightness/contrast/saturation ±0.5
    config.model.depth = 18
    config.model.stem = "imagenet"
    config.temperature = 0.07
    config.optimizer = "adamw"
    config.base_learning_rate = 5e-4  # linear scaling from B=256
    config.weight_decay = 1e-4
    config.global_batch_size = 256
    config.epochs = 500
    config.warmup_epochs = 10.0
    return config
