"""`diffit-pipe encode`, `pack` and `inspect`: build and check latent / raw image shard datasets.

Heavy imports (torch, diffusers, dask) happen inside the command bodies so that `diffit-pipe --help` stays fast.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default decompression-bomb limit

SOURCE_HELP = (
    "Images to read: an ImageNet-style tree (ROOT/<class folder>/*.JPEG; class index = position of the folder "
    "in the sorted folder list), a flat folder (unlabelled, class -1), or a directory of raw shards from `pack`."
)


def _setup_logging(verbose: bool) -> None:
    """Send the pipeline's log lines to stderr (once), INFO by default, DEBUG with --verbose."""
    logger = logging.getLogger("pipeline")
    for handler in [h for h in logger.handlers if getattr(h, "_diffit_cli", False)]:
        logger.removeHandler(handler)  # bound to an earlier sys.stderr (a previous command in the same process)
    handler = logging.StreamHandler(sys.stderr)
    handler._diffit_cli = True
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print an error line and leave with `code` (2: bad input or settings, 1: the job's result is not acceptable)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _run(kind: str, **settings) -> None:
    """Run an encode / pack job and turn its result into a report and an exit code."""
    from pipeline.encode import JobConfig, JobError, command_line, run_job
    from pipeline.shards import ManifestError
    from pipeline.sources import SourceError
    from pipeline.vae import VAEError

    config = JobConfig(kind=kind, command=command_line(), **settings)
    try:
        result = run_job(config)
    except (SourceError, VAEError, JobError, ManifestError) as error:
        _fail(str(error))
    if result.failed_shards:
        listing = "\n".join(f"  {name}: {reason}" for name, reason in sorted(result.failed_shards.items()))
        _fail(
            f"{len(result.failed_shards)} of {result.shards_total} shard(s) failed, no manifest was written:\n{listing}\n"
            "Re-run the same command to redo only the missing shards.",
            code=1,
        )
    counts = result.counts
    typer.echo(
        f"wrote {counts['written']} of {counts['seen']} items in {result.shards_total} shard(s) to {result.out} "
        f"({result.shards_skipped} shard(s) were already complete) in {result.elapsed_s:.1f} s; "
        f"{counts['failed']} failed ({result.failure_rate:.3%}), see {Path(result.out) / 'failures.jsonl'}"
    )
    if result.failure_rate_exceeded:
        _fail(
            f"{counts['failed']} of {counts['seen']} items failed ({result.failure_rate:.3%}), above "
            f"--max-failure-rate {result.max_failure_rate:g}; the reasons are in {Path(result.out) / 'failures.jsonl'} "
            "(`diffit-pipe inspect OUT` groups them). Fix or remove those files, or raise --max-failure-rate.",
            code=1,
        )


def encode(
    source: Path = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Argument(..., help="Output directory for shard-*.tar, their .json sidecars, manifest.json and failures.jsonl."),
    resolution: int = typer.Option(256, "--resolution", "-r", help="Crop size in pixels (latents are resolution/8 for the SD VAE)."),
    vae: str = typer.Option(DEFAULT_VAE, "--vae", help="Hugging Face hub id, or a local directory with config.json and diffusion_pytorch_model.safetensors (needed offline)."),
    vae_revision: Optional[str] = typer.Option(None, "--vae-revision", help="Hub revision (branch, tag or commit) of --vae."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Items per shard (shard k always holds items k*size ... (k+1)*size-1 of the sorted source)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per VAE forward (each also encodes its flip)."),
    workers: int = typer.Option(1, "--workers", "-w", help="Local Dask worker processes, one thread each (0: run in this process)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of a running Dask scheduler (tcp://HOST:PORT) instead of a local cluster; paths must be the same on all workers."),
    torch_threads: Optional[int] = typer.Option(None, "--torch-threads", help="torch threads per worker (default: cores // workers; keep it equal between runs for byte-identical shards)."),
    dtype: str = typer.Option("fp32", "--dtype", help="VAE compute dtype: fp32, fp16 or bf16 (storage is always float16)."),
    device: str = typer.Option("auto", "--device", help="torch device for the VAE: auto (CUDA if available), cpu, cuda."),
    max_failure_rate: float = typer.Option(0.001, "--max-failure-rate", help="Exit with status 1 when more than this fraction of items cannot be used."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N items of the sorted source (quick trials)."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help="Refuse images with more pixels than this (decompression-bomb guard)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the items/s progress bar."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Encode images to Stable-Diffusion-VAE latent shards for latent DiffiT training.

    Each image is decoded (EXIF orientation, first frame, alpha on white, 16-bit scaled), center-cropped the
    ADM / DiT way (box halving, bicubic, centre square) and encoded together with its horizontal flip; the
    posterior mean and std are stored as float16 [2, 4, R/8, R/8], NOT multiplied by the VAE scaling factor
    (recorded in the manifest). Bad images are listed in failures.jsonl and never stop the job. Re-running the
    same command resumes: shards whose sidecar and sha256 check out are kept.

    Example: diffit-pipe encode /data/imagenet/train /data/in256-latents --resolution 256 --workers 8
    --vae /models/sd-vae-ft-ema
    """
    _setup_logging(verbose)
    _run(
        "latents", source=str(source), out=str(out), resolution=resolution, vae=vae, vae_revision=vae_revision,
        shard_size=shard_size, batch_size=batch_size, workers=workers, scheduler=scheduler,
        torch_threads=torch_threads, dtype=dtype, device=device, max_failure_rate=max_failure_rate,
        limit=limit, max_pixels=max_pixels, progress=progress,
    )


def pack(
    source: Path = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Argument(..., help="Output directory for the raw image shards."),
    resolution: int = typer.Option(..., "--resolution", "-r", help="Crop size in pixels."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Items per shard."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images handled per progress step."),
    workers: int = typer.Option(1, "--workers", "-w", help="Local Dask worker processes, one thread each (0: run in this process)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of a running Dask scheduler (tcp://HOST:PORT)."),
    max_failure_rate: float = typer.Option(0.001, "--max-failure-rate", help="Exit with status 1 when more than this fraction of items cannot be used."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N items of the sorted source."),
    max_pixels: int = typer.Option(DEFAULT_MAX_PIXELS, "--max-pixels", help="Refuse images with more pixels than this (decompression-bomb guard)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the items/s progress bar."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Pack images into raw image shards (lossless PNG at the target resolution, same crop and format as encode).

    Use it for pixel-space models (image DiffiT) or to decode a dataset once and `encode` later from the packed
    shards (pass the packed directory as SOURCE).

    Example: diffit-pipe pack /data/cifar10/train /data/cifar10-png --resolution 32
    """
    _setup_logging(verbose)
    _run(
        "images", source=str(source), out=str(out), resolution=resolution, shard_size=shard_size,
        batch_size=batch_size, workers=workers, scheduler=scheduler, max_failure_rate=max_failure_rate,
        limit=limit, max_pixels=max_pixels, progress=progress,
    )


def inspect(
    directory: Path = typer.Argument(..., help="A dataset directory written by encode or pack."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash every shard against the manifest and sidecars; exit 1 on any mismatch."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Write a PNG grid of the first samples (latents are decoded through the recorded VAE)."),
    count: int = typer.Option(16, "--count", help="Samples in the preview grid."),
    vae: Optional[str] = typer.Option(None, "--vae", help="VAE for the preview when the recorded one is not available here."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Summarise a dataset (items, classes, shards, failures, VAE, bytes), optionally verify it and preview it.

    Example: diffit-pipe inspect /data/in256-latents --verify --preview grid.png
    """
    import json

    from pipeline.inspect import PreviewError, format_summary, summarize, write_preview
    from pipeline.shards import ManifestError, verify_dataset
    from pipeline.vae import VAEError

    try:
        summary = summarize(directory)
    except ManifestError as error:
        _fail(str(error))
    typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    if verify:
        report = verify_dataset(directory, progress=True)
        if not report.ok:
            _fail(f"verification failed ({len(report.problems)} problem(s) in {report.checked} shards):\n  " + "\n  ".join(report.problems), code=1)
        typer.echo(f"verified   {report.checked} shard(s): every sha256 matches the manifest")
    if preview is not None:
        try:
            shown = write_preview(directory, preview, count=count, vae=vae)
        except (PreviewError, VAEError) as error:
            _fail(str(error))
        typer.echo(f"preview    {shown} sample(s) → {preview}")


def register(app: typer.Typer) -> None:
    """Add `encode`, `pack` and `inspect` to the diffit-pipe app."""
    app.command("encode")(encode)
    app.command("pack")(pack)
    app.command("inspect")(inspect)
