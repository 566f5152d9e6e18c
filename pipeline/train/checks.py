"""Everything a run checks before Accelerate starts or any step runs.

The configuration (from --config, or the run directory's copy when resuming) and the checkpoint to resume
from (`prepare_config`); the dataset manifest against the model -- kind, resolution, latent channels / size,
VAE convention, classes, shards (`check_dataset`); that the model builds with the resolved keywords
(`model_kwargs`, `check_model_builds`); the batch split over processes (`resolve_batching`). Each problem is a
`TrainError` / `ConfigError` (exit 2) whose message names the flag or file and the fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError
from pipeline.core.storage import Location
from pipeline.train.checkpoint import (
    CONFIG_COPY,
    CheckpointError,
    list_checkpoints,
    read_train_state,
    resolve_checkpoint,
    verified_checkpoint,
)
from pipeline.train.config import (
    FREE_ON_RESUME,
    FROZEN_ON_RESUME,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    one_line,
)
from pipeline.train.repa import check_repa_inputs

logger = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"


class TrainError(InputError):
    """A run that cannot start or continue (bad data for the model, inconsistent resume, ...)."""


@dataclass
class TrainOptions:
    """What the command line gives the trainer."""

    run_dir: Path
    config_path: Path | None = None
    data_dir: str | Path | None = None  # a directory or an object-store URL (s3://..., gs://...)
    overrides: list[str] = field(default_factory=list)
    resume: str | None = None  # None, "auto" or a checkpoint / run path


@dataclass
class DatasetInfo:
    """The checked dataset: manifest, shard paths and their sha256 (the loader checks every shard it reads
    against it), the manifest's hash, and the number of classes the model is built with."""

    data_dir: str  # an absolute local path or an object-store URL
    manifest: dict[str, Any]
    urls: list[str]
    manifest_hash: str
    kind: str
    num_classes: int
    sha256: list[str] = field(default_factory=list)  # of each of `urls`
    latent_norm: Any = None  # latents: the `diffit.latent_norm.LatentNorm` the model trains with (`data.latent_norm`)

    def __post_init__(self) -> None:
        if self.latent_norm is None and self.kind == "latents":  # built without `check_dataset`: the VAE's factors
            self.latent_norm = latent_norm_of("scalar", self.manifest, self.manifest_path)

    @property
    def scaling_factor(self) -> float:
        return float(self.manifest["vae"]["scaling_factor"]) if self.kind == "latents" else 1.0

    @property
    def manifest_path(self) -> str:
        """The manifest's path or URL (named in messages)."""
        return f"{self.data_dir.rstrip('/')}/manifest.json"

    def dataset_entry(self) -> dict[str, Any]:
        """Identity of the data recorded in checkpoints and exports."""
        entry = {
            "manifest_hash": self.manifest_hash,
            "path": self.data_dir,
            "kind": self.kind,
            "resolution": self.manifest["resolution"],
            "num_classes": self.num_classes,
            "samples": self.manifest["counts"].get("written"),
            # {class folder name: index}: the export's class names (`diffit.labels`, DiffiTPipeline.id2label).
            "label_map": self.manifest["label_map"],
        }
        if self.kind == "latents":
            entry.update(latent_channels=self.manifest["latent_channels"], latent_size=self.manifest["latent_size"])
        return entry


@dataclass
class CheckedRun:
    """A run that passed every check: its configuration, its dataset and where it starts."""

    config: Config
    info: DatasetInfo
    checkpoint: Path | None  # None: a fresh start
    resume_state: dict[str, Any] | None  # the checkpoint's train state

    @property
    def step(self) -> int:
        """Optimizer steps already taken (the checkpoint's step, 0 for a fresh start)."""
        return int(self.resume_state["step"]) if self.resume_state is not None else 0

    @property
    def images_seen(self) -> int:
        return int(self.resume_state["images_seen"]) if self.resume_state is not None else 0


