"""What `evaluate` is asked to do: its options (what the CLI parses), the sampling settings after defaults that are
recorded in the store and in metrics.json, and the error for bad input found before sampling."""

from __future__ import annotations

import logging
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
    cfg_scale: float | None = None
    cfg_schedule: str | None = None
    cfg_power: float = 4.0
    cfg_channels: str = "3"  # "3" (DiffiT: first three latent channels) or "all"
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

    def guidance(self):
        from diffit.guidance import GuidanceConfig

        return GuidanceConfig(
            scale=self.guidance_scale,
            schedule=self.guidance_schedule,
            power=self.guidance_power,
            channels=self.guidance_channels,
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
