"""The Stable Diffusion VAE of the encode stage: resolving `--vae`, loading it once per worker, encoding crops.

`resolve_vae(spec)` runs in the driver before any work: a local directory (with `config.json` and
`diffusion_pytorch_model.safetensors`, or a full pipeline directory with a `vae/` folder) is checked and hashed;
a value that looks like a path but does not exist is refused without asking the hub; a hub id is looked up
through `huggingface_hub.snapshot_download` (cache first, offline aware) and an error explains how to pass a
local directory instead. Workers then load the resolved local directory with `get_vae`, a cached getter in this
importable module, so each worker process builds the VAE once (not once per task).

Latents are stored unscaled: `encode_pixels` returns the posterior mean and std as the VAE computes them; the
diffusion model sees `mean * scaling_factor` (0.18215 for SD), applied by the trainer from the manifest.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import multiprocessing
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.shards import update_digest

logger = logging.getLogger(__name__)

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
DTYPE_NAMES = ("fp32", "fp16", "bf16")

_VAE_CACHE: dict[tuple[str, str, str], Any] = {}
_VAE_CACHE_LOCK = threading.Lock()
_VAE_LOADS = 0  # how many times this process built a VAE (1 per worker when the cache works)


class VAEError(InputError):
    """`--vae` cannot be used: missing directory, not an AutoencoderKL, no safetensors weights, or hub unreachable."""


@dataclass(frozen=True)
class VAESpec:
    """A resolved VAE: where its files are and what identifies them."""

    id: str  # what the user passed: a hub id or a path
    local_path: str  # directory holding config.json + diffusion_pytorch_model.safetensors
    source: str  # "hub" or "local"
    revision: str | None  # hub commit hash (None for a local directory)
    path_hash: str  # sha256 over config.json and the weights file
    config: dict[str, Any]

    @property
    def scaling_factor(self) -> float:
        """Factor the diffusion model multiplies latents by (0.18215 for the SD VAE)."""
        return float(self.config.get("scaling_factor", 0.18215))

    @property
    def latent_channels(self) -> int:
        """Channels of a latent (4 for the SD VAE)."""
        return int(self.config.get("latent_channels", 4))

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction of the encoder: 2 per down block after the first (8 for the SD VAE)."""
        return 2 ** (len(self.config.get("block_out_channels", (64,))) - 1)

    def manifest_entry(self, dtype: str) -> dict[str, Any]:
        """The `vae` entry of a latent manifest."""
        return {
            "id": self.id,
            "source": self.source,
            "revision": self.revision,
            "path": self.local_path,
            "path_hash": self.path_hash,
            "scaling_factor": self.scaling_factor,
            "latent_channels": self.latent_channels,
            "downsample_factor": self.downsample_factor,
            "dtype": dtype,
            "convention": "unscaled",
        }


def _looks_like_path(spec: str) -> bool:
    """True for values that are meant as a local path (so they are never sent to the hub as a repo id)."""
    if spec.startswith(("/", "./", "../", "~", ".\\")) or spec in (".", "..") or "\\" in spec or spec.endswith("/"):
        return True
    parts = spec.split("/")
    if len(parts) > 2:  # hub ids are "name" or "owner/name"
        return True
    # "models/vae" where ./models exists is a path that lacks its last part, not a hub repo called models/vae.
    return len(parts) == 2 and Path(parts[0]).is_dir()


