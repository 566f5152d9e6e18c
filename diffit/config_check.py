"""Validate an exported model's config.json before anything is allocated: the schema of its entries, the
cross-field rules that decide sizes, and the parameter bound on the size the architecture implies.

A model file comes from outside (a download, a colleague, a hub repository) and may be damaged or hostile: a
1 KB config.json can ask for depth 10^7 or hidden 8192 (tens of GB of parameters). Everything here is arithmetic
on the file's text, so a bad file is refused before a model, a tensor or a diffusion schedule exists:

- `check_model_config(config, path)`: a config.json dict. Known keys only in `model` / `model.kwargs` /
  `diffusion` / `sampling`, types and ranges per field (`diffusion_steps` and sampling `steps` <= 100,000), then
  the parameter count and memory the architecture implies (`implied_size`, exact, computed without building the
  model by `diffit.model_size`) against a bound: `DEFAULT_MAX_PARAMETERS` (4e9; DiffiT-XL/2 is 561M), raised with
  the environment variable `DIFFIT_MAX_PARAMETERS` or the `max_parameters=` argument of the loaders. Other
  top-level entries (`save_pretrained(extra=...)` is free-form) must only be objects where the pipeline reads
  objects.
- the state-dict shapes a checked config implies come from a model built on the meta device (no memory):
  `diffit.export_format.meta_state_shapes`, `diffit.io.expected_state_shapes`; the weights file's header is
  checked against them by `diffit.safetensors_check`.
- a saved `DiffiTPipeline` folder (model_index.json, scheduler/, vae/) is checked by `diffit.pipeline_check`,
  with this module's field schema.

Every refusal is an `InvalidModelFileError` (a `ValueError`) whose message is `<file>: <problem>`; `diffit` does
not know the pipeline's error types, so its callers (and `cli.main`) turn this one into their one-line error.
This module imports no torch and no model class (the configurations are data, `diffit.configs`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .conditionings import STAGE_CONDITIONINGS, TIME_CONDITIONINGS
from .model_size import FAMILY_SIZES
from .unet_layout import DECODERS, ENCODERS, layout_problem

DEFAULT_MAX_PARAMETERS = 4_000_000_000
MAX_PARAMETERS_ENV = "DIFFIT_MAX_PARAMETERS"
# Parameters are held in fp32 while loading; buffers (the relative-position index, int64) count by their bytes.
BYTES_PER_PARAMETER = 4
# Sizes that allocate besides the parameters, or that no real DiffiT comes near (XL/2: depth 28, 256 tokens).
MAX_DEPTH = 1000  # transformer blocks (latent) or ResBlocks over all stages (U-Net): Python objects per block
MAX_STAGES = 12
MAX_RESOLUTION = 4096  # latent input_size / image img_resolution
MAX_ATTENTION_TOKENS = 4096  # tokens in one attention window: the bias and index are tokens^2 per block
MAX_WIDTH = 65536  # hidden size, channels, heads, time_dim, groups
MAX_IN_CHANNELS = 1024
MAX_CLASSES = 10_000_000
MAX_DIFFUSION_STEPS = 100_000  # the ADM schedule holds ~10 float64 arrays of this length
MAX_CONFIG_BYTES = 16 * 2**20  # an exported config.json is a few KB


class InvalidModelFileError(ValueError):
    """A model file (config.json, weights) that cannot be used; `str()` is `<path>: <problem>`."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


# ----------------------------------------------------------------------------------------------------------------
# The bound


def parameter_bound(override: int | None = None) -> int:
    """The parameter bound: `override`, else `$DIFFIT_MAX_PARAMETERS`, else `DEFAULT_MAX_PARAMETERS`."""
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int) or override < 1:
            raise ValueError(f"max_parameters must be a positive integer, got {override!r}")
        return override
    text = os.environ.get(MAX_PARAMETERS_ENV)
    if text is None:
        return DEFAULT_MAX_PARAMETERS
    try:
        value = int(float(text)) if any(c in text.lower() for c in ".e") else int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"${MAX_PARAMETERS_ENV}={text!r}: expected a positive number of parameters, e.g. 8e9")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Schema: (kind, low, high) per constructor argument; "choice" fields list their values instead of a range.

# Where the time token x_t enters a block: `diffit.conditionings`.

