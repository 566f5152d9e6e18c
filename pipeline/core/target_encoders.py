"""REPA's frozen target encoders (Yu et al. 2024), loaded from local files: the names `repa.encoder` and `encode
--encoder-targets` take, the modules that turn [B, 3, H, W] images with values in [0, 255] into per-patch tokens,
and the identity of their weights. The trainer runs them on the fly (`pipeline.train.repa`, `repa.targets: online`)
and the encode stage runs the very same modules on each crop and its flip to store the tokens in the shards
(`repa.targets: stored`, `pipeline.encode.targets`): one loader, one input-size rule, so both give the same targets.

- DINOv2 ViT-S/B/L/G-14 (`pipeline.core.encoders`): REPA's preprocessing (`diffit.repa.encoder_input`) at the
  input size whose patch grid equals the model's token grid (grid x 14 px: REPA's 224 px for 16 x 16 tokens); the
  position embeddings are resampled once by timm's rule, as REPA's `load_encoders`.
- `demo-classifier`: the demo's classifier's last feature map (`pipeline.core.small_cnn.ClassifierPatchEncoder`),
  at its own resolution whatever the model's grid (`input_grid` is None: its input does not depend on the model).

Loading draws nothing from the global RNG streams (timm initialises the ViT at random before the weights are
read), so a run's noise and times do not depend on whether an encoder was loaded. A missing or unusable file is one
`TargetEncoderError` line naming the setting (`repa.encoder_weights` or `--encoder-weights`) and the file.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

from diffit.repa import encoder_input
from pipeline.core.errors import InputError

logger = logging.getLogger(__name__)

# `repa.encoder` / `--encoder-targets` -> the published DINOv2 backbone (`pipeline.core.encoders.DINOV2_MODELS`).
DINOV2_ENCODERS = {
    "dinov2-vits14": "dinov2_vits14",
    "dinov2-vitb14": "dinov2_vitb14",
    "dinov2-vitl14": "dinov2_vitl14",
    "dinov2-vitg14": "dinov2_vitg14",
}
DEMO_CLASSIFIER = "demo-classifier"
ENCODERS = (*DINOV2_ENCODERS, DEMO_CLASSIFIER)
# The settings named in messages: the trainer's config keys by default, the encode command's flags from encode.
TRAIN_SETTINGS = ("repa.encoder", "repa.encoder_weights")
ENCODE_SETTINGS = ("--encoder-targets", "--encoder-weights")
_HASH_BLOCK = 1 << 20


class TargetEncoderError(InputError):
    """A target encoder cannot be loaded: no file, a file of another encoder, a damaged file."""


class PatchTokenTargets(nn.Module):
    """A frozen encoder's patch tokens [B, N, D] of [B, 3, H, W] images with values in [0, 255], preprocessed as that
    encoder expects (`preprocess`): DINOv2 REPA's way (`dinov2_input`), the demo classifier to [-1, 1]
    (`classifier_input`)."""

    def __init__(self, encoder, preprocess):
        super().__init__()
        self.encoder = encoder
        self.preprocess = preprocess
        self.grid = encoder.grid
        self.embed_dim = encoder.embed_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.patch_tokens(self.preprocess(pixels, self.encoder))


def dinov2_input(pixels: torch.Tensor, encoder) -> torch.Tensor:
    """REPA's DINOv2 preprocessing at the encoder's input size (`diffit.repa.encoder_input`)."""
    return encoder_input(pixels, encoder.img_size)


def classifier_input(pixels: torch.Tensor, encoder) -> torch.Tensor:
    """The demo classifier's input range, [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def input_grid(encoder: str, grid: tuple[int, int]) -> tuple[int, int] | None:
    """The token grid that sets `encoder`'s input size for a model of token grid `grid`: `grid` itself for DINOv2
    (input = grid x patch px), None for the demo classifier (its own resolution). Stored targets record it, and a
    run whose model has another grid is refused (its online targets would differ)."""
    return None if encoder == DEMO_CLASSIFIER else (int(grid[0]), int(grid[1]))


