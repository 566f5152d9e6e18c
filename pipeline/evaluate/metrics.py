"""Sample-quality metrics of `evaluate`: FID, Inception Score, precision/recall and KID through torch-fidelity.

The math is torch-fidelity's (feature extraction loop, FID statistics and distance, IS, KID, precision/recall);
this module supplies what the offline pipeline needs around it:

- the Inception weights file (`resolve_inception_weights`): it cannot be downloaded here, so it comes from
  `--inception-weights` or torch-fidelity's own cache, is checked before any sampling, loaded only after a
  `torch.load(weights_only=True)` check, and identified by its SHA-256. Metrics computed with a file whose hash is
  not the official one are labelled "plumbing-only" everywhere they are reported (see `InceptionWeights`);
- torch Datasets returning uint8 CHW tensors that read the zarr sample store and the reference (raw image shards
  from `pack`, an image folder, or an ADM `.npz`) directly, without writing PNGs;
- reference features computed once and cached as safetensors beside the reference (or in a cache directory when
  the reference is read-only), keyed by the reference's content hash and the feature extractor's identity.

torch-fidelity's own cache (`cache_root`, `input2_cache_name`) is not used: it is keyed by a name only, not by the
weights file, and reads its entries back with pickle (`torch.load(weights_only=False)`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.atomic import AtomicFile, write_bytes_atomic, write_json_atomic
from pipeline.core.errors import InputError
from pipeline.core.shards import json_bytes, load_manifest, sha256_file, shard_problems, shard_urls
from pipeline.evaluate.sample_store import SampleStore

logger = logging.getLogger(__name__)

FEATURE_EXTRACTOR = "inception-v3-compat"
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# torch.hub's naming convention (`load_state_dict_from_url(check_hash=True)`): the hex digits after the last '-'
# of a checkpoint's file name are the first digits of the SHA-256 of its content. A file whose hash starts with
# them is the torch-fidelity release file; any other file (random init, pytorch-fid's differently-keyed weights,
# a re-trained network) is not, and its numbers must not be reported as FID/IS.
OFFICIAL_INCEPTION_SHA256_PREFIX = "6726825d"
PLUMBING_ONLY_LABEL = "plumbing-only (non-official Inception weights)"

METRIC_NAMES = ("fid", "is", "prc", "kid")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_DIR_NAME = ".fidelity-cache"


class InceptionWeightsError(InputError):
    """The Inception weights file cannot be used (not a tensor state dict, not torch-fidelity's Inception-v3)."""


class MissingInceptionWeightsError(InceptionWeightsError, FileNotFoundError):
    """The Inception weights file is not available (it cannot be downloaded offline)."""


class ReferenceInputError(InputError):
    """The reference set is unusable (missing, wrong resolution, no images, ...)."""


# ----------------------------------------------------------------------------------------------------------------
# Hashing helpers


def sha256_json(value: Any) -> str:
    """Hex SHA-256 of a JSON-serialisable value in canonical form (`json_bytes`: sorted keys, no spaces)."""
    return hashlib.sha256(json_bytes(value)).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Inception weights


@dataclass(frozen=True)
class InceptionWeights:
    """The Inception-v3 weights file the features come from, its SHA-256, and whether it is the official file."""

    path: Path
    sha256: str

    @property
    def official(self) -> bool:
        return self.sha256.startswith(OFFICIAL_INCEPTION_SHA256_PREFIX)

    @property
    def label(self) -> str:
        """How metrics computed with these weights must be labelled."""
        return "official torch-fidelity Inception-v3 weights" if self.official else PLUMBING_ONLY_LABEL

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "file_name": self.path.name,
            "sha256": self.sha256,
            "official": self.official,
            "label": self.label,
            "official_check": f"sha256 starts with {OFFICIAL_INCEPTION_SHA256_PREFIX} (the hash digits of "
            f"the release file name {INCEPTION_WEIGHTS_FILENAME})",
        }


