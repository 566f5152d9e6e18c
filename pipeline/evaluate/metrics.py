"""Sample-quality metrics of `evaluate` by the ADM evaluator's protocol: FID, sFID, Inception Score, precision /
recall (and KID), with torch-fidelity's Inception-v3.

The protocol is guided-diffusion's `evaluations/evaluator.py`, the one behind the published ImageNet numbers: FID
and sFID against the statistics stored in a reference batch (`mu`, `sigma`, `mu_s`, `sigma_s`, computed over the
whole training set), precision / recall (k = 3) against its images `arr_0`, the Inception Score of the samples.
The math is in `pipeline.evaluate.adm` (Fréchet distance in float64 with the evaluator's singular-product
handling, k-NN precision / recall in bounded memory), the features in `pipeline.evaluate.features` (torch-fidelity's
port of the same TensorFlow Inception graph, plus the sFID layer); IS and KID are torch-fidelity's. This module
supplies what the offline pipeline needs around it:

- the Inception weights file (`resolve_inception_weights`): it cannot be downloaded here, so it comes from
  `--inception-weights` or torch-fidelity's own cache, is checked before any sampling, loaded only after a
  `torch.load(weights_only=True)` check, and identified by its SHA-256. Metrics computed with a file whose hash is
  not the official one are labelled "plumbing-only" everywhere they are reported (see `InceptionWeights`);
- references (`open_reference`): an ADM reference batch (`arr_0` + statistics), a statistics file (`mu`/`sigma`,
  optionally `mu_s`/`sigma_s`, e.g. written by `diffit-pipe reference`), an `.npz` of images, an image folder or
  raw image shards from `pack`, read in place (`pipeline.evaluate.datasets`), never unpacked to PNGs;
- which reference data feeds which metric (`gather_reference_inputs`, recorded in metrics.json): stored statistics
  where the reference has them; else the statistics of all its images (streamed and resumable, never all features
  in memory, when there are more than `prc_reference_limit`); precision / recall and KID against at most
  `prc_reference_limit` images, a seeded random subset when there are more (logged, never silent);
- reference features and statistics computed once and cached beside the reference (or in a cache directory when
  the reference is read-only), keyed by the reference's content hash and the feature extractor's identity.

torch-fidelity's own cache (`cache_root`, `input2_cache_name`) is not used: it is keyed by a name only, not by the
weights file, and reads its entries back with pickle (`torch.load(weights_only=False)`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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

from pipeline.core.atomic import AtomicFile, atomic_open, write_bytes_atomic, write_json_atomic
from pipeline.core.errors import InputError
from pipeline.core.shards import json_bytes, load_manifest, sha256_file, shard_problems, shard_urls
from pipeline.core.storage import is_url
from pipeline.evaluate.adm import (
    ADM_IS_SPLIT_SIZE,
    DEFAULT_PRC_MEMORY_BYTES,
    PRC_NEIGHBOURHOOD,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
    subsample_indices,
)

# The datasets are re-exported: callers and tests read them as `metrics.ArrayDataset` etc.
from pipeline.evaluate.datasets import (  # noqa: F401
    IMAGE_EXTENSIONS,
    ArrayDataset,
    ImageFolderDataset,
    ReferenceInputError,
    SampleStoreDataset,
    ShardImageDataset,
    _decode_rgb,
    list_image_files,
)
from pipeline.evaluate.features import SFID_LAYER, InceptionFeatures, base_layers, extract_all
from pipeline.evaluate.reference_batch import accumulate_statistics

logger = logging.getLogger(__name__)

FEATURE_EXTRACTOR = "inception-v3-compat"
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# torch.hub's naming convention (`load_state_dict_from_url(check_hash=True)`): the hex digits after the last '-'
# of a checkpoint's file name are the first digits of the SHA-256 of its content. A file whose hash starts with
# them is the torch-fidelity release file; any other file (random init, pytorch-fid's differently-keyed weights,
# a re-trained network) is not, and its numbers must not be reported as FID/IS.
OFFICIAL_INCEPTION_SHA256_PREFIX = "6726825d"
PLUMBING_ONLY_LABEL = "plumbing-only (non-official Inception weights)"

METRIC_NAMES = ("fid", "sfid", "is", "prc", "kid")
STATISTICS_METRICS = ("fid", "sfid")  # compared through mean / covariance (stored or computed)
FEATURE_METRICS = ("prc", "kid")  # compared feature by feature: need reference images
# The keys of an ADM reference batch / statistics file holding each metric's statistics, and the layer they are of.
STORED_STATISTICS = {"fid": ("mu", "sigma", "2048"), "sfid": ("mu_s", "sigma_s", SFID_LAYER)}
DEFAULT_PRC_REFERENCE_LIMIT = 10_000
CACHE_DIR_NAME = ".fidelity-cache"


class InceptionWeightsError(InputError):
    """The Inception weights file cannot be used (not a tensor state dict, not torch-fidelity's Inception-v3)."""


class MissingInceptionWeightsError(InceptionWeightsError, FileNotFoundError):
    """The Inception weights file is not available (it cannot be downloaded offline)."""


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
    """Which Inception features each metric uses, and how they are computed and compared.

    Defaults are the ADM evaluator's: 2048-d pool features for FID / precision-recall (and KID), the `mixed_6/conv`
    spatial features for sFID, logits for IS (torch-fidelity's unbiased logits) over consecutive splits of 5000
    samples, k = 3 neighbours, precision / recall against at most 10,000 reference images. `cuda` runs the
    network and the distance blocks on the GPU; `prc_memory_bytes` bounds the distance blocks of precision /
    recall; `num_workers` DataLoader workers decode reference images.
    """

    weights: InceptionWeights
    layer_fid: str = "2048"
    layer_kid: str = "2048"
    layer_prc: str = "2048"
    layer_isc: str = "logits_unbiased"
    batch_size: int = 64
    cuda: bool = False
    isc_splits: int = 10
    isc_split_size: int | None = ADM_IS_SPLIT_SIZE  # None: torch-fidelity's `isc_splits` parts after a shuffle
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    prc_neighborhood: int = PRC_NEIGHBOURHOOD
    prc_memory_bytes: int = DEFAULT_PRC_MEMORY_BYTES
    prc_reference_limit: int = DEFAULT_PRC_REFERENCE_LIMIT
    prc_seed: int = 0
    num_workers: int = 0
    rng_seed: int = 2020
    verbose: bool = False
    progress: bool = True

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.cuda else "cpu")

    def layers_for(self, metrics: Iterable[str]) -> dict[str, str]:
        """metric name -> feature layer, for the requested metrics."""
        layer_of = {
            "fid": self.layer_fid,
            "sfid": SFID_LAYER,
            "kid": self.layer_kid,
            "prc": self.layer_prc,
            "is": self.layer_isc,
        }
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
        """Keyword arguments of torch-fidelity's metric functions (IS, KID) and extractor."""
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


