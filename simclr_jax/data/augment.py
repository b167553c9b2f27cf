"""SimCLR image augmentations as deterministic, graph-compatible TensorFlow ops.

Every random choice is drawn with stateless ops from an explicit seed (a shape-[2] int32 or
int64 tensor, as produced by ``tf.data.Dataset.random(...).batch(2)`` or
``tf.random.experimental.stateless_split``). Each op and each view gets its own sub-seed, so the
same seed always gives bit-identical views, eagerly or inside ``tf.data.Dataset.map``.

The pretraining view follows the SimCLR recipe (paper and official TF2 code), in this order:
random crop + bicubic resize (always), horizontal flip, colour jitter (brightness, contrast,
saturation, hue in a random order), grayscale, Gaussian blur. Images are floats in [0, 1] with
no mean/std normalisation. An optional random rotation (not in SimCLR's recipe; the hybrid
autoencoder article uses ±15°) follows the crop when ``rotation_degrees > 0``.

Two deliberate choices where implementations differ:
- Gaussian blur draws one σ per image (as in the paper) rather than one per batch (official
  code, which blurs on device), and pads by reflection instead of with zeros, so borders are not
  darkened.
- Single-channel images get the luminance-meaningful subset of colour jitter (brightness and
  contrast, in a random order); saturation and hue are undefined for them, and grayscale is a
  no-op.

TensorFlow only feeds data here, so importing this module hides every GPU from TensorFlow,
leaving the accelerators to JAX.
"""

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import tensorflow as tf

with contextlib.suppress(RuntimeError):  # Raised when TF devices are already initialised.
    tf.config.set_visible_devices([], "GPU")

DEFAULT_CROP_AREA_RANGE = (0.08, 1.0)
DEFAULT_CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
DEFAULT_FLIP_PROB = 0.5
# The crop must keep at least this fraction of the image (official SimCLR value).
_MIN_OBJECT_COVERED = 0.1
_MAX_CROP_ATTEMPTS = 100
_BRIGHTNESS_MODES = ("multiplicative", "additive")
# The rotation's seed is the view's seed folded with this, outside the view's seed split, so that
# turning rotation on leaves every other op's randomness unchanged.
_ROTATION_FOLD = 7

