"""Validate model files before anything is allocated: config.json against a schema and a size bound, safetensors
headers against the shapes a config implies.

A model file comes from outside (a download, a colleague, a hub repository) and may be damaged or hostile: a
1 KB config.json can ask for depth 10^7 or hidden 8192 (tens of GB of parameters), a 1 KB safetensors header can
list zero-element tensors whose shapes decide the architecture. Everything here is arithmetic on the files'
text, so a bad file is refused before a model, a tensor or a diffusion schedule exists:

- `check_model_config(config, path)`: a config.json dict. Known keys only in `model` / `model.kwargs` /
  `diffusion` / `sampling`, types and ranges per field (`diffusion_steps` and sampling `steps` <= 100,000), then
  the parameter count and memory the architecture implies (`implied_size`, exact, computed without building the
  model) against a bound: `DEFAULT_MAX_PARAMETERS` (4e9; DiffiT-XL/2 is 561M), raised with the environment
  variable `DIFFIT_MAX_PARAMETERS` or the `max_parameters=` argument of the loaders. Other top-level entries
  (`save_pretrained(extra=...)` is free-form) must only be objects where the pipeline reads objects.
- the state-dict shapes a checked config implies come from a model built on the meta device (no memory):
  `diffit.export_format.meta_state_shapes`, `diffit.io.expected_state_shapes`.
- `check_safetensors_header(path, expected_shapes)`: the 8-byte length and the JSON header read by hand
  (bounded, against the file size), floating dtypes only, data offsets consistent with the shapes and the file,
  the names and shapes equal to the expected ones. Reads the header, never the tensors.
- a saved `DiffiTPipeline` folder (`diffit.pipeline_loading.check_pipeline_folder` applies these):
  `check_pipeline_index` (model_index.json: known entries, components as [library, class], the "sampling"
  entry against `PIPELINE_SAMPLING_FIELDS` = `SamplingConfig`'s fields with `steps` / `diffusion_steps` <= 100,000,
  a positive `scaling_factor`), `check_scheduler_config` (a scheduler's chain length <= 100,000: diffusers'
  schedulers allocate it when built).
- a diffusers AutoencoderKL folder: `check_vae_files(dir, expected_shapes)` (config.json size and sizes bounded,
  `check_vae_config`; the weights' header, against the shapes the config implies when given, diffusers' old
  attention names accepted as it renames them). `pipeline.core.vae` uses it for `encode` / `evaluate`.

Every refusal is an `InvalidModelFileError` (a `ValueError`) whose message is `<file>: <problem>`; `diffit` does
not know the pipeline's error types, so its callers (and `cli.main`) turn this one into their one-line error.
This module imports no torch and no model class (the configurations are data, `diffit.configs`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

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
MAX_HEADER_BYTES = 8 * 2**20  # XL/2's safetensors header is ~40 KB
MAX_TENSOR_RANK = 8

# safetensors dtype names -> bytes per element. Weights must be floating point; integer tensors are refused
# except where a caller names them (the released checkpoints' int64 relative-position index buffers).
DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
INTEGER_DTYPES = ("I64", "I32", "I16")
ZIP_MAGIC = b"PK\x03\x04"


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

# Where the time token x_t enters a `DiffiTTransformerBlock` (paper Sec. 3.2 and its ablations); the first is
# DiffiT itself. Defined here, where nothing imports torch; `diffit.layers` imports it.
TIME_CONDITIONINGS = ("tmsa", "adaln", "bias", "mlp", "decoupled")

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
}
DIFFUSION_FIELDS = {
    "type": ("choice", "adm", "edm", "flow"),
    "noise_schedule": ("choice", "linear", "cosine"),
    "diffusion_steps": ("int", 1, MAX_DIFFUSION_STEPS),
    "learn_sigma": ("bool",),
    "sigma_data": ("float", 1e-6, 1e6),
    "P_mean": ("float", -100.0, 100.0),
    "P_std": ("float", 1e-6, 100.0),
    # flow matching (`diffit.flow`): how training drew its times
    "time_sampling": ("choice", "uniform", "logit-normal"),
    "logit_mean": ("float", -100.0, 100.0),
    "logit_std": ("float", 1e-6, 100.0),
    "time_shift": ("float", 1e-6, 1e6),
}
# The "sampling" entry (`import-nvlabs` writes it; `evaluate` and `DiffiTPipeline` read it as defaults). Samplers and
# schedules as in `diffit.sampling.SAMPLERS` / `diffit.guidance.SCHEDULES` (pinned by a test; not imported here,
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
    "pixels": ("choice", "round", "truncate"),  # diffit.sampling.PIXEL_QUANTIZATIONS
}
# config.json entries that the pipeline reads as objects; other top-level entries are the exporter's own
# (`save_pretrained(extra=...)`) and travel untouched.
OBJECT_SECTIONS = ("diffusion", "vae", "dataset", "train", "sampling", "released")


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
        if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= MAX_STAGES:
            return f"{where} must be a list of 1 to {MAX_STAGES} integers, got {value!r}"
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
    channels, blocks = list(kwargs["channels"]), list(kwargs["blocks_per_stage"])
    if len(channels) != len(blocks):
        raise ValueError(f"channels {channels} and blocks_per_stage {blocks} must have one entry per stage")
    if sum(blocks) > MAX_DEPTH:
        raise ValueError(f"blocks_per_stage {blocks} holds {sum(blocks)} ResBlocks (at most {MAX_DEPTH})")
    if min(kwargs["window_size"], kwargs["img_resolution"]) ** 2 > MAX_ATTENTION_TOKENS:
        raise ValueError(
            f"window_size {kwargs['window_size']} gives more than {MAX_ATTENTION_TOKENS} tokens in one attention window"
        )


# ----------------------------------------------------------------------------------------------------------------
# Size a configuration implies, without building it (pinned against count_parameters in tests)


def _linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def _conv3x3(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out * 9 + fan_out


def _transformer_block(dim: int, heads: int, window: int, time_dim: int, mlp_ratio: float, conditioning: str) -> int:
    """`DiffiTTransformerBlock`: attention (spatial q/k/v, bias table unless adaLN, projection), the MLP (no LN
    affine), and the one time-token projection of `conditioning`."""
    hidden = int(dim * mlp_ratio)
    table = (2 * window - 1) ** 2 * heads
    attention = _linear(dim, 3 * dim) + _linear(dim, dim) + (0 if conditioning == "adaln" else table)
    time_outputs = {"tmsa": 3 * dim, "adaln": 6 * dim, "bias": table, "mlp": dim, "decoupled": 2 * dim}
    return attention + _linear(time_dim, time_outputs[conditioning]) + _linear(dim, hidden) + _linear(hidden, dim)


def _index_bytes(window: int, conditioning: str) -> int:
    """The int64 relative-position index buffer of one TMSA layer: [window^2, window^2] (none under adaLN)."""
    return 0 if conditioning == "adaln" else window**4 * 8


def _latent_size(k: dict[str, Any]) -> tuple[int, int]:
    h, p, c = k["hidden_size"], k["patch_size"], k["in_channels"]
    t, conditioning = k["time_dim"] or h, k["time_conditioning"]
    grid = k["input_size"] // p
    out = 2 * c if k["learn_sigma"] else c
    params = h * c * p * p + h  # patch embedding
    params += grid * grid * h  # fixed position embedding (a parameter, as in DiT)
    params += _linear(256, t) + _linear(t, t)  # time MLP on 256 sinusoidal features
    params += (k["num_classes"] + 1) * t if k["num_classes"] > 0 else 0  # label table with the null row
    params += k["depth"] * _transformer_block(h, k["num_heads"], grid, t, k["mlp_ratio"], conditioning)
    params += _linear(h, p * p * out)  # final layer
    params += _linear(t, 2 * h) if conditioning == "adaln" else 0  # DiT's final adaLN (shift, scale)
    buffers = k["depth"] * _index_bytes(grid, conditioning) + (128 * 4 if k["time_embedding"] == "fourier" else 0)
    return params, buffers


def _unet_size(k: dict[str, Any]) -> tuple[int, int]:
    channels, blocks, cin = list(k["channels"]), list(k["blocks_per_stage"]), k["in_channels"]
    time_dim, conditioning = k.get("time_dim") or 4 * channels[0], k["time_conditioning"]
    windows = [min(k["window_size"], k["img_resolution"] // 2**stage) for stage in range(len(channels))]

    def res_block(stage: int) -> int:
        width = channels[stage]
        block = 2 * width + _conv3x3(width, width)  # GroupNorm (scale, shift) + 3x3 conv
        transformer = _transformer_block(width, k["num_heads"], windows[stage], time_dim, k["mlp_ratio"], conditioning)
        return block + transformer

    params = _linear(channels[0], time_dim) + _linear(time_dim, time_dim)  # time MLP on channels[0] features
    params += (k["num_classes"] + 1) * time_dim if k["num_classes"] > 0 else 0
    params += _conv3x3(cin, channels[0])  # input conv
    for stage in range(len(channels)):
        params += _conv3x3(channels[stage - 1], channels[stage]) if stage else 0  # downsample
        params += blocks[stage] * res_block(stage)
    for stage in range(len(channels) - 1):  # decoder: upsample conv, skip fusion conv, ResBlocks
        params += _conv3x3(channels[stage + 1], channels[stage + 1])
        params += _conv3x3(channels[stage + 1] + channels[stage], channels[stage])
        params += blocks[stage] * res_block(stage)
    params += 2 * channels[0] + _conv3x3(channels[0], cin)  # head: GroupNorm + conv
    # One index buffer per ResBlock: the encoder's stages and the decoder's (all but the deepest).
    index = sum(blocks[s] * _index_bytes(windows[s], conditioning) for s in range(len(channels)))
    index += sum(blocks[s] * _index_bytes(windows[s], conditioning) for s in range(len(channels) - 1))
    fourier = channels[0] // 2 * 4 if k["time_embedding"] == "fourier" else 0
    return params, index + fourier


def _all_fields(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every schema field of `create_model(name, **overrides)`: the named configuration, the overrides, and the
    constructor defaults of what neither sets."""
    from .configs import model_family, resolve_model_kwargs

    family = model_family(name)
    resolved = resolve_model_kwargs(name, **overrides)
    fields = LATENT_FIELDS if family == "latent" else IMAGE_FIELDS
    return {key: resolved[key] if key in resolved else _CONSTRUCTOR_DEFAULTS[family][key] for key in fields}