def check_run(args: TrainOptions) -> CheckedRun:
    """The configuration, the resume point and the dataset, all checked (the data directory defaults to the one
    the resumed run was trained on, and must still hold the same data)."""
    config, checkpoint = prepare_config(args)
    resume_state = read_train_state(checkpoint) if checkpoint is not None else None
    data_dir = args.data_dir
    if data_dir is None:
        if resume_state is None:
            raise TrainError("--data is required (the output directory of `diffit-pipe encode` / `pack`)")
        data_dir = resume_state["dataset"]["path"]
    info = check_dataset(config, data_dir)
    check_model_builds(config.model.name, model_kwargs(config, info))
    # REPA: its encoder file is there, latent shards hold the images (online) or this run's targets (stored)
    check_repa_inputs(config, info, model_kwargs(config, info))
    if resume_state is not None and resume_state["dataset"]["manifest_hash"] != info.manifest_hash:
        raise TrainError(
            f"--data {data_dir}: manifest hash {info.manifest_hash[:12]} differs from the one this run "
            f"was trained on ({resume_state['dataset']['manifest_hash'][:12]}); the dataset changed"
        )
    return CheckedRun(config=config, info=info, checkpoint=checkpoint, resume_state=resume_state)


# ---------------------------------------------------------------------------------------------------------------
# The dataset against the model
# ---------------------------------------------------------------------------------------------------------------


def check_dataset(config: Config, data_dir: str | Path | Location) -> DatasetInfo:
    """Read the manifest and refuse data that does not fit the model config (clear error, no step taken).
    `data_dir`: a directory or an object-store URL."""
    from diffit.models import model_family, resolve_model_kwargs
    from pipeline.core.manifest import manifest_hash

    data_dir = _data_location(data_dir)
    manifest = _read_manifest(data_dir)
    where = data_dir.join("manifest.json")
    family = model_family(config.model.name)
    _check_kind(config, family, manifest, where)
    built = resolve_model_kwargs(config.model.name, **configured_model_kwargs(config))
    if family == "latent":
        _check_latents_fit(config, built, manifest, where)
    else:
        _check_images_fit(config, built, manifest, where)
    num_classes = _resolve_num_classes(config, manifest, where)
    urls, digests = _check_shards(data_dir, manifest, where)
    return DatasetInfo(
        data_dir=data_dir.url,
        manifest=manifest,
        urls=urls,
        manifest_hash=manifest_hash(data_dir),
        kind=manifest["kind"],
        num_classes=num_classes,
        sha256=digests,
        latent_norm=_latent_norm(config, manifest, where) if family == "latent" else None,
    )


def latent_norm_of(kind: str, manifest: dict[str, Any], where: Any):
    """The `LatentNorm` a latent dataset gives for `data.latent_norm` = `kind`: the VAE's scaling and shift factors
    (a manifest written before the shift was recorded: 0), or the manifest's per-channel statistics (TrainError
    naming the manifest when it has none)."""
    from diffit.latent_norm import LatentNorm

    try:
        if kind == "channel":
            stats = manifest.get("latent_stats")
            if stats is None:
                raise TrainError(
                    f"{where}: data.latent_norm is 'channel' but this manifest has no per-channel statistics "
                    "(latent_stats); run the same `diffit-pipe encode` command again (it keeps the shards and adds "
                    "them), or set data.latent_norm: scalar"
                )
            return LatentNorm.channel(stats["mean"], stats["std"])
        vae = manifest["vae"]
        return LatentNorm.scalar(vae["scaling_factor"], vae.get("shift_factor", 0.0))
    except ValueError as error:
        raise TrainError(f"{where}: data.latent_norm {kind}: {error}") from None


def _latent_norm(config: Config, manifest: dict[str, Any], where: Any):
    return latent_norm_of(config.data.latent_norm, manifest, where)


def _data_location(data_dir: str | Path | Location) -> Location:
    """The Location of --data; TrainError (one line) when its URL cannot be opened."""
    from pipeline.core.storage_io import StorageError

    try:
        return Location.of(data_dir)
    except StorageError as error:
        raise TrainError(f"--data {data_dir}: {error}") from None


def _read_manifest(data_dir: Location) -> dict[str, Any]:
    from pipeline.core.manifest import ManifestError, load_manifest

    if data_dir.is_local and not data_dir.exists():
        raise TrainError(
            f"--data {data_dir}: no such directory (pass the output directory of `diffit-pipe encode` "
            "or `diffit-pipe pack`)"
        )
    try:
        return load_manifest(data_dir)
    except ManifestError as error:
        raise TrainError(f"--data {data_dir}: {error}") from None


