"""The optional random-rotation augmentation: geometry, sampled angles, range and wiring."""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from simclr_jax.data import augment

ndimage = pytest.importorskip("scipy.ndimage")

ALL_OFF = dict(flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)


def _seed(value: int) -> tf.Tensor:
    return tf.constant([value, 7], tf.int64)


@pytest.mark.parametrize(("side", "channels"), [(28, 1), (32, 3)])
def test_quarter_turn_equals_numpy_rot90(side, channels):
    image = np.random.default_rng(0).random((side, side, channels)).astype(np.float32)
    rotated = augment.rotate(image[None], [math.pi / 2]).numpy()[0]
    np.testing.assert_allclose(rotated, np.rot90(image), atol=1e-5)  # float32 cos(π/2) ≠ 0


def test_rotation_by_the_sampled_angle_matches_scipy():
    """scipy's bilinear rotation about the centre, zero outside the image, is the reference."""
    image = np.random.default_rng(1).random((28, 28, 3)).astype(np.float32)
    for value in range(3):
        seed = _seed(value)
        angle = float(augment.sample_rotation_angles(seed, 1, 15.0)[0])
        assert 0 < abs(math.degrees(angle)) <= 15.0
        expected = ndimage.rotate(
            image, math.degrees(angle), reshape=False, order=1, mode="grid-constant", cval=0.0
        )
        rotated = augment.random_rotation(image[None], seed, 15.0).numpy()[0]
        np.testing.assert_allclose(rotated, expected, atol=1e-5)


def test_sampled_angles_cover_the_range_uniformly():
    angles = np.degrees(augment.sample_rotation_angles(_seed(0), 2000, 15.0).numpy())
    assert np.all(np.abs(angles) <= 15.0)
    counts, _ = np.histogram(angles, bins=6, range=(-15, 15))
    assert counts.min() > 250  # about 333 per bin


@pytest.mark.parametrize("channels", [1, 3])
def test_rotation_keeps_shape_dtype_and_range(channels):
    image = np.random.default_rng(2).integers(0, 256, (32, 32, channels)).astype(np.uint8)
    rotated = augment.random_rotation(image[None], _seed(3), 30.0).numpy()[0]
    assert rotated.shape == image.shape and rotated.dtype == np.float32
    assert rotated.min() >= 0.0 and rotated.max() <= 1.0
    assert rotated[0, 0].max() < image[0, 0].max() / 255  # a corner takes the zero fill


def test_views_rotate_only_when_enabled_and_keep_the_other_ops():
    image = np.random.default_rng(3).random((28, 28, 1)).astype(np.float32)
    whole = dict(crop_area_range=(1.0, 1.0), crop_aspect_range=(1.0, 1.0))
    plain = augment.AugmentConfig(image_size=28, **whole)
    rotating = dataclasses.replace(plain, rotation_degrees=15.0)
    seed = _seed(4)
    # Rotation does not change the other ops' randomness: only the geometry step is added.
    np.testing.assert_array_equal(
        augment.simclr_views(image, seed, dataclasses.replace(plain, rotation_degrees=0.0)),
        augment.simclr_views(image, seed, plain),
    )
    assert not np.allclose(
        augment.simclr_views(image, seed, rotating), augment.simclr_views(image, seed, plain)
    )
    # With every other op off and a whole-image crop, each view is the image rotated by its own
    # angle, drawn from the rotation's sub-seed.
    only_rotation = dataclasses.replace(rotating, **ALL_OFF)
    views = augment.simclr_views(image, seed, only_rotation).numpy()
    assert views.shape == (2, 28, 28, 1)
    distort_seed = augment._split(seed, 2)[1]
    rotation_seed = augment._split(distort_seed, 7)[0]
    expected = augment.random_rotation(np.stack([image, image]), rotation_seed, 15.0)
    np.testing.assert_allclose(views, expected, atol=1e-6)
    assert not np.allclose(views[0], views[1])


@pytest.mark.parametrize("degrees", [-1.0, 181.0])
def test_config_rejects_rotation_out_of_range(degrees):
    with pytest.raises(ValueError, match="rotation_degrees"):
        augment.AugmentConfig(image_size=28, rotation_degrees=degrees)
