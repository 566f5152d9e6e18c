"""`diffit-pipe demo`: the whole pipeline, offline, on a procedural dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.core.logs import setup_logging


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Directory for every file the demo writes."),
    quick: bool = typer.Option(False, "--quick", help="A ~3 minute run with tiny sizes (what the tests run)."),
    vae: str | None = typer.Option(
        None,
        "--vae",
        help="Use this AutoencoderKL (local dir or hub id, e.g. "
        "stabilityai/sd-vae-ft-ema) instead of fitting a small one.",
    ),
    inception_weights: Path | None = typer.Option(
        None,
        "--inception-weights",
        help="weights-inception-2015-12-05-6726825d.pth, for FID / IS / precision "
        "/ recall; without it those metrics are skipped (they cannot be downloaded offline).",
    ),
) -> None:
    """Run every stage on data the project makes itself: synth a 10-class procedural image dataset, pack it,
    fit a small VAE and encode latents with Dask, train a tiny latent DiffiT and a tiny image-space DiffiT,
    sample both into zarr stores, write labelled grids, and measure the class consistency of the samples with
    a classifier trained on the same dataset. About 15 minutes on 2 CPU cores (`--quick`: about 3).
    Re-running the same command resumes: finished steps are skipped."""
    setup_logging()
    from pipeline.demo import DemoOptions, run_demo

    weights = str(inception_weights) if inception_weights else None
    run_demo(DemoOptions(out, quick=quick, vae=vae, inception_weights=weights))


def register(app: typer.Typer) -> None:
    """Add `demo` to the main app."""
    app.command("demo")(demo)
