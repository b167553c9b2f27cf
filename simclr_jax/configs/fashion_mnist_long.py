"""Fashion-MNIST with more compute: the fashion_mnist recipe on a ResNet-18 twice as wide (h has
256 features instead of 128), with bfloat16 convolutions, for 12 epochs instead of 4, sized to
finish inside 2 hours on 2 CPU cores with AVX512-BF16 (README, Results, for the measured time).

Run:   python -m simclr_jax.train --config=fashion_mnist_long --workdir=workdirs/fashion_mnist_long
Curve: add --config.eval_every_steps=469 --config.eval_linear_probe=True (an evaluation every
       2 epochs), then python -m simclr_jax.evaluate --workdir=... --protocol=pictures draws
       eval/quality_vs_time.png.
Why wider rather than only longer: on the validation split, fashion_mnist's linear probe stops
rising after 2 epochs when it trains for 8 (README, Results), which points at the width of h.
Why bfloat16: on a CPU with AVX512-BF16 its convolutions (products in bfloat16, sums in float32)
make this network's step fast enough for 12 epochs in less time than 8 in float32
(docs/fashion_mnist_recipe.md, thirteenth round). Without AVX-512, oneDNN has no bfloat16
convolutions and XLA's are used: --config.model.conv_precision=float32 --config.epochs=8 (the
recipe's previous float32 version at today's colour jitter) is the closest recipe there.
Expect: the README's "fashion_mnist_long" figures (Results), measured with the curve command on
the validation split, then on the test split from the same checkpoint.
"""

from simclr_jax.configs import fashion_mnist


def get_config():
    config = fashion_mnist.get_config()
    config.model.base_width = 32
    config.model.conv_precision = "bfloat16"
    config.epochs = 12
    return config