Transform = Callable[[tf.Tensor], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the SimCLR pretraining augmentation.

    A probability of 0 removes that op entirely (the CIFAR-10 recipe uses ``blur_prob=0`` and
    ``color_jitter_strength=0.5``). ``brightness_mode`` selects SimCLR v2/TF2 brightness
    ("multiplicative": factor ~ U[1-0.8s, 1+0.8s]) or v1 ("additive": delta ~ U[-0.8s, 0.8s]).
    ``rotation_degrees`` > 0 rotates every view by an angle ~ U[-r, r] degrees (see
    `random_rotation`); 0 adds no op.
    """

    image_size: int
    crop_area_range: tuple[float, float] = DEFAULT_CROP_AREA_RANGE
    crop_aspect_range: tuple[float, float] = DEFAULT_CROP_ASPECT_RANGE
    flip_prob: float = DEFAULT_FLIP_PROB
    color_jitter_strength: float = 1.0
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma_range: tuple[float, float] = (0.1, 2.0)
    brightness_mode: str = "multiplicative"
    rotation_degrees: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
            raise ValueError(f"image_size must be an int, got {self.image_size!r}")
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        for name in ("crop_area_range", "crop_aspect_range", "blur_sigma_range"):
            # Normalise lists (e.g. from ml_collections configs) to hashable float tuples.
            object.__setattr__(self, name, _as_range(name, getattr(self, name)))
        if self.crop_area_range[1] > 1:
            raise ValueError(f"crop_area_range must lie in (0, 1], got {self.crop_area_range}")
        for name in ("flip_prob", "color_jitter_prob", "grayscale_prob", "blur_prob"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.color_jitter_strength < 0:
            raise ValueError(
                f"color_jitter_strength must be non-negative, got {self.color_jitter_strength}"
            )
        _check_brightness_mode(self.brightness_mode)
        if not 0 <= self.rotation_degrees <= 180:
            raise ValueError(f"rotation_degrees must be in [0, 180], got {self.rotation_degrees}")


def random_resized_crop(
    image: tf.Tensor,
    seed: tf.Tensor,
    size: int,
    area_range: Sequence[float] = DEFAULT_CROP_AREA_RANGE,
    aspect_range: Sequence[float] = DEFAULT_CROP_ASPECT_RANGE,
) -> tf.Tensor:
    """Crops a random box (see `sample_crop_box`) and bicubic-resizes it to ``[size, size, C]``.

    Returns float32 values clipped to [0, 1] (bicubic interpolation can overshoot).
    """
    image = _to_float(image)
    begin, box_size = sample_crop_box(tf.shape(image), seed, area_range, aspect_range)
    crop = tf.slice(image, begin, box_size)
    # Slicing with a dynamic size drops the static channel count; restore it.
    crop = tf.ensure_shape(crop, [None, None, _num_channels(image)])
    return _resize(crop, size)


def sample_crop_box(
    image_shape: tf.Tensor,
    seed: tf.Tensor,
    area_range: Sequence[float] = DEFAULT_CROP_AREA_RANGE,
    aspect_range: Sequence[float] = DEFAULT_CROP_ASPECT_RANGE,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Samples a crop box for an image of shape ``[H, W, C]`` as in official SimCLR.

    The box's area fraction lies in ``area_range`` and its width/height ratio in
    ``aspect_range`` (up to pixel rounding); it also covers at least 10% of the image. After
    100 failed attempts the whole image is returned. Returns ``(begin, size)`` ready for
    ``tf.slice``: ``begin = [y, x, 0]`` and ``size = [h, w, -1]``.
    """
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_size=image_shape,
        bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
        seed=_as_seed(seed),
        min_object_covered=_MIN_OBJECT_COVERED,
        aspect_ratio_range=tuple(aspect_range),
        area_range=tuple(area_range),
        max_attempts=_MAX_CROP_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def color_jitter(
    image: tf.Tensor,
    seed: tf.Tensor,
    strength: float,
    brightness_mode: str = "multiplicative",
) -> tf.Tensor:
    """Random brightness, contrast, saturation and hue, applied in a uniformly random order.

    Brightness, contrast and saturation factors are drawn from U[max(0, 1-0.8s), 1+0.8s]
    (additive brightness: a delta from U[-0.8s, 0.8s]); the hue shift from U[-0.2s, 0.2s], in
    turns of the colour wheel. The image is clipped to [0, 1] after each op. For 1-channel
    images only brightness and contrast are applied.
    """
    _check_brightness_mode(brightness_mode)
    image = _to_float(image)
    order_seed, brightness_seed, contrast_seed, saturation_seed, hue_seed = _split(seed, 5)
    spread = 0.8 * strength
    low, high = max(0.0, 1.0 - spread), 1.0 + spread

    if brightness_mode == "multiplicative":
        brightness_factor = _uniform(brightness_seed, low, high)
        transforms = [lambda x: x * brightness_factor]
    else:
        brightness_delta = _uniform(brightness_seed, -spread, spread)
        transforms = [lambda x: tf.image.adjust_brightness(x, brightness_delta)]
    contrast_factor = _uniform(contrast_seed, low, high)
    transforms.append(lambda x: tf.image.adjust_contrast(x, contrast_factor))
    if _num_channels(image) == 3:
        saturation_factor = _uniform(saturation_seed, low, high)
        hue_delta = _uniform(hue_seed, -0.2 * strength, 0.2 * strength)
        transforms.append(lambda x: tf.image.adjust_saturation(x, saturation_factor))
        transforms.append(lambda x: tf.image.adjust_hue(x, hue_delta))
    return _apply_in_random_order(image, transforms, order_seed)


def to_grayscale(image: tf.Tensor) -> tf.Tensor:
    """Converts RGB to luminance replicated over 3 channels; 1-channel images are unchanged."""
    image = _to_float(image)
    if _num_channels(image) == 1:
        return image
    return tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3])


def blur_kernel_size(image_side: int | tf.Tensor) -> int | tf.Tensor:
    """Side of the blur kernel: the odd number 2·r+1 with r = (side // 10) // 2 (≈10% of side).

    Works on Python ints and integer tensors alike.
    """
    return image_side // 10 // 2 * 2 + 1