def create_feature_extractor(config: FeatureConfig, layers: Sequence[str]) -> InceptionFeatures:
    """torch-fidelity's Inception-v3 for `layers` (sFID's `SFID_LAYER` included), loaded from the checked
    weights file, on the GPU when `config.cuda`."""
    from torch_fidelity.utils import create_feature_extractor as fidelity_create

    try:
        base = fidelity_create(FEATURE_EXTRACTOR, base_layers(layers), **config.fidelity_kwargs())
    except RuntimeError as error:  # load_state_dict: missing / unexpected keys, wrong shapes
        raise InceptionWeightsError(
            f"{config.weights.path}: not torch-fidelity Inception-v3 weights ({error})"
        ) from error
    return InceptionFeatures(base, layers)


def check_feature_layers(config: FeatureConfig, metrics: Iterable[str]) -> None:
    """Fail early when a requested feature layer does not exist in torch-fidelity's Inception-v3."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    provided = FeatureExtractorInceptionV3.get_provided_features_list()
    for metric, layer in config.layers_for(metrics).items():
        if layer not in provided and layer != SFID_LAYER:
            raise InputError(f"feature layer {layer!r} for {metric} is not one of Inception-v3's {provided}")


def extract_features(
    dataset: Dataset, extractor: torch.nn.Module, config: FeatureConfig, description: str = "features"
) -> dict[str, torch.Tensor]:
    """Features of every image of `dataset` (uint8 CHW tensors), batched on the extractor's device, with
    DataLoader workers where the dataset allows them and a progress bar."""
    # Worker processes pay off for a stream of images to decode, not for a batch or two (or a zarr store).
    many = len(dataset) > 2 * config.batch_size
    workers = config.num_workers if many and getattr(dataset, "supports_workers", True) else 0
    return extract_all(dataset, extractor, config.batch_size, workers, description, config.progress)


# ----------------------------------------------------------------------------------------------------------------
# References


@dataclass
class Reference:
    """A reference set: where it is, what kind it is, its resolution and size, and its content identity.

    `kind` is one of "shards" (raw image shards from `pack`), "folder" (image files), "npz" (an `.npz` of images
    `arr_0`), "adm" (an ADM reference batch: images `arr_0` and statistics `mu`/`sigma`, usually `mu_s`/`sigma_s`)
    or "stats" (an `.npz` holding only statistics: FID, sFID when it has `mu_s`/`sigma_s`, and IS).
    `statistics` lists the statistics keys the file holds.
    """

    path: Path
    kind: str
    resolution: tuple[int, int] | None
    num_images: int | None
    details: dict[str, Any] = field(default_factory=dict)
    _content_hash: str | None = None
    statistics: tuple[str, ...] = ()

    @property
    def has_images(self) -> bool:
        return self.kind != "stats"

    def stored_statistics(self, metric: str) -> tuple[str, str] | None:
        """The (mean, covariance) keys this file stores for `metric` ("fid" / "sfid"), or None."""
        if metric not in STORED_STATISTICS:
            return None
        mean_key, cov_key, _ = STORED_STATISTICS[metric]
        return (mean_key, cov_key) if {mean_key, cov_key} <= set(self.statistics) else None

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
    if is_url(path):  # an object-store reference: used from a checked local copy
        from pipeline.evaluate.remote_reference import stage_reference

        reference = open_reference(stage_reference(str(path)))
        reference.details["url"] = str(path)
        return reference
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
        return _open_npz_reference(path)
    raise ReferenceInputError(
        f"{path}: unknown reference; give a raw image shard directory (from `pack`), an "
        "image folder, an ADM .npz with arr_0, or an .npz with FID statistics mu/sigma"
    )


def _open_npz_reference(path: Path) -> Reference:
    """An `.npz` reference: images (`arr_0`), statistics (`mu`/`sigma`, `mu_s`/`sigma_s`), or both (ADM)."""
    members = _npz_members(path)
    statistics = tuple(key for key in ("mu", "sigma", "mu_s", "sigma_s") if key in members)
    has_statistics = {"mu", "sigma"} <= set(statistics) or {"mu_s", "sigma_s"} <= set(statistics)
    for metric in ("fid", "sfid"):
        mean_key, cov_key, _ = STORED_STATISTICS[metric]
        if {mean_key, cov_key} <= set(statistics):
            _read_statistics(path, mean_key, cov_key)  # a damaged file stops the run here, before any sampling
    if "arr_0" in members:
        images = _npz_member_array(path, "arr_0")
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ReferenceInputError(
                f"{path}: arr_0 must be uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}"
            )
        return Reference(
            path,
            "adm" if has_statistics else "npz",
            (int(images.shape[1]), int(images.shape[2])),
            int(images.shape[0]),
            statistics=statistics if has_statistics else (),
        )
    if has_statistics:
        return Reference(
            path,
            "stats",
            None,
            None,
            {"note": "precomputed statistics; their feature extractor cannot be verified"},
            statistics=statistics,
        )
    raise ReferenceInputError(
        f"{path}: an .npz reference needs arr_0 (images) or mu and sigma (FID statistics); it has {members}"
    )


def reference_dataset(reference: Reference) -> Dataset:
    """The images of `reference` as a Dataset of uint8 CHW tensors."""
    if reference.kind == "shards":
        paths = [Path(url) for url in shard_urls(reference.path, load_manifest(reference.path))]
        return ShardImageDataset(paths, reference.resolution)
    if reference.kind == "folder":
        return ImageFolderDataset(reference.path, reference.resolution)
    if reference.kind in ("npz", "adm"):
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
    if not reference.has_images:
        for metric in sorted(metrics & set(STATISTICS_METRICS)):
            if reference.stored_statistics(metric) is None:
                mean_key, cov_key, _ = STORED_STATISTICS[metric]
                raise ReferenceInputError(
                    f"{reference.path}: no {mean_key}/{cov_key} statistics for {metric}; give a reference batch "
                    "that has them (`diffit-pipe reference` writes both), or drop it from --metrics"
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


def _cache_file(
    cache_dir: Path, content_hash: str, identity: dict[str, Any], layer: str, subset: str | None = None
) -> Path:
    fields = {"reference": content_hash, "extractor": identity, "layer": layer}
    if subset is not None:
        fields["subset"] = subset  # only then: the cache files of whole references keep their names
    key = sha256_json(fields)
    return cache_dir / f"features-{content_hash[:12]}-{key[:16]}-{layer}.safetensors"


def _subset_key(indices: np.ndarray | None) -> str | None:
    return None if indices is None else hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()


def reference_features(
    reference: Reference,
    layers: Sequence[str],
    config: FeatureConfig,
    cache_dir: Path,
    extractor: torch.nn.Module | None = None,
    indices: np.ndarray | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Reference features of `layers` (of the images `indices` only, when given): from the cache when present,
    else extracted once and cached atomically.

    Returns (features by layer, cache report {layer: {"file", "hit"}}).
    """
    from safetensors.torch import save as safetensors_bytes

    content_hash = reference_content_hash(reference, cache_dir)
    identity = config.extractor_identity()
    subset = _subset_key(indices)
    features: dict[str, torch.Tensor] = {}
    report: dict[str, Any] = {}
    missing = []
    for layer in sorted(set(layers)):
        path = _cache_file(cache_dir, content_hash, identity, layer, subset)
        if path.is_file():
            features[layer] = _load_cached_features(path)
            report[layer] = {"file": str(path), "hit": True}
            logger.info("reference features %s: cache hit %s", layer, path)
        else:
            missing.append(layer)
    if missing:
        extractor = extractor if extractor is not None else create_feature_extractor(config, missing)
        dataset = reference_dataset(reference)
        if indices is not None:
            dataset = torch.utils.data.Subset(dataset, np.asarray(indices).tolist())
        logger.info("extracting reference features %s from %d images of %s", missing, len(dataset), reference.path)
        extracted = extract_features(dataset, extractor, config, "reference features")
        for layer in missing:
            path = _cache_file(cache_dir, content_hash, identity, layer, subset)
            metadata = {
                "reference": json.dumps(reference.describe()),
                "extractor": json.dumps(identity),
                "layer": layer,
                "subset_sha256": subset or "",
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


def _read_statistics(path: Path, mean_key: str = "mu", cov_key: str = "sigma") -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of a statistics `.npz`; a damaged file is one `ReferenceInputError`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data[mean_key], dtype=np.float64), np.asarray(data[cov_key], dtype=np.float64)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise ReferenceInputError(
            f"{path}: cannot read {mean_key} / {cov_key} ({type(error).__name__}: {error})"
        ) from error


