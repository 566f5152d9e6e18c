"""Image grids: samples, previews and reconstructions tiled with `torchvision.utils.make_grid`, saved as PNG.

Images are uint8 [N, H, W, 3] arrays (what the stages produce); a grid is one uint8 [H', W', 3] array.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_path

LABEL_HEIGHT = 12


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = 0, pad_value: int = 0) -> np.ndarray:
    """Tile uint8 [N, H, W, 3] images row by row into `columns` columns (default: a near-square grid)."""
    import torch
    from torchvision.utils import make_grid

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(f"image_grid takes a non-empty uint8 [N, H, W, 3] array, got {images.dtype} {images.shape}")
    columns = columns or math.ceil(math.sqrt(len(images)))
    if len(images) == 1:  # make_grid returns a single image as it is, without the border
        border = ((padding, padding), (padding, padding), (0, 0))
        return np.pad(images[0], border, constant_values=pad_value)
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    grid = make_grid(tensor, nrow=columns, padding=padding, pad_value=pad_value)
    return grid.permute(1, 2, 0).contiguous().numpy()


def labelled_tiles(images: np.ndarray, captions: list[str], scale: int = 1) -> np.ndarray:
    """Each image enlarged `scale` times (nearest) with its caption written in a white strip under it."""
    from PIL import Image, ImageDraw

    count, height, width = images.shape[:3]
    tiles = np.full((count, height * scale + LABEL_HEIGHT, width * scale, 3), 255, dtype=np.uint8)
    for index, (image, caption) in enumerate(zip(images, captions)):
        tile = Image.fromarray(tiles[index])
        tile.paste(Image.fromarray(image).resize((width * scale, height * scale), Image.NEAREST), (0, 0))
        ImageDraw.Draw(tile).text((1, height * scale), caption, fill="black")
        tiles[index] = np.asarray(tile)
    return tiles


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Save a uint8 [H, W, 3] array as a PNG, atomically."""
    from PIL import Image

    with atomic_path(path) as temp:
        Image.fromarray(np.asarray(image)).save(temp, format="PNG")
    return Path(path)
