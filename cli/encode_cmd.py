"""`diffit-pipe encode`, `pack` and `inspect`: build and check latent / raw image shard datasets.

Heavy imports (torch, diffusers, dask) happen inside the command bodies so that `diffit-pipe --help` stays fast.
Options that `encode` and `pack` share are declared once below (typer `Annotated` types).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's default decompression-bomb limit

SOURCE_HELP = (
    "Images to read: an ImageNet-style tree (ROOT/<class folder>/*.JPEG; class index = position of the folder "
    "in the sorted folder list), a flat folder (unlabelled, class -1), a directory of raw shards from `pack`, "
    "ILSVRC2012_img_train.tar or ILSVRC2012_img_val.tar as downloaded (read in place, never extracted), "
    "WebDataset tars (a .tar, a directory or s3:// / gs:// prefix of them) or Hugging Face parquet shards."
)
SOURCE_FORMAT_HELP = (
    "What SOURCE is: auto (detected from its contents), folder, shards, imagenet-train, imagenet-val, webdataset "
    "or parquet. Archive and parquet sources are indexed in one pass over their headers; the index is kept in OUT "
    "(source-index.npz) and a resumed run plans from it."
)
LABELS_HELP = (
    "Labels of ILSVRC2012_img_val.tar: the devkit (ILSVRC2012_devkit_t12.tar.gz or its directory: ground truth + "
    "meta.mat) or LOC_val_solution.csv (default: one of them found beside the archive)."
)
VAE_HELP = (
    "Hugging Face hub id, or a local directory with config.json and diffusion_pytorch_model.safetensors "
    "(needed offline)."
)
SCHEDULER_HELP = (
    "Address of a running Dask scheduler (tcp://HOST:PORT) instead of a local cluster; paths must be the same on "
    "all workers."
)
OVERWRITE_HELP = (
    "Replace what OUT holds when it is not an earlier run of this same job. Without it the job stops, changing "
    "nothing, when OUT holds a manifest of another dataset (other kind, source, resolution, transform settings or "
    "VAE) or a finished shard that this job would rewrite with other items or settings, or delete because it "
    "writes fewer shards (e.g. --limit into a larger dataset). An earlier run of the same command is resumed."
)
MAX_PIXELS_HELP = (
    "Refuse images with more pixels than this (decompression-bomb guard); it is the limit that counts, also "
    "above Pillow's own."
)
TORCH_THREADS_HELP = (
    "torch threads per worker (default: cores // workers for a local cluster, the worker's --nthreads on a "
    "running one; keep it equal between runs for byte-identical shards)."
)
SCHEDULER_FILE_HELP = (
    "Join the cluster whose scheduler was started with `dask scheduler --scheduler-file PATH` (e.g. on SLURM); "
    "paths must be the same on all workers."
)
GPUS_HELP = (
    "Start a local cluster of one worker per GPU (the first N visible GPUs; dask-cuda's LocalCUDACluster when it "
    "is installed) instead of --workers CPU workers."
)
VERIFY_HELP = (
    "On resume, re-hash every finished shard (sha256 against its sidecar) instead of trusting the shards whose "
    "sealed sidecar matches the items, sizes, modification times and settings."
)
KEEP_IMAGES_HELP = (
    "Also store each crop as a lossless PNG member beside its latents (unflipped; the trainer flips it with the "
    "latent view it picks), for REPA training (`repa.weight` > 0), whose frozen encoder reads the images. About "
    "R x R x 3 bytes more per sample before compression."
)
ENCODER_TARGETS_HELP = (
    "Also store REPA's targets in the shards (`repa.targets: stored`): the patch tokens of this frozen encoder "
    "(repa.encoder's names: dinov2-vits14, dinov2-vitb14, dinov2-vitl14, dinov2-vitg14, demo-classifier) of each "
    "crop and of its flip, float16 [2, N, D] (`repa.npy`). The trainer then never runs the encoder; DINOv2-B/14 "
    "adds ~0.8 MB per sample (docs/benchmarks.md compares it with --keep-images and online targets)."
)
ENCODER_WEIGHTS_HELP = (
    "The --encoder-targets weights: dinov2_vit?14_pretrain.pth or timm's model.safetensors, or the demo "
    "classifier's directory (nothing is downloaded); its sha256 is recorded, and training checks it."
)
TOKEN_GRID_HELP = (
    "The model token grid (side) the DINOv2 targets are for: latent size / the model's patch size; DINOv2's input "
    "is N x 14 px (default latent size / 2, the /2 models: 224 px at 256 px). Training checks it against the model."
)
DRY_RUN_HELP = (
    "Print items, classes, shards, estimated bytes and time (from a few batches encoded in memory), and what OUT "
    "already holds; write nothing (OUT is not created)."
)

# Options shared by `encode` and `pack`.
Source = Annotated[str, typer.Argument(help=SOURCE_HELP)]
SourceFormat = Annotated[str, typer.Option("--source-format", help=SOURCE_FORMAT_HELP)]
Labels = Annotated[str | None, typer.Option("--labels", help=LABELS_HELP)]
ShardSize = Annotated[
    int,
    typer.Option(
        "--shard-size",
        help="Items per shard (shard k always holds items k*size ... (k+1)*size-1 of the sorted source).",
    ),
]
Workers = Annotated[
    int, typer.Option("--workers", "-w", help="Local Dask worker processes, one thread each (0: run in this process).")
]
Scheduler = Annotated[str | None, typer.Option("--scheduler", help=SCHEDULER_HELP)]
SchedulerFile = Annotated[str | None, typer.Option("--scheduler-file", help=SCHEDULER_FILE_HELP)]
Verify = Annotated[bool, typer.Option("--verify", help=VERIFY_HELP)]
DryRun = Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP)]
MaxFailureRate = Annotated[
    float,
    typer.Option("--max-failure-rate", help="Exit with status 1 when more than this fraction of items cannot be used."),
]
Limit = Annotated[
    int | None, typer.Option("--limit", help="Only the first N items of the sorted source (quick trials).")
]
MaxPixels = Annotated[int, typer.Option("--max-pixels", help=MAX_PIXELS_HELP)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show the items/s progress bar.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


def _run(kind: str, source: str, out: str, verbose: bool, dry_run: bool, **settings) -> None:
    """Run an encode / pack job (`settings`: the other `EncodeOptions` fields), or only its dry run, and turn its
    result into a report; a job whose result is not acceptable raises `JobFailedError` (exit 1)."""
    from pipeline.core.errors import JobFailedError
    from pipeline.core.logs import setup_logging
    from pipeline.core.storage_io import join
    from pipeline.encode import EncodeOptions, command_line, format_dry_run, run_encode
    from pipeline.encode import dry_run as plan_and_time

    setup_logging(verbose)
    # A dry run writes nothing: it reads a cached member index but does not keep one it builds.
    config = EncodeOptions(
        kind=kind, source=source, out=str(out), command=command_line(), cache_index=not dry_run, **settings
    )
    if dry_run:
        typer.echo(format_dry_run(plan_and_time(config), config.overwrite))
        return
    result = run_encode(config)
    if result.failed_shards:
        listing = "\n".join(f"  {name}: {reason}" for name, reason in sorted(result.failed_shards.items()))
        raise JobFailedError(
            f"{len(result.failed_shards)} of {result.shards_total} shard(s) failed, no manifest was written:\n"
            f"{listing}\nRe-run the same command to redo only the missing shards."
        )
    counts = result.counts
    failures = join(result.out, "failures.jsonl")
    typer.echo(
        f"wrote {counts['written']} of {counts['seen']} items in {result.shards_total} shard(s) to {result.out} "
        f"({result.shards_skipped} shard(s) were already complete) in {result.elapsed_s:.1f} s; "
        f"{counts['failed']} failed ({result.failure_rate:.3%}), see {failures}"
    )
    if result.failure_rate_exceeded:
        raise JobFailedError(
            f"{counts['failed']} of {counts['seen']} items failed ({result.failure_rate:.3%}), above "
            f"--max-failure-rate {result.max_failure_rate:g}; the reasons are in {failures} "
            "(`diffit-pipe inspect OUT` groups them). Fix or remove those files, or raise --max-failure-rate."
        )


def encode(
    source: Source,
    out: Annotated[
        str,
        typer.Argument(
            help="Output directory or object-store URL (s3://bucket/prefix, gs://...) for shard-*.tar, their .json "
            "sidecars, manifest.json and failures.jsonl.",
        ),
    ],
    resolution: Annotated[
        int, typer.Option("--resolution", "-r", help="Crop size in pixels (latents are resolution/8 for the SD VAE).")
    ] = 256,
    vae: Annotated[str, typer.Option("--vae", help=VAE_HELP)] = DEFAULT_VAE,
    vae_revision: Annotated[
        str | None, typer.Option("--vae-revision", help="Hub revision (branch, tag or commit) of --vae.")
    ] = None,
    shard_size: ShardSize = 1000,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Images per VAE forward (each also encodes its flip).")
    ] = 32,
    workers: Workers = 1,
    gpus: Annotated[int, typer.Option("--gpus", help=GPUS_HELP)] = 0,
    scheduler: Scheduler = None,
    scheduler_file: SchedulerFile = None,
    torch_threads: Annotated[int | None, typer.Option("--torch-threads", help=TORCH_THREADS_HELP)] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="VAE compute dtype: fp32, fp16 or bf16 (storage is always float16).")
    ] = "fp32",
    device: Annotated[
        str, typer.Option("--device", help="torch device for the VAE: auto (CUDA if available), cpu, cuda.")
    ] = "auto",
    max_failure_rate: MaxFailureRate = 0.001,
    limit: Limit = None,
    source_format: SourceFormat = "auto",
    labels: Labels = None,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    overwrite: Overwrite = False,
    verify: Verify = False,
    keep_images: Annotated[bool, typer.Option("--keep-images", help=KEEP_IMAGES_HELP)] = False,
    encoder_targets: Annotated[
        str | None, typer.Option("--encoder-targets", metavar="ENCODER", help=ENCODER_TARGETS_HELP)
    ] = None,
    encoder_weights: Annotated[str | None, typer.Option("--encoder-weights", help=ENCODER_WEIGHTS_HELP)] = None,
    token_grid: Annotated[int | None, typer.Option("--token-grid", help=TOKEN_GRID_HELP)] = None,
    dry_run: DryRun = False,
    progress: Progress = True,
    verbose: Verbose = False,
) -> None:
    """Encode images to Stable-Diffusion-VAE latent shards for latent DiffiT training.

    Each image is decoded (EXIF orientation, first frame, alpha on white, 16-bit scaled), center-cropped the
    ADM / DiT way (box halving, bicubic, centre square) and encoded together with its horizontal flip; the
    posterior mean and std are stored as float16 [2, 4, R/8, R/8], NOT multiplied by the VAE scaling factor
    (recorded in the manifest). Bad images are listed in failures.jsonl and never stop the job. Re-running the
    same command resumes: finished shards whose sealed sidecar matches are kept without re-reading them (--verify
    re-hashes them); a different dataset in OUT is only replaced with --overwrite. --keep-images also stores each
    crop as a PNG member (REPA training, `repa.weight` > 0, reads it); --encoder-targets ENCODER --encoder-weights
    PATH stores REPA's targets themselves (`repa.targets: stored`).

    OUT may be an object-store URL (s3://bucket/prefix with s3fs, gs://... with gcsfs; credentials from the usual
    environment, e.g. AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): each shard is uploaded in one
    request once complete, its sidecar after it, the manifest last.

    Example: diffit-pipe encode ILSVRC2012_img_train.tar /data/in256-latents --resolution 256 --gpus 8
    --vae /models/sd-vae-ft-ema
    """
    _run("latents", **locals())  # the parameters are EncodeOptions's fields, plus --verbose


def pack(
    source: Source,
    out: Annotated[str, typer.Argument(help="Output directory or object-store URL for the raw image shards.")],
    resolution: Annotated[int, typer.Option("--resolution", "-r", help="Crop size in pixels.")],
    shard_size: ShardSize = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images handled per progress step.")] = 64,
    workers: Workers = 1,
    scheduler: Scheduler = None,
    scheduler_file: SchedulerFile = None,
    max_failure_rate: MaxFailureRate = 0.001,
    limit: Limit = None,
    source_format: SourceFormat = "auto",
    labels: Labels = None,
    max_pixels: MaxPixels = DEFAULT_MAX_PIXELS,
    overwrite: Overwrite = False,
    verify: Verify = False,
    dry_run: DryRun = False,
    progress: Progress = True,
    verbose: Verbose = False,
) -> None:
    """Pack images into raw image shards (lossless PNG at the target resolution, same crop and format as encode).

    Use it for pixel-space models (image DiffiT) or to decode a dataset once and `encode` later from the packed
    shards (pass the packed directory as SOURCE).

    Example: diffit-pipe pack /data/cifar10/train /data/cifar10-png --resolution 32
    """
    _run("images", **locals())  # the parameters are EncodeOptions's fields, plus --verbose


def inspect(
    directory: Annotated[
        str, typer.Argument(help="A dataset written by encode or pack: a directory or a URL (s3://..., gs://...).")
    ],
    verify: Annotated[
        bool,
        typer.Option("--verify", help="Re-hash every shard against the manifest and sidecars; exit 1 on any mismatch."),
    ] = False,
    preview: Annotated[
        Path | None,
        typer.Option(
            "--preview", help="Write a PNG grid of the first samples (latents are decoded through the recorded VAE)."
        ),
    ] = None,
    count: Annotated[int, typer.Option("--count", help="Samples in the preview grid.")] = 16,
    vae: Annotated[
        str | None, typer.Option("--vae", help="VAE for the preview when the recorded one is not available here.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Summarise a dataset (items, classes, shards, failures, VAE, bytes), optionally verify it and preview it.

    Example: diffit-pipe inspect /data/in256-latents --verify --preview grid.png
    """
    import json

    from pipeline.core.dataset_verify import verify_dataset
    from pipeline.core.errors import JobFailedError
    from pipeline.core.logs import setup_logging
    from pipeline.encode import format_summary, summarize, write_preview

    setup_logging()
    summary = summarize(directory)
    typer.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    if verify:
        report = verify_dataset(directory, progress=True)
        if not report.ok:
            raise JobFailedError(
                f"verification failed ({len(report.problems)} problem(s) in {report.checked} shards):\n  "
                + "\n  ".join(report.problems)
            )
        typer.echo(f"verified   {report.checked} shard(s): every sha256 matches the manifest")
    if preview is not None:
        shown = write_preview(directory, preview, count=count, vae=vae)
        typer.echo(f"preview    {shown} sample(s) → {preview}")


def register(app: typer.Typer) -> None:
    """Add `encode`, `pack` and `inspect` to the diffit-pipe app."""
    app.command("encode")(encode)
    app.command("pack")(pack)
    app.command("inspect")(inspect)
