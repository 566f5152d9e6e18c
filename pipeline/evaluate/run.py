"""The evaluate stage: sample an exported model into a zarr store (many processes, resumable), then score it.

    evaluate(EvaluateOptions(model_dir=..., out_dir=..., num_samples=50_000, reference=..., ...))

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
sampler with 18 steps at 32 px and 40 at 64 px, unguided. Either published 256-px setting is `--cfg-scale` away.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline import __version__
from pipeline.core.atomic import write_json_atomic
from pipeline.core.errors import InputError, JobFailedError
from pipeline.core.grids import image_grid, write_png
from pipeline.core.shards import sha256_file
from pipeline.evaluate.sample_store import (
    STORE_NAME,
    SampleStore,
    SampleStoreMismatchError,
    StoreLayout,
    assign_chunks,
    export_npz,
    sample_class_labels,
    sample_noise_seeds,
)

if TYPE_CHECKING:
    from diffit.sampling import SamplingConfig

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
NPZ_FILE = "samples.npz"
METRICS_FORMAT_VERSION = 1


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
        )

    def describe(self) -> dict[str, Any]:
        record = asdict(self)
        record.pop("defaults_used")
        return record


# ----------------------------------------------------------------------------------------------------------------
# Model and VAE


@dataclass
class LoadedModel:
    """An exported model ready to sample: network, optional VAE, and what they produce."""

    model_dir: Path
    model: torch.nn.Module
    config: dict[str, Any]
    kind: str  # "adm" | "edm"
    family: str  # "latent" | "image"
    sample_shape: tuple[int, int, int]  # what the sampler produces per sample (C, H, W)
    resolution: tuple[int, int]  # decoded image size (H, W)
    vae: Any = None
    scaling_factor: float | None = None
    identity: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # of the network forward: "fp32" | "bf16" (set by `prepare_network`)
    compiled: bool = False
    network: torch.nn.Module | None = None  # what the sampler calls; None: `model` itself (fp32, eager)

    @property
    def sampling_network(self) -> torch.nn.Module:
        return self.model if self.network is None else self.network

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0))


def load_vae(
    vae_config: dict[str, Any], override: Path | None, model_dir: Path, device: str | torch.device = "cpu"
) -> tuple[Any, dict[str, Any]]:
    """The diffusers AutoencoderKL the model's latents decode with, resolved like `encode` resolves `--vae`.

    Source: `override` (--vae), else the config's local `path` when it still exists, else its `id` (a local path
    or a hub id: looked up in the local Hugging Face cache, never downloaded when HF_HUB_OFFLINE=1). The VAE's
    files are hashed (`path_hash`, as in the dataset manifest): when they differ from the ones the training
    latents were encoded with, that is an error unless the user chose another VAE with --vae (then it is logged
    and recorded).
    """
    from pipeline.core.vae import VAEError, resolve_vae
    from pipeline.core.vae import load_vae as load_vae_files

    config_path = model_dir / "config.json"
    if override is not None:
        spec_text, revision = str(override), None
    elif vae_config.get("path") and Path(vae_config["path"]).is_dir():
        spec_text, revision = str(vae_config["path"]), None
    elif vae_config.get("id") or vae_config.get("path"):
        spec_text = str(vae_config.get("id") or vae_config.get("path"))
        revision = vae_config.get("revision") if vae_config.get("source") == "hub" else None
    else:
        raise EvaluateInputError(f"{config_path}: 'vae' has neither 'path' nor 'id'; pass --vae PATH")
    try:
        spec = resolve_vae(spec_text, revision)
    except VAEError as error:
        origin = "--vae" if override is not None else f"the VAE named in {config_path}"
        raise EvaluateInputError(
            f"{origin}: {error}. Pass --vae PATH to a local diffusers AutoencoderKL folder."
        ) from error
    identity = {
        "id": spec.id,
        "source": spec.source,
        "revision": spec.revision,
        "local_path": spec.local_path,
        "path_hash": spec.path_hash,
    }
    trained_hash = vae_config.get("path_hash")
    if trained_hash and trained_hash != spec.path_hash:
        if override is None:
            raise EvaluateInputError(
                f"model/VAE mismatch: {spec.local_path} (path_hash {spec.path_hash[:12]}…) is not the VAE the "
                f"training latents were encoded with (path_hash {trained_hash[:12]}… in {config_path}); its files "
                "changed. Pass --vae PATH to decode with another VAE on purpose."
            )
        logger.warning(
            "--vae %s differs from the VAE the training latents were encoded with (%s…); decoding with it as requested",
            override,
            trained_hash[:12],
        )
        identity["differs_from_training_vae"] = True
    try:
        vae = load_vae_files(spec.local_path, "fp32", str(device))
    except Exception as error:  # noqa: BLE001 - diffusers raises many types; name the folder
        raise EvaluateInputError(f"{spec.local_path}: cannot load a diffusers AutoencoderKL ({error})") from error
    return vae, identity


def load_model(model_dir: Path, vae_override: Path | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an exported model (and its VAE for latent models), checking that the two fit together."""
    import diffit
    from diffit.models import model_family

    model_dir = Path(model_dir)
    try:
        model, config = diffit.load_pretrained(model_dir, device="cpu")
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        raise EvaluateInputError(f"{model_dir}: cannot load the exported model ({error})") from error
    diffusion = config.get("diffusion")
    if not isinstance(diffusion, dict) or diffusion.get("type") not in ("adm", "edm"):
        raise EvaluateInputError(
            f"{model_dir / 'config.json'}: needs 'diffusion': {{'type': 'adm' | 'edm', ...}}, got {diffusion!r}"
        )
    family = model_family(config["model"]["name"])
    channels, size = int(model.in_channels), int(model.input_size)
    identity = {
        "path": str(model_dir.resolve()),
        "name": config["model"]["name"],
        "weights_sha256": sha256_file(model_dir / "model.safetensors"),
        "config_sha256": sha256_file(model_dir / "config.json"),
    }
    loaded = LoadedModel(
        model_dir=model_dir,
        model=model.to(device).eval(),
        config=config,
        kind=diffusion["type"],
        family=family,
        sample_shape=(channels, size, size),
        resolution=(size, size),
        identity=identity,
    )
    if family == "latent":
        vae_config = config.get("vae")
        if vae_override is None and not isinstance(vae_config, dict):
            raise EvaluateInputError(
                f"{model_dir / 'config.json'}: a latent model needs a 'vae' entry "
                "({id or path, scaling_factor}); pass --vae PATH"
            )
        vae_config = vae_config if isinstance(vae_config, dict) else {}
        vae, vae_identity = load_vae(vae_config, vae_override, model_dir, device)
        latent_channels = int(vae.config.latent_channels)
        if latent_channels != channels:
            raise EvaluateInputError(
                f"model/VAE mismatch: {model_dir} generates {channels}-channel latents, the VAE "
                f"{vae_identity['local_path']} decodes {latent_channels}-channel latents"
            )
        scaling_factor = vae_config.get("scaling_factor")
        if scaling_factor is None:
            raise EvaluateInputError(
                f"{model_dir / 'config.json'}: 'vae' lacks 'scaling_factor' (the factor the "
                "model's latents were multiplied by in training)"
            )
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        loaded.vae = vae
        loaded.scaling_factor = float(scaling_factor)
        loaded.resolution = (size * factor, size * factor)
        loaded.identity["vae"] = {**vae_identity, "scaling_factor": float(scaling_factor)}
    elif channels != 3:
        raise EvaluateInputError(f"{model_dir}: image-space model with {channels} channels; expected RGB (3)")
    return loaded


