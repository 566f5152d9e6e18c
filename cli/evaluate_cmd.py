"""`diffit-pipe evaluate` (sample -> zarr -> FID / sFID / IS / precision-recall / KID) and `diffit-pipe sample`
(a grid).

Options that both commands take are declared once below (typer `Annotated` types); heavy imports happen inside
the command bodies.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Sampler(str, Enum):
    ddpm = "ddpm"
    ddim = "ddim"
    edm_heun = "edm-heun"
    euler = "euler"  # flow models (diffit.flow)
    heun = "heun"
    euler_maruyama = "euler-maruyama"


class Schedule(str, Enum):
    constant = "constant"
    power_cosine = "power-cosine"


class GuidedChannels(str, Enum):
    three = "3"
    all = "all"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    auto = "auto"


class DistancePrecision(str, Enum):
    fp16 = "fp16"
    fp32 = "fp32"


class Pixels(str, Enum):
    round = "round"
    truncate = "truncate"


class FeatureLayer(str, Enum):
    f64 = "64"
    f192 = "192"
    f768 = "768"
    f2048 = "2048"


REFERENCE_HELP = (
    "An ADM reference batch .npz (arr_0 images + mu/sigma, mu_s/sigma_s statistics, e.g. "
    "VIRTUAL_imagenet256_labeled.npz or one from `diffit-pipe reference`): FID and sFID from its stored statistics, "
    "precision/recall against its images. Also: a statistics-only .npz (FID, sFID, IS), an .npz of images (arr_0), "
    "an image folder, or raw image shards from `pack`. An .npz or a `pack` dataset may be an object-store URL "
    "(s3://..., gs://...): it is copied once to ~/.cache/diffit-pipe/references, shards checked by sha256. "
    "metrics.json records which source fed which metric."
)
INCEPTION_WEIGHTS_HELP = (
    "Inception-v3 weights file weights-inception-2015-12-05-6726825d.pth (no download offline). "
    "Default: $TORCH_HOME/hub/checkpoints/."
)
FEATURE_LAYER_HELP = (
    "Inception features for FID/KID/precision-recall. 2048 is the standard; smaller layers are for quick plumbing "
    "checks only."
)
PRC_PRECISION_HELP = (
    "Arithmetic of precision/recall's pairwise distances: fp16 as the ADM evaluator (float16 blocks, a block "
    "with a non-finite value recomputed in float32; its ties on the radius test are part of the published "
    "numbers) or fp32 (every distance in float32). metrics.json records which."
)
PIXELS_HELP = (
    "How [-1, 1] samples become uint8 pixels: round = clamp(127.5 x + 128) (DiT, EDM; the default for models "
    "trained here), truncate = clamp((x + 1) * 127.5) (guided-diffusion, NVlabs/DiffiT sample.py: the default for "
    "models imported with import-nvlabs, whose config.json records it). Recorded in metrics.json and the npz."
)
BATCH_SIZE_HELP = "Samples per network batch and per process; also the chunk size of a new sample store."
CLASSES_HELP = "'all' (uniform labels) or a list to cycle through, e.g. 88,207,360 or 0-9."
EXPORT_NPZ_HELP = "Also write samples.npz in the ADM evaluator layout (arr_0 images, arr_1 labels)."
CACHE_DIR_HELP = "Where reference features are cached. Default: beside the reference, else ~/.cache/diffit-pipe."
GUIDANCE_SCALE_HELP = (
    "Classifier-free guidance scale. Default: the set-up recorded in the model's config.json (`import-nvlabs` "
    "records the released DiffiT code's: 4.4 power-cosine at 256 px, which gives its FID 1.73; 1.49 constant at "
    "512 px); otherwise the paper text's 4.6 power-cosine at 256 px and 1.49 at 512 px; 1 (none) elsewhere. "
    "Pass --guidance-scale 4.4 or 4.6 to choose either published setting."
)
METRICS_HELP = (
    "Comma list of fid, sfid, is, prc, kid (the ADM evaluator reports fid, sfid, is, prc) and fd_dinov2 (DINOv2 "
    "ViT-L/14 features as dgm-eval / EDM2; needs --dinov2-weights); '' for none."
)
DINOV2_WEIGHTS_HELP = (
    "DINOv2 ViT-L/14 weights for fd_dinov2: dinov2_vitl14_pretrain.pth (or timm's model.safetensors of "
    "vit_large_patch14_dinov2.lvd142m); nothing is downloaded. Other weights give a plumbing-only value."
)
PRC_MEMORY_HELP = "Memory bound (GB) of the precision/recall distance blocks, whatever the sample counts."
PRC_LIMIT_HELP = (
    "Reference images precision/recall and KID use; a larger reference is subsampled with --prc-seed (logged)."
)
PRECISION_HELP = (
    "Precision of the network forward: bf16 runs it under torch.autocast (the sampler's arithmetic stays fp32); "
    "auto is bf16 on CUDA, fp32 elsewhere. bf16 samples differ slightly from fp32 ones and are recorded."
)
COMPILE_HELP = "torch.compile the network before sampling (pays off for long runs on a GPU)."
FEATURE_WORKERS_HELP = "DataLoader workers decoding reference images for the Inception features."
WORKERS = min(4, os.cpu_count() or 1)

# Options of both `evaluate` and `sample`.
Model = Annotated[Path, typer.Option("--model", help="Exported model directory (model.safetensors + config.json).")]
SamplerOption = Annotated[
    Sampler | None,
    typer.Option(
        "--sampler",
        help="Default: ddpm (latent ADM models), edm-heun (image-space EDM models), heun (flow models; also euler, "
        "euler-maruyama).",
    ),
]
Steps = Annotated[
    int | None,
    typer.Option("--steps", help="Sampling steps. Default: 250 (ddpm); 18 at 32 px / 40 at 64 px (edm-heun)."),
]
GuidanceScale = Annotated[float | None, typer.Option("--guidance-scale", help=GUIDANCE_SCALE_HELP)]
GuidanceSchedule = Annotated[
    Schedule | None,
    typer.Option("--guidance-schedule", help="Default: power-cosine at 256 px (MDT's schedule), constant otherwise."),
]
GuidanceChannels = Annotated[
    GuidedChannels, typer.Option("--guidance-channels", help="Guide the first 3 latent channels (DiffiT) or all.")
]
GuidanceInterval = Annotated[
    str | None,
    typer.Option(
        "--guidance-interval",
        help="LOW,HIGH: guide only where the noise level lies in it -- sigma in (LOW, HIGH] for ADM / EDM models "
        "(EDM2, Kynkaanniemi et al. 2024), t in [LOW, HIGH] for flow models (REPA). Default: every step.",
    ),
]
# The names before diffusers' (`guidance_scale`): accepted for one release with a deprecation warning.
OldScale = Annotated[float | None, typer.Option("--cfg-scale", hidden=True)]
OldSchedule = Annotated[Schedule | None, typer.Option("--cfg-schedule", hidden=True)]
OldChannels = Annotated[GuidedChannels | None, typer.Option("--cfg-channels", hidden=True)]
OldPower = Annotated[float | None, typer.Option("--cfg-power", hidden=True)]
Seed = Annotated[int, typer.Option("--seed", help="Sample i uses a noise seed and label derived from (seed, i) only.")]
Vae = Annotated[
    Path | None,
    typer.Option("--vae", help="Local diffusers AutoencoderKL folder, overriding the one named in the model's config."),
]
Device = Annotated[str | None, typer.Option("--device", help="cpu or cuda; default: cuda when available.")]
PrecisionOption = Annotated[Precision, typer.Option("--precision", help=PRECISION_HELP)]
Compile = Annotated[bool, typer.Option("--compile", help=COMPILE_HELP)]


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """'0.28,5.42' -> (0.28, 5.42); None stays None (checked further by `check_options`)."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    try:
        if len(parts) != 2:
            raise ValueError(text)
        return float(parts[0]), float(parts[1])
    except ValueError as error:
        raise typer.BadParameter(f"--guidance-interval {text!r}: expected LOW,HIGH, e.g. 0.28,5.42") from error


