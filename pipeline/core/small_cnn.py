"""The demo's small CNN classifier as a network and a file (`pipeline.demo.classifier` trains it and uses it as the
class-consistency yardstick and FD_demo's feature extractor): its configuration, the network, loading a saved one,
and `ClassifierPatchEncoder`, its last feature map as per-patch tokens (REPA's targets at demo scale,
`pipeline.train.repa`). It lives in `core` because the trainer, a layer below the demo, loads it.

The network is four 3x3 conv stages (GroupNorm, SiLU, 2x2 max-pool after the first three), global average
pooling and a linear head. GroupNorm instead of BatchNorm makes a prediction independent of the other images in
its batch and identical in training and evaluation mode. Saved as a directory: `model.safetensors` +
`config.json` (architecture, class names, training report).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.errors import InputError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_TYPE = "diffit-pipe-class-consistency-cnn"


class ClassifierError(InputError):
    """Unusable classifier input: unlabelled data, missing or damaged classifier directory, bad image arrays."""


@dataclass
class ClassifierConfig:
    """Architecture of the classifier and what it was trained on."""

    num_classes: int
    resolution: int = 32
    channels: tuple[int, ...] = (32, 64, 64, 64)
    groups: int = 8
    class_names: list[str] = field(default_factory=list)
    # Judge luminance only: every input is converted to grey first, so the class must be told from shape and
    # texture, not colour (the demo's "shape consistency").
    grayscale: bool = False


class SmallCNN(nn.Module):
    """Conv stages (conv3x3 -> GroupNorm -> SiLU, max-pool between stages) -> global average pool -> linear."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        in_channels = 3
        for stage, channels in enumerate(config.channels):
            layers += [nn.Conv2d(in_channels, channels, 3, padding=1), nn.GroupNorm(config.groups, channels), nn.SiLU()]
            if stage < len(config.channels) - 1:
                layers.append(nn.MaxPool2d(2))
            in_channels = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_channels, config.num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The head's input [N, channels[-1]]: the global average of the last conv stage (FD_demo's features)."""
        if self.config.grayscale:
            images = luminance(images)
        return self.features(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] of images [N, 3, H, W] in [-1, 1]."""
        return self.head(self.embed(images))


class ClassifierPatchEncoder(nn.Module):
    """The classifier as a per-patch encoder (REPA's targets at demo scale, `pipeline.train.repa`): its last
    convolutional feature map [B, C, h, w] read as h * w tokens of width C (row-major), whose mean over the tokens
    is `SmallCNN.embed`. Inputs [B, 3, H, W] in [-1, 1] are resized to the classifier's resolution as `to_input`
    resizes them (bilinear, antialiased) and, for a grayscale classifier, converted to luminance."""

    def __init__(self, classifier: SmallCNN):
        super().__init__()
        self.classifier = classifier
        config = classifier.config
        side = config.resolution
        for _ in range(len(config.channels) - 1):  # a 2x2 max-pool between stages (floor, as MaxPool2d)
            side //= 2
        self.grid = (side, side)
        self.embed_dim = config.channels[-1]

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        config = self.classifier.config
        size = (config.resolution, config.resolution)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        if config.grayscale:
            images = luminance(images)
        return self.classifier.features(images).flatten(2).transpose(1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.patch_tokens(images)


def luminance(images: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma of RGB images [N, 3, H, W], repeated on the three channels."""
    weights = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)


def load_classifier(path: str | os.PathLike) -> SmallCNN:
    """Load a classifier saved by `save_classifier` / `train_classifier` (safetensors, no pickle)."""
    from safetensors.torch import load_file

    directory = Path(path).expanduser()
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise ClassifierError(f"{directory} is not a saved classifier (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        stored = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ClassifierError(f"cannot read {config_path}: {error}") from error
    if stored.get("model_type") != MODEL_TYPE:
        raise ClassifierError(f"{config_path} describes {stored.get('model_type')!r}, not a {MODEL_TYPE}")
    config = ClassifierConfig(
        num_classes=int(stored["num_classes"]),
        resolution=int(stored["resolution"]),
        channels=tuple(int(c) for c in stored["channels"]),
        groups=int(stored["groups"]),
        class_names=list(stored.get("class_names", [])),
        grayscale=bool(stored.get("grayscale", False)),
    )
    model = SmallCNN(config)
    try:
        state = load_file(str(weights_path))
        model.load_state_dict(state)
    except Exception as error:  # safetensors header errors, missing / unexpected keys, shape mismatches
        raise ClassifierError(f"cannot load weights {weights_path}: {error}") from error
    model.eval()
    return model


__all__ = [
    "CONFIG_NAME",
    "MODEL_TYPE",
    "WEIGHTS_NAME",
    "ClassifierConfig",
    "ClassifierError",
    "ClassifierPatchEncoder",
    "SmallCNN",
    "load_classifier",
    "luminance",
]
