"""FD_DINOv2 of the samples against the reference (`evaluate --metrics fd_dinov2`): the features and weights are
`pipeline.evaluate.dinov2`'s; this module adds the reference side and the distance (FID's, `adm.frechet_distance`).

Reference statistics: stored in the reference `.npz` as `mu_dinov2` / `sigma_dinov2` (checked from their headers,
bounded like FID's; `diffit-pipe reference --dinov2-weights` writes them), else computed from the reference images,
streamed and cached beside Inception's under a key of the reference's content and the extractor's identity (weights
SHA-256, preprocessing, pos-embed rule).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.errors import JobFailedError
from pipeline.evaluate.adm import feature_statistics, frechet_distance
from pipeline.evaluate.dinov2 import DINOV2_LAYER, FD_DINOV2, DINOv2Config, create_dinov2_extractor
from pipeline.evaluate.features import extract_all
from pipeline.evaluate.reference.batch import streamed_reference_statistics
from pipeline.evaluate.reference.formats import STORED_STATISTICS, load_reference_statistics


def _require_finite(features: torch.Tensor, source: str, config: DINOv2Config) -> None:
    finite = torch.isfinite(features)
    if not bool(finite.all()):
        raise JobFailedError(
            f"{source}: {int((~finite).sum())} non-finite DINOv2 features computed with {config.weights.path}; the "
            "weights or the images are damaged"
        )


def reference_dinov2_statistics(reference, config: DINOv2Config, cache_dir: Path, extractor=None):
    """(mu, sigma) of the reference, where they came from, and the cache report: the stored `mu_dinov2` /
    `sigma_dinov2` when the reference has them, else its images' statistics (streamed, cached)."""
    dim = int(config.weights.architecture["embed_dim"])
    if reference.stored_statistics(FD_DINOV2) is not None:
        stored = load_reference_statistics(reference, dim, FD_DINOV2)
        mean_key, cov_key, _ = STORED_STATISTICS[FD_DINOV2]
        source = {"from": "stored statistics", "file": str(reference.path), "keys": [mean_key, cov_key]}
        return (stored["mu"], stored["sigma"]), source, None
    if extractor is None:
        extractor = create_dinov2_extractor(config)
    stats, cache = streamed_reference_statistics(reference, [DINOV2_LAYER], config, cache_dir, extractor)
    source = {"from": "statistics of all reference images", "images": reference.num_images}
    return stats[DINOV2_LAYER], source, cache


def sample_dinov2_features(samples: Dataset, extractor, config: DINOv2Config) -> torch.Tensor:
    """DINOv2 CLS features [n, D] of `samples` (uint8 CHW images), refused when any is not finite."""
    workers = config.num_workers if getattr(samples, "supports_workers", True) else 0
    features = extract_all(samples, extractor, config.batch_size, workers, "DINOv2 sample features", config.progress)
    _require_finite(features[DINOV2_LAYER], "the samples", config)
    return features[DINOV2_LAYER]


def compute_fd_dinov2(samples: Dataset, reference, config: DINOv2Config, cache_dir: Path) -> dict[str, Any]:
    """FD_DINOv2 of `samples` against `reference`: {"value", "source", "statistics_cache", "timings_s"}."""
    timings = {}
    started = time.perf_counter()
    extractor = create_dinov2_extractor(config)
    timings["load_dinov2"] = time.perf_counter() - started
    started = time.perf_counter()
    mu, sigma = feature_statistics(sample_dinov2_features(samples, extractor, config), config.device)
    timings["dinov2_sample_features"] = time.perf_counter() - started
    started = time.perf_counter()
    (ref_mu, ref_sigma), source, cache = reference_dinov2_statistics(reference, config, cache_dir, extractor)
    timings["dinov2_reference_statistics"] = time.perf_counter() - started
    value = frechet_distance(mu, sigma, ref_mu, ref_sigma)
    if not np.isfinite(value):
        raise JobFailedError(f"FD_DINOv2 is not finite ({value}); nothing written")
    return {"value": float(value), "source": source, "statistics_cache": cache, "timings_s": timings}


__all__ = ["compute_fd_dinov2", "reference_dinov2_statistics", "sample_dinov2_features"]