def parse_classes(text: str) -> list[int] | None:
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


def deprecated_flag(new_flag: str, new_value, old_flag: str, old_value, default=None):
    """The value of an option that has an old name: the old one's (with a warning on stderr) when only it was
    given; both given is an error."""
    if old_value is None:
        return new_value
    if new_value != default:
        raise typer.BadParameter(f"{old_flag} is the old name of {new_flag}: give only {new_flag}")
    typer.echo(f"warning: {old_flag} is deprecated, use {new_flag} (the old name goes in the next release)", err=True)
    return old_value


def _sampling_settings(
    sampler, steps, guidance_scale, guidance_schedule, guidance_channels, pixels=None, old=(), **more
) -> dict:
    """The sampling settings given on the command line, by their one name each (`diffit.sampling_config.SETTINGS`;
    enums to their strings, unset ones left out so the model's defaults apply); `old`: the values of --cfg-scale,
    --cfg-schedule, --cfg-channels (deprecated names)."""
    old_scale, old_schedule, old_channels = (*old, None, None, None)[:3]
    guidance_scale = deprecated_flag("--guidance-scale", guidance_scale, "--cfg-scale", old_scale)
    guidance_schedule = deprecated_flag("--guidance-schedule", guidance_schedule, "--cfg-schedule", old_schedule)
    guidance_channels = deprecated_flag(
        "--guidance-channels", guidance_channels, "--cfg-channels", old_channels, GuidedChannels.three
    )
    settings = {
        "sampler": sampler.value if sampler else None,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "guidance_schedule": guidance_schedule.value if guidance_schedule else None,
        "guidance_channels": guidance_channels.value,
        "pixels": pixels.value if pixels else None,
        **more,
    }
    return {name: value for name, value in settings.items() if value is not None}


