"""Tests for the SimCLR augmentation ops: shapes, determinism, probabilities, op semantics."""

import colorsys
import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_jax.data import augment

ALL_OFF = dict(flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


def _seeds(count: int, base: int = 0) -> np.ndarray:
    """``count`` shape-[2] int64 seeds, produced the way an input pipeline would."""
    return np.stack(list(tf.data.Dataset.random(seed=base).batch(2).take(count)))


def _map_over_seeds(fn, seeds: np.ndarray) -> np.ndarray:
    """Runs ``fn(seed)`` inside ``Dataset.map`` (graph mode) for every seed; stacks the results."""
    dataset = tf.data.Dataset.from_tensor_slices(seeds).map(fn, num_parallel_calls=2)
    return np.stack(list(dataset.as_numpy_iterator()))


def _colourful_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A uint8 RGB image whose pixels all have distinct channel values (never gray)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, (height, width, 1))
    return np.concatenate([base, base + 25, base + 50], axis=-1).astype(np.uint8)


def _binomial_bounds(trials: int, prob: float, num_sd: float = 4.5) -> tuple[float, float]:
    """Acceptance interval for a binomial count: mean ± num_sd standard deviations.

    The seeds are fixed, so the test is deterministic; 4.5 sd would reject a correct
    implementation for fewer than 1 in 100,000 seed choices.
    """
    mean, sd = trials * prob, math.sqrt(trials * prob * (1 - prob))
    return mean - num_sd * sd, mean + num_sd * sd


# --- Output contract ---------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_views_shape_dtype_range_and_uint8_scaling(channels):
    config = augment.AugmentConfig(image_size=24)
    image = np.random.default_rng(channels).integers(0, 256, (40, 36, channels), dtype=np.uint8)
    seed = tf.constant([7, 11], tf.int32)

    views = augment.simclr_views(image, seed, config).numpy()
    from_float = augment.simclr_views(image.astype(np.float32) / 255, seed, config).numpy()

    assert views.shape == (2, 24, 24, channels)
    assert views.dtype == np.float32
    assert views.min() >= 0.0 and views.max() <= 1.0
    assert not np.array_equal(views[0], views[1])
    np.testing.assert_allclose(views, from_float, atol=1e-5)


def test_same_seed_is_bit_identical_and_seeds_differ():
    config = augment.AugmentConfig(image_size=24)
    image = _colourful_image(32, 32)
    first = augment.simclr_views(image, tf.constant([1, 2], tf.int64), config).numpy()
    again = augment.simclr_views(image, tf.constant([1, 2], tf.int64), config).numpy()
    other = augment.simclr_views(image, tf.constant([1, 3], tf.int64), config).numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_deterministic_inside_dataset_map_and_matches_eager():
    config = augment.AugmentConfig(image_size=24)
    image = _colourful_image(40, 36)
    seeds = _seeds(6, base=3)

    def views(seed):
        return augment.simclr_views(image, seed, config)

    first_pass = _map_over_seeds(views, seeds)
    second_pass = _map_over_seeds(views, seeds)
    eager = np.stack([views(seed).numpy() for seed in seeds])

    assert first_pass.shape == (6, 2, 24, 24, 3)
    np.testing.assert_array_equal(first_pass, second_pass)
    np.testing.assert_array_equal(first_pass, eager)
    assert len({view.tobytes() for view in first_pass.reshape(12, -1)}) == 12


def test_all_ops_disabled_and_whole_image_crop_is_identity():
    config = augment.AugmentConfig(image_size=16, crop_area_range=(1.0, 1.0), **ALL_OFF)
    image = np.random.default_rng(0).random((16, 16, 3)).astype(np.float32)
    views = augment.simclr_views(image, [5, 6], config).numpy()
    np.testing.assert_allclose(views, np.stack([image, image]), atol=1e-6)
    batch = augment.simclr_views_batch(np.stack([image, image]), [5, 6], config).numpy()
    np.testing.assert_allclose(batch, np.broadcast_to(image, batch.shape), atol=1e-6)


