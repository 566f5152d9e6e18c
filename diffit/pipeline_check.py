"""Check a saved `DiffiTPipeline` folder's files before anything is built from them
(`diffit.pipeline_loading.check_pipeline_folder` applies these):

- `check_pipeline_index` (model_index.json: known entries, components as [library, class], the "sampling" entry
  against `PIPELINE_SAMPLING_FIELDS` = `SamplingConfig`'s fields with `steps` / `diffusion_steps` <= 100,000, a
  positive `scaling_factor`, a sane `latent_norm`), `check_pipeline_sampling` (that "sampling" entry alone);
- `check_scheduler_config` (a scheduler's chain length <= 100,000: diffusers' schedulers allocate it when built);
- a diffusers AutoencoderKL folder: `check_vae_files(dir, expected_shapes)` (config.json size and sizes bounded,
  `check_vae_config`; the weights' header, against the shapes the config implies when given, diffusers' old
  attention names accepted as it renames them). `pipeline.core.vae` uses it for `encode` / `evaluate`.

The field schema and its checker are an export's (`diffit.config_check`), the weights' header checks
`diffit.safetensors_check`'s. Every refusal is an `InvalidModelFileError` (`<file>: <problem>`). No torch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .config_check import (
    DIFFUSION_FIELDS,
    MAX_DIFFUSION_STEPS,
    MAX_IN_CHANNELS,
    SAMPLING_FIELDS,
    InvalidModelFileError,
    _check_field,
    _check_fields,
    _is_int,
)
from .safetensors_check import check_dtypes, check_safetensors_header, check_shapes, read_safetensors_header

# `diffit.guidance.GuidanceConfig` as a dict.
GUIDANCE_FIELDS = {
    "scale": ("float", 0.0, 1000.0),
    "schedule": SAMPLING_FIELDS["guidance_schedule"],
    "power": ("float", 1e-6, 1000.0),
    "channels": ("optional_int", 1, MAX_IN_CHANNELS),
    "interval": ("interval", 0.0, 1e6),
}
# The "sampling" entry of model_index.json: a `diffit.sampling_config.SamplingConfig` as a dict (`to_dict`: guidance
# flat as guidance_<field>; the nested "guidance" object of folders saved before is read too), every field
# optional (pinned equal to the dataclass's fields by a test; not imported here, since diffit.sampling_config imports
# torch). Steps are bounded as in an export's config.json: the ADM chain holds ~10 float64 arrays of
# `diffusion_steps` entries and sampling respaces it to `steps`.
PIPELINE_SAMPLING_FIELDS = {
    "sampler": SAMPLING_FIELDS["sampler"],
    "steps": ("int", 1, MAX_DIFFUSION_STEPS),
    "guidance": ("guidance",),  # saved before the flat names
    **{f"guidance_{name}": spec for name, spec in GUIDANCE_FIELDS.items()},
    "kind": ("choice", "adm", "edm", "flow"),
    "eta": ("float", 0.0, 10.0),
    "diffusion_steps": ("int", 1, MAX_DIFFUSION_STEPS),
    "noise_schedule": ("choice", "linear", "cosine"),
    "learn_sigma": ("optional_bool",),
    "clip_denoised": ("bool",),
    "sigma_min": ("float", 1e-9, 1e6),
    "sigma_max": ("float", 1e-9, 1e6),
    "rho": ("float", 1e-3, 1e3),
    "S_churn": ("float", 0.0, 1e6),
    "S_min": ("float", 0.0, 1e6),
    "S_max": ("float_or_inf", 0.0, 1e6),
    "S_noise": ("float", 0.0, 100.0),
    "sigma_data": DIFFUSION_FIELDS["sigma_data"],
    "precond": DIFFUSION_FIELDS["precond"],
    "generator_device": ("optional_str", 0, 64),
    "pixels": SAMPLING_FIELDS["pixels"],
}
# model_index.json: the components ([library, class] or [null, null]) and the pipeline's configuration entries;
# keys starting with "_" are diffusers' own notes (_class_name, _diffusers_version, _name_or_path).
PIPELINE_COMPONENTS = ("transformer", "vae", "scheduler")
PIPELINE_ENTRIES = ("sampling", "scaling_factor", "latent_norm", "id2label")
MAX_NAME_CHARS = 200
# A scheduler's config: the length of the chain its constructor allocates (betas, alphas_cumprod, timesteps).
SCHEDULER_STEP_KEYS = ("num_train_timesteps",)
MAX_TRAINED_BETAS = MAX_DIFFUSION_STEPS


def _check_pipeline_field(where: str, value: Any, spec: tuple) -> str | None:
    """`_check_field` with the kinds only a pipeline's sampling entry has."""
    kind = spec[0]
    if kind == "optional_bool":
        ok = value is None or isinstance(value, bool)
        return None if ok else f"{where} must be true, false or null, got {value!r}"
    if kind == "optional_str":
        return None if value is None else _check_field(where, value, ("str", *spec[1:]))
    if kind == "float_or_inf":
        if value == "inf" or (isinstance(value, float) and value == math.inf):
            return None
        return _check_field(where, value, ("float", *spec[1:]))
    if kind == "interval":  # None, or [low, high] with bounds 0 <= low <= high <= the spec's maximum
        if value is None:
            return None
        pair = value if isinstance(value, list) and len(value) == 2 else None
        problems = [_check_field(f"{where}[{i}]", v, ("float", *spec[1:])) for i, v in enumerate(pair or [])]
        if pair is None or any(problems) or pair[0] > pair[1]:
            return next((p for p in problems if p), None) or f"{where} must be null or [low, high], got {value!r}"
        return None
    if kind == "guidance":
        if value is None:
            return None
        try:
            _check_fields(where, value, GUIDANCE_FIELDS, _check_pipeline_field)
        except ValueError as error:
            return str(error)
        return None
    return _check_field(where, value, spec)


