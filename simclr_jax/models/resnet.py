"""ResNet v1 encoders (post-activation) as used by SimCLR, in Flax linen.

The architecture follows the official SimCLR TF2 ResNet:

- a projection shortcut (1x1 conv with the block's stride, then BN) on the first block of every
  group, including the first group of ResNet-18/34 where torchvision keeps an identity shortcut
  (so ResNet-18/34 have 64*64 + 2*64 = 4,224 more parameters than torchvision's);
- bottleneck blocks put the stride on the 3x3 convolution;
- the last BN of every residual branch starts with scale 0, so each block starts as its shortcut
  (`zero_init_residual`; False starts it at 1, as torchvision's ResNets do by default);
- convolutions have no bias and use symmetric "fixed" padding of (k-1)/2 pixels on each side
  (identical to "SAME" at stride 1, and to torchvision's padding at stride 2);
- convolution kernels use the official initialiser, Keras' default `VarianceScaling()`: scale 1,
  fan-in, truncated normal (the same as Flax's `lecun_normal`, not He's scale-2 variant);
- BN: moving = momentum * moving + (1 - momentum) * batch, with momentum 0.9 and eps 1e-5; each
  BN is one layer with the ReLU and residual add after it (`batch_norm.BatchNorm`, the variables
  and numbers of `flax.linen.BatchNorm`).

The network receives its kernels (`layers.Layers`: the convolution and batch-norm functions) and
never chooses them itself.

SimCLRv2's options, as in the official TF2 code (`sk_ratio`, `se_ratio`; 0 turns each off):

- selective kernels (`sk_ratio` > 0): the 3x3 convolution (with its BN and ReLU) of every
  bottleneck block becomes a `SelectiveKernel` unit; and, in every depth, the ResNet-D changes
  that the official code switches on with it: the "imagenet" stem becomes three 3x3 convolutions
  (width/2 stride 2, width/2, width; each with BN and ReLU) before the max-pool, and a projection
  shortcut average-pools by 2x2 (with the block's stride) before an unstrided 1x1 convolution.
  Basic blocks (ResNet-18/34) keep their 3x3 convolutions, as in the official code;
- squeeze-and-excitation (`se_ratio` > 0): every residual branch ends with `SqueezeExcite` after
  its last BN, before the residual add, with max(1, int(filters * se_ratio)) hidden channels
  (`filters` is the block's inner width, not its 4x output width in a bottleneck).

Both only add modules: with both ratios at 0 the parameters are exactly those of the plain ResNet.

Batch norm is computed over the whole array it is given (`axis_name=None`). Under `jax.jit` with a
batch-sharded global array this is the global batch, which is what SimCLR needs; no collectives
are written here.
"""

import functools
import math
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
    use_bias: bool = False,
) -> nn.Conv:
    """A square convolution with the official symmetric (k-1)/2 padding, bias-free by default."""
    pad_before = (kernel_size - 1) // 2
    padding = (pad_before, kernel_size - 1 - pad_before)
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=(padding, padding),
        use_bias=use_bias,
        kernel_init=_CONV_INIT,
        dtype=dtype,
        conv_general_dilated=conv_general_dilated,
        name=name,
    )


