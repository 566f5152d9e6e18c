"""The one VAE loader: an export's or a dataset manifest's "vae" entry -> a checked diffusers AutoencoderKL.

Every stage that decodes latents goes through here (`DiffiTPipeline`, `diffit-pipe evaluate`, the trainer's sample
grids and FID); the pipeline's loaders only turn these errors into their stage's error types and add their own
concerns (dtype, device, caches).

- `entry_source(entry)`: what the entry names, in order: its local `path` while that is still a directory, else its
  `id` (a local path or a hub id; a hub entry's `revision` with it), else its `path`.
- `resolve_vae(entry, config_path, override)`: that source (or `override`, a path / hub id chosen by the user)
  as a local folder (a directory, its `vae/` subfolder, or a hub snapshot of config.json + the safetensors weights,
  from the cache when offline; `diffit.hub.resolve_pretrained_dir`) with the `path_hash` of its files. Files that
  differ from the entry's recorded `path_hash` (not the VAE the training latents were encoded with) are a
  `VAEMismatchError`, unless the user chose the VAE with `override` (then `ResolvedVAE.differs` says so).
- `load_vae_folder(folder, torch_dtype)`: `check_vae_folder` (config.json bounded, the weights well-formed
  floating-point safetensors holding exactly the tensors the config implies: `diffit.pipeline_check`) before
  diffusers builds anything, then `AutoencoderKL.from_pretrained` from the local files, eval mode, no gradients.

A VAE that cannot be found is a `VAENotFoundError` (a `PretrainedNotFoundError`) naming it and where it came from;
callers append how to pass another one in their own words.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config_check import InvalidModelFileError
from .hub import PretrainedNotFoundError, resolve_pretrained_dir
from .hub import _looks_like_path as looks_like_path
from .pipeline_check import check_vae_files, read_vae_config

VAE_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
VAE_FILES = ("config.json", VAE_WEIGHTS_NAME)


class VAENotFoundError(PretrainedNotFoundError):
    """The VAE an entry (or the user) names cannot be found or fetched."""


class VAEMismatchError(ValueError):
    """The VAE's files are not those the training latents were encoded with (`path_hash` differs)."""


@dataclass(frozen=True)
class ResolvedVAE:
    """A VAE found on this machine: the folder with its files, what named it and the hash of its files."""

    id: str  # what was resolved: a local path or a hub id
    folder: Path  # holds config.json + diffusion_pytorch_model.safetensors
    source: str  # "local" | "hub"
    revision: str | None  # a hub snapshot's commit (None for a local folder)
    path_hash: str
    differs: bool = False  # an override whose files are not the recorded ones (decoding with it on purpose)

    def identity(self) -> dict[str, Any]:
        """What evaluation records of the VAE it decoded with."""
        identity = {
            "id": self.id,
            "source": self.source,
            "revision": self.revision,
            "local_path": str(self.folder),
            "path_hash": self.path_hash,
        }
        if self.differs:
            identity["differs_from_training_vae"] = True
        return identity


