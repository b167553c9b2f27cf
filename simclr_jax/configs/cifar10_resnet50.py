"""CIFAR-10, ResNet-50 (CIFAR stem): the SimCLR paper's CIFAR-10 experiment (Appendix B.9).

The CIFAR-10 settings of `cifar10_resnet18.py` (32 px, colour strength 0.5, no blur, τ=0.5,
1000 epochs) with ResNet-50, B=1024 and weight decay 1e-6.

Run:   python -m simclr_jax.train --config=cifar10_resnet50 --workdir=workdirs/c10_r50
Needs: network access once (TFDS downloads cifar10), accelerators (B=1024, 1000 epochs).
Expect: linear evaluation 94.0% top-1 on the test split (paper App. B.9; supervised 95.1%).
"""

from simclr_jax.configs import cifar10_resnet18


def get_config():
    config = cifar10_resnet18.get_config()
    config.model.depth = 50
    config.weight_decay = 1e-6
    config.global_batch_size = 1024
    return config
