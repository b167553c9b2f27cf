"""CIFAR-10, ResNet-50 (CIFAR stem): the SimCLR paper's CIFAR-10 experiment (Appendix B.9).

Run:   python -m simclr_jax.train --config=configs/cifar10_resnet50.py --workdir=workdirs/c10_r50
Needs: network access once (TFDS downloads cifar10), accelerators (B=1024, 1000 epochs).
Expect: linear evaluation 94.0% top-1 on the test split (paper App. B.9; supervised 95.1%).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.dataset = "cifar10"
    config.image_size = 32
    config.augment.color_jitter_strength = 0.5
    config.augment.blur_prob = 0.0  # 32 px: no blur
    config.model.depth = 50
    config.model.stem = "cifar"
    config.temperature = 0.5
    config.base_learning_rate = 1.0
    config.weight_decay = 1e-6
    config.global_batch_size = 1024
    config.epochs = 1000
    return config
