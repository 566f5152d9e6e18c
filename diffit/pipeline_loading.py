"""Loading for `DiffiTPipeline` (diffusers keeps loaders apart from pipelines): a saved pipeline folder checked
before anything is built (`check_pipeline_folder`, the export checks of `diffit.config_check`), the VAE an export
names (`load_vae`, with the `path_hash` identity of its files), diffusers' loading keywords this pipeline accepts
(`check_load_keywords`), per-component dtypes (`component_dtype`) and the float32 wrapper samplers run a bfloat16
network through (`ComputeInDtype`, `float32_network`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from .config_check import (
    InvalidModelFileError,
    check_pipeline_index,
    check_scheduler_config,
    check_vae_files,
    parse_config_file,
    read_vae_config,
)
from .hub import PretrainedNotFoundError

VAE_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# diffusers loading keywords that change nothing here: their accepted values, and why.
HARMLESS_LOAD_KEYWORDS = {
    "use_safetensors": ((True, None), "DiffiT exports and saved pipelines hold safetensors weights only"),
    "variant": ((None,), "DiffiT pipelines are saved without weight variants"),
    "low_cpu_mem_usage": ((True, False, None), ""),
}


def vae_path_hash(directory: Path) -> str:
    """sha256 over the names and bytes of config.json and the safetensors weights, the `path_hash` that
    `diffit-pipe encode` records for its VAE (so the pipeline can tell it decodes with the same one)."""
    digest = hashlib.sha256()
    for path in (directory / "config.json", directory / VAE_WEIGHTS_NAME):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def vae_state_shapes(config: dict[str, Any], path: Path) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the AutoencoderKL a checked config.json describes, built on the meta device (no
    memory); a config diffusers cannot build is an `InvalidModelFileError` naming the file."""
    settings = {key: value for key, value in config.items() if not key.startswith("_")}
    try:
        with torch.device("meta"):
            model = AutoencoderKL.from_config(settings)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:
        raise InvalidModelFileError(path, f"not an AutoencoderKL diffusers can build ({error})") from None
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_vae_folder(directory: Path) -> None:
    """A VAE folder (config.json + diffusion_pytorch_model.safetensors) before diffusers builds anything from it:
    the config's sizes bounded, the weights present, well-formed, floating point and exactly the tensors the
    config implies (the export checks, `diffit.config_check`). A VAE without matching weights would otherwise
    load with tensors left on the meta device and fail only after sampling."""
    config = read_vae_config(directory)
    check_vae_files(directory, vae_state_shapes(config, Path(directory) / "config.json"), require_weights=True)


def check_pipeline_folder(folder: Path, class_name: str, check_vae: bool = True, check_scheduler: bool = True):
    """A saved pipeline's files before anything is built: model_index.json (size, schema, the sampling entry's
    steps; `check_pipeline_index`), scheduler/scheduler_config.json (its chain length) and vae/ (`check_vae_folder`),
    those it loads. Returns the parsed model_index.json; `InvalidModelFileError` naming the file otherwise."""
    path = folder / "model_index.json"
    index = check_pipeline_index(parse_config_file(path), path)
    if index.get("_class_name") != class_name:
        raise InvalidModelFileError(path, f"describes a {str(index.get('_class_name'))[:80]}, not a {class_name}")
    transformer = folder / "transformer"
    if not (transformer / "config.json").is_file():
        raise InvalidModelFileError(transformer, "no transformer/config.json: not a saved DiffiTPipeline folder")
    if check_scheduler and (index.get("scheduler") or [None])[0] is not None:
        scheduler_path = folder / "scheduler" / "scheduler_config.json"
        if not scheduler_path.is_file():
            raise InvalidModelFileError(scheduler_path, "no such file, but model_index.json names a scheduler")
        check_scheduler_config(parse_config_file(scheduler_path), scheduler_path)
    if check_vae and (index.get("vae") or [None])[0] is not None:
        vae_config = folder / "vae" / "config.json"
        if not vae_config.is_file():
            raise InvalidModelFileError(vae_config, "no such file, but model_index.json names a VAE")
        check_vae_folder(folder / "vae")
    return index


def _vae_source(entry: dict[str, Any] | str, model_dir: Path) -> tuple[str, str | None]:
    """(what to pass to AutoencoderKL.from_pretrained, revision) for an export's "vae" entry or a path / hub id."""
    if isinstance(entry, str):
        return entry, None
    if entry.get("path") and Path(entry["path"]).is_dir():
        return str(entry["path"]), None
    spec = entry.get("id") or entry.get("path")
    if not spec:
        raise ValueError(f"{model_dir / 'config.json'}: 'vae' has neither 'path' nor 'id'; pass vae=PATH")
    return str(spec), entry.get("revision") if entry.get("source") == "hub" else None


