"""REPA's stored targets in a latent dataset (`diffit-pipe encode --encoder-targets`, `repa.targets: stored`): the
manifest entry that describes them and its checks. The member itself is `pipeline.core.shard_members.REPA_MEMBER`
(`repa.npy`, float16 [2, N, D]: index 0 the encoder's patch tokens of the crop, index 1 those of its horizontal
flip, as the latents' views), covered by its shard's sha256 like every other member.

The manifest entry (`manifest["repa_targets"]`):

    encoder         the encoder's name (`pipeline.core.target_encoders.ENCODERS`, as `repa.encoder`)
    weights_sha256  `target_encoders.weights_sha256` of the weights the targets were computed with
    input_grid      the model token grid [h, w] the encoder's input size was chosen for (DINOv2: h x 14 px), or
                    null when the input does not depend on it (the demo classifier)
    grid            the grid [h, w] of the stored tokens (N = h * w, row-major)
    dtype, shape    "float16", [2, N, D]

A dataset may come from anyone: every value is checked and bounded (`targets_entry_problems`, run by
`pipeline.core.manifest.check_manifest_values`) before a reader relies on it, and the loader compares every member
with `shape` and `dtype` (`pipeline.train.sample_decoding`) after the bounded `.npy` read.
"""

from __future__ import annotations

import re
from typing import Any

REPA_TARGETS_KEY = "repa_targets"
TARGETS_DTYPE = "float16"
MAX_TARGET_GRID = 256  # tokens per side: DINOv2 at 3584 px; far above any model's token grid
MAX_TARGET_DIM = 8192  # `pipeline.core.encoders.MAX_ENCODER_DIM`: the widest encoder the loader builds


def targets_entry(
    encoder: str,
    weights_sha256: str,
    input_grid: tuple[int, int] | None,
    grid: tuple[int, int],
    embed_dim: int,
) -> dict[str, Any]:
    """The manifest entry of targets of `encoder` (weights `weights_sha256`), sized for the model token grid
    `input_grid`, stored on the encoder's `grid` with `embed_dim` channels."""
    return {
        "encoder": encoder,
        "weights_sha256": weights_sha256,
        "input_grid": list(input_grid) if input_grid is not None else None,
        "grid": list(grid),
        "dtype": TARGETS_DTYPE,
        "shape": [2, int(grid[0]) * int(grid[1]), int(embed_dim)],
        "flip": "index 0 = the crop, index 1 = its horizontal flip",
    }


def _is_side(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_TARGET_GRID


def _is_grid(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_side(side) for side in value)


def targets_entry_problems(entry: Any) -> list[str]:
    """What is wrong with a manifest's `repa_targets` entry; [] when every field is there and within bounds."""
    from pipeline.core.target_encoders import ENCODERS

    if not isinstance(entry, dict):
        return [f"{REPA_TARGETS_KEY} is not an object"]
    problems = []
    if entry.get("encoder") not in ENCODERS:
        problems.append(f"{REPA_TARGETS_KEY}.encoder {str(entry.get('encoder'))[:40]!r} is not one of {ENCODERS}")
    sha = entry.get("weights_sha256")
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha, re.ASCII)):
        problems.append(f"{REPA_TARGETS_KEY}.weights_sha256 is not a hex sha256")
    if entry.get("input_grid") is not None and not _is_grid(entry.get("input_grid")):
        problems.append(f"{REPA_TARGETS_KEY}.input_grid is not null or [h, w] within 1..{MAX_TARGET_GRID}")
    grid = entry.get("grid")
    if not _is_grid(grid):
        return [*problems, f"{REPA_TARGETS_KEY}.grid is not [h, w] within 1..{MAX_TARGET_GRID}"]
    if entry.get("dtype") != TARGETS_DTYPE:
        problems.append(f"{REPA_TARGETS_KEY}.dtype {str(entry.get('dtype'))[:20]!r} is not {TARGETS_DTYPE!r}")
    shape = entry.get("shape")
    dims_ok = isinstance(shape, list) and len(shape) == 3 and all(isinstance(n, int) for n in shape)
    if not (dims_ok and shape[:2] == [2, grid[0] * grid[1]] and 1 <= shape[2] <= MAX_TARGET_DIM):
        problems.append(
            f"{REPA_TARGETS_KEY}.shape {str(shape)[:40]} is not [2, grid h * w, D] with D within 1..{MAX_TARGET_DIM}"
        )
    return problems


def targets_shape(entry: dict[str, Any]) -> tuple[int, int, int]:
    """The [2, N, D] shape of every stored member of a checked entry."""
    return tuple(int(n) for n in entry["shape"])


__all__ = [
    "MAX_TARGET_DIM",
    "MAX_TARGET_GRID",
    "REPA_TARGETS_KEY",
    "TARGETS_DTYPE",
    "targets_entry",
    "targets_entry_problems",
    "targets_shape",
]