_COMMON_FIELDS = {
    "in_channels": ("int", 1, MAX_IN_CHANNELS),
    "num_heads": ("int", 1, MAX_WIDTH),
    "mlp_ratio": ("float", 0.01, 64.0),
    "num_classes": ("int", 0, MAX_CLASSES),
    "time_embedding": ("choice", "positional", "fourier"),
    "time_conditioning": ("choice", *TIME_CONDITIONINGS),
    "time_dim": ("optional_int", 1, MAX_WIDTH),
}
LATENT_FIELDS = {
    **_COMMON_FIELDS,
    "input_size": ("int", 1, MAX_RESOLUTION),
    "patch_size": ("int", 1, MAX_RESOLUTION),
    "hidden_size": ("int", 1, MAX_WIDTH),
    "depth": ("int", 1, MAX_DEPTH),
    "learn_sigma": ("bool",),
}
IMAGE_FIELDS = {
    **_COMMON_FIELDS,
    "img_resolution": ("int", 1, MAX_RESOLUTION),
    "channels": ("int_list", 1, MAX_WIDTH),
    "blocks_per_stage": ("int_list", 0, MAX_DEPTH),
    "window_size": ("int", 1, MAX_RESOLUTION),
    "num_groups": ("int", 1, MAX_WIDTH),
    "dropout": ("float", 0.0, 1.0),
    "augment_dim": ("int", 0, MAX_IN_CHANNELS),  # EDM's augmentation labels (9 with `data.augment`)
    # Table 4's encoder / decoder designs (`diffit.unet_layout`; cross-field rules in `_check_structure`)
    "decoder_time_conditioning": ("choice", None, *TIME_CONDITIONINGS),  # None: the encoder's time_conditioning
    "encoder": ("choice", *ENCODERS),
    "decoder": ("choice", *DECODERS),
    "patch_size": ("int", 1, MAX_RESOLUTION),  # encoder "vit" only
    "mla_channels": ("optional_int", 2, MAX_WIDTH),  # decoder "setr-mla" only; None: channels[0]
}
# EDM's SongUNet (`diffit.songunet`, the DDPM++ / NCSN++ baselines): its constructor arguments.
SONGUNET_FIELDS = {
    "img_resolution": ("int", 1, MAX_RESOLUTION),
    "in_channels": ("int", 1, MAX_IN_CHANNELS),
    "out_channels": ("int", 1, MAX_IN_CHANNELS),
    "label_dim": ("int", 0, MAX_CLASSES),
    "augment_dim": ("int", 0, MAX_IN_CHANNELS),
    "model_channels": ("int", 1, MAX_WIDTH),
    "channel_mult": ("int_list", 1, MAX_WIDTH),
    "channel_mult_emb": ("int", 1, MAX_WIDTH),
    "num_blocks": ("int", 0, MAX_DEPTH),
    "attn_resolutions": ("int_list", 1, MAX_RESOLUTION, 0),  # may be empty
    "dropout": ("float", 0.0, 1.0),
    "label_dropout": ("float", 0.0, 1.0),
    "embedding_type": ("choice", "positional", "fourier"),
    "channel_mult_noise": ("int", 1, MAX_WIDTH),
    "encoder_type": ("choice", "standard", "skip", "residual"),
    "decoder_type": ("choice", "standard", "skip"),
    "resample_filter": ("int_list", 1, 1000),
    "tmsa": ("bool",),
}
FAMILY_FIELDS = {"latent": LATENT_FIELDS, "image": IMAGE_FIELDS, "songunet": SONGUNET_FIELDS}
DIFFUSION_FIELDS = {
    "type": ("choice", "adm", "edm", "flow"),
    "noise_schedule": ("choice", "linear", "cosine"),
    "diffusion_steps": ("int", 1, MAX_DIFFUSION_STEPS),
    "learn_sigma": ("bool",),
    "sigma_data": ("float", 1e-6, 1e6),
    "P_mean": ("float", -100.0, 100.0),
    "P_std": ("float", 1e-6, 100.0),
    # EDM's preconditionings (`diffit.edm.PRECONDITIONINGS`; absent: "edm") and its augmentation probability
    "precond": ("choice", "edm", "vp", "ve"),
    "augment": ("float", 0.0, 1.0),
    # flow matching (`diffit.flow`): how training drew its times
    "time_sampling": ("choice", "uniform", "logit-normal"),
    "logit_mean": ("float", -100.0, 100.0),
    "logit_std": ("float", 1e-6, 100.0),
    "time_shift": ("float", 1e-6, 1e6),
}
# The "sampling" entry (`import-nvlabs` writes it; `evaluate` and `DiffiTPipeline` read it as defaults). Samplers and
# schedules as in `diffit.sampling_config.SAMPLERS` / `diffit.guidance.SCHEDULES` (pinned by a test; not imported here,
# since those modules import torch).
SAMPLING_FIELDS = {
    "sampler": ("choice", "ddpm", "ddim", "edm-heun", "euler", "heun", "euler-maruyama"),
    "steps": ("int", 1, MAX_DIFFUSION_STEPS),
    "eta": ("float", 0.0, 10.0),
    "guidance_scale": ("float", 0.0, 1000.0),
    "guidance_schedule": ("choice", "constant", "power-cosine"),
    "guidance_power": ("float", 0.0, 1000.0),
    "guidance_channels": ("channels", 1, MAX_IN_CHANNELS),
    "origin": ("str", 0, 1000),
    "reference": ("str", 0, 1000),
    "pixels": ("choice", "round", "truncate"),  # diffit.sampling_config.PIXEL_QUANTIZATIONS
}
# config.json entries that the pipeline reads as objects; other top-level entries are the exporter's own
# (`save_pretrained(extra=...)`) and travel untouched.
OBJECT_SECTIONS = ("diffusion", "vae", "dataset", "train", "sampling", "released", "latent_norm")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_field(where: str, value: Any, spec: tuple) -> str | None:
    """The problem with `value` for `spec`, or None."""
    kind = spec[0]
    if kind == "bool":
        return None if isinstance(value, bool) else f"{where} must be true or false, got {value!r}"
    if kind == "choice":
        return None if value in spec[1:] else f"{where} must be one of {list(spec[1:])}, got {value!r}"
    low, high = spec[1], spec[2]
    if kind == "str":
        ok = isinstance(value, str) and low <= len(value) <= high
        return None if ok else f"{where} must be a string of at most {high} characters, got {value!r:.80}"
    if kind == "channels" and (value is None or value == "all"):
        return None
    if kind == "channels":
        kind = "int"
    if kind == "optional_int" and value is None:
        return None
    if kind in ("int", "optional_int"):
        if not _is_int(value):
            return f"{where} must be an integer, got {value!r}"
        return None if low <= value <= high else f"{where} must be in [{low}, {high}], got {value}"
    if kind == "float":
        if not (_is_int(value) or isinstance(value, float)):
            return f"{where} must be a number, got {value!r}"
        return None if low <= value <= high else f"{where} must be in [{low}, {high}], got {value}"
    if kind == "int_list":
        shortest = spec[3] if len(spec) > 3 else 1
        if not isinstance(value, (list, tuple)) or not shortest <= len(value) <= MAX_STAGES:
            return f"{where} must be a list of {shortest} to {MAX_STAGES} integers, got {value!r}"
        for index, item in enumerate(value):
            problem = _check_field(f"{where}[{index}]", item, ("int", low, high))
            if problem:
                return problem
        return None
    raise AssertionError(f"unknown field kind {kind!r}")


