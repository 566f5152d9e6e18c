"""The sample store of `evaluate`: generated images in a zarr 3 group that many processes fill and a killed run resumes.

Layout of `samples.zarr`:

- `samples` uint8 [N, H, W, 3], chunked by `chunk_size` images along N;
- `labels`  int64 [N] (class label of each sample, -1 for unconditional models), same chunking;
- `done`    bool [num_chunks], one element per chunk and one chunk per element, so that the rank that owns a chunk
  is the only writer of every file the chunk touches (no locks, no clobbering).

A chunk is written as images, then labels, then its `done` flag: the flag is the commit marker, so a chunk whose
writer was killed half-way is simply produced again on resume. zarr's local store writes each file atomically.

What sample `i` holds depends only on (`seed`, `i`) and the sampling settings (see `sample_noise_seeds`,
`sample_class_labels`): never on the number of processes or the batch size. The settings are stored in the
group attributes; re-opening a store with other settings is refused (`SampleStoreMismatchError`) instead of
silently mixing samples of two configurations.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import atomic_path, replace_directory, temp_path_for
from pipeline.core.errors import InputError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STORE_NAME = "samples.zarr"

# Independent streams of the per-sample hash: the noise seed and the class label of sample i must not be
# correlated, so each gets its own constant mixed into the key.
_NOISE_STREAM = 0x6E6F697365  # "noise"
_LABEL_STREAM = 0x6C6162656C  # "label"


ARRAY_NAMES = ("samples", "labels", "done")


class SampleStoreError(InputError):
    """A sample store cannot be used: not a store, damaged, or made with other settings (the message names it)."""


class NotASampleStoreError(SampleStoreError, FileNotFoundError):
    """The path holds no sample store (no `zarr.json`)."""


class SampleStoreMismatchError(SampleStoreError):
    """An existing sample store was made with other settings (model, sampler, seed, ...) than requested."""


@dataclass(frozen=True)
class StoreLayout:
    """Shape of a sample store: how many images, their size, and how many images one chunk (work unit) holds."""

    num_samples: int
    height: int
    width: int
    chunk_size: int

    @property
    def num_chunks(self) -> int:
        return -(-self.num_samples // self.chunk_size)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """Sample indices [start, stop) of chunk `chunk`."""
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.num_samples)


# ----------------------------------------------------------------------------------------------------------------
# Per-sample seeds and labels


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays: a cheap, platform-independent 64-bit hash (wrap-around intended)."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _per_sample_hash(seed: int, indices: np.ndarray, stream: int) -> np.ndarray:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    key = _splitmix64(np.array([(seed ^ stream) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return _splitmix64(key ^ np.asarray(indices, dtype=np.uint64))


def sample_noise_seeds(seed: int, indices: Sequence[int] | np.ndarray) -> list[int]:
    """The noise seed of each sample index: a 63-bit hash of (`seed`, index), usable with `torch.Generator`."""
    hashed = _per_sample_hash(seed, np.asarray(indices), _NOISE_STREAM) >> np.uint64(1)
    return [int(value) for value in hashed]


def sample_class_labels(
    seed: int, indices: Sequence[int] | np.ndarray, num_classes: int, classes: Sequence[int] | None = None
) -> np.ndarray:
    """Class label of each sample index (int64).

    `classes` given: sample i gets `classes[i % len(classes)]` (cycling, e.g. for a class-balanced set).
    Otherwise uniform over `num_classes` from a hash of (`seed`, i); the modulo bias of a 64-bit hash is < 1e-15.
    Unconditional models (`num_classes == 0`) get -1.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if classes is not None:
        if len(classes) == 0:
            raise ValueError("classes: empty list")
        return np.asarray(classes, dtype=np.int64)[indices % len(classes)]
    if num_classes <= 0:
        return np.full(indices.shape, -1, dtype=np.int64)
    hashed = _per_sample_hash(seed, indices, _LABEL_STREAM)
    return (hashed % np.uint64(num_classes)).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# The store


