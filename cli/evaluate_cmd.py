"""`diffit-pipe evaluate` (sample -> zarr -> FID / IS / precision-recall / KID) and `diffit-pipe sample` (a grid)."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Optional

import typer


class Sampler(str, Enum):
    ddpm = "ddpm"
    ddim = "ddim"
    edm_heun = "edm-heun"


class Schedule(str, Enum):
    constant = "constant"
    power_cosine = "power-cosine"


class GuidedChannels(str, Enum):
    three = "3"
    all = "all"


class FeatureLayer(str, Enum):
    f64 = "64"
    f192 = "192"
    f768 = "768"
    f2048 = "2048"


def parse_classes(text: str) -> Optional[list[int]]:
    """'all' -> None; '88,207,360' or '0-9,42' -> a list of labels."""
    text = text.strip()
    if text.lower() == "all":
        return None
    labels: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part[1:]:
                low, high = part.split("-", 1)
                labels.extend(range(int(low), int(high) + 1))
            else:
                labels.append(int(part))
    except ValueError as error:
        raise typer.BadParameter(f"--classes {text!r}: expected 'all' or labels like 88,207,360 or 0-9") from error
    if not labels:
        raise typer.BadParameter(f"--classes {text!r}: no labels given")
    return labels


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors that mean bad input (reported as one line, exit code 2) rather than a bug (traceback)."""
    from pipeline.evaluate import EvaluateInputError
    from pipeline.metrics import MissingInceptionWeightsError, ReferenceInputError
    from pipeline.sample_store import SampleStoreMismatchError
    from pipeline.shards import ManifestError

    return (EvaluateInputError, MissingInceptionWeightsError, ReferenceInputError, SampleStoreMismatchError,
            ManifestError)


def evaluate(
    model: Path = typer.Option(..., "--model", help="Exported model directory (model.safetensors + config.json)."),
    out: Path = typer.Option(..., "--out", help="Output directory: samples.zarr, metrics.json, samples.npz."),
    num_samples: int = typer.Option(50_000, "--num-samples", help="Number of samples (the paper: 50k)."),
    sampler: Optional[Sampler] = typer.Option(None, "--sampler", help="Default: ddpm (latent ADM models), "
                                              "edm-heun (image-space EDM models)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps. Default: 250 (ddpm); 18 at 32 px / "
                                        "40 at 64 px (edm-heun)."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", help="Classifier-free guidance scale. Default: "
                                              "4.6 (ImageNet-256), 1.49 (ImageNet-512), 1 = none otherwise."),
    cfg_schedule: Optional[Schedule] = typer.Option(None, "--cfg-schedule", help="Default: power-cosine at 256 px "
                                                    "(MDT's schedule), constant otherwise."),
    cfg_power: float = typer.Option(4.0, "--cfg-power", help="Exponent of the power-cosine schedule."),
    cfg_channels: GuidedChannels = typer.Option(GuidedChannels.three, "--cfg-channels",
                                                help="Guide the first 3 latent channels (DiffiT) or all."),
    classes: str = typer.Option("all", "--classes", help="'all' (uniform labels) or a list to cycle through, "
                                "e.g. 88,207,360 or 0-9."),
    batch_size: int = typer.Option(32, "--batch-size", help="Samples per network batch and per process; also "
                                   "the chunk size of a new sample store."),
    seed: int = typer.Option(0, "--seed", help="Sample i uses a noise seed and label derived from (seed, i) only."),
    eta: float = typer.Option(0.0, "--eta", help="DDIM eta (0 = deterministic)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Raw image shards (from `pack`), an image "
                                             "folder, an ADM .npz (arr_0), or an .npz of FID statistics mu/sigma."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="Inception-v3 weights file "
                                                     "weights-inception-2015-12-05-6726825d.pth (no download "
                                                     "offline). Default: $TORCH_HOME/hub/checkpoints/."),
    metrics: str = typer.Option("fid,is,prc", "--metrics", help="Comma list of fid, is, prc, kid; '' for none."),
    export_npz: bool = typer.Option(False, "--export-npz", help="Also write samples.npz in the ADM evaluator "
                                    "layout (arr_0 images, arr_1 labels)."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="Local diffusers AutoencoderKL folder, overriding the "
                                       "one named in the model's config."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Where reference features are cached. "
                                             "Default: beside the reference, else ~/.cache/diffit-pipe."),
    feature_layer: FeatureLayer = typer.Option(FeatureLayer.f2048, "--feature-layer", help="Inception features "
                                               "for FID/KID/precision-recall. 2048 is the standard; smaller "
                                               "layers are for quick plumbing checks only."),
    feature_batch_size: int = typer.Option(64, "--feature-batch-size", help="Images per Inception batch."),
    kid_subset_size: int = typer.Option(1000, "--kid-subset-size", help="KID subset size (<= samples)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda; default: cuda when available."),
) -> None:
    """Sample an exported model into a resumable zarr store and compute FID / IS / precision-recall / KID.

    Defaults reproduce the paper per model kind: latent models DDPM-250 (ImageNet-256: guidance 4.6,
    power-cosine, first three latent channels; ImageNet-512: 1.49 constant); image-space models EDM Heun with
    18 (32 px) / 40 (64 px) steps, unguided. Re-running the same command after a kill only fills the missing
    samples; other settings against an existing --out are refused.

    Several processes: `accelerate launch --multi_gpu --num_processes N --num_machines 1 --mixed_precision no
    --dynamo_backend no -m cli.main evaluate ...` (or `torchrun --nproc_per_node N`). The samples do not depend
    on N or --batch-size.

    Metrics computed with Inception weights that are not the official torch-fidelity file are written under
    "plumbing_only_metrics" in metrics.json and labelled as such: they are not FID.
    """
    _setup_logging()
    from pipeline.evaluate import EvaluateOptions, SamplingOptions, evaluate as run_evaluate

    options = EvaluateOptions(
        model_dir=model, out_dir=out, num_samples=num_samples,
        sampling=SamplingOptions(sampler=sampler.value if sampler else None, steps=steps, cfg_scale=cfg_scale,
                                 cfg_schedule=cfg_schedule.value if cfg_schedule else None, cfg_power=cfg_power,
                                 cfg_channels=cfg_channels.value, classes=parse_classes(classes), seed=seed,
                                 eta=eta),
        batch_size=batch_size, reference=reference, inception_weights=inception_weights,
        metrics=tuple(m for m in metrics.split(",") if m.strip()), export_npz=export_npz, vae=vae,
        cache_dir=cache_dir, feature_layer=feature_layer.value, feature_batch_size=feature_batch_size,
        kid_subset_size=kid_subset_size, device=device)
    try:
        run_evaluate(options)
    except _input_errors() as error:
        _fail(error)