def gaussian_blur(
    image: tf.Tensor, seed: tf.Tensor, sigma_range: Sequence[float] = (0.1, 2.0)
) -> tf.Tensor:
    """Blurs with a Gaussian of σ ~ U[sigma_range], one σ per image.

    The kernel is square with side `blur_kernel_size` of the image height, applied as two
    separable depthwise convolutions over a reflection-padded image (output size = input size).
    """
    image = _to_float(image)
    sigma = _uniform(seed, *sigma_range)
    radius = blur_kernel_size(tf.shape(image)[0]) // 2
    offsets = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    kernel = tf.exp(-tf.square(offsets) / (2.0 * tf.square(sigma)))
    kernel /= tf.reduce_sum(kernel)
    channels = _num_channels(image)
    kernel = tf.tile(kernel[:, tf.newaxis, tf.newaxis], [1, channels, 1])  # [k, C, 1]
    vertical = kernel[:, tf.newaxis]  # [k, 1, C, 1]
    horizontal = kernel[tf.newaxis]  # [1, k, C, 1]
    padding = [[0, 0], [radius, radius], [radius, radius], [0, 0]]
    padded = tf.pad(image[tf.newaxis], padding, mode="REFLECT")
    blurred = tf.nn.depthwise_conv2d(padded, vertical, strides=[1, 1, 1, 1], padding="VALID")
    blurred = tf.nn.depthwise_conv2d(blurred, horizontal, strides=[1, 1, 1, 1], padding="VALID")
    return tf.clip_by_value(blurred[0], 0.0, 1.0)


def sample_rotation_angle(seed: tf.Tensor, max_degrees: float) -> tf.Tensor:
    """An angle in radians, uniform in [-max_degrees, max_degrees] degrees."""
    max_radians = math.radians(max_degrees)
    return _uniform(seed, -max_radians, max_radians)


def rotate(image: tf.Tensor, angle: tf.Tensor | float) -> tf.Tensor:
    """Rotates a ``[H, W, C]`` image counter-clockwise (as displayed) by ``angle`` radians.

    The rotation is about the image centre, ``((W - 1) / 2, (H - 1) / 2)`` in pixel
    coordinates, so a quarter turn of a square image permutes its pixels exactly. Values are
    interpolated bilinearly; output pixels whose source lies outside the image are filled with
    0 (black corners), the usual fill for rotation augmentations. Returns float32 in [0, 1].
    """
    image = _to_float(image)
    angle = tf.cast(angle, tf.float32)
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    center_x, center_y = (width - 1) / 2, (height - 1) / 2
    cos, sin = tf.cos(angle), tf.sin(angle)
    # Maps each output pixel (x, y) to the input point it samples: the inverse rotation.
    transform = tf.stack(
        [
            cos,
            -sin,
            center_x - cos * center_x + sin * center_y,
            sin,
            cos,
            center_y - sin * center_x - cos * center_y,
            0.0,
            0.0,
        ]
    )
    rotated = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[tf.newaxis],
        transforms=transform[tf.newaxis],
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return tf.clip_by_value(tf.ensure_shape(rotated[0], image.shape), 0.0, 1.0)


def random_rotation(image: tf.Tensor, seed: tf.Tensor, max_degrees: float) -> tf.Tensor:
    """`rotate` by the angle `sample_rotation_angle` draws from ``seed``."""
    return rotate(image, sample_rotation_angle(seed, max_degrees))