def _normalise(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON (tuples become lists, ...), so that comparisons are exact."""
    return json.loads(json.dumps(settings, sort_keys=True))


def _settings_difference(stored: dict[str, Any], requested: dict[str, Any]) -> list[str]:
    keys = sorted(set(stored) | set(requested))
    return [
        f"{key}: store has {stored.get(key)!r}, requested {requested.get(key)!r}"
        for key in keys
        if stored.get(key) != requested.get(key)
    ]


def _build_empty_store(directory: Path, layout: StoreLayout, settings: dict[str, Any]) -> None:
    """The arrays and attributes of an empty store, written into `directory`."""
    import zarr

    group = zarr.open_group(str(directory), mode="w")
    group.create_array(
        "samples",
        shape=(layout.num_samples, layout.height, layout.width, 3),
        chunks=(layout.chunk_size, layout.height, layout.width, 3),
        dtype="uint8",
        fill_value=0,
    )
    group.create_array("labels", shape=(layout.num_samples,), chunks=(layout.chunk_size,), dtype="int64", fill_value=-1)
    group.create_array("done", shape=(layout.num_chunks,), chunks=(1,), dtype="bool", fill_value=False)
    group.attrs.update({"format_version": FORMAT_VERSION, "layout": asdict(layout), "settings": _normalise(settings)})


def _open_group(path: Path, mode: str) -> Any:
    """The zarr group of the store at `path`, checked to be a diffit-pipe store of this format.

    zarr reports a damaged store as JSON, metadata or key errors; they become one `SampleStoreError` naming it.
    """
    import zarr

    try:
        group = zarr.open_group(str(path), mode=mode)
        attrs = group.attrs.asdict()
        arrays = [name for name in ARRAY_NAMES if name in group]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SampleStoreError(f"{path}: damaged sample store ({type(error).__name__}: {error})") from error
    if attrs.get("format_version") != FORMAT_VERSION or "layout" not in attrs or "settings" not in attrs:
        raise SampleStoreMismatchError(
            f"{path}: not a diffit-pipe sample store of format {FORMAT_VERSION} (attributes: {sorted(attrs)})"
        )
    if len(arrays) != len(ARRAY_NAMES):
        missing = sorted(set(ARRAY_NAMES) - set(arrays))
        raise SampleStoreError(f"{path}: damaged sample store (missing arrays {missing})")
    return group


class SampleStore:
    """A zarr group of generated samples (see the module docstring); open it with `create` or `open`."""

    def __init__(self, path: Path, group: Any):
        self.path = path
        self.group = group
        try:
            self.layout = StoreLayout(**group.attrs["layout"])
        except TypeError as error:
            raise SampleStoreError(f"{path}: damaged sample store (layout {group.attrs['layout']!r})") from error
        self.settings: dict[str, Any] = dict(group.attrs["settings"])

    # -- opening ---------------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, layout: StoreLayout, settings: dict[str, Any]) -> SampleStore:
        """Create an empty store at `path` atomically (built in a temporary folder, then renamed into place)."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path}: already exists (open it with SampleStore.open)")
        if layout.num_samples <= 0 or layout.chunk_size <= 0:
            raise ValueError(f"num_samples and chunk_size must be positive, got {layout}")
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = temp_path_for(path)
        temp.mkdir()  # mkdir, not mkdtemp: the store gets the usual permissions (umask), not 0700
        try:
            _build_empty_store(temp, layout, settings)
            replace_directory(temp, path)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        logger.info(
            "created sample store %s (%d samples in %d chunks of %d)",
            path,
            layout.num_samples,
            layout.num_chunks,
            layout.chunk_size,
        )
        return cls.open(path, settings)

    @classmethod
    def open(cls, path: str | os.PathLike, settings: dict[str, Any] | None = None, mode: str = "r+") -> SampleStore:
        """Open an existing store; with `settings`, refuse it unless it was made with exactly these settings."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise NotASampleStoreError(f"{path}: not a sample store (no zarr.json)")
        store = cls(path, _open_group(path, mode))
        if settings is not None:
            difference = _settings_difference(store.settings, _normalise(settings))
            if difference:
                raise SampleStoreMismatchError(
                    f"{path}: this sample store was made with other settings, refusing to mix samples:\n  "
                    + "\n  ".join(difference)
                    + f"\nUse another --out directory, or delete {path} to start over."
                )
        return store

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, layout: StoreLayout, settings: dict[str, Any]) -> SampleStore:
        """Open the store at `path` when it exists (settings and layout must match), else create it.

        Only one process may call this (rank 0); the others call `open` after a barrier.
        """
        path = Path(path)
        if not path.exists():
            return cls.create(path, layout, settings)
        store = cls.open(path, settings)
        stored = store.layout
        if (stored.num_samples, stored.height, stored.width) != (layout.num_samples, layout.height, layout.width):
            raise SampleStoreMismatchError(
                f"{path}: store holds {stored.num_samples} samples of {stored.height}x{stored.width}, requested "
                f"{layout.num_samples} of {layout.height}x{layout.width}; use another --out directory"
            )
        if stored.chunk_size != layout.chunk_size:
            # The chunk size only fixes the work unit; samples do not depend on it, so keep the store's.
            logger.info(
                "%s: keeping the store's chunk size %d (requested %d)", path, stored.chunk_size, layout.chunk_size
            )
        return store

    # -- state ----------------------------------------------------------------------------------------------------

    def done_mask(self) -> np.ndarray:
        """bool [num_chunks]: which chunks are complete."""
        return np.asarray(self.group["done"][:], dtype=bool)

    def missing_chunks(self) -> list[int]:
        return [int(chunk) for chunk in np.flatnonzero(~self.done_mask())]

    def is_complete(self) -> bool:
        return bool(self.done_mask().all())

    # -- writing --------------------------------------------------------------------------------------------------

    def write_chunk(self, chunk: int, images: np.ndarray, labels: np.ndarray) -> None:
        """Write the images [n, H, W, 3] uint8 and labels [n] of chunk `chunk`, then mark it done."""
        start, stop = self.layout.chunk_range(chunk)
        expected = (stop - start, self.layout.height, self.layout.width, 3)
        if images.shape != expected or images.dtype != np.uint8:
            raise ValueError(
                f"chunk {chunk}: expected uint8 images of shape {expected}, got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (stop - start,):
            raise ValueError(f"chunk {chunk}: expected {stop - start} labels, got shape {tuple(labels.shape)}")
        self.group["samples"][start:stop] = images
        self.group["labels"][start:stop] = labels.astype(np.int64)
        self.group["done"][chunk] = True

    # -- reading --------------------------------------------------------------------------------------------------

    def read_images(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.group["samples"][start:stop])

    def read_labels(self) -> np.ndarray:
        return np.asarray(self.group["labels"][:])


def assign_chunks(missing: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The chunks rank `rank` produces: every `world_size`-th missing chunk, so each chunk has one writer."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(missing[rank::world_size])


# ----------------------------------------------------------------------------------------------------------------
# ADM evaluator export


def export_npz(store: SampleStore, path: str | os.PathLike, batch: int | None = None) -> Path:
    """Write the store as an ADM-evaluator `.npz` (`arr_0` uint8 [N, H, W, 3], `arr_1` int64 labels), atomically.

    The archive is streamed chunk by chunk (uncompressed, like `np.savez`), so 50k images at 512 px never need
    to fit in memory at once.
    """
    import zipfile

    if not store.is_complete():
        raise ValueError(
            f"{store.path}: {len(store.missing_chunks())} chunks are still missing; finish sampling before exporting"
        )
    layout = store.layout
    batch = batch or layout.chunk_size
    with (
        atomic_path(path) as temp,
        zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
    ):
        shape = (layout.num_samples, layout.height, layout.width, 3)
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(
                member,
                {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape},
            )
            for start in range(0, layout.num_samples, batch):
                stop = min(start + batch, layout.num_samples)
                member.write(np.ascontiguousarray(store.read_images(start, stop)).tobytes())
        with archive.open("arr_1.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, store.read_labels().astype(np.int64))
    logger.info("exported %d samples to %s", layout.num_samples, path)
    return Path(path)
