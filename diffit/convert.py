"""Load checkpoints of the released NVlabs/DiffiT latent model into `LatentDiffiT`.

The released code (`diffit/diffit.py` of NVlabs/DiffiT) names its modules after DiT / timm (`x_embedder.proj`,
`t_embedder.mlp`, `y_embedder.embedding_table`, `blocks.i.attn.qkv`, `blocks.i.attn.qkv_temb`,
`relative_position_bias_table`, ...) and ships the weights as flat safetensors files (`diffit_256.safetensors`,
`diffit_512.safetensors`), read with `safetensors.torch.load_file`, never unpickled.

- `load_nvlabs_file` reads a released file (safetensors; a `.pt` only through `torch.load(weights_only=True)`);
- `nvlabs_model_kwargs` reads the architecture off the tensor shapes (depth, width, heads, patch, latent size,
  classes, learned sigma), so one code path serves XL/2 at 256 and 512 px and any smaller configuration;
- `convert_nvlabs_state_dict` renames every key, checks the shapes, and verifies the fixed
  `relative_position_index` buffers equal ours before dropping them, so a released checkpoint loads strictly:
  nothing silently ignored, nothing left uninitialised;
- `to_nvlabs_state_dict` is the inverse (our model -> the released layout), used to test the conversion.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


def load_nvlabs_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The released state dict of `path`: safetensors through `safetensors.torch.load_file` (the released
    format), a `.pt` / `.pth` file through `torch.load(weights_only=True)`; wrappers removed (see `_unwrap`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return _unwrap(state)


def _shape(state: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise KeyError(f"released checkpoint lacks {key!r}: not the NVlabs/DiffiT latent layout")
    return tuple(state[key].shape)


def nvlabs_model_kwargs(checkpoint: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`LatentDiffiT` constructor arguments of a released state dict, read off its tensor shapes.

    hidden / in_channels / patch from `x_embedder.proj.weight` [hidden, C, p, p]; the token grid from `pos_embed`
    [1, grid^2, hidden]; heads from the bias table [(2 grid - 1)^2, heads]; depth from the block indices; classes
    from the label table (num_classes + 1 null row); learned sigma from the final layer (p^2 * 2C outputs);
    mlp ratio from `fc1`.
    """
    state = _unwrap(checkpoint)
    hidden, channels, patch, _ = _shape(state, "x_embedder.proj.weight")
    tokens = _shape(state, "pos_embed")[1]
    grid = round(tokens**0.5)
    if grid * grid != tokens:
        raise ValueError(f"pos_embed holds {tokens} tokens, not a square grid")
    depth = 1 + max(int(match.group(1)) for key in state if (match := re.match(r"^blocks\.(\d+)\.", key)))
    heads = _shape(state, "blocks.0.attn.relative_position_bias_table")[1]
    outputs = _shape(state, "final_layer.linear.weight")[0]
    if outputs not in (patch * patch * channels, patch * patch * 2 * channels):
        raise ValueError(f"final_layer has {outputs} outputs, expected p^2 C or p^2 2C with p={patch}, C={channels}")
    table_rows = (
        _shape(state, "y_embedder.embedding_table.weight")[0] if "y_embedder.embedding_table.weight" in state else 0
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
        "mlp_ratio": _shape(state, "blocks.0.mlp.fc1.weight")[0] / hidden,
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
            expected = _expected_index(model, index_match.group(1))
            if not value.is_meta and not torch.equal(value.to(expected.dtype), expected):
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


def load_nvlabs_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a released NVlabs/DiffiT file (safetensors, or a tensors-only `.pt`) into `model`, strictly."""
    model.load_state_dict(convert_nvlabs_state_dict(load_nvlabs_file(path), model), strict=True)
    return model