def check_pipeline_sampling(sampling: Any, where: str = "sampling") -> None:
    """A saved pipeline's sampling settings (`SamplingConfig.to_dict()`, any subset); ValueError without the
    file name otherwise."""
    _check_fields(where, sampling, PIPELINE_SAMPLING_FIELDS, _check_pipeline_field)


def check_pipeline_index(index: Any, path: str | os.PathLike = "model_index.json") -> dict[str, Any]:
    """Validate a saved pipeline's model_index.json (parsed): known entries only, components as [library, class]
    names, `sampling` against its schema (steps bounded), `scaling_factor` a positive number, `id2label` an
    object of strings. Returns it; `InvalidModelFileError(path, problem)` otherwise."""
    try:
        if not isinstance(index, dict):
            raise ValueError(f"expected a JSON object at the top level, got {type(index).__name__}")
        known = PIPELINE_COMPONENTS + PIPELINE_ENTRIES
        unknown = sorted(str(key) for key in index if key not in known and not str(key).startswith("_"))
        if unknown:
            raise ValueError(f"unknown entries {unknown}; known: {sorted(known)}")
        for key, value in index.items():
            if str(key).startswith("_") and not (value is None or isinstance(value, str) and len(value) <= 4096):
                raise ValueError(f"{key} must be a string, got {type(value).__name__}")
        for name in PIPELINE_COMPONENTS:
            entry = index.get(name)
            ok = entry is None or (
                isinstance(entry, list)
                and len(entry) == 2
                and all(part is None or (isinstance(part, str) and len(part) <= MAX_NAME_CHARS) for part in entry)
            )
            if not ok:
                raise ValueError(f"{name} must be [library, class name] or null, got {str(entry)[:80]}")
        if index.get("sampling") is not None:
            check_pipeline_sampling(index["sampling"])
        factor = index.get("scaling_factor")
        if factor is not None and not (
            (_is_int(factor) or isinstance(factor, float)) and 0 < factor <= 1e6 and math.isfinite(factor)
        ):
            raise ValueError(f"scaling_factor must be a number in (0, 1e6], got {factor!r}")
        if index.get("latent_norm") is not None:
            from .latent_norm import LatentNorm

            LatentNorm.from_dict(index["latent_norm"])
        labels = index.get("id2label")
        if labels is not None and not (
            isinstance(labels, dict) and all(isinstance(names, str) for names in labels.values())
        ):
            raise ValueError("id2label must map class indices to strings of names")
        return index
    except ValueError as error:
        raise InvalidModelFileError(path, str(error)) from None


def check_scheduler_config(config: Any, path: str | os.PathLike) -> dict[str, Any]:
    """A scheduler's scheduler_config.json (parsed): an object whose chain length (`num_train_timesteps`, the
    length of `trained_betas`) is bounded like an export's `diffusion_steps`, so no scheduler constructor
    allocates more than a few MB."""
    if not isinstance(config, dict):
        raise InvalidModelFileError(path, f"expected a JSON object at the top level, got {type(config).__name__}")
    for key in SCHEDULER_STEP_KEYS:
        if key in config:
            problem = _check_field(key, config[key], ("int", 1, MAX_DIFFUSION_STEPS))
            if problem:
                raise InvalidModelFileError(path, problem)
    betas = config.get("trained_betas")
    if betas is not None and not (isinstance(betas, list) and len(betas) <= MAX_TRAINED_BETAS):
        raise InvalidModelFileError(path, f"trained_betas must be a list of at most {MAX_TRAINED_BETAS} numbers")
    return config


# ----------------------------------------------------------------------------------------------------------------
# A diffusers AutoencoderKL folder: config.json and diffusion_pytorch_model.safetensors

