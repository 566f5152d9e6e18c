"""REPA's representation alignment (Yu et al. 2024, `sihyun-yu/REPA`) as pure tensor math: the projection loss, the
projector, the encoder's input and the matching of token grids. The frozen encoders themselves (DINOv2 from local
files) are loaded by `pipeline.core.encoders`; this module imports nothing of the pipeline.

- `repa_loss(target, projected)`: REPA's `loss.py` projection loss for one encoder: both [B, N, D] tensors are
  L2-normalised along D (`F.normalize`, as REPA) and the loss is minus the mean over batch and tokens of their dot
  product, i.e. -mean cosine similarity (REPA sums over encoders and divides by their number; one encoder here).
- `build_projector(hidden_size, projector_dim, z_dim)`: REPA's `build_mlp` (`models/sit.py`),
  Linear-SiLU-Linear-SiLU-Linear, applied token by token to the hidden states of the model's `encoder_depth`-th
  block (REPA: projector_dim 2048, z_dim the encoder's width, e.g. 768 for DINOv2-B).
- `encoder_input(images, size)`: REPA's `preprocess_raw_image` for DINOv2 (`train.py`): pixels in [0, 255] -> /255
  -> ImageNet mean / std -> bicubic resize to `size` (REPA: 224 * (resolution // 256), so that a 256-px image gives
  16 x 16 patches of 14 px, the token grid of a /2 model on 32 x 32 latents), in that order and without
  antialiasing, as REPA does it.
- `match_token_grid(target, grid)`: when the encoder's patch grid differs from the model's token grid, the
  ENCODER side (the target) is resized, bilinearly on its [B, D, h, w] grid. The target is a frozen, gradient-free
  feature map, so resizing it only changes what is aligned to; resizing the model's side instead would make each
  projected token a blend of several of the model's tokens and spread the alignment gradient across them, and the
  one-token-to-one-patch correspondence REPA trains would be lost. REPA itself avoids the case by choosing the
  encoder's input size (`encoder_input_size`): 224 px at 256 (16 x 16 = DiT /2 tokens), 448 px at 512.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REPA_PROJECTOR_DIM = 2048


def repa_loss(target: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
    """-mean over batch and tokens of the cosine similarity of `target` and `projected`, both [B, N, D]: REPA's
    projection loss for one encoder (a scalar in [-1, 1]; -1 when every projected token points along its target)."""
    if target.ndim != 3 or target.shape != projected.shape:
        raise ValueError(
            f"repa_loss: target and projected must both be [B, N, D], got {tuple(target.shape)} and "
            f"{tuple(projected.shape)}"
        )
    target = F.normalize(target.float(), dim=-1)
    projected = F.normalize(projected.float(), dim=-1)
    return -(target * projected).sum(dim=-1).mean()


def build_projector(hidden_size: int, projector_dim: int = REPA_PROJECTOR_DIM, z_dim: int = 768) -> nn.Sequential:
    """REPA's projector (`build_mlp`): Linear(hidden, proj) - SiLU - Linear(proj, proj) - SiLU - Linear(proj, z),
    applied to each token: [..., hidden_size] -> [..., z_dim]."""
    for name, value in (("hidden_size", hidden_size), ("projector_dim", projector_dim), ("z_dim", z_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"build_projector: {name} must be a positive integer, got {value!r}")
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def encoder_input_size(token_grid: int, patch_size: int = 14) -> int:
    """The encoder input size whose patch grid equals the model's token grid (REPA: 16 tokens -> 224 px)."""
    return token_grid * patch_size


def encoder_input(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """REPA's DINOv2 preprocessing of [B, 3, H, W] images with values in [0, 255] (uint8 or float): /255, ImageNet
    normalisation, then bicubic resize to `size` (no antialiasing), in REPA's order."""
    x = images.float() / 255.0
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic")
    return x


def token_grid(tokens: torch.Tensor, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (h, w) grid of [B, N, D] tokens: `grid` when given (checked), else the square one N = h * h."""
    count = tokens.shape[1]
    if grid is None:
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"{count} tokens are not a square grid; give the grid (h, w)")
        return side, side
    if grid[0] * grid[1] != count:
        raise ValueError(f"grid {tuple(grid)} does not hold {count} tokens")
    return int(grid[0]), int(grid[1])


def match_token_grid(
    target: torch.Tensor, grid: tuple[int, int], source_grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """The encoder's [B, N, D] patch tokens (on `source_grid`, square by default) resized to the model's token
    `grid` (h, w): unchanged when the grids agree, else bilinear interpolation of the [B, D, h, w] feature map
    (antialiased when shrinking, so every source patch contributes). Returns [B, h * w, D]."""
    if target.ndim != 3:
        raise ValueError(f"match_token_grid: target must be [B, N, D], got {tuple(target.shape)}")
    height, width = token_grid(target, source_grid)
    grid = (int(grid[0]), int(grid[1]))
    if (height, width) == grid:
        return target
    batch, _, dim = target.shape
    maps = target.transpose(1, 2).reshape(batch, dim, height, width)
    shrink = grid[0] < height or grid[1] < width
    resized = F.interpolate(maps.float(), size=grid, mode="bilinear", align_corners=False, antialias=shrink)
    return resized.to(target.dtype).reshape(batch, dim, grid[0] * grid[1]).transpose(1, 2)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "REPA_PROJECTOR_DIM",
    "build_projector",
    "encoder_input",
    "encoder_input_size",
    "match_token_grid",
    "repa_loss",
    "token_grid",
]
