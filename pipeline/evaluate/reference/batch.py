"""Reference batches in the ADM evaluator's layout, and the streamed, resumable statistics behind them.

    diffit-pipe reference /data/in256-raw in256_reference.npz      # packed shards, an image folder, an .npz

The output is what guided-diffusion's `evaluations/evaluator.py` reads (`VIRTUAL_imagenet256_labeled.npz` has
this layout): `arr_0` uint8 [n, H, W, 3], a seeded random subset of `--subset` (10,000) images for precision /
recall (all of them when the source is smaller); `mu`, `sigma` the mean and covariance of the 2048-d pool
features of the WHOLE source (FID); `mu_s`, `sigma_s` those of the 2023-d spatial features (sFID, see
`pipeline.evaluate.features`). Two extra entries the evaluator ignores: `subset_indices` (which source images
`arr_0` holds) and `info` (a JSON string: source, counts, seed, extractor and weights hash).

The statistics are streamed: the source is cut into chunks of `chunk_size` images; each chunk's features are
reduced on the fly to float64 count / mean / centred scatter per layer (`RunningMoments`), written atomically as
`chunk-NNNNNN.npz` into a work directory beside the output, and the chunks are merged in order at the end. No
more than one batch of features is ever held, a killed run recomputes only the chunks whose files are missing,
and the result does not depend on where it was interrupted. The work directory is removed once the output is
written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from pipeline.core.atomic import atomic_open, atomic_path, json_text, remove_temporary_files, write_json_atomic
from pipeline.core.errors import InputError, reporting_disk_full
from pipeline.evaluate.adm import RunningMoments, subsample_indices
from pipeline.evaluate.datasets import ReferenceInputError
from pipeline.evaluate.features import SFID_LAYER, iterate_features
from pipeline.evaluate.inception import FeatureConfig, create_feature_extractor, resolve_inception_weights
from pipeline.evaluate.reference.cache import reference_content_hash, sha256_json
from pipeline.evaluate.reference.formats import Reference, _read_statistics, open_reference, reference_dataset
from pipeline.evaluate.reference.source import original_message

logger = logging.getLogger(__name__)

REFERENCE_FORMAT_VERSION = 1
DEFAULT_SUBSET = 10_000
DEFAULT_CHUNK_SIZE = 10_000
FID_LAYER = "2048"
# Layer -> (mean key, covariance key) of an ADM reference batch (the layers `reference` extracts).
STATISTICS_KEYS = {FID_LAYER: ("mu", "sigma"), SFID_LAYER: ("mu_s", "sigma_s")}
SETTINGS_FILE = "settings.json"
UPDATE_ROWS = 2048  # images pooled per float64 moment update (8 MB of 2048-d float32 features)


# ----------------------------------------------------------------------------------------------------------------
# Streamed statistics, resumable chunk by chunk


def _part_path(work_dir: Path, chunk: int) -> Path:
    return work_dir / f"chunk-{chunk:06d}.npz"


def _prepare_work_dir(work_dir: Path, settings: dict[str, Any]) -> None:
    """Create `work_dir`, drop temporary files of killed attempts, and start over when its chunks were computed
    with other settings (another source content, extractor, chunk size): they would not add up to this one."""
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_temporary_files(work_dir)
    settings_path = work_dir / SETTINGS_FILE
    if settings_path.is_file():
        try:
            previous = json.loads(settings_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous == json.loads(json_text(settings)):
            return
        logger.warning("%s: partial statistics of other settings; starting over", work_dir)
        for part in work_dir.glob("chunk-*.npz"):
            part.unlink()
    write_json_atomic(settings_path, settings)


def _read_part(path: Path, layers: Sequence[str], count: int) -> dict[str, RunningMoments] | None:
    """The moments stored in a chunk file, or None when it is absent or unusable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            moments = {layer: RunningMoments.from_arrays(arrays, f"{layer}.") for layer in layers}
    except Exception as error:  # noqa: BLE001 - a damaged partial file is only a cache: recompute it
        logger.warning("%s: unreadable partial statistics (%s); recomputing the chunk", path, error)
        return None
    if any(m.count != count for m in moments.values()):
        logger.warning("%s: holds another number of images than its chunk; recomputing it", path)
        return None
    return moments


