"""Frozen image encoders from local files (nothing is ever downloaded): DINOv2 ViT-S/B/L/G-14, for REPA's
alignment targets (`diffit.repa`) and FD_DINOv2 (`pipeline.evaluate.dinov2`).

Weights: the official `dinov2_vit{s,b,l,g}14_pretrain.pth` state dicts (read with `torch.load(weights_only=True)`)
or timm's `model.safetensors` of `vit_{small,base,large,giant}_patch14_dinov2.lvd142m`. The architecture is read
off the state dict (width, depth, patch size, pre-training grid, MLP or SwiGLU; DINOv2's heads are 64 wide) and
built with timm's `VisionTransformer`; timm's `checkpoint_filter_fn` maps the official keys onto it (it drops
`mask_token` and renames the giant's SwiGLU `w12`/`w3`). Checkpoints with register tokens are refused. So the
published sizes and tiny random test models go through the same loader.

Position embeddings: the checkpoints hold a 37 x 37 grid (518 px). The model is built for the input size it will
see (224 px: 16 x 16 patches) and the grid is resampled once, at load, by one of two rules, because the published
numbers depend on it:
- "hub" (default): what the torch.hub DINOv2 model that dgm-eval and EDM2 run computes on the fly for every
  224-px batch (`DinoVisionTransformer.interpolate_pos_encoding`: bicubic, no antialiasing, scale factor
  (16 + 0.1) / 37, `interpolate_offset` 0.1); precomputing it gives the same tensor. FD_DINOv2 uses it.
- "timm": timm's `resample_abs_pos_embed` to 16 x 16 (bicubic, antialiased), which REPA's `load_encoders` applies
  to the hub model's `pos_embed` once before training (`utils.py`); the hub model then uses it unchanged.
At the checkpoint's own grid (518 px) both leave it untouched.

The forward pass is timm's: `forward_features` ends with the final LayerNorm, so token 0 is the hub model's
`x_norm_clstoken` (its `forward` output, dgm-eval's and EDM2's feature) and tokens 1: are `x_norm_patchtokens`
(REPA's target).

A missing file is one error naming the file to place and where the published one comes from.
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.errors import InputError, weights_only_load_problem

logger = logging.getLogger(__name__)

# Published DINOv2 backbones: name -> (timm architecture, width, depth).
DINOV2_MODELS = {
    "dinov2_vits14": ("vit_small_patch14_dinov2", 384, 12),
    "dinov2_vitb14": ("vit_base_patch14_dinov2", 768, 12),
    "dinov2_vitl14": ("vit_large_patch14_dinov2", 1024, 24),
    "dinov2_vitg14": ("vit_giant_patch14_dinov2", 1536, 40),
}
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{name}/{name}_pretrain.pth"
DINOV2_PATCH = 14
DINOV2_PRETRAIN_GRID = 37  # 518 px / 14
DINOV2_HEAD_DIM = 64  # every published size: 384 / 6, 768 / 12, 1024 / 16, 1536 / 24
HUB_INTERPOLATE_OFFSET = 0.1  # DinoVisionTransformer.interpolate_offset of the hub models
POS_EMBED_RULES = ("hub", "timm")
MAX_ENCODER_DIM = 8192
MAX_ENCODER_DEPTH = 64


class EncoderWeightsError(InputError):
    """An encoder weights file cannot be used (not a tensor state dict, not a DINOv2 ViT)."""


class MissingEncoderWeightsError(EncoderWeightsError, FileNotFoundError):
    """The encoder weights file is not there (nothing is downloaded)."""


def dinov2_file_name(name: str) -> str:
    """The published file of a DINOv2 backbone: `dinov2_vitl14` -> `dinov2_vitl14_pretrain.pth`."""
    return f"{name}_pretrain.pth"


def missing_weights_message(path: str | os.PathLike | None, name: str = "dinov2_vitl14", flag: str = "") -> str:
    """The one line that says which file is needed, where to put it and where it is published."""
    wanted = dinov2_file_name(name)
    where = f"{path} does not exist" if path is not None else f"no {name} weights given"
    how = f"pass {flag} PATH" if flag else "give its path"
    return (
        f"{where}: copy {wanted} ({DINOV2_URL.format(name=name)}, or timm's model.safetensors of "
        f"{DINOV2_MODELS[name][0]}.lvd142m) to this machine and {how}; nothing is downloaded"
    )


# ----------------------------------------------------------------------------------------------------------------
# Reading a state dict


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: `.safetensors` through safetensors, anything else through
    `torch.load(weights_only=True)` (a file that needs pickle is refused). Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingEncoderWeightsError(f"{path}: encoder weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            raise EncoderWeightsError(f"{path}: not a readable safetensors file ({type(error).__name__})") from None
    else:
        try:
            with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any failure means the file is unusable; say which and why
            raise EncoderWeightsError(f"{path}: {weights_only_load_problem(error)}") from None
    if isinstance(state, dict) and set(state) <= {"model", "state_dict", "teacher"} and len(state) == 1:
        state = next(iter(state.values()))  # a training checkpoint's single wrapped state dict
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderWeightsError(f"{path}: expected a state dict of tensors")
    return state


# ----------------------------------------------------------------------------------------------------------------
# The architecture of a DINOv2 state dict


@dataclass(frozen=True)
class DINOv2Spec:
    """The DINOv2 ViT a state dict holds, read off its tensors."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    pretrain_grid: int
    mlp_hidden: int  # fc1 / w12 output features (twice the SwiGLU width for the giant)
    swiglu: bool
    key_format: str  # "official" (facebookresearch/dinov2) or "timm"
    layer_scale_constant: bool  # every LayerScale gamma holds one value: a fresh initialisation, not trained weights

    @property
    def name(self) -> str | None:
        """The published backbone of this shape (`dinov2_vitl14`), or None."""
        for name, (_, width, depth) in DINOV2_MODELS.items():
            published = (width, depth, DINOV2_PATCH, DINOV2_PRETRAIN_GRID, width == 1536)
            if (self.embed_dim, self.depth, self.patch_size, self.pretrain_grid, self.swiglu) == published:
                return name
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "architecture": self.name or "custom DINOv2-style ViT",
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "patch_size": self.patch_size,
            "pretrain_grid": self.pretrain_grid,
            "mlp": "swiglu" if self.swiglu else "mlp",
            "key_format": self.key_format,
            "layer_scale_constant": self.layer_scale_constant,
        }


