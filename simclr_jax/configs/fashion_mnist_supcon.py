"""Fashion-MNIST, supervised contrastive (SupCon, Khosla et al. 2020) instead of NT-Xent.

The Fashion-MNIST recipe with `objective = "supcon"`: every other view of the same class in the
global batch is a positive of an anchor, so the encoder is trained with the train split's labels
(it is no longer self-supervised). Everything else is `fashion_mnist` as it was measured against
(ResNet-18 at base width 16, 4 epochs, B=256, Nesterov SGD, τ = 0.2:
`get_config_before_eighth_round`), so a run compares with it on the objective alone. The probes
and kNN are evaluated as for every recipe.
Run:   python -m simclr_jax.train --config=fashion_mnist_supcon \\
         --workdir=workdirs/fashion_mnist_supcon
Expect: the README's "Supervised contrastive (SupCon)" section (measured with the command above,
seed 0, beside `fashion_mnist` at the same seed).
"""

from simclr_jax.configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config_before_eighth_round()  # what its figures were measured with
    config.objective = "supcon"
    return config