def load_reference_statistics(reference: Reference, feature_dim: int, metric: str = "fid") -> dict[str, np.ndarray]:
    """The stored mean / covariance of `metric` ("fid": mu/sigma, "sfid": mu_s/sigma_s), checked against the
    feature dimension they will be compared with."""
    mean_key, cov_key, _ = STORED_STATISTICS[metric]
    mu, sigma = _read_statistics(reference.path, mean_key, cov_key)
    if mu.shape != (feature_dim,) or sigma.shape != (feature_dim, feature_dim):
        raise ReferenceInputError(
            f"{reference.path}: {mean_key} {mu.shape} / {cov_key} {sigma.shape} do not match the "
            f"{metric.upper()} feature dimension {feature_dim}"
        )
    return {"mu": mu, "sigma": sigma}


def streamed_reference_statistics(
    reference: Reference, layers: Sequence[str], config: FeatureConfig, cache_dir: Path
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """Mean / covariance of `layers` over every image of a large reference, streamed (never all features in
    memory) and resumable (`reference_batch.accumulate_statistics`), cached as one `.npz` per layer set."""
    content_hash = reference_content_hash(reference, cache_dir)
    identity = {"reference": content_hash, "extractor": config.extractor_identity(), "layers": sorted(layers)}
    key = sha256_json(identity)[:16]
    path = cache_dir / f"statistics-{content_hash[:12]}-{key}.npz"
    if path.is_file():
        logger.info("reference statistics %s: cache hit %s", sorted(layers), path)
        stats = {layer: _read_statistics(path, f"{layer}.mu", f"{layer}.sigma") for layer in layers}
        return stats, {"file": str(path), "hit": True}
    extractor = create_feature_extractor(config, list(layers))
    workers = config.num_workers
    moments = accumulate_statistics(
        reference_dataset(reference),
        extractor,
        list(layers),
        cache_dir / f".statistics-{content_hash[:12]}-{key}.partial",
        identity,
        batch_size=config.batch_size,
        workers=workers,
        progress=config.progress,
    )
    stats = {layer: moments[layer].statistics() for layer in layers}
    arrays = {
        f"{layer}.{name}": value
        for layer, (mu, sigma) in stats.items()
        for name, value in (("mu", mu), ("sigma", sigma))
    }
    with atomic_open(path) as handle:
        np.savez(handle, **arrays)
    return stats, {"file": str(path), "hit": False}


# ----------------------------------------------------------------------------------------------------------------
# Which reference data feeds which metric


@dataclass
class ReferenceInputs:
    """What the reference contributes: statistics per metric (fid / sfid), features per layer (prc / kid), where
    each came from (for metrics.json), and the cache files used."""

    statistics: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)