# ----------------------------------------------------------------------------------------------------------------
# Network precision and compilation

PRECISIONS = ("fp32", "bf16", "auto")
# Attributes the samplers read from the network (guidance's null class, ADM's learned Sigma, shapes).
FORWARDED_ATTRIBUTES = ("num_classes", "null_class", "learn_sigma", "in_channels", "input_size")


class SamplingNetwork(torch.nn.Module):
    """The network as the sampler calls it: optionally compiled, its forward optionally under bf16 autocast.

    Autocast covers the network call only and its output is returned in float32, so everything the sampler does
    around it (CFG combination, EDM preconditioning, the DDPM / DDIM posterior, the Heun update) stays in fp32:
    bf16 there would round the chain's small per-step increments away. Autocasting the whole sampling call would
    leave those elementwise ops in fp32 too, but it would also run any matmul the samplers may gain under bf16;
    wrapping the network states the boundary once. The attributes the samplers read are copied from the model.
    """

    def __init__(self, model: torch.nn.Module, device_type: str, bf16: bool, compile: bool):
        super().__init__()
        self.model = model
        self.call = torch.compile(model) if compile else model
        self.device_type = device_type
        self.bf16 = bf16
        for name in FORWARDED_ATTRIBUTES:
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.bf16):
            output = self.call(*args, **kwargs)
        return output.float()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """--precision to "fp32" or "bf16": auto is bf16 on CUDA (tensor cores) and fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise EvaluateInputError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def prepare_network(loaded: LoadedModel, precision: str, compile: bool, device: torch.device | str) -> None:
    """Set the network the sampler calls; fp32 without --compile samples with the model itself (as before)."""
    loaded.precision = resolve_precision(precision, device)
    loaded.compiled = bool(compile)
    bf16 = loaded.precision == "bf16"
    if bf16 or compile:
        loaded.network = SamplingNetwork(loaded.model, torch.device(device).type, bf16, compile)
    else:
        loaded.network = None


def network_settings(loaded: LoadedModel) -> dict[str, Any]:
    """How the network forward ran: recorded in metrics.json, and in the store settings when not the default."""
    return {"precision": loaded.precision, "compile": loaded.compiled}


# ----------------------------------------------------------------------------------------------------------------
# Sampling settings


# ImageNet guidance of the paper's text (latent ADM models, class-conditional), by decoded height: (scale,
# schedule). The released NVlabs/DiffiT code scores its 256-px FID 1.73 with 4.4 instead (`slurm_sample_256.sh`);
# `import-nvlabs` records that in the imported model's config.json, where `sampling_defaults` finds it. 512 px:
# 1.49 constant in both.
PAPER_GUIDANCE = {256: (4.6, "power-cosine"), 512: (1.49, "constant")}


def sampling_defaults(loaded: LoadedModel) -> tuple[dict[str, Any], str]:
    """Default sampler, steps, guidance scale and schedule of a model, and where they come from.

    A model whose config.json records a sampling set-up (`import-nvlabs` writes the released code's) gets it;
    otherwise the paper's settings for its kind: latent ADM models DDPM-250 with `PAPER_GUIDANCE` at 256 / 512 px
    (unguided elsewhere), image-space EDM models Heun with 18 steps at 32 px and 40 above, unguided.
    """
    height = loaded.resolution[0]
    conditional = loaded.num_classes > 0
    if loaded.kind == "adm":
        scale, schedule = PAPER_GUIDANCE.get(height, (1.0, "constant")) if conditional else (1.0, "constant")
        paper = {"sampler": "ddpm", "steps": 250, "cfg_scale": scale, "cfg_schedule": schedule}
    else:
        paper = {
            "sampler": "edm-heun",
            "steps": 18 if height <= 32 else 40,
            "cfg_scale": 1.0,
            "cfg_schedule": "constant",
        }
    recorded = loaded.config.get("sampling") if isinstance(loaded.config, dict) else None
    if not isinstance(recorded, dict):
        return paper, "paper"
    keys = {"sampler": "sampler", "steps": "steps", "cfg_scale": "guidance_scale", "cfg_schedule": "guidance_schedule"}
    chosen = {name: recorded.get(key, paper[name]) for name, key in keys.items()}
    return chosen, str(recorded.get("origin", "the model's config.json"))


def resolve_sampling(loaded: LoadedModel, options: SamplingOptions) -> ResolvedSampling:
    """Fill unset sampling options with the model's defaults (`sampling_defaults`), and check the rest."""
    from diffit.guidance import SCHEDULES
    from diffit.sampling import SAMPLERS

    defaults: list[str] = []
    conditional = loaded.num_classes > 0
    default, origin = sampling_defaults(loaded)
    suffix = "" if origin == "paper" else f" ({origin})"

    def pick(name: str, given):
        if given is None:
            defaults.append(f"{name}={default[name]}{suffix}")
            return default[name]
        return given

    sampler = pick("sampler", options.sampler)
    steps = int(pick("steps", options.steps))
    scale = float(pick("cfg_scale", options.cfg_scale))
    schedule = pick("cfg_schedule", options.cfg_schedule)
    if sampler not in SAMPLERS:
        raise EvaluateInputError(f"--sampler {sampler}: expected one of {SAMPLERS}")
    if loaded.kind == "edm" and sampler != "edm-heun":
        raise EvaluateInputError(f"{loaded.model_dir}: an EDM model samples with edm-heun, not {sampler}")
    if schedule not in SCHEDULES:
        raise EvaluateInputError(f"--cfg-schedule {schedule}: expected one of {SCHEDULES}")
    if steps < 1:
        raise EvaluateInputError(f"--steps must be >= 1, got {steps}")
    if scale != 1.0 and not conditional:
        raise EvaluateInputError(f"--cfg-scale {scale}: {loaded.model_dir} is unconditional (no guidance)")
    if options.cfg_channels not in ("3", "all"):
        raise EvaluateInputError(f"--cfg-channels {options.cfg_channels}: expected 3 or all")
    classes = options.classes
    if classes is not None:
        if not conditional:
            raise EvaluateInputError(f"--classes: {loaded.model_dir} is unconditional")
        bad = [c for c in classes if not 0 <= c < loaded.num_classes]
        if bad or not classes:
            raise EvaluateInputError(f"--classes {classes}: labels must lie in [0, {loaded.num_classes})")
    if options.seed < 0:
        raise EvaluateInputError(f"--seed must be >= 0, got {options.seed}")
    return ResolvedSampling(
        kind=loaded.kind,
        sampler=sampler,
        steps=int(steps),
        guidance_scale=scale,
        guidance_schedule=schedule,
        guidance_power=float(options.cfg_power),
        guidance_channels=3 if options.cfg_channels == "3" else None,
        classes=list(classes) if classes is not None else None,
        seed=int(options.seed),
        eta=float(options.eta),
        defaults_used=defaults,
    )


def store_settings(loaded: LoadedModel, sampling: ResolvedSampling, num_samples: int) -> dict[str, Any]:
    """What the samples depend on: stored in the zarr attributes and compared on resume."""
    # Content hashes, not paths: a moved model directory or VAE folder still resumes its store.
    model = {key: value for key, value in loaded.identity.items() if key not in ("path", "vae")}
    if "vae" in loaded.identity:
        vae = loaded.identity["vae"]
        model["vae"] = {"scaling_factor": vae["scaling_factor"], "path_hash": vae["path_hash"]}
    settings = {
        "model": model,
        "sampling": sampling.describe(),
        "num_samples": int(num_samples),
        "resolution": list(loaded.resolution),
        "num_classes": loaded.num_classes,
        "package_version": __version__,
    }
    # bf16 or compiled forwards give (slightly) other samples, so they are part of what a store holds; the
    # default (fp32, eager) is left out so that stores made before these options existed still resume.
    if loaded.precision != "fp32" or loaded.compiled:
        settings["network"] = network_settings(loaded)
    return settings


# ----------------------------------------------------------------------------------------------------------------
# Generation


@dataclass
class GenerationStats:
    """Where sampling time went, summed over the batches of one process."""

    samples: int = 0
    network_calls: int = 0
    network_time_s: float = 0.0
    sampler_time_s: float = 0.0
    decode_time_s: float = 0.0
    write_time_s: float = 0.0
    total_time_s: float = 0.0

    def add(self, other: GenerationStats) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float [N, 3, H, W] -> uint8 [N, H, W, 3], rounding to nearest (EDM / DiT convention)."""
    pixels = (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def decode(loaded: LoadedModel, samples: torch.Tensor) -> torch.Tensor:
    """Sampler output -> images in [-1, 1]: VAE decode of `latents / scaling_factor` for latent models."""
    if loaded.vae is None:
        return samples
    with torch.no_grad():
        return loaded.vae.decode(samples / loaded.scaling_factor).sample


def generate(
    loaded: LoadedModel,
    sampling: ResolvedSampling,
    indices: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    device: torch.device | str,
) -> tuple[np.ndarray, GenerationStats]:
    """uint8 [n, H, W, 3] images for sample `indices` (noise seeds from (seed, index)), in batches."""
    from diffit.sampling import sample_with_stats

    stats = GenerationStats()
    outputs = []
    config = sampling.sampling_config(loaded.config["diffusion"])
    for start in range(0, len(indices), batch_size):
        batch_indices = indices[start : start + batch_size]
        seeds = sample_noise_seeds(sampling.seed, batch_indices)
        class_labels = labels[start : start + batch_size] if loaded.num_classes > 0 else None
        began = time.perf_counter()
        network = loaded.sampling_network
        latents, run = sample_with_stats(network, loaded.sample_shape, class_labels, seeds, config, device=device)
        sampled = time.perf_counter()
        images = to_uint8_images(decode(loaded, latents))
        stats.decode_time_s += time.perf_counter() - sampled
        stats.sampler_time_s += sampled - began
        stats.network_calls += run.network_calls
        stats.network_time_s += run.network_time_s
        stats.samples += len(batch_indices)
        outputs.append(images)
    return np.concatenate(outputs), stats


def sample_into_store(
    store: SampleStore,
    loaded: LoadedModel,
    sampling: ResolvedSampling,
    rank: int,
    world_size: int,
    batch_size: int,
    device: torch.device | str,
    missing: Sequence[int] | None = None,
) -> GenerationStats:
    """Generate this rank's share of the missing chunks and write each one as soon as it is done."""
    from tqdm.auto import tqdm

    missing = store.missing_chunks() if missing is None else list(missing)
    mine = assign_chunks(missing, rank, world_size)
    totals = GenerationStats()
    began = time.perf_counter()
    layout = store.layout
    count = sum(stop - start for start, stop in map(layout.chunk_range, mine))
    # One bar in images with its ETA; sampling and VAE decoding run batch by batch inside each chunk, so the
    # postfix shows how the time splits between them.
    bar = tqdm(total=count, desc=f"sampling+decoding (rank {rank})", unit="img", disable=rank != 0 or not mine)
    with bar:
        for chunk in mine:
            start, stop = layout.chunk_range(chunk)
            indices = np.arange(start, stop)
            labels = sample_class_labels(sampling.seed, indices, loaded.num_classes, sampling.classes)
            images, stats = generate(loaded, sampling, indices, labels, batch_size, device)
            written = time.perf_counter()
            store.write_chunk(chunk, images, labels)
            stats.write_time_s = time.perf_counter() - written
            totals.add(stats)
            bar.update(stop - start)
            bar.set_postfix(sample_s=f"{totals.sampler_time_s:.0f}", decode_s=f"{totals.decode_time_s:.0f}")
    totals.total_time_s = time.perf_counter() - began
    logger.info(
        "rank %d/%d: wrote %d chunks (%d samples) in %.1f s",
        rank,
        world_size,
        len(mine),
        totals.samples,
        totals.total_time_s,
    )
    return totals


# ----------------------------------------------------------------------------------------------------------------
# The evaluate command


def _distributed_state(device: str | None):
    """accelerate's process state (rank, world size, device, barrier); CPU gloo when no GPU is present."""
    from accelerate import PartialState

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _parse_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    from pipeline.evaluate.metrics import METRIC_NAMES

    chosen = tuple(dict.fromkeys(m.strip().lower() for m in metrics if m.strip()))
    unknown = [m for m in chosen if m not in METRIC_NAMES]
    if unknown:
        raise EvaluateInputError(f"--metrics: unknown {unknown}; choose from {', '.join(METRIC_NAMES)}")
    return chosen


@dataclass
class Preflight:
    """What the checks before sampling found and loaded."""

    loaded: LoadedModel
    sampling: ResolvedSampling
    settings: dict[str, Any]
    layout: StoreLayout
    metrics: tuple[str, ...]
    reference: Any = None
    feature_config: Any = None


def _feature_config(options: EvaluateOptions, device: torch.device | str):
    """The metrics' `FeatureConfig` (Inception weights checked here, before any sampling)."""
    from pipeline.evaluate import metrics as metric_lib

    if options.prc_memory_gb <= 0 or options.prc_reference_limit < 1 or options.feature_workers < 0:
        raise EvaluateInputError("--prc-memory-gb must be > 0, --prc-reference-limit >= 1, --feature-workers >= 0")
    return metric_lib.FeatureConfig(
        weights=metric_lib.resolve_inception_weights(options.inception_weights),
        layer_fid=options.feature_layer,
        layer_kid=options.feature_layer,
        layer_prc=options.feature_layer,
        batch_size=options.feature_batch_size,
        cuda=torch.device(device).type == "cuda",
        kid_subset_size=options.kid_subset_size,
        prc_memory_bytes=int(options.prc_memory_gb * 1024**3),
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
    if set(chosen) & {"fid", "sfid"} and options.num_samples < 2:
        raise EvaluateInputError("FID / sFID need a covariance: --num-samples must be >= 2")


def preflight(options: EvaluateOptions, device: torch.device | str) -> Preflight:
    """Every check that can fail before sampling (see the module docstring); identical on every rank."""
    from pipeline.evaluate import metrics as metric_lib

    if options.num_samples < 1:
        raise EvaluateInputError(f"--num-samples must be >= 1, got {options.num_samples}")
    if options.batch_size < 1:
        raise EvaluateInputError(f"--batch-size must be >= 1, got {options.batch_size}")
    chosen = _parse_metrics(options.metrics)
    feature_config = reference = None
    if chosen:
        if options.reference is None and set(chosen) & {"fid", "sfid", "kid", "prc"}:
            raise EvaluateInputError("--reference is required for fid, sfid, kid and prc (or use --metrics is)")
        feature_config = _feature_config(options, device)
        metric_lib.check_feature_layers(feature_config, chosen)
        _check_sample_count(options, chosen, feature_config)
    loaded = load_model(options.model_dir, options.vae, device)
    prepare_network(loaded, options.precision, options.compile, device)
    sampling = resolve_sampling(loaded, options.sampling)
    if chosen and options.reference is not None:
        reference = metric_lib.open_reference(options.reference)
        metric_lib.check_reference(reference, loaded.resolution, chosen)
        usable = min(reference.num_images or 0, options.prc_reference_limit)
        if "kid" in chosen and reference.num_images is not None and options.kid_subset_size > usable:
            raise EvaluateInputError(
                f"--kid-subset-size {options.kid_subset_size} exceeds the {usable} reference images KID uses"
            )
    settings = store_settings(loaded, sampling, options.num_samples)
    layout = StoreLayout(options.num_samples, loaded.resolution[0], loaded.resolution[1], options.batch_size)
    store_path = Path(options.out_dir) / STORE_NAME
    if store_path.exists():
        SampleStore.open(store_path, settings, mode="r")  # refuses other settings before any work
    return Preflight(loaded, sampling, settings, layout, chosen, reference, feature_config)


def evaluate(options: EvaluateOptions) -> dict[str, Any] | None:
    """Run the evaluate stage in this process (one rank of a launch); returns the metrics record on rank 0."""
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
        used = ", ".join(checks.sampling.defaults_used) or "none"
        logger.info(
            "sampling %d/%d missing chunks with %d process(es); paper defaults used: %s",
            len(missing),
            store.layout.num_chunks,
            world_size,
            used,
        )
    stats = sample_into_store(
        store, checks.loaded, checks.sampling, rank, world_size, options.batch_size, device, missing
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
        from pipeline.evaluate.metrics import SampleStoreDataset, compute_metrics, reference_cache_dir

        cache_dir = reference_cache_dir(checks.reference, options.cache_dir) if checks.reference else None
        result = compute_metrics(
            SampleStoreDataset(store_path), checks.reference, checks.metrics, checks.feature_config, cache_dir
        )
        fill_metrics(record, result, checks)
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
        "sampling": {**checks.sampling.describe(), "paper_defaults_used": checks.sampling.defaults_used},
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


def fill_metrics(record: dict[str, Any], result: dict[str, Any], checks: Preflight) -> None:
    """Put the metric values into `record`: under "metrics" only when they are comparable to published numbers
    (official Inception weights and the standard feature layers), else under "plumbing_only_metrics" with
    "metrics" left empty, so a script reading record["metrics"]["fid"] never gets a number that is not FID."""
    from pipeline.evaluate.metrics import FEATURE_EXTRACTOR, PLUMBING_ONLY_LABEL

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
    weights = checks.feature_config.weights
    reference = checks.reference
    odd_layers = {
        metric: layer for metric, layer in result["feature_layers"].items() if layer != STANDARD_LAYERS[metric]
    }
    reasons = []
    if not weights.official:
        reasons.append(PLUMBING_ONLY_LABEL)
    if odd_layers:
        reasons.append(f"plumbing-only (non-standard Inception feature layers {odd_layers})")
    reportable = not reasons
    label = "; ".join(reasons) if reasons else weights.label
    sources = result.get("sources", {})
    if reference is not None and reference.kind == "stats":
        label += "; FID against precomputed statistics whose feature extractor is not recorded"
    elif any(source.get("from") == "stored statistics" for source in sources.values()):
        label += (
            "; FID/sFID against the reference batch's stored statistics (the ADM evaluator computes them with "
            "TensorFlow's Inception graph, the samples' features come from torch-fidelity's port of it)"
        )
    record["inception_weights"] = weights.describe()
    record["official_inception_weights"] = weights.official
    record["reportable"] = reportable
    record["label"] = label
    record["metrics"] = values if reportable else {}
    if not reportable:
        record["plumbing_only_metrics"] = values
    record["metrics_requested"] = list(checks.metrics)
    record["feature_extractor"] = {
        **checks.feature_config.extractor_identity(),
        "name": FEATURE_EXTRACTOR,
        "layers": result["feature_layers"],
        "kid_subset_size": checks.feature_config.kid_subset_size,
        "kid_subsets": checks.feature_config.kid_subsets,
        "isc_splits": checks.feature_config.isc_splits,
        "isc_split_size": checks.feature_config.isc_split_size,
        "prc_neighborhood": checks.feature_config.prc_neighborhood,
        "prc_reference_limit": checks.feature_config.prc_reference_limit,
        "prc_memory_bytes": checks.feature_config.prc_memory_bytes,
    }
    record["metric_sources"] = sources
    if reference is not None:
        record["reference"] = {
            **reference.describe(),
            "feature_cache": result["reference_cache"],
            "statistics_cache": result.get("reference_statistics_cache"),
        }


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
    sampling_options: SamplingOptions | None = None,
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
    options = sampling_options or SamplingOptions()
    if classes is not None:
        options.classes = classes
    sampling = resolve_sampling(loaded, options)
    if per_class < 1 or num < 1:
        raise EvaluateInputError("--per-class and --num must be >= 1")
    if sampling.classes is not None:
        count, columns = len(sampling.classes) * per_class, per_class
        # Row r holds class r: sample index r * per_class + j has label classes[r].
        labels = np.repeat(np.asarray(sampling.classes, dtype=np.int64), per_class)
    else:
        count = num
        columns = int(np.ceil(np.sqrt(num)))
        labels = sample_class_labels(sampling.seed, np.arange(count), loaded.num_classes)
    images, _ = generate(loaded, sampling, np.arange(count), labels, batch_size, device)
    write_png(out_png, image_grid(images, columns))
    rows = -(-count // columns)
    logger.info("wrote a %dx%d grid of %d samples to %s", rows, columns, count, out_png)
    return Path(out_png)


__all__ = [
    "EvaluateInputError",
    "EvaluateOptions",
    "SamplingOptions",
    "ResolvedSampling",
    "LoadedModel",
    "SampleStoreMismatchError",
    "evaluate",
    "load_model",
    "prepare_network",
    "resolve_sampling",
    "generate",
    "sample_into_store",
    "sample_grid",
    "preflight",
    "to_uint8_images",
]
