"""Load checkpoints of the released NVlabs/DiffiT latent model into `LatentDiffiT`.

The released code (`diffit/diffit.py` of NVlabs/DiffiT) names its modules after DiT / timm (`x_embedder.proj`,
`t_embedder.mlp`, `y_embedder.embedding_table`, `blocks.i.attn.qkv`, `blocks.i.attn.qkv_temb`,
`relative_position_bias_table`, ...) and ships the weights as flat safetensors files (`diffit_256.safetensors`,
`diffit_512.safetensors`), read with `safetensors.torch.load_file`, never unpickled.

- `load_nvlabs_model` is the checked entry point: it reads the safetensors header only (`released_layout`),
  reads the architecture off its shapes, bounds it (`diffit.config_check`), converts names and shapes against a
  model on the meta device, and only then reads the tensors and builds the model; every problem with the file
  is an `InvalidModelFileError` (`<file>: <problem>`), int / bool weights included;
- `load_nvlabs_file` reads a released file (safetensors; a `.pt` only through `torch.load(weights_only=True)`);
- `nvlabs_model_kwargs` reads the architecture off the tensor shapes (depth, width, heads, patch, latent size,
  classes, learned sigma), so one code path serves XL/2 at 256 and 512 px and any smaller configuration;
- `convert_nvlabs_state_dict` renames every key, checks the shapes, and verifies the fixed
  `relative_position_index` buffers equal ours before dropping them, so a released checkpoint loads strictly:
  nothing silently ignored, nothing left uninitialised;
- `to_nvlabs_state_dict` is the inverse (our model -> the released layout), used to test the conversion.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config_check import InvalidModelFileError, check_model_kwargs
from .safetensors_check import FLOAT_DTYPES, INTEGER_DTYPES, check_dtypes, read_safetensors_header

# (pattern on the released key, replacement in ours). Applied in order; the first match wins.
_RENAMES = [
    (r"^x_embedder\.proj\.", "patch_embed.proj."),
    (r"^pos_embed$", "pos_embed"),
    (r"^t_embedder\.mlp\.", "time_embed.mlp."),
    (r"^y_embedder\.embedding_table\.", "label_embed.table."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"blocks.\1.attn.qkv_spatial."),
    (r"^blocks\.(\d+)\.attn\.qkv_temb\.", r"blocks.\1.attn.qkv_time."),
    (r"^blocks\.(\d+)\.attn\.relative_position_bias_table$", r"blocks.\1.attn.relative_position_bias"),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"blocks.\1.attn.proj."),
    (r"^blocks\.(\d+)\.mlp\.fc(1|2)\.", r"blocks.\1.mlp.fc\2."),
    (r"^final_layer\.linear\.", "final_layer.linear."),
]
# Ours -> released: the inverse of `_RENAMES` (the identity renames need no entry).
_INVERSE_RENAMES = [
    (r"^patch_embed\.proj\.", "x_embedder.proj."),
    (r"^time_embed\.mlp\.", "t_embedder.mlp."),
    (r"^label_embed\.table\.", "y_embedder.embedding_table."),
    (r"^blocks\.(\d+)\.attn\.qkv_spatial\.", r"blocks.\1.attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.qkv_time\.", r"blocks.\1.attn.qkv_temb."),
    (r"^blocks\.(\d+)\.attn\.relative_position_bias$", r"blocks.\1.attn.relative_position_bias_table"),
]
_INDEX_KEY = re.compile(r"^blocks\.(\d+)\.attn\.relative_position_index$")
# The index buffers under any wrapper prefix: the only tensors of a released file that are integers.
_ANY_INDEX_KEY = re.compile(r"(^|\.)blocks\.\d+\.attn\.relative_position_index$")
# safetensors dtype names of the tensors a released file may hold -> torch dtypes (for meta tensors).
_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
}
assert set(_TORCH_DTYPES) == set(FLOAT_DTYPES) | set(INTEGER_DTYPES)
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _TORCH_DTYPES.items()}
# Prefixes a whole released file may carry (DDP's `module.`, EMA / model wrappers of training scripts).
_WRAPPER_PREFIXES = ("module.", "ema.", "model.")


def _unwrap(checkpoint: dict) -> dict:
    """Released files hold either a bare state dict or {'ema': ..., 'model': ...}; prefer the EMA weights."""
    for key in ("ema", "model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    for prefix in _WRAPPER_PREFIXES:
        if checkpoint and all(key.startswith(prefix) for key in checkpoint):
            return {key.removeprefix(prefix): value for key, value in checkpoint.items()}
    return checkpoint


def _is_index(name: str) -> bool:
    return bool(_ANY_INDEX_KEY.search(name))


def load_nvlabs_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The released state dict of `path`: safetensors through `safetensors.torch.load_file` (the released
    format), a `.pt` / `.pth` file through `torch.load(weights_only=True)`; wrappers removed (see `_unwrap`).
    Floating weights only (integer relative-position index buffers aside); `InvalidModelFileError` otherwise."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        read_safetensors_header(path)  # a clear message for an empty, truncated or garbled file
        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise InvalidModelFileError(path, f"cannot read the weights ({error})") from None
    else:
        import pickle
        import zipfile

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as error:
            raise InvalidModelFileError(
                path, f"not a tensors-only torch file ({type(error).__name__}: {error})"
            ) from None
    if not isinstance(state, dict):
        raise InvalidModelFileError(path, f"expected a state dict of tensors, got {type(state).__name__}")
    state = _unwrap(state)
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InvalidModelFileError(path, f"entry {name!r} is a {type(value).__name__}, not a tensor")
    dtypes = {name: _SAFETENSORS_NAMES.get(value.dtype, str(value.dtype)) for name, value in state.items()}
    check_dtypes(path, dtypes, _is_index)
    return state


def released_layout(path: str | Path) -> dict[str, torch.Tensor]:
    """The names, shapes and dtypes of a released file as meta tensors (unwrapped), without reading a tensor:
    for safetensors from its header (checked against the file size; floating weights, integer index buffers).
    A `.pt` has no header: it is loaded (`load_nvlabs_file`) and its tensors moved to the meta device."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {name: value.to("meta") for name, value in load_nvlabs_file(path).items()}
    header = read_safetensors_header(path)
    check_dtypes(path, {name: info["dtype"] for name, info in header.items()}, _is_index)
    return _unwrap(
        {
            name: torch.empty(info["shape"], dtype=_TORCH_DTYPES[info["dtype"]], device="meta")
            for name, info in header.items()
        }
    )