def load_target_encoder(
    encoder: str, weights: str | None, grid: tuple[int, int], settings: tuple[str, str] = TRAIN_SETTINGS
) -> nn.Module:
    """The frozen target encoder `encoder` of the file / directory `weights`, for a model token grid `grid`
    (DINOv2 is built for the input size whose patch grid is `grid`); `.grid` and `.embed_dim` give its tokens'
    grid and width. One TargetEncoderError / EncoderWeightsError line naming the file when it is missing or
    unusable (`settings`: the names of the encoder and weights settings in messages)."""
    with torch.random.fork_rng(devices=[]):  # timm initialises the ViT at random before the weights are loaded
        if encoder == DEMO_CLASSIFIER:
            from pipeline.core.small_cnn import ClassifierError, ClassifierPatchEncoder, load_classifier

            try:
                classifier = load_classifier(existing_weights(encoder, weights, settings[1]))
            except ClassifierError as error:
                raise TargetEncoderError(f"{settings[1]}: {error}") from None
            return _frozen(PatchTokenTargets(ClassifierPatchEncoder(classifier), classifier_input))
        from pipeline.core.encoders import dinov2_from_state_dict, dinov2_spec, read_state_dict

        path = existing_weights(encoder, weights, settings[1])
        state = read_state_dict(path)
        spec = dinov2_spec(state, path)
        wanted = DINOV2_ENCODERS[encoder]
        if spec.name is not None and spec.name != wanted:
            raise TargetEncoderError(
                f"{settings[0]} is {encoder} but {path} holds {spec.name}; name the encoder it holds"
            )
        if spec.name is None:
            logger.warning("repa: %s is not a published DINOv2 backbone (%s)", path, spec.describe())
        size = (grid[0] * spec.patch_size, grid[1] * spec.patch_size)
        # REPA's `load_encoders` resamples the hub model's position embeddings once with timm's rule.
        return _frozen(PatchTokenTargets(dinov2_from_state_dict(state, size, "timm", path), dinov2_input))


def existing_weights(encoder: str, weights: str | None, setting: str = TRAIN_SETTINGS[1]) -> str:
    """The encoder's weights file (DINOv2) or classifier directory, or one TargetEncoderError naming the file (or
    directory) to place there (`setting`: the name the message gives the weights setting)."""
    if encoder == DEMO_CLASSIFIER:
        if weights is None or not Path(weights).expanduser().is_dir():
            where = f"{weights} does not exist" if weights is not None else "not set"
            raise TargetEncoderError(
                f"{setting}: {where}; demo-classifier needs the directory of a classifier saved by "
                "`diffit-pipe demo` (config.json + model.safetensors)"
            )
        return str(Path(weights).expanduser())
    if weights is None or not Path(weights).expanduser().is_file():
        from pipeline.core.encoders import missing_weights_message

        flag = setting if setting.startswith("--") else ""  # the command line's flag; a config key says "give its path"
        raise TargetEncoderError(f"{setting}: {missing_weights_message(weights, DINOV2_ENCODERS[encoder], flag)}")
    return str(Path(weights).expanduser())


def weights_sha256(encoder: str, weights: str | None, setting: str = TRAIN_SETTINGS[1]) -> str:
    """The identity of an encoder's weights: the sha256 of the DINOv2 file; for the demo classifier, of its two
    files (`config.json`, then `model.safetensors`, each as its name and its own sha256). Stored targets record it
    and a run checks its own against it."""
    from pipeline.core.small_cnn import CONFIG_NAME, WEIGHTS_NAME

    path = Path(existing_weights(encoder, weights, setting))
    if encoder != DEMO_CLASSIFIER:
        return _file_sha256(path)
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        digest.update(f"{name}\0{_file_sha256(path / name)}\n".encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
                digest.update(block)
    except OSError as error:
        raise TargetEncoderError(f"{path}: cannot read the encoder weights ({error.strerror or error})") from None
    return digest.hexdigest()


__all__ = [
    "DEMO_CLASSIFIER",
    "DINOV2_ENCODERS",
    "ENCODERS",
    "ENCODE_SETTINGS",
    "TRAIN_SETTINGS",
    "PatchTokenTargets",
    "TargetEncoderError",
    "existing_weights",
    "input_grid",
    "load_target_encoder",
    "weights_sha256",
]
