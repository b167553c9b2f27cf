"""Fashion-MNIST hybrid autoencoder: NT-Xent + λ·MSE with a decoder on h (SPEC §7).

The Fashion-MNIST recipe plus a transposed-convolution decoder reconstructing each view's
un-augmented input image from its representation h, trained for 2 epochs (the budget its
comparison below was measured at; fashion_mnist.py itself trains 4). Everything else is
unchanged, so a run compares with `fashion_mnist --config.epochs=2` on the reconstruction term
alone; the article's ±15° random rotation is one flag away: --config.augment.rotation_degrees=15.
Run:   python -m simclr_jax.train --config=fashion_mnist_hybrid \\
         --workdir=workdirs/fashion_mnist_hybrid
Writes reconstructions.png (inputs above their reconstructions) in the workdir.
Expect: docs/hybrid.md (measured against plain fashion_mnist at 2 epochs, with the λ sweep).
"""

from simclr_jax.configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config_before_eighth_round()  # SimCLR's 2-layer head
    config.epochs = 2
    # The optimiser and crop floor docs/hybrid.md's comparison was measured with (as
    # fashion_mnist then: LARS, crops of at least 20% of the image).
    config.optimizer = "lars"
    config.base_learning_rate = 1.0
    config.weight_decay = 1e-5
    config.augment.crop_area_min = 0.2
    config.hybrid.decoder = "ae"
    config.hybrid.target = "input"
    config.hybrid.reconstruction_weight = 1.0
    # Half the encoder's base width: at the default 32 channels the decoder would cost about
    # five times the base-width-16 ResNet-18's step on a CPU.
    config.hybrid.decoder_channels = 8
    return config