def vae_path_hash(directory: str | os.PathLike) -> str:
    """sha256 over the names and bytes of config.json and the safetensors weights: the `path_hash` that
    `diffit-pipe encode` records for its VAE (so a decoder can tell it decodes with the same one)."""
    digest = hashlib.sha256()
    for name in VAE_FILES:
        digest.update(name.encode() + b"\0")
        with open(Path(directory) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def vae_state_shapes(config: dict[str, Any], path: Path) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the AutoencoderKL a checked config.json describes, built on the meta device (no
    memory); a config diffusers cannot build is an `InvalidModelFileError` naming the file."""
    import torch
    from diffusers import AutoencoderKL

    settings = {key: value for key, value in config.items() if not key.startswith("_")}
    try:
        with torch.device("meta"):
            model = AutoencoderKL.from_config(settings)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:
        raise InvalidModelFileError(path, f"not an AutoencoderKL diffusers can build ({error})") from None
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_vae_folder(directory: str | os.PathLike) -> None:
    """A VAE folder (config.json + diffusion_pytorch_model.safetensors) before diffusers builds anything from it:
    the config's sizes bounded, the weights present, well-formed, floating point and exactly the tensors the
    config implies (`diffit.pipeline_check`). A VAE without matching weights would otherwise load with tensors left
    on the meta device and fail only after sampling."""
    config = read_vae_config(directory)
    check_vae_files(directory, vae_state_shapes(config, Path(directory) / "config.json"), require_weights=True)


def load_vae_folder(directory: str | os.PathLike, torch_dtype=None):
    """The AutoencoderKL of a local folder, checked first (`check_vae_folder`), from its safetensors weights only,
    in eval mode without gradients (`torch_dtype`: None keeps float32)."""
    from diffusers import AutoencoderKL

    check_vae_folder(directory)
    vae = AutoencoderKL.from_pretrained(
        str(directory), torch_dtype=torch_dtype, use_safetensors=True, local_files_only=True
    )
    return vae.eval().requires_grad_(False)


def entry_source(entry: Mapping[str, Any], config_path: str | os.PathLike, hint: str = "") -> tuple[str, str | None]:
    """(path or hub id, revision) that a "vae" entry names: its `path` while that is a directory, else its `id`
    (with the entry's `revision` when it is a hub entry), else its `path`. ValueError when it names nothing."""
    if entry.get("path") and Path(os.path.expanduser(str(entry["path"]))).is_dir():
        return str(entry["path"]), None
    spec = entry.get("id") or entry.get("path")
    if not spec or not isinstance(spec, str):
        raise ValueError(f"{config_path}: 'vae' has neither 'path' nor 'id'{'; ' + hint if hint else ''}")
    revision = entry.get("revision") if entry.get("source") == "hub" else None
    return spec, revision if isinstance(revision, str) else None


def vae_folder(spec: str, revision: str | None = None) -> tuple[Path, str]:
    """(local folder, "local" | "hub") of a path or hub id: a directory (or its `vae/` subfolder, as in a full
    diffusers pipeline), else a hub snapshot of the VAE's two files; `PretrainedNotFoundError` otherwise."""
    local = Path(os.path.expanduser(spec))
    if local.is_dir():
        if not (local / "config.json").is_file() and (local / "vae" / "config.json").is_file():
            local = local / "vae"
        return local, "local"
    if local.exists():
        raise FileNotFoundError(f"{spec} is a file; a VAE is the folder holding config.json and {VAE_WEIGHTS_NAME}")
    if looks_like_path(spec):
        raise FileNotFoundError(f"{spec}: no such directory")
    return resolve_pretrained_dir(spec, allow_patterns=list(VAE_FILES), revision=revision), "hub"


def resolve_vae(
    entry: Mapping[str, Any] | None,
    config_path: str | os.PathLike,
    override: str | os.PathLike | None = None,
    hint: str = "",
    check_hash: bool = True,
) -> ResolvedVAE:
    """The VAE to decode with: `override` (a path / hub id the user chose) or what `entry` names (`entry_source`),
    found on this machine; its files against the entry's recorded `path_hash` (see the module docstring).
    `hint`: how the caller's user passes another VAE, added to the errors that call for one. `check_hash=False`:
    the recorded `path_hash` is not compared (the trainer's previews decode with the dataset's VAE as found)."""
    entry = entry or {}
    if override is not None:
        spec, revision, origin = str(override), None, "passed instead of the recorded one"
    else:
        spec, revision = entry_source(entry, config_path, hint)
        origin = f"named in {config_path}"
    try:
        folder, source = vae_folder(spec, revision)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder} has no config.json (not a diffusers AutoencoderKL folder)")
    except (OSError, ValueError) as error:
        raise VAENotFoundError(
            f"the VAE {spec} ({origin}) cannot be loaded: {type(error).__name__}: {str(error).rstrip('.')}."
            f"{' ' + hint if hint else ''}"
        ) from error
    # Its files, before they are hashed or built: config.json bounded, the weights' header (InvalidModelFileError).
    check_vae_files(folder, require_weights=True)
    path_hash = vae_path_hash(folder)
    snapshot = folder.name if source == "hub" else None  # hub snapshot folders are named by commit hash
    resolved = ResolvedVAE(spec, folder, source, snapshot, path_hash)
    recorded = entry.get("path_hash")
    if check_hash and isinstance(recorded, str) and recorded and recorded != path_hash:
        if override is None:
            raise VAEMismatchError(
                f"model/VAE mismatch: {folder} (path_hash {path_hash[:12]}…) is not the VAE the training latents were "
                f"encoded with (path_hash {recorded[:12]}… in {config_path}); its files changed."
                f"{' ' + hint if hint else ''}"
            )
        resolved = ResolvedVAE(spec, folder, source, snapshot, path_hash, differs=True)
    return resolved
