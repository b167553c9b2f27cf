"""Fashion-MNIST with multi-crop (SwAV, Caron et al. 2020): the fashion_mnist recipe plus four
small 14-pixel views of each image beside its two 28-pixel views, for the same pretraining time.

Run:  python -m simclr_jax.train --config=fashion_mnist_multicrop \
          --workdir=workdirs/fashion_mnist_multicrop
Each small view is an anchor whose positives are its image's two large views
(`simclr_jax.losses.multi_crop_nt_xent`). The four small views add half the pixels of the two
large ones to every step, so the recipe trains 2.5 epochs where fashion_mnist trains 4, in about
the same time; everything else (model, optimiser, the large views' augmentation) is
fashion_mnist's as it was measured against (`get_config_before_eighth_round`), so the two
runs compare multi-crop at equal wall time.
Evaluate: python -m simclr_jax.evaluate --workdir=workdirs/fashion_mnist_multicrop
Expect: the README's Multi-crop section (seed 0, beside fashion_mnist at the same seed).
"""

from simclr_jax.configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config_before_eighth_round()  # what its figures were measured with
    config.augment.num_small_crops = 4
    config.augment.small_crop_size = 14  # half the 28 px side
    config.augment.small_crop_area = (0.05, 0.14)  # SwAV's small-crop range
    config.epochs = 2.5  # fashion_mnist's 4 epochs take about as long without small views
    return config
