"""Datasets of uint8 CHW image tensors for the Inception feature extractor: the zarr sample store, in-memory or
memory-mapped arrays (ADM `.npz`), image folders, and the raw image shards written by `pack` (read in place)."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.errors import InputError
from pipeline.evaluate.sample_store import SampleStore

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ReferenceInputError(InputError):
    """The reference set is unusable (missing, wrong resolution, no images, ...)."""


class SampleStoreDataset(Dataset):
    """The images of a zarr sample store as uint8 CHW tensors; keeps the last decoded chunk (reads are in order).

    A store with a chunk not done or whose file is absent is refused here, and a chunk that does not decode
    stops the read with a `SampleStoreError` naming its file: no fill value (black image) is ever scored.
    """

    # zarr's synchronous API runs an event loop in a background thread, which a forked DataLoader worker does not
    # inherit: the store is read in the main process.
    supports_workers = False

    def __init__(self, store_path: str | os.PathLike):
        self.store = SampleStore.open(store_path, mode="r")
        self.store.require_complete()
        self.store.read_labels()  # the labels too must be intact, as for the export
        self.chunk_size = self.store.layout.chunk_size
        self._cached_chunk = -1
        self._cached_images: np.ndarray | None = None

    def __len__(self) -> int:
        return self.store.layout.num_samples

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk = index // self.chunk_size
        if chunk != self._cached_chunk:
            start, stop = self.store.layout.chunk_range(chunk)
            self._cached_images = self.store.read_images(start, stop)
            self._cached_chunk = chunk
        image = self._cached_images[index - chunk * self.chunk_size]
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class ArrayDataset(Dataset):
    """uint8 images of an in-memory or memory-mapped [N, H, W, 3] array, as CHW tensors."""

    def __init__(self, images: np.ndarray, source: str = "array"):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ReferenceInputError(
                f"{source}: expected uint8 images [N, H, W, 3], got {images.dtype} {tuple(images.shape)}"
            )
        self.images = images
        self.source = source

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[index]).transpose(2, 0, 1).copy())


def _decode_rgb(data: bytes | Path, source: str, resolution: tuple[int, int] | None) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as error:  # noqa: BLE001 - PIL raises many types; name the file
        raise ReferenceInputError(f"{source}: cannot decode image ({error})") from error
    if resolution is not None and array.shape[:2] != tuple(resolution):
        raise ReferenceInputError(
            f"{source}: image is {array.shape[0]}x{array.shape[1]}, the samples are "
            f"{resolution[0]}x{resolution[1]} (wrong reference resolution)"
        )
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class ImageFolderDataset(Dataset):
    """Every image file under a folder (recursive, sorted by relative path), decoded to RGB uint8 CHW."""

    def __init__(self, root: str | os.PathLike, resolution: tuple[int, int] | None = None):
        self.root = Path(root)
        self.files = list_image_files(self.root)
        if not self.files:
            raise ReferenceInputError(f"{self.root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return _decode_rgb(self.files[index], str(self.files[index]), self.resolution)


def list_image_files(root: Path) -> list[Path]:
    """Image files under `root` (recursive), skipping hidden folders such as the feature cache."""
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        files.extend(
            Path(directory) / name
            for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
        )
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


class ShardImageDataset(Dataset):
    """The `png` images of raw image shards written by `pack`, read in place from the tar files.

    The tar headers are indexed once (name -> byte offset of each member's data), so reading image i is one seek
    and one PNG decode; nothing is unpacked to disk.
    """

    def __init__(self, shard_paths: Sequence[Path], resolution: tuple[int, int] | None = None):
        self.shard_paths = list(shard_paths)
        self.resolution = resolution
        self.entries: list[tuple[int, int, int, str]] = []  # (shard index, data offset, size, sample key)
        for shard_index, path in enumerate(self.shard_paths):
            self.entries.extend((shard_index, offset, size, key) for key, offset, size in _index_png_members(path))
        if not self.entries:
            raise ReferenceInputError(f"no png images in the shards {[str(p) for p in self.shard_paths[:3]]}…")
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> torch.Tensor:
        shard_index, offset, size, key = self.entries[index]
        handle = self._handles.get(shard_index)
        if handle is None:
            handle = self._handles[shard_index] = open(self.shard_paths[shard_index], "rb")
        handle.seek(offset)
        data = handle.read(size)
        return _decode_rgb(data, f"{self.shard_paths[shard_index]}:{key}.png", self.resolution)

    def __getstate__(self) -> dict[str, Any]:
        # Open file handles do not cross process boundaries (DataLoader workers): reopen lazily there.
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def _index_png_members(path: Path) -> list[tuple[str, int, int]]:
    """(sample key, data offset, size) of every `png` member of a WebDataset tar, in archive order."""
    members = []
    try:
        with tarfile.open(path, "r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, extension = base.partition(".")
                if extension.lower() == "png":
                    directory = member.name[: -len(base)]
                    members.append((directory + key, member.offset_data, member.size))
    except (OSError, tarfile.TarError) as error:
        raise ReferenceInputError(f"{path}: unreadable tar shard ({error})") from error
    return members