def _uses_stored_statistics(reference: Reference, metric: str, dim: int) -> bool:
    """Stored statistics serve `metric` when the file has them and, for a file that also has images, when they are
    of the dimension of the features compared with them (else, e.g. with a plumbing `--feature-layer`, the images
    are used, and the record says so). A statistics-only file of another dimension is an error, raised later."""
    keys = reference.stored_statistics(metric)
    if keys is None:
        return False
    if not reference.has_images:
        return True
    stored_dim = _npz_member_array(reference.path, keys[0]).shape
    if stored_dim != (dim,):
        logger.warning(
            "%s: stored %s %s does not match the %d-d features compared with it; %s uses the images (arr_0)",
            reference.path,
            keys[0],
            stored_dim,
            dim,
            metric,
        )
        return False
    return True


def _stored_statistics(reference, metrics, layers, inputs: ReferenceInputs, feature_dims: dict[str, int]) -> None:
    for metric in metrics:
        stored = load_reference_statistics(reference, feature_dims[layers[metric]], metric)
        inputs.statistics[metric] = (stored["mu"], stored["sigma"])
        mean_key, cov_key, _ = STORED_STATISTICS[metric]
        inputs.sources[metric] = {"from": "stored statistics", "file": str(reference.path), "keys": [mean_key, cov_key]}


