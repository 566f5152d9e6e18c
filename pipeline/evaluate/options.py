"""What `evaluate` is asked to do: its options (what the CLI parses), the sampling settings after defaults that are
recorded in the store and in metrics.json, and the error for bad input found before sampling."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import InputError

if TYPE_CHECKING:
    from diffit.sampling import SamplingConfig

logger = logging.getLogger(__name__)


class EvaluateInputError(InputError):
    """Bad input found before sampling (model, VAE, options); the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------------------------
# Options


@dataclass
class SamplingOptions:
    """How to sample; None fields take the paper's default for the model kind (see `resolve_sampling`)."""

    sampler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_schedule: str | None = None
    guidance_power: float = 4.0
    guidance_channels: str = "3"  # "3" (DiffiT: first three latent channels) or "all"
    # Guided only where the model's time variable lies in (low, high): sigma for ADM / EDM models, t for flow
    # models (`diffit.guidance.GuidanceConfig.interval`); None: at every step.
    guidance_interval: tuple[float, float] | None = None
    classes: list[int] | None = None  # None: uniform over all classes; a list: cycled through
    seed: int = 0
    eta: float = 0.0  # DDIM only
    pixels: str | None = None  # "round" | "truncate" (see diffit.sampling.to_uint8); None: the model's default


@dataclass
class EvaluateOptions:
    """Everything `evaluate` needs (what the CLI parses)."""

    model_dir: Path
    out_dir: Path
    num_samples: int = 50_000
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    batch_size: int = 32
    reference: str | Path | None = None  # a path or an object-store URL (copied to a local cache first)
    inception_weights: Path | None = None
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
MAX_STEPS = 100_000
MAX_CLASS_LIST = 1_000_000
MAX_SEED = 2**63 - 1  # per-sample seeds hash (seed, index) into 64 bits (`sample_seeds`)
FEATURE_LAYERS = ("64", "192", "768", "2048")  # torch-fidelity's Inception-v3 layers (--feature-layer)
PRECISIONS = ("fp32", "bf16", "auto")  # the network's arithmetic (`model_loading.prepare_network`)


def check_options(options: EvaluateOptions) -> None:
    """Every option that does not depend on the model, checked for type and range where it enters (the CLI, a
    study file) and again by `evaluate` itself: EvaluateInputError naming the option and the value."""
    from diffit.guidance import SCHEDULES
    from diffit.sampling import PIXEL_QUANTIZATIONS, SAMPLERS
    from pipeline.evaluate.adm import DISTANCE_PRECISIONS
    from pipeline.evaluate.metrics import METRIC_NAMES

    sampling = options.sampling
    _integer("num_samples", options.num_samples, 1, MAX_NUM_SAMPLES)
    _integer("batch_size", options.batch_size, 1, MAX_BATCH_SIZE)
    _choice("sampler", sampling.sampler, SAMPLERS, optional=True)
    if sampling.steps is not None:
        _integer("steps", sampling.steps, 1, MAX_STEPS)
    if sampling.guidance_scale is not None:
        _real("guidance_scale", sampling.guidance_scale)
    _choice("guidance_schedule", sampling.guidance_schedule, SCHEDULES, optional=True)
    _real("guidance_power", sampling.guidance_power)
    _choice("guidance_channels", sampling.guidance_channels, ("3", "all"))
    interval = sampling.guidance_interval
    if interval is not None:
        pair = isinstance(interval, (list, tuple)) and len(interval) == 2
        _need(pair, "guidance_interval", interval, "expected LOW,HIGH")
        for bound in interval:
            _real("guidance_interval", bound, low=0.0)
        _need(interval[0] <= interval[1], "guidance_interval", interval, "expected LOW <= HIGH")
    if sampling.classes is not None:
        classes = sampling.classes
        _need(isinstance(classes, (list, tuple)) and 0 < len(classes) <= MAX_CLASS_LIST, "classes", classes)
        for label in classes:
            _integer("classes", label, 0, MAX_CLASS_LIST)
    _integer("seed", sampling.seed, 0, MAX_SEED)
    _real("eta", sampling.eta, low=0.0)
    _choice("pixels", sampling.pixels, PIXEL_QUANTIZATIONS, optional=True)
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
    for name in ("inception_weights", "cache_dir", "vae", "guide_model"):
        value = getattr(options, name)
        _need(value is None or isinstance(value, (str, Path)), name, value)


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


@dataclass
class ResolvedSampling:
    """Sampling settings after defaults: what is recorded in the store and in metrics.json."""

    kind: str
    sampler: str
    steps: int
    guidance_scale: float
    guidance_schedule: str
    guidance_power: float
    guidance_channels: int | None
    classes: list[int] | None
    seed: int
    eta: float
    pixels: str = "round"  # how samples become uint8 images (diffit.sampling.to_uint8)
    defaults_used: list[str] = field(default_factory=list)
    guidance_interval: list[float] | None = None  # [low, high] of sigma (ADM / EDM) or t (flow); None: everywhere

    def guidance(self):
        from diffit.guidance import GuidanceConfig

        return GuidanceConfig(
            scale=self.guidance_scale,
            schedule=self.guidance_schedule,
            power=self.guidance_power,
            channels=self.guidance_channels,
            interval=tuple(self.guidance_interval) if self.guidance_interval is not None else None,
        )

    def sampling_config(self, diffusion: dict[str, Any]) -> SamplingConfig:
        """The `diffit.sampling.SamplingConfig` these settings sample with.

        `diffusion` is the "diffusion" entry of the model's config.json: the ADM training chain (diffusion_steps,
        noise_schedule) or EDM's sigma_data. Each sampler reads only its own fields (DDPM / DDIM: the chain and
        eta; EDM models: sigma_data), so all of them can be given.
        """
        from diffit.sampling import SamplingConfig

        return SamplingConfig(
            sampler=self.sampler,
            steps=self.steps,
            guidance=self.guidance(),
            kind=self.kind,
            eta=self.eta,
            diffusion_steps=int(diffusion.get("diffusion_steps", 1000)),
            noise_schedule=diffusion.get("noise_schedule", "linear"),
            sigma_data=float(diffusion.get("sigma_data", 0.5)),
            pixels=self.pixels,
        )

    def describe(self) -> dict[str, Any]:
        record = asdict(self)
        record.pop("defaults_used")
        return record