def _shape(state: dict[str, torch.Tensor], key: str, rank: int) -> tuple[int, ...]:
    """The shape of `state[key]`, which must have `rank` dimensions."""
    if key not in state:
        raise KeyError(f"released checkpoint lacks {key!r}: not the NVlabs/DiffiT latent layout")
    shape = tuple(state[key].shape)
    if len(shape) != rank:
        raise ValueError(f"{key} has shape {list(shape)}, expected {rank} dimensions")
    return shape


def _positive(**sizes: int) -> None:
    """The sizes read off the shapes are the architecture: none may be zero (a zero-element tensor)."""
    for what, size in sizes.items():
        if size < 1:
            raise ValueError(f"{what} read off the tensor shapes is {size}")


def nvlabs_model_kwargs(checkpoint: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`LatentDiffiT` constructor arguments of a released state dict, read off its tensor shapes.

    hidden / in_channels / patch from `x_embedder.proj.weight` [hidden, C, p, p]; the token grid from `pos_embed`
    [1, grid^2, hidden]; heads from the bias table [(2 grid - 1)^2, heads]; depth from the block indices; classes
    from the label table (num_classes + 1 null row); learned sigma from the final layer (p^2 * 2C outputs);
    mlp ratio from `fc1`.
    """
    state = _unwrap(checkpoint)
    hidden, channels, patch, _ = _shape(state, "x_embedder.proj.weight", 4)
    tokens = _shape(state, "pos_embed", 3)[1]
    heads = _shape(state, "blocks.0.attn.relative_position_bias_table", 2)[1]
    outputs = _shape(state, "final_layer.linear.weight", 2)[0]
    mlp_hidden = _shape(state, "blocks.0.mlp.fc1.weight", 2)[0]
    _positive(hidden_size=hidden, in_channels=channels, patch_size=patch, tokens=tokens, num_heads=heads)
    _positive(final_layer_outputs=outputs, mlp_hidden=mlp_hidden)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"pos_embed holds {tokens} tokens, not a square grid")
    depth = 1 + max(int(match.group(1)) for key in state if (match := re.match(r"^blocks\.(\d+)\.", key)))
    if outputs not in (patch * patch * channels, patch * patch * 2 * channels):
        raise ValueError(f"final_layer has {outputs} outputs, expected p^2 C or p^2 2C with p={patch}, C={channels}")
    table_rows = (
        _shape(state, "y_embedder.embedding_table.weight", 2)[0] if "y_embedder.embedding_table.weight" in state else 0
    )
    return {
        "depth": depth,
        "hidden_size": hidden,
        "num_heads": heads,
        "patch_size": patch,
        "input_size": grid * patch,
        "in_channels": channels,
        "num_classes": max(table_rows - 1, 0),
        "learn_sigma": outputs == patch * patch * 2 * channels,
        "mlp_ratio": mlp_hidden / hidden,
    }


def _expected_index(model: nn.Module, block: str) -> torch.Tensor:
    """Our relative-position index of `block` (computed afresh when the model lives on the meta device)."""
    buffer = dict(model.named_buffers())[f"blocks.{block}.attn.relative_position_index"]
    if buffer.is_meta:
        from .layers import relative_position_index

        with torch.device("cpu"):  # real values even inside a `torch.device("meta")` block
            return relative_position_index(model.grid_size)
    return buffer


def convert_nvlabs_state_dict(checkpoint: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """Released-layout state dict -> `model`'s layout. Raises on unknown keys, shape mismatches, or a
    relative-position index that differs from ours (that would mean a different window layout)."""
    ours = model.state_dict()
    converted: dict[str, torch.Tensor] = {}
    for key, value in _unwrap(checkpoint).items():
        key = key.removeprefix("module.")
        index_match = _INDEX_KEY.match(key)
        if index_match:
            tokens = model.grid_size**2
            if tuple(value.shape) != (tokens, tokens):
                raise ValueError(f"{key}: shape {list(value.shape)} != [{tokens}, {tokens}] of this model's token grid")
            if not value.is_meta:  # values are checked once they are read (a meta value has none)
                expected = _expected_index(model, index_match.group(1))
                if not torch.equal(value.to(expected.dtype), expected):
                    raise ValueError(f"{key}: relative position index differs from this model's window layout")
            continue
        for pattern, replacement in _RENAMES:
            new_key, hits = re.subn(pattern, replacement, key)
            if hits:
                break
        else:
            raise KeyError(f"released checkpoint key {key!r} has no counterpart in LatentDiffiT")
        if new_key not in ours:
            raise KeyError(
                f"released key {key!r} maps to {new_key!r}, which this model does not have (wrong model size?)"
            )
        if ours[new_key].shape != value.shape:
            raise ValueError(
                f"{key}: shape {tuple(value.shape)} != {tuple(ours[new_key].shape)} of {new_key} "
                f"(wrong model size or resolution?)"
            )
        converted[new_key] = value
    missing = sorted(set(ours) - set(converted))
    if missing:
        raise KeyError(f"released checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}")
    return converted


def to_nvlabs_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights in the released layout, relative-position index buffers included (as the released
    `DiffiTAttention` registers them): what `convert_nvlabs_state_dict` reads back."""
    released: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        for pattern, replacement in _INVERSE_RENAMES:
            key, hits = re.subn(pattern, replacement, key)
            if hits:
                break
        released[key] = value
    for index in range(len(model.blocks)):
        released[f"blocks.{index}.attn.relative_position_index"] = _expected_index(model, str(index)).clone()
    return released


def nvlabs_model_name(kwargs: dict[str, Any]) -> str:
    """The named configuration with this architecture (depth, width, heads, patch), for the record; the full
    constructor arguments are stored beside it, so any released size loads."""
    from .models import MODEL_CONFIGS

    keys = ("depth", "hidden_size", "num_heads", "patch_size", "in_channels")
    for name, entry in MODEL_CONFIGS.items():
        if entry["family"] == "latent" and all(entry["kwargs"].get(key) == kwargs[key] for key in keys):
            return name
    name = f"DiffiT-XL/{kwargs['patch_size']}"
    return name if name in MODEL_CONFIGS else "DiffiT-XL/2"


def _layout_problem(error: Exception) -> str:
    """A conversion error as the file's problem (KeyError's message without its quotes)."""
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return f"not a released NVlabs/DiffiT latent checkpoint ({message})"


def check_nvlabs_file(path: str | Path, max_parameters: int | None = None) -> tuple[str, dict[str, Any]]:
    """(model name, constructor kwargs) of a released file, every check done before a weight is read or a
    model built: the header (`released_layout`), the architecture its shapes imply against the schema and the
    parameter bound, then every name and shape against a model on the meta device."""
    from .models import create_model

    path = Path(path)
    layout = released_layout(path)
    try:
        kwargs = nvlabs_model_kwargs(layout)
    except (KeyError, ValueError) as error:
        raise InvalidModelFileError(path, _layout_problem(error)) from None
    name = nvlabs_model_name(kwargs)
    try:
        check_model_kwargs(name, kwargs, max_parameters)
    except ValueError as error:
        raise InvalidModelFileError(path, f"the architecture read off the tensor shapes is refused: {error}") from None
    try:
        with torch.device("meta"):
            convert_nvlabs_state_dict(layout, create_model(name, **kwargs))
    except (KeyError, ValueError) as error:
        raise InvalidModelFileError(path, _layout_problem(error)) from None
    return name, kwargs


def load_nvlabs_model(path: str | Path, max_parameters: int | None = None) -> tuple[nn.Module, dict[str, Any], str]:
    """(model with the released weights, its constructor kwargs, its name) of a released file, checked first
    (`check_nvlabs_file`); any problem with the file is an `InvalidModelFileError` naming it."""
    from .models import create_model

    name, kwargs = check_nvlabs_file(path, max_parameters)
    state = load_nvlabs_file(path)
    model = create_model(name, **kwargs)
    try:  # the values now: the index buffers must equal ours
        model.load_state_dict(convert_nvlabs_state_dict(state, model), strict=True)
    except (KeyError, ValueError, RuntimeError) as error:
        raise InvalidModelFileError(path, _layout_problem(error)) from None
    return model.eval(), kwargs, name


def load_nvlabs_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a released NVlabs/DiffiT file (safetensors, or a tensors-only `.pt`) into `model`, strictly."""
    model.load_state_dict(convert_nvlabs_state_dict(load_nvlabs_file(path), model), strict=True)
    return model