# --- One image and a batch: the same views ------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "overrides"),
    [
        ((32, 32, 3), {}),
        ((40, 36, 3), {"rotation_degrees": 20.0, "brightness_mode": "additive"}),
        ((28, 28, 1), {"crop_area_range": (0.2, 1.0), "color_jitter_strength": 0.5}),
        ((30, 44, 1), {"blur_prob": 1.0, "flip_prob": 1.0}),
    ],
)
def test_views_of_one_image_equal_the_views_of_a_batch_of_it(shape, overrides):
    """`simclr_views` slices and resizes crops one by one; `simclr_views_batch` resamples the
    whole batch with interpolation matrices: with the same seed both give the same views."""
    config = augment.AugmentConfig(image_size=24, **overrides)
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    for seed in _seeds(4, base=sum(shape)):
        one = augment.simclr_views(image, seed, config).numpy()
        batch = augment.simclr_views_batch(image[None], seed, config).numpy()
        assert batch.shape == (1, 2, 24, 24, shape[-1])
        np.testing.assert_allclose(batch[0], one, atol=2e-5)


def test_batch_views_are_deterministic_and_independent_per_image():
    config = augment.AugmentConfig(image_size=16)
    images = np.repeat(_colourful_image(20, 20)[None], 6, axis=0)
    views = augment.simclr_views_batch(images, [1, 2], config).numpy()
    np.testing.assert_array_equal(views, augment.simclr_views_batch(images, [1, 2], config))
    assert views.shape == (6, 2, 16, 16, 3) and views.dtype == np.float32
    assert views.min() >= 0.0 and views.max() <= 1.0
    # One seed for the batch, yet every view of the same image is a different draw.
    assert len({view.tobytes() for view in views.reshape(12, -1)}) == 12
    assert not np.array_equal(views, augment.simclr_views_batch(images, [1, 3], config))


@pytest.mark.parametrize(
    ("height", "width", "channels", "size"), [(28, 28, 1, 28), (40, 36, 3, 24), (20, 50, 1, 33)]
)
def test_resized_crops_equal_slicing_and_tf_image_resize(height, width, channels, size):
    rng = np.random.default_rng(height + width)
    images = rng.random((8, height, width, channels)).astype(np.float32)
    boxes = augment.sample_crop_boxes(height, width, [4, 2], 8).numpy()
    boxes[0] = [0, 0, height, width]  # the whole image, at its own size or another
    crops = augment.resized_crops(images, boxes, size).numpy()
    for image, (top, left, box_h, box_w), crop in zip(images, boxes, crops, strict=True):
        piece = image[top : top + box_h, left : left + box_w]
        expected = tf.image.resize(piece, [size, size], method="bicubic").numpy()
        np.testing.assert_allclose(crop, np.clip(expected, 0, 1), atol=1e-5)


# --- Application frequencies --------------------------------------------------------------------

FREQUENCY_TRIALS = 2000


FREQUENCY_IMAGE = _colourful_image(16, 16)


