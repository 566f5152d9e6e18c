"""Loading for `DiffiTPipeline` (diffusers keeps loaders apart from pipelines): a saved pipeline folder checked
before anything is built (`check_pipeline_folder`, the checks of `diffit.pipeline_check`), the VAE an export
names (`load_vae`, with the `path_hash` identity of its files), diffusers' loading keywords this pipeline accepts
(`check_load_keywords`), per-component dtypes (`component_dtype`) and the float32 wrapper samplers run a bfloat16
network through (`ComputeInDtype`, `float32_network`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from .config_check import InvalidModelFileError, parse_config_file
from .pipeline_check import check_pipeline_index, check_scheduler_config
from .vae_loading import (  # noqa: F401 - vae_path_hash, vae_state_shapes: importable here as before
    VAE_WEIGHTS_NAME,
    check_vae_folder,
    load_vae_folder,
    resolve_vae,
    vae_path_hash,
    vae_state_shapes,
)

# diffusers loading keywords that change nothing here: their accepted values, and why.
HARMLESS_LOAD_KEYWORDS = {
    "use_safetensors": ((True, None), "DiffiT exports and saved pipelines hold safetensors weights only"),
    "variant": ((None,), "DiffiT pipelines are saved without weight variants"),
    "low_cpu_mem_usage": ((True, False, None), ""),
}


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


def load_vae(entry: dict[str, Any] | str, model_dir: Path) -> AutoencoderKL:
    """The AutoencoderKL an export's "vae" entry names (or a path / hub id passed as vae=), in eval mode: the one VAE
    loader, `diffit.vae_loading` (a VAE whose files differ from the recorded `path_hash` is a `VAEMismatchError`)."""
    hint = "Pass vae=PATH (a local diffusers AutoencoderKL folder) or vae=an AutoencoderKL."
    override = entry if isinstance(entry, str) else None
    resolved = resolve_vae(None if override else entry, Path(model_dir) / "config.json", override, hint)
    return load_vae_folder(resolved.folder)


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
