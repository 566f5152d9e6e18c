"""Small image datasets held in memory (`LabelledImages`): `load_labelled_images` reads an image folder (class tree
or flat), a procedural dataset root (its train split, `resolve_split_dir`) or packed raw shards into one uint8
array.

`load_labelled_images(data, resolution)` reads an image folder (class tree or flat) or packed raw shards into one
uint8 array, through the same decoding and ADM centre crop as `encode` / `pack`; the VAE fitter and the
class-consistency classifier use it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.demo.procedural import DATASET_FORMAT, DATASET_JSON, ProceduralDatasetError

logger = logging.getLogger(__name__)


@dataclass
class LabelledImages:
    """Images of a dataset held in memory: uint8 [N, R, R, 3], labels int64 [N] (-1 = unlabelled)."""

    images: np.ndarray
    labels: np.ndarray
    label_map: dict[str, int]
    root: str
    paths: list[str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for an unlabelled dataset)."""
        return len(self.label_map)

    def subset(self, indices: np.ndarray) -> LabelledImages:
        """The images at `indices` (same label map)."""
        indices = np.asarray(indices, dtype=np.int64)
        return LabelledImages(
            self.images[indices], self.labels[indices], self.label_map, self.root, [self.paths[i] for i in indices]
        )


def resolve_split_dir(data: str | os.PathLike, split: str = "train") -> Path:
    """`data` itself, or `data/<split>` when `data` is the root of a procedural dataset (it has `dataset.json`)."""
    path = Path(data).expanduser()
    marker = path / DATASET_JSON
    if marker.is_file() and (path / split).is_dir():
        try:
            is_procedural = json.loads(marker.read_text(encoding="utf-8")).get("format") == DATASET_FORMAT
        except (OSError, ValueError):
            is_procedural = False
        if is_procedural:
            logger.info("%s is a procedural dataset root: using its %r split %s", path, split, path / split)
            return path / split
    return path


def load_labelled_images(
    data: str | os.PathLike, resolution: int, max_images: int | None = None, seed: int = 0, progress: bool = False
) -> LabelledImages:
    """Read an image folder (class tree or flat) or packed raw shards into memory at `resolution`.

    Images go through the decoding and ADM centre crop of `encode` / `pack`. With `max_images`, a random subset
    (fixed by `seed`, kept in source order) is read. A procedural dataset root means its `train` split. An image
    that cannot be decoded raises an error naming it: these datasets are small and meant to be clean.
    """
    from pipeline.encode import ImageDecodeError, prepare_image, read_item_bytes, scan_source

    source = scan_source(resolve_split_dir(data))
    items = source.items
    if max_images is not None and len(items) > max_images:
        chosen = np.sort(np.random.default_rng(seed).choice(len(items), size=max_images, replace=False))
        items = [items[i] for i in chosen]
    images = np.empty((len(items), resolution, resolution, 3), dtype=np.uint8)
    iterator = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc="load images", unit="img", mininterval=1.0)
    for position, item in enumerate(iterator):
        try:
            images[position], _ = prepare_image(read_item_bytes(item, source.root), resolution)
        except (ImageDecodeError, OSError) as error:
            raise ProceduralDatasetError(f"cannot use image {item.path} of {source.root}: {error}") from error
    labels = np.asarray([item.label for item in items], dtype=np.int64)
    return LabelledImages(images, labels, dict(source.label_map), source.root, [item.path for item in items])