def feature_subset(reference: Reference, config: FeatureConfig) -> np.ndarray | None:
    """The reference images precision / recall and KID use: None (all) up to `prc_reference_limit`, else a seeded
    random subset of that many (logged)."""
    indices = subsample_indices(reference.num_images or 0, config.prc_reference_limit, config.prc_seed)
    if indices is not None:
        logger.warning(
            "%s: %d reference images exceed --prc-reference-limit %d; precision/recall and KID use a random "
            "subset of %d drawn with seed %d",
            reference.path,
            reference.num_images,
            config.prc_reference_limit,
            len(indices),
            config.prc_seed,
        )
    return indices


def gather_reference_inputs(
    reference: Reference | None,
    metrics: Sequence[str],
    layers: dict[str, str],
    config: FeatureConfig,
    cache_dir: Path | None,
    extractor: torch.nn.Module | None,
    feature_dims: dict[str, int],
) -> ReferenceInputs:
    """The reference side of every requested metric (see the module docstring for which data feeds which)."""
    inputs = ReferenceInputs()
    if "is" in metrics:
        inputs.sources["is"] = {"from": "samples only"}
    if reference is None:
        return inputs
    statistic_metrics = [m for m in metrics if m in STATISTICS_METRICS]
    stored = [m for m in statistic_metrics if _uses_stored_statistics(reference, m, feature_dims[layers[m]])]
    _stored_statistics(reference, stored, layers, inputs, feature_dims)
    from_images = [m for m in statistic_metrics if m not in stored]
    feature_metrics = [m for m in metrics if m in FEATURE_METRICS]
    subset = feature_subset(reference, config) if feature_metrics else None
    streamed = bool(from_images) and (reference.num_images or 0) > config.prc_reference_limit
    if streamed:
        stats_layers = sorted({layers[m] for m in from_images})
        stats, inputs.cache["statistics"] = streamed_reference_statistics(reference, stats_layers, config, cache_dir)
        for metric in from_images:
            inputs.statistics[metric] = stats[layers[metric]]
            inputs.sources[metric] = {
                "from": "streamed statistics of all reference images",
                "images": reference.num_images,
            }
        from_images = []
    wanted = sorted({layers[m] for m in from_images + feature_metrics})
    if wanted:
        reusable = extractor is not None and set(extractor.get_requested_features_list()) == set(wanted)
        features, inputs.cache["features"] = reference_features(
            reference, wanted, config, cache_dir, extractor if reusable else None, subset if feature_metrics else None
        )
        for metric in from_images:
            inputs.statistics[metric] = feature_statistics(features[layers[metric]])
            inputs.sources[metric] = {"from": "features of all reference images", "images": reference.num_images}
        inputs.features = {layers[m]: features[layers[m]] for m in feature_metrics}
    for metric in feature_metrics:
        used = len(subset) if subset is not None else reference.num_images
        inputs.sources[metric] = {
            "from": "reference images",
            "images": used,
            "of": reference.num_images,
            "subset_seed": config.prc_seed if subset is not None else None,
        }
    return inputs


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
    """FID / sFID / IS / precision-recall / KID of `samples` against `reference`, by the ADM evaluator's protocol.

    `reference` (and `cache_dir`, where its features are cached) may be None when only IS is requested.
    `extractor` (from `create_feature_extractor(config, layers)` with every layer the metrics need) saves
    re-loading the network when several evaluations run in one process.

    Returns {"values": {metric key: float}, "sources": {metric: where its reference data came from},
    "reference_cache": ..., "timings_s": ..., "num_samples": N, "feature_layers": {metric: layer}}.
    """
    _check_metric_request(samples, reference, metrics, config, cache_dir)
    layers = config.layers_for(metrics)
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
    sample_features = extract_features(samples, extractor, config, "sample features")
    timings["sample_features"] = time.perf_counter() - started

    started = time.perf_counter()
    dims = {layer: int(values.shape[1]) for layer, values in sample_features.items()}
    reference_layers = {m: layers[m] for m in metrics if m != "is"}
    # Reference images only need the reference-side layers: an extractor that also computes IS logits would run
    # the whole network for nothing when those layers are shallower (reference_features builds its own then).
    inputs = gather_reference_inputs(reference, metrics, reference_layers, config, cache_dir, extractor, dims)
    timings["reference_features"] = time.perf_counter() - started

    started = time.perf_counter()
    values = _metric_values(metrics, layers, sample_features, inputs, config)
    timings["metric_math"] = time.perf_counter() - started
    return {
        "values": values,
        "sources": inputs.sources,
        "reference_cache": inputs.cache.get("features", {}),
        "reference_statistics_cache": inputs.cache.get("statistics"),
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
    binary = [m for m in metrics if m in STATISTICS_METRICS + FEATURE_METRICS]
    if binary and (reference is None or cache_dir is None):
        raise InputError(f"{binary} need a reference set (and a cache directory for its features)")
    if "prc" in metrics and len(samples) <= config.prc_neighborhood:
        raise InputError(f"precision/recall with k = {config.prc_neighborhood} needs more samples, got {len(samples)}")
    if "kid" in metrics:
        reference_count = reference.num_images if reference and reference.num_images else None
        if reference_count is not None:
            reference_count = min(reference_count, config.prc_reference_limit)
        sizes = [len(samples)] + ([reference_count] if reference_count else [])
        if config.kid_subset_size > min(sizes):
            raise InputError(
                f"KID subset size {config.kid_subset_size} exceeds the number of samples "
                f"({len(samples)}) or reference images ({sizes[-1]}); lower --kid-subset-size"
            )


def _metric_values(
    metrics: Sequence[str],
    layers: dict[str, str],
    sample_features: dict[str, torch.Tensor],
    inputs: ReferenceInputs,
    config: FeatureConfig,
) -> dict[str, float]:
    """The metric values (the ADM evaluator's math for FID / sFID / IS / precision-recall, torch-fidelity's for
    KID), as floats by torch-fidelity's keys."""
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric

    kwargs = config.fidelity_kwargs()
    values: dict[str, float] = {}
    if "is" in metrics and config.isc_split_size:
        mean, std = inception_score(sample_features[layers["is"]], config.isc_split_size)
        values.update({"inception_score_mean": mean, "inception_score_std": std})
    elif "is" in metrics:
        values.update(isc_featuresdict_to_metric(sample_features, layers["is"], **kwargs))
    for metric, key in (("fid", "frechet_inception_distance"), ("sfid", "spatial_frechet_inception_distance")):
        if metric in metrics:
            mu, sigma = feature_statistics(sample_features[layers[metric]], config.device)
            values[key] = frechet_distance(mu, sigma, *inputs.statistics[metric])
    if "kid" in metrics:
        values.update(kid_featuresdict_to_metric(sample_features, inputs.features, layers["kid"], **kwargs))
    if "prc" in metrics:
        values.update(
            precision_recall(
                inputs.features[layers["prc"]],
                sample_features[layers["prc"]],
                k=config.prc_neighborhood,
                memory_bytes=config.prc_memory_bytes,
                device=config.device,
                progress=config.progress,
            )
        )
    return {key: float(value) for key, value in values.items()}