def default_inception_weights_path() -> Path:
    """Where torch-fidelity itself would cache the weights: `$TORCH_HOME/hub/checkpoints/<file>`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def resolve_inception_weights(path: str | os.PathLike | None = None) -> InceptionWeights:
    """Find, hash and safety-check the Inception weights (before any sampling).

    `path` None means torch-fidelity's cache location. The file is loaded once with `weights_only=True` so that
    torch-fidelity's own (pickle) load later only ever sees a plain tensor state dict.
    """
    candidate = Path(path) if path is not None else default_inception_weights_path()
    if not candidate.is_file():
        where = f"{candidate}" if path is not None else f"{candidate} (torch-fidelity's cache, $TORCH_HOME)"
        raise MissingInceptionWeightsError(
            f"Inception weights not found: {where}. They cannot be downloaded offline: copy the file "
            f"{INCEPTION_WEIGHTS_FILENAME} (torch-fidelity release v0.2.0) to this machine and pass "
            f"--inception-weights PATH, or place it in {default_inception_weights_path().parent}."
        )
    try:
        state = torch.load(candidate, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means the file is unusable; say which and why
        raise InceptionWeightsError(
            f"{candidate}: not a loadable tensor state dict ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionWeightsError(
            f"{candidate}: expected a state dict of tensors (torch-fidelity Inception-v3 weights)"
        )
    weights = InceptionWeights(path=candidate.resolve(), sha256=sha256_file(candidate))
    if not weights.official:
        logger.warning(
            "Inception weights %s (sha256 %s…) are not the official file: metrics will be labelled %r",
            candidate,
            weights.sha256[:16],
            PLUMBING_ONLY_LABEL,
        )
    return weights


# ----------------------------------------------------------------------------------------------------------------
# Feature extractor configuration


@dataclass
class FeatureConfig:
    """Which Inception features each metric uses, and how they are computed.

    Defaults are torch-fidelity's (2048-d pool features for FID/KID/precision-recall, unbiased logits for IS);
    precision/recall use the same Inception network (ADM's evaluator convention) instead of torch-fidelity's
    VGG16 default, which would need a second download.
    """

    weights: InceptionWeights
    layer_fid: str = "2048"
    layer_kid: str = "2048"
    layer_prc: str = "2048"
    layer_isc: str = "logits_unbiased"
    batch_size: int = 64
    cuda: bool = False
    isc_splits: int = 10
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    prc_neighborhood: int = 3
    rng_seed: int = 2020
    verbose: bool = False

    def layers_for(self, metrics: Iterable[str]) -> dict[str, str]:
        """metric name -> feature layer, for the requested metrics."""
        layer_of = {"fid": self.layer_fid, "kid": self.layer_kid, "prc": self.layer_prc, "is": self.layer_isc}
        return {metric: layer_of[metric] for metric in metrics}

    def extractor_identity(self) -> dict[str, Any]:
        """What the features depend on: network, weights content, library version, internal precision."""
        import torch_fidelity

        return {
            "name": FEATURE_EXTRACTOR,
            "weights_sha256": self.weights.sha256,
            "torch_fidelity": torch_fidelity.__version__,
            "internal_dtype": "float32",
        }

    def fidelity_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of torch-fidelity's metric functions."""
        return {
            "cuda": self.cuda,
            "batch_size": self.batch_size,
            "isc_splits": self.isc_splits,
            "kid_subsets": self.kid_subsets,
            "kid_subset_size": self.kid_subset_size,
            "prc_neighborhood": self.prc_neighborhood,
            "rng_seed": self.rng_seed,
            "save_cpu_ram": True,
            "samples_shuffle": True,
            "verbose": self.verbose,
            "feature_extractor_weights_path": str(self.weights.path),
        }


def create_feature_extractor(config: FeatureConfig, layers: Sequence[str]) -> torch.nn.Module:
    """torch-fidelity's Inception-v3 feature extractor for `layers`, loaded from the checked weights file."""
    from torch_fidelity.utils import create_feature_extractor as fidelity_create

    try:
        return fidelity_create(FEATURE_EXTRACTOR, sorted(set(layers)), **config.fidelity_kwargs())
    except RuntimeError as error:  # load_state_dict: missing / unexpected keys, wrong shapes
        raise InceptionWeightsError(
            f"{config.weights.path}: not torch-fidelity Inception-v3 weights ({error})"
        ) from error


def check_feature_layers(config: FeatureConfig, metrics: Iterable[str]) -> None:
    """Fail early when a requested feature layer does not exist in torch-fidelity's Inception-v3."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    provided = FeatureExtractorInceptionV3.get_provided_features_list()
    for metric, layer in config.layers_for(metrics).items():
        if layer not in provided:
            raise InputError(f"feature layer {layer!r} for {metric} is not one of Inception-v3's {provided}")


def extract_features(dataset: Dataset, extractor: torch.nn.Module, config: FeatureConfig) -> dict[str, torch.Tensor]:
    """Features of every image of `dataset` (uint8 CHW tensors), through torch-fidelity's extraction loop."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    if len(dataset) == 0:
        raise ValueError("cannot extract features of an empty set of images")
    return get_featuresdict_from_dataset(dataset, extractor, config.batch_size, config.cuda, True, config.verbose)


# ----------------------------------------------------------------------------------------------------------------
# Datasets of uint8 CHW images


class SampleStoreDataset(Dataset):
    """The images of a zarr sample store as uint8 CHW tensors; keeps the last decoded chunk (reads are in order).

    A store with a chunk not done or whose file is absent is refused here, and a chunk that does not decode
    stops the read with a `SampleStoreError` naming its file: no fill value (black image) is ever scored.
    """

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


# ----------------------------------------------------------------------------------------------------------------
# References


@dataclass
class Reference:
    """A reference set: where it is, what kind it is, its resolution and size, and its content identity.

    `kind` is one of "shards" (raw image shards from `pack`), "folder" (image files), "npz" (ADM reference batch
    with `arr_0`) or "stats" (an `.npz` holding only FID statistics `mu`, `sigma`: FID and IS only).
    """

    path: Path
    kind: str
    resolution: tuple[int, int] | None
    num_images: int | None
    details: dict[str, Any] = field(default_factory=dict)
    _content_hash: str | None = None

    @property
    def has_images(self) -> bool:
        return self.kind != "stats"

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "num_images": self.num_images,
            "resolution": list(self.resolution) if self.resolution else None,
            "content_sha256": self._content_hash,
            **self.details,
        }


