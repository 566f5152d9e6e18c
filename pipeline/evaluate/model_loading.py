"""An exported model ready to sample: the network, the VAE its latents decode with (checked to be the one the training
latents were encoded with), and how the network forward runs (fp32 or bf16 autocast, optionally compiled)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.core.shards import sha256_file
from pipeline.evaluate.options import PRECISIONS, EvaluateInputError

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Model and VAE


@dataclass
class LoadedModel:
    """An exported model ready to sample: network, optional VAE, and what they produce."""

    model_dir: Path
    model: torch.nn.Module
    config: dict[str, Any]
    kind: str  # "adm" | "edm" | "flow"
    family: str  # "latent" | "image" | "songunet" (EDM's DDPM++ / NCSN++, image space)
    sample_shape: tuple[int, int, int]  # what the sampler produces per sample (C, H, W)
    resolution: tuple[int, int]  # decoded image size (H, W)
    vae: Any = None
    scaling_factor: float | None = None  # the VAE entry's (recorded in the store settings)
    latent_norm: Any = None  # latent models: the `diffit.latent_norm.LatentNorm` every decode inverts
    identity: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # of the network forward: "fp32" | "bf16" (set by `prepare_network`)
    compiled: bool = False
    network: torch.nn.Module | None = None  # what the sampler calls; None: `model` itself (fp32, eager)
    guide: LoadedModel | None = None  # autoguidance: the weaker model of the same kind (`--guide-model`)

    @property
    def sampling_network(self) -> torch.nn.Module:
        return self.model if self.network is None else self.network

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0))


def load_vae(
    vae_config: dict[str, Any], override: Path | None, model_dir: Path, device: str | torch.device = "cpu"
) -> tuple[Any, dict[str, Any]]:
    """The diffusers AutoencoderKL the model's latents decode with, and its identity: the one VAE loader
    (`diffit.vae_loading.resolve_vae`: `override` (--vae), else the config's local `path` when it still exists,
    else its `id`, a local path or a hub id looked up in the local Hugging Face cache, never downloaded when
    HF_HUB_OFFLINE=1; files whose `path_hash` differs from the one the training latents were encoded with are an
    error unless chosen with --vae, then logged and recorded), loaded in fp32 on `device`
    (`pipeline.core.vae.load_vae`). Every refusal is an EvaluateInputError."""
    from diffit.vae_loading import VAEMismatchError, VAENotFoundError, resolve_vae
    from pipeline.core.vae import load_vae as load_vae_files

    config_path = model_dir / "config.json"
    hint = "Pass --vae PATH (a local diffusers AutoencoderKL folder) to decode with another VAE on purpose."
    try:
        resolved = resolve_vae(vae_config, config_path, override, hint)
    except (VAEMismatchError, VAENotFoundError, ValueError) as error:  # ValueError: the entry names nothing
        raise EvaluateInputError(str(error)) from error
    if resolved.differs:
        logger.warning(
            "--vae %s differs from the VAE the training latents were encoded with (%s…); decoding with it as requested",
            override,
            str(vae_config.get("path_hash"))[:12],
        )
    try:
        vae = load_vae_files(str(resolved.folder), "fp32", str(device))
    except Exception as error:  # noqa: BLE001 - diffusers raises many types; name the folder
        raise EvaluateInputError(f"{resolved.folder}: cannot load a diffusers AutoencoderKL ({error})") from error
    return vae, resolved.identity()


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
    if not isinstance(diffusion, dict) or diffusion.get("type") not in ("adm", "edm", "flow"):
        raise EvaluateInputError(
            f"{model_dir / 'config.json'}: needs 'diffusion': {{'type': 'adm' | 'edm' | 'flow', ...}}, "
            f"got {diffusion!r}"
        )
    family = model_family(config["model"]["name"])
    if family == "songunet" and diffusion["type"] != "edm":
        raise EvaluateInputError(
            f"{model_dir / 'config.json'}: {config['model']['name']} is EDM's network, sampled with EDM's "
            f"preconditioning (diffusion type 'edm'), got {diffusion['type']!r}"
        )
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
        norm = _latent_norm(config, vae_config, channels, model_dir / "config.json")
        scaling_factor = float(vae_config.get("scaling_factor", norm.scaling_factor))
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        loaded.vae = vae
        loaded.scaling_factor = scaling_factor
        loaded.latent_norm = norm
        loaded.resolution = (size * factor, size * factor)
        loaded.identity["vae"] = {**vae_identity, "scaling_factor": scaling_factor, "latent_norm": norm.to_dict()}
    elif channels != 3:
        raise EvaluateInputError(f"{model_dir}: image-space model with {channels} channels; expected RGB (3)")
    return loaded


def _latent_norm(config: dict[str, Any], vae_config: dict[str, Any], channels: int, config_path: Path):
    """The LatentNorm the export records ("latent_norm"; an export written before that entry: scalar with the
    "vae" entry's scaling_factor, no shift), checked for the model's latent channels; EvaluateInputError."""
    from diffit.latent_norm import export_latent_norm

    try:
        return export_latent_norm({"latent_norm": config.get("latent_norm"), "vae": vae_config}, channels)
    except ValueError as error:
        raise EvaluateInputError(f"{config_path}: {error}") from None


# ----------------------------------------------------------------------------------------------------------------
# Network precision and compilation

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
