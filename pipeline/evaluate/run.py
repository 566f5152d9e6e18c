"""The evaluate stage: sample an exported model into a zarr store (many processes, resumable), then score it.

    run_evaluate(EvaluateOptions(model_dir=..., out_dir=..., num_samples=50_000, reference=..., ...))

1. Pre-flight, on every process and before any sampling: the model directory and its diffusion type, the VAE
   of latent models (local path, or a hub id already in the local cache; a model/VAE channel mismatch is an
   error), the Inception weights file, the reference (kind, resolution, whether it serves the requested
   metrics), and the settings of an existing sample store. Every process runs the same checks, so a bad input
   stops all of them with the same message instead of leaving some waiting at a barrier.
2. Sampling: the store's chunks that are not done are dealt round-robin to the processes; each process
   generates whole chunks (`diffit.sampling.sample` with one seed per sample, VAE decode for latent models,
   uint8 HWC) and writes them. Sample i depends only on (`seed`, i) and the settings (see
   `pipeline.evaluate.sample_store`), so the store is the same for any number of processes or batch size, and a killed
   run resumes where it stopped.
3. Rank 0 only: optional ADM `.npz` export, then FID / sFID / IS / precision-recall (KID) by the ADM
   evaluator's protocol with torch-fidelity's Inception (`pipeline.evaluate.metrics`), and `metrics.json`
   (atomic), which records which reference data fed each metric.

Sampling defaults (`sampling_defaults`): a model whose config.json records a sampling set-up gets it
(`import-nvlabs` records the released DiffiT code's: DDPM-250, guidance 4.4 power-cosine on the first three
latent channels at 256 px, the setting behind its FID 1.73; 1.49 constant at 512 px). Otherwise the paper's
text per model kind: latent ADM models DDPM with 250 steps, ImageNet-256 guidance 4.6 with MDT's power-cosine
schedule on the first three latent channels, ImageNet-512 1.49 (constant); image-space EDM models EDM's Heun
sampler with 18 steps at 32 px and 40 at 64 px, unguided. Either published 256-px setting is `--guidance-scale` away.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffit.sampling_config import SamplingConfig
from pipeline import __version__
from pipeline.core.atomic import write_json_atomic
from pipeline.core.errors import JobFailedError, reporting_disk_full
from pipeline.core.grids import image_grid, write_png
from pipeline.evaluate.datasets import SampleStoreDataset
from pipeline.evaluate.dinov2 import FD_DINOV2, DINOv2Config, resolve_dinov2_weights
from pipeline.evaluate.fd_dinov2 import compute_fd_dinov2
from pipeline.evaluate.generation import GenerationStats, generate, sample_into_store
from pipeline.evaluate.inception import (
    FEATURE_EXTRACTOR,
    PLUMBING_ONLY_LABEL,
    FeatureConfig,
    check_feature_layers,
    resolve_inception_weights,
)
from pipeline.evaluate.metrics import INCEPTION_METRICS, METRIC_NAMES, compute_metrics
from pipeline.evaluate.model_loading import LoadedModel, load_model, network_settings, prepare_network
from pipeline.evaluate.npz_export import export_npz
from pipeline.evaluate.options import (
    EvaluateInputError,
    EvaluateOptions,
    check_options,
)
from pipeline.evaluate.reference.cache import reference_cache_dir
from pipeline.evaluate.reference.formats import check_reference, open_reference
from pipeline.evaluate.sample_seeds import sample_class_labels
from pipeline.evaluate.sample_store import STORE_NAME, SampleStore, StoreLayout
from pipeline.evaluate.sampling_settings import resolve_sampling, sampling_record, store_settings

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
NPZ_FILE = "samples.npz"
METRICS_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# The evaluate command


def _distributed_state(device: str | None):
    """accelerate's process state (rank, world size, device, barrier); CPU gloo when no GPU is present."""
    from accelerate import PartialState

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _parse_metrics(metrics: Sequence[str]) -> tuple[str, ...]:

    chosen = tuple(dict.fromkeys(m.strip().lower() for m in metrics if m.strip()))
    unknown = [m for m in chosen if m not in METRIC_NAMES]
    if unknown:
        raise EvaluateInputError(f"--metrics: unknown {unknown}; choose from {', '.join(METRIC_NAMES)}")
    return chosen


