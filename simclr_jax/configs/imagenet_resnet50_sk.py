"""ImageNet (ILSVRC-2012), ResNet-50 1x with selective kernels: SimCLRv2's architecture.

`imagenet_resnet50` with SimCLRv2's two architecture changes: selective kernels with
`model.sk_ratio` 0.0625 (the official code's recommended value; it also brings the ResNet-D stem
and shortcuts, see README "SK and SE") and a 3-layer projection head (`model.projection_layers`
3, the SimCLRv2 paper's head). The optimisation stays that of `imagenet_resnet50` (100 epochs).
The encoder has 35,215,584 parameters (23,508,032 without SK).

Run:   python -m simclr_jax.train --config=imagenet_resnet50_sk --workdir=gs://.../r50_sk
Needs: imagenet2012 prepared for TFDS (manual download), a TPU pod slice or many GPUs.
Expect: the official SimCLRv2 README's table (google-research/simclr, "Pre-trained models for
SimCLRv2"; the SimCLRv2 paper's Table 1) gives 74.6% top-1 linear evaluation for ResNet-50 1x
with SK (71.7% without). That figure comes from SimCLRv2's own, longer pretraining schedule and
its MoCo-style memory of negatives, which this library does not have: expect less after the 100
epochs here; `--config.epochs` lengthens the run.
"""

from simclr_jax.configs import imagenet_resnet50


def get_config():
    config = imagenet_resnet50.get_config()
    config.model.sk_ratio = 0.0625
    config.model.projection_layers = 3
    return config