def _npz_member_array(path: Path, name: str) -> np.ndarray:
    """Array `name` of an `.npz`, memory-mapped when it is stored uncompressed (the `np.savez` default)."""
    try:
        return _map_npz_member(path, name)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise ReferenceInputError(f"{path}: cannot read {name} ({type(error).__name__}: {error})") from error


def _map_npz_member(path: Path, name: str) -> np.ndarray:
    member_name = f"{name}.npy"
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member_name)
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read_header(member)
            header_length = member.tell()
        if info.compress_type != zipfile.ZIP_STORED or fortran_order or dtype.hasobject:
            logger.info("%s: %s is compressed, loading it into memory", path, member_name)
            with np.load(path, allow_pickle=False) as data:
                return data[name]
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        local_header = handle.read(30)
        name_length = int.from_bytes(local_header[26:28], "little")
        extra_length = int.from_bytes(local_header[28:30], "little")
    data_offset = info.header_offset + 30 + name_length + extra_length + header_length
    return np.memmap(path, dtype=dtype, mode="r", offset=data_offset, shape=shape)


def _npz_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return [name[:-4] for name in archive.namelist() if name.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as error:
        raise ReferenceInputError(f"{path}: not an .npz archive ({error})") from error


def open_reference(path: str | os.PathLike) -> Reference:
    """Identify a reference path (shard directory, image folder, ADM `.npz`, or statistics `.npz`) cheaply.

    Only headers are read here (manifest, npz headers, the first image of a folder), so that resolution
    mismatches and unusable inputs stop `evaluate` before sampling.
    """
    path = Path(path)
    if not path.exists():
        raise ReferenceInputError(f"{path}: reference does not exist")
    if path.is_dir() and (path / "manifest.json").is_file():
        manifest = load_manifest(path)
        if manifest.get("kind") != "images":
            raise ReferenceInputError(
                f"{path}: shards of kind {manifest.get('kind')!r}; the reference must be raw image shards "
                "(kind 'images', written by `diffit-pipe pack`), not latents"
            )
        resolution = int(manifest["resolution"])
        count = sum(int(shard["count"]) for shard in manifest["shards"])
        return Reference(
            path,
            "shards",
            (resolution, resolution),
            count,
            {"manifest_created": manifest.get("created"), "num_shards": len(manifest["shards"])},
        )
    if path.is_dir():
        files = list_image_files(path)
        if not files:
            raise ReferenceInputError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
        first = _decode_rgb(files[0], str(files[0]), None)
        return Reference(path, "folder", (int(first.shape[1]), int(first.shape[2])), len(files))
    if path.suffix == ".npz":
        members = _npz_members(path)
        if "arr_0" in members:
            images = _npz_member_array(path, "arr_0")
            if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise ReferenceInputError(
                    f"{path}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}"
                )
            return Reference(path, "npz", (int(images.shape[1]), int(images.shape[2])), int(images.shape[0]))
        if "mu" in members and "sigma" in members:
            _read_statistics(path)  # a damaged file stops the run here, before any sampling
            return Reference(
                path,
                "stats",
                None,
                None,
                {"note": "precomputed FID statistics; their feature extractor cannot be verified"},
            )
        raise ReferenceInputError(
            f"{path}: an .npz reference needs arr_0 (images) or mu and sigma (FID statistics); it has {members}"
        )
    raise ReferenceInputError(
        f"{path}: unknown reference; give a raw image shard directory (from `pack`), an "
        "image folder, an ADM .npz with arr_0, or an .npz with FID statistics mu/sigma"
    )


def reference_dataset(reference: Reference) -> Dataset:
    """The images of `reference` as a Dataset of uint8 CHW tensors."""
    if reference.kind == "shards":
        paths = [Path(url) for url in shard_urls(reference.path, load_manifest(reference.path))]
        return ShardImageDataset(paths, reference.resolution)
    if reference.kind == "folder":
        return ImageFolderDataset(reference.path, reference.resolution)
    if reference.kind == "npz":
        return ArrayDataset(_npz_member_array(reference.path, "arr_0"), str(reference.path))
    raise ReferenceInputError(f"{reference.path}: a statistics file has no images")


def check_reference(reference: Reference, resolution: tuple[int, int], metrics: Iterable[str]) -> None:
    """Refuse a reference that cannot serve the requested metrics for samples of `resolution`."""
    metrics = set(metrics)
    if reference.resolution is not None and tuple(reference.resolution) != tuple(resolution):
        raise ReferenceInputError(
            f"{reference.path}: reference images are {reference.resolution[0]}x{reference.resolution[1]}, the model "
            f"generates {resolution[0]}x{resolution[1]} (wrong reference resolution)"
        )
    if not reference.has_images and metrics & {"kid", "prc"}:
        raise ReferenceInputError(
            f"{reference.path}: FID statistics only; {sorted(metrics & {'kid', 'prc'})} need reference images "
            "(give shards, an image folder or an ADM .npz with arr_0), or drop them from --metrics"
        )
    if reference.num_images is not None and reference.num_images == 0:
        raise ReferenceInputError(f"{reference.path}: the reference holds no images")


# ----------------------------------------------------------------------------------------------------------------
# Reference content hashes and the feature cache


def reference_cache_dir(reference: Reference, override: str | os.PathLike | None = None) -> Path:
    """Where reference features are cached: `override`, else beside the reference, else the user cache."""
    if override is not None:
        directory = Path(override)
    else:
        beside = (reference.path if reference.path.is_dir() else reference.path.parent) / CACHE_DIR_NAME
        if _writable(beside):
            return beside
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        directory = base / "diffit-pipe" / "fidelity"
        logger.info("%s is not writable; caching reference features in %s", beside, directory)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _writable(directory: Path) -> bool:
    """True when files can be created in `directory` (made if missing): a temporary file is opened and dropped."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        AtomicFile(directory / ".probe").abort()
        return True
    except OSError:
        return False


def _fingerprint(files: Sequence[Path], root: Path) -> str:
    """Cheap identity of a file set (relative names, sizes, modification times) for memoising content hashes."""
    entries = []
    for path in files:
        stat = path.stat()
        entries.append(
            [path.relative_to(root).as_posix() if path != root else path.name, stat.st_size, stat.st_mtime_ns]
        )
    return sha256_json(entries)


def _memoised(cache_dir: Path, fingerprint: str, compute) -> str:
    """The content hash memoised under `fingerprint` in `cache_dir/content-hashes.json` (like git's index)."""
    memo_path = cache_dir / "content-hashes.json"
    memo = _read_memo(memo_path)
    if fingerprint in memo:
        return memo[fingerprint]
    value = compute()
    memo[fingerprint] = value
    write_json_atomic(memo_path, memo)
    return value


def _read_memo(memo_path: Path) -> dict[str, str]:
    """The memo of content hashes, keeping only well-formed entries (a SHA-256 hex string per fingerprint).

    The memo is only a cache: an unreadable or damaged one is logged and rebuilt, never trusted.
    """
    if not memo_path.is_file():
        return {}
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("%s: unreadable memo (%s), recomputing content hashes", memo_path, error)
        return {}
    if not isinstance(memo, dict):
        logger.warning("%s: not a JSON object, recomputing content hashes", memo_path)
        return {}
    valid = {key: value for key, value in memo.items() if _is_sha256(value)}
    if len(valid) != len(memo):
        logger.warning("%s: %d malformed entries dropped", memo_path, len(memo) - len(valid))
    return valid


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def reference_content_hash(reference: Reference, cache_dir: Path) -> str:
    """SHA-256 identifying the reference's content.

    Shards: the manifest's per-shard SHA-256 (each shard's size is checked against the manifest). Folders and
    `.npz` files: the bytes of every file, memoised by (names, sizes, mtimes) so unchanged references are not
    re-read.
    """
    if reference._content_hash is not None:
        return reference._content_hash
    if reference.kind == "shards":
        manifest = load_manifest(reference.path)
        problems = [p for shard in manifest["shards"] for p in shard_problems(reference.path, shard, rehash=False)]
        if problems:
            raise ReferenceInputError(f"{reference.path}: shards do not match manifest.json: {'; '.join(problems)}")
        value = sha256_json(
            {
                "kind": "images-shards",
                "resolution": manifest["resolution"],
                "shards": [[s["name"], s["sha256"], int(s["count"])] for s in manifest["shards"]],
            }
        )
    elif reference.kind == "folder":
        files = list_image_files(reference.path)

        def compute() -> str:
            digest = hashlib.sha256()
            for path in files:
                digest.update(path.relative_to(reference.path).as_posix().encode() + b"\0")
                digest.update(sha256_file(path).encode())
            return digest.hexdigest()

        value = _memoised(cache_dir, "folder:" + _fingerprint(files, reference.path), compute)
    else:
        value = _memoised(
            cache_dir,
            f"file:{reference.path.resolve()}:" + _fingerprint([reference.path], reference.path),
            lambda: sha256_file(reference.path),
        )
    reference._content_hash = value
    return value


def _cache_file(cache_dir: Path, content_hash: str, identity: dict[str, Any], layer: str) -> Path:
    key = sha256_json({"reference": content_hash, "extractor": identity, "layer": layer})
    return cache_dir / f"features-{content_hash[:12]}-{key[:16]}-{layer}.safetensors"


def reference_features(
    reference: Reference,
    layers: Sequence[str],
    config: FeatureConfig,
    cache_dir: Path,
    extractor: torch.nn.Module | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reference features of `layers`: from the cache when present, else extracted once and cached atomically.

    Returns (features by layer, cache report {layer: {"file", "hit"}}).
    """
    from safetensors.torch import save as safetensors_bytes

    content_hash = reference_content_hash(reference, cache_dir)
    identity = config.extractor_identity()
    features: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {}
    missing = []
    for layer in sorted(set(layers)):
        path = _cache_file(cache_dir, content_hash, identity, layer)
        if path.is_file():
            features[layer] = _load_cached_features(path)
            report[layer] = {"file": str(path), "hit": True}
            logger.info("reference features %s: cache hit %s", layer, path)
        else:
            missing.append(layer)
    if missing:
        extractor = extractor if extractor is not None else create_feature_extractor(config, missing)
        logger.info(
            "extracting reference features %s from %d images of %s", missing, reference.num_images or 0, reference.path
        )
        extracted = extract_features(reference_dataset(reference), extractor, config)
        for layer in missing:
            path = _cache_file(cache_dir, content_hash, identity, layer)
            metadata = {
                "reference": json.dumps(reference.describe()),
                "extractor": json.dumps(identity),
                "layer": layer,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            # Serialised in memory, then written through `write_bytes_atomic`: safetensors' own `save_file`
            # creates its files private (0600), and the cache is shared like the reference beside it.
            write_bytes_atomic(path, safetensors_bytes({"features": extracted[layer].contiguous()}, metadata))
            features[layer] = extracted[layer]
            report[layer] = {"file": str(path), "hit": False}
    return features, report


def _load_cached_features(path: Path) -> torch.Tensor:
    """The features tensor of a cache file; a damaged one is reported with the way out (delete it)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))["features"]
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise ReferenceInputError(
            f"{path}: unreadable reference feature cache ({type(error).__name__}: {error}); delete it to recompute"
        ) from error


def _read_statistics(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """`mu`, `sigma` (float64) of a statistics `.npz`; a damaged file is one `ReferenceInputError` naming it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["mu"], dtype=np.float64), np.asarray(data["sigma"], dtype=np.float64)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise ReferenceInputError(f"{path}: cannot read mu / sigma ({type(error).__name__}: {error})") from error


def load_reference_statistics(reference: Reference, feature_dim: int) -> dict[str, np.ndarray]:
    """`mu`, `sigma` of a statistics-only reference, checked against the FID feature dimension."""
    mu, sigma = _read_statistics(reference.path)
    if mu.shape != (feature_dim,) or sigma.shape != (feature_dim, feature_dim):
        raise ReferenceInputError(
            f"{reference.path}: mu {mu.shape} / sigma {sigma.shape} do not match the FID "
            f"feature dimension {feature_dim}"
        )
    return {"mu": mu, "sigma": sigma}


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def compute_metrics(
    samples: Dataset,
    reference: Reference | None,
    metrics: Sequence[str],
    config: FeatureConfig,
    cache_dir: Path | None,
    extractor: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """FID / IS / precision-recall / KID of `samples` against `reference`, with torch-fidelity's functions.

    `reference` (and `cache_dir`, where its features are cached) may be None when only IS is requested.
    `extractor` (from `create_feature_extractor(config, layers)` with every layer the metrics need) saves
    re-loading the network when several evaluations run in one process.

    Returns {"values": {metric key: float}, "reference_cache": ..., "timings_s": ..., "num_samples": N}.
    """
    _check_metric_request(samples, reference, metrics, config, cache_dir)
    layers = config.layers_for(metrics)
    binary = [m for m in metrics if m in ("fid", "kid", "prc")]
    timings: dict[str, float] = {}

    started = time.perf_counter()
    if extractor is None:
        extractor = create_feature_extractor(config, sorted(set(layers.values())))
    elif not set(layers.values()) <= set(extractor.get_requested_features_list()):
        raise ValueError(
            f"the given extractor provides {extractor.get_requested_features_list()}, the metrics need "
            f"{sorted(set(layers.values()))}"
        )
    timings["load_extractor"] = time.perf_counter() - started

    started = time.perf_counter()
    sample_features = extract_features(samples, extractor, config)
    timings["sample_features"] = time.perf_counter() - started

    reference_cache: dict[str, Any] = {}
    reference_feats: dict[str, torch.Tensor] = {}
    if binary and reference.has_images:
        started = time.perf_counter()
        reference_layers = sorted({layers[m] for m in binary})
        # Reference images only need the binary metrics' layers: an extractor that also computes IS logits would
        # run the whole network for nothing when those layers are shallower (reference_features builds its own).
        same_layers = set(extractor.get_requested_features_list()) == set(reference_layers)
        reference_feats, reference_cache = reference_features(
            reference, reference_layers, config, cache_dir, extractor if same_layers else None
        )
        timings["reference_features"] = time.perf_counter() - started

    started = time.perf_counter()
    values = _metric_values(metrics, layers, sample_features, reference, reference_feats, config)
    timings["metric_math"] = time.perf_counter() - started
    return {
        "values": values,
        "reference_cache": reference_cache,
        "timings_s": timings,
        "num_samples": len(samples),
        "feature_layers": layers,
    }


def _check_metric_request(
    samples: Dataset,
    reference: Reference | None,
    metrics: Sequence[str],
    config: FeatureConfig,
    cache_dir: Path | None,
) -> None:
    """Refuse, before any feature extraction, metrics that cannot be computed with these inputs."""
    unknown = set(metrics) - set(METRIC_NAMES)
    if unknown:
        raise InputError(f"unknown metrics {sorted(unknown)}; choose from {METRIC_NAMES}")
    binary = [m for m in metrics if m in ("fid", "kid", "prc")]
    if binary and (reference is None or cache_dir is None):
        raise InputError(f"{binary} need a reference set (and a cache directory for its features)")
    if "kid" in metrics:
        sizes = [len(samples)] + ([reference.num_images] if reference and reference.num_images else [])
        if config.kid_subset_size > min(sizes):
            raise InputError(
                f"KID subset size {config.kid_subset_size} exceeds the number of samples "
                f"({len(samples)}) or reference images ({sizes[-1]}); lower --kid-subset-size"
            )


def _metric_values(
    metrics: Sequence[str],
    layers: dict[str, str],
    sample_features: dict[str, torch.Tensor],
    reference: Reference | None,
    reference_feats: dict[str, torch.Tensor],
    config: FeatureConfig,
) -> dict[str, float]:
    """The metric values from the extracted features (torch-fidelity's math), as floats by torch-fidelity's keys."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric

    kwargs = config.fidelity_kwargs()
    values: dict[str, float] = {}
    if "is" in metrics:
        values.update(isc_featuresdict_to_metric(sample_features, layers["is"], **kwargs))
    if "fid" in metrics:
        sample_stats = fid_featuresdict_to_statistics(sample_features, layers["fid"])
        if reference.has_images:
            reference_stats = fid_featuresdict_to_statistics(reference_feats, layers["fid"])
        else:
            reference_stats = load_reference_statistics(reference, sample_stats["mu"].shape[0])
            # torch-fidelity compares dtypes strictly (float32 means from float32 features, float64 covariances).
            reference_stats = {key: value.astype(sample_stats[key].dtype) for key, value in reference_stats.items()}
        values.update(fid_statistics_to_metric(sample_stats, reference_stats, config.verbose))
    if "kid" in metrics:
        values.update(kid_featuresdict_to_metric(sample_features, reference_feats, layers["kid"], **kwargs))
    if "prc" in metrics:
        values.update(prc_featuresdict_to_metric(sample_features, reference_feats, layers["prc"], **kwargs))
    return {key: float(value) for key, value in values.items()}