@dataclass
class Preflight:
    """What the checks before sampling found and loaded."""

    loaded: LoadedModel
    sampling: SamplingConfig
    defaults_used: list[str]  # the model's defaults taken for settings not given ("name=value" lines)
    record: dict[str, Any]  # what was sampled (`sampling_record`): metrics.json and the store settings
    settings: dict[str, Any]
    layout: StoreLayout
    metrics: tuple[str, ...]
    reference: Any = None
    feature_config: Any = None  # the Inception metrics' `FeatureConfig` (None when only fd_dinov2 is asked for)
    dinov2_config: Any = None  # fd_dinov2's `DINOv2Config`

    @property
    def inception_metrics(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if m in INCEPTION_METRICS)


def _feature_config(options: EvaluateOptions, device: torch.device | str):
    """The metrics' `FeatureConfig` (Inception weights checked here, before any sampling)."""
    return FeatureConfig(
        weights=resolve_inception_weights(options.inception_weights),
        layer_fid=options.feature_layer,
        layer_kid=options.feature_layer,
        layer_prc=options.feature_layer,
        batch_size=options.feature_batch_size,
        cuda=torch.device(device).type == "cuda",
        kid_subset_size=options.kid_subset_size,
        prc_memory_bytes=int(options.prc_memory_gb * 1024**3),
        prc_precision=options.prc_precision,
        prc_reference_limit=options.prc_reference_limit,
        prc_seed=options.prc_seed,
        num_workers=options.feature_workers,
    )


def _check_sample_count(options: EvaluateOptions, chosen: Sequence[str], feature_config) -> None:
    """Refuse sample counts the requested metrics cannot work with, before sampling them."""
    if "is" in chosen and not feature_config.isc_split_size and options.num_samples < feature_config.isc_splits:
        raise EvaluateInputError(
            f"the Inception Score splits the samples into {feature_config.isc_splits} "
            f"parts: --num-samples {options.num_samples} is too few"
        )
    if "kid" in chosen and options.kid_subset_size > options.num_samples:
        raise EvaluateInputError(
            f"--kid-subset-size {options.kid_subset_size} exceeds --num-samples {options.num_samples}"
        )
    if "prc" in chosen and options.num_samples <= feature_config.prc_neighborhood:
        raise EvaluateInputError(
            f"precision/recall with k = {feature_config.prc_neighborhood}: --num-samples {options.num_samples} "
            "is too few"
        )
    if set(chosen) & {"fid", "sfid", FD_DINOV2} and options.num_samples < 2:
        raise EvaluateInputError("FID / sFID / FD_DINOv2 need a covariance: --num-samples must be >= 2")


def load_guide(loaded, guide_dir: Path, options: EvaluateOptions, device):
    """The autoguidance model (`--guide-model`): an export of the main model's kind, sample shape and classes."""
    guide = load_model(guide_dir, options.vae, device)
    main = (loaded.kind, loaded.sample_shape, loaded.num_classes)
    other = (guide.kind, guide.sample_shape, guide.num_classes)
    if other != main:
        raise EvaluateInputError(
            f"--guide-model {guide_dir}: a {other[0]} model of samples {other[1]} with {other[2]} classes; the "
            f"main model {loaded.model_dir} is a {main[0]} model of samples {main[1]} with {main[2]} classes"
        )
    prepare_network(guide, options.precision, False, device)
    return guide