def _augment_many(**probs: float) -> np.ndarray:
    """``FREQUENCY_TRIALS`` views of ``FREQUENCY_IMAGE`` with every op off except ``probs``.

    The random draws don't depend on the config, so the crop of each view is the same whatever
    the probabilities: views can be compared with the crop-only ones.
    """
    config = augment.AugmentConfig(image_size=12, **{**ALL_OFF, **probs})
    images = np.repeat(FREQUENCY_IMAGE[None], FREQUENCY_TRIALS // 2, axis=0)
    views = augment.simclr_views_batch(images, [9, 9], config).numpy()
    return views.reshape(FREQUENCY_TRIALS, *views.shape[2:])


@pytest.fixture(scope="module")
def crop_only_views() -> np.ndarray:
    return _augment_many()


def _is_gray(views: np.ndarray) -> np.ndarray:
    return np.all(views[..., :1] == views, axis=(1, 2, 3))


def test_grayscale_frequency():
    gray = _is_gray(_augment_many(grayscale_prob=0.2))
    low, high = _binomial_bounds(FREQUENCY_TRIALS, 0.2)
    assert low <= gray.sum() <= high


def test_grayscale_is_independent_of_color_jitter(crop_only_views):
    views = _augment_many(color_jitter_prob=0.8, grayscale_prob=0.2)
    gray_of_crop = augment.to_grayscale(crop_only_views).numpy()
    gray_without_jitter = [np.array_equal(v, g) for v, g in zip(views, gray_of_crop, strict=True)]
    gray_after_jitter = _is_gray(views) & ~np.array(gray_without_jitter)
    for count, prob in [
        (sum(gray_without_jitter), 0.2 * 0.2),
        (gray_after_jitter.sum(), 0.2 * 0.8),
    ]:
        low, high = _binomial_bounds(FREQUENCY_TRIALS, prob)
        assert low <= count <= high


@pytest.mark.parametrize(
    ("field", "prob", "was_applied"),
    [
        ("color_jitter_prob", 0.8, lambda out, ref: np.abs(out - ref).max() > 1e-4),
        ("flip_prob", 0.5, lambda out, ref: np.array_equal(out, ref[:, ::-1])),
    ],
)
def test_application_frequency(field, prob, was_applied, crop_only_views):
    views = _augment_many(**{field: prob})
    applied = sum(was_applied(out, ref) for out, ref in zip(views, crop_only_views, strict=True))
    low, high = _binomial_bounds(FREQUENCY_TRIALS, prob)
    assert low <= applied <= high


# --- Random resized crop ------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(32, 32), (48, 64)])
def test_crop_boxes_respect_area_and_aspect_ranges(height, width):
    boxes = augment.sample_crop_boxes(height, width, [0, 1], 1000).numpy()
    top, left, box_h, box_w = boxes.T
    area = box_h * box_w / (height * width)

    assert np.all(top >= 0) and np.all(left >= 0)
    assert np.all(top + box_h <= height) and np.all(left + box_w <= width)
    # area_range starts at 0.08, but as in official SimCLR the box must also cover 10% of the image.
    assert np.all(area >= 0.1) and np.all(area <= 1.0)
    # Width is rounded to whole pixels from height × aspect, so allow half a pixel.
    assert np.all(box_w >= 3 / 4 * box_h - 0.5) and np.all(box_w <= 4 / 3 * box_h + 0.5)
    # The whole area range is explored, and the whole-image fallback is rare.
    assert area.min() < 0.15 and area.max() > 0.9
    assert np.mean(area == 1.0) < 0.05


def test_crop_area_range_is_honoured():
    boxes = augment.sample_crop_boxes(64, 64, [3, 1], 300, area_range=(0.5, 0.7)).numpy()
    area = boxes[:, 2] * boxes[:, 3] / 64**2
    assert np.all(area >= 0.5 - 1e-9) and np.all(area <= 0.7 + 1e-9)


def test_crop_falls_back_to_whole_image_when_no_box_fits():
    # Any box with ≥ 99.9% of the area is the whole image, whose aspect 7/10 is out of range.
    boxes = augment.sample_crop_boxes(10, 7, [1, 2], 3, area_range=(0.999, 1.0)).numpy()
    np.testing.assert_array_equal(boxes, [[0, 0, 10, 7]] * 3)


@pytest.mark.parametrize("area_range", [(0.08, 1.0), (0.2, 1.0)])
def test_crop_sizes_follow_tensorflows_box_sampler(area_range):
    """Official SimCLR samples boxes with ``tf.image.sample_distorted_bounding_box``: the
    vectorised sampler must give boxes of the same size and position distribution."""
    num = 3000
    boxes = augment.sample_crop_boxes(28, 28, [5, 5], num, area_range).numpy()

    def reference_box(seed):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            [28, 28, 1],
            tf.zeros([1, 0, 4]),
            seed,
            min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=area_range,
            max_attempts=100,
            use_image_if_no_bounding_boxes=True,
        )
        return tf.stack([begin[:2], size[:2]])

    reference = _map_over_seeds(reference_box, _seeds(num, base=5))
    reference_offsets, reference = reference[:, 0, :2], reference[:, 1, :2]
    areas = boxes[:, 2] * boxes[:, 3] / 28**2
    reference_areas = reference[:, 0] * reference[:, 1] / 28**2
    quantiles = [0.05, 0.25, 0.5, 0.75, 0.95]
    np.testing.assert_allclose(
        np.quantile(areas, quantiles), np.quantile(reference_areas, quantiles), atol=0.03
    )
    assert (
        abs(np.mean(boxes[:, 3] / boxes[:, 2]) - np.mean(reference[:, 1] / reference[:, 0])) < 0.02
    )
    # Offsets too: uniform in [0, 28 - side), so a box shorter than the image never touches
    # the bottom or right edge.
    np.testing.assert_allclose(boxes[:, :2].mean(0), reference_offsets.mean(0), atol=0.3)
    assert np.all((boxes[:, :2] + boxes[:, 2:] < 28) | (boxes[:, 2:] == 28))


