"""FD_DINOv2 (Stein et al. 2023, dgm-eval; EDM2's `calculate_metrics.py`): the Fréchet distance between the DINOv2
ViT-L/14 CLS features of the samples and of the reference.

Features as dgm-eval computes them, in EDM2's "torch" resize mode (which EDM2 describes as yielding almost the same
results as dgm-eval's PIL resize): uint8 images -> float32 -> bicubic resize to 224 x 224 with antialiasing ->
/255 -> ImageNet mean / std -> the CLS token after the final LayerNorm (the torch.hub model's output), position
embeddings interpolated as the hub model does at 224 px (`pipeline.core.encoders`, rule "hub"). The distance is
FID's (`adm.frechet_distance`, float64), the statistics float64 (`adm.RunningMoments`).

Weights come from `--dinov2-weights PATH` only (nothing is downloaded) and are identified by their SHA-256. This
project does not pin the SHA-256 of the published `dinov2_vitl14_pretrain.pth` (it could not be checked here), so a
file is taken for the published backbone when (a) it has the ViT-L/14 architecture, (b) its name is the published
one (`dinov2_vitl14_pretrain.pth`, or a `.safetensors` under a path naming timm's `vit_large_patch14_dinov2`) and
(c) its LayerScale gammas are not all equal (a fresh initialisation has them all equal). Anything else (random
test weights, another size, a renamed file) gives a value labelled plumbing-only, never FD_DINOv2.

The metric itself, with its reference statistics, is `pipeline.evaluate.fd_dinov2`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.core.encoders import DINOv2Encoder, dinov2_spec, load_dinov2, read_state_dict
from pipeline.core.shards import sha256_file

logger = logging.getLogger(__name__)

FD_DINOV2 = "fd_dinov2"
DINOV2_MODEL = "dinov2_vitl14"
DINOV2_FILE_NAME = "dinov2_vitl14_pretrain.pth"
DINOV2_TIMM_NAME = "vit_large_patch14_dinov2"
DINOV2_LAYER = "dinov2_vitl14_cls"  # the features' name in caches and metrics.json
DINOV2_INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESSING = "uint8 -> float32 bicubic 224x224 (antialias) -> /255 -> ImageNet mean/std (EDM2 'torch' mode)"
SHA256_NOTE = "the published file's sha256 is not pinned in this project: identified by name and architecture only"


@dataclass(frozen=True)
class DINOv2Weights:
    """The DINOv2 weights file FD_DINOv2 uses: its hash, architecture, and whether it is taken for the published
    ViT-L/14 (`recognised`; `problems` says why not)."""

    path: Path
    sha256: str
    architecture: dict[str, Any]
    problems: tuple[str, ...] = field(default=())

    @property
    def recognised(self) -> bool:
        return not self.problems

    @property
    def label(self) -> str:
        if self.recognised:
            return f"FD_DINOv2 with {self.path.name} (DINOv2 ViT-L/14; {SHA256_NOTE})"
        return f"plumbing-only (DINOv2 weights {self.path.name} not the published ViT-L/14: {'; '.join(self.problems)})"

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "file_name": self.path.name,
            "sha256": self.sha256,
            "sha256_pinned": False,
            "recognised_as_published": self.recognised,
            "problems": list(self.problems),
            "architecture": self.architecture,
            "label": self.label,
            "note": SHA256_NOTE,
        }


def _name_matches(path: Path) -> bool:
    if path.name == DINOV2_FILE_NAME:
        return True
    return path.suffix == ".safetensors" and DINOV2_TIMM_NAME in path.resolve().as_posix()


def resolve_dinov2_weights(path: str | os.PathLike | None) -> DINOv2Weights:
    """Find, safety-check (weights-only load), hash and identify the FD_DINOv2 weights, before any sampling. A
    missing file is one `MissingEncoderWeightsError` naming the file to place and the flag."""
    from pipeline.core.encoders import MissingEncoderWeightsError, missing_weights_message

    if path is None or not Path(path).is_file():
        raise MissingEncoderWeightsError(
            f"fd_dinov2: {missing_weights_message(path, DINOV2_MODEL, '--dinov2-weights')}"
        )
    path = Path(path)
    spec = dinov2_spec(read_state_dict(path), path)
    problems = []
    if spec.name != DINOV2_MODEL:
        problems.append(f"architecture {spec.name or 'custom'} (width {spec.embed_dim}, depth {spec.depth})")
    if not _name_matches(path):
        problems.append(f"file name is not {DINOV2_FILE_NAME}")
    if spec.layer_scale_constant:
        problems.append("LayerScale gammas all equal (freshly initialised, not trained)")
    weights = DINOv2Weights(path.resolve(), sha256_file(path), spec.describe(), tuple(problems))
    if problems:
        logger.warning("DINOv2 weights %s: FD_DINOv2 will be labelled %r", path, weights.label)
    return weights


# ----------------------------------------------------------------------------------------------------------------
# The feature extractor


def preprocess(images: torch.Tensor, size: int = DINOV2_INPUT_SIZE) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> the DINOv2 input: EDM2's "torch" mode of dgm-eval's transform."""
    x = F.interpolate(images.to(torch.float32), size=(size, size), mode="bicubic", antialias=True)
    x = x / 255
    mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class DINOv2Features(torch.nn.Module):
    """uint8 images -> {DINOV2_LAYER: CLS features [B, D]} (the interface of the Inception extractors)."""

    def __init__(self, encoder: DINOv2Encoder):
        super().__init__()
        self.encoder = encoder
        self.size = encoder.img_size[0]

    def get_requested_features_list(self) -> list[str]:
        return [DINOV2_LAYER]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {DINOV2_LAYER: self.encoder(preprocess(images, self.size)).float()}


@dataclass
class DINOv2Config:
    """How FD_DINOv2 features are computed (duck-types `FeatureConfig` for the reference caches)."""

    weights: DINOv2Weights
    batch_size: int = 64
    cuda: bool = False
    num_workers: int = 0
    progress: bool = True

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.cuda else "cpu")

    def extractor_identity(self) -> dict[str, Any]:
        """What the features depend on (the cache key): weights content, preprocessing, pos-embed rule."""
        import timm

        return {
            "name": f"{DINOV2_MODEL}-cls",
            "weights_sha256": self.weights.sha256,
            "preprocessing": PREPROCESSING,
            "pos_embed": "hub",
            "timm": timm.__version__,
            "internal_dtype": "float32",
        }


def create_dinov2_extractor(config: DINOv2Config) -> DINOv2Features:
    encoder = load_dinov2(config.weights.path, DINOV2_INPUT_SIZE, "hub", DINOV2_MODEL, "--dinov2-weights")
    return DINOv2Features(encoder).to(config.device)


__all__ = [
    "DINOV2_LAYER",
    "FD_DINOV2",
    "DINOv2Config",
    "DINOv2Features",
    "DINOv2Weights",
    "create_dinov2_extractor",
    "preprocess",
    "resolve_dinov2_weights",
]