def preflight(options: EvaluateOptions, device: torch.device | str) -> Preflight:
    """Every check that can fail before sampling (see the module docstring); identical on every rank."""
    check_options(options)
    chosen = _parse_metrics(options.metrics)
    feature_config = reference = dinov2_config = None
    if chosen:
        if options.reference is None and set(chosen) & {"fid", "sfid", "kid", "prc", FD_DINOV2}:
            raise EvaluateInputError(
                "--reference is required for fid, sfid, kid, prc and fd_dinov2 (or use --metrics is)"
            )
        inception = [m for m in chosen if m in INCEPTION_METRICS]
        if inception:
            feature_config = _feature_config(options, device)
            check_feature_layers(feature_config, inception)
        if FD_DINOV2 in chosen:
            dinov2_config = DINOv2Config(
                weights=resolve_dinov2_weights(options.dinov2_weights),
                batch_size=options.feature_batch_size,
                cuda=torch.device(device).type == "cuda",
                num_workers=options.feature_workers,
            )
        _check_sample_count(options, chosen, feature_config)
    loaded = load_model(options.model_dir, options.vae, device)
    prepare_network(loaded, options.precision, options.compile, device)
    if options.guide_model is not None:
        loaded.guide = load_guide(loaded, options.guide_model, options, device)
    sampling, defaults_used = resolve_sampling(loaded, options.sampling, options.classes)
    record = sampling_record(sampling, options.classes, options.seed)
    if chosen and options.reference is not None:
        reference = open_reference(options.reference)
        check_reference(reference, loaded.resolution, chosen)
        usable = min(reference.num_images or 0, options.prc_reference_limit)
        if "kid" in chosen and reference.num_images is not None and options.kid_subset_size > usable:
            raise EvaluateInputError(
                f"--kid-subset-size {options.kid_subset_size} exceeds the {usable} reference images KID uses"
            )
    settings = store_settings(loaded, record, options.num_samples)
    layout = StoreLayout(options.num_samples, loaded.resolution[0], loaded.resolution[1], options.batch_size)
    store_path = Path(options.out_dir) / STORE_NAME
    if store_path.exists():
        SampleStore.open(store_path, settings, mode="r")  # refuses other settings before any work
    return Preflight(
        loaded, sampling, defaults_used, record, settings, layout, chosen, reference, feature_config, dinov2_config
    )


def run_evaluate(options: EvaluateOptions) -> dict[str, Any] | None:
    """Run the evaluate stage in this process (one rank of a launch); returns the metrics record on rank 0.
    Out of disk space is one error line (exit 1): the chunks already written are kept and a rerun resumes."""
    resume = "the sample chunks already written are kept and sampling resumes where it stopped"
    with reporting_disk_full(options.out_dir, resume):
        return _evaluate(options)


def _evaluate(options: EvaluateOptions) -> dict[str, Any] | None:
    state = _distributed_state(options.device)
    rank, world_size, device = state.process_index, state.num_processes, state.device
    began = time.perf_counter()
    checks = preflight(options, device)
    out_dir = Path(options.out_dir)
    store_path = out_dir / STORE_NAME
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        # A done flag is not proof: chunks deleted or damaged since are found here and sampled again below.
        SampleStore.open_or_create(store_path, checks.layout, checks.settings).verify_done_chunks()
    state.wait_for_everyone()
    store = SampleStore.open(store_path, checks.settings)
    missing = store.missing_chunks()
    # Every rank must read the same done mask before anyone writes, or the round-robin deal would differ.
    state.wait_for_everyone()
    if rank == 0:
        used = ", ".join(checks.defaults_used) or "none"
        logger.info(
            "sampling %d/%d missing chunks with %d process(es); paper defaults used: %s",
            len(missing),
            store.layout.num_chunks,
            world_size,
            used,
        )
    stats = sample_into_store(
        store,
        checks.loaded,
        checks.sampling,
        options.seed,
        options.classes,
        rank,
        world_size,
        options.batch_size,
        device,
        missing,
    )
    sampled_at = time.perf_counter()
    state.wait_for_everyone()
    if rank != 0:
        return None
    if not store.is_complete():
        raise JobFailedError(f"{store_path}: {len(store.missing_chunks())} chunks still missing after sampling")
    timings = {"preflight_and_sampling": sampled_at - began, "rank0_sampling": stats.total_time_s}
    npz_path = None
    if options.export_npz:
        exported = time.perf_counter()
        npz_path = export_npz(store, out_dir / NPZ_FILE)
        timings["export_npz"] = time.perf_counter() - exported
    record = build_record(options, checks, store, stats, world_size, len(missing), npz_path)
    if checks.metrics:
        cache_dir = reference_cache_dir(checks.reference, options.cache_dir) if checks.reference else None
        result = _empty_result()
        if checks.inception_metrics:
            result = compute_metrics(
                SampleStoreDataset(store_path),
                checks.reference,
                checks.inception_metrics,
                checks.feature_config,
                cache_dir,
            )
        dinov2 = None
        if checks.dinov2_config is not None:
            samples = SampleStoreDataset(store_path)
            dinov2 = compute_fd_dinov2(samples, checks.reference, checks.dinov2_config, cache_dir)
            timings.update({f"metrics_{k}": v for k, v in dinov2["timings_s"].items()})
        fill_metrics(record, result, checks, dinov2)
        timings.update({f"metrics_{k}": v for k, v in result["timings_s"].items()})
    timings["total"] = time.perf_counter() - began
    record["timings_s"] = timings
    write_json_atomic(out_dir / METRICS_FILE, record)
    print(format_summary(record), flush=True)
    return record


