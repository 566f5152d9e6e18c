"""What `evaluate` is asked to do: its options (what the CLI parses), their checks, and the error for bad input found
before sampling. Sampling settings travel by their one name each and become a
`diffit.sampling_config.SamplingConfig` once the model is known (`sampling_settings.resolve_sampling`)."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError

logger = logging.getLogger(__name__)


class EvaluateInputError(InputError):
    """Bad input found before sampling (model, VAE, options); the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------------------------
# Options


@dataclass
class EvaluateOptions:
    """Everything `evaluate` needs (what the CLI parses)."""

    model_dir: Path
    out_dir: Path
    num_samples: int = 50_000
    # Sampling settings by their one name each (`diffit.sampling_config.SETTINGS`: sampler, steps, guidance_scale,
    # guidance_schedule, guidance_power, guidance_channels, guidance_interval, eta, pixels); a setting not given
    # takes the model's default (its recorded set-up, else the paper's: `sampling_settings.resolve_sampling`).
    # guidance_interval: (low, high) of sigma for ADM / EDM models, of t for flow models.
    sampling: dict[str, Any] = field(default_factory=dict)
    classes: list[int] | None = None  # None: uniform over all classes; a list: cycled through
    seed: int = 0  # sample i's noise and label derive from (seed, i) only
    batch_size: int = 32
    reference: str | Path | None = None  # a path or an object-store URL (copied to a local cache first)
    inception_weights: Path | None = None
    # DINOv2 ViT-L/14 weights for fd_dinov2 (`dinov2_vitl14_pretrain.pth`; `pipeline.evaluate.dinov2`)
    dinov2_weights: Path | None = None
    metrics: tuple[str, ...] = ("fid", "sfid", "is", "prc")
    export_npz: bool = False
    vae: Path | None = None
    cache_dir: Path | None = None
    feature_layer: str = "2048"
    feature_batch_size: int = 64
    feature_workers: int = min(4, os.cpu_count() or 1)
    kid_subset_size: int = 1000
    prc_memory_gb: float = 2.0
    prc_precision: str = "fp16"  # precision/recall distances: "fp16" (the ADM evaluator's) or "fp32"
    prc_reference_limit: int = 10_000
    prc_seed: int = 0
    device: str | None = None
    precision: str = "auto"  # "fp32" | "bf16" | "auto" (bf16 on CUDA, fp32 elsewhere); see `prepare_network`
    compile: bool = False  # torch.compile the network
    # Autoguidance (Karras et al. 2024): an export of the same kind, latent shape and classes (a smaller model, an
    # early checkpoint) whose conditional output replaces the unconditional branch of the guidance.
    guide_model: Path | None = None


# Bounds of what a request may ask for (every count is bounded before anything is allocated for it).
MAX_NUM_SAMPLES = 10_000_000  # 200x the 50k of FID-50K
MAX_BATCH_SIZE = 65_536
MAX_CLASS_LIST = 1_000_000
MAX_SEED = 2**63 - 1  # per-sample seeds hash (seed, index) into 64 bits (`sample_seeds`)
FEATURE_LAYERS = ("64", "192", "768", "2048")  # torch-fidelity's Inception-v3 layers (--feature-layer)
PRECISIONS = ("fp32", "bf16", "auto")  # the network's arithmetic (`model_loading.prepare_network`)


def check_options(options: EvaluateOptions) -> None:
    """Every option that does not depend on the model, checked for type and range where it enters (the CLI, a
    study file) and again by `evaluate` itself: EvaluateInputError naming the option and the value."""
    from pipeline.evaluate.adm import DISTANCE_PRECISIONS
    from pipeline.evaluate.metrics import METRIC_NAMES

    _integer("num_samples", options.num_samples, 1, MAX_NUM_SAMPLES)
    _integer("batch_size", options.batch_size, 1, MAX_BATCH_SIZE)
    check_sampling_settings(options.sampling)
    if options.classes is not None:
        classes = options.classes
        _need(isinstance(classes, (list, tuple)) and 0 < len(classes) <= MAX_CLASS_LIST, "classes", classes)
        for label in classes:
            _integer("classes", label, 0, MAX_CLASS_LIST)
    _integer("seed", options.seed, 0, MAX_SEED)
    _need(isinstance(options.metrics, (list, tuple)), "metrics", options.metrics)
    for metric in options.metrics:
        _need(isinstance(metric, str), "metrics", options.metrics)
        if metric.strip() and metric.strip().lower() not in METRIC_NAMES:
            raise EvaluateInputError(f"metrics: unknown {metric!r}; choose from {', '.join(METRIC_NAMES)}")
    _choice("feature_layer", options.feature_layer, FEATURE_LAYERS)
    _integer("feature_batch_size", options.feature_batch_size, 1, MAX_BATCH_SIZE)
    _integer("feature_workers", options.feature_workers, 0, 256)
    _integer("kid_subset_size", options.kid_subset_size, 1, MAX_NUM_SAMPLES)
    _real("prc_memory_gb", options.prc_memory_gb, low=1e-6)
    _choice("prc_precision", options.prc_precision, DISTANCE_PRECISIONS)
    _integer("prc_reference_limit", options.prc_reference_limit, 1, MAX_NUM_SAMPLES)
    _integer("prc_seed", options.prc_seed, 0, MAX_SEED)
    _choice("precision", options.precision, PRECISIONS)
    _need(options.device is None or isinstance(options.device, str), "device", options.device)
    _need(options.reference is None or isinstance(options.reference, (str, Path)), "reference", options.reference)
    for name in ("inception_weights", "dinov2_weights", "cache_dir", "vae", "guide_model"):
        value = getattr(options, name)
        _need(value is None or isinstance(value, (str, Path)), name, value)


def check_sampling_settings(settings: Any) -> None:
    """Sampling settings by name (`diffit.sampling_config.SETTINGS`, any subset; None: the model's default), each
    checked for type and range (`diffit.sampling_config.check_settings`): EvaluateInputError naming the setting and the
    value. Where they enter (the CLI, a study file) and again by `evaluate`."""
    from diffit.sampling_config import check_settings

    try:
        check_settings(settings)
    except ValueError as error:
        raise EvaluateInputError(str(error)) from None


def brief(value: Any, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters (a message never quotes a whole hostile value)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _need(condition: bool, name: str, value: Any, expected: str = "") -> None:
    if not condition:
        raise EvaluateInputError(f"{name}: {expected or 'not accepted'}, got {brief(value)}")


def _integer(name: str, value: Any, low: int, high: int) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    _need(ok, name, value, f"expected an integer in [{low}, {high}]")


def _real(name: str, value: Any, low: float = -math.inf) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    _need(ok, name, value, "expected a finite number" + (f" >= {low:g}" if low > -math.inf else ""))


def _choice(name: str, value: Any, choices: tuple[str, ...], optional: bool = False) -> None:
    ok = (optional and value is None) or (isinstance(value, str) and value in choices)
    _need(ok, name, value, f"expected one of {', '.join(choices)}")
