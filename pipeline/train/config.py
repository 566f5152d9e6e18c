"""Training configuration: dataclasses, strict YAML loading and `--set key=value` overrides.

A preset (`manifests/*.yaml`) is a nested mapping whose sections mirror the dataclasses below. Loading is strict:
an unknown section or key is an error naming it (and the file), and every value is type-checked against the
field's annotation (ints are accepted for floats; strings such as "3e-4", which YAML 1.1 reads as text, are
accepted for float fields when they parse as numbers). `--set optim.lr=1e-4` overrides one leaf; the value is
read as YAML and checked the same way. YAML is read by `pipeline.core.yamlfile` (`yaml.safe_load` without
aliases, files up to 1 MiB): a 400-byte alias bomb is refused at its first alias.

The resolved configuration is written into the run directory (`config.yaml`) so that a run can be resumed and
exported without the original preset.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.core.errors import InputError, brief, one_line
from pipeline.core.yamlfile import SettingError, parse_setting, read_yaml_file


class ConfigError(InputError):
    """A configuration file or override that does not fit the schema."""


@dataclass
class ModelConfig:
    """Which network to train (`diffit.models.create_model` name) and its overrides."""

    name: str = "DiffiT-Tiny/2"
    # None: from the dataset manifest (its num_classes, 0 for unlabelled data). An explicit value must cover the
    # dataset's labels; a conditional model on unlabelled data is an error.
    num_classes: int | None = None
    # Latent grid / image size the network is built for; None keeps the registry value. Must match the data.
    input_size: int | None = None
    # Any other `create_model` keyword (e.g. `dropout` of the image U-Net).
    kwargs: dict = field(default_factory=dict)
    # Recompute activations in the backward pass (LatentDiffiT supports it; memory for ~30% more compute).
    gradient_checkpointing: bool = False
    # torch.compile the training network (the EMA copy and sampling stay eager). Off by default until measured
    # faster on a GPU (`bench/train_step.py --device cuda` compares both; compiling costs minutes at start).
    compile: bool = False
    # Channels-last memory format for the model and its input batches (CUDA). It speeds up convolutions on tensor
    # cores; the latent DiffiT is a transformer with one convolution (the patch embedding), so it gains nothing
    # there -- for the image-space U-Net, measure before turning it on.
    channels_last: bool = False


@dataclass
class DiffusionConfig:
    """Training objective: ADM hybrid loss with learned Sigma ("adm"), EDM preconditioning + loss ("edm"), or flow
    matching ("flow": the linear path with t = 1 at the noise, velocity prediction, `diffit.flow`)."""

    type: Literal["adm", "edm", "flow"] = "adm"
    noise_schedule: Literal["linear", "cosine"] = "linear"
    diffusion_steps: int = 1000
    learn_sigma: bool = True
    # edm: the preconditioning and loss (NVlabs/edm training/networks.py, loss.py; `diffit.edm`). "edm": EDM's own
    # (sigma_data, P_mean, P_std below); "vp" / "ve": Song et al.'s variance-preserving / -exploding SDEs in EDM's
    # form (DDPM++ / NCSN++ baselines, the DiffiT paper's Table 5), with EDM's fixed constants (VP: beta_d 19.9,
    # beta_min 0.1, M 1000, t in [1e-5, 1]; VE: sigma in [0.02, 100]). Exported with the model: sampling wraps the
    # network in the same preconditioning and clips the Heun grid to its sigma range.
    precond: Literal["edm", "vp", "ve"] = "edm"
    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    # flow: training times t ~ U(0, 1) or logit-normal(logit_mean, logit_std) (REPA's "lognormal" = (0, 1)), then
    # SD3's shift t' = time_shift t / (1 + (time_shift - 1) t)
    time_sampling: Literal["uniform", "logit-normal"] = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_shift: float = 1.0


@dataclass
class DataConfig:
    """How shards are streamed (see `pipeline.data`)."""

    # True: shards drawn with replacement, infinite stream, shuffle buffer (training). False: fixed order, fixed
    # epochs, no shuffle buffer -- deterministic and exactly resumable (tests, debugging).
    resampled: bool = True
    shuffle_buffer: int = 1000
    num_workers: int = 2
    prefetch_factor: int = 2
    # Latents: pick the stored flipped latent with probability 0.5; images: flip with probability 0.5.
    hflip: bool = True
    # Latents only: what the model sees of a VAE latent z (`diffit.latent_norm`). "scalar": the VAE's
    # scaling_factor * (z - shift_factor) (SD, SD3, FLUX); "channel": (z - mean_c) / std_c with the dataset's
    # per-channel statistics of the posterior means (the manifest's latent_stats; EDM2, LightningDiT).
    latent_norm: Literal["scalar", "channel"] = "scalar"
    # Probability of replacing a class label by the null class (classifier-free guidance training; EDM's SongUNet
    # sees the null class as the all-zero class vector, as its own label dropout makes it).
    label_dropout: float = 0.1
    # EDM's augmentation probability (train.py --augment; CIFAR-10: 0.12, FFHQ-64: 0.15), 0 = off. Images only (the
    # DiffiT U-Net and EDM's DDPM++ / NCSN++), EDM training only: each batch goes through
    # `diffit.augment.edm_augment_pipe(augment)` (x-flip, y-flip, scale, rotation, anisotropy, translation) before
    # the loss, and the network is built with
    # augment_dim 9 and told what was applied; sampling passes no augment labels (no augmentation). Independent of
    # `hflip`, which flips the data (EDM's --xflip).
    augment: float = 0.0
    # A shard whose sha256 differs from the manifest's (or that is not a readable tar): "error" stops the run
    # naming it; "skip" leaves it out, with a warning and a `skipped_shards` count in RUN/metrics.jsonl.
    on_corrupt_shard: Literal["error", "skip"] = "error"


@dataclass
class OptimConfig:
    """Optimizer and learning-rate ramp."""

    name: Literal["adamw", "adam"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Linear learning-rate ramp over this many thousand training images (EDM: 10000 = 10 Mimg); 0 = none.
    warmup_kimg: float = 0.0
    # Linear decay to 0 over this final fraction of `train.max_steps` (warmup-stable-decay); 0 = constant. Short
    # runs profit most: the last steps average out the gradient noise a constant rate leaves in the weights.
    decay_fraction: float = 0.0
    # Clip the global gradient norm to this value; None reports the norm without clipping.
    grad_clip: float | None = None
    # Fused (single-kernel) AdamW / Adam: None = on when every parameter is on a CUDA device, off elsewhere.
    fused: bool | None = None


@dataclass
class EMAConfig:
    """Exponential moving average of the fp32 weights (what gets exported and sampled)."""

    decay: float = 0.9999
    # EDM style: half-life in thousands of images (overrides `decay`), optionally ramped up as
    # min(halflife, images_seen * rampup_ratio).
    halflife_kimg: float | None = None
    rampup_ratio: float | None = None


@dataclass
class TrainConfig:
    """Batching, length, precision and logging of the run."""

    global_batch_size: int = 256
    # Per process and micro-step; None = global / processes (no accumulation). Accumulation steps =
    # global / (per_device x processes), which must be a whole number.
    per_device_batch_size: int | None = None
    max_steps: int = 400_000
    # "auto": bf16 on CUDA, fp32 ("no") on CPU.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 0
    log_every: int = 100
    # Any Accelerate tracker ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab",
    # "trackio"), a list of them, or "none". Scalars go to every one; sample grids to those that take images.
    tracker: str | list[str] = "tensorboard"
    # TF32 tensor-core matmuls and convolutions on CUDA (fp32 parts of the step; no effect on CPU).
    tf32: bool = True


@dataclass
class CheckpointConfig:
    """Training-state checkpoints (`accelerator.save_state` + EMA) in `RUN/checkpoints/`."""

    every: int = 5000
    keep: int = 3
    # Milestones: checkpoints whose step is a multiple of this are never deleted by rotation (0 = none); the
    # `keep` newest are kept as well, milestones or not.
    keep_every: int = 0


@dataclass
class SampleConfig:
    """EMA sample grids written to `RUN/samples/step-XXXXXXX.png` while training.

    The sampling settings have their one name each (`diffit.sampling_config.SETTINGS`, as `diffit-pipe evaluate` and
    studies take them) and become the run's `SamplingConfig` in `pipeline.train.samples.sampling_config`; guidance
    applies to class-conditional models only. `pixels` is not among them: a grid is a preview, converted as
    `pipeline.core.vae.decode_latents` does.
    """

    every: int = 10_000  # 0 disables
    count: int = 16
    seed: int = 0
    sampler: Literal["ddpm", "ddim", "edm-heun", "euler", "heun", "euler-maruyama"] = "ddim"
    steps: int = 25
    guidance_scale: float = 1.0
    guidance_schedule: Literal["constant", "power-cosine"] = "constant"
    guidance_power: float = 4.0
    guidance_channels: int | Literal["all"] = 3  # the first three latent channels (DiffiT), or "all"
    guidance_interval: list[float] | None = None  # [low, high] of sigma (ADM / EDM) or t (flow); None: everywhere
    eta: float = 0.0  # DDIM only


@dataclass
class EvalConfig:
    """FID (and FD_DINOv2) of the EMA model during training (`pipeline.train.fid`), logged as `fid_{N}k` (and
    `fd_dinov2_{N}k`) in RUN/metrics.jsonl.

    Every `every` steps (0: never) `num_samples` images are sampled on all processes with the evaluate stage's
    per-sample seeds and labels (the same images for any number of processes); `metrics` (the evaluate stage's
    names: `fid`, `fd_dinov2`) are computed from those images: their Inception / DINOv2 ViT-L/14 features are
    scored against the cached features / stored statistics of `reference` (any reference `diffit-pipe evaluate`
    takes). Non-official Inception weights log `plumbing_only_fid_{N}k`, DINOv2 weights not recognised as the
    published ViT-L/14 `plumbing_only_fd_dinov2_{N}k` instead.
    """

    every: int = 0
    num_samples: int = 5000
    metrics: list[str] = field(default_factory=lambda: ["fid"])
    reference: str | None = None
    # fd_dinov2: DINOv2 ViT-L/14 weights (`dinov2_vitl14_pretrain.pth`), as `diffit-pipe evaluate --dinov2-weights`.
    dinov2_weights: str | None = None
    # None: torch-fidelity's cache location (as `diffit-pipe evaluate`).
    inception_weights: str | None = None
    feature_layer: str = "2048"
    cache_dir: str | None = None  # reference feature cache; None: beside the reference (evaluate's default)
    batch_size: int = 32  # samples per process and sampler call
    feature_batch_size: int = 64
    # Sampling settings as in the `sample` section (their one name each); None takes the `sample` section's value.
    sampler: Literal["ddpm", "ddim", "edm-heun", "euler", "heun", "euler-maruyama"] | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    guidance_schedule: Literal["constant", "power-cosine"] | None = None
    guidance_power: float | None = None
    guidance_channels: int | Literal["all"] | None = None
    guidance_interval: list[float] | None = None
    eta: float | None = None
    seed: int = 0


@dataclass
class RepaConfig:
    """REPA (Yu et al. 2024, `pipeline.train.repa`): align the tokens after one block of the model, through a trained
    projector, to a frozen encoder's per-patch features of the batch's images. REPA's SiT-XL/2 setting: weight 0.5,
    depth 8, projector_dim 2048, encoder dinov2-vitb14. Latent models need shards that hold each sample's image
    (`diffit-pipe encode --keep-images`, `targets: online`) or the targets themselves (`encode --encoder-targets`,
    `targets: stored`); image-space DiffiT U-Nets use the batch itself."""

    # lambda: each micro-batch trains the objective's loss + weight * repa_loss (-mean cosine similarity of the
    # projected tokens and the encoder's); 0 = off. RUN/metrics.jsonl logs `repa_loss` beside `loss` (the
    # objective's loss alone, as REPA logs its denoising loss).
    weight: float = 0.0
    # k, 1-based (REPA's encoder_depth): the block whose output tokens are aligned. Latent DiffiT: block k of
    # `model.blocks`; DiffiT U-Net: the k-th DiffiT ResBlock in forward order (encoder stages, then decoder stages),
    # its feature map read as tokens. Must lie within the model's blocks.
    depth: int = 8
    # Width of REPA's 3-layer MLP projector (hidden -> projector_dim -> projector_dim -> encoder width, SiLU).
    projector_dim: int = 2048
    # The frozen encoder: DINOv2 ViT-S/B/L/G-14 (patch tokens after the final norm; input size = the model's token
    # grid x 14 px, e.g. REPA's 224 px for 16 x 16 tokens), or `demo-classifier` (the demo's classifier: its last
    # feature map, for demo-scale runs).
    encoder: Literal["dinov2-vits14", "dinov2-vitb14", "dinov2-vitl14", "dinov2-vitg14", "demo-classifier"] = (
        "dinov2-vitb14"
    )
    # DINOv2: `dinov2_vit?14_pretrain.pth` or timm's model.safetensors; demo-classifier: the classifier's directory.
    # Nothing is downloaded. May change on resume (another machine's path to the same file). With stored targets it
    # is not loaded, only hashed: its sha256 must be the one the dataset's targets were computed with.
    encoder_weights: str | None = None
    # Where the targets come from (latent models): `online` runs the encoder on each batch's images (the shards hold
    # the crops: `encode --keep-images`); `stored` reads the encoder's tokens of the crop or its flip, whichever
    # view the sample takes, from the shards (`encode --encoder-targets ENCODER --encoder-weights PATH`) and never
    # loads the encoder. The same targets to float16 precision. Default online: measured in docs/benchmarks.md
    # ("REPA's targets: stored or online"), storing DINOv2-B/14's tokens costs 0.79 MB per sample (1.01 TB for
    # ImageNet-256, 21x its latents, ~0.44 GB/s of reads per H100) to save 6.5% of a DiffiT-XL/2 training step.
    targets: Literal["online", "stored"] = "online"


@dataclass
class Config:
    """The whole training configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)