def build_record(
    options: EvaluateOptions,
    checks: Preflight,
    store: SampleStore,
    stats: GenerationStats,
    world_size: int,
    chunks_sampled: int,
    npz_path: Path | None,
) -> dict[str, Any]:
    """metrics.json without the metric values: what was sampled, how, by whom."""
    return {
        "format_version": METRICS_FORMAT_VERSION,
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": sys.argv,
        "num_samples": store.layout.num_samples,
        "resolution": list(checks.loaded.resolution),
        "model": checks.loaded.identity,
        "guide_model": checks.loaded.guide.identity if checks.loaded.guide is not None else None,
        "sampling": {**checks.record, "paper_defaults_used": checks.defaults_used},
        "network": {**network_settings(checks.loaded), "requested_precision": options.precision},
        "sample_store": {
            "path": str(store.path),
            "chunk_size": store.layout.chunk_size,
            "chunks_sampled_this_run": chunks_sampled,
            "num_chunks": store.layout.num_chunks,
        },
        "npz": str(npz_path) if npz_path else None,
        "num_processes": world_size,
        "rank0_generation": asdict(stats),
    }


STANDARD_LAYERS = {"fid": "2048", "sfid": "mixed_6_conv", "kid": "2048", "prc": "2048", "is": "logits_unbiased"}


def _empty_result() -> dict[str, Any]:
    """`compute_metrics`' result when no Inception metric is asked for."""
    return {
        "values": {},
        "sources": {},
        "reference_cache": {},
        "reference_statistics_cache": None,
        "timings_s": {},
        "feature_layers": {},
    }


def fill_metrics(
    record: dict[str, Any], result: dict[str, Any], checks: Preflight, dinov2: dict[str, Any] | None = None
) -> None:
    """Put the metric values into `record`: under "metrics" only when they are comparable to published numbers
    (official Inception weights and the standard feature layers; for fd_dinov2, weights recognised as the
    published DINOv2 ViT-L/14, `pipeline.evaluate.dinov2`), else under "plumbing_only_metrics" with "metrics" left
    empty, so a script reading record["metrics"]["fid"] never gets a number that is not FID."""
    names = {
        "frechet_inception_distance": "fid",
        "spatial_frechet_inception_distance": "sfid",
        "inception_score_mean": "is_mean",
        "inception_score_std": "is_std",
        "precision": "precision",
        "recall": "recall",
        "f_score": "f_score",
        "kernel_inception_distance_mean": "kid_mean",
        "kernel_inception_distance_std": "kid_std",
    }
    values = {names.get(key, key): value for key, value in result["values"].items()}
    config = checks.feature_config
    reference = checks.reference
    sources = dict(result.get("sources", {}))
    reasons, labels = [], []
    if config is not None:  # Inception metrics were computed
        odd_layers = {
            metric: layer for metric, layer in result["feature_layers"].items() if layer != STANDARD_LAYERS[metric]
        }
        if not config.weights.official:
            reasons.append(PLUMBING_ONLY_LABEL)
        if odd_layers:
            reasons.append(f"plumbing-only (non-standard Inception feature layers {odd_layers})")
        labels.append(config.weights.label)
    if dinov2 is not None:
        dinov2_weights = checks.dinov2_config.weights
        values[FD_DINOV2] = dinov2["value"]
        sources[FD_DINOV2] = dinov2["source"]
        (labels if dinov2_weights.recognised else reasons).append(dinov2_weights.label)
    reportable = not reasons
    label = "; ".join(reasons) if reasons else "; ".join(labels)
    if reference is not None and reference.kind == "stats":
        label += "; FID against precomputed statistics whose feature extractor is not recorded"
    elif any(source.get("from") == "stored statistics" for m, source in sources.items() if m != FD_DINOV2):
        label += (
            "; FID/sFID against the reference batch's stored statistics (the ADM evaluator computes them with "
            "TensorFlow's Inception graph, the samples' features come from torch-fidelity's port of it)"
        )
    if dinov2 is not None and dinov2["source"].get("from") == "stored statistics" and reference.kind != "stats":
        label += "; FD_DINOv2 against the reference's stored mu_dinov2/sigma_dinov2 (their extractor is not verified)"
    record["inception_weights"] = config.weights.describe() if config is not None else None
    record["official_inception_weights"] = config.weights.official if config is not None else None
    record["reportable"] = reportable
    record["label"] = label
    record["metrics"] = values if reportable else {}
    if not reportable:
        record["plumbing_only_metrics"] = values
    record["metrics_requested"] = list(checks.metrics)
    record["feature_extractor"] = None
    if config is not None:
        record["feature_extractor"] = {
            **config.extractor_identity(),
            "name": FEATURE_EXTRACTOR,
            "layers": result["feature_layers"],
            "kid_subset_size": config.kid_subset_size,
            "kid_subsets": config.kid_subsets,
            "isc_splits": config.isc_splits,
            "isc_split_size": config.isc_split_size,
            "prc_neighborhood": config.prc_neighborhood,
            "prc_reference_limit": config.prc_reference_limit,
            "prc_memory_bytes": config.prc_memory_bytes,
            "prc_distance_precision": config.prc_precision,
        }
    if dinov2 is not None:
        record["dinov2_weights"] = checks.dinov2_config.weights.describe()
        record["feature_extractor_dinov2"] = checks.dinov2_config.extractor_identity()
    record["metric_sources"] = sources
    if reference is not None:
        record["reference"] = {
            **reference.describe(),
            "feature_cache": result["reference_cache"],
            "statistics_cache": result.get("reference_statistics_cache"),
        }
        if dinov2 is not None:
            record["reference"]["dinov2_statistics_cache"] = dinov2["statistics_cache"]