def _hash_files(paths: list[Path]) -> str:
    """sha256 over the names and bytes of the files that define a VAE."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        update_digest(digest, path)
    return digest.hexdigest()


def _check_local_dir(directory: Path, spec: str) -> tuple[Path, dict[str, Any]]:
    """Find and check the AutoencoderKL files in `directory` (or `directory/vae`); returns (dir, config)."""
    if not (directory / "config.json").is_file() and (directory / "vae" / "config.json").is_file():
        directory = directory / "vae"  # a full Stable Diffusion pipeline directory
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise VAEError(
            f"--vae {spec}: {directory} has no config.json; pass the directory written by "
            "AutoencoderKL.save_pretrained (config.json + diffusion_pytorch_model.safetensors)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise VAEError(f"--vae {spec}: cannot read {config_path}: {error}") from error
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise VAEError(f"--vae {spec}: {config_path} describes a {class_name}, not an AutoencoderKL")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        found = sorted(p.name for p in directory.iterdir() if p.is_file())
        raise VAEError(
            f"--vae {spec}: {weights} is missing (found: {', '.join(found) or 'nothing'}); the VAE must be stored "
            "as safetensors (load it once and save_pretrained(dir, safe_serialization=True))"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(weights), framework="numpy") as handle:  # header only; numpy avoids importing torch
            if not list(handle.keys()):
                raise VAEError(f"--vae {spec}: {weights} holds no tensors")
    except VAEError:
        raise
    except Exception as error:  # safetensors raises its own error types for damaged headers
        raise VAEError(f"--vae {spec}: {weights} is not a readable safetensors file ({error})") from error
    return directory, config


def resolve_vae(spec: str, revision: str | None = None) -> VAESpec:
    """Turn `--vae` (hub id or local directory) into a checked VAESpec, before any work starts."""
    expanded = Path(os.path.expanduser(spec))
    if expanded.exists():
        if not expanded.is_dir():
            raise VAEError(
                f"--vae {spec}: {expanded} is a file; pass the directory that holds config.json and {WEIGHTS_NAME}"
            )
        directory, config = _check_local_dir(expanded.resolve(), spec)
        return VAESpec(
            id=spec,
            local_path=str(directory),
            source="local",
            revision=None,
            path_hash=_hash_files([directory / "config.json", directory / WEIGHTS_NAME]),
            config=config,
        )
    if _looks_like_path(spec):
        raise VAEError(
            f"--vae {spec}: no such directory. Pass an existing local directory with config.json and {WEIGHTS_NAME} "
            "(e.g. the output of `huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir DIR`), "
            "or a Hugging Face hub id such as stabilityai/sd-vae-ft-ema"
        )
    return _resolve_hub(spec, revision)


def _resolve_hub(repo_id: str, revision: str | None) -> VAESpec:
    """Fetch (or find in the cache) the config and safetensors weights of a hub VAE."""
    from huggingface_hub import snapshot_download

    how_to = (
        f"To work without network access, download it once elsewhere "
        f"(`huggingface-cli download {repo_id} config.json {WEIGHTS_NAME} --local-dir DIR`), copy DIR here and pass "
        f"--vae DIR (a local path)."
    )
    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=["config.json", WEIGHTS_NAME])
    except Exception as error:  # offline, no cache, unknown repo, invalid id, network failures
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        where = (
            "the hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache"
            if offline
            else "the hub could not be reached or has no such repository"
        )
        raise VAEError(
            f"--vae {repo_id}: cannot load this VAE from the Hugging Face hub: {where} "
            f"({type(error).__name__}: {error}). {how_to}"
        ) from error
    directory, config = _check_local_dir(Path(snapshot), repo_id)
    return VAESpec(
        id=repo_id,
        local_path=str(directory),
        source="hub",
        revision=Path(snapshot).name,  # snapshot folders are named by commit hash
        path_hash=_hash_files([directory / "config.json", directory / WEIGHTS_NAME]),
        config=config,
    )


def torch_dtype(name: str):
    """torch dtype for a `--dtype` name (fp32, fp16, bf16)."""
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in dtypes:
        raise VAEError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPE_NAMES)}")
    return dtypes[name]


def pick_device(name: str = "auto") -> str:
    """The torch device: `auto` means CUDA when available, else CPU."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def load_vae(local_path: str, dtype: str = "fp32", device: str = "cpu"):
    """Load an AutoencoderKL from a resolved local directory (safetensors only), in eval mode, no gradients."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(
        local_path, torch_dtype=torch_dtype(dtype), use_safetensors=True, local_files_only=True
    )
    vae.requires_grad_(False)
    return vae.eval().to(device)


def get_vae(local_path: str, dtype: str = "fp32", device: str = "cpu"):
    """The VAE for (path, dtype, device), loaded at most once per process (the per-worker cache)."""
    global _VAE_LOADS
    key = (local_path, dtype, device)
    with _VAE_CACHE_LOCK:
        if key not in _VAE_CACHE:
            logger.info("loading VAE %s (%s, %s) in process %d", local_path, dtype, device, os.getpid())
            _VAE_CACHE[key] = load_vae(local_path, dtype, device)
            _VAE_LOADS += 1
            if multiprocessing.parent_process() is not None:
                # In a worker process: move the many objects torch/diffusers created at import into the permanent
                # generation. Later collections skip them, and the worker exits in ~0.5 s instead of ~3 s.
                gc.freeze()
        return _VAE_CACHE[key]


def vae_load_count() -> int:
    """How many times this process loaded a VAE (the tests check it is once per worker, not once per task)."""
    return _VAE_LOADS


def set_torch_threads(threads: int | None) -> None:
    """Limit torch's intra-op threads in this process (so N workers do not oversubscribe the cores)."""
    if threads is None:
        return
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def pixels_to_tensor(pixels: np.ndarray):
    """uint8 [N, H, W, 3] → float32 [N, 3, H, W] in [-1, 1] (the VAE's input range)."""
    import torch

    images = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float()
    return images / 127.5 - 1.0


def encode_pixels(vae, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and std of crops and their horizontal flips: float32 [N, 2, C, h, w] each (unscaled).

    The N crops and their N flips go through the encoder as one batch of 2N.
    """
    import torch

    images = pixels_to_tensor(pixels)
    count = images.shape[0]
    both = torch.cat([images, images.flip(-1)])
    parameter = next(vae.parameters())
    with torch.inference_mode():
        posterior = vae.encode(both.to(device=parameter.device, dtype=parameter.dtype)).latent_dist
        mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
    shape = (2, count) + tuple(mean.shape[1:])
    mean = mean.reshape(shape).transpose(0, 1).contiguous().numpy()
    std = std.reshape(shape).transpose(0, 1).contiguous().numpy()
    return mean, std


def decode_latents(vae, latents: np.ndarray) -> np.ndarray:
    """Decode unscaled latents [N, C, h, w] to uint8 images [N, H, W, 3] (for previews)."""
    import torch

    parameter = next(vae.parameters())
    with torch.inference_mode():
        z = torch.from_numpy(np.asarray(latents, dtype=np.float32)).to(device=parameter.device, dtype=parameter.dtype)
        images = vae.decode(z).sample.float().clamp(-1, 1)
    images = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return images