def _check_kind(config: Config, family: str, manifest: dict[str, Any], where: str) -> None:
    """Latent models train on latent shards (`encode`), image-space models on image shards (`pack`)."""
    kind = manifest["kind"]
    wanted = "latents" if family == "latent" else "images"
    if kind != wanted:
        raise TrainError(
            f"{where}: kind {kind!r}, but {config.model.name} is a {family} model that trains on "
            f"{wanted!r} shards (`diffit-pipe {'encode' if wanted == 'latents' else 'pack'}`)"
        )


def _check_latents_fit(config: Config, built: dict[str, Any], manifest: dict[str, Any], where: str) -> None:
    """Unscaled latents with a scaling factor, as many channels and the same grid size as the model takes."""
    for key in ("latent_channels", "latent_size", "vae"):
        if key not in manifest:
            raise TrainError(f"{where}: latent manifest lacks {key!r}")
    vae = manifest["vae"]
    if vae.get("convention", "unscaled") != "unscaled":
        raise TrainError(
            f"{where}: vae.convention {vae.get('convention')!r}; the trainer expects unscaled "
            "latents (it applies vae.scaling_factor itself)"
        )
    if not isinstance(vae.get("scaling_factor"), (int, float)):
        raise TrainError(f"{where}: vae.scaling_factor is missing or not a number")
    if manifest["latent_channels"] != built["in_channels"]:
        raise TrainError(
            f"{where}: latents have {manifest['latent_channels']} channels but {config.model.name} "
            f"takes {built['in_channels']} (a different VAE?)"
        )
    size, model_size = manifest["latent_size"], built["input_size"]
    if size != model_size:
        raise TrainError(
            f"{where}: latents are {size}x{size} ({manifest['resolution']} px) but the model is built for "
            f"{model_size}x{model_size}; set `model.input_size: {size}` (--set model.input_size={size}) or use "
            "matching data"
        )


def _check_images_fit(config: Config, built: dict[str, Any], manifest: dict[str, Any], where: str) -> None:
    """RGB images at the resolution the model is built for."""
    if manifest["resolution"] != built["img_resolution"]:
        raise TrainError(
            f"{where}: images are {manifest['resolution']} px but {config.model.name} is built for "
            f"{built['img_resolution']} px (set model.input_size or use matching data)"
        )
    if built["in_channels"] != 3:
        raise TrainError(f"{where}: image shards are RGB but the model takes {built['in_channels']} channels")


def _resolve_num_classes(config: Config, manifest: dict[str, Any], where: str) -> int:
    """model.num_classes, or the dataset's when it is null; a conditional model needs labels covering its
    classes (0 trains an unconditional model, ignoring any labels)."""
    data_classes = int(manifest.get("num_classes") or 0)
    labelled = data_classes > 0
    num_classes = config.model.num_classes
    if num_classes is None:
        return data_classes
    if num_classes > 0 and not labelled:
        raise TrainError(
            f"{where}: the dataset is unlabelled (num_classes {manifest.get('num_classes')}) but "
            f"model.num_classes is {num_classes}; set model.num_classes: 0 (or null) for an "
            "unconditional model"
        )
    if 0 < num_classes < data_classes:
        raise TrainError(f"{where}: the dataset has {data_classes} classes but model.num_classes is {num_classes}")
    if num_classes == 0 and labelled:
        logger.info("model.num_classes is 0: training an unconditional model; the dataset's labels are ignored")
    return num_classes


def _check_shards(data_dir: Location, manifest: dict[str, Any], where: str) -> tuple[list[str], list[str]]:
    """The paths of the non-empty shards, each present with the size the manifest records, and the sha256 the
    manifest records for each (the loader checks every shard against it as it reads it: no second pass here)."""
    from pipeline.core.manifest import shard_urls
    from pipeline.core.shards import shard_problems

    urls = shard_urls(data_dir, manifest)
    if not urls:
        raise TrainError(f"{where}: the dataset has no non-empty shard")
    entries = [entry for entry in manifest["shards"] if entry["count"] > 0]
    for entry in entries:
        problems = shard_problems(data_dir, entry, rehash=False)
        if problems:
            raise TrainError(
                f"{where}: {problems[0]} (re-run encode/pack; `diffit-pipe inspect DATA --verify` checks every shard)"
            )
    digests = [entry.get("sha256") for entry in entries]
    for entry, digest in zip(entries, digests):
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise TrainError(f"{where}: shard {entry.get('name')!r} has no valid sha256 (got {digest!r})")
    if len(digests) != len(urls):
        raise TrainError(f"{where}: {len(urls)} shard paths for {len(digests)} non-empty shard entries")
    return urls, digests