def _shape(state: dict[str, torch.Tensor], key: str, path: Any) -> tuple[int, ...]:
    if key not in state:
        raise EncoderWeightsError(f"{path}: no {key!r}: not a DINOv2 ViT state dict")
    return tuple(state[key].shape)


def dinov2_spec(state: dict[str, torch.Tensor], path: Any = "state dict") -> DINOv2Spec:
    """Read the architecture of a DINOv2 state dict (official or timm keys); EncoderWeightsError when it is not
    one (registers, missing keys, inconsistent shapes)."""
    if "register_tokens" in state or "reg_token" in state:
        raise EncoderWeightsError(f"{path}: DINOv2 with register tokens is not supported; use the plain backbone")
    cls_shape = _shape(state, "cls_token", path)
    patch_shape = _shape(state, "patch_embed.proj.weight", path)
    pos_shape = _shape(state, "pos_embed", path)
    embed_dim = cls_shape[-1]
    depth = len({int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))})
    grid = math.isqrt(max(pos_shape[1] - 1, 0)) if len(pos_shape) == 3 else 0
    if (
        len(cls_shape) != 3
        or not 1 <= embed_dim <= MAX_ENCODER_DIM
        or not 1 <= depth <= MAX_ENCODER_DEPTH
        or len(patch_shape) != 4
        or patch_shape[:2] != (embed_dim, 3)
        or patch_shape[2] != patch_shape[3]
        or grid < 1
        or pos_shape != (1, grid * grid + 1, embed_dim)
    ):
        raise EncoderWeightsError(
            f"{path}: not a DINOv2 ViT (cls_token {cls_shape}, patch_embed {patch_shape}, pos_embed {pos_shape}, "
            f"{depth} blocks)"
        )
    if embed_dim % DINOV2_HEAD_DIM and embed_dim >= DINOV2_HEAD_DIM:
        raise EncoderWeightsError(f"{path}: width {embed_dim} is not a multiple of DINOv2's {DINOV2_HEAD_DIM}-d heads")
    if "blocks.0.mlp.w12.weight" in state:  # the official giant's SwiGLU
        mlp_hidden, swiglu = _shape(state, "blocks.0.mlp.w12.weight", path)[0], True
    else:
        fc1 = _shape(state, "blocks.0.mlp.fc1.weight", path)
        fc2 = _shape(state, "blocks.0.mlp.fc2.weight", path)
        mlp_hidden, swiglu = fc1[0], fc2[1] * 2 == fc1[0]  # timm's SwiGLUPacked: fc2 takes half of fc1's output
    gammas = [value.float().flatten() for key, value in state.items() if key.endswith((".ls1.gamma", ".ls2.gamma"))]
    if not gammas:
        raise EncoderWeightsError(f"{path}: no LayerScale (ls1.gamma / ls2.gamma): not a DINOv2 ViT")
    joined = torch.cat(gammas)
    return DINOv2Spec(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=max(1, embed_dim // DINOV2_HEAD_DIM),
        patch_size=patch_shape[-1],
        pretrain_grid=grid,
        mlp_hidden=mlp_hidden,
        swiglu=swiglu,
        key_format="official" if "mask_token" in state else "timm",
        layer_scale_constant=bool((joined == joined[0]).all()),
    )


def build_dinov2(spec: DINOv2Spec, img_size: int | tuple[int, int] = 224) -> nn.Module:
    """timm's `VisionTransformer` of `spec` for inputs of `img_size` (random weights, no classifier head)."""
    from timm.layers import Mlp, SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=img_size,
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        # int(embed_dim * ratio) must give mlp_hidden exactly: half a unit of slack against rounding down
        mlp_ratio=(spec.mlp_hidden + 0.5) / spec.embed_dim,
        mlp_layer=SwiGLUPacked if spec.swiglu else Mlp,
        act_layer=nn.SiLU if spec.swiglu else nn.GELU,
        init_values=1e-5,
        num_classes=0,
        global_pool="token",
    )


