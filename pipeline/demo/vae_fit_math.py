"""The computations of a VAE fit, without its run: the seeded training batches of a step (crops and flips), the
LDM-style loss, reconstructions of posterior means, per-image PSNR, the scaling factor (1 / std of the posterior
means) and the picture of originals above their reconstructions. The fit loop is `pipeline.demo.vae_fit`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.core.grids import image_grid
from pipeline.demo.vae_fit_config import VAEFitConfig, VAEFitError

# ----------------------------------------------------------------------------------------------------------------
# Data: batches of step s depend only on (seed, s), which makes a resumed fit equal an uninterrupted one.


def to_model_input(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] in [-1, 1] (the VAE's input range)."""
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3] (clipped and rounded)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for the random draws of one step (stream 0: flips, 1: posterior noise)."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def batch_indices(count: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the images of `step`: consecutive slices of one seeded permutation per epoch."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = positions // count, positions % count
    indices = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        permutation = np.random.default_rng([seed, int(epoch)]).permutation(count)
        indices[epochs == epoch] = permutation[offsets[epochs == epoch]]
    return indices


def training_batch(images: np.ndarray, config: VAEFitConfig, step: int) -> torch.Tensor:
    """The model input of one step: the step's images, randomly cropped to `train_crop_size`, half of them
    flipped left-right (if `hflip`)."""
    chosen = images[batch_indices(len(images), config.batch_size, step, config.seed)]
    generator = np.random.default_rng(step_seed(config.seed, step, 0))
    if config.train_crop_size < config.resolution:
        size = config.train_crop_size
        corners = generator.integers(0, config.resolution - size + 1, size=(len(chosen), 2))
        chosen = np.stack([image[top : top + size, left : left + size] for image, (top, left) in zip(chosen, corners)])
    batch = to_model_input(chosen)
    if config.hflip:
        flip = torch.from_numpy(generator.random(len(chosen)) < 0.5)
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    return batch


# ----------------------------------------------------------------------------------------------------------------
# Loss, evaluation, scaling factor


def vae_loss(vae, images: torch.Tensor, config: VAEFitConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """LDM-style loss: (summed reconstruction error + kl_weight * summed KL) per image / pixel values per image."""
    posterior = vae.encode(images).latent_dist
    latents = posterior.sample(generator=generator)
    reconstructions = vae.decode(latents).sample
    error = reconstructions - images
    per_value = error.abs() if config.recon_loss == "l1" else error.square()
    values_per_image = images[0].numel()
    recon = per_value.flatten(1).sum(1).mean() / values_per_image
    kl = posterior.kl().mean()  # summed over the latent elements of an image, averaged over the batch
    return {"loss": recon + config.kl_weight * kl / values_per_image, "recon": recon, "kl": kl}


@torch.no_grad()
def reconstruct(vae, images_uint8: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Decode the posterior means (modes) of images: uint8 in, uint8 out (what encode + decode preserve)."""
    outputs = []
    for start in range(0, len(images_uint8), batch_size):
        batch = to_model_input(images_uint8[start : start + batch_size])
        outputs.append(to_uint8(vae.decode(vae.encode(batch).latent_dist.mode()).sample))
    return np.concatenate(outputs) if outputs else np.zeros((0,) + images_uint8.shape[1:], dtype=np.uint8)


def psnr_uint8(originals: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB between uint8 images (peak 255); infinite for identical images."""
    error = (originals.astype(np.float64) - reconstructions.astype(np.float64)) ** 2
    mse = error.reshape(len(originals), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0**2 / mse)


@torch.no_grad()
def posterior_means(vae, images_uint8: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Posterior means (unscaled latents) of images: float32 [N, C, h, w]."""
    means = [
        vae.encode(to_model_input(images_uint8[s : s + batch_size])).latent_dist.mean
        for s in range(0, len(images_uint8), batch_size)
    ]
    return torch.cat(means)


def measure_scaling_factor(vae, images_uint8: np.ndarray) -> float:
    """1 / std of all posterior-mean elements of `images` (SD's recipe for its 0.18215)."""
    std = float(posterior_means(vae, images_uint8).flatten().std())
    if not math.isfinite(std) or std <= 0:
        raise VAEFitError(f"the posterior means have std {std}: the fitted VAE is degenerate")
    return 1.0 / std


def evenly_spaced(count: int, limit: int) -> np.ndarray:
    """Up to `limit` indices spread evenly over range(count) (datasets are sorted by class: all classes appear)."""
    return np.unique(np.linspace(0, count - 1, min(limit, count)).round().astype(np.int64))


def reconstruction_grid(
    originals: np.ndarray, reconstructions: np.ndarray, columns: int = 8, bands: int = 2
) -> np.ndarray:
    """uint8 picture of up to `bands` rows of `columns` originals, each row followed by their reconstructions."""
    columns = min(columns, len(originals))
    bands = max(1, min(bands, len(originals) // columns))
    rows = []
    for band in range(bands):
        chosen = slice(band * columns, (band + 1) * columns)
        rows += [originals[chosen], reconstructions[chosen]]
    return image_grid(np.concatenate(rows), columns=columns)