def test_random_resized_crop_output():
    image = _colourful_image(40, 30)
    out = augment.random_resized_crop(image, [3, 4], size=20).numpy()
    assert out.shape == (20, 20, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


# --- Colour jitter and grayscale ----------------------------------------------------------------


def test_color_jitter_factor_ranges_on_constant_colour():
    """On a constant-colour image contrast is the identity and brightness, saturation and hue
    act on V, S and H separately, so each factor can be read back in HSV."""
    hue, saturation, value, strength = 0.3, 0.4, 0.5, 0.5
    rgb = np.array(colorsys.hsv_to_rgb(hue, saturation, value), np.float32)
    image = np.broadcast_to(rgb, (4, 4, 3)).copy()
    pixels = augment.color_jitter(np.broadcast_to(image, (500, 4, 4, 3)), [2, 7], strength)
    pixels = pixels.numpy()[:, 0, 0]
    hsv = np.array([colorsys.rgb_to_hsv(*pixel) for pixel in pixels.astype(np.float64)])
    factors = {
        "brightness": (hsv[:, 2] / value, 1.0, 0.8 * strength),
        "saturation": (hsv[:, 1] / saturation, 1.0, 0.8 * strength),
        "hue": (hsv[:, 0] - hue, 0.0, 0.2 * strength),
    }
    for name, (samples, centre, spread) in factors.items():
        assert samples.min() >= centre - spread - 1e-3, name
        assert samples.max() <= centre + spread + 1e-3, name
        # Each of 500 draws misses the outer 5% of one side with probability 0.95.
        assert samples.min() < centre - 0.95 * spread, name
        assert samples.max() > centre + 0.95 * spread, name
        assert abs(samples.mean() - centre) < 0.1 * spread, name


@pytest.mark.parametrize(
    ("mode", "to_factor", "centre"),
    [("multiplicative", lambda out: out / 0.5, 1.0), ("additive", lambda out: out - 0.5, 0.0)],
)
def test_brightness_modes_on_single_channel(mode, to_factor, centre):
    image = np.full((4, 4, 1), 0.5, np.float32)  # Contrast is the identity on a constant image.
    images = np.broadcast_to(image, (300, 4, 4, 1))
    outputs = augment.color_jitter(images, [3, 1], 0.5, brightness_mode=mode).numpy()
    assert np.all(outputs == outputs[:, :1, :1])
    samples = to_factor(outputs[:, 0, 0, 0])
    assert samples.min() >= centre - 0.4 - 1e-6 and samples.max() <= centre + 0.4 + 1e-6
    assert samples.min() < centre - 0.38 and samples.max() > centre + 0.38


def test_strong_jitter_draws_factors_from_zero_not_below():
    """Above strength 1.25 the factors' range starts at 0 (``max(0, 1 - 0.8s)``): uniform on
    [0, 1 + 0.8s], with no mass piled at 0 as clipping a negative factor's output would give."""
    strength, value, draws = 1.5, 0.4, 2000  # 0.4 · 2.2 < 1: no clipping at the top either
    image = np.full((4, 4, 1), value, np.float32)  # Contrast is the identity on a constant image.
    outputs = augment.color_jitter(np.broadcast_to(image, (draws, 4, 4, 1)), [5, 2], strength)
    factors = outputs.numpy()[:, 0, 0, 0] / value
    high = 1 + 0.8 * strength
    assert factors.min() >= 0.0 and factors.max() <= high + 1e-5
    assert np.mean(factors < 1e-4) < 0.001
    assert factors.min() < 0.05 * high and factors.max() > 0.95 * high
    bounds = _binomial_bounds(draws, 0.5 / high)
    assert bounds[0] <= np.sum(factors < 0.5) <= bounds[1]


def test_color_jitter_order_is_random():
    """Brightness (B) and contrast (C) commute except for clipping, which reveals the order.

    On a half-black, half-white image with factors in [0.2, 1.8]:
    - B then C always gives lo + hi <= 1, and gives lo + hi == 1 with 0 < lo, hi < 1 exactly
      when f_B >= 1 and f_C < 1 (probability 1/8 overall);
    - C then B gives lo + hi > 1 exactly when f_B > 1 and f_C < 1 (probability 1/8 overall).
    A fixed order would make one of the two events impossible.
    """
    image = np.concatenate([np.zeros((2, 4, 1)), np.ones((2, 4, 1))]).astype(np.float32)
    trials = 800
    outputs = augment.color_jitter(np.broadcast_to(image, (trials, 4, 4, 1)), [8, 0], 1.0).numpy()
    low, high = outputs[:, 0, 0, 0], outputs[:, -1, 0, 0]
    brightness_first = (np.abs(low + high - 1) < 1e-5) & (low > 1e-4) & (high < 1 - 1e-4)
    contrast_first = low + high > 1 + 1e-4
    bounds = _binomial_bounds(trials, 1 / 8)
    assert bounds[0] <= brightness_first.sum() <= bounds[1]
    assert bounds[0] <= contrast_first.sum() <= bounds[1]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["multiplicative", "additive"])