def sample(
    model: Path = typer.Option(..., "--model", help="Exported model directory."),
    grid: Path = typer.Option(..., "--grid", help="Output PNG."),
    classes: str = typer.Option("all", "--classes", help="One row per class, e.g. 88,207,360; 'all' draws --num "
                                "samples with uniform labels."),
    per_class: int = typer.Option(4, "--per-class", help="Samples per class (columns)."),
    num: int = typer.Option(16, "--num", help="Number of samples when --classes is 'all'."),
    sampler: Optional[Sampler] = typer.Option(None, "--sampler", help="Default: the paper's for the model kind."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (default: the paper's)."),
    cfg_scale: Optional[float] = typer.Option(None, "--cfg-scale", help="Guidance scale (default: the paper's)."),
    cfg_schedule: Optional[Schedule] = typer.Option(None, "--cfg-schedule", help="constant or power-cosine."),
    cfg_channels: GuidedChannels = typer.Option(GuidedChannels.three, "--cfg-channels", help="3 or all."),
    seed: int = typer.Option(0, "--seed", help="Base seed."),
    batch_size: int = typer.Option(16, "--batch-size", help="Samples per network batch."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="Local diffusers AutoencoderKL folder override."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda; default: cuda when available."),
) -> None:
    """A quick look at a model: sample a few images and save them as one PNG grid (no store, no metrics)."""
    _setup_logging()
    from pipeline.evaluate import SamplingOptions, sample_grid

    options = SamplingOptions(sampler=sampler.value if sampler else None, steps=steps, cfg_scale=cfg_scale,
                              cfg_schedule=cfg_schedule.value if cfg_schedule else None,
                              cfg_channels=cfg_channels.value, seed=seed)
    try:
        path = sample_grid(model, grid, parse_classes(classes), per_class=per_class, num=num,
                           sampling_options=options, vae=vae, batch_size=batch_size, device=device)
    except _input_errors() as error:
        _fail(error)
    typer.echo(f"wrote {path}")


def _help(function) -> str:
    """A docstring as --help text: lines of a paragraph joined (the terminal re-wraps them), paragraphs kept."""
    paragraphs = [" ".join(line.strip() for line in block.strip().splitlines())
                  for block in (function.__doc__ or "").split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def register(app: typer.Typer) -> None:
    """Add `evaluate` and `sample` to the diffit-pipe app."""
    app.command("evaluate", help=_help(evaluate))(evaluate)
    app.command("sample", help=_help(sample))(sample)