def load_vae(entry: dict[str, Any] | str, model_dir: Path) -> AutoencoderKL:
    """The AutoencoderKL an export's "vae" entry names (or a path / hub id), in eval mode. A local VAE whose files
    differ from the recorded `path_hash` (not the one the training latents were encoded with) is an error."""
    spec, revision = _vae_source(entry, model_dir)
    local = Path(os.path.expanduser(spec))
    subfolder = "vae" if local.is_dir() and not (local / "config.json").is_file() else None
    folder = local / subfolder if subfolder else local
    if (folder / "config.json").is_file():  # a local VAE is checked like a saved pipeline's vae/ before it is built
        check_vae_folder(folder)
    try:
        vae = AutoencoderKL.from_pretrained(spec, subfolder=subfolder, revision=revision, use_safetensors=True)
    except Exception as error:  # noqa: BLE001 - diffusers raises many types (OSError, ValueError, hub errors)
        origin = f"named in {model_dir / 'config.json'}" if isinstance(entry, dict) else "passed as vae="
        raise PretrainedNotFoundError(
            f"the VAE {spec} ({origin}) cannot be loaded: {type(error).__name__}: {error}. "
            "Pass vae=PATH (a local diffusers AutoencoderKL folder) or vae=an AutoencoderKL."
        ) from error
    recorded = entry.get("path_hash") if isinstance(entry, dict) else None
    if recorded and (folder / VAE_WEIGHTS_NAME).is_file() and vae_path_hash(folder) != recorded:
        raise ValueError(
            f"model/VAE mismatch: {folder} is not the VAE the training latents were encoded with (its files "
            f"changed; path_hash recorded in {model_dir / 'config.json'}). Pass vae= to decode with it on purpose."
        )
    return vae.eval().requires_grad_(False)


class ComputeInDtype(nn.Module):
    """A network that runs in its parameters' dtype (e.g. bfloat16) inside float32 samplers: inputs are cast to it,
    outputs back to float32. The attributes samplers read from the network are copied."""

    FORWARDED = ("learn_sigma", "num_classes", "null_class", "in_channels", "input_size")

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.compute_dtype = net.dtype
        for name in self.FORWARDED:
            if hasattr(net, name):
                setattr(self, name, getattr(net, name))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels=None) -> torch.Tensor:
        """net(x in its dtype, noise labels, class labels) as float32."""
        return self.net(x.to(self.compute_dtype), noise_labels, class_labels).float()


def float32_network(model: nn.Module) -> nn.Module:
    """`model` itself when it computes in float32 (so samples stay bit-identical to `sample(model, ...)`), else
    wrapped in `ComputeInDtype`."""
    return model if model.dtype == torch.float32 else ComputeInDtype(model)


def check_load_keywords(kwargs: Mapping[str, Any]) -> None:
    """Accept diffusers' harmless loading keywords (HARMLESS_LOAD_KEYWORDS with their accepted values), refuse the
    rest with a message naming each."""
    for name, value in kwargs.items():
        if name in HARMLESS_LOAD_KEYWORDS:
            accepted, why = HARMLESS_LOAD_KEYWORDS[name]
            if value not in accepted:
                raise ValueError(f"DiffiTPipeline.from_pretrained: {name}={value!r} is not supported ({why})")
        elif name == "device_map":
            raise ValueError(
                "DiffiTPipeline.from_pretrained does not take device_map: it loads on the CPU; move the pipeline "
                "with pipe.to('cuda') (or enable_model_cpu_offload())"
            )
        else:
            raise TypeError(
                f"DiffiTPipeline.from_pretrained got the unsupported keyword {name}={value!r}; it takes vae, "
                "scheduler, id2label, torch_dtype, revision, cache_dir, token, local_files_only, force_download "
                f"and, as accepted no-ops, {sorted(HARMLESS_LOAD_KEYWORDS)}"
            )


def component_dtype(torch_dtype: torch.dtype | Mapping[str, torch.dtype] | None, name: str) -> torch.dtype | None:
    """The dtype `torch_dtype` (one dtype, or diffusers' {component: dtype, "default": dtype}) gives `name`."""
    dtype = torch_dtype.get(name, torch_dtype.get("default")) if isinstance(torch_dtype, Mapping) else torch_dtype
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"torch_dtype must be a floating-point torch.dtype (e.g. torch.bfloat16), got {dtype!r}")
    return dtype
