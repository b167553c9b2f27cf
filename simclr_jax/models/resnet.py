"""ResNet v1 encoders (post-activation) as used by SimCLR, in Flax linen.

The architecture follows the official SimCLR TF2 ResNet:

- a projection shortcut (1x1 conv with the block's stride, then BN) on the first block of every
  group, including the first group of ResNet-18/34 where torchvision keeps an identity shortcut
  (so ResNet-18/34 have 64*64 + 2*64 = 4,224 more parameters than torchvision's);
- bottleneck blocks put the stride on the 3x3 convolution;
- the last BN of every residual branch starts with scale 0, so each block starts as its shortcut;
- convolutions have no bias and use symmetric "fixed" padding of (k-1)/2 pixels on each side
  (identical to "SAME" at stride 1, and to torchvision's padding at stride 2);
- convolution kernels use the official initialiser, Keras' default `VarianceScaling()`: scale 1,
  fan-in, truncated normal (the same as Flax's `lecun_normal`, not He's scale-2 variant);
- BN: moving = momentum * moving + (1 - momentum) * batch, with momentum 0.9 and eps 1e-5; each
  BN is one layer with the ReLU and residual add after it (`batch_norm.BatchNorm`, the variables
  and numbers of `flax.linen.BatchNorm`).

The network receives its kernels (`layers.Layers`: the convolution and batch-norm functions) and
never chooses them itself.

Batch norm is computed over the whole array it is given (`axis_name=None`). Under `jax.jit` with a
batch-sharded global array this is the global batch, which is what SimCLR needs; no collectives
are written here.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from simclr_jax.models.batch_norm import BatchNorm
from simclr_jax.models.layers import XLA_LAYERS, Layers

_CONV_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
_STEMS = ("imagenet", "cifar")
_GROUP_WIDTH_FACTORS = (1, 2, 4, 8)
_BOTTLENECK_EXPANSION = 4


class _Layout(NamedTuple):
    bottleneck: bool
    blocks_per_group: tuple[int, int, int, int]


_LAYOUTS: dict[int, _Layout] = {
    18: _Layout(False, (2, 2, 2, 2)),
    34: _Layout(False, (3, 4, 6, 3)),
    50: _Layout(True, (3, 4, 6, 3)),
    101: _Layout(True, (3, 4, 23, 3)),
    152: _Layout(True, (3, 8, 36, 3)),
    200: _Layout(True, (3, 24, 36, 3)),
}
DEPTHS = tuple(sorted(_LAYOUTS))  # the ResNet depths there are layouts for


def _layout(depth: int) -> _Layout:
    """The block type and blocks per group of a ResNet depth; ValueError for unknown depths."""
    if depth not in _LAYOUTS:
        raise ValueError(f"Unsupported ResNet depth {depth!r}; valid depths: {list(DEPTHS)}.")
    return _LAYOUTS[depth]


def _base_group_width(base_width: int, width_multiplier: float) -> int:
    """Width of the first group: round(base_width * width_multiplier), at least 1."""
    width = round(base_width * width_multiplier)
    if width < 1:
        raise ValueError(
            f"base_width * width_multiplier = {base_width} * {width_multiplier} rounds to "
            f"{width}; it must be at least 1."
        )
    return width


def resnet_feature_dim(depth: int, width_multiplier: float = 1.0, base_width: int = 64) -> int:
    """Size of the pooled representation h of a ResNet: 8*w*base (basic) or 32*w*base (bottleneck).

    With the default base width this is 512w for ResNet-18/34 and 2048w for ResNet-50 and deeper.
    """
    layout = _layout(depth)
    last_group_width = _base_group_width(base_width, width_multiplier) * _GROUP_WIDTH_FACTORS[-1]
    return last_group_width * (_BOTTLENECK_EXPANSION if layout.bottleneck else 1)


def _conv(
    features: int,
    kernel_size: int,
    strides: int,
    *,
    dtype: Any,
    conv_general_dilated: Callable[..., Any],
    name: str,
) -> nn.Conv:
    """A bias-free square convolution with the official symmetric (k-1)/2 padding."""
    pad_before = (kernel_size - 1) // 2
    padding = (pad_before, kernel_size - 1 - pad_before)
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=(padding, padding),
        use_bias=False,
        kernel_init=_CONV_INIT,
        dtype=dtype,
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34); output width `filters`.

    `conv(features, kernel_size, strides, name=...)` and `norm(name=..., **overrides)` build the
    layers, so every block of a network shares one dtype and one BN configuration.
    """

    filters: int
    strides: int
    project_shortcut: bool
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        shortcut = x
        if self.project_shortcut:
            shortcut = self.conv(self.filters, 1, self.strides, name="shortcut_conv")(x)
            shortcut = self.norm(name="shortcut_bn")(shortcut)
        y = self.conv(self.filters, 3, self.strides, name="conv1")(x)
        y = self.norm(name="bn1")(y, relu=True)
        y = self.conv(self.filters, 3, 1, name="conv2")(y)
        return self.norm(scale_init=nn.initializers.zeros, name="bn2")(
            y, residual=shortcut, relu=True
        )


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (ResNet-50 and deeper); output width 4*`filters`.

    `conv` and `norm` are as in `BasicBlock`.
    """

    filters: int
    strides: int
    project_shortcut: bool
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        out_features = _BOTTLENECK_EXPANSION * self.filters
        shortcut = x
        if self.project_shortcut:
            shortcut = self.conv(out_features, 1, self.strides, name="shortcut_conv")(x)
            shortcut = self.norm(name="shortcut_bn")(shortcut)
        y = self.conv(self.filters, 1, 1, name="conv1")(x)
        y = self.norm(name="bn1")(y, relu=True)
        y = self.conv(self.filters, 3, self.strides, name="conv2")(y)
        y = self.norm(name="bn2")(y, relu=True)
        y = self.conv(out_features, 1, 1, name="conv3")(y)
        return self.norm(scale_init=nn.initializers.zeros, name="bn3")(
            y, residual=shortcut, relu=True
        )


class ResNet(nn.Module):
    """ResNet v1 encoder mapping images `[B, H, W, C]` to pooled features h `[B, feature_dim]`.

    Attributes:
      depth: 18 or 34 (basic blocks), 50, 101, 152 or 200 (bottleneck blocks).
      width_multiplier: scales every group's width (SimCLR uses 1, 2 and 4).
      base_width: width of the first group before the multiplier; the four groups have widths
        round(base_width * width_multiplier) * (1, 2, 4, 8), times 4 at the output of
        bottleneck blocks. Small values give cheap models for tests.
      stem: "imagenet" (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) or "cifar" (3x3/1 conv, BN, ReLU,
        no pooling; for images of 32 pixels or fewer).
      bn_momentum: BN moving-average decay.
      bn_epsilon: BN variance epsilon.
      dtype: computation dtype of convolutions and BN (e.g. jnp.bfloat16); parameters and BN
        statistics stay float32, and h is returned in float32.
      layers: the convolution and batch-norm functions (`layers.Layers`; default XLA's own,
        right on every platform; `simclr_jax.kernels.for_mesh` picks faster ones for a mesh).
        Every choice has the same parameters and, within float32 rounding, the same numbers.

    Parameters live under `stem_conv`, `stem_bn` and `group{g}_block{b}` (1-based); inside a
    block: `conv1`, `bn1`, ... and `shortcut_conv`, `shortcut_bn`. Every BN scale/bias is 1-D
    (`scale`, `bias`); every convolution `kernel` is 4-D.
    """

    depth: int = 50
    width_multiplier: float = 1.0
    base_width: int = 64
    stem: str = "imagenet"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    layers: Layers = XLA_LAYERS

    def __post_init__(self) -> None:
        _layout(self.depth)
        _base_group_width(self.base_width, self.width_multiplier)
        if self.stem not in _STEMS:
            raise ValueError(f"Unknown stem {self.stem!r}; valid stems: {list(_STEMS)}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        layout = _layout(self.depth)
        width = _base_group_width(self.base_width, self.width_multiplier)
        conv = functools.partial(
            _conv, dtype=self.dtype, conv_general_dilated=self.layers.conv_general_dilated
        )
        norm = functools.partial(
            BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            train_fn=self.layers.batch_norm_train,
        )

        if self.stem == "imagenet":
            x = conv(width, 7, 2, name="stem_conv")(x)
            x = norm(name="stem_bn")(x, relu=True)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        else:
            x = conv(width, 3, 1, name="stem_conv")(x)
            x = norm(name="stem_bn")(x, relu=True)

        block_cls = BottleneckBlock if layout.bottleneck else BasicBlock
        for group, (num_blocks, factor) in enumerate(
            zip(layout.blocks_per_group, _GROUP_WIDTH_FACTORS, strict=True), start=1
        ):
            for block in range(1, num_blocks + 1):
                first = block == 1
                x = block_cls(
                    filters=width * factor,
                    strides=2 if first and group > 1 else 1,
                    project_shortcut=first,
                    conv=conv,
                    norm=norm,
                    name=f"group{group}_block{block}",
                )(x)

        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