def test_zero_strength_color_jitter_is_identity(channels, mode):
    image = np.random.default_rng(1).random((8, 8, channels)).astype(np.float32)
    images = np.broadcast_to(image, (5, 8, 8, channels))
    out = augment.color_jitter(images, [4, 4], 0.0, brightness_mode=mode).numpy()
    np.testing.assert_allclose(out, images, atol=1e-5)


def test_per_image_colour_ops_match_tensorflows_single_factor_ops():
    images = np.random.default_rng(7).random((8, 10, 10, 3)).astype(np.float32)
    factors = np.linspace(0.2, 1.8, 8, dtype=np.float32)
    deltas = np.linspace(-0.2, 0.2, 8, dtype=np.float32)
    per_image = factors[:, None, None, None]
    references = {
        "contrast": (
            augment._adjust_contrast(images, per_image),
            tf.image.adjust_contrast,
            factors,
        ),
        "saturation": (
            augment._adjust_saturation(images, per_image),
            tf.image.adjust_saturation,
            factors,
        ),
        "hue": (
            augment._adjust_hue(images, deltas[:, None, None, None]),
            tf.image.adjust_hue,
            deltas,
        ),
    }
    for name, (batched, single, values) in references.items():
        expected = np.stack([single(i, v).numpy() for i, v in zip(images, values, strict=True)])
        np.testing.assert_allclose(batched.numpy(), expected, atol=1e-5, err_msg=name)


def test_to_grayscale_uses_luminance_and_keeps_channels():
    image = np.random.default_rng(2).random((5, 6, 3)).astype(np.float32)
    gray = augment.to_grayscale(image).numpy()
    luminance = image @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    assert gray.shape == (5, 6, 3)
    for channel in range(3):
        np.testing.assert_allclose(gray[..., channel], luminance, atol=1e-4)
    single = image[..., :1]
    np.testing.assert_array_equal(augment.to_grayscale(single).numpy(), single)


# --- Gaussian blur ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("side", "kernel"), [(224, 23), (96, 9), (64, 7), (32, 3), (28, 3), (19, 1), (8, 1)]
)
def test_blur_kernel_size_rule(side, kernel):
    assert augment.blur_kernel_size(side) == kernel
    assert int(augment.blur_kernel_size(tf.constant(side))) == kernel