def _check_ratio(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of at least 0 (0 = off), got {value!r}.")


class SelectiveKernel(nn.Module):
    """Selective-kernel convolution (Li et al. 2019, arXiv:1903.06586) as in SimCLRv2's code.

    One 3x3 convolution (stride `strides`) gives two paths of `filters` channels each (both
    3x3, undilated: the official code splits one convolution of 2x`filters` channels), then BN
    and ReLU. The paths' sum is averaged over space and mixed by a 1x1 convolution down to
    max(int(filters * sk_ratio), min_dim) channels, BN and ReLU, and a 1x1 convolution up to
    2x`filters`; a softmax over the two paths, channel by channel, weights their sum.
    Convolutions have no bias. `conv` and `norm` are as in `BasicBlock`.
    """

    filters: int
    strides: int
    sk_ratio: float
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    min_dim: int = 32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        y = self.conv(2 * self.filters, 3, self.strides, name="conv")(x)
        y = self.norm(name="bn")(y, relu=True)
        paths = jnp.stack(jnp.split(y, 2, axis=-1))  # [2, B, H, W, filters]
        pooled = jnp.mean(paths.sum(axis=0), axis=(1, 2), keepdims=True)
        hidden = max(int(self.filters * self.sk_ratio), self.min_dim)
        mix = self.conv(hidden, 1, 1, name="reduce_conv")(pooled)
        mix = self.norm(name="reduce_bn")(mix, relu=True)
        mix = self.conv(2 * self.filters, 1, 1, name="expand_conv")(mix)
        weights = nn.softmax(jnp.stack(jnp.split(mix.astype(jnp.float32), 2, axis=-1)), axis=0)
        return jnp.sum(paths * weights.astype(paths.dtype), axis=0)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018, arXiv:1709.01507) as in SimCLRv2's code.

    The spatial mean of `x` goes through a 1x1 convolution (with bias) down to `hidden`
    channels, a ReLU, a 1x1 convolution (with bias) back to the channels of `x` and a sigmoid,
    which scales `x` channel by channel. `conv` is as in `BasicBlock`.
    """

    hidden: int
    conv: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)
        squeezed = nn.relu(
            self.conv(self.hidden, 1, 1, use_bias=True, name="reduce_conv")(squeezed)
        )
        excitation = self.conv(x.shape[-1], 1, 1, use_bias=True, name="expand_conv")(squeezed)
        return x * nn.sigmoid(excitation.astype(jnp.float32)).astype(x.dtype)


def _shortcut(x, features: int, strides: int, resnet_d: bool, conv, norm) -> jnp.ndarray:
    """The projection shortcut: a strided 1x1 convolution and BN, or with `resnet_d` (the official
    code's choice whenever SK is on) a 2x2 average pool with the block's stride, then an
    unstrided 1x1 convolution and BN."""
    if resnet_d:
        if strides > 1:  # zeros after the last row and column, counted in the average
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
            x = nn.avg_pool(x, (2, 2), strides=(strides, strides), padding="VALID")
        else:  # "SAME": the padded row and column are left out of the average
            x = nn.avg_pool(
                x, (2, 2), strides=(1, 1), padding=((0, 1), (0, 1)), count_include_pad=False
            )
        strides = 1
    x = conv(features, 1, strides, name="shortcut_conv")(x)
    return norm(name="shortcut_bn")(x)


def _residual_end(block: nn.Module, y, shortcut, name: str) -> jnp.ndarray:
    """`block`'s last BN (scale 0 at init with its `zero_init_residual`, else 1), its SE if its
    `se_ratio` > 0, the residual add and ReLU."""
    scale_init = nn.initializers.zeros if block.zero_init_residual else nn.initializers.ones
    last_bn = block.norm(scale_init=scale_init, name=name)
    if block.se_ratio <= 0:
        return last_bn(y, residual=shortcut, relu=True)
    hidden = max(1, int(block.filters * block.se_ratio))
    y = SqueezeExcite(hidden, block.conv, name="se")(last_bn(y))
    return nn.relu(y + shortcut)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34); output width `filters`.

    `conv(features, kernel_size, strides, name=...)` and `norm(name=..., **overrides)` build the
    layers, so every block of a network shares one dtype and one BN configuration. `sk_ratio` > 0
    only changes the projection shortcut (ResNet-D, as in the official code); `se_ratio` > 0 adds
    `SqueezeExcite` (module `se`) before the residual add. `zero_init_residual` starts the
    branch's last BN scale at 0 (else 1).
    """

    filters: int
    strides: int
    project_shortcut: bool
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    zero_init_residual: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        shortcut = x
        if self.project_shortcut:
            shortcut = _shortcut(
                x, self.filters, self.strides, self.sk_ratio > 0, self.conv, self.norm
            )
        y = self.conv(self.filters, 3, self.strides, name="conv1")(x)
        y = self.norm(name="bn1")(y, relu=True)
        y = self.conv(self.filters, 3, 1, name="conv2")(y)
        return _residual_end(self, y, shortcut, "bn2")


class BottleneckBlock(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand (ResNet-50 and deeper); output width 4*`filters`.

    `conv` and `norm` are as in `BasicBlock`. `sk_ratio` > 0 replaces `conv2` and `bn2` by a
    `SelectiveKernel` unit (module `sk`) and gives the projection shortcut its ResNet-D form;
    `se_ratio` > 0 adds `SqueezeExcite` (module `se`) before the residual add;
    `zero_init_residual` as in `BasicBlock`.
    """

    filters: int
    strides: int
    project_shortcut: bool
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    zero_init_residual: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        out_features = _BOTTLENECK_EXPANSION * self.filters
        shortcut = x
        if self.project_shortcut:
            shortcut = _shortcut(
                x, out_features, self.strides, self.sk_ratio > 0, self.conv, self.norm
            )
        y = self.conv(self.filters, 1, 1, name="conv1")(x)
        y = self.norm(name="bn1")(y, relu=True)
        if self.sk_ratio > 0:
            y = SelectiveKernel(
                self.filters, self.strides, self.sk_ratio, self.conv, self.norm, name="sk"
            )(y)
        else:
            y = self.conv(self.filters, 3, self.strides, name="conv2")(y)
            y = self.norm(name="bn2")(y, relu=True)
        y = self.conv(out_features, 1, 1, name="conv3")(y)
        return _residual_end(self, y, shortcut, "bn3")


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
      sk_ratio: > 0 turns on SimCLRv2's selective kernels (SimCLRv2's models use 0.0625); see
        the module docstring for everything it changes. 0 = off.
      se_ratio: > 0 adds squeeze-and-excitation to every block. 0 = off.
      zero_init_residual: start the last BN scale of every residual branch at 0, so that each
        block starts as its shortcut (the official code; Goyal et al., 2017); False: at 1.
      bn_momentum: BN moving-average decay.
      bn_epsilon: BN variance epsilon.
      dtype: computation dtype of convolutions and BN (e.g. jnp.bfloat16); parameters and BN
        statistics stay float32, and h is returned in float32.
      layers: the convolution and batch-norm functions (`layers.Layers`; default XLA's own,
        right on every platform; `simclr_jax.kernels.for_mesh` picks faster ones for a mesh).
        Every choice has the same parameters and, within float32 rounding, the same numbers.

    Parameters live under `stem_conv`, `stem_bn` (with SK and the imagenet stem: `stem_conv1`,
    `stem_bn1`, ... `stem_bn3`) and `group{g}_block{b}` (1-based); inside a block: `conv1`,
    `bn1`, ... and `shortcut_conv`, `shortcut_bn`, and `sk` and `se` when on. Every BN
    scale/bias is 1-D (`scale`, `bias`); every convolution `kernel` is 4-D.
    """

    depth: int = 50
    width_multiplier: float = 1.0
    base_width: int = 64
    stem: str = "imagenet"
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    zero_init_residual: bool = True
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = jnp.float32
    layers: Layers = XLA_LAYERS

    def __post_init__(self) -> None:
        _layout(self.depth)
        _base_group_width(self.base_width, self.width_multiplier)
        if self.stem not in _STEMS:
            raise ValueError(f"Unknown stem {self.stem!r}; valid stems: {list(_STEMS)}.")
        _check_ratio("sk_ratio", self.sk_ratio)
        _check_ratio("se_ratio", self.se_ratio)
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

        if self.stem == "imagenet" and self.sk_ratio > 0:  # ResNet-D's stem, as the official code
            half = max(1, width // 2)
            for i, (features, strides) in enumerate(((half, 2), (half, 1), (width, 1)), start=1):
                x = conv(features, 3, strides, name=f"stem_conv{i}")(x)
                x = norm(name=f"stem_bn{i}")(x, relu=True)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
        elif self.stem == "imagenet":
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
                    sk_ratio=self.sk_ratio,
                    se_ratio=self.se_ratio,
                    zero_init_residual=self.zero_init_residual,
                    name=f"group{group}_block{block}",
                )(x)

        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