VAE_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# Bounds on an AutoencoderKL's config.json, checked before diffusers builds anything from it (the SD VAE:
# 4 blocks of at most 512 channels, 2 layers per block; its config.json is under 1 KB).
MAX_VAE_CONFIG_BYTES = 1 << 20
VAE_CONFIG_BOUNDS = {
    "in_channels": 64,
    "out_channels": 64,
    "latent_channels": 256,
    "layers_per_block": 32,
    "norm_num_groups": 1024,
    "sample_size": 16384,
}
MAX_VAE_BLOCKS = 8
MAX_VAE_CHANNELS = 8192


def check_vae_config(config: Any, path: str | os.PathLike) -> dict[str, Any]:
    """An AutoencoderKL config.json (parsed): every size it declares within `VAE_CONFIG_BOUNDS` (a 1 KB file must
    not ask for millions of layers), block lists bounded. Returns it; `InvalidModelFileError` otherwise."""
    if not isinstance(config, dict):
        raise InvalidModelFileError(path, f"expected a JSON object, got {type(config).__name__}")
    for key, bound in VAE_CONFIG_BOUNDS.items():
        value = config.get(key)
        if value is not None and not (_is_int(value) and 0 < value <= bound):
            raise InvalidModelFileError(path, f"{key} must be an integer in [1, {bound}], got {value!r}")
    channels = config.get("block_out_channels", [])
    if not (
        isinstance(channels, list)
        and len(channels) <= MAX_VAE_BLOCKS
        and all(_is_int(c) and 0 < c <= MAX_VAE_CHANNELS for c in channels)
    ):
        raise InvalidModelFileError(
            path,
            f"block_out_channels must list at most {MAX_VAE_BLOCKS} channel counts in [1, {MAX_VAE_CHANNELS}], "
            f"got {str(channels)[:80]}",
        )
    for key in ("down_block_types", "up_block_types"):
        blocks = config.get(key)
        if blocks is not None and not (
            isinstance(blocks, list)
            and len(blocks) <= MAX_VAE_BLOCKS
            and all(isinstance(b, str) and len(b) <= MAX_NAME_CHARS for b in blocks)
        ):
            raise InvalidModelFileError(
                path, f"{key} must list at most {MAX_VAE_BLOCKS} block type names, got {str(blocks)[:80]}"
            )
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise InvalidModelFileError(path, f"describes a {str(name)[:80]}, not an AutoencoderKL")
    return config


def read_vae_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked config.json of a VAE folder (size bounded before it is parsed, then `check_vae_config`)."""
    config_path = Path(directory) / "config.json"
    size = config_path.stat().st_size
    if size > MAX_VAE_CONFIG_BYTES:
        raise InvalidModelFileError(config_path, f"{size:,} bytes, more than an AutoencoderKL config may have")
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise InvalidModelFileError(config_path, f"not a JSON config ({error})") from None
    return check_vae_config(config, config_path)


def check_vae_files(
    directory: str | os.PathLike,
    expected_shapes: dict[str, tuple[int, ...]] | None = None,
    require_weights: bool = False,
) -> dict[str, dict[str, Any]] | None:
    """A VAE folder before diffusers builds anything from it: config.json (`read_vae_config`) and, when present
    (or `require_weights`), the weights file's header (well-formed safetensors of floating-point tensors; the
    tensors `expected_shapes` names, when given). Returns the weights' header entries (None without weights)."""
    read_vae_config(directory)
    weights = Path(directory) / VAE_WEIGHTS_NAME
    if not weights.is_file():
        if require_weights or expected_shapes is not None:
            raise InvalidModelFileError(weights, "no such file: the VAE's config.json has no weights beside it")
        return None
    return check_safetensors_header(weights) if expected_shapes is None else check_vae_weights(weights, expected_shapes)


# diffusers loads VAE weights saved with its old attention names (the SD VAE's hub files) by renaming them.
DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def check_vae_weights(
    path: str | os.PathLike, expected_shapes: dict[str, tuple[int, ...]]
) -> dict[str, dict[str, Any]]:
    """The VAE weights' header against the state-dict shapes its config implies (`expected_shapes`, from the
    model built on the meta device): every tensor there, none left over, each of its shape (old attention names
    and 1x1-convolution shapes of linear weights, which diffusers converts on load, count as matching)."""
    header = read_safetensors_header(path)
    check_dtypes(path, {name: info["dtype"] for name, info in header.items()})
    shapes = {}
    for name, info in header.items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in DEPRECATED_ATTENTION_NAMES:
            parts[-2] = DEPRECATED_ATTENTION_NAMES[parts[-2]]
        shape = list(info["shape"])
        shapes[".".join(parts)] = shape
    for name, shape in shapes.items():
        want = list(expected_shapes.get(name, ()))
        if name in expected_shapes and shape != want and shape[: len(want)] == want and set(shape[len(want) :]) == {1}:
            shapes[name] = want  # a linear weight stored as a 1x1 convolution
    check_shapes(path, {name: tuple(shape) for name, shape in shapes.items()}, expected_shapes)
    return header