def evaluate(
    model: Model,
    out: Annotated[Path, typer.Option("--out", help="Output directory: samples.zarr, metrics.json, samples.npz.")],
    num_samples: Annotated[int, typer.Option("--num-samples", help="Number of samples (the paper: 50k).")] = 50_000,
    sampler: SamplerOption = None,
    steps: Steps = None,
    guidance_scale: GuidanceScale = None,
    guidance_schedule: GuidanceSchedule = None,
    guidance_power: Annotated[
        float, typer.Option("--guidance-power", help="Exponent of the power-cosine schedule.")
    ] = 4.0,
    guidance_channels: GuidanceChannels = GuidedChannels.three,
    guidance_interval: GuidanceInterval = None,
    guide_model: Annotated[
        Path | None,
        typer.Option(
            "--guide-model",
            help="Autoguidance (Karras et al. 2024): an export of the same kind, latent shape and classes (a "
            "smaller model, an early checkpoint) whose conditional output replaces the unconditional one.",
        ),
    ] = None,
    classes: Annotated[str, typer.Option("--classes", help=CLASSES_HELP)] = "all",
    batch_size: Annotated[int, typer.Option("--batch-size", help=BATCH_SIZE_HELP)] = 32,
    seed: Seed = 0,
    eta: Annotated[float, typer.Option("--eta", help="DDIM eta (0 = deterministic).")] = 0.0,
    pixels: Annotated[Pixels | None, typer.Option("--pixels", help=PIXELS_HELP)] = None,
    reference: Annotated[str | None, typer.Option("--reference", help=REFERENCE_HELP)] = None,
    inception_weights: Annotated[Path | None, typer.Option("--inception-weights", help=INCEPTION_WEIGHTS_HELP)] = None,
    metrics: Annotated[str, typer.Option("--metrics", help=METRICS_HELP)] = "fid,sfid,is,prc",
    dinov2_weights: Annotated[Path | None, typer.Option("--dinov2-weights", help=DINOV2_WEIGHTS_HELP)] = None,
    export_npz: Annotated[bool, typer.Option("--export-npz", help=EXPORT_NPZ_HELP)] = False,
    vae: Vae = None,
    cache_dir: Annotated[Path | None, typer.Option("--cache-dir", help=CACHE_DIR_HELP)] = None,
    feature_layer: Annotated[
        FeatureLayer, typer.Option("--feature-layer", help=FEATURE_LAYER_HELP)
    ] = FeatureLayer.f2048,
    feature_batch_size: Annotated[int, typer.Option("--feature-batch-size", help="Images per Inception batch.")] = 64,
    feature_workers: Annotated[int, typer.Option("--feature-workers", help=FEATURE_WORKERS_HELP)] = WORKERS,
    kid_subset_size: Annotated[int, typer.Option("--kid-subset-size", help="KID subset size (<= samples).")] = 1000,
    prc_memory_gb: Annotated[float, typer.Option("--prc-memory-gb", help=PRC_MEMORY_HELP)] = 2.0,
    prc_precision: Annotated[
        DistancePrecision, typer.Option("--prc-precision", help=PRC_PRECISION_HELP)
    ] = DistancePrecision.fp16,
    prc_reference_limit: Annotated[int, typer.Option("--prc-reference-limit", help=PRC_LIMIT_HELP)] = 10_000,
    prc_seed: Annotated[int, typer.Option("--prc-seed", help="Seed of the reference subset.")] = 0,
    device: Device = None,
    precision: PrecisionOption = Precision.auto,
    compile: Compile = False,
    cfg_scale: OldScale = None,
    cfg_schedule: OldSchedule = None,
    cfg_power: OldPower = None,
    cfg_channels: OldChannels = None,
) -> None:
    """Sample an exported model into a resumable zarr store and compute FID / sFID / IS / precision-recall (KID).

    Metrics follow the ADM evaluator (guided-diffusion evaluations/evaluator.py), the protocol of the published
    numbers: with --reference VIRTUAL_imagenet256_labeled.npz, FID and sFID against its stored full-training-set
    statistics, precision/recall (k = 3) against its 10,000 images, IS of the samples.

    Defaults reproduce the published settings per model kind: latent models DDPM-250, guided on the first three
    latent channels; ImageNet-256 guidance power-cosine 4.4 for a model imported with `import-nvlabs` (the
    released code's setting for FID 1.73), 4.6 (the paper text) otherwise; ImageNet-512 1.49 constant;
    image-space models EDM Heun with 18 (32 px) / 40 (64 px) steps, unguided. Re-running the same command after a
    kill only fills the missing samples; other settings against an existing --out are refused.

    Several processes: `accelerate launch --multi_gpu --num_processes N --num_machines 1 --mixed_precision no
    --dynamo_backend no -m cli.main evaluate ...` (or `torchrun --nproc_per_node N`). The samples do not depend
    on N or --batch-size.

    Metrics computed with Inception weights that are not the official torch-fidelity file are written under
    "plumbing_only_metrics" in metrics.json and labelled as such: they are not FID. The same holds for
    fd_dinov2 with weights not recognised as the published DINOv2 ViT-L/14 (their sha256 is not pinned: the file
    is identified by its name, architecture and trained LayerScale).
    """
    from pipeline.core.logs import setup_logging
    from pipeline.evaluate import EvaluateOptions, run_evaluate

    setup_logging()
    labels = parse_classes(classes)
    sampling = _sampling_settings(
        sampler,
        steps,
        guidance_scale,
        guidance_schedule,
        guidance_channels,
        pixels,
        old=(cfg_scale, cfg_schedule, cfg_channels),
        guidance_power=deprecated_flag("--guidance-power", guidance_power, "--cfg-power", cfg_power, 4.0),
        guidance_interval=parse_interval(guidance_interval),
        eta=eta,
    )
    options = EvaluateOptions(
        model_dir=model,
        out_dir=out,
        num_samples=num_samples,
        sampling=sampling,
        classes=labels,
        seed=seed,
        batch_size=batch_size,
        reference=reference,
        inception_weights=inception_weights,
        dinov2_weights=dinov2_weights,
        metrics=tuple(m for m in metrics.split(",") if m.strip()),
        export_npz=export_npz,
        vae=vae,
        cache_dir=cache_dir,
        feature_layer=feature_layer.value,
        feature_batch_size=feature_batch_size,
        feature_workers=feature_workers,
        kid_subset_size=kid_subset_size,
        prc_memory_gb=prc_memory_gb,
        prc_precision=prc_precision.value,
        prc_reference_limit=prc_reference_limit,
        prc_seed=prc_seed,
        device=device,
        precision=precision.value,
        compile=compile,
        guide_model=guide_model,
    )
    run_evaluate(options)