def implied_size(name: str, overrides: dict[str, Any] | None = None) -> tuple[int, int]:
    """(parameters, buffer bytes) of `create_model(name, **overrides)`, computed arithmetically (no model is
    built; equal to `count_parameters` and the buffers' bytes). `overrides` must have passed the schema."""
    from .configs import model_family

    fields = _all_fields(name, overrides or {})
    return _latent_size(fields) if model_family(name) == "latent" else _unet_size(fields)


# ----------------------------------------------------------------------------------------------------------------
# config.json


# Constructor defaults of the fields the named configurations leave out (LatentDiffiT / DiffiTUNet signatures).
_CONSTRUCTOR_DEFAULTS = {
    "latent": {"mlp_ratio": 4.0, "time_embedding": "positional", "time_conditioning": "tmsa", "time_dim": None},
    "image": {
        "mlp_ratio": 4.0,
        "time_embedding": "positional",
        "time_conditioning": "tmsa",
        "time_dim": None,
        "num_groups": 32,
        "dropout": 0.0,
    },
}


def check_model_kwargs(name: Any, kwargs: Any, limit: int | None = None) -> dict[str, Any]:
    """The resolved constructor arguments of a `model` entry, after the schema and the size bound; raises
    ValueError (message without the file name) otherwise."""
    from .configs import MODEL_CONFIGS, model_family, resolve_model_kwargs

    if not isinstance(name, str) or name not in MODEL_CONFIGS:
        raise ValueError(f"model.name {name!r} is not a known model; known: {', '.join(MODEL_CONFIGS)}")
    family = model_family(name)
    fields = LATENT_FIELDS if family == "latent" else IMAGE_FIELDS
    _check_fields("model.kwargs", kwargs, fields)
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
        return check_model_kwargs(model["name"], model.get("kwargs", {}), max_parameters)
    except ValueError as error:
        raise InvalidModelFileError(path, str(error)) from None


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