# Sections whose change would make a resumed run a different experiment (checked by the trainer on resume).
FROZEN_ON_RESUME = ("model", "diffusion", "data", "optim", "ema", "repa")
# ... except these performance settings, which do not change what is learned (another machine may need them).
# `data.on_corrupt_shard` too: a run stopped by a damaged shard may be continued with `skip`.
FREE_ON_RESUME = (
    "data.num_workers",
    "data.prefetch_factor",
    "data.on_corrupt_shard",
    "model.compile",
    "model.channels_last",
    "model.gradient_checkpointing",
    "optim.fused",
    "repa.encoder_weights",
)

# Seeds (train.seed, sample.seed, eval.seed) are in [0, 2**32 - 1]: numpy's seeding refuses negative ones, and
# the per-rank, per-worker and per-sample seeds derived from them must stay within the 64 bits torch takes.
MAX_SEED = 2**32 - 1

# The trackers `train.tracker` may name (Accelerate's, without "all": a run names what it logs to).
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")


# ---------------------------------------------------------------------------------------------------------------
# Type checking
# ---------------------------------------------------------------------------------------------------------------


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """`value` checked (and lightly converted) against a field annotation; ConfigError naming `where`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for option in non_none:
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {annotation}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)] if args else value
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got a boolean {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept it when it is a number.
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got the string {value!r}") from None
            if math.isnan(number):
                raise ConfigError(f"{where}: NaN is not a valid value")
            return number
        raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {annotation!r}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_mapping(cls: type, mapping: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and checking every value's type."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(mapping).__name__}")
    types_ = _field_types(cls)
    unknown = sorted(set(mapping) - set(types_))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}"
            + (f" (and {', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else "")
            + f"; known keys: {', '.join(types_)}"
        )
    values = {}
    for name, annotation in types_.items():
        if name not in mapping:
            continue
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(annotation):
            values[name] = _from_mapping(annotation, mapping[name], key)
        else:
            values[name] = _coerce(mapping[name], annotation, key)
    return cls(**values)


def config_from_dict(mapping: dict, source: str = "<config>") -> Config:
    """A `Config` from a nested mapping; errors name `source` and the offending key."""
    try:
        config = _from_mapping(Config, mapping, "")
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    validate(config, source)
    return config


def config_to_dict(config: Config) -> dict:
    """A plain nested dict (YAML/JSON-serialisable)."""
    return dataclasses.asdict(config)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML preset (`pipeline.core.yamlfile`), apply `key=value` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        mapping = read_yaml_file(path)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML ({one_line(error)})") from None
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(mapping).__name__}")
    for override in overrides:
        apply_override(mapping, override)
    return config_from_dict(mapping, str(path))


def apply_override(mapping: dict, override: str) -> None:
    """Apply one `a.b=value` override in place; the value is parsed as YAML ("1e-4" stays a number for floats).

    Keys are checked against the schema here so that a typo names the override, not the merged file.
    """
    try:
        key, value = parse_setting(override, "optim.lr=1e-4", empty="")
    except SettingError as error:
        raise ConfigError(str(error)) from None
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {brief(override)}: the key must be SECTION.FIELD (e.g. train.max_steps)")
    cls: Any = Config
    for depth, part in enumerate(parts):
        # `model.kwargs.<name>` is a free-form mapping of create_model overrides.
        if cls is dict:
            break
        types_ = _field_types(cls)
        if part not in types_:
            raise ConfigError(
                f"--set {override!r}: unknown key {'.'.join(parts[: depth + 1])!r}; known: {', '.join(types_)}"
            )
        cls = types_[part] if (dataclasses.is_dataclass(types_[part]) or types_[part] is dict) else None
        if cls is None and depth < len(parts) - 1:
            raise ConfigError(f"--set {override!r}: {'.'.join(parts[: depth + 1])!r} is not a section")
    node = mapping
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {part!r} is not a mapping in the config")
        node = child
    node[parts[-1]] = value


def validate(config: Config, source: str = "<config>") -> None:
    """Range checks that the type system does not express."""

    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(f"{source}: {message}")

    train, data, optim, ema = config.train, config.data, config.optim, config.ema
    seeds = {"train.seed": train.seed, "sample.seed": config.sample.seed, "eval.seed": config.eval.seed}
    for name, seed in seeds.items():
        need(0 <= seed <= MAX_SEED, f"{name} must be an integer in [0, {MAX_SEED}] (2**32 - 1), got {seed}")
    need(train.global_batch_size >= 1, f"train.global_batch_size must be >= 1, got {train.global_batch_size}")
    need(
        train.per_device_batch_size is None or train.per_device_batch_size >= 1,
        f"train.per_device_batch_size must be >= 1, got {train.per_device_batch_size}",
    )
    need(train.max_steps >= 1, f"train.max_steps must be >= 1, got {train.max_steps}")
    need(train.log_every >= 1, f"train.log_every must be >= 1, got {train.log_every}")
    need(config.checkpoint.every >= 1, f"checkpoint.every must be >= 1, got {config.checkpoint.every}")
    need(config.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {config.checkpoint.keep}")
    need(config.checkpoint.keep_every >= 0, f"checkpoint.keep_every must be >= 0, got {config.checkpoint.keep_every}")
    _check_trackers(train.tracker, need)
    need(config.sample.every >= 0, f"sample.every must be >= 0, got {config.sample.every}")
    need(config.sample.count >= 1 and config.sample.steps >= 1, "sample.count and sample.steps must be >= 1")
    from diffit.sampling_config import check_settings

    for section in ("sample", "eval"):
        try:
            check_settings(sampling_settings(getattr(config, section)))
        except ValueError as error:
            need(False, f"{section}.{error}")
    _check_eval(config, need)
    need(0.0 <= data.label_dropout < 1.0, f"data.label_dropout must be in [0, 1), got {data.label_dropout}")
    need(data.num_workers >= 0, f"data.num_workers must be >= 0, got {data.num_workers}")
    need(data.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {data.shuffle_buffer}")
    need(data.prefetch_factor >= 1, f"data.prefetch_factor must be >= 1, got {data.prefetch_factor}")
    need(optim.lr > 0, f"optim.lr must be > 0, got {optim.lr}")
    need(optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {optim.weight_decay}")
    need(
        len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
        f"optim.betas must be two numbers in [0, 1), got {optim.betas}",
    )
    need(optim.warmup_kimg >= 0, f"optim.warmup_kimg must be >= 0, got {optim.warmup_kimg}")
    need(0 <= optim.decay_fraction <= 1, f"optim.decay_fraction must be in [0, 1], got {optim.decay_fraction}")
    need(optim.grad_clip is None or optim.grad_clip > 0, f"optim.grad_clip must be > 0, got {optim.grad_clip}")
    need(0.0 <= ema.decay < 1.0, f"ema.decay must be in [0, 1), got {ema.decay}")
    need(ema.halflife_kimg is None or ema.halflife_kimg > 0, f"ema.halflife_kimg must be > 0, got {ema.halflife_kimg}")
    need(ema.rampup_ratio is None or ema.rampup_ratio > 0, f"ema.rampup_ratio must be > 0, got {ema.rampup_ratio}")
    need(config.diffusion.diffusion_steps >= 1, "diffusion.diffusion_steps must be >= 1")
    need(config.diffusion.sigma_data > 0, "diffusion.sigma_data must be > 0")
    if config.diffusion.type in ("edm", "flow"):
        kind = {"edm": "EDM", "flow": "flow"}[config.diffusion.type]
        need(not config.diffusion.learn_sigma, f"diffusion.learn_sigma must be false for {kind} training")
    need(
        config.sample.sampler in samplers_for(config.diffusion.type),
        f"sample.sampler {config.sample.sampler!r} does not sample diffusion.type {config.diffusion.type!r} models "
        f"(use one of {', '.join(samplers_for(config.diffusion.type))})",
    )
    need(config.diffusion.logit_std > 0, f"diffusion.logit_std must be > 0, got {config.diffusion.logit_std}")
    need(config.diffusion.time_shift > 0, f"diffusion.time_shift must be > 0, got {config.diffusion.time_shift}")
    from diffit.models import MODEL_CONFIGS, model_family

    need(
        config.model.name in MODEL_CONFIGS,
        f"model.name {config.model.name!r} is not a known model; known: {', '.join(MODEL_CONFIGS)}",
    )
    family = model_family(config.model.name)
    _check_edm_settings(config, family, need)
    _check_repa(config, need)
    # The paper trains latent models with ADM (learned sigma) and image-space models with EDM. Latent models may
    # also use EDM preconditioning: at low SNR it predicts the clean signal instead of the noise, which small
    # models learn far more easily (the demo's default). Image-space models have no learned-sigma output for ADM.
    need(
        family == "latent" or config.diffusion.type in ("edm", "flow"),
        f"model {config.model.name!r} is an image-space model, trained with diffusion.type 'edm' or 'flow' "
        f"(got {config.diffusion.type!r}: it has no learned-Sigma output)",
    )
    if family == "latent" and "learn_sigma" in config.model.kwargs:
        need(
            bool(config.model.kwargs["learn_sigma"]) == config.diffusion.learn_sigma,
            f"model.kwargs.learn_sigma={config.model.kwargs['learn_sigma']} contradicts diffusion.learn_sigma="
            f"{config.diffusion.learn_sigma}: set only diffusion.learn_sigma",
        )


def _check_repa(config: Config, need) -> None:
    """`repa.*`: ranges, a model with DiffiT blocks, block k among them, an encoder file named, no augmentation (the
    model would see augmented images while its targets come from the data's). Whether the file exists and the
    shards hold images is checked when a run starts (`pipeline.train.repa.check_repa_inputs`)."""
    repa = config.repa
    need(math.isfinite(repa.weight) and repa.weight >= 0, f"repa.weight must be >= 0 (0 = off), got {repa.weight}")
    need(repa.depth >= 1, f"repa.depth must be >= 1 (1-based block number, REPA's encoder_depth), got {repa.depth}")
    need(repa.projector_dim >= 1, f"repa.projector_dim must be >= 1, got {repa.projector_dim}")
    if repa.weight == 0:
        return
    from diffit.models import model_family
    from pipeline.train.repa import RepaError, block_count

    try:
        blocks = block_count(config.model.name, config.model.kwargs)
    except RepaError as error:
        need(False, str(error))
    need(
        repa.depth <= blocks,
        f"repa.depth {repa.depth} is beyond the {blocks} blocks of {config.model.name}; choose 1..{blocks}",
    )
    need(
        repa.encoder_weights is not None,
        f"repa.encoder_weights: repa.weight {repa.weight} needs the {repa.encoder} weights file (nothing is "
        "downloaded); set repa.encoder_weights: PATH",
    )
    need(
        config.data.augment == 0,
        f"data.augment {config.data.augment} with repa.weight {repa.weight}: the network would see augmented images "
        "while REPA's targets are the encoder's features of the data's; train REPA without EDM's augmentation",
    )
    need(
        repa.targets == "online" or model_family(config.model.name) == "latent",
        f"repa.targets stored: targets are stored in latent shards (`encode --encoder-targets`); {config.model.name} "
        "trains on images, whose targets are computed from the batch itself (repa.targets: online)",
    )


def _check_edm_settings(config: Config, family: str, need) -> None:
    """`diffusion.precond` and `data.augment` are EDM's training settings; EDM's networks (family songunet) train
    with EDM's loss only."""
    diffusion, augment = config.diffusion, config.data.augment
    need(
        diffusion.precond == "edm" or diffusion.type == "edm",
        f"diffusion.precond {diffusion.precond!r} is a preconditioning of EDM training (diffusion.type 'edm'), "
        f"not of diffusion.type {diffusion.type!r}",
    )
    need(
        family != "songunet" or diffusion.type == "edm",
        f"model.name {config.model.name!r} is EDM's DDPM++ / NCSN++ network (diffit.songunet), trained with "
        f"diffusion.type 'edm' (diffusion.precond edm | vp | ve); got diffusion.type {diffusion.type!r}",
    )
    need(0.0 <= augment <= 1.0, f"data.augment must be in [0, 1] (EDM's --augment probability), got {augment}")
    need(
        augment == 0 or family in ("songunet", "image"),
        f"data.augment {augment}: EDM's augmentation augments images for a network that takes its augment labels "
        f"(the DiffiT U-Net, EDM's DDPM++ / NCSN++); model.name {config.model.name!r} is a DiffiT {family} model",
    )
    need(
        augment == 0 or diffusion.type == "edm",
        f"data.augment {augment}: EDM's augmentation is part of EDM training (diffusion.type 'edm'), not of "
        f"diffusion.type {diffusion.type!r}",
    )


# The metrics `eval` computes during training (the evaluate stage's names for them).
TRAINING_METRICS = ("fid", "fd_dinov2")


def _check_eval(config: Config, need) -> None:
    """`eval.*`: counts, and a reference and the sampler a diffusion type can use when FID is on."""
    ev = config.eval
    need(ev.every >= 0, f"eval.every must be >= 0, got {ev.every}")
    if ev.every == 0:
        return
    need(ev.num_samples >= 2, f"eval.num_samples must be >= 2 (a covariance), got {ev.num_samples}")
    need(ev.batch_size >= 1 and ev.feature_batch_size >= 1, "eval.batch_size and eval.feature_batch_size must be >= 1")
    need(ev.steps is None or ev.steps >= 1, f"eval.steps must be >= 1, got {ev.steps}")
    need(ev.reference is not None, "eval.reference: FID during training (eval.every > 0) needs a reference")
    need(
        bool(ev.metrics) and set(ev.metrics) <= set(TRAINING_METRICS) and len(set(ev.metrics)) == len(ev.metrics),
        f"eval.metrics must be a non-empty list of distinct names from {list(TRAINING_METRICS)}, got {ev.metrics}",
    )
    need(
        "fd_dinov2" not in ev.metrics or ev.dinov2_weights is not None,
        "eval.dinov2_weights: fd_dinov2 during training needs the DINOv2 ViT-L/14 weights file "
        "(dinov2_vitl14_pretrain.pth; nothing is downloaded)",
    )
    sampler = ev.sampler or config.sample.sampler
    need(
        sampler in samplers_for(config.diffusion.type),
        f"eval.sampler {sampler!r} does not fit diffusion.type {config.diffusion.type!r}",
    )


def sampling_settings(section: SampleConfig | EvalConfig) -> dict[str, Any]:
    """The sampling settings of a `sample` / `eval` section by their one name each (`diffit.sampling_config.SETTINGS`
    but `pixels`, see `SampleConfig`; None: not set)."""
    from diffit.sampling_config import SETTINGS

    return {name: getattr(section, name) for name in SETTINGS if name != "pixels"}


def samplers_for(diffusion_type: str) -> tuple[str, ...]:
    """The samplers a model trained with `diffusion_type` is sampled with (`diffit.sampling`)."""
    return {"adm": ("ddpm", "ddim", "edm-heun"), "edm": ("edm-heun",)}.get(
        diffusion_type, ("euler", "heun", "euler-maruyama")
    )


def tracker_names(setting: str | list[str]) -> list[str]:
    """The trackers a `train.tracker` setting names, in order, without repeats ("none" and [] name none)."""
    names = [setting] if isinstance(setting, str) else list(setting)
    return list(dict.fromkeys(name for name in names if name != "none"))


def _check_trackers(setting: str | list[str], need) -> None:
    """`train.tracker`: known tracker names, or "none" alone."""
    names = [setting] if isinstance(setting, str) else list(setting)
    for name in names:
        need(
            name in TRACKERS or name == "none",
            f"train.tracker: {name!r} is not a tracker; one or a list of {', '.join(TRACKERS)}, or 'none'",
        )
    need("none" not in names or len(names) == 1, "train.tracker: 'none' cannot be combined with trackers")


def dump_config(config: Config) -> str:
    """The resolved configuration as YAML text (what `config.yaml` in the run directory holds)."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
