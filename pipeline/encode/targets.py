"""REPA's targets stored by the encode job (`diffit-pipe encode --encoder-targets ENCODER --encoder-weights PATH`):
what the driver resolves once (`resolve_targets`: the encoder's weights hashed, the encoder loaded once to check
the file and read the width and grid of its tokens) and what each worker runs (`encode_targets`: the encoder on
a batch of crops and their horizontal flips, float32 [B, 2, N, D], row 1 the flip as the latents' view 1).

The encoder is `pipeline.core.target_encoders.load_target_encoder`, the very module the trainer runs with
`repa.targets: online`, built for the model token grid `--token-grid` (DINOv2's input = grid x 14 px; default
latent size / 2, the /2 models: REPA's 224 px for 32 x 32 latents). It is loaded once per worker process
(`_worker_encoder`, cached like the VAE) on the worker's device. The targets enter the shard fingerprints and the
dataset's identity only when set, so the fingerprints of datasets encoded without them are unchanged.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.stored_targets import MAX_TARGET_GRID, targets_entry
from pipeline.core.target_encoders import DEMO_CLASSIFIER, ENCODE_SETTINGS, ENCODERS, input_grid

logger = logging.getLogger(__name__)

# The default model patch size the targets are sized for: REPA's and DiT's /2 models.
DEFAULT_PATCH = 2
_ENCODER_LOCK = threading.Lock()


@dataclass(frozen=True)
class TargetsSpec:
    """The stored targets of one job: the encoder, its weights (path and sha256), the model token grid its input
    is sized for, and the grid and width of its tokens."""

    encoder: str
    weights: str
    weights_sha256: str
    token_grid: tuple[int, int]
    grid: tuple[int, int]
    embed_dim: int

    def identity(self) -> dict[str, Any]:
        """What makes the targets these (the shard fingerprints and the dataset identity): not the weights' path."""
        grid = input_grid(self.encoder, self.token_grid)
        return {"encoder": self.encoder, "weights_sha256": self.weights_sha256, "input_grid": _listed(grid)}

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's `repa_targets` (`pipeline.core.stored_targets`)."""
        return targets_entry(
            self.encoder, self.weights_sha256, input_grid(self.encoder, self.token_grid), self.grid, self.embed_dim
        )


def _listed(grid: tuple[int, int] | None) -> list[int] | None:
    return list(grid) if grid is not None else None


def targets_problem(encoder: str | None, weights: str | None, token_grid: int | None, kind: str) -> str | None:
    """Why the targets settings cannot work (the flag to change), or None."""
    if encoder is None:
        if weights is not None or token_grid is not None:
            return "--encoder-weights and --token-grid go with --encoder-targets ENCODER"
        return None
    if kind != "latents":
        return "--encoder-targets stores REPA's targets beside latents; `pack` writes images"
    if encoder not in ENCODERS:
        return f"--encoder-targets must be one of {', '.join(ENCODERS)} (repa.encoder's names), got {encoder!r}"
    if weights is None:
        return f"--encoder-targets {encoder} needs --encoder-weights PATH (nothing is downloaded)"
    if token_grid is not None and encoder == DEMO_CLASSIFIER:
        return "--token-grid sizes DINOv2's input; the demo classifier reads its own resolution (leave it out)"
    if token_grid is not None and not 1 <= token_grid <= MAX_TARGET_GRID:
        return f"--token-grid must be within 1..{MAX_TARGET_GRID}, got {token_grid}"
    return None


def default_token_grid(latent_size: int) -> int:
    """The token grid of a /2 model on `latent_size` latents (REPA: 16 tokens for 32 x 32 latents)."""
    return max(1, latent_size // DEFAULT_PATCH)


def resolve_targets(
    encoder: str | None, weights: str | None, token_grid: int | None, latent_size: int
) -> TargetsSpec | None:
    """The job's targets (None without --encoder-targets): weights hashed, the encoder loaded once on CPU (a bad
    file fails here, before any work) for its token grid and width. Raises TargetEncoderError / JobError lines."""
    from pipeline.core.target_encoders import TargetEncoderError, load_target_encoder, weights_sha256

    if encoder is None:
        return None
    side = token_grid if token_grid is not None else default_token_grid(latent_size)
    if encoder != DEMO_CLASSIFIER and latent_size % side:
        raise TargetEncoderError(
            f"--token-grid {side} does not divide the latent size {latent_size}: the grid is the latent size / the "
            "model's patch size"
        )
    digest = weights_sha256(encoder, weights, ENCODE_SETTINGS[1])
    module = load_target_encoder(encoder, weights, (side, side), ENCODE_SETTINGS)
    # Absolute, as the source, OUT and --vae: the workers of a running cluster start in other directories.
    path = str(Path(weights).resolve())
    spec = TargetsSpec(encoder, path, digest, (side, side), tuple(module.grid), int(module.embed_dim))
    logger.info("REPA targets: %s, %s x %s tokens of %d channels per view", encoder, *spec.grid, spec.embed_dim)
    return spec


@functools.lru_cache(maxsize=4)
def _worker_encoder(encoder: str, weights: str, token_grid: tuple[int, int], device: str):
    """The frozen encoder of this worker process, loaded once per (encoder, weights, grid, device)."""
    from pipeline.core.target_encoders import load_target_encoder

    return load_target_encoder(encoder, weights, token_grid, ENCODE_SETTINGS).to(device)


def encode_targets(spec: TargetsSpec, pixels: np.ndarray, device: str) -> np.ndarray:
    """The encoder's tokens of uint8 crops [B, R, R, 3] and of their horizontal flips: float32 [B, 2, N, D]."""
    import torch

    with _ENCODER_LOCK:  # one load per process, even when a worker runs several tasks on threads
        module = _worker_encoder(spec.encoder, spec.weights, spec.token_grid, device)
    images = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
    both = torch.cat([images, images.flip(-1)]).to(device)
    with torch.no_grad():
        tokens = module(both).float().cpu().numpy()
    count = len(pixels)
    return np.stack([tokens[:count], tokens[count:]], axis=1)


__all__ = ["DEFAULT_PATCH", "TargetsSpec", "default_token_grid", "encode_targets", "resolve_targets", "targets_problem"]