def test_blur_impulse_response_is_normalised_separable_gaussian():
    sigma, amplitudes = 1.5, np.array([1.0, 0.5, 0.25], np.float32)
    image = np.zeros((64, 64, 3), np.float32)
    image[30, 33] = amplitudes
    out = augment.gaussian_blur(image[None], [0, 1], sigma_range=(sigma, sigma)).numpy()[0]

    radius = 3  # blur_kernel_size(64) == 7
    taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    expected = np.zeros_like(image)
    window = np.outer(taps, taps)[..., None] * amplitudes
    expected[30 - radius : 30 + radius + 1, 33 - radius : 33 + radius + 1] = window
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_blur_removes_high_frequencies_and_keeps_constants():
    noise = np.random.default_rng(3).random((32, 32, 3)).astype(np.float32)
    constant = np.full((32, 32, 1), 0.7, np.float32)

    def high_frequency_energy(image):
        return np.sum(np.diff(image, axis=0) ** 2) + np.sum(np.diff(image, axis=1) ** 2)

    blurred = augment.gaussian_blur(np.stack([noise] * 4), [5, 0], sigma_range=(1.0, 2.0))
    assert blurred.shape == (4, *noise.shape)
    for image in blurred.numpy():
        assert high_frequency_energy(image) < 0.5 * high_frequency_energy(noise)
    # Reflection padding: no darkened border on a constant image.
    constants = np.stack([constant] * 4)
    np.testing.assert_allclose(augment.gaussian_blur(constants, [5, 1]).numpy(), constants, 1e-6)


def test_blur_draws_one_sigma_per_image():
    impulse = np.zeros((1, 32, 32, 1), np.float32)
    impulse[0, 16, 16] = 1.0
    blurred = augment.gaussian_blur(np.repeat(impulse, 50, axis=0), [6, 6]).numpy()
    peaks = blurred[:, 16, 16, 0]  # falls as σ grows
    assert len(np.unique(peaks)) > 45 and peaks.max() - peaks.min() > 0.3


def test_blur_with_tiny_sigma_is_identity():
    image = np.random.default_rng(4).random((40, 40, 3)).astype(np.float32)
    out = augment.gaussian_blur(image[None], [2, 3], sigma_range=(1e-3, 1e-3)).numpy()
    np.testing.assert_allclose(out[0], image, atol=1e-7)


# --- Evaluation and linear-evaluation preprocessing ----------------------------------------------


def test_eval_preprocess_leaves_32px_images_untouched():
    image = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = augment.eval_preprocess(image, 32).numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, image / 255, atol=1e-7)


def test_eval_preprocess_center_crop_picks_the_centre():
    image = np.random.default_rng(6).random((11, 9, 1)).astype(np.float32)
    # Side round(0.45 * 9) = 4, offsets ((11 - 4 + 1) // 2, (9 - 4 + 1) // 2) = (4, 3).
    out = augment.eval_preprocess(image, 4, center_crop_fraction=0.45).numpy()
    np.testing.assert_allclose(out, image[4:8, 3:7], atol=1e-6)


def test_eval_preprocess_in_graph_mode_with_unknown_size():
    images = [_colourful_image(48, 40), _colourful_image(32, 32)]
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(images), output_signature=tf.TensorSpec([None, None, 3], tf.uint8)
    )
    for fraction in (None, 0.875):
        mapped = dataset.map(lambda x, f=fraction: augment.eval_preprocess(x, 32, f))
        assert mapped.element_spec.shape.as_list()[-1] == 3
        outputs = list(mapped.as_numpy_iterator())
        assert all(out.shape == (32, 32, 3) for out in outputs)
        if fraction is None:
            np.testing.assert_allclose(outputs[1], images[1] / 255, atol=1e-7)


def test_linear_eval_augment_changes_geometry_only():
    colour = np.array([0.2, 0.5, 0.9], np.float32)
    constant = np.broadcast_to(colour, (40, 40, 3))
    textured = _colourful_image(40, 40)
    for seed in _seeds(4):
        out = augment.linear_eval_augment(constant, seed, 24).numpy()
        np.testing.assert_allclose(out, np.broadcast_to(colour, (24, 24, 3)), atol=1e-6)
        first = augment.linear_eval_augment(textured, seed, 24).numpy()
        np.testing.assert_array_equal(first, augment.linear_eval_augment(textured, seed, 24))


# --- Configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"image_size": 0},
        {"image_size": 32.0},
        {"crop_area_range": (0.5, 0.2)},
        {"crop_area_range": (0.08, 1.5)},
        {"crop_aspect_range": (0.0, 1.0)},
        {"blur_sigma_range": (0.1, 2.0, 3.0)},
        {"flip_prob": 1.5},
        {"grayscale_prob": -0.1},
        {"color_jitter_strength": -1.0},
        {"brightness_mode": "gamma"},
    ],
)
def test_config_rejects_invalid_values(overrides):
    with pytest.raises(ValueError):
        augment.AugmentConfig(**{"image_size": 32, **overrides})