def sample(
    model: Model,
    grid: Annotated[Path, typer.Option("--grid", help="Output PNG.")],
    classes: Annotated[
        str,
        typer.Option(
            "--classes", help="One row per class, e.g. 88,207,360; 'all' draws --num samples with uniform labels."
        ),
    ] = "all",
    per_class: Annotated[int, typer.Option("--per-class", help="Samples per class (columns).")] = 4,
    num: Annotated[int, typer.Option("--num", help="Number of samples when --classes is 'all'.")] = 16,
    sampler: SamplerOption = None,
    steps: Steps = None,
    guidance_scale: GuidanceScale = None,
    guidance_schedule: GuidanceSchedule = None,
    guidance_channels: GuidanceChannels = GuidedChannels.three,
    guidance_interval: GuidanceInterval = None,
    seed: Seed = 0,
    pixels: Annotated[Pixels | None, typer.Option("--pixels", help=PIXELS_HELP)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per network batch.")] = 16,
    vae: Vae = None,
    device: Device = None,
    precision: PrecisionOption = Precision.auto,
    compile: Compile = False,
    cfg_scale: OldScale = None,
    cfg_schedule: OldSchedule = None,
    cfg_channels: OldChannels = None,
) -> None:
    """A quick look at a model: sample a few images and save them as one PNG grid (no store, no metrics)."""
    from pipeline.core.logs import setup_logging
    from pipeline.evaluate import sample_grid

    setup_logging()
    path = sample_grid(
        model,
        grid,
        parse_classes(classes),
        per_class=per_class,
        num=num,
        sampling=_sampling_settings(
            sampler,
            steps,
            guidance_scale,
            guidance_schedule,
            guidance_channels,
            pixels,
            old=(cfg_scale, cfg_schedule, cfg_channels),
            guidance_interval=parse_interval(guidance_interval),
        ),
        seed=seed,
        vae=vae,
        batch_size=batch_size,
        device=device,
        precision=precision.value,
        compile=compile,
    )
    typer.echo(f"wrote {path}")


def docstring_help(function) -> str:
    """A docstring as --help text: lines of a paragraph joined (the terminal re-wraps them), paragraphs kept."""
    paragraphs = [
        " ".join(line.strip() for line in block.strip().splitlines())
        for block in (function.__doc__ or "").split("\n\n")
    ]
    return "\n\n".join(p for p in paragraphs if p)


def register(app: typer.Typer) -> None:
    """Add `evaluate` and `sample` to the diffit-pipe app."""
    app.command("evaluate", help=docstring_help(evaluate))(evaluate)
    app.command("sample", help=docstring_help(sample))(sample)