# ----------------------------------------------------------------------------------------------------------------
# Position embeddings at the input grid


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], rule: str = "hub") -> torch.Tensor:
    """[1, 1 + M*M, D] position embeddings (class token first) for a patch grid (h, w), by `rule` (see the module
    docstring): "hub" as torch.hub's DINOv2 at run time, "timm" as timm's `resample_abs_pos_embed` (REPA)."""
    if rule not in POS_EMBED_RULES:
        raise ValueError(f"pos-embed rule {rule!r}; choose from {POS_EMBED_RULES}")
    count = pos_embed.shape[1] - 1
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"pos_embed of {count} patch positions is not a square grid")
    height, width = int(grid[0]), int(grid[1])
    if (height, width) == (side, side):
        return pos_embed
    if rule == "timm":
        from timm.layers import resample_abs_pos_embed

        return resample_abs_pos_embed(pos_embed, new_size=[height, width], num_prefix_tokens=1)
    # DinoVisionTransformer.interpolate_pos_encoding (facebookresearch/dinov2, interpolate_offset 0.1, no
    # antialiasing): the scale factor, not the size, sets the bicubic sampling positions.
    dtype = pos_embed.dtype
    values = pos_embed.float()
    dim = values.shape[-1]
    patches = values[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((height + HUB_INTERPOLATE_OFFSET) / side, (width + HUB_INTERPOLATE_OFFSET) / side)
    patches = nn.functional.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(patches.shape[-2:]) != (height, width):
        raise ValueError(f"hub pos-embed interpolation gave {tuple(patches.shape[-2:])}, expected {(height, width)}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, height * width, dim)
    return torch.cat([values[:, :1], patches], dim=1).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# The encoder


class DINOv2Encoder(nn.Module):
    """A frozen DINOv2 ViT (timm) for normalised [B, 3, H, W] inputs of its `img_size`.

    `forward(x)` -> the CLS token after the final norm [B, D] (the hub model's output); `patch_tokens(x)` -> the
    normed patch tokens [B, N, D] (REPA's target); `tokens(x)` -> both as a dict ("cls", "patches").
    """

    def __init__(self, vit: nn.Module, spec: DINOv2Spec, img_size: tuple[int, int], pos_embed_rule: str):
        super().__init__()
        self.vit = vit
        self.spec = spec
        self.img_size = img_size
        self.pos_embed_rule = pos_embed_rule
        self.grid = (img_size[0] // spec.patch_size, img_size[1] // spec.patch_size)
        self.eval().requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    def train(self, mode: bool = True) -> DINOv2Encoder:  # frozen: always in eval mode
        return super().train(False)

    def tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        normed = self.vit.forward_features(x)
        return {"cls": normed[:, 0], "patches": normed[:, self.vit.num_prefix_tokens :]}

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)["patches"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)["cls"]


def dinov2_from_state_dict(
    state: dict[str, torch.Tensor],
    img_size: int | tuple[int, int] = 224,
    pos_embed_rule: str = "hub",
    path: Any = "state dict",
) -> DINOv2Encoder:
    """A `DINOv2Encoder` of `state` (official or timm keys) for inputs of `img_size`."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    spec = dinov2_spec(state, path)
    size = (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))
    if size[0] % spec.patch_size or size[1] % spec.patch_size:
        raise EncoderWeightsError(f"{path}: input size {size} is not a multiple of the patch size {spec.patch_size}")
    vit = build_dinov2(spec, size)
    state = dict(state)
    grid = (size[0] // spec.patch_size, size[1] // spec.patch_size)
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], grid, pos_embed_rule)
    converted = checkpoint_filter_fn(state, vit)
    try:
        vit.load_state_dict(converted, strict=True)
    except RuntimeError as error:
        raise EncoderWeightsError(f"{path}: does not fit a DINOv2 ViT ({' '.join(str(error).split())[:300]})") from None
    return DINOv2Encoder(vit, spec, size, pos_embed_rule)


def load_dinov2(
    path: str | os.PathLike | None,
    img_size: int | tuple[int, int] = 224,
    pos_embed_rule: str = "hub",
    name: str = "dinov2_vitl14",
    flag: str = "",
) -> DINOv2Encoder:
    """The DINOv2 encoder of the weights file `path` (see the module docstring). Without the file: one
    `MissingEncoderWeightsError` naming the file `name` needs (and the command-line `flag` that takes it)."""
    if path is None or not Path(path).is_file():
        raise MissingEncoderWeightsError(missing_weights_message(path, name, flag))
    return dinov2_from_state_dict(read_state_dict(path), img_size, pos_embed_rule, path)


__all__ = [
    "DINOV2_MODELS",
    "DINOv2Encoder",
    "DINOv2Spec",
    "EncoderWeightsError",
    "MissingEncoderWeightsError",
    "build_dinov2",
    "dinov2_from_state_dict",
    "dinov2_spec",
    "load_dinov2",
    "missing_weights_message",
    "read_state_dict",
    "resample_pos_embed",
]