def _check_fields(where: str, values: Any, fields: dict[str, tuple], check_field=None) -> None:
    """Raise ValueError (message without the file) for a non-dict, an unknown key or a bad value (each checked by
    `check_field`, default `_check_field`)."""
    check_field = check_field or _check_field
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be an object, got {type(values).__name__}")
    unknown = sorted(str(key) for key in values if key not in fields)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; known: {sorted(fields)}")
    for key, value in values.items():
        problem = check_field(f"{where}.{key}", value, fields[key])
        if problem:
            raise ValueError(problem)


def _check_structure(family: str, kwargs: dict[str, Any]) -> None:
    """Cross-field rules that decide sizes (the constructors check the rest, on the meta device)."""
    if family == "latent":
        if kwargs["time_conditioning"] in STAGE_CONDITIONINGS:
            raise ValueError(
                f"time_conditioning {kwargs['time_conditioning']!r} adds the time at the start of each stage of the "
                "DiffiT U-Net; the latent DiffiT has no stages (use 'tmsa' or another block conditioning)"
            )
        if kwargs["input_size"] % kwargs["patch_size"]:
            raise ValueError(f"input_size {kwargs['input_size']} is not divisible by patch_size {kwargs['patch_size']}")
        if kwargs["hidden_size"] % kwargs["num_heads"]:
            raise ValueError(f"hidden_size {kwargs['hidden_size']} is not divisible by num_heads {kwargs['num_heads']}")
        tokens = (kwargs["input_size"] // kwargs["patch_size"]) ** 2
        if tokens > MAX_ATTENTION_TOKENS:
            raise ValueError(
                f"input_size {kwargs['input_size']} / patch_size {kwargs['patch_size']} gives {tokens} tokens in one "
                f"attention window (at most {MAX_ATTENTION_TOKENS})"
            )
        return
    if family == "songunet":
        _check_songunet_structure(kwargs)
        return
    channels, blocks = list(kwargs["channels"]), list(kwargs["blocks_per_stage"])
    if len(channels) != len(blocks):
        raise ValueError(f"channels {channels} and blocks_per_stage {blocks} must have one entry per stage")
    if sum(blocks) > MAX_DEPTH:
        raise ValueError(f"blocks_per_stage {blocks} holds {sum(blocks)} ResBlocks (at most {MAX_DEPTH})")
    problem = layout_problem(
        kwargs["img_resolution"],
        channels,
        blocks,
        encoder=kwargs["encoder"],
        decoder=kwargs["decoder"],
        patch_size=kwargs["patch_size"],
        decoder_time_conditioning=kwargs["decoder_time_conditioning"],
        mla_channels=kwargs["mla_channels"],
        max_attention_tokens=MAX_ATTENTION_TOKENS,
    )
    if problem:
        raise ValueError(problem)
    if kwargs["encoder"] == "vit":
        return  # global attention over the patch grid, checked above; window_size is unused
    if min(kwargs["window_size"], kwargs["img_resolution"]) ** 2 > MAX_ATTENTION_TOKENS:
        raise ValueError(
            f"window_size {kwargs['window_size']} gives more than {MAX_ATTENTION_TOKENS} tokens in one attention window"
        )


def _songunet_attention(kwargs: dict[str, Any]) -> list[int]:
    """The feature-map resolution of every self-attention block of a SongUNet (encoder, bottleneck, decoder)."""
    levels, blocks = len(kwargs["channel_mult"]), kwargs["num_blocks"]
    resolutions = [kwargs["img_resolution"] >> level for level in range(levels)]
    attention = [r for r in resolutions for _ in range(blocks) if r in kwargs["attn_resolutions"]]
    attention.append(resolutions[-1])  # the decoder's first block
    return attention + [r for r in resolutions if r in kwargs["attn_resolutions"]]  # each decoder level's last block


def _check_songunet_structure(kwargs: dict[str, Any]) -> None:
    levels = len(kwargs["channel_mult"])
    if kwargs["img_resolution"] % 2 ** (levels - 1):
        raise ValueError(f"img_resolution {kwargs['img_resolution']} cannot be halved {levels - 1} times")
    if levels * (2 * kwargs["num_blocks"] + 3) > MAX_DEPTH:
        raise ValueError(f"num_blocks {kwargs['num_blocks']} x {levels} levels is more than {MAX_DEPTH} blocks")
    if kwargs["tmsa"] and max(_songunet_attention(kwargs)) ** 2 > MAX_ATTENTION_TOKENS:
        raise ValueError(
            f"tmsa: an attention block at {max(_songunet_attention(kwargs))}^2 tokens (at most "
            f"{MAX_ATTENTION_TOKENS}; its relative-position index is tokens^2)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Size a configuration implies, without building it (the arithmetic per family: `diffit.model_size`)


def _all_fields(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every schema field of `create_model(name, **overrides)`: the named configuration, the overrides, and the
    constructor defaults of what neither sets."""
    from .configs import model_family, resolve_model_kwargs

    family = model_family(name)
    resolved = resolve_model_kwargs(name, **overrides)
    return {
        key: resolved[key] if key in resolved else _CONSTRUCTOR_DEFAULTS[family][key] for key in FAMILY_FIELDS[family]
    }


def implied_size(name: str, overrides: dict[str, Any] | None = None) -> tuple[int, int]:
    """(parameters, buffer bytes) of `create_model(name, **overrides)`, computed arithmetically (no model is
    built; equal to `count_parameters` and the buffers' bytes). `overrides` must have passed the schema."""
    from .configs import model_family

    fields = _all_fields(name, overrides or {})
    return FAMILY_SIZES[model_family(name)](fields)


# ----------------------------------------------------------------------------------------------------------------
# config.json


# Constructor defaults of the fields the named configurations leave out (LatentDiffiT / DiffiTUNet / SongUNet
# signatures).
_CONSTRUCTOR_DEFAULTS = {
    "latent": {"mlp_ratio": 4.0, "time_embedding": "positional", "time_conditioning": "tmsa", "time_dim": None},
    "image": {
        "mlp_ratio": 4.0,
        "time_embedding": "positional",
        "time_conditioning": "tmsa",
        "time_dim": None,
        "num_groups": 32,
        "dropout": 0.0,
        "augment_dim": 0,
        "decoder_time_conditioning": None,
        "encoder": "multi-resolution",
        "decoder": "multi-resolution",
        "patch_size": 2,
        "mla_channels": None,
    },
    "songunet": {  # SongUNet's signature (the named configurations set every field)
        "label_dim": 0,
        "augment_dim": 0,
        "model_channels": 128,
        "channel_mult": [1, 2, 2, 2],
        "channel_mult_emb": 4,
        "num_blocks": 4,
        "attn_resolutions": [16],
        "dropout": 0.1,
        "label_dropout": 0.0,
        "embedding_type": "positional",
        "channel_mult_noise": 1,
        "encoder_type": "standard",
        "decoder_type": "standard",
        "resample_filter": [1, 1],
        "tmsa": False,
    },
}


def check_model_kwargs(name: Any, kwargs: Any, limit: int | None = None) -> dict[str, Any]:
    """The resolved constructor arguments of a `model` entry, after the schema and the size bound; raises
    ValueError (message without the file name) otherwise."""
    from .configs import MODEL_CONFIGS, model_family, resolve_model_kwargs

    if not isinstance(name, str) or name not in MODEL_CONFIGS:
        raise ValueError(f"model.name {name!r} is not a known model; known: {', '.join(MODEL_CONFIGS)}")
    family = model_family(name)
    _check_fields("model.kwargs", kwargs, FAMILY_FIELDS[family])
    _check_structure(family, _all_fields(name, kwargs))
    params, buffers = implied_size(name, kwargs)
    bound = parameter_bound(limit)
    memory = params * BYTES_PER_PARAMETER + buffers
    if params > bound or memory > bound * BYTES_PER_PARAMETER:
        raise ValueError(
            f"model {name} with these kwargs implies {params:,} parameters and {memory / 2**30:.1f} GiB "
            f"(parameters in fp32 plus buffers), over the bound of {bound:,} parameters / "
            f"{bound * BYTES_PER_PARAMETER / 2**30:.1f} GiB; for a model that large, raise it with "
            f"{MAX_PARAMETERS_ENV}=N or max_parameters=N"
        )
    return resolve_model_kwargs(name, **kwargs)


def check_model_config(
    config: Any, path: str | os.PathLike = "config.json", max_parameters: int | None = None
) -> dict[str, Any]:
    """Validate a whole config.json dict (see the module docstring); returns the model's resolved kwargs.
    Raises `InvalidModelFileError(path, problem)`."""
    try:
        if not isinstance(config, dict):
            raise ValueError(f"expected a JSON object at the top level, got {type(config).__name__}")
        model = config.get("model")
        if not isinstance(model, dict) or "name" not in model:
            raise ValueError("missing the 'model': {'name', 'kwargs'} entry")
        unknown = sorted(str(key) for key in model if key not in ("name", "kwargs"))
        if unknown:
            raise ValueError(f"model has unknown keys {unknown}; known: ['kwargs', 'name']")
        for section in OBJECT_SECTIONS:
            if section in config and not isinstance(config[section], dict):
                raise ValueError(f"{section} must be an object, got {type(config[section]).__name__}")
        if "diffusion" in config:
            _check_fields("diffusion", config["diffusion"], DIFFUSION_FIELDS)
        if "sampling" in config:
            _check_fields("sampling", config["sampling"], SAMPLING_FIELDS)
        _check_latent_norm(config)
        return check_model_kwargs(model["name"], model.get("kwargs", {}), max_parameters)
    except ValueError as error:
        raise InvalidModelFileError(path, str(error)) from None


def _check_latent_norm(config: dict[str, Any]) -> None:
    """An export's "latent_norm" (`diffit.latent_norm.LatentNorm.from_dict`: finite numbers, std > 0, bounded
    lists) and the "vae" entry's `scaling_factor` an older export decodes with; ValueError otherwise."""
    from .latent_norm import export_latent_norm

    if "latent_norm" in config or isinstance(config.get("vae"), dict) and "scaling_factor" in config["vae"]:
        export_latent_norm(config)


def parse_config_file(path: str | os.PathLike) -> Any:
    """The JSON value of a config file, bounded in size; `InvalidModelFileError` for anything not JSON."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise InvalidModelFileError(path, f"{size:,} bytes, more than the {MAX_CONFIG_BYTES:,} a config may have")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidModelFileError(path, "not a text file (not UTF-8), so not a JSON config") from None
    except json.JSONDecodeError as error:
        raise InvalidModelFileError(path, f"not valid JSON ({error})") from None
    except RecursionError:
        raise InvalidModelFileError(path, "JSON nested too deeply") from None
