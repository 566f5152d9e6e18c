"""Fit a small diffusers `AutoencoderKL` on an image dataset: a domain VAE for latent diffusion.

The encode stage normally uses the Stable Diffusion VAE. When it is not available (no download possible) or not
suited to the data (tiny images, an unusual domain), `fit_vae` trains a small AutoencoderKL from scratch on the
images themselves and saves it with `save_pretrained`, so `encode --vae DIR` uses it exactly like the SD VAE.

What is trained, and why:

- the SD layout shrunk: `DownEncoderBlock2D` / `UpDecoderBlock2D` stages with `layers_per_block` ResNet blocks,
  a diagonal Gaussian posterior over `latent_channels` channels; the spatial downsampling factor is
  2^(len(block_out_channels) - 1). Default (16, 32, 64) -> /4: 64 px images -> 4x16x16 latents. A /8 VAE
  (4 stages, 8x8 latents) reached 3.6 dB less held-out PSNR after the same 600 CPU steps on the procedural data,
  and the diffusion model on 16x16 latents is still cheap (64 tokens with patch 2). No attention in the mid
  block by default (slow on a CPU, little use at these sizes). GroupNorm keeps >= 4 channels per group
  (`default_norm_groups`);
- training on random crops (default: half the resolution from 64 px on): the VAE is convolutional, and 32 px
  crops gave more held-out PSNR per CPU second than whole 64 px images;
- loss = reconstruction (squared error by default, or L1) + `kl_weight` x KL(posterior || N(0, I)), with SD's
  (LDM's) normalisation: both summed over an image, averaged over the batch, then divided by the number of pixel
  values so that `lr` does not depend on the resolution. The KL weight is tiny (1e-6 as in SD): it only keeps the
  latent scale bounded; the decoder sees samples z = mean + std * eps;
- no perceptual (LPIPS) or adversarial loss: both need pretrained networks that cannot be downloaded here, so
  reconstructions are somewhat blurrier than SD's;
- afterwards `scaling_factor` = 1 / std of the posterior means over `scale_images` training images (evenly
  spaced in source order, so every class counts)
  (how SD's 0.18215 was chosen), stored in the config: the diffusion model then sees latents of unit variance.

The output directory holds `config.json` + `diffusion_pytorch_model.safetensors` (`save_pretrained`), a
`fit_report.json` (settings, steps, losses, held-out reconstruction PSNR, scaling factor, time) and
`reconstructions.png` (rows of held-out originals above their reconstructions). It is written to a temporary
directory and renamed into place, so it is either complete or absent. Running the same fit again finds it and
skips; a fit killed half-way resumes from `OUT.partial/` (weights, optimiser state, step), and the resumed run
equals an uninterrupted one: batches, flips and posterior noise of step s depend only on (seed, s).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.demo.labelled_images import LabelledImages, load_labelled_images
from pipeline.demo.vae_fit_config import VAEFitConfig, VAEFitError, build_vae
from pipeline.demo.vae_fit_math import (
    evenly_spaced,
    measure_scaling_factor,
    psnr_uint8,
    reconstruct,
    reconstruction_grid,
    step_seed,
    training_batch,
    vae_loss,
)
from pipeline.demo.vae_fit_output import (
    PARTIAL_SUFFIX,
    check_output_dir,
    finished_fit,
    fit_settings,
    load_checkpoint,
    publish,
    save_checkpoint,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# The fit


def _learning_rate(config: VAEFitConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% of `lr` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _split(
    data: str | os.PathLike, holdout: str | os.PathLike | None, config: VAEFitConfig, progress: bool
) -> tuple[LabelledImages, LabelledImages]:
    """Training and held-out images (a separate holdout folder, or a seeded fraction of `data`)."""
    dataset = load_labelled_images(
        data, config.resolution, max_images=config.max_images, seed=config.seed, progress=progress
    )
    if holdout is not None:
        held = load_labelled_images(holdout, config.resolution, max_images=config.eval_images, seed=config.seed)
        return dataset, held
    if len(dataset) < 2:
        raise VAEFitError(f"{dataset.root} holds {len(dataset)} image(s); a fit needs at least 2 (1 is held out)")
    order = np.random.default_rng([config.seed, 104729]).permutation(len(dataset))
    held = min(max(1, round(config.holdout_fraction * len(dataset))), len(dataset) - 1, config.eval_images)
    return dataset.subset(np.sort(order[held:])), dataset.subset(np.sort(order[:held]))


@dataclass
class FitRun:
    """The run-level side of one fit: how it is watched, checkpointed and stopped, not what it fits."""

    settings: dict[str, Any]  # `fit_settings`: recorded with every checkpoint and in the report
    partial: Path  # resume checkpoints
    started: float = field(default_factory=time.perf_counter)
    time_budget: float | None = None
    checkpoint_every: int = 200
    progress: bool = True
    on_step: Callable[[int, dict[str, float]], None] | None = None

    def out_of_time(self) -> bool:
        return self.time_budget is not None and time.perf_counter() - self.started > self.time_budget


@dataclass
class TrainingOutcome:
    """How the optimisation ended."""

    steps: int
    resumed_from_step: int
    stopped_by: str  # "steps" or "time_budget"
    final_loss: dict[str, float]
    history: list[dict[str, float]]
    seconds: float


def _train_step(vae, optimizer, images: np.ndarray, config: VAEFitConfig, step: int) -> dict[str, float]:
    """One optimiser step on the batch of `step`: its losses as floats."""
    for group in optimizer.param_groups:
        group["lr"] = _learning_rate(config, step)
    batch = training_batch(images, config, step)
    losses = vae_loss(vae, batch, config, torch.Generator().manual_seed(step_seed(config.seed, step, 1)))
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
    optimizer.step()
    return {name: float(value.detach()) for name, value in losses.items()}


def _progress_bar(run: FitRun, config: VAEFitConfig, start_step: int):
    if not run.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=config.steps, initial=start_step, desc="vae fit", unit="step", mininterval=1.0)


def train_vae(vae, optimizer, images: np.ndarray, config: VAEFitConfig, run: FitRun) -> TrainingOutcome:
    """Optimise from the resume checkpoint in `run.partial` (if any) to `config.steps`, or until the time budget
    is spent; a loss history entry every 25 steps, a checkpoint every `run.checkpoint_every` steps."""
    vae.train()
    start_step, history = load_checkpoint(run.partial, vae, optimizer, run.settings)
    bar = _progress_bar(run, config, start_step)
    stopped_by, step, last = "steps", start_step, {}
    for step in range(start_step, config.steps):
        last = _train_step(vae, optimizer, images, config, step)
        if run.on_step is not None:
            run.on_step(step + 1, last)
        if step % 25 == 0 or step + 1 == config.steps:
            history.append({"step": step + 1, **{k: round(v, 6) for k, v in last.items()}})
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(recon=f"{last['recon']:.4f}", kl=f"{last['kl']:.0f}")
        if run.checkpoint_every and (step + 1) % run.checkpoint_every == 0 and step + 1 < config.steps:
            save_checkpoint(run.partial, vae, optimizer, step + 1, run.settings, history)
        if run.out_of_time():
            stopped_by = "time_budget"
            break
    if bar is not None:
        bar.close()
    steps_done = step + 1 if config.steps > start_step else start_step
    if stopped_by == "time_budget":
        logger.warning(
            "VAE fit stopped by the time budget (%.0f s) after %d of %d steps",
            run.time_budget,
            steps_done,
            config.steps,
        )
    seconds = time.perf_counter() - run.started
    return TrainingOutcome(steps_done, start_step, stopped_by, last, history, seconds)


def evaluate_fit(
    vae, train_set: LabelledImages, held_set: LabelledImages, config: VAEFitConfig
) -> tuple[dict[str, Any], np.ndarray]:
    """Held-out reconstruction PSNR and the scaling factor (also set in the VAE's config), and the picture of
    held-out originals above their reconstructions."""
    vae.eval()
    reconstructions = reconstruct(vae, held_set.images)
    psnr = psnr_uint8(held_set.images, reconstructions)
    scale_sample = train_set.images[evenly_spaced(len(train_set), config.scale_images)]
    scaling_factor = measure_scaling_factor(vae, scale_sample)
    vae.register_to_config(scaling_factor=scaling_factor)
    shown = evenly_spaced(len(held_set), 16)  # one band per 8, spread over the classes
    measured = {
        "holdout_psnr": float(np.mean(np.minimum(psnr, 100.0))),
        "holdout_psnr_min": float(np.min(psnr)),
        "holdout_images": len(held_set),
        "train_images": len(train_set),
        "scaling_factor": scaling_factor,
        "scaling_sample": {"count": len(scale_sample), "from": "training images evenly spaced in source order"},
    }
    return measured, reconstruction_grid(held_set.images[shown], reconstructions[shown])


def _report(config: VAEFitConfig, run: FitRun, outcome: TrainingOutcome, measured: dict[str, Any], vae) -> dict:
    """What `fit_report.json` holds."""
    return {
        "settings": run.settings,
        "steps": outcome.steps,
        "resumed_from_step": outcome.resumed_from_step,
        "stopped_by": outcome.stopped_by,
        "final_loss": outcome.final_loss,
        "history": outcome.history,
        **measured,
        "latent_shape": [config.latent_channels, config.latent_size, config.latent_size],
        "train_crop_size": config.train_crop_size,
        "norm_num_groups": vae.config.norm_num_groups,
        "downsampling_factor": config.downsampling_factor,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "train_seconds": round(outcome.seconds, 2),
        "seconds": round(time.perf_counter() - run.started, 2),
        "torch_threads": torch.get_num_threads(),
    }


def _log_start(vae, config: VAEFitConfig, train_set: LabelledImages, held_set: LabelledImages) -> None:
    if len(train_set) < config.batch_size:
        logger.warning(
            "only %d training images for batch size %d: batches repeat images", len(train_set), config.batch_size
        )
    logger.info(
        "fitting AutoencoderKL %s (%.2fM parameters): %d training / %d held-out images at %d px -> latents %dx%dx%d",
        tuple(config.block_out_channels),
        sum(p.numel() for p in vae.parameters()) / 1e6,
        len(train_set),
        len(held_set),
        config.resolution,
        config.latent_channels,
        config.latent_size,
        config.latent_size,
    )


def fit_vae(
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: VAEFitConfig | None = None,
    *,
    holdout: str | os.PathLike | None = None,
    overwrite: bool = False,
    time_budget: float | None = None,
    progress: bool = True,
    checkpoint_every: int = 200,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Fit an AutoencoderKL configured by `config` on the images of `data`; save it to `out_dir` (see the module
    docstring).

    `data`: an image folder (class tree or flat), a procedural dataset root (its train split), or packed raw
    shards. `holdout`: images for the reconstruction PSNR (default: a seeded `holdout_fraction` of `data`, capped
    at `eval_images`). `time_budget`: stop training once this many seconds have passed since the call started
    (the evaluation and saving follow); the report says whether steps or the budget ended the fit.
    `on_step(step, losses)` is called after every optimiser step. Returns the report stored as `fit_report.json`
    (with "skipped": True when an identical finished fit was found).
    """
    config = config or VAEFitConfig()
    out = Path(out_dir).expanduser()
    run = FitRun(
        settings=fit_settings(config, data, holdout, time_budget),
        partial=out.with_name(out.name + PARTIAL_SUFFIX),
        time_budget=time_budget,
        checkpoint_every=checkpoint_every,
        progress=progress,
        on_step=on_step,
    )
    report = finished_fit(out, run.settings)
    if report is not None:
        logger.info(
            "%s already holds a VAE fitted with the same settings (%d steps, PSNR %.2f dB): skipping the fit",
            out,
            report["steps"],
            report["holdout_psnr"],
        )
        return {**report, "skipped": True}
    check_output_dir(out, overwrite)

    train_set, held_set = _split(data, holdout, config, progress)
    vae = build_vae(config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
    _log_start(vae, config, train_set, held_set)
    outcome = train_vae(vae, optimizer, train_set.images, config, run)
    measured, grid = evaluate_fit(vae, train_set, held_set, config)
    report = _report(config, run, outcome, measured, vae)
    publish(vae, out, report, grid)
    shutil.rmtree(run.partial, ignore_errors=True)
    logger.info(
        "saved the fitted VAE to %s: held-out PSNR %.2f dB, scaling factor %.5f, %d steps in %.0f s",
        out,
        report["holdout_psnr"],
        report["scaling_factor"],
        outcome.steps,
        outcome.seconds,
    )
    return {**report, "skipped": False}