# ----------------------------------------------------------------------------------------------------------------
# safetensors headers


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The tensor entries of a safetensors file's header ({name: {dtype, shape, data_offsets}}, `__metadata__`
    dropped), each checked against the format and the file size. Reads the first 8 + header bytes only."""
    path = Path(path)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise InvalidModelFileError(path, "empty file, not safetensors")
        head = handle.read(8)
        if head.startswith(ZIP_MAGIC):
            raise InvalidModelFileError(path, "a zip archive (a torch.save .pt file?), not safetensors")
        if len(head) < 8:
            raise InvalidModelFileError(path, f"truncated: {size} bytes, shorter than the 8-byte header length")
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER_BYTES:
            raise InvalidModelFileError(
                path, f"header length {length:,} over the limit of {MAX_HEADER_BYTES:,} bytes (not safetensors?)"
            )
        if 8 + length > size:
            raise InvalidModelFileError(
                path, f"truncated: the header needs {8 + length:,} bytes, the file has {size:,}"
            )
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise InvalidModelFileError(path, "garbled header (not the JSON of a safetensors file)") from None
    if not isinstance(header, dict):
        raise InvalidModelFileError(path, f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise InvalidModelFileError(path, "header __metadata__ must map names to strings")
    _check_entries(path, header, size - 8 - length)
    return header


def _check_entries(path: Path, header: dict[str, Any], data_size: int) -> None:
    """Each entry well-formed; offsets inside the data, matching the shape, not overlapping, covering it."""
    spans = []
    for name, info in header.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise InvalidModelFileError(path, f"{where}: header entry must hold dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise InvalidModelFileError(path, f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_TENSOR_RANK or not all(_is_int(d) and d >= 0 for d in shape):
            raise InvalidModelFileError(path, f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise InvalidModelFileError(path, f"{where}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise InvalidModelFileError(
                path, f"{where}: data_offsets [{begin}, {end}] outside the {data_size:,} data bytes (truncated?)"
            )
        needed = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != needed:
            raise InvalidModelFileError(
                path, f"{where}: shape {shape} of {dtype} needs {needed:,} bytes, data_offsets hold {end - begin:,}"
            )
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            problem = "overlaps another tensor" if begin < position else f"leaves a gap at byte {position:,}"
            raise InvalidModelFileError(path, f"tensor {name!r}: data {problem}")
        position = end
    if position != data_size:
        raise InvalidModelFileError(path, f"{data_size - position:,} bytes after the last tensor (damaged file?)")


def check_dtypes(path: str | os.PathLike, dtypes: dict[str, str], integer_names: Any = None) -> None:
    """Refuse any non-floating tensor (by safetensors dtype name), naming it; `integer_names(name) -> bool`
    names the tensors that are integer buffers instead (they must then have an integer dtype)."""
    for name in sorted(dtypes):
        dtype = dtypes[name]
        if integer_names is not None and integer_names(name):
            if dtype not in INTEGER_DTYPES:
                raise InvalidModelFileError(path, f"tensor {name!r} has dtype {dtype}; an index needs {INTEGER_DTYPES}")
        elif dtype not in FLOAT_DTYPES:
            raise InvalidModelFileError(
                path, f"tensor {name!r} has dtype {dtype}; weights must be floating point ({', '.join(FLOAT_DTYPES)})"
            )


def check_safetensors_header(
    path: str | os.PathLike, expected_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, dict[str, Any]]:
    """Check a weights file's header (format, file size, floating dtypes) and, when given, that it holds
    exactly `expected_shapes` (see `diffit.io.expected_state_shapes`); returns the header entries."""
    header = read_safetensors_header(path)
    check_dtypes(path, {name: info["dtype"] for name, info in header.items()})
    if expected_shapes is not None:
        check_shapes(path, {name: tuple(info["shape"]) for name, info in header.items()}, expected_shapes)
    return header


def check_shapes(
    path: str | os.PathLike, shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]
) -> None:
    """The file's tensors are exactly the expected names with the expected shapes."""
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise InvalidModelFileError(path, f"lacks {len(missing)} tensors the config needs, e.g. {missing[:3]}")
    unexpected = sorted(set(shapes) - set(expected))
    if unexpected:
        raise InvalidModelFileError(
            path, f"holds {len(unexpected)} tensors the config has no place for, e.g. {unexpected[:3]}"
        )
    for name in sorted(expected):
        if tuple(shapes[name]) != tuple(expected[name]):
            raise InvalidModelFileError(
                path, f"tensor {name!r} has shape {list(shapes[name])}, the config implies {list(expected[name])}"
            )


