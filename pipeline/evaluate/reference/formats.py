"""Reference sets, identified cheaply before any sampling: raw image shards from `pack`, an image folder, an
`.npz` of images (`arr_0`), an ADM reference batch (`arr_0` + `mu`/`sigma`, `mu_s`/`sigma_s`) or a statistics-only
`.npz`; read in place (`pipeline.evaluate.datasets`), never unpacked to PNGs. Object-store URLs are used from a
checked local copy (`pipeline.evaluate.reference.remote`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from pipeline.core.manifest import load_manifest, shard_urls
from pipeline.core.storage_io import is_url
from pipeline.evaluate.datasets import (
    IMAGE_EXTENSIONS,
    ArrayDataset,
    ImageFolderDataset,
    ReferenceInputError,
    ShardImageDataset,
    _decode_rgb,
    list_image_files,
)
from pipeline.evaluate.features import SFID_LAYER
from pipeline.evaluate.npz_files import load_member, npz_member_names, read_member_header, verify_member

logger = logging.getLogger(__name__)

# The keys of an ADM reference batch / statistics file holding each metric's statistics, and the layer they are of.
STATISTICS_METRICS = ("fid", "sfid")  # compared through mean / covariance (stored or computed)
STORED_STATISTICS = {
    "fid": ("mu", "sigma", "2048"),
    "sfid": ("mu_s", "sigma_s", SFID_LAYER),
    # FD_DINOv2 (`pipeline.evaluate.dinov2`): DINOv2 ViT-L/14 CLS statistics, an addition to the ADM layout
    "fd_dinov2": ("mu_dinov2", "sigma_dinov2", "dinov2_vitl14_cls"),
}
STATISTICS_KEYS = tuple(key for mean_key, cov_key, _ in STORED_STATISTICS.values() for key in (mean_key, cov_key))


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
    """Array `name` of an `.npz`, its header checked first (`pipeline.evaluate.npz_files`)."""
    return load_member(path, name)


def open_reference(path: str | os.PathLike) -> Reference:
    """Identify a reference path (shard directory, image folder, ADM `.npz`, or statistics `.npz`) cheaply.

    Only headers are read here (manifest, npz headers, the first image of a folder), so that resolution
    mismatches and unusable inputs stop `evaluate` before sampling.
    """
    if is_url(path):  # an object-store reference: used from a checked local copy
        from pipeline.evaluate.reference.remote import stage_reference

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
    members = npz_member_names(path)
    statistics = tuple(key for key in STATISTICS_KEYS if key in members)
    has_statistics = any({mean_key, cov_key} <= set(statistics) for mean_key, cov_key, _ in STORED_STATISTICS.values())
    for metric in STORED_STATISTICS:
        mean_key, cov_key, _ = STORED_STATISTICS[metric]
        if {mean_key, cov_key} <= set(statistics):
            _read_statistics(path, mean_key, cov_key)  # a damaged file stops the run here, before any sampling
    if "arr_0" in members:
        header = read_member_header(path, "arr_0")  # shape and dtype checked before any data is read
        if len(header.shape) != 4 or header.shape[-1] != 3 or header.dtype != np.uint8:
            raise ReferenceInputError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {header.dtype} {header.shape}")
        if header.mappable:
            load_member(path, "arr_0", header)  # mapped, not read: a truncated file is refused here
        else:
            verify_member(header)  # a zip bomb refused before a byte is inflated, damage found chunk by chunk
        return Reference(
            path,
            "adm" if has_statistics else "npz",
            (int(header.shape[1]), int(header.shape[2])),
            int(header.shape[0]),
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
        for metric in sorted(metrics & set(STORED_STATISTICS)):
            if reference.stored_statistics(metric) is None:
                mean_key, cov_key, _ = STORED_STATISTICS[metric]
                writer = "`diffit-pipe reference" + (" --dinov2-weights`" if metric == "fd_dinov2" else "`")
                raise ReferenceInputError(
                    f"{reference.path}: no {mean_key}/{cov_key} statistics for {metric}; give a reference batch "
                    f"that has them ({writer} writes them), or drop it from --metrics"
                )
    if reference.num_images is not None and reference.num_images == 0:
        raise ReferenceInputError(f"{reference.path}: the reference holds no images")


# Inception's widest feature layer is 2048-d (sFID's 2023), DINOv2 ViT-L/14's 1024 (ViT-g's 1536): statistics of a
# wider one are not of this evaluator, and a declared covariance is checked against this before it is read
# (4096^2 float64 = 128 MiB at most).
MAX_STATISTICS_DIM = 4096


def _read_statistics(path: Path, mean_key: str = "mu", cov_key: str = "sigma") -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of a statistics `.npz`: shapes ([d], [d, d], d <= MAX_STATISTICS_DIM) and
    float dtypes checked from the headers before reading, every value finite. Any problem is one
    `ReferenceInputError` naming the file and the key."""
    mean_header, cov_header = read_member_header(path, mean_key), read_member_header(path, cov_key)
    for header in (mean_header, cov_header):
        if header.dtype.kind != "f":
            raise ReferenceInputError(f"{path}: {header.name} must be floating point, got {header.dtype}")
    dim = mean_header.shape[0] if len(mean_header.shape) == 1 else None
    if dim is None or not 1 <= dim <= MAX_STATISTICS_DIM or cov_header.shape != (dim, dim):
        raise ReferenceInputError(
            f"{path}: {mean_key} {mean_header.shape} / {cov_key} {cov_header.shape} are not a mean [d] and a "
            f"covariance [d, d] with 1 <= d <= {MAX_STATISTICS_DIM}"
        )
    try:  # read, not mapped: small, and the zip's CRC then finds a damaged file
        mean = np.asarray(load_member(path, mean_key, mean_header, memory_map=False), dtype=np.float64)
        cov = np.asarray(load_member(path, cov_key, cov_header, memory_map=False), dtype=np.float64)
    except ReferenceInputError as error:
        raise ReferenceInputError(f"{path}: cannot read {mean_key} / {cov_key} ({error})") from error
    for key, values in ((mean_key, mean), (cov_key, cov)):
        if not np.isfinite(values).all():
            bad = int(np.size(values) - np.isfinite(values).sum())
            raise ReferenceInputError(f"{path}: {key} holds {bad} non-finite values (NaN or inf): not statistics")
    return mean, cov


def load_reference_statistics(reference: Reference, feature_dim: int, metric: str = "fid") -> dict[str, np.ndarray]:
    """The stored mean / covariance of `metric` ("fid": mu/sigma, "sfid": mu_s/sigma_s, "fd_dinov2":
    mu_dinov2/sigma_dinov2), checked against the feature dimension they will be compared with."""
    mean_key, cov_key, _ = STORED_STATISTICS[metric]
    mu, sigma = _read_statistics(reference.path, mean_key, cov_key)
    if mu.shape != (feature_dim,) or sigma.shape != (feature_dim, feature_dim):
        raise ReferenceInputError(
            f"{reference.path}: {mean_key} {mu.shape} / {cov_key} {sigma.shape} do not match the "
            f"{metric.upper()} feature dimension {feature_dim}"
        )
    return {"mu": mu, "sigma": sigma}