def format_summary(record: dict[str, Any]) -> str:
    """Human-readable lines for the terminal: the label first, and every value marked when not reportable."""
    lines = [
        f"evaluated {record['num_samples']} samples ({record['sampling']['sampler']}, "
        f"{record['sampling']['steps']} steps, guidance {record['sampling']['guidance_scale']} "
        f"{record['sampling']['guidance_schedule']}) with {record['num_processes']} process(es)"
    ]
    if "label" in record:
        reportable = record["reportable"]
        values = record["metrics"] if reportable else record["plumbing_only_metrics"]
        lines.append(("" if reportable else "PLUMBING-ONLY, NOT REPORTABLE: ") + record["label"])
        for key, value in values.items():
            lines.append(f"  {key:<10} {value:.6g}" + ("" if reportable else "  (plumbing-only)"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Quick look: a grid of samples


def sample_grid(
    model_dir: Path,
    out_png: Path,
    classes: list[int] | None,
    per_class: int = 1,
    num: int = 16,
    sampling: dict[str, Any] | None = None,
    seed: int = 0,
    vae: Path | None = None,
    batch_size: int = 16,
    device: str | None = None,
    precision: str = "auto",
    compile: bool = False,
) -> Path:
    """Sample a few images (one row per class, or `num` unconditional ones) and save them as one PNG grid."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(model_dir, vae, device)
    prepare_network(loaded, precision, compile, device)
    config, _ = resolve_sampling(loaded, sampling or {}, classes)
    if per_class < 1 or num < 1:
        raise EvaluateInputError("--per-class and --num must be >= 1")
    if classes is not None:
        count, columns = len(classes) * per_class, per_class
        # Row r holds class r: sample index r * per_class + j has label classes[r].
        labels = np.repeat(np.asarray(classes, dtype=np.int64), per_class)
    else:
        count = num
        columns = int(np.ceil(np.sqrt(num)))
        labels = sample_class_labels(seed, np.arange(count), loaded.num_classes)
    images, _ = generate(loaded, config, seed, np.arange(count), labels, batch_size, device)
    write_png(out_png, image_grid(images, columns))
    rows = -(-count // columns)
    logger.info("wrote a %dx%d grid of %d samples to %s", rows, columns, count, out_png)
    return Path(out_png)


__all__ = ["EvaluateOptions", "Preflight", "run_evaluate", "preflight", "sample_grid"]
