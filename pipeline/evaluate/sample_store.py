"""The sample store of `evaluate`: generated images in a zarr 3 group that many processes fill and a killed run resumes.

Layout of `samples.zarr`:

- `samples` uint8 [N, H, W, 3], chunked by `chunk_size` images along N;
- `labels`  int64 [N] (class label of each sample, -1 for unconditional models), same chunking;
- `done`    bool [num_chunks], one element per chunk and one chunk per element, so that the rank that owns a chunk
  is the only writer of every file the chunk touches (no locks, no clobbering).

A chunk is written as images, then labels, then its `done` flag: the flag is the commit marker, so a chunk whose
writer was killed half-way is simply produced again on resume. zarr's local store writes each file atomically.

A flag is not proof, though: a chunk file deleted or damaged after its flag was set would read back as zarr's
fill value (black images, label -1) without a word. So a resumed run checks every chunk flagged done
(`verify_done_chunks`: its files are in the store's listing, decode, and hold valid labels) and samples the
bad ones again, and every reader (`read_images`, `read_labels`, `require_complete`) refuses a chunk whose file is
absent or undecodable instead of reading the fill value. New stores also keep zstd's checksum in every chunk (a
flipped bit fails to decode) and write every chunk, even one that equals the fill value (zarr skips those by
default, which would make a legitimately black chunk, or the -1 labels of an unconditional model, look missing).

What sample `i` holds depends only on (`seed`, `i`) and the sampling settings (`pipeline.evaluate.sample_seeds`):
never on the number of processes or the batch size. The settings are stored in the group attributes; re-opening
a store with other settings is refused (`SampleStoreMismatchError`) instead of silently mixing samples of two
configurations.
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

from pipeline.core.atomic import replace_directory, temp_path_for
from pipeline.core.errors import InputError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STORE_NAME = "samples.zarr"

ARRAY_NAMES = ("samples", "labels", "done")
CHUNKED_ARRAYS = ("samples", "labels")  # the arrays whose chunk c holds the data of work unit c
UNCONDITIONAL_LABEL = -1
# zarr skips writing a chunk that equals the fill value unless told otherwise (a runtime setting, not stored
# in the metadata, so it is given on every open): every chunk must exist for the presence check to hold.
ARRAY_CONFIG = {"write_empty_chunks": True}


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
    from zarr.codecs import ZstdCodec

    group = zarr.open_group(str(directory), mode="w")
    # zstd with its content checksum: a damaged chunk fails to decode instead of giving other pixels.
    common = {"compressors": ZstdCodec(checksum=True), "config": ARRAY_CONFIG}
    group.create_array(
        "samples",
        shape=(layout.num_samples, layout.height, layout.width, 3),
        chunks=(layout.chunk_size, layout.height, layout.width, 3),
        dtype="uint8",
        fill_value=0,
        **common,
    )
    group.create_array(
        "labels",
        shape=(layout.num_samples,),
        chunks=(layout.chunk_size,),
        dtype="int64",
        fill_value=UNCONDITIONAL_LABEL,
        **common,
    )
    group.create_array("done", shape=(layout.num_chunks,), chunks=(1,), dtype="bool", fill_value=False, **common)
    group.attrs.update({"format_version": FORMAT_VERSION, "layout": asdict(layout), "settings": _normalise(settings)})


def _open_group(path: Path, mode: str) -> tuple[Any, dict[str, Any]]:
    """The zarr group of the store at `path` and its arrays, checked to be a diffit-pipe store of this format.

    zarr reports damaged metadata as JSON, validation or key errors; each becomes one `SampleStoreError` that
    names the store and the `zarr.json` it could not read.
    """
    import zarr

    errors = (OSError, ValueError, KeyError, TypeError)
    try:
        group = zarr.open_group(str(path), mode=mode)
        attrs = group.attrs.asdict()
    except errors as error:
        raise _damaged(path, path / "zarr.json", error) from error
    if attrs.get("format_version") != FORMAT_VERSION or "layout" not in attrs or "settings" not in attrs:
        raise SampleStoreMismatchError(
            f"{path}: not a diffit-pipe sample store of format {FORMAT_VERSION} (attributes: {sorted(attrs)})"
        )
    arrays = {}
    for name in ARRAY_NAMES:
        try:
            if name in group:
                arrays[name] = group[name].with_config(ARRAY_CONFIG)
        except errors as error:
            raise _damaged(path, path / name / "zarr.json", error) from error
    if len(arrays) != len(ARRAY_NAMES):
        missing = sorted(set(ARRAY_NAMES) - set(arrays))
        raise SampleStoreError(f"{path}: damaged sample store (missing arrays {missing})")
    return group, arrays


def _damaged(path: Path, metadata: Path, error: Exception) -> SampleStoreError:
    return SampleStoreError(f"{path}: damaged sample store ({metadata}: {type(error).__name__}: {error})")


def _stored_chunk_keys(array: Any) -> set[str]:
    """The chunk keys (relative to the array, e.g. `c/3/0/0/0`) that the store actually holds.

    zarr reads an absent chunk as the fill value without a word, so presence is taken from the store's own
    listing, never from the content (a black image is a valid sample).
    """
    from zarr.core.sync import sync

    prefix = array.store_path.path + "/"

    async def listing() -> set[str]:
        return {key[len(prefix) :] async for key in array.store_path.store.list_prefix(prefix)}

    return sync(listing())


class SampleStore:
    """A zarr group of generated samples (see the module docstring); open it with `create` or `open`."""

    def __init__(self, path: Path, group: Any, arrays: dict[str, Any]):
        self.path = path
        self.group = group
        self.arrays = arrays  # opened with ARRAY_CONFIG (every chunk written, even one equal to the fill value)
        try:
            self.layout = StoreLayout(**group.attrs["layout"])
        except TypeError as error:
            raise SampleStoreError(f"{path}: damaged sample store (layout {group.attrs['layout']!r})") from error
        self.settings: dict[str, Any] = dict(group.attrs["settings"])
        self._check_array_shapes()

    def _check_array_shapes(self) -> None:
        """Each array's shape and chunking must be the ones the layout implies (else reads would go astray)."""
        layout = self.layout
        frame = (layout.height, layout.width, 3)
        expected = {
            "samples": ((layout.num_samples, *frame), (layout.chunk_size, *frame)),
            "labels": ((layout.num_samples,), (layout.chunk_size,)),
            "done": ((layout.num_chunks,), (1,)),
        }
        for name, (shape, chunks) in expected.items():
            array = self.arrays[name]
            if tuple(array.shape) != shape or tuple(array.chunks) != chunks:
                raise SampleStoreError(
                    f"{self.path}: damaged sample store ({self.path / name / 'zarr.json'}: shape {tuple(array.shape)}"
                    f" chunks {tuple(array.chunks)}, the layout {layout} needs shape {shape} chunks {chunks})"
                )

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
        store = cls(path, *_open_group(path, mode))
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

    def chunk_file(self, name: str, chunk: int) -> Path:
        """The file that holds chunk `chunk` of array `name` (`samples`, `labels` or `done`), for messages."""
        return self.path / name / self._chunk_key(name, chunk)

    def _chunk_key(self, name: str, chunk: int) -> str:
        """zarr's key of chunk `chunk` (along the sample axis) of array `name`, e.g. `c/3/0/0/0`."""
        array = self.arrays[name]
        return array.metadata.encode_chunk_key((chunk,) + (0,) * (array.ndim - 1))

    def _read_done_flags(self) -> tuple[np.ndarray, list[int]]:
        """(done flags, chunks whose flag file cannot be decoded: read as not done)."""
        try:
            return np.asarray(self.arrays["done"][:], dtype=bool), []
        except Exception:  # noqa: BLE001 - a damaged flag file: find which one, flag by flag
            flags = np.zeros(self.layout.num_chunks, dtype=bool)
            unreadable = []
            for chunk in range(self.layout.num_chunks):
                try:
                    flags[chunk] = bool(self.arrays["done"][chunk])
                except Exception:  # noqa: BLE001 - zstd / codec errors of one flag file
                    unreadable.append(chunk)
            return flags, unreadable

    def done_mask(self) -> np.ndarray:
        """bool [num_chunks]: which chunks are flagged complete (a damaged flag file is an error naming it)."""
        flags, unreadable = self._read_done_flags()
        if unreadable:
            raise SampleStoreError(
                f"{self.chunk_file('done', unreadable[0])}: unreadable done flag of chunk {unreadable[0]} "
                f"({len(unreadable)} such files); re-run the same evaluate command to sample those chunks again"
            )
        return flags

    def missing_chunks(self) -> list[int]:
        return [int(chunk) for chunk in np.flatnonzero(~self.done_mask())]

    def is_complete(self) -> bool:
        return bool(self.done_mask().all())

    @property
    def pixel_quantization(self) -> str:
        """How the stored samples became uint8 ("round" when the settings do not say: stores made before it was a
        setting, and every store of a model sampled with the default)."""
        sampling = self.settings.get("sampling")
        return str(sampling.get("pixels", "round")) if isinstance(sampling, dict) else "round"

    def _required_arrays(self) -> tuple[str, ...]:
        """The arrays whose chunk files must exist for a chunk to count as present.

        An unconditional model's labels are -1 by definition, which is the fill value: stores made before every
        chunk was written (`ARRAY_CONFIG`) hold no labels file for them, and nothing is lost without one.
        """
        return ("samples",) if self.settings.get("num_classes") == 0 else CHUNKED_ARRAYS

    def absent_chunk_files(self, chunks: Sequence[int] | None = None) -> list[tuple[int, Path]]:
        """(chunk, file) of every `samples` / `labels` chunk file of `chunks` (default all) not in the store."""
        chunks = range(self.layout.num_chunks) if chunks is None else chunks
        absent = []
        for name in self._required_arrays():
            stored = _stored_chunk_keys(self.arrays[name])
            absent += [(int(c), self.chunk_file(name, c)) for c in chunks if self._chunk_key(name, c) not in stored]
        return sorted(absent)

    def require_complete(self) -> None:
        """Refuse (`SampleStoreError`, naming a chunk) a store with a chunk not done or whose file is absent.

        Chunks that are present but do not decode are reported by the reads themselves (`read_images`,
        `read_labels`), so that exporting or scoring never reads a fill value and never decodes twice.
        """
        missing = self.missing_chunks()
        if missing:
            raise SampleStoreError(
                f"{self.path}: {len(missing)} chunks are still missing (first: chunk {missing[0]}); sampling has not "
                "finished: re-run the same evaluate command"
            )
        absent = self.absent_chunk_files()
        if absent:
            chunk, path = absent[0]
            raise SampleStoreError(
                f"{path}: chunk {chunk} is flagged done but its file is missing ({len(absent)} missing chunk "
                "files); re-run the same evaluate command to sample it again"
            )

    def chunk_problem(self, chunk: int, stored: dict[str, set[str]] | None = None) -> str | None:
        """Why chunk `chunk` cannot be trusted (a file absent, undecodable, labels out of range), or None.

        `stored` (array name -> `_stored_chunk_keys`) saves listing the store once per chunk.
        """
        for name in self._required_arrays():
            keys = stored[name] if stored is not None else _stored_chunk_keys(self.arrays[name])
            if self._chunk_key(name, chunk) not in keys:
                return f"{self.chunk_file(name, chunk)} is missing"
        start, stop = self.layout.chunk_range(chunk)
        try:
            self.read_images(start, stop)
            self.read_labels(start, stop)
        except SampleStoreError as error:
            return str(error)
        return None

    def verify_done_chunks(self) -> list[int]:
        """Check every chunk flagged done (files present, decodable, valid labels); clear the flag of the others.

        Returns the chunks whose flag was cleared (each is logged as a warning naming it), which are then
        simply sampled again like any missing chunk. Only one process may call this (rank 0), before the
        others read the done mask.
        """
        flags, unreadable = self._read_done_flags()
        redo = {chunk: f"{self.chunk_file('done', chunk)} (its done flag) does not decode" for chunk in unreadable}
        stored = {name: _stored_chunk_keys(self.arrays[name]) for name in self._required_arrays()}
        for chunk in np.flatnonzero(flags):
            problem = self.chunk_problem(int(chunk), stored)
            if problem is not None:
                redo[int(chunk)] = problem
        for chunk, problem in sorted(redo.items()):
            logger.warning("%s: chunk %d is not intact (%s); sampling it again", self.path, chunk, problem)
            self.arrays["done"][chunk] = False
        return sorted(redo)

    # -- writing --------------------------------------------------------------------------------------------------

    def write_chunk(self, chunk: int, images: np.ndarray, labels: np.ndarray) -> None:
        """Write the images [n, H, W, 3] uint8 and labels [n] of chunk `chunk`, then mark it done.

        The order is the commit protocol: the flag is written last, so a failure (or a kill) before it leaves
        the chunk not done, and it is produced again on resume.
        """
        start, stop = self.layout.chunk_range(chunk)
        expected = (stop - start, self.layout.height, self.layout.width, 3)
        if images.shape != expected or images.dtype != np.uint8:
            raise ValueError(
                f"chunk {chunk}: expected uint8 images of shape {expected}, got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (stop - start,):
            raise ValueError(f"chunk {chunk}: expected {stop - start} labels, got shape {tuple(labels.shape)}")
        self.arrays["samples"][start:stop] = images
        self.arrays["labels"][start:stop] = labels.astype(np.int64)
        self.arrays["done"][chunk] = True

    # -- reading --------------------------------------------------------------------------------------------------

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) of array `name`, chunk by chunk, so that a chunk that fails to decode is named."""
        size = self.layout.chunk_size
        parts = []
        for chunk in range(start // size, -(-stop // size)):
            low, high = max(start, chunk * size), min(stop, (chunk + 1) * size)
            try:
                parts.append(np.asarray(self.arrays[name][low:high]))
            except Exception as error:  # noqa: BLE001 - codecs raise RuntimeError (zstd), ValueError (size), ...
                raise SampleStoreError(
                    f"{self.chunk_file(name, chunk)}: unreadable {name} of chunk {chunk} "
                    f"({type(error).__name__}: {error}); re-run the same evaluate command to sample it again"
                ) from error
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def read_images(self, start: int, stop: int) -> np.ndarray:
        """uint8 images [start, stop) (a chunk that does not decode is a `SampleStoreError` naming its file)."""
        return self._read("samples", start, stop)

    def read_labels(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """int64 labels [start, stop), checked against the store's number of classes (see `_check_labels`)."""
        stop = self.layout.num_samples if stop is None else stop
        labels = self._read("labels", start, stop)
        self._check_labels(labels, start)
        return labels

    def _check_labels(self, labels: np.ndarray, start: int) -> None:
        """Labels lie in [0, num_classes), or are all -1 for an unconditional model (num_classes 0).

        Only stores whose settings record `num_classes` (those `evaluate` makes) can be checked.
        """
        num_classes = self.settings.get("num_classes")
        if not isinstance(num_classes, int) or len(labels) == 0:
            return
        if num_classes > 0:
            bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
            allowed = f"[0, {num_classes})"
        else:
            bad = np.flatnonzero(labels != UNCONDITIONAL_LABEL)
            allowed = f"{UNCONDITIONAL_LABEL} (unconditional model)"
        if len(bad):
            index = start + int(bad[0])
            chunk = index // self.layout.chunk_size
            raise SampleStoreError(
                f"{self.chunk_file('labels', chunk)}: label {int(labels[bad[0]])} of sample {index} (chunk {chunk}) "
                f"is not in {allowed}; re-run the same evaluate command to sample it again"
            )


def assign_chunks(missing: Sequence[int], rank: int, world_size: int) -> list[int]:
    """The chunks rank `rank` produces: every `world_size`-th missing chunk, so each chunk has one writer."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return list(missing[rank::world_size])