def simclr_augment(image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """One SimCLR pretraining view of a ``[H, W, C]`` image (C in {1, 3}).

    Accepts uint8 (0..255) or float ([0, 1]) input; returns float32 ``[size, size, C]`` in
    [0, 1]. Order: crop + resize, flip, colour jitter, grayscale (independent of the jitter),
    blur, each after an independent coin flip with the configured probability. With
    ``rotation_degrees`` > 0, a random rotation follows the crop.
    """
    crop_seed, flip_seed, jitter_gate, jitter_seed, gray_gate, blur_gate, blur_seed = _split(
        seed, 7
    )
    image = random_resized_crop(
        image, crop_seed, config.image_size, config.crop_area_range, config.crop_aspect_range
    )
    if config.rotation_degrees > 0:
        rotation_seed = tf.random.experimental.stateless_fold_in(_as_seed(seed), _ROTATION_FOLD)
        image = random_rotation(image, rotation_seed, config.rotation_degrees)
    image = _random_apply(tf.image.flip_left_right, config.flip_prob, flip_seed, image)
    jitter = functools.partial(
        color_jitter,
        seed=jitter_seed,
        strength=config.color_jitter_strength,
        brightness_mode=config.brightness_mode,
    )
    image = _random_apply(jitter, config.color_jitter_prob, jitter_gate, image)
    image = _random_apply(to_grayscale, config.grayscale_prob, gray_gate, image)
    blur = functools.partial(gaussian_blur, seed=blur_seed, sigma_range=config.blur_sigma_range)
    return _random_apply(blur, config.blur_prob, blur_gate, image)


def simclr_views(image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Two independent SimCLR views of one image, stacked: float32 ``[2, size, size, C]``."""
    first_seed, second_seed = _split(seed, 2)
    return tf.stack(
        [simclr_augment(image, first_seed, config), simclr_augment(image, second_seed, config)]
    )


def linear_eval_augment(image: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
    """Training augmentation for linear evaluation: random crop + resize and flip only."""
    crop_seed, flip_seed = _split(seed, 2)
    image = random_resized_crop(image, crop_seed, image_size)
    return _random_apply(tf.image.flip_left_right, DEFAULT_FLIP_PROB, flip_seed, image)


def eval_preprocess(
    image: tf.Tensor, image_size: int, center_crop_fraction: float | None = None
) -> tf.Tensor:
    """Deterministic evaluation preprocessing to float32 ``[image_size, image_size, C]``.

    With ``center_crop_fraction`` (ImageNet: 0.875), crops a centred square whose side is that
    fraction of the shorter image side, then bicubic-resizes it. Without it, the image is only
    converted to [0, 1] floats, and bicubic-resized (aspect ratio not preserved) only when its
    size differs, so 32 px datasets stay untouched.
    """
    image = _to_float(image)
    if center_crop_fraction is not None:
        if not 0 < center_crop_fraction <= 1:
            raise ValueError(f"center_crop_fraction must be in (0, 1], got {center_crop_fraction}")
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        shorter_side = tf.cast(tf.minimum(height, width), tf.float32)
        crop = tf.cast(tf.math.rint(center_crop_fraction * shorter_side), tf.int32)
        top, left = (height - crop + 1) // 2, (width - crop + 1) // 2
        return _resize(tf.image.crop_to_bounding_box(image, top, left, crop, crop), image_size)
    has_size = tf.reduce_all(tf.equal(tf.shape(image)[:2], image_size))
    image = tf.cond(has_size, lambda: image, lambda: _resize(image, image_size))
    return tf.ensure_shape(image, [image_size, image_size, _num_channels(image)])


def _random_apply(
    transform: Transform, prob: float, seed: tf.Tensor, image: tf.Tensor
) -> tf.Tensor:
    """Applies ``transform`` with probability ``prob``; probability 0 adds no op at all."""
    if prob <= 0:
        return image
    apply = tf.random.stateless_uniform([], _as_seed(seed)) < prob
    return tf.cond(apply, lambda: transform(image), lambda: image)


def _apply_in_random_order(
    image: tf.Tensor, transforms: Sequence[Transform], seed: tf.Tensor
) -> tf.Tensor:
    """Applies every transform once, in a uniformly random order, clipping to [0, 1] after each."""
    order = tf.argsort(tf.random.stateless_uniform([len(transforms)], _as_seed(seed)))
    for position in range(len(transforms)):
        branches = [functools.partial(transform, image) for transform in transforms]
        image = tf.clip_by_value(tf.switch_case(order[position], branches), 0.0, 1.0)
    return image


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
    resized = tf.image.resize(image, [size, size], method=tf.image.ResizeMethod.BICUBIC)
    return tf.clip_by_value(resized, 0.0, 1.0)


def _to_float(image: tf.Tensor) -> tf.Tensor:
    """Integer images are scaled to [0, 1] by their dtype's maximum; floats are cast only."""
    image = tf.convert_to_tensor(image)
    _num_channels(image)  # Rejects anything but [H, W, 1 or 3] early, with a clear error.
    return tf.image.convert_image_dtype(image, tf.float32)


def _num_channels(image: tf.Tensor) -> int:
    """Static channel count of a ``[H, W, C]`` image; C must be 1 or 3."""
    if image.shape.rank != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image of shape [H, W, 1 or 3], got {image.shape}")
    return image.shape[-1]


def _as_seed(seed: tf.Tensor) -> tf.Tensor:
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        seed = tf.cast(seed, tf.int64)
    return tf.ensure_shape(seed, [2])


def _split(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    """``num`` independent sub-seeds of ``seed``."""
    return tf.unstack(tf.random.experimental.stateless_split(_as_seed(seed), num))


def _uniform(seed: tf.Tensor, low: float, high: float) -> tf.Tensor:
    """A scalar from U[low, high); exactly ``low`` when the range is empty."""
    return tf.random.stateless_uniform([], _as_seed(seed), low, high)


def _as_range(name: str, values: Sequence[float]) -> tuple[float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {values}")
    return values


def _check_brightness_mode(mode: str) -> None:
    if mode not in _BRIGHTNESS_MODES:
        raise ValueError(f"brightness_mode must be one of {_BRIGHTNESS_MODES}, got {mode!r}")
