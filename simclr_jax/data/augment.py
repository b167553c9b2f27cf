"""SimCLR image augmentations as deterministic, graph-compatible TensorFlow ops.

Every random choice is drawn with stateless ops from an explicit seed (a shape-[2] int32 or
int64 tensor, as produced by ``tf.data.Dataset.random(...).batch(2)`` or
``tf.random.experimental.stateless_split``). Each op gets its own sub-seed, and draws one value
per image of the batch it works on, so the same seed always gives bit-identical views, eagerly
or inside ``tf.data.Dataset.map``.

The ops work on batches ``[N, H, W, C]``: a batch costs a few dozen TensorFlow ops, whatever its
size, which matters on small images, where per-op overhead outweighs the arithmetic.
`simclr_views_batch` makes both views of a batch of same-size images at once (the input
pipeline's path for such datasets); `simclr_views` makes the two views of one image of any size
(crops sliced and resized one by one), with the same ops and draws.

The pretraining view follows the SimCLR recipe (paper and official TF2 code), in this order:
random crop + bicubic resize (always), horizontal flip, colour jitter (brightness, contrast,
saturation, hue in a random order), grayscale, Gaussian blur. Images are floats in [0, 1] with
no mean/std normalisation. An optional random rotation (not in SimCLR's recipe; the hybrid
autoencoder article uses ±15°) follows the crop when ``rotation_degrees > 0``.

Deliberate choices where implementations differ:
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
# Multi-crop (SwAV): the area fraction of the small, low-resolution crops.
DEFAULT_SMALL_CROP_AREA_RANGE = (0.05, 0.14)
# The crop must keep at least this fraction of the image (official SimCLR value).
_MIN_OBJECT_COVERED = 0.1
_MAX_CROP_ATTEMPTS = 100
_BRIGHTNESS_MODES = ("multiplicative", "additive")
# tf.image.resize's bicubic kernel: Keys' cubic with a = -0.5, tabulated at 1/1024 of a pixel.
_BICUBIC_A = -0.5
_BICUBIC_TABLE_SIZE = 1024

Transform = Callable[[tf.Tensor], tf.Tensor]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the SimCLR pretraining augmentation.

    A probability of 0 removes that op entirely (the CIFAR-10 recipe uses ``blur_prob=0`` and
    ``color_jitter_strength=0.5``). ``brightness_mode`` selects SimCLR v2/TF2 brightness
    ("multiplicative": factor ~ U[1-0.8s, 1+0.8s]) or v1 ("additive": delta ~ U[-0.8s, 0.8s]).
    ``rotation_degrees`` > 0 rotates every view by an angle ~ U[-r, r] degrees (see
    `random_rotation`); 0 adds no op.

    Multi-crop (Caron et al., SwAV, 2020): ``num_small_crops`` > 0 adds that many small views of
    each image (`small_views_batch`), ``small_crop_size`` pixels square, cropped with area
    fraction in ``small_crop_area_range`` (and the same aspect range) and distorted like the two
    large views. 0 small crops (the default) is plain SimCLR.
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
    num_small_crops: int = 0
    small_crop_size: int = 0
    small_crop_area_range: tuple[float, float] = DEFAULT_SMALL_CROP_AREA_RANGE

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
            raise ValueError(f"image_size must be an int, got {self.image_size!r}")
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        for name in (
            "crop_area_range",
            "crop_aspect_range",
            "blur_sigma_range",
            "small_crop_area_range",
        ):
            # Normalise lists (e.g. from ml_collections configs) to hashable float tuples.
            object.__setattr__(self, name, _as_range(name, getattr(self, name)))
        for name in ("crop_area_range", "small_crop_area_range"):
            if getattr(self, name)[1] > 1:
                raise ValueError(f"{name} must lie in (0, 1], got {getattr(self, name)}")
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
        if isinstance(self.num_small_crops, bool) or not isinstance(self.num_small_crops, int):
            raise ValueError(f"num_small_crops must be an int, got {self.num_small_crops!r}")
        if self.num_small_crops < 0:
            raise ValueError(f"num_small_crops must be non-negative, got {self.num_small_crops}")
        if self.num_small_crops and not (
            isinstance(self.small_crop_size, int)
            and not isinstance(self.small_crop_size, bool)
            and self.small_crop_size > 0
        ):
            raise ValueError(
                f"small_crop_size must be a positive int with small crops, got "
                f"{self.small_crop_size!r}"
            )


def sample_crop_boxes(
    image_height: int | tf.Tensor,
    image_width: int | tf.Tensor,
    seed: tf.Tensor,
    num: int,
    area_range: Sequence[float] = DEFAULT_CROP_AREA_RANGE,
    aspect_range: Sequence[float] = DEFAULT_CROP_ASPECT_RANGE,
    min_covered: float = _MIN_OBJECT_COVERED,
) -> tf.Tensor:
    """``num`` random crop boxes of an ``image_height × image_width`` image, int32 ``[num, 4]``.

    Each row is ``(top, left, height, width)``. The rule is official SimCLR's
    (``tf.image.sample_distorted_bounding_box`` with ``min_object_covered=0.1``): each of 100
    attempts draws an aspect ratio (width/height) uniformly from ``aspect_range`` and a whole
    height uniformly among those whose area fraction (width = round(height × aspect)) lies in
    ``area_range``; the first attempt that fits the image and covers at least 10% of it wins,
    and the whole image is used when none does. As in TensorFlow, the top (left) offset of a box
    shorter (narrower) than the image is uniform in ``[0, H - h)``, so such a box never touches
    the bottom (right) edge. All ``num`` boxes are drawn together, in a fixed number of ops.
    ``min_covered`` replaces the 10% floor (multi-crop's small crops use 0: their area range
    alone decides).
    """
    height = tf.cast(image_height, tf.float32)
    width = tf.cast(image_width, tf.float32)
    aspect_seed, height_seed, top_seed, left_seed = _split(seed, 4)
    shape = [num, _MAX_CROP_ATTEMPTS]
    aspect = tf.random.stateless_uniform(shape, _as_seed(aspect_seed), *aspect_range)
    image_area = height * width
    min_area, max_area = area_range[0] * image_area, area_range[1] * image_area
    # Heights from the smallest to the largest area at this aspect, the largest also fitting
    # the image's width and height.
    min_height = tf.math.rint(tf.sqrt(min_area / aspect))
    max_height = tf.math.rint(tf.sqrt(max_area / aspect))
    widest = tf.floor((width + 0.5 - 1e-7) / aspect)
    widest = tf.where(tf.math.rint(widest * aspect) > width, widest - 1, widest)
    max_height = tf.where(tf.math.rint(max_height * aspect) > width, widest, max_height)
    max_height = tf.minimum(max_height, height)
    min_height = tf.minimum(min_height, max_height)
    draw = tf.random.stateless_uniform(shape, _as_seed(height_seed))
    box_height = min_height + tf.floor(draw * (max_height - min_height + 1))
    box_width = tf.math.rint(box_height * aspect)
    # Rounding can leave the area just outside the range: one pixel taller, or shorter, fixes it.
    too_small = box_width * box_height < min_area
    box_height = tf.where(too_small, box_height + 1, box_height)
    box_width = tf.math.rint(box_height * aspect)
    too_large = box_width * box_height > max_area
    box_height = tf.where(too_large, box_height - 1, box_height)
    box_width = tf.math.rint(box_height * aspect)
    area = box_width * box_height
    fits = (
        (area >= min_area)
        & (area <= max_area)
        & (area >= min_covered * image_area)
        & (box_width >= 1)
        & (box_height >= 1)
        & (box_width <= width)
        & (box_height <= height)
    )
    # The first attempt that fits; the whole image when none does.
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    found = tf.reduce_any(fits, axis=1)
    box_height = tf.where(found, tf.gather(box_height, first, batch_dims=1), height)
    box_width = tf.where(found, tf.gather(box_width, first, batch_dims=1), width)
    top = tf.floor(tf.random.stateless_uniform([num], _as_seed(top_seed)) * (height - box_height))
    left = tf.floor(tf.random.stateless_uniform([num], _as_seed(left_seed)) * (width - box_width))
    return tf.cast(tf.stack([top, left, box_height, box_width], axis=1), tf.int32)


def random_resized_crop(
    image: tf.Tensor,
    seed: tf.Tensor,
    size: int,
    area_range: Sequence[float] = DEFAULT_CROP_AREA_RANGE,
    aspect_range: Sequence[float] = DEFAULT_CROP_ASPECT_RANGE,
) -> tf.Tensor:
    """One image's random crop (`sample_crop_boxes`), bicubic-resized to ``[size, size, C]``.

    Returns float32 values clipped to [0, 1] (bicubic interpolation can overshoot).
    """
    image = _to_float(image)
    shape = tf.shape(image)
    box = sample_crop_boxes(shape[0], shape[1], seed, 1, area_range, aspect_range)[0]
    return _crop_and_resize(image, box, size)


def resized_crops(images: tf.Tensor, boxes: tf.Tensor, size: int) -> tf.Tensor:
    """Crops ``boxes[n]`` of ``images[n]`` and bicubic-resizes each to ``[size, size, C]``.

    ``images`` is ``[N, H, W, C]`` (one shared size), ``boxes`` int ``[N, 4]`` as
    `sample_crop_boxes` gives them. The result equals slicing each box and resizing it with
    ``tf.image.resize(..., "bicubic")`` (what `random_resized_crop` does for one image), but is
    computed for the whole batch at once: resampling is linear, so each view is ``R_y · image ·
    R_xᵀ`` with per-view interpolation matrices. Values are clipped to [0, 1].
    """
    images = _to_float(images, batched=True)
    shape = tf.shape(images)
    boxes = tf.cast(boxes, tf.int32)
    rows = _bicubic_matrices(boxes[:, 0], boxes[:, 2], size, shape[1])  # [N, size, H]
    columns = _bicubic_matrices(boxes[:, 1], boxes[:, 3], size, shape[2])  # [N, size, W]
    resized = tf.einsum("nsh,nhwc->nswc", rows, images)
    resized = tf.einsum("ntw,nswc->nstc", columns, resized)
    return tf.clip_by_value(resized, 0.0, 1.0)


def color_jitter(
    images: tf.Tensor,
    seed: tf.Tensor,
    strength: float,
    brightness_mode: str = "multiplicative",
) -> tf.Tensor:
    """Random brightness, contrast, saturation and hue of each ``[N, H, W, C]`` image, each image
    with its own factors and its own uniformly random order of the ops.

    Brightness, contrast and saturation factors are drawn from U[max(0, 1-0.8s), 1+0.8s]
    (additive brightness: a delta from U[-0.8s, 0.8s]); the hue shift from U[-0.2s, 0.2s], in
    turns of the colour wheel. Images are clipped to [0, 1] after each op. For 1-channel
    images only brightness and contrast are applied.
    """
    _check_brightness_mode(brightness_mode)
    images = _to_float(images, batched=True)
    num = tf.shape(images)[0]
    order_seed, brightness_seed, contrast_seed, saturation_seed, hue_seed = _split(seed, 5)
    spread = 0.8 * strength
    low, high = max(0.0, 1.0 - spread), 1.0 + spread

    if brightness_mode == "multiplicative":
        brightness_factor = _per_image(_uniform(brightness_seed, num, low, high))
        transforms = [lambda x: x * brightness_factor]
    else:
        brightness_delta = _per_image(_uniform(brightness_seed, num, -spread, spread))
        transforms = [lambda x: x + brightness_delta]
    contrast_factor = _per_image(_uniform(contrast_seed, num, low, high))
    transforms.append(lambda x: _adjust_contrast(x, contrast_factor))
    if _num_channels(images, batched=True) == 3:
        saturation_factor = _per_image(_uniform(saturation_seed, num, low, high))
        hue_delta = _per_image(_uniform(hue_seed, num, -0.2 * strength, 0.2 * strength))
        transforms.append(lambda x: _adjust_saturation(x, saturation_factor))
        transforms.append(lambda x: _adjust_hue(x, hue_delta))
    return _apply_in_random_order(images, transforms, order_seed)


def to_grayscale(images: tf.Tensor) -> tf.Tensor:
    """RGB to luminance replicated over 3 channels (any leading axes); 1 channel is unchanged."""
    images = tf.image.convert_image_dtype(tf.convert_to_tensor(images), tf.float32)
    if images.shape[-1] == 1:
        return images
    return tf.tile(tf.image.rgb_to_grayscale(images), [1] * (images.shape.rank - 1) + [3])


def blur_kernel_size(image_side: int | tf.Tensor) -> int | tf.Tensor:
    """Side of the blur kernel: the odd number 2·r+1 with r = (side // 10) // 2 (≈10% of side).

    Works on Python ints and integer tensors alike.
    """
    return image_side // 10 // 2 * 2 + 1


def gaussian_blur(
    images: tf.Tensor, seed: tf.Tensor, sigma_range: Sequence[float] = (0.1, 2.0)
) -> tf.Tensor:
    """Blurs each ``[N, H, W, C]`` image with a Gaussian of its own σ ~ U[sigma_range].

    The kernel is square with side `blur_kernel_size` of the image height, applied separably
    (rows, then columns) over a reflection-padded image, so the output keeps the input's size.
    """
    images = _to_float(images, batched=True)
    sigma = _uniform(seed, tf.shape(images)[0], *sigma_range)
    size = images.shape[1]
    if size is None:
        raise ValueError("gaussian_blur needs images of a static height")
    radius = blur_kernel_size(size) // 2
    offsets = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    taps = tf.exp(-tf.square(offsets) / (2.0 * tf.square(sigma[:, tf.newaxis])))  # [N, k]
    taps /= tf.reduce_sum(taps, axis=1, keepdims=True)
    padding = [[0, 0], [radius, radius], [radius, radius], [0, 0]]
    padded = tf.pad(images, padding, mode="REFLECT")
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    rows = sum(_per_image(taps[:, k]) * padded[:, k : k + height] for k in range(2 * radius + 1))
    blurred = sum(_per_image(taps[:, k]) * rows[:, :, k : k + width] for k in range(2 * radius + 1))
    return tf.clip_by_value(blurred, 0.0, 1.0)


def sample_rotation_angles(seed: tf.Tensor, num: int | tf.Tensor, max_degrees: float) -> tf.Tensor:
    """``num`` angles in radians, uniform in [-max_degrees, max_degrees] degrees."""
    max_radians = math.radians(max_degrees)
    return _uniform(seed, num, -max_radians, max_radians)


def rotate(images: tf.Tensor, angles: tf.Tensor) -> tf.Tensor:
    """Rotates each ``[N, H, W, C]`` image counter-clockwise (as displayed) by ``angles[n]``.

    The rotation is about the image centre, ``((W - 1) / 2, (H - 1) / 2)`` in pixel
    coordinates, so a quarter turn of a square image permutes its pixels exactly. Values are
    interpolated bilinearly; output pixels whose source lies outside the image are filled with
    0 (black corners), the usual fill for rotation augmentations. Returns float32 in [0, 1].
    """
    images = _to_float(images, batched=True)
    angles = tf.cast(angles, tf.float32)
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    center_x, center_y = (width - 1) / 2, (height - 1) / 2
    cos, sin = tf.cos(angles), tf.sin(angles)
    zeros = tf.zeros_like(angles)
    # Maps each output pixel (x, y) to the input point it samples: the inverse rotation.
    transforms = tf.stack(
        [
            cos,
            -sin,
            center_x - cos * center_x + sin * center_y,
            sin,
            cos,
            center_y - sin * center_x - cos * center_y,
            zeros,
            zeros,
        ],
        axis=1,
    )
    rotated = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return tf.clip_by_value(tf.ensure_shape(rotated, images.shape), 0.0, 1.0)


def random_rotation(images: tf.Tensor, seed: tf.Tensor, max_degrees: float) -> tf.Tensor:
    """`rotate` each image by its own angle, drawn by `sample_rotation_angles` from ``seed``."""
    images = _to_float(images, batched=True)
    return rotate(images, sample_rotation_angles(seed, tf.shape(images)[0], max_degrees))


def distort(views: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Everything of a SimCLR view after the crop, for each of ``[N, S, S, C]`` cropped views.

    In order: rotation (only when ``rotation_degrees`` > 0), flip, colour jitter, grayscale
    (independent of the jitter), blur; each view gets its own coin flips (with the configured
    probabilities) and parameters. The random draws do not depend on the probabilities, so
    turning one op on or off leaves every other op's randomness unchanged.
    """
    views = _to_float(views, batched=True)
    rotation_seed, flip_gate, jitter_gate, jitter_seed, gray_gate, blur_gate, blur_seed = _split(
        seed, 7
    )
    if config.rotation_degrees > 0:
        views = random_rotation(views, rotation_seed, config.rotation_degrees)
    views = _random_apply(lambda x: tf.reverse(x, axis=[2]), config.flip_prob, flip_gate, views)
    jitter = functools.partial(
        color_jitter,
        seed=jitter_seed,
        strength=config.color_jitter_strength,
        brightness_mode=config.brightness_mode,
    )
    views = _random_apply(jitter, config.color_jitter_prob, jitter_gate, views)
    views = _random_apply(to_grayscale, config.grayscale_prob, gray_gate, views)
    blur = functools.partial(gaussian_blur, seed=blur_seed, sigma_range=config.blur_sigma_range)
    views = _random_apply(blur, config.blur_prob, blur_gate, views)
    return views


def simclr_views(image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Two independent SimCLR views of one ``[H, W, C]`` image: float32 ``[2, size, size, C]``.

    Accepts uint8 (0..255) or float ([0, 1]) input, of any size (each crop is sliced out and
    resized on its own, so this suits variable-size datasets). The views are exactly those
    `simclr_views_batch` gives for a batch of this one image and the same seed.
    """
    image = _to_float(image)
    crop_seed, distort_seed = _split(seed, 2)
    shape = tf.shape(image)
    boxes = sample_crop_boxes(
        shape[0], shape[1], crop_seed, 2, config.crop_area_range, config.crop_aspect_range
    )
    crops = tf.stack([_crop_and_resize(image, boxes[i], config.image_size) for i in range(2)])
    return distort(crops, distort_seed, config)


def simclr_views_batch(images: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Two SimCLR views of each ``[B, H, W, C]`` image: float32 ``[B, 2, size, size, C]``.

    The fast path for datasets whose images share one size: every op runs once on the whole
    batch (crops by `resized_crops`), with all random draws made from one ``seed``.
    """
    images = _to_float(images, batched=True)
    shape = tf.shape(images)
    crop_seed, distort_seed = _split(seed, 2)
    boxes = sample_crop_boxes(
        shape[1],
        shape[2],
        crop_seed,
        2 * shape[0],
        config.crop_area_range,
        config.crop_aspect_range,
    )
    # Rows 2b and 2b + 1 are the two views of image b.
    crops = resized_crops(tf.repeat(images, 2, axis=0), boxes, config.image_size)
    views = distort(crops, distort_seed, config)
    size, channels = config.image_size, _num_channels(images, batched=True)
    return tf.reshape(views, [-1, 2, size, size, channels])


def small_views(image: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Multi-crop's small views of one ``[H, W, C]`` image: float32 ``[S, s, s, C]``.

    ``S = config.num_small_crops``, ``s = config.small_crop_size``. As `simclr_views` (any image
    size, crops resized one by one), with crop areas drawn from ``small_crop_area_range`` without
    the large crops' 10% floor; exactly the views `small_views_batch` gives for a batch of this
    one image and the same seed.
    """
    image = _to_float(image)
    crop_seed, distort_seed = _split(seed, 2)
    shape = tf.shape(image)
    num = config.num_small_crops
    boxes = sample_crop_boxes(
        shape[0],
        shape[1],
        crop_seed,
        num,
        config.small_crop_area_range,
        config.crop_aspect_range,
        min_covered=0.0,
    )
    size = config.small_crop_size
    crops = tf.stack([_crop_and_resize(image, boxes[i], size) for i in range(num)])
    return distort(crops, distort_seed, config)


def small_views_batch(images: tf.Tensor, seed: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """Multi-crop's small views of each ``[B, H, W, C]`` image: float32 ``[B, S, s, s, C]``.

    ``S = config.num_small_crops`` independent views per image, each a random crop whose area
    fraction lies in ``small_crop_area_range`` (aspect as the large views'; no 10% floor, so
    the configured range alone decides), bicubic-resized to ``s = config.small_crop_size``
    pixels, then distorted exactly as the large views are (`distort`: flip, colour jitter,
    grayscale, blur, and rotation when on). The batched counterpart of `small_views`.
    """
    images = _to_float(images, batched=True)
    shape = tf.shape(images)
    num = config.num_small_crops
    crop_seed, distort_seed = _split(seed, 2)
    boxes = sample_crop_boxes(
        shape[1],
        shape[2],
        crop_seed,
        num * shape[0],
        config.small_crop_area_range,
        config.crop_aspect_range,
        min_covered=0.0,
    )
    # Rows num·b to num·b + num - 1 are the small views of image b.
    crops = resized_crops(tf.repeat(images, num, axis=0), boxes, config.small_crop_size)
    views = distort(crops, distort_seed, config)
    size, channels = config.small_crop_size, _num_channels(images, batched=True)
    return tf.reshape(views, [-1, num, size, size, channels])


def linear_eval_augment(image: tf.Tensor, seed: tf.Tensor, image_size: int) -> tf.Tensor:
    """Training augmentation for linear evaluation: random crop + resize and flip only."""
    crop_seed, flip_seed = _split(seed, 2)
    image = random_resized_crop(image, crop_seed, image_size)
    flip = _uniform(flip_seed, 1, 0.0, 1.0)[0] < DEFAULT_FLIP_PROB
    return tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)


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


def _crop_and_resize(image: tf.Tensor, box: tf.Tensor, size: int) -> tf.Tensor:
    """Slices ``box = (top, left, height, width)`` out of one image and resizes it."""
    crop = tf.slice(image, tf.stack([box[0], box[1], 0]), tf.stack([box[2], box[3], -1]))
    # Slicing with a dynamic size drops the static channel count; restore it.
    return _resize(tf.ensure_shape(crop, [None, None, _num_channels(image)]), size)


def _bicubic_matrices(
    starts: tf.Tensor, lengths: tf.Tensor, size: int, extent: tf.Tensor
) -> tf.Tensor:
    """``[N, size, extent]`` matrices resampling ``[start, start + length)`` of an axis of
    ``extent`` pixels to ``size`` pixels, as ``tf.image.resize(..., "bicubic")`` does.

    That resize (Keys' cubic kernel with a = -0.5, half-pixel centres) reads the fractional
    source position to 1/1024 of a pixel and gives taps outside the crop zero weight,
    renormalising the rest; the matrices do the same, so both crop paths agree.
    """
    a = _BICUBIC_A
    scale = tf.cast(lengths, tf.float32) / size
    positions = (tf.range(size, dtype=tf.float32) + 0.5) * scale[:, tf.newaxis] - 0.5
    base = tf.floor(positions)
    frac = tf.math.rint((positions - base) * _BICUBIC_TABLE_SIZE) / _BICUBIC_TABLE_SIZE

    def near(x):  # the kernel for |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # the kernel for 1 < |x| < 2, written in terms of x - 1
        x = x + 1
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    # Each pixel's distance to each sample point, in the crop's coordinates: the kernel's
    # argument. Pixels outside the crop get no weight.
    pixels = tf.range(extent, dtype=tf.float32) - tf.cast(starts, tf.float32)[:, tf.newaxis]
    pixels = pixels[:, tf.newaxis, :]  # [N, 1, extent]
    distance = tf.abs(pixels - (base + frac)[..., tf.newaxis])  # [N, size, extent]
    inside = (pixels >= 0) & (pixels < tf.cast(lengths, tf.float32)[:, tf.newaxis, tf.newaxis])
    weights = tf.where(distance <= 1, near(distance), far(distance - 1))
    weights = tf.where(inside & (distance < 2), weights, 0.0)
    return weights / tf.reduce_sum(weights, axis=-1, keepdims=True)


def _adjust_contrast(images: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """``tf.image.adjust_contrast`` with one factor per image: scales away from channel means."""
    mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
    return (images - mean) * factor + mean


def _adjust_saturation(images: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """``tf.image.adjust_saturation`` with one factor per image, without leaving RGB.

    In HSV terms each channel is ``v - v·s·k`` with ``k`` set by the hue, so scaling the
    saturation by ``f`` (clipped at 1) moves every channel away from the maximum by
    ``min(f, 1/s)``, with ``s = (max - min) / max``.
    """
    high = tf.reduce_max(images, axis=-1, keepdims=True)
    low = tf.reduce_min(images, axis=-1, keepdims=True)
    ratio = tf.minimum(factor, high / tf.maximum(high - low, 1e-12))
    return high - ratio * (high - images)


def _adjust_hue(images: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
    """``tf.image.adjust_hue`` with one shift (in turns) per image."""
    hue, saturation, value = tf.unstack(tf.image.rgb_to_hsv(images), axis=-1)
    hue = tf.math.floormod(hue + delta[..., 0], 1.0)
    return tf.image.hsv_to_rgb(tf.stack([hue, saturation, value], axis=-1))


def _random_apply(
    transform: Transform, prob: float, seed: tf.Tensor, images: tf.Tensor
) -> tf.Tensor:
    """Applies ``transform`` to each image with probability ``prob``; 0 adds no op at all."""
    if prob <= 0:
        return images
    apply = _uniform(seed, tf.shape(images)[0], 0.0, 1.0) < prob
    return tf.where(_per_image(apply), transform(images), images)


def _apply_in_random_order(
    images: tf.Tensor, transforms: Sequence[Transform], seed: tf.Tensor
) -> tf.Tensor:
    """Applies every transform once to each image, in a uniformly random order of its own,
    clipping to [0, 1] after each."""
    draws = tf.random.stateless_uniform(
        tf.stack([tf.shape(images)[0], len(transforms)]), _as_seed(seed)
    )
    order = tf.argsort(draws, axis=1)
    for position in range(len(transforms)):
        for index, transform in enumerate(transforms):
            chosen = _per_image(tf.equal(order[:, position], index))
            images = tf.where(chosen, tf.clip_by_value(transform(images), 0.0, 1.0), images)
    return images


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
    resized = tf.image.resize(image, [size, size], method=tf.image.ResizeMethod.BICUBIC)
    return tf.clip_by_value(resized, 0.0, 1.0)


def _to_float(image: tf.Tensor, batched: bool = False) -> tf.Tensor:
    """Integer images are scaled to [0, 1] by their dtype's maximum; floats are cast only."""
    image = tf.convert_to_tensor(image)
    _num_channels(image, batched)  # Rejects anything but [(N,) H, W, 1 or 3] early and clearly.
    return tf.image.convert_image_dtype(image, tf.float32)


def _num_channels(image: tf.Tensor, batched: bool = False) -> int:
    """Static channel count of a ``[H, W, C]`` image (``[N, H, W, C]`` when ``batched``)."""
    rank = 4 if batched else 3
    if image.shape.rank != rank or image.shape[-1] not in (1, 3):
        expected = "[N, H, W, 1 or 3]" if batched else "[H, W, 1 or 3]"
        raise ValueError(f"expected images of shape {expected}, got {image.shape}")
    return image.shape[-1]


def _per_image(values: tf.Tensor) -> tf.Tensor:
    """``[N]`` values shaped ``[N, 1, 1, 1]`` to broadcast over images."""
    return values[:, tf.newaxis, tf.newaxis, tf.newaxis]


def _as_seed(seed: tf.Tensor) -> tf.Tensor:
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        seed = tf.cast(seed, tf.int64)
    return tf.ensure_shape(seed, [2])


def _split(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
    """``num`` independent sub-seeds of ``seed``."""
    return tf.unstack(tf.random.experimental.stateless_split(_as_seed(seed), num))


def _uniform(seed: tf.Tensor, num: int | tf.Tensor, low: float, high: float) -> tf.Tensor:
    """``[num]`` draws from U[low, high); exactly ``low`` when the range is empty."""
    return tf.random.stateless_uniform(tf.reshape(num, [1]), _as_seed(seed), low, high)


def _as_range(name: str, values: Sequence[float]) -> tuple[float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {values}")
    return values


def _check_brightness_mode(mode: str) -> None:
    if mode not in _BRIGHTNESS_MODES:
        raise ValueError(f"brightness_mode must be one of {_BRIGHTNESS_MODES}, got {mode!r}")
