"""Flax models: ResNet encoders, the projection head, the online probe and the SimCLR network."""

from simclr_jax.models.heads import LinearProbe, ProjectionHead
from simclr_jax.models.layers import (
    CONV_PRECISIONS,
    XLA_LAYERS,
    Layers,
    check_conv_precision,
    with_conv_precision,
)
from simclr_jax.models.resnet import ResNet, resnet_feature_dim
from simclr_jax.models.simclr import SimCLR, simclr_resnet

__all__ = [
    "CONV_PRECISIONS",
    "XLA_LAYERS",
    "Layers",
    "LinearProbe",
    "ProjectionHead",
    "ResNet",
    "SimCLR",
    "check_conv_precision",
    "resnet_feature_dim",
    "simclr_resnet",
    "with_conv_precision",
]
