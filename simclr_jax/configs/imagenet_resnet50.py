"""ImageNet (ILSVRC-2012), ResNet-50: the SimCLR paper's default pretraining.

B=4096, LARS with lr 0.3×B/256 = 4.8, weight decay 1e-6, 100 epochs with 10 warm-up epochs,
τ=0.1, colour strength 1.0, blur, 224 px; eval: centre crop 87.5%.

Run:   python -m simclr_jax.train --config=imagenet_resnet50 --workdir=gs://.../r50
Needs: imagenet2012 prepared for TFDS (manual download), a TPU pod slice or many GPUs.
Expect: linear evaluation ≈64.6% top-1 after 100 epochs (paper Table B.1); 69.3% after 1000
epochs (paper Table 6: `--config.epochs=1000`).
"""

from simclr_jax.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "imagenet2012"
    config.eval_split = "validation"
    config.image_size = 224
    config.eval_center_crop = 0.875
    config.cache = False
    config.model.depth = 50
    config.model.stem = "imagenet"
    config.temperature = 0.1
    config.base_learning_rate = 0.3
    config.weight_decay = 1e-6
    config.global_batch_size = 4096
    config.epochs = 100
    config.warmup_epochs = 10.0
    config.eval_batch_size = 4096
    return config
