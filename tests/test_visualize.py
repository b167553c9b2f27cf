"""Tests for the PNG image grids."""

import numpy as np
import pytest
from PIL import Image

from simclr_jax import visualize


def test_grid_places_each_image_in_its_cell():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 3, 4, 5, 3)).astype(np.float32)
    grid = visualize.image_grid(images, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 6 + 1, 3)
    for r in range(2):
        for c in range(3):
            cell = grid[1 + r * 5 : 1 + r * 5 + 4, 1 + c * 6 : 1 + c * 6 + 5]
            np.testing.assert_array_equal(cell, np.round(images[r, c] * 255).astype(np.uint8))
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all()


def test_grey_images_are_repeated_and_scaled():
    images = np.full((1, 1, 2, 2, 1), 0.5, np.float32)
    grid = visualize.image_grid(images, padding=0, scale=3)
    assert grid.shape == (6, 6, 3)
    assert (grid == 128).all()


def test_save_writes_a_png_of_the_grid_size(tmp_path):
    path = tmp_path / "grid.png"
    visualize.save_image_grid(path, np.zeros((2, 4, 28, 28, 1)), padding=2, scale=2)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == ((4 * 30 + 2) * 2, (2 * 30 + 2) * 2)


def test_rejects_wrong_rank():
    with pytest.raises(ValueError, match="rows, cols"):
        visualize.image_grid(np.zeros((4, 28, 28, 1)))
