"""EMA sample grids written during training: `RUN/samples/step-XXXXXXX.png`, and to the run's trackers.

Latent models' samples are decoded through the dataset's VAE when its manifest names a local directory that
loads; otherwise the grid shows the first three latent channels (and says why, once).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from pipeline.train.checks import DatasetInfo
from pipeline.train.config import Config

logger = logging.getLogger(__name__)

SAMPLES_DIR = "samples"


def load_dataset_vae(vae_entry: dict[str, Any], manifest_path: str, device: str):
    """The dataset's VAE in fp32 on `device`: the manifest's entry resolved by the one VAE loader
    (`diffit.vae_loading.resolve_vae`: its path while it exists, else its id; files checked before diffusers builds
    anything) and loaded by `pipeline.core.vae.load_vae`. The trainer decodes with the VAE the manifest names as it
    finds it (no `path_hash` comparison, as before the loaders were one). Raises what they raise."""
    from diffit.vae_loading import resolve_vae
    from pipeline.core.vae import load_vae

    resolved = resolve_vae(vae_entry, manifest_path, check_hash=False)
    return load_vae(str(resolved.folder), "fp32", device)


def latent_visualisation(latents):
    """Latents [N, C, h, w] -> uint8 [N, h, w, 3]: the first three channels, each normalised to [0, 255]."""
    import numpy as np
    import torch

    channels = latents[:, :3].float()
    if channels.shape[1] < 3:
        channels = channels.repeat(1, 3, 1, 1)[:, :3]
    low = channels.amin(dim=(0, 2, 3), keepdim=True)
    high = channels.amax(dim=(0, 2, 3), keepdim=True)
    scaled = (channels - low) / (high - low).clamp_min(1e-8)
    return (scaled * 255).round().to(dtype=torch.uint8).permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)


def sampling_config(config: Config, conditional: bool, settings: dict[str, Any] | None = None):
    """The `diffit.sampling_config.SamplingConfig` the run samples with: the run's diffusion (kind, chain,
    sigma_data, preconditioning) and `settings` by name (default: the `sample` section's, `sampling_settings`);
    guidance for class-conditional models only."""
    import dataclasses

    from diffit.sampling_config import SamplingConfig
    from pipeline.train.config import sampling_settings

    settings = sampling_settings(config.sample) if settings is None else settings
    model = SamplingConfig(
        kind=config.diffusion.type,
        diffusion_steps=config.diffusion.diffusion_steps,
        noise_schedule=config.diffusion.noise_schedule,
        sigma_data=config.diffusion.sigma_data,
        precond=config.diffusion.precond,
    )
    sampling = model.with_settings(**settings)
    return sampling if conditional else dataclasses.replace(sampling, guidance=None)


class SampleWriter:
    """Writes EMA sample grids; for latent models decodes through the dataset's VAE when it is a local
    directory that loads, otherwise writes a latent-channel visualisation and says why once."""

    def __init__(self, config: Config, info: DatasetInfo, run_dir: Path, device):
        self.config = config
        self.info = info
        self.out_dir = run_dir / SAMPLES_DIR
        self.device = device
        self.vae = None
        self.vae_problem = None
        if info.kind == "latents":
            self.vae, self.vae_problem = self._load_vae(info.manifest["vae"], info.manifest_path)
            if self.vae_problem:
                logger.warning("sample grids show latent channels, not images: %s", self.vae_problem)

    @staticmethod
    def _load_vae(vae_entry: dict[str, Any], manifest_path: str):
        """(VAE, None), or (None, why not): the one VAE loader (`diffit.vae_loading`) on the manifest's entry."""
        try:
            return load_dataset_vae(vae_entry, manifest_path, "cpu"), None
        except Exception as error:  # noqa: BLE001 -- any load failure only changes the preview, and is reported
            return None, f"the dataset's VAE does not load ({type(error).__name__}: {error})"

    def write(self, ema_model, step: int, grids=None) -> Path:
        """Sample `sample.count` images from the EMA (fixed seeds, classes in turn), save the grid and send it to
        the trackers (`grids`: a `pipeline.train.trackers.GridLogger`); returns its path."""
        from diffit.sampling import sample
        from pipeline.core.grids import image_grid, write_png

        count = self.config.sample.count
        seeds = [self.config.sample.seed + i for i in range(count)]
        labels = [i % ema_model.num_classes for i in range(count)] if ema_model.num_classes > 0 else None
        shape = (ema_model.in_channels, ema_model.input_size, ema_model.input_size)
        settings = sampling_config(self.config, conditional=labels is not None)
        samples = sample(ema_model, shape, labels, seeds, settings, device=self.device).cpu()
        grid = image_grid(self._to_images(samples), columns=math.ceil(math.sqrt(count)))
        path = write_png(self.out_dir / f"step-{step:07d}.png", grid)
        if grids is not None:
            grids.log("samples", grid, step)
        return path

    def _to_images(self, samples):
        """Samples [N, C, H, W] -> uint8 [N, H, W, 3]: image-space values, VAE-decoded latents, or latent channels."""
        import torch

        if self.info.kind == "images":
            images = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            return images.permute(0, 2, 3, 1).numpy()
        if self.vae is not None:
            from pipeline.core.vae import decode_latents

            return decode_latents(self.vae, self.info.latent_norm.denormalize(samples).numpy())
        return latent_visualisation(samples)
