"""Image grids of binary samples, for `rws sample` and TensorBoard."""

import math
from pathlib import Path

import numpy as np
import torch


def square_shape(num_pixels: int) -> tuple[int, int] | None:
    """(side, side) if `num_pixels` is a perfect square (28 x 28 for MNIST), else None."""
    side = int(round(math.sqrt(num_pixels)))
    return (side, side) if side * side == num_pixels else None


def image_grid(
    images: torch.Tensor, image_shape: tuple[int, int] = (28, 28), nrow: int | None = None, padding: int = 2
) -> np.ndarray:
    """Tile N flat images [N, H*W] with values in [0, 1] into one uint8 grayscale array [rows, cols].

    `nrow` images per row (default: a square-ish grid; at most N); tiles are separated by `padding`
    gray pixels.
    """
    height, width = image_shape
    images = images.detach().float().cpu().reshape(-1, height, width).clamp(0, 1)
    num = images.shape[0]
    nrow = min(nrow or math.ceil(math.sqrt(num)), num)
    ncol = math.ceil(num / nrow)
    grid = np.full((ncol * (height + padding) + padding, nrow * (width + padding) + padding), 128, np.uint8)
    pixels = (images.numpy() * 255).round().astype(np.uint8)
    for i in range(num):
        top, left = padding + (i // nrow) * (height + padding), padding + (i % nrow) * (width + padding)
        grid[top : top + height, left : left + width] = pixels[i]
    return grid


def image_extensions() -> set[str]:
    """The file extensions Pillow can write an image to ('.png', '.jpg', ...), in lower case."""
    from PIL import Image  # why here: only `rws sample` needs Pillow, not the training hot path

    Image.init()
    return {extension for extension, format in Image.registered_extensions().items() if format in Image.SAVE}


def save_image(grid: np.ndarray, path: str | Path) -> None:
    """Write a uint8 grayscale array as an image file, its format from the extension; missing parent
    directories are created."""
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid, mode="L").save(path)