# ---------------------------------------------------------------------------------------------------------------
# The model's keywords
# ---------------------------------------------------------------------------------------------------------------


def configured_model_kwargs(config: Config) -> dict[str, Any]:
    """The `create_model` keywords the configuration sets: `model.kwargs`, learn_sigma (latent models), the input
    size (`model.input_size`, the latent grid or the image resolution) and the augment labels of EDM's
    augmentation (`augment_dim`: EDM's networks always; the DiffiT U-Net when it augments, so that runs without
    augmentation keep the model keywords they always had)."""
    from diffit.models import model_family

    family = model_family(config.model.name)
    kwargs = dict(config.model.kwargs)
    if family == "latent":
        kwargs["learn_sigma"] = config.diffusion.learn_sigma
    if family == "songunet" or (family == "image" and (config.data.augment > 0 or "augment_dim" in kwargs)):
        kwargs["augment_dim"] = augment_dim(config)
    if config.model.input_size is not None:
        kwargs["input_size" if family == "latent" else "img_resolution"] = config.model.input_size
    return kwargs


def augment_dim(config: Config) -> int:
    """The augment labels an EDM network of this run reads: the 9 of EDM's augmentation with `data.augment` > 0,
    else none (as EDM's train.py; a network with augment inputs that never sees labels would hold parameters no
    step trains). A `model.kwargs.augment_dim` that says otherwise is a ConfigError."""
    from diffit.augment import edm_augment_pipe

    wanted = edm_augment_pipe(config.data.augment).label_dim if config.data.augment > 0 else 0
    given = config.model.kwargs.get("augment_dim", wanted)
    if given != wanted:
        raise ConfigError(
            f"model.kwargs.augment_dim {given!r} contradicts data.augment {config.data.augment} (which gives "
            f"augment_dim {wanted}): leave model.kwargs.augment_dim out, the trainer sets it from data.augment"
        )
    return wanted


def model_kwargs(config: Config, info: DatasetInfo) -> dict[str, Any]:
    """The `create_model` keywords of the run: the configured ones and the number of classes resolved against
    the dataset (EDM's SongUNet calls it label_dim: the size of its one-hot class vector)."""
    from diffit.models import model_family

    classes = "label_dim" if model_family(config.model.name) == "songunet" else "num_classes"
    return {**configured_model_kwargs(config), classes: info.num_classes}


def check_model_builds(name: str, kwargs: dict[str, Any]) -> None:
    """Build the model on the meta device (no memory, no time) so that a bad `model.kwargs` entry is a clear
    configuration error before Accelerate starts."""
    import torch

    from diffit.models import create_model

    try:
        with torch.device("meta"):
            create_model(name, **kwargs)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model {name} cannot be built with {kwargs}: {error}") from None


# ---------------------------------------------------------------------------------------------------------------
# Batching, precision, configuration and resume point
# ---------------------------------------------------------------------------------------------------------------


def resolve_batching(config: Config, world_size: int) -> tuple[int, int]:
    """(per-device micro-batch, accumulation steps) with global = per_device x processes x accumulation."""
    global_batch = config.train.global_batch_size
    per_device = config.train.per_device_batch_size
    if per_device is None:
        if global_batch % world_size:
            raise ConfigError(
                f"train.global_batch_size {global_batch} is not divisible by {world_size} processes; "
                "set train.per_device_batch_size or change the global batch"
            )
        return global_batch // world_size, 1
    if global_batch % (per_device * world_size):
        raise ConfigError(
            f"train.global_batch_size {global_batch} is not divisible by per_device_batch_size "
            f"{per_device} x {world_size} processes (global = per_device x processes x accumulation)"
        )
    return per_device, global_batch // (per_device * world_size)