def _compute_part(
    dataset: Dataset, extractor: torch.nn.Module, layers: Sequence[str], batch_size: int, workers: int, bar
) -> dict[str, RunningMoments]:
    """The moments of one chunk. Batches are pooled into blocks of `UPDATE_ROWS` images before each float64
    update: one d x d product per block instead of one per Inception batch (the merge is memory-bound)."""
    moments: dict[str, RunningMoments] = {}
    pending: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    rows = 0
    for features in iterate_features(dataset, extractor, batch_size, workers, bar=bar):
        for layer in layers:
            pending[layer].append(features[layer])
        rows += int(features[layers[0]].shape[0])
        if rows >= UPDATE_ROWS:
            _update_moments(moments, pending)
            rows = 0
    _update_moments(moments, pending)
    return moments


def _update_moments(moments: dict[str, RunningMoments], pending: dict[str, list[torch.Tensor]]) -> None:
    for layer, parts in pending.items():
        if not parts:
            continue
        block = torch.cat(parts)
        if layer not in moments:
            moments[layer] = RunningMoments.empty(block.shape[1], block.device)
        moments[layer].update(block)
        parts.clear()


def accumulate_statistics(
    dataset: Dataset,
    extractor: torch.nn.Module,
    layers: Sequence[str],
    work_dir: Path,
    identity: dict[str, Any],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, RunningMoments]:
    """Float64 moments of `layers` over every image of `dataset`, chunk by chunk (see the module docstring).

    `identity` is what the images and features depend on (source content hash, extractor identity): chunk files
    of another identity are discarded, never mixed in.
    """
    from tqdm.auto import tqdm

    if chunk_size < 1:
        raise InputError(f"chunk size must be >= 1, got {chunk_size}")
    count = len(dataset)
    settings = {"identity": identity, "layers": sorted(layers), "chunk_size": chunk_size, "num_images": count}
    _prepare_work_dir(work_dir, settings)
    chunks = [(start, min(start + chunk_size, count)) for start in range(0, count, chunk_size)]
    totals: dict[str, RunningMoments] = {}
    reused = 0
    with tqdm(total=count, desc="reference statistics", unit="img", disable=not progress, smoothing=0.05) as bar:
        for chunk, (start, stop) in enumerate(chunks):
            path = _part_path(work_dir, chunk)
            moments = _read_part(path, layers, stop - start)
            if moments is None:
                subset = Subset(dataset, range(start, stop))
                moments = _compute_part(subset, extractor, layers, batch_size, workers, bar)
                arrays = {k: v for layer in layers for k, v in moments[layer].arrays(f"{layer}.").items()}
                with atomic_open(path) as handle:
                    np.savez(handle, **arrays)
            else:
                reused += 1
                bar.update(stop - start)
            for layer in layers:
                totals.setdefault(layer, RunningMoments.empty(moments[layer].mean.shape[0])).merge(moments[layer])
    if reused:
        logger.info("reused the partial statistics of %d of %d chunks in %s", reused, len(chunks), work_dir)
    return totals


# ----------------------------------------------------------------------------------------------------------------
# Writing an .npz without holding its largest array


def _write_npy_member(archive: zipfile.ZipFile, name: str, array: np.ndarray) -> None:
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


def write_reference_npz(
    path: Path,
    arrays: dict[str, np.ndarray],
    image_shape: tuple[int, ...] | None = None,
    image_batches: Iterable[np.ndarray] = (),
) -> Path:
    """An uncompressed `.npz` (the `np.savez` layout) written atomically: `arr_0` uint8 of `image_shape`
    streamed from `image_batches` (never all in memory), then the small `arrays`."""
    with atomic_path(path) as temp, zipfile.ZipFile(temp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        if image_shape is not None:
            written = 0
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
                np.lib.format.write_array_header_2_0(member, {**header, "shape": tuple(image_shape)})
                for batch in image_batches:
                    member.write(np.ascontiguousarray(batch, dtype=np.uint8).tobytes())
                    written += len(batch)
            if written != image_shape[0]:
                raise InputError(f"{path}: wrote {written} reference images, expected {image_shape[0]}")
        for name, array in arrays.items():
            _write_npy_member(archive, name, array)
    return path


def _image_batches(dataset: Dataset, indices: np.ndarray, workers: int, progress: bool):
    """uint8 HWC batches of the images `indices` of `dataset` (a CHW uint8 tensor dataset), in that order."""
    from tqdm.auto import tqdm

    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=64, num_workers=workers)
    with tqdm(total=len(indices), desc="reference images (arr_0)", unit="img", disable=not progress) as bar:
        for batch in loader:
            bar.update(int(batch.shape[0]))
            yield batch.permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------------------------------------------
