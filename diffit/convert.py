"""Load checkpoints of the released NVlabs/DiffiT latent model into `LatentDiffiT`.

The released code names its modules after DiT / timm (`x_embedder.proj`, `t_embedder.mlp`, `blocks.i.attn.qkv`,
`blocks.i.attn.qkv_temb`, `relative_position_bias_table`, ...). `convert_nvlabs_state_dict` renames every key,
checks the shapes, and verifies the fixed `relative_position_index` buffers equal ours before dropping them, so
a released checkpoint loads strictly: nothing silently ignored, nothing left uninitialised.
"""

from __future__ import annotations

import re

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
_INDEX_KEY = re.compile(r"^blocks\.(\d+)\.attn\.relative_position_index$")


def _unwrap(checkpoint: dict) -> dict:
    """Released files hold either a bare state dict or {'ema': ..., 'model': ...}; prefer the EMA weights."""
    for key in ("ema", "model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], dict):
            return checkpoint[key]
    return checkpoint


def convert_nvlabs_state_dict(checkpoint: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """Released-layout state dict -> `model`'s layout. Raises on unknown keys, shape mismatches, or a
    relative-position index that differs from ours (that would mean a different window layout)."""
    ours = model.state_dict()
    buffers = dict(model.named_buffers())
    converted: dict[str, torch.Tensor] = {}
    for key, value in _unwrap(checkpoint).items():
        key = key.removeprefix("module.")
        index_match = _INDEX_KEY.match(key)
        if index_match:
            expected = buffers[f"blocks.{index_match.group(1)}.attn.relative_position_index"]
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


def load_nvlabs_checkpoint(model: nn.Module, path: str) -> nn.Module:
    """Load a released NVlabs/DiffiT `.pt` file (tensors only: `weights_only=True`) into `model`, strictly."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(convert_nvlabs_state_dict(checkpoint, model), strict=True)
    return model