# ----------------------------------------------------------------------------------------------------------------
# A saved DiffiTPipeline folder: model_index.json (its "sampling" entry), scheduler/ and vae/

# The "sampling" entry of model_index.json: a `diffit.sampling.SamplingConfig` as a dict (`to_dict`), every field
# optional (pinned equal to the dataclass's fields by a test; not imported here, since diffit.sampling imports
# torch). Steps are bounded as in an export's config.json: the ADM chain holds ~10 float64 arrays of
# `diffusion_steps` entries and sampling respaces it to `steps`.
PIPELINE_SAMPLING_FIELDS = {
    "sampler": SAMPLING_FIELDS["sampler"],
    "steps": ("int", 1, MAX_DIFFUSION_STEPS),
    "guidance": ("guidance",),
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
    "generator_device": ("optional_str", 0, 64),
    "pixels": SAMPLING_FIELDS["pixels"],
}
# `diffit.guidance.GuidanceConfig` as a dict.
GUIDANCE_FIELDS = {
    "scale": ("float", 0.0, 1000.0),
    "schedule": SAMPLING_FIELDS["guidance_schedule"],
    "power": ("float", 1e-6, 1000.0),
    "channels": ("optional_int", 1, MAX_IN_CHANNELS),
    "interval": ("interval", 0.0, 1e6),
}
# model_index.json: the components ([library, class] or [null, null]) and the pipeline's configuration entries;
# keys starting with "_" are diffusers' own notes (_class_name, _diffusers_version, _name_or_path).
PIPELINE_COMPONENTS = ("transformer", "vae", "scheduler")
PIPELINE_ENTRIES = ("sampling", "scaling_factor", "id2label")
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
