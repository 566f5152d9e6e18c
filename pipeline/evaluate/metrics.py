"""Sample-quality metrics of `evaluate` by the ADM evaluator's protocol: FID, sFID, Inception Score, precision /
recall (and KID), with torch-fidelity's Inception-v3.

The protocol is guided-diffusion's `evaluations/evaluator.py`, the one behind the published ImageNet numbers: FID
and sFID against the statistics stored in a reference batch (`mu`, `sigma`, `mu_s`, `sigma_s`, computed over the
whole training set), precision / recall (k = 3) against its images `arr_0`, the Inception Score of the samples.
The math is in `pipeline.evaluate.adm`, the network and its weights in `pipeline.evaluate.inception`, reference
formats in `pipeline.evaluate.reference.formats` and their caches in `pipeline.evaluate.reference.cache`. This module
decides which reference data feeds which metric (`gather_reference_inputs`, recorded in metrics.json): stored
statistics where the reference has them; else the statistics of all its images (streamed and resumable, never all
features in memory, when there are more than `prc_reference_limit`); precision / recall and KID against at most
`prc_reference_limit` images, a seeded random subset when there are more (logged, never silent); and computes
them (`compute_metrics`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.core.errors import InputError, JobFailedError
from pipeline.evaluate.adm import (
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
    subsample_indices,
)
from pipeline.evaluate.inception import FeatureConfig, create_feature_extractor, extract_features
from pipeline.evaluate.npz_files import read_member_header
from pipeline.evaluate.reference.batch import streamed_reference_statistics
from pipeline.evaluate.reference.cache import reference_features
from pipeline.evaluate.reference.formats import (
    STATISTICS_METRICS,
    STORED_STATISTICS,
    Reference,
    load_reference_statistics,
)

logger = logging.getLogger(__name__)

INCEPTION_METRICS = ("fid", "sfid", "is", "prc", "kid")  # computed here, with torch-fidelity's Inception-v3
METRIC_NAMES = (*INCEPTION_METRICS, "fd_dinov2")  # fd_dinov2: DINOv2 features (`pipeline.evaluate.dinov2`)
FEATURE_METRICS = ("prc", "kid")  # compared feature by feature: need reference images


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
    stored_dim = read_member_header(reference.path, keys[0]).shape
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
    require_finite(sample_features, f"the features of the samples ({describe_dataset(samples)})", config)
    timings["sample_features"] = time.perf_counter() - started

    started = time.perf_counter()
    dims = {layer: int(values.shape[1]) for layer, values in sample_features.items()}
    reference_layers = {m: layers[m] for m in metrics if m != "is"}
    # Reference images only need the reference-side layers: an extractor that also computes IS logits would run
    # the whole network for nothing when those layers are shallower (reference_features builds its own then).
    inputs = gather_reference_inputs(reference, metrics, reference_layers, config, cache_dir, extractor, dims)
    require_finite(inputs.features, f"the features of the reference {reference.path if reference else ''}", config)
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
    unknown = set(metrics) - set(INCEPTION_METRICS)
    if unknown:
        raise InputError(
            f"unknown Inception metrics {sorted(unknown)}; choose from {INCEPTION_METRICS} (fd_dinov2 is "
            "`pipeline.evaluate.dinov2.compute_fd_dinov2`)"
        )
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
                precision=config.prc_precision,
                device=config.device,
                progress=config.progress,
            )
        )
    values = {key: float(value) for key, value in values.items()}
    bad = sorted(key for key, value in values.items() if not math.isfinite(value))
    if bad:
        raise JobFailedError(f"metrics {bad} are not finite ({ {key: values[key] for key in bad} }); nothing written")
    return values


def describe_dataset(dataset: Dataset) -> str:
    """Where a dataset's images come from, for error messages."""
    store = getattr(dataset, "store", None)
    if store is not None:
        return str(store.path)
    for name in ("path", "source", "name"):
        value = getattr(dataset, name, None)
        if value is not None:
            return str(value)
    return f"{type(dataset).__name__} of {len(dataset)} images"


def require_finite(features: dict[str, torch.Tensor], source: str, config: FeatureConfig) -> None:
    """Refuse features holding NaN or inf (e.g. from a damaged Inception weights file): never a metric of them."""
    for layer, values in features.items():
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            raise JobFailedError(
                f"{source}: {int((~finite).sum())} non-finite values in the {layer} features computed with the "
                f"Inception weights {config.weights.path}; the weights or the images are damaged"
            )