def test_config_normalises_ranges_to_tuples():
    config = augment.AugmentConfig(image_size=32, crop_area_range=[0.2, 1])
    assert config.crop_area_range == (0.2, 1.0)
    assert dataclasses.replace(config, blur_prob=0.0).crop_area_range == (0.2, 1.0)
    hash(config)


def test_images_must_have_one_or_three_channels():
    config = augment.AugmentConfig(8)
    with pytest.raises(ValueError, match="1 or 3"):
        augment.simclr_views(np.zeros((8, 8, 4), np.float32), [0, 1], config)
    with pytest.raises(ValueError, match=r"\[N, H, W, 1 or 3\]"):
        augment.simclr_views_batch(np.zeros((8, 8, 3), np.float32), [0, 1], config)


# --- Multi-crop's small views --------------------------------------------------------------------


def _multi_crop_config(**overrides) -> augment.AugmentConfig:
    return augment.AugmentConfig(
        image_size=16, num_small_crops=3, small_crop_size=8, **{"blur_prob": 0.0, **overrides}
    )


def test_small_views_shapes_ranges_and_independent_draws():
    config = _multi_crop_config(blur_prob=0.5)
    images = np.repeat(_colourful_image(24, 24)[None], 4, axis=0)
    small = augment.small_views_batch(images, [4, 2], config).numpy()
    assert small.shape == (4, 3, 8, 8, 3) and small.dtype == np.float32
    assert small.min() >= 0.0 and small.max() <= 1.0
    np.testing.assert_array_equal(small, augment.small_views_batch(images, [4, 2], config))
    # Four copies of one image, one seed: every small view is a different crop and distortion.
    assert len({view.tobytes() for view in small.reshape(12, -1)}) == 12
    # One image at a time (crops sliced and resized one by one) gives the same views.
    for seed in _seeds(2, base=7):
        one = augment.small_views(images[0], seed, config).numpy()
        np.testing.assert_allclose(
            augment.small_views_batch(images[:1], seed, config)[0], one, atol=2e-5
        )


def test_small_crops_follow_their_own_area_range_below_the_ten_percent_floor():
    """The large crops' 10% floor would turn SwAV's (0.05, 0.14) into (0.1, 0.14)."""
    area_range = augment.DEFAULT_SMALL_CROP_AREA_RANGE
    boxes = augment.sample_crop_boxes(64, 64, [5, 6], 500, area_range, min_covered=0.0).numpy()
    area = boxes[:, 2] * boxes[:, 3] / 64**2
    assert np.all(area >= 0.05) and np.all(area <= 0.14)
    assert np.mean(area < 0.1) > 0.3  # the lower part of the range is used
    floored = augment.sample_crop_boxes(64, 64, [5, 6], 500, area_range).numpy()
    assert np.all(floored[:, 2] * floored[:, 3] / 64**2 >= 0.1)


def test_small_views_are_crops_resized_to_the_small_side():
    """With every distortion off, a small view of a horizontal ramp is a ramp over a part of it."""
    config = _multi_crop_config(flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0)
    ramp = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32)[None, :, None], (32, 1, 1))
    small = augment.small_views_batch(ramp[None], [0, 9], config).numpy()[0]
    spans = small[:, :, -1, 0].mean(axis=1) - small[:, :, 0, 0].mean(axis=1)
    # A crop of at most 14% of the area is at most ~43% of the width (aspect up to 4/3).
    assert np.all(spans > 0) and np.all(spans < 0.45)


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_small_crops": -1},
        {"num_small_crops": 2.0},
        {"num_small_crops": 2, "small_crop_size": 0},
        {"small_crop_area_range": (0.14, 0.05)},
        {"small_crop_area_range": (0.05, 1.2)},
    ],
)
def test_config_rejects_invalid_multi_crop_values(overrides):
    with pytest.raises(ValueError):
        augment.AugmentConfig(**{"image_size": 32, **overrides})
