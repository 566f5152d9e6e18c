"""The attention-maps picture: one row per (block, head), one column per time, each tile one map in a viridis-like
colour scale, the query token outlined in red. Each row shares one scale (0 .. the row's largest probability), so
the columns of a row compare directly: a map that spreads out over time gets darker, one that sharpens brighter."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TILE = 96  # pixels per map side (a multiple of the usual windows 4, 8, 16, 32)
PAD = 2  # white gap between tiles and around the grid
LABEL_WIDTH = 56  # left column with the row captions
HEADER_HEIGHT = 14  # top row with the column captions
QUERY_COLOUR = (255, 32, 32)

# Viridis at 0, 1/8, ..., 1 (matplotlib's table), interpolated linearly.
_ANCHORS = np.array(
    [
        (68, 1, 84),
        (71, 44, 122),
        (59, 82, 139),
        (44, 114, 142),
        (33, 145, 140),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ],
    dtype=np.float64,
)


def colourise(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB [..., 3] on the viridis scale."""
    position = np.clip(values, 0.0, 1.0) * (len(_ANCHORS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_ANCHORS) - 2)
    weight = (position - low)[..., None]
    return np.round(_ANCHORS[low] * (1 - weight) + _ANCHORS[low + 1] * weight).astype(np.uint8)


@dataclass(frozen=True)
class Row:
    """One row of the picture: its caption, one map per time ([times, s, s]) and the query's (row, col) in it."""

    caption: str
    maps: np.ndarray
    query: tuple[int, int]


def picture_size(rows: int, columns: int) -> tuple[int, int]:
    """(height, width) in pixels of a picture of `rows` x `columns` tiles."""
    return HEADER_HEIGHT + rows * (TILE + PAD) + PAD, LABEL_WIDTH + columns * (TILE + PAD) + PAD


def _tile(values: np.ndarray, scale: float, query: tuple[int, int]) -> np.ndarray:
    """One map -> a TILE x TILE uint8 RGB tile (nearest), the query cell outlined."""
    size = values.shape[0]
    index = (np.arange(TILE) * size) // TILE  # nearest source cell of each output pixel
    tile = colourise(values[np.ix_(index, index)] / scale)
    top, bottom = (query[0] * TILE) // size, ((query[0] + 1) * TILE) // size - 1
    left, right = (query[1] * TILE) // size, ((query[1] + 1) * TILE) // size - 1
    if bottom - top >= 2 and right - left >= 2:  # a cell of at least 3 pixels: outline it
        tile[top, left : right + 1] = tile[bottom, left : right + 1] = QUERY_COLOUR
        tile[top : bottom + 1, left] = tile[top : bottom + 1, right] = QUERY_COLOUR
    else:
        tile[top : bottom + 1, left : right + 1] = QUERY_COLOUR
    return tile


def render(rows: list[Row], column_captions: list[str], corner: str = "") -> np.ndarray:
    """The picture as uint8 [H, W, 3] (`picture_size`)."""
    from PIL import Image, ImageDraw

    height, width = picture_size(len(rows), len(column_captions))
    picture = np.full((height, width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        peak = float(np.max(row.maps))
        scale = peak if peak > 0 else 1.0
        top = HEADER_HEIGHT + PAD + r * (TILE + PAD)
        for c in range(len(column_captions)):
            left = LABEL_WIDTH + PAD + c * (TILE + PAD)
            picture[top : top + TILE, left : left + TILE] = _tile(row.maps[c], scale, row.query)
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    draw.text((2, 1), corner, fill="black")
    for c, caption in enumerate(column_captions):
        draw.text((LABEL_WIDTH + PAD + c * (TILE + PAD) + 2, 1), caption, fill="black")
    for r, row in enumerate(rows):
        draw.text((2, HEADER_HEIGHT + PAD + r * (TILE + PAD) + TILE // 2 - 5), row.caption, fill="black")
    return np.asarray(image)
