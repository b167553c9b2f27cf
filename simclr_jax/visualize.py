"""Pictures of a run as PNG files: image grids (augmented views, neighbours, reconstructions).

Pillow only, no plotting library: a grid is a mosaic of images at their own resolution, scaled up
by an integer factor so that 28-32 px images stay legible.
"""

import os

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, *, padding: int = 2, scale: int = 1) -> np.ndarray:
    """``[rows, cols, H, W, C]`` floats in [0, 1] -> one ``uint8`` mosaic ``[h, w, 3]``.

    Cells are separated by ``padding`` white pixels and each pixel becomes a ``scale``×``scale``
    block. One-channel images are shown in grey; values outside [0, 1] are clipped.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 5 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images [rows, cols, H, W, 1|3], got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    rows, cols, height, width, _ = images.shape
    cell_h, cell_w = height + padding, width + padding
    grid = np.ones((rows * cell_h + padding, cols * cell_w + padding, 3), np.float32)
    for r in range(rows):
        for c in range(cols):
            top, left = padding + r * cell_h, padding + c * cell_w
            grid[top : top + height, left : left + width] = images[r, c]
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    return np.round(np.clip(grid, 0.0, 1.0) * 255).astype(np.uint8)


def save_image_grid(path: str | os.PathLike, images: np.ndarray, **grid_kwargs) -> None:
    """Writes :func:`image_grid` of ``images`` (``[rows, cols, H, W, C]`` in [0, 1]) as a PNG."""
    Image.fromarray(image_grid(images, **grid_kwargs)).save(os.fspath(path), format="PNG")
