"""A few steps of a very small model on slices of Fashion-MNIST: for tests and smoke checks.

Run:  python -m simclr_jax.train --config=tiny --workdir=/tmp/simclr_tiny
Expect: finishes in well under a minute on a CPU; accuracies are meaningless.
"""

from simclr_jax.configs import default


def get_config():
    config = default.get_config()
    config.dataset = "fashion_mnist"
    config.train_split = "train[:256]"
    config.probe_train_split = "train[:256]"
    config.eval_split = "test[:100]"
    config.image_size = 16
    config.augment.color_jitter_strength = 0.5
    config.augment.blur_prob = 0.0
    config.model.depth = 18
    config.model.base_width = 4
    config.model.stem = "cifar"
    config.model.projection_dim = 16
    config.temperature = 0.5
    config.global_batch_size = 32
    config.epochs = 1
    config.warmup_epochs = 0.0
    config.num_train_steps = 8
    config.log_every_steps = 2
    config.checkpoint_every_steps = 4
    config.eval_batch_size = 64
    config.evaluation.knn_ks = (10,)
    config.shuffle_buffer = 256
    return config
