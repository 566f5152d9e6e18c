"""Decoding training samples into (x, label) pairs: latent samples (`decode_latent`), image samples
(`decode_image`), their class labels checked against the model's, and `collate` into a batch. A sample that does
not follow the shard format is a `DataFormatError` naming its shard and key.

Latent samples hold the VAE posterior `mean.npy` / `std.npy` (float16 [2, C, h, w], index 1 = flipped image,
unscaled); a training latent is `LatentNorm.normalize(mean + std * eps)` of the original or the flipped view
(`diffit.latent_norm`: `scaling_factor * (z - shift_factor)`, or per-channel `(z - mean_c) / std_c`).
Image samples hold `png` (RGB uint8); they are flipped at random and scaled to [-1, 1].
A latent stream with `images` (REPA's targets, `pipeline.train.repa`) also decodes each latent sample's `png`, the
crop its latents encode (`encode --keep-images`), flipped when the flipped latent view is taken, and batches are
then (x, labels, images uint8 [B, 3, R, R]). A latent stream with `targets` (REPA's stored targets, `encode
--encoder-targets`) decodes each sample's `repa.npy` instead (float16 [2, N, D], bounded like the latents and
checked against the manifest's shape and dtype), takes the row of the latent view the sample takes, and batches
are (x, labels, targets float16 [B, N, D]).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.core.shard_members import IMAGE_MEMBER, MEAN_MEMBER, REPA_MEMBER, STD_MEMBER, load_npy_bytes
from pipeline.train.shard_reading import DataFormatError

if TYPE_CHECKING:
    from pipeline.train.data import StreamSpec


def _where(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def _decode_label(sample: dict, spec: StreamSpec) -> int:
    raw = sample.get("cls")
    if raw is None:
        raise DataFormatError(f"{_where(sample)}: sample has no 'cls' member")
    try:
        label = int(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
    except ValueError:
        raise DataFormatError(f"{_where(sample)}: 'cls' is not an integer: {raw!r}") from None
    if not spec.conditional:
        return -1
    if label < 0:
        raise DataFormatError(f"{_where(sample)}: unlabelled sample (cls -1) for a class-conditional model")
    if label >= spec.num_classes:
        raise DataFormatError(f"{_where(sample)}: label {label} outside the model's {spec.num_classes} classes")
    return label


def _load_npy(sample: dict, name: str) -> np.ndarray:
    raw = sample.get(name)
    if raw is None:
        raise DataFormatError(f"{_where(sample)}: sample has no '{name}' member (is this a latent shard?)")
    try:
        return load_npy_bytes(raw, name)  # bounded: a header claiming terabytes is refused before any allocation
    except (ValueError, EOFError, OSError) as error:
        raise DataFormatError(f"{_where(sample)}: '{name}' is not a valid .npy array ({error})") from None


def decode_latent(sample: dict, spec: StreamSpec, rng: np.random.Generator) -> tuple:
    """One training latent: the norm's normalize(mean + std * eps) of the original or flipped view, and its label;
    with `spec.images` also the sample's image, CHW uint8, flipped with the view (view 1 is the flipped crop)."""
    mean, std = _load_npy(sample, MEAN_MEMBER), _load_npy(sample, STD_MEMBER)
    if mean.shape != std.shape or mean.ndim != 4 or mean.shape[0] != 2:
        raise DataFormatError(f"{_where(sample)}: mean/std must both be [2, C, h, w], got {mean.shape} and {std.shape}")
    view = int(rng.integers(2)) if spec.hflip else 0
    eps = rng.standard_normal(mean.shape[1:], dtype=np.float32)
    z = torch.from_numpy(mean[view].astype(np.float32) + std[view].astype(np.float32) * eps)
    try:
        latent = _latent_norm(spec).normalize(z)
    except ValueError as error:  # a channel norm for another number of channels than the sample holds
        raise DataFormatError(f"{_where(sample)}: {error}") from None
    if spec.targets is not None:
        return latent, _decode_label(sample, spec), _stored_targets(sample, spec, view)
    if not spec.images:
        return latent, _decode_label(sample, spec)
    pixels = _png_pixels(sample, spec, "latent sample has no 'png' member (encode it with --keep-images)")
    if view == 1:
        pixels = pixels[:, ::-1]
    return latent, _decode_label(sample, spec), torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)


def _stored_targets(sample: dict, spec: StreamSpec, view: int) -> torch.Tensor:
    """Row `view` of the sample's stored REPA targets (float16 [N, D]: row 1 is of the flipped crop, as the
    latents' view 1); DataFormatError naming the shard and key for a member that is not the manifest's float16
    [2, N, D] (its size was bounded by the `.npy` read: a header claiming more than the member holds is refused)."""
    targets = _load_npy(sample, REPA_MEMBER)
    if targets.dtype != np.float16 or targets.shape != tuple(spec.targets):
        raise DataFormatError(
            f"{_where(sample)}: '{REPA_MEMBER}' is {targets.dtype} {list(targets.shape)}, the manifest's "
            f"repa_targets say float16 {list(spec.targets)}"
        )
    return torch.from_numpy(np.ascontiguousarray(targets[view]))


def _latent_norm(spec: StreamSpec):
    """The spec's LatentNorm (scalar `scaling_factor`, no shift, for a spec built without one)."""
    from diffit.latent_norm import LatentNorm

    return spec.latent_norm if spec.latent_norm is not None else LatentNorm.scalar(spec.scaling_factor)


def _png_pixels(sample: dict, spec: StreamSpec, missing: str) -> np.ndarray:
    """The sample's `png` member as RGB uint8 [R, R, 3], of the manifest's resolution; DataFormatError (`missing`
    when there is none)."""
    from PIL import Image

    raw = sample.get(IMAGE_MEMBER)
    if raw is None:
        raise DataFormatError(f"{_where(sample)}: {missing}")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            pixels = np.array(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataFormatError(f"{_where(sample)}: cannot decode the PNG ({error})") from None
    if spec.resolution is not None and pixels.shape[:2] != (spec.resolution, spec.resolution):
        raise DataFormatError(
            f"{_where(sample)}: image is {pixels.shape[1]}x{pixels.shape[0]}, the manifest "
            f"says {spec.resolution}x{spec.resolution}"
        )
    return pixels


def decode_image(sample: dict, spec: StreamSpec, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
    """One training image in [-1, 1], CHW, randomly flipped."""
    pixels = _png_pixels(sample, spec, "sample has no 'png' member (is this an image shard?)")
    if spec.hflip and rng.integers(2):
        pixels = pixels[:, ::-1]
    image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0
    return image, _decode_label(sample, spec)


def collate(samples: list[tuple]) -> tuple[torch.Tensor, ...]:
    """Stack (x, label) pairs into a batch (x, labels); (x, label, image or targets) triples into (x, labels,
    images or targets)."""
    columns = list(zip(*samples))
    batch = (torch.stack(columns[0]), torch.tensor(columns[1], dtype=torch.long))
    return batch if len(columns) == 2 else (*batch, torch.stack(columns[2]))
