"""`diffit-pipe reference`: an ADM-layout reference batch (arr_0 + FID / sFID statistics) from any image source."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.encode_cmd import MAX_PIXELS_HELP, Labels, SourceFormat
from cli.evaluate_cmd import WORKERS, docstring_help

SOURCE_HELP = (
    "Raw image shards from `pack`, an image folder, or an .npz of images (arr_0), all at one resolution; with "
    "--resolution, any source `encode` reads (the ImageNet train / val archive, parquet shards, WebDataset tars, "
    "a folder of images of any size)."
)
RESOLUTION_HELP = (
    "Center-crop every image of SOURCE to this size exactly as `pack` does (ADM's center crop), reading archives, "
    "parquet and WebDataset in place: e.g. 256 for ImageNet-256. Members the index finds damaged are listed in the "
    "reference's info and left out; one that does not decode stops the build with its name. The member index is "
    "kept in the hidden .OUT.npz.partial directory until OUT is written."
)
SUBSET_HELP = "Images stored as arr_0 for precision/recall (a seeded random subset; all when the source is smaller)."
CHUNK_HELP = "Images per resumable chunk of the statistics (a killed run recomputes only unfinished chunks)."
DINOV2_HELP = (
    "Also write mu_dinov2/sigma_dinov2, the DINOv2 ViT-L/14 statistics of `evaluate --metrics fd_dinov2`, from "
    "this weights file (dinov2_vitl14_pretrain.pth; nothing is downloaded), in the same pass over SOURCE."
)
STATS_ONLY_HELP = "Write only the statistics mu/sigma/mu_s/sigma_s (FID and sFID; no arr_0, no precision/recall)."


def reference(
    source: Annotated[Path, typer.Argument(help=SOURCE_HELP)],
    out: Annotated[Path, typer.Argument(help="The reference batch to write (OUT.npz).")],
    inception_weights: Annotated[
        Path | None,
        typer.Option("--inception-weights", help="weights-inception-2015-12-05-6726825d.pth (no download offline)."),
    ] = None,
    dinov2_weights: Annotated[Path | None, typer.Option("--dinov2-weights", help=DINOV2_HELP)] = None,
    subset: Annotated[int, typer.Option("--subset", help=SUBSET_HELP)] = 10_000,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the arr_0 subset (recorded in the file).")] = 0,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help=CHUNK_HELP)] = 10_000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per Inception batch.")] = 64,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader workers decoding the images.")] = WORKERS,
    statistics_only: Annotated[bool, typer.Option("--statistics-only", help=STATS_ONLY_HELP)] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT.")] = False,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda; default: cuda when available.")] = None,
    resolution: Annotated[int | None, typer.Option("--resolution", min=1, help=RESOLUTION_HELP)] = None,
    source_format: SourceFormat = "auto",
    labels: Labels = None,
    max_pixels: Annotated[int | None, typer.Option("--max-pixels", help=MAX_PIXELS_HELP)] = None,
) -> None:
    """Build a reference batch in the ADM evaluator's layout (the layout of VIRTUAL_imagenet256_labeled.npz) for
    `evaluate --reference`: FID statistics mu/sigma (2048-d pool features) and sFID statistics mu_s/sigma_s
    (mixed_6/conv spatial features) over EVERY image of SOURCE, plus arr_0, a seeded random subset of --subset
    images for precision/recall.

    The statistics are streamed in float64 (never all features in memory), chunk by chunk: re-running the same
    command after a kill resumes from the finished chunks (kept in a hidden .OUT.npz.partial directory beside
    OUT, removed at the end). The Inception network runs on the GPU when there is one.
    """
    from pipeline.core.logs import setup_logging
    from pipeline.evaluate import ReferenceOptions, build_reference

    setup_logging()
    options = ReferenceOptions(
        source=source,
        out=out,
        inception_weights=inception_weights,
        dinov2_weights=dinov2_weights,
        subset_size=0 if statistics_only else subset,
        seed=seed,
        chunk_size=chunk_size,
        batch_size=batch_size,
        workers=workers,
        device=device,
        images=not statistics_only,
        overwrite=overwrite,
        resolution=resolution,
        source_format=source_format,
        labels=labels,
        max_pixels=max_pixels,
    )
    info = build_reference(options)
    typer.echo(
        f"wrote {out}: statistics of {info['num_images_statistics']} images, {info['num_images_arr_0']} images in "
        f"arr_0 ({info['inception_weights']['label']})"
    )


def register(app: typer.Typer) -> None:
    """Add `reference` to the diffit-pipe app."""
    app.command("reference", help=docstring_help(reference))(reference)
