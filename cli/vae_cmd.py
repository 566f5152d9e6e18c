"""`diffit-pipe synth` (procedural demo dataset) and `diffit-pipe vae fit` (fit a small domain VAE)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from pipeline.core.logs import setup_logging

vae_app = typer.Typer(
    help=(
        "Domain VAEs for latent diffusion. `vae fit` trains a small AutoencoderKL on your images when the Stable "
        "Diffusion VAE is not available (offline, no download possible) or does not suit the data (tiny images, "
        "an unusual domain); `encode --vae DIR` then uses it like the SD VAE."
    ),
    no_args_is_help=True,
)


def _parse_widths(text: str) -> tuple[int, ...]:
    """'32,64,64' -> (32, 64, 64)."""
    try:
        widths = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise typer.BadParameter(f"expected comma-separated integers like 32,64,64, got {text!r}") from error
    if not widths or min(widths) < 1:
        raise typer.BadParameter(f"expected positive widths like 32,64,64, got {text!r}")
    return widths


def _setup(threads: int | None) -> None:
    """The pipeline's logging set-up, and the number of torch threads when asked."""
    setup_logging()
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


@vae_app.command("fit")
def fit(
    data: Path = typer.Argument(
        ...,
        help="Training images: an image folder (one sub-folder per class, or flat), "
        "a `synth` dataset root (its train split), or raw shards written by `pack`.",
    ),
    out: Path = typer.Argument(
        ...,
        help="Output directory: config.json + diffusion_pytorch_model.safetensors "
        "(save_pretrained), fit_report.json, reconstructions.png.",
    ),
    resolution: int = typer.Option(
        64, help="Image size the VAE is fitted at (images are centre-cropped to it, as `encode` does)."
    ),
    block_out_channels: str = typer.Option(
        "16,32,64",
        "--block-out-channels",
        help="Widths of the encoder/decoder stages; the latent grid is "
        "resolution / 2^(stages-1): 3 stages -> /4 (64 px -> 16x16), "
        "4 stages -> /8 like SD.",
    ),
    latent_channels: int = typer.Option(4, help="Channels of the latent (4 like SD)."),
    steps: int = typer.Option(
        2000,
        help="Optimiser steps (the LR decays over them). On the 64 px procedural "
        "data: ~500 steps give blurry but recognisable shapes (~23 dB), 2000 steps ~28 dB.",
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per step."),
    crop_size: int | None = typer.Option(
        None,
        "--crop-size",
        help="Train on random crops of this size: the VAE is convolutional, "
        "so crops teach it the same local job ~4x faster on a CPU. "
        "Default: half the resolution from 64 px on; 0 = whole images.",
    ),
    lr: float = typer.Option(5e-3, help="Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."),
    kl_weight: float = typer.Option(
        1e-6, "--kl-weight", help="Weight of the KL term (SD: 1e-6); keeps the latent scale bounded."
    ),
    recon_loss: str = typer.Option(
        "mse", "--recon-loss", help="Reconstruction loss: mse (optimises PSNR; measured best here) or l1."
    ),
    holdout: Path | None = typer.Option(
        None,
        help="Held-out images for the reconstruction PSNR (default: 5% of DATA, at most 256, kept out of training).",
    ),
    time_budget: float | None = typer.Option(
        None,
        "--time-budget",
        help="Stop training after this many seconds (then evaluate and save); the report says what ended the fit.",
    ),
    seed: int = typer.Option(0, help="Seed of the initialisation, batch order, crops, flips and noise."),
    threads: int | None = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    overwrite: bool = typer.Option(False, help="Replace a VAE fitted with other settings in OUT."),
    as_json: bool = typer.Option(False, "--json", help="Print the fit report as JSON."),
) -> None:
    """Fit a small AutoencoderKL (diffusers) on DATA and save it to OUT with save_pretrained.

    For when the Stable Diffusion VAE cannot be downloaded or does not suit your images. Loss: squared-error
    reconstruction plus a tiny KL term (LPIPS / GAN losses need pretrained networks and are left out, so expect
    softer detail than SD's VAE). Default size: 0.65M parameters, /4 latents (64 px -> 4x16x16). After training,
    the scaling factor is set to 1 / std of the latent means over training images (how SD's 0.18215 was chosen)
    and a reconstruction PSNR is measured on held-out images; look at OUT/reconstructions.png. Re-running the
    same command skips a finished fit and resumes an interrupted one.

    Example: diffit-pipe vae fit data/synth data/vae --resolution 64 --time-budget 300 ;
    then: diffit-pipe encode data/synth/train data/latents --vae data/vae --resolution 64
    """
    _setup(threads)
    from pipeline.demo import VAEFitConfig, fit_vae

    config = VAEFitConfig(
        resolution=resolution,
        latent_channels=latent_channels,
        block_out_channels=_parse_widths(block_out_channels),
        crop_size=resolution if crop_size == 0 else crop_size,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        kl_weight=kl_weight,
        recon_loss=recon_loss,
        seed=seed,
    )
    report = fit_vae(data, out, config, holdout=holdout, overwrite=overwrite, time_budget=time_budget)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    shape = "x".join(str(v) for v in report["latent_shape"])
    typer.echo(
        f"{'found' if report['skipped'] else 'fitted'} VAE in {out}: {report['steps']} steps "
        f"({report['stopped_by']}), held-out PSNR {report['holdout_psnr']:.2f} dB, latents {shape}, "
        f"scaling factor {report['scaling_factor']:.5f}, {report['train_seconds']:.0f} s"
    )


def synth(
    out: Path = typer.Argument(
        ...,
        help="Output directory (ImageNet layout: OUT/train/<class>/*.png, "
        "OUT/holdout/<class>/*.png, OUT/dataset.json).",
    ),
    classes: int = typer.Option(
        10,
        help="Number of classes (at most 12): red circle, blue square, green "
        "triangle, yellow ring, magenta / cyan stripes, orange cross, white checkerboard, "
        "purple diamond, brown gradient with dot, pink star, lime hexagon.",
    ),
    per_class: int = typer.Option(300, "--per-class", help="Training images per class."),
    holdout_per_class: int = typer.Option(
        50, "--holdout-per-class", help="Held-out images per class (OUT/holdout; 0 = none)."
    ),
    resolution: int = typer.Option(64, help="Image size in pixels."),
    seed: int = typer.Option(0, help="Dataset seed; each image's content depends only on (seed, split, class, index)."),
    as_json: bool = typer.Option(False, "--json", help="Print dataset.json."),
) -> None:
    """Generate a procedural, class-labelled image dataset (simple coloured shapes and patterns).

    Real data the project makes itself, for the offline demo and for smoke tests: each class is a distinct shape
    in a distinct colour, near the centre, with random size, small shifts and rotations, colour jitter, background
    shade and noise, so a tiny model learns it in minutes on a CPU. The output is byte-identical for a given
    seed, written atomically, and resumable (existing images are kept). Use OUT/train with `pack`, `encode` or
    `vae fit`, and OUT/holdout to check classifiers on unseen real images.

    Example: diffit-pipe synth data/synth --classes 10 --per-class 300 --resolution 64
    """
    setup_logging()
    from pipeline.demo import generate_dataset

    info = generate_dataset(
        out,
        num_classes=classes,
        per_class=per_class,
        resolution=resolution,
        seed=seed,
        holdout_per_class=holdout_per_class,
    )
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(
        f"procedural dataset in {out}: {info['num_classes']} classes, {info['counts']['train']} training and "
        f"{info['counts']['holdout']} held-out images at {resolution} px ({info['written']} written, "
        f"{info['skipped']} already present)"
    )


def register(app: typer.Typer) -> None:
    """Add `synth` and the `vae` command group to the main app."""
    app.command("synth")(synth)
    app.add_typer(vae_app, name="vae")