# `diffit-pipe reference`


@dataclass
class ReferenceOptions:
    """What `diffit-pipe reference` parses."""

    source: Path
    out: Path
    inception_weights: Path | None = None
    # DINOv2 ViT-L/14 weights: adds mu_dinov2 / sigma_dinov2 (FD_DINOv2, `pipeline.evaluate.dinov2`) to the batch
    dinov2_weights: Path | None = None
    subset_size: int = DEFAULT_SUBSET
    seed: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    batch_size: int = 64
    workers: int = min(4, os.cpu_count() or 1)
    device: str | None = None
    images: bool = True
    overwrite: bool = False
    progress: bool = True
    # An encode source (ImageNet archives, parquet, WebDataset, a folder of any image sizes), every image
    # center-cropped to this resolution as `pack` does (`pipeline.evaluate.reference.source`); None: SOURCE is a
    # reference at one resolution (raw shards, a folder, an .npz).
    resolution: int | None = None
    source_format: str = "auto"
    labels: str | None = None
    max_pixels: int | None = None


def work_dir_for(out: Path) -> Path:
    """Where the partial statistics of `out` live until it is written (beside it, hidden)."""
    return out.parent / f".{out.name}.partial"


def _check_options(options: ReferenceOptions) -> None:
    if options.out.suffix != ".npz":
        raise InputError(f"{options.out}: the reference batch is an .npz file; name it OUT.npz")
    if options.out.exists() and not options.overwrite:
        raise InputError(f"{options.out} exists; pass --overwrite to replace it")
    if options.subset_size < 0 or options.chunk_size < 1 or options.batch_size < 1:
        raise InputError("--subset must be >= 0, --chunk-size and --batch-size >= 1")


def _subset(count: int, options: ReferenceOptions) -> np.ndarray:
    """Indices of the source images stored as arr_0 (sorted): all, a seeded subset, or none (statistics only)."""
    if not options.images or options.subset_size == 0:
        return np.arange(0)
    chosen = subsample_indices(count, options.subset_size, options.seed)
    if chosen is None:
        return np.arange(count)
    logger.info("arr_0: %d of %d images, drawn with seed %d", len(chosen), count, options.seed)
    return chosen


def build_reference(options: ReferenceOptions) -> dict[str, Any]:
    """Write the ADM-layout reference batch of `options.source` to `options.out`; returns its `info` record.
    Out of disk space is one error line (exit 1): the finished chunks are kept and a rerun resumes."""
    resume = f"the finished statistics chunks in {work_dir_for(options.out)} are kept and the build resumes"
    with reporting_disk_full(options.out, resume):
        return _build_reference(options)