def resolve_mixed_precision(setting: str) -> str:
    """'auto' -> bf16 on a bf16-capable GPU, fp32 ("no") otherwise."""
    import torch

    if setting != "auto":
        if setting != "no" and not torch.cuda.is_available():
            logger.warning(
                "train.mixed_precision=%s on CPU: bf16/fp16 on CPU is only fast with AVX-512 bf16 "
                "(see bench/train_step.py); use 'no' for fp32",
                setting,
            )
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _diff_sections(old: dict, new: dict, sections: tuple[str, ...]) -> list[str]:
    """'section.key: old -> new' for every differing key of `sections` (performance-only keys excepted)."""
    differences = []
    for section in sections:
        for key in sorted(set(old.get(section, {})) | set(new.get(section, {}))):
            before, after = old.get(section, {}).get(key), new.get(section, {}).get(key)
            if before != after and f"{section}.{key}" not in FREE_ON_RESUME:
                differences.append(f"{section}.{key}: {before!r} -> {after!r}")
    return differences


def prepare_config(args: TrainOptions) -> tuple[Config, Path | None]:
    """The run's configuration (from --config, or the run dir's config.yaml when resuming) and the checkpoint to
    resume from (None: fresh start). Checks that a resumed run is the same experiment."""
    run_dir = Path(args.run_dir)
    stored = run_dir / RUN_CONFIG
    if args.config_path is not None:
        config = load_config(args.config_path, args.overrides)
    elif stored.is_file() and args.resume:
        config = load_config(stored, args.overrides)
    else:
        raise ConfigError(
            "--config is required (a preset from manifests/, e.g. manifests/demo.yaml) unless "
            f"resuming a run whose {stored} exists"
        )
    checkpoint = _resume_point(args, run_dir)
    if checkpoint is not None:
        _check_same_experiment(config, checkpoint)
    return config, checkpoint


def _resume_point(args: TrainOptions, run_dir: Path) -> Path | None:
    """The checkpoint --resume names (None: fresh start); a fresh start into a run dir with checkpoints is an
    error, so a forgotten --resume never overwrites a run."""
    if args.resume == "auto":
        try:
            checkpoint = verified_checkpoint(run_dir)
        except CheckpointError as error:
            raise TrainError(f"--resume auto: {error}") from None
        if checkpoint is None:
            logger.info("--resume auto: no checkpoint in %s, starting from step 0", run_dir)
        return checkpoint
    if args.resume:
        try:
            return resolve_checkpoint(args.resume)
        except CheckpointError as error:
            raise TrainError(f"--resume {args.resume}: {error}") from None
    if list_checkpoints(run_dir):
        raise TrainError(
            f"{run_dir} already holds checkpoints: pass --resume auto to continue that run, or a new --run-dir"
        )
    return None


def _check_same_experiment(config: Config, checkpoint: Path) -> None:
    """Only train / checkpoint / sample settings (and the performance-only keys) may change on resume."""
    import yaml

    from pipeline.core.yamlfile import read_yaml_file

    try:
        saved = read_yaml_file(checkpoint / CONFIG_COPY)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise TrainError(
            f"{checkpoint / CONFIG_COPY}: cannot read the checkpoint's configuration ({one_line(error)})"
        ) from None
    if not isinstance(saved, dict):
        raise TrainError(f"{checkpoint / CONFIG_COPY}: not a configuration mapping")
    # Read through the schema: a setting added since the checkpoint was written takes its default, which is what
    # runs did before it existed (diffusion.time_sampling: uniform, data.latent_norm: scalar, ...).
    try:
        saved = config_to_dict(config_from_dict(saved, str(checkpoint / CONFIG_COPY)))
    except ConfigError as error:
        raise TrainError(str(error)) from None
    differences = _diff_sections(saved, config_to_dict(config), FROZEN_ON_RESUME)
    if differences:
        raise TrainError(
            f"--resume {checkpoint}: the configuration differs from the checkpoint's in "
            f"{', '.join(differences)}; only train / checkpoint / sample settings and "
            f"{', '.join(FREE_ON_RESUME)} may change on resume (start a new run dir for a "
            "different experiment)"
        )