def _build_reference(options: ReferenceOptions) -> dict[str, Any]:
    _check_options(options)
    began = time.perf_counter()
    work_dir = work_dir_for(options.out)
    if options.resolution is not None:
        from pipeline.evaluate.reference.source import open_source_reference

        reference, dataset = open_source_reference(
            options.source, options.resolution, work_dir, options.source_format, options.labels, options.max_pixels
        )
    else:
        reference = open_reference(options.source)
        dataset = None
    if not reference.has_images:
        raise InputError(f"{options.source}: a statistics file has no images to build a reference batch from")
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = FeatureConfig(
        weights=resolve_inception_weights(options.inception_weights),
        batch_size=options.batch_size,
        cuda=device.type == "cuda",
        num_workers=options.workers,
    )
    dinov2 = _dinov2_config(options, device) if options.dinov2_weights is not None else None
    dataset = dataset if dataset is not None else reference_dataset(reference)
    content_hash = reference_content_hash(reference, work_dir)
    identity = {"source_sha256": content_hash, "extractor": config.extractor_identity()}
    keys = dict(STATISTICS_KEYS)
    extractor = create_feature_extractor(config, list(STATISTICS_KEYS))
    if dinov2 is not None:
        from pipeline.evaluate.dinov2 import DINOV2_LAYER, create_dinov2_extractor

        identity["dinov2_extractor"] = dinov2.extractor_identity()
        keys[DINOV2_LAYER] = ("mu_dinov2", "sigma_dinov2")
        extractor = _CombinedFeatures([extractor, create_dinov2_extractor(dinov2)])
    logger.info("reference statistics of %d images of %s (%s)", len(dataset), options.source, device)
    settings = {"chunk_size": options.chunk_size, "batch_size": options.batch_size, "workers": options.workers}
    try:
        moments = accumulate_statistics(
            dataset, extractor, list(keys), work_dir, identity, progress=options.progress, **settings
        )
    except ReferenceInputError as error:  # raised in a DataLoader worker: one line, not the worker's traceback
        raise type(error)(original_message(error)) from None
    arrays = {key: value for layer, names in keys.items() for key, value in zip(names, moments[layer].statistics())}
    indices = _subset(len(dataset), options)
    if len(indices):
        arrays["subset_indices"] = indices.astype(np.int64)
    info = {
        "format_version": REFERENCE_FORMAT_VERSION,
        "source": {**reference.describe(), "content_sha256": content_hash},
        "num_images_statistics": len(dataset),
        "num_images_arr_0": int(len(indices)),
        "subset_seed": options.seed,
        "feature_extractor": identity["extractor"],
        "inception_weights": config.weights.describe(),
        "statistics": {"mu/sigma": "pool_3 (2048)", "mu_s/sigma_s": f"{SFID_LAYER} (first 7 channels, NHWC, 2023)"},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if dinov2 is not None:
        info["dinov2_weights"] = dinov2.weights.describe()
        info["dinov2_extractor"] = identity["dinov2_extractor"]
        info["statistics"]["mu_dinov2/sigma_dinov2"] = "DINOv2 CLS token after the final norm (FD_DINOv2)"
    arrays["info"] = np.asarray(json.dumps(info, sort_keys=True))
    height, width = reference.resolution
    image_shape = (len(indices), height, width, 3) if len(indices) else None
    batches = _image_batches(dataset, indices, options.workers, options.progress) if len(indices) else ()
    write_reference_npz(options.out, arrays, image_shape, batches)
    shutil.rmtree(work_dir, ignore_errors=True)
    logger.info("wrote %s in %.1f s", options.out, time.perf_counter() - began)
    return info


class _CombinedFeatures(torch.nn.Module):
    """Several extractors on the same batch (Inception and DINOv2 in one pass over the source): merged dicts."""

    def __init__(self, extractors: Sequence[torch.nn.Module]):
        super().__init__()
        self.extractors = torch.nn.ModuleList(extractors)

    def get_requested_features_list(self) -> list[str]:
        return [layer for extractor in self.extractors for layer in extractor.get_requested_features_list()]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        from pipeline.evaluate.features import run_extractor

        return {layer: values for e in self.extractors for layer, values in run_extractor(e, images).items()}


def _dinov2_config(options: ReferenceOptions, device: torch.device):
    """FD_DINOv2's feature configuration for `--dinov2-weights` (checked before any image is read)."""
    from pipeline.evaluate.dinov2 import DINOv2Config, resolve_dinov2_weights

    return DINOv2Config(
        weights=resolve_dinov2_weights(options.dinov2_weights),
        batch_size=options.batch_size,
        cuda=device.type == "cuda",
        num_workers=options.workers,
        progress=options.progress,
    )


def streamed_reference_statistics(
    reference: Reference,
    layers: Sequence[str],
    config: FeatureConfig,
    cache_dir: Path,
    extractor: torch.nn.Module | None = None,
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """Mean / covariance of `layers` over every image of a large reference, streamed (never all features in
    memory) and resumable (`reference_batch.accumulate_statistics`), cached as one `.npz` per layer set.
    `extractor` (built from `config` when None) provides `layers`; `config.extractor_identity()` keys the cache
    (FD_DINOv2 passes its own extractor and config, `pipeline.evaluate.dinov2`)."""
    content_hash = reference_content_hash(reference, cache_dir)
    identity = {"reference": content_hash, "extractor": config.extractor_identity(), "layers": sorted(layers)}
    key = sha256_json(identity)[:16]
    path = cache_dir / f"statistics-{content_hash[:12]}-{key}.npz"
    if path.is_file():
        logger.info("reference statistics %s: cache hit %s", sorted(layers), path)
        stats = {layer: _read_statistics(path, f"{layer}.mu", f"{layer}.sigma") for layer in layers}
        return stats, {"file": str(path), "hit": True}
    if extractor is None:
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
