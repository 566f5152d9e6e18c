"""The train stage: an Accelerate trainer for latent (ADM) and image-space (EDM) DiffiT models.

Single process::

    diffit-pipe train --config manifests/demo.yaml --data DATA --run-dir runs/demo

Several processes (GPUs, or gloo on CPU) through `accelerate launch` around the same entry point::

    accelerate launch --multi_gpu --num_processes 8 --num_machines 1 --mixed_precision bf16 \\
        -m pipeline.train --config manifests/imagenet256_latent_xl2.yaml --data DATA --run-dir runs/x

(`accelerate launch --num_processes 2 --cpu` runs ONE process on CPU; for a CPU gloo run use the line above
with `--mixed_precision no --dynamo_backend no`, or `torchrun --standalone --nproc_per_node 2 -m pipeline.train`.)
Multi-node: add `--num_machines M --machine_rank R --main_process_ip IP --main_process_port PORT`; the run
directory must be on a filesystem every node sees (checkpoints hold each rank's RNG state).

What happens, in order: the configuration is loaded and checked, the dataset manifest is checked against the
model (kind, resolution, latent channels / size, classes) -- all before Accelerate starts or any step runs --,
then the model, its fp32 EMA, the optimizer and the shard stream are built, a checkpoint is restored when
resuming, and the loop runs `train.max_steps` optimizer steps of `global_batch_size` images each
(per-device batch x processes x accumulation). Every `train.log_every` steps loss, lr, grad-norm, images/s and
the fraction of step time spent waiting for data go to the trackers and to `RUN/metrics.jsonl`; every
`sample.every` steps an EMA sample grid goes to `RUN/samples/`; every `checkpoint.every` steps (and at the
end) a checkpoint (`pipeline.checkpoint`). A non-finite loss or gradient norm stops the run before the
optimizer step, so the last checkpoint is the last good state.

Resume (`--resume auto` = newest complete checkpoint of the run dir, or a checkpoint path): model, EMA,
optimizer, grad scaler and every rank's RNG state are restored, training continues at the checkpoint's step,
and the data stream continues as follows -- deterministic mode (`data.resampled: false`): the batches consumed
before the checkpoint are skipped, so the continued run is identical to an uninterrupted one; resampled mode:
a fresh stream whose seed is derived from (seed, rank, worker, step), i.e. no sample order is replayed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .atomic import write_text_atomic
from .checkpoint import (CONFIG_COPY, CheckpointError, latest_checkpoint, list_checkpoints,
                         load_checkpoint, read_train_state, resolve_checkpoint, save_checkpoint)
from .config import FREE_ON_RESUME, FROZEN_ON_RESUME, Config, ConfigError, config_to_dict, dump_config, load_config

logger = logging.getLogger("pipeline.train")

RUN_CONFIG = "config.yaml"
RUN_INFO = "run.json"
METRICS = "metrics.jsonl"


class TrainError(RuntimeError):
    """A run that cannot start or continue (bad data for the model, inconsistent resume, ...)."""


class NonFiniteLossError(TrainError):
    """The loss or gradient norm became NaN / inf; the run stopped before the optimizer step."""


@dataclass
class TrainArgs:
    """What the command line gives the trainer."""

    run_dir: Path
    config_path: Path | None = None
    data_dir: Path | None = None
    overrides: list[str] = field(default_factory=list)
    resume: str | None = None  # None, "auto" or a checkpoint / run path


@dataclass
class DatasetInfo:
    """The checked dataset: manifest, shard paths, hash, and what the model must be built with."""

    data_dir: Path
    manifest: dict[str, Any]
    urls: list[str]
    manifest_hash: str
    kind: str
    model_kwargs: dict[str, Any]
    num_classes: int

    @property
    def scaling_factor(self) -> float:
        return float(self.manifest["vae"]["scaling_factor"]) if self.kind == "latents" else 1.0

    def dataset_entry(self) -> dict[str, Any]:
        """Identity of the data recorded in checkpoints and exports."""
        entry = {"manifest_hash": self.manifest_hash, "path": str(self.data_dir), "kind": self.kind,
                 "resolution": self.manifest["resolution"], "num_classes": self.num_classes,
                 "samples": self.manifest["counts"].get("written")}
        if self.kind == "latents":
            entry.update(latent_channels=self.manifest["latent_channels"], latent_size=self.manifest["latent_size"])
        return entry


# ---------------------------------------------------------------------------------------------------------------
# Checks before anything runs
# ---------------------------------------------------------------------------------------------------------------


def check_dataset(config: Config, data_dir: Path) -> DatasetInfo:
    """Read the manifest and refuse data that does not fit the model config (clear error, no step taken)."""
    from diffit.models import model_family, resolve_model_kwargs

    from .shards import ManifestError, load_manifest, manifest_hash, shard_problems, shard_urls

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TrainError(f"--data {data_dir}: no such directory (pass the output directory of `diffit-pipe encode` "
                         "or `diffit-pipe pack`)")
    try:
        manifest = load_manifest(data_dir)
    except ManifestError as error:
        raise TrainError(f"--data {data_dir}: {error}") from None
    where = data_dir / "manifest.json"
    family = model_family(config.model.name)
    kind = manifest["kind"]
    wanted = "latents" if family == "latent" else "images"
    if kind != wanted:
        raise TrainError(f"{where}: kind {kind!r}, but {config.model.name} is a {family} model that trains on "
                         f"{wanted!r} shards (`diffit-pipe {'encode' if wanted == 'latents' else 'pack'}`)")

    overrides = dict(config.model.kwargs)
    if family == "latent":
        overrides["learn_sigma"] = config.diffusion.learn_sigma
    if config.model.input_size is not None:
        overrides["img_resolution" if family == "image" else "input_size"] = config.model.input_size
    defaults = resolve_model_kwargs(config.model.name, **overrides)
    model_size = defaults["input_size"] if family == "latent" else defaults["img_resolution"]
    if family == "latent":
        for key in ("latent_channels", "latent_size", "vae"):
            if key not in manifest:
                raise TrainError(f"{where}: latent manifest lacks {key!r}")
        vae = manifest["vae"]
        if vae.get("convention", "unscaled") != "unscaled":
            raise TrainError(f"{where}: vae.convention {vae.get('convention')!r}; the trainer expects unscaled "
                             "latents (it applies vae.scaling_factor itself)")
        if not isinstance(vae.get("scaling_factor"), (int, float)):
            raise TrainError(f"{where}: vae.scaling_factor is missing or not a number")
        if manifest["latent_channels"] != defaults["in_channels"]:
            raise TrainError(f"{where}: latents have {manifest['latent_channels']} channels but {config.model.name} "
                             f"takes {defaults['in_channels']} (a different VAE?)")
        if manifest["latent_size"] != model_size:
            raise TrainError(f"{where}: latents are {manifest['latent_size']}x{manifest['latent_size']} "
                             f"({manifest['resolution']} px) but the model is built for {model_size}x{model_size}; "
                             f"set `model.input_size: {manifest['latent_size']}` (--set model.input_size="
                             f"{manifest['latent_size']}) or use matching data")
    else:
        if manifest["resolution"] != model_size:
            raise TrainError(f"{where}: images are {manifest['resolution']} px but {config.model.name} is built for "
                             f"{model_size} px (set model.input_size or use matching data)")
        if defaults["in_channels"] != 3:
            raise TrainError(f"{where}: image shards are RGB but the model takes {defaults['in_channels']} channels")

    data_classes = int(manifest.get("num_classes") or 0)
    labelled = data_classes > 0
    num_classes = config.model.num_classes
    if num_classes is None:
        num_classes = data_classes
    elif num_classes > 0 and not labelled:
        raise TrainError(f"{where}: the dataset is unlabelled (num_classes {manifest.get('num_classes')}) but "
                         f"model.num_classes is {num_classes}; set model.num_classes: 0 (or null) for an "
                         "unconditional model")
    elif 0 < num_classes < data_classes:
        raise TrainError(f"{where}: the dataset has {data_classes} classes but model.num_classes is {num_classes}")
    elif num_classes == 0 and labelled:
        logger.info("model.num_classes is 0: training an unconditional model; the dataset's labels are ignored")
    overrides["num_classes"] = num_classes
    _check_model_builds(config.model.name, overrides)

    urls = shard_urls(data_dir, manifest)
    if not urls:
        raise TrainError(f"{where}: the dataset has no non-empty shard")
    for entry in manifest["shards"]:
        if entry["count"] > 0:
            problems = shard_problems(data_dir, entry, rehash=False)
            if problems:
                raise TrainError(f"{where}: {problems[0]} (re-run encode/pack; `diffit-pipe inspect DATA --verify` "
                                 "checks every shard)")
    return DatasetInfo(data_dir=data_dir, manifest=manifest, urls=urls, manifest_hash=manifest_hash(data_dir),
                       kind=kind, model_kwargs=overrides, num_classes=num_classes)


def _check_model_builds(name: str, overrides: dict[str, Any]) -> None:
    """Build the model on the meta device (no memory, no time) so that a bad `model.kwargs` entry is a clear
    configuration error before Accelerate starts."""
    import torch

    from diffit.models import create_model

    try:
        with torch.device("meta"):
            create_model(name, **overrides)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"model {name} cannot be built with {overrides}: {error}") from None


def resolve_batching(config: Config, world_size: int) -> tuple[int, int]:
    """(per-device micro-batch, accumulation steps) with global = per_device x processes x accumulation."""
    global_batch = config.train.global_batch_size
    per_device = config.train.per_device_batch_size
    if per_device is None:
        if global_batch % world_size:
            raise ConfigError(f"train.global_batch_size {global_batch} is not divisible by {world_size} processes; "
                              "set train.per_device_batch_size or change the global batch")
        return global_batch // world_size, 1
    if global_batch % (per_device * world_size):
        raise ConfigError(f"train.global_batch_size {global_batch} is not divisible by per_device_batch_size "
                          f"{per_device} x {world_size} processes (global = per_device x processes x accumulation)")
    return per_device, global_batch // (per_device * world_size)


def resolve_mixed_precision(setting: str) -> str:
    """'auto' -> bf16 on a bf16-capable GPU, fp32 ("no") otherwise."""
    import torch

    if setting != "auto":
        if setting != "no" and not torch.cuda.is_available():
            logger.warning("train.mixed_precision=%s on CPU: bf16/fp16 on CPU is only fast with AVX-512 bf16 "
                           "(see bench/train_step.py); use 'no' for fp32", setting)
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


def prepare_config(args: TrainArgs) -> tuple[Config, Path | None]:
    """The run's configuration (from --config, or the run dir's config.yaml when resuming) and the checkpoint to
    resume from (None: fresh start). Checks that a resumed run is the same experiment."""
    import yaml

    run_dir = Path(args.run_dir)
    stored = run_dir / RUN_CONFIG
    if args.config_path is not None:
        config = load_config(args.config_path, args.overrides)
    elif stored.is_file() and args.resume:
        config = load_config(stored, args.overrides)
    else:
        raise ConfigError("--config is required (a preset from manifests/, e.g. manifests/demo.yaml) unless "
                          f"resuming a run whose {stored} exists")

    checkpoint = None
    if args.resume == "auto":
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            logger.info("--resume auto: no checkpoint in %s, starting from step 0", run_dir)
    elif args.resume:
        try:
            checkpoint = resolve_checkpoint(args.resume)
        except CheckpointError as error:
            raise TrainError(f"--resume {args.resume}: {error}") from None
    elif list_checkpoints(run_dir):
        raise TrainError(f"{run_dir} already holds checkpoints: pass --resume auto to continue that run, or a new "
                         "--run-dir")

    if checkpoint is not None:
        saved = yaml.safe_load((checkpoint / CONFIG_COPY).read_text())
        differences = _diff_sections(saved, config_to_dict(config), FROZEN_ON_RESUME)
        if differences:
            raise TrainError(f"--resume {checkpoint}: the configuration differs from the checkpoint's in "
                             f"{', '.join(differences)}; only train / checkpoint / sample settings and "
                             f"{', '.join(FREE_ON_RESUME)} may change on resume (start a new run dir for a "
                             "different experiment)")
    return config, checkpoint


# ---------------------------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------------------------


def learning_rate(config: Config, images_seen: int) -> float:
    """Base lr, linearly ramped over `optim.warmup_kimg` thousand images (EDM's lr_rampup) and linearly decayed to 0
    over the last `optim.decay_fraction` of the run."""
    lr = config.optim.lr
    warmup = config.optim.warmup_kimg * 1000
    if warmup > 0:
        lr *= min(images_seen / warmup, 1.0)
    if config.optim.decay_fraction > 0:
        total = config.train.max_steps * config.train.global_batch_size
        decay_start = total * (1.0 - config.optim.decay_fraction)
        if images_seen > decay_start:
            lr *= max(total - images_seen, 0) / (total - decay_start)
    return lr


def ema_decay(config: Config, images_seen: int, batch_size: int) -> float:
    """EMA decay of this step: fixed (DiT) or from a half-life in images with optional ramp-up (EDM)."""
    if config.ema.halflife_kimg is None:
        return config.ema.decay
    halflife = config.ema.halflife_kimg * 1000
    if config.ema.rampup_ratio is not None:
        halflife = min(halflife, images_seen * config.ema.rampup_ratio)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


def update_ema(ema_model, model, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model on fp32 copies, outside autocast and autograd."""
    import torch

    with torch.no_grad():
        model_params = dict(model.named_parameters())
        for name, ema_param in ema_model.named_parameters():
            ema_param.lerp_(model_params[name].detach().to(ema_param.dtype), 1.0 - decay)
        model_buffers = dict(model.named_buffers())
        for name, ema_buffer in ema_model.named_buffers():
            ema_buffer.copy_(model_buffers[name])


class Objective:
    """The training loss of one micro-batch: ADM hybrid loss (latent) or EDM loss (image space)."""

    def __init__(self, config: Config, null_class: int | None):
        self.config = config
        self.null_class = null_class
        if config.diffusion.type == "adm":
            from diffit.diffusion import create_diffusion

            self.diffusion = create_diffusion(None, noise_schedule=config.diffusion.noise_schedule,
                                              learn_sigma=config.diffusion.learn_sigma,
                                              diffusion_steps=config.diffusion.diffusion_steps)
        else:
            from diffit.edm import EDMLoss

            self.edm_loss = EDMLoss(P_mean=config.diffusion.P_mean, P_std=config.diffusion.P_std,
                                    sigma_data=config.diffusion.sigma_data)

    def labels(self, class_labels):
        """Class labels for the network: None (unconditional) or with CFG label dropout to the null class."""
        from diffit.layers import drop_labels

        if self.null_class is None:
            return None
        return drop_labels(class_labels, self.null_class, self.config.data.label_dropout)

    def __call__(self, network, x, class_labels):
        import torch

        labels = self.labels(class_labels)
        if self.config.diffusion.type == "adm":
            t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
            kwargs = {"class_labels": labels} if labels is not None else None
            return self.diffusion.training_losses(network, x, t, model_kwargs=kwargs)["loss"].mean()
        from diffit.edm import EDMPrecond

        precond = EDMPrecond(network, sigma_data=self.config.diffusion.sigma_data)
        # EDM's reduction: sum over pixels, mean over the batch (training/training_loop.py).
        return self.edm_loss(precond, x, labels).sum() / x.shape[0]


def _flat_hparams(config: Config) -> dict[str, Any]:
    """Scalars of the config for tensorboard's hparams table (None/lists/dicts as text)."""
    flat = {}
    for section, values in config_to_dict(config).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class MetricsLog:
    """`RUN/metrics.jsonl`, one JSON object per logged step (main process). On resume, entries after the
    checkpoint's step (written by the interrupted run) are dropped so the file describes one history."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
        self.handle = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, sort_keys=True) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


# ---------------------------------------------------------------------------------------------------------------
# Sample grids
# ---------------------------------------------------------------------------------------------------------------


def _grid(images, columns: int):
    """uint8 [N, H, W, 3] -> one uint8 grid image."""
    import numpy as np

    count, height, width, channels = images.shape
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * height, columns * width, channels), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    return grid


def _latent_visualisation(latents):
    """Latents [N, C, h, w] -> uint8 [N, h, w, 3]: the first three channels, each normalised to [0, 255]."""
    import numpy as np

    channels = latents[:, :3].float()
    if channels.shape[1] < 3:
        channels = channels.repeat(1, 3, 1, 1)[:, :3]
    low = channels.amin(dim=(0, 2, 3), keepdim=True)
    high = channels.amax(dim=(0, 2, 3), keepdim=True)
    scaled = (channels - low) / (high - low).clamp_min(1e-8)
    return (scaled * 255).round().to(dtype=__import__("torch").uint8).permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)


class SampleWriter:
    """Writes EMA sample grids; for latent models decodes through the dataset's VAE when it is a local
    directory that loads, otherwise writes a latent-channel visualisation and says why once."""

    def __init__(self, config: Config, info: DatasetInfo, run_dir: Path, device):
        self.config = config
        self.info = info
        self.out_dir = run_dir / "samples"
        self.device = device
        self.vae = None
        self.vae_problem = None
        if info.kind == "latents":
            self.vae, self.vae_problem = self._load_vae(info.manifest["vae"])
            if self.vae_problem:
                logger.warning("sample grids show latent channels, not images: %s", self.vae_problem)

    @staticmethod
    def _load_vae(vae_entry: dict[str, Any]):
        path = vae_entry.get("path")
        if not path:
            return None, "the dataset manifest's vae entry has no local path"
        if not Path(path).is_dir():
            return None, f"the dataset's VAE directory {path} does not exist on this machine"
        try:
            from .vae import load_vae

            return load_vae(path, "fp32", "cpu"), None
        except Exception as error:  # noqa: BLE001 -- any load failure only changes the preview, and is reported
            return None, f"the dataset's VAE at {path} does not load ({type(error).__name__}: {error})"

    def write(self, ema_model, step: int, tracker=None) -> Path:
        import numpy as np
        from PIL import Image

        from diffit.guidance import GuidanceConfig
        from diffit.sampling import sample

        config, count = self.config, self.config.sample.count
        seeds = [config.sample.seed + i for i in range(count)]
        labels = None
        if ema_model.num_classes > 0:
            labels = [i % ema_model.num_classes for i in range(count)]
        guidance = GuidanceConfig(scale=config.sample.guidance_scale) if labels is not None else None
        shape = (ema_model.in_channels, ema_model.input_size, ema_model.input_size)
        kind = config.diffusion.type
        extra = ({"diffusion_steps": config.diffusion.diffusion_steps,
                  "noise_schedule": config.diffusion.noise_schedule} if kind == "adm"
                 else {"sigma_data": config.diffusion.sigma_data})
        samples = sample(ema_model, shape, labels, seeds, sampler=config.sample.sampler, steps=config.sample.steps,
                         guidance=guidance, kind=kind, device=self.device, **extra).cpu()
        if self.info.kind == "images":
            images = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(__import__("torch").uint8)
            images = images.permute(0, 2, 3, 1).numpy()
        elif self.vae is not None:
            from .vae import decode_latents

            images = decode_latents(self.vae, (samples / self.info.scaling_factor).numpy())
        else:
            images = _latent_visualisation(samples)
        grid = _grid(images, columns=int(math.ceil(math.sqrt(count))))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step-{step:07d}.png"
        tmp = path.with_suffix(".tmp.png")
        Image.fromarray(grid).save(tmp)
        os.replace(tmp, path)
        if tracker is not None:
            tracker.log_images({"samples": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
        return path


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def _timed_batches(iterator: Iterator, device) -> Iterator[tuple[Any, Any, float]]:
    """(x, class_labels, seconds waited for the batch) on `device`."""
    while True:
        start = time.perf_counter()
        x, labels = next(iterator)
        waited = time.perf_counter() - start
        yield x.to(device, non_blocking=True), labels.to(device, non_blocking=True), waited


def run(args: TrainArgs) -> dict[str, Any]:
    """Train (or continue training) one run; returns a summary (final step, last loss, run dir)."""
    import torch

    run_dir = Path(args.run_dir)
    config, checkpoint = prepare_config(args)
    data_dir = args.data_dir
    resume_state = read_train_state(checkpoint) if checkpoint is not None else None
    if data_dir is None:
        if resume_state is None:
            raise TrainError("--data is required (the output directory of `diffit-pipe encode` / `pack`)")
        data_dir = Path(resume_state["dataset"]["path"])
    info = check_dataset(config, Path(data_dir))
    if resume_state is not None and resume_state["dataset"]["manifest_hash"] != info.manifest_hash:
        raise TrainError(f"--data {data_dir}: manifest hash {info.manifest_hash[:12]} differs from the one this run "
                         f"was trained on ({resume_state['dataset']['manifest_hash'][:12]}); the dataset changed")

    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from diffit.models import create_model

    from .data import StreamSpec, check_shard_split, infinite, make_loader, shards_for

    mixed_precision = resolve_mixed_precision(config.train.mixed_precision)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision,
        log_with=None if config.train.tracker == "none" else config.train.tracker,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")))
    world_size, rank = accelerator.num_processes, accelerator.process_index
    per_device, accumulation = resolve_batching(config, world_size)
    workers = check_shard_split(len(info.urls), world_size, config.data.num_workers)
    config_text = dump_config(config)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / RUN_CONFIG, config_text)
        write_text_atomic(run_dir / RUN_INFO, json.dumps({
            "dataset": info.dataset_entry(), "world_size": world_size, "per_device_batch_size": per_device,
            "accumulation_steps": accumulation, "mixed_precision": mixed_precision, "data_workers": workers,
            "command": sys.argv, "resumed_from": str(checkpoint) if checkpoint else None}, indent=2) + "\n")
    accelerator.wait_for_everyone()
    logger.info("world size %d, per-device batch %d, accumulation %d (global %d), precision %s, %d shards",
                world_size, per_device, accumulation, config.train.global_batch_size, mixed_precision,
                len(info.urls))

    # Same initial weights on every rank (DDP also broadcasts rank 0's), then per-rank training randomness.
    torch.manual_seed(config.train.seed)
    model = create_model(config.model.name, **info.model_kwargs)
    if config.model.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise ConfigError(f"model.gradient_checkpointing: {config.model.name} does not support it")
        model.gradient_checkpointing = True
    ema_model = copy.deepcopy(model).float().eval().requires_grad_(False)
    null_class = model.num_classes if model.num_classes > 0 else None
    resolved_model = dict(model.model_config)
    optimizer_cls = torch.optim.AdamW if config.optim.name == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], lr=config.optim.lr,
                              betas=tuple(config.optim.betas), eps=config.optim.eps,
                              weight_decay=config.optim.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema_model.to(accelerator.device)
    torch.manual_seed(config.train.seed * 1_000_003 + rank + 1)

    step = int(resume_state["step"]) if resume_state is not None else 0
    images_seen = int(resume_state["images_seen"]) if resume_state is not None else 0
    if step >= config.train.max_steps:
        logger.info("step %d >= train.max_steps %d: nothing to do", step, config.train.max_steps)
        accelerator.end_training()
        return {"step": step, "run_dir": str(run_dir), "loss": None}

    # Everything that might draw from the global RNG is built before the checkpoint's RNG state is restored,
    # so a resumed run continues the exact random stream of the interrupted one.
    network = torch.compile(model) if config.model.compile else model
    objective = Objective(config, null_class)
    spec = StreamSpec(urls=tuple(info.urls), kind=info.kind, batch_size=per_device, rank=rank,
                      world_size=world_size, resampled=config.data.resampled,
                      shuffle_buffer=config.data.shuffle_buffer, hflip=config.data.hflip,
                      scaling_factor=info.scaling_factor, resolution=int(info.manifest["resolution"]),
                      conditional=null_class is not None, num_classes=info.num_classes, seed=config.train.seed,
                      start_step=step, skip_batches=step * accumulation)
    loader = make_loader(spec, workers, config.data.prefetch_factor)
    write_text_atomic(run_dir / f"shards-rank{rank}.json",
                      json.dumps({"rank": rank, "world_size": world_size,
                                  "shards": shards_for(info.urls, rank, world_size)}, indent=2) + "\n")
    batches = _timed_batches(infinite(loader), accelerator.device)
    tracker = None
    if config.train.tracker != "none":
        accelerator.init_trackers("train", config=_flat_hparams(config))  # acts on the main process only
        if accelerator.is_main_process:
            tracker = accelerator.get_tracker(config.train.tracker)
    metrics = MetricsLog(run_dir / METRICS, step) if accelerator.is_main_process else None
    sampler = SampleWriter(config, info, run_dir, accelerator.device) if (
        accelerator.is_main_process and config.sample.every > 0) else None

    if checkpoint is not None:
        train_state = load_checkpoint(accelerator, checkpoint, ema_model)
        if not config.data.resampled and (train_state.get("world_size"), train_state.get("per_device_batch_size"),
                                          train_state.get("data_workers")) != (world_size, per_device, workers):
            logger.warning("resuming a deterministic-order run with a different process / batch / worker layout: "
                           "the batches after the resume differ from an uninterrupted run")
        logger.info("resumed from %s at step %d (%d images seen)", checkpoint, step, images_seen)

    def train_state_dict() -> dict[str, Any]:
        return {"step": step, "images_seen": images_seen, "world_size": world_size,
                "per_device_batch_size": per_device, "accumulation_steps": accumulation, "data_workers": workers,
                "model": resolved_model, "dataset": info.dataset_entry(),
                "vae": info.manifest.get("vae") if info.kind == "latents" else None,
                "diffusion": config_to_dict(config)["diffusion"], "run_dir": str(run_dir.resolve())}

    from tqdm.auto import tqdm

    progress = tqdm(total=config.train.max_steps, initial=step, desc="train", unit="step",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)
    window = {"loss": 0.0, "steps": 0, "time": 0.0, "wait": 0.0, "grad_norm": 0.0}
    clip = config.optim.grad_clip if config.optim.grad_clip is not None else float("inf")
    last_loss = None
    model.train()
    try:
        while step < config.train.max_steps:
            step_start = time.perf_counter()
            waited = 0.0
            micro_losses = []
            for micro in range(accumulation):
                x, labels, wait = next(batches)
                waited += wait
                sync = contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(model)
                with sync:
                    with accelerator.autocast():
                        loss = objective(network, x, labels)
                    accelerator.backward(loss / accumulation)
                micro_losses.append(loss.detach().float())
            step_loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
            loss_value = float(step_loss)
            grad_value = float(grad_norm) if grad_norm is not None else float("nan")
            if not math.isfinite(loss_value) or (mixed_precision != "fp16" and not math.isfinite(grad_value)):
                raise NonFiniteLossError(
                    f"non-finite training loss at step {step + 1}: loss {loss_value}, grad-norm {grad_value}; "
                    f"stopped before the optimizer step, the last checkpoint in {run_dir / 'checkpoints'} is intact "
                    "(lower optim.lr, set optim.grad_clip, or check the data)")
            lr = learning_rate(config, images_seen)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_ema(ema_model, accelerator.unwrap_model(model),
                       ema_decay(config, images_seen, config.train.global_batch_size))
            step += 1
            images_seen += config.train.global_batch_size
            last_loss = loss_value
            elapsed = time.perf_counter() - step_start
            window["loss"] += loss_value
            window["grad_norm"] += grad_value
            window["steps"] += 1
            window["time"] += elapsed
            window["wait"] += waited
            progress.update(1)

            if step % config.train.log_every == 0 or step == config.train.max_steps:
                record = {"step": step, "loss": window["loss"] / window["steps"], "lr": lr,
                          "grad_norm": window["grad_norm"] / window["steps"],
                          "images_per_s": window["steps"] * config.train.global_batch_size / window["time"],
                          "data_wait_fraction": window["wait"] / window["time"], "images_seen": images_seen}
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                if metrics is not None:
                    metrics.write(record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", ips=f"{record['images_per_s']:.1f}",
                                         wait=f"{record['data_wait_fraction']:.0%}")
                window = {"loss": 0.0, "steps": 0, "time": 0.0, "wait": 0.0, "grad_norm": 0.0}
            if sampler is not None and step % config.sample.every == 0:
                with torch.random.fork_rng(devices=[]):  # previews must not shift the training RNG stream
                    path = sampler.write(ema_model, step, tracker)
                logger.info("wrote %s", path)
            if step % config.checkpoint.every == 0 or step == config.train.max_steps:
                save_checkpoint(accelerator, run_dir, step, ema_model, train_state_dict(), config_text,
                                config.checkpoint.keep)
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"step": step, "run_dir": str(run_dir), "loss": last_loss}


# ---------------------------------------------------------------------------------------------------------------
# `python -m pipeline.train` (what `accelerate launch -m` / `torchrun -m` run)
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The same options as `diffit-pipe train`."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML preset (manifests/*.yaml)")
    parser.add_argument("--data", type=Path, help="dataset directory written by encode / pack")
    parser.add_argument("--run-dir", type=Path, required=True, help="where checkpoints, logs and samples go")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set optim.lr=1e-4 (repeatable)")
    parser.add_argument("--resume", default=None, help="'auto' (newest checkpoint of --run-dir) or a checkpoint path")
    return parser


def configure_logging() -> None:
    """INFO logging with the process rank (only rank 0 says more than warnings)."""
    rank = int(os.environ.get("RANK", "0"))
    # force: bind to the current stderr even if logging was configured before (e.g. several CLI calls in one
    # process, as in the tests).
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, force=True,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")
    # accelerate reports every file of every checkpoint at INFO; our own line per checkpoint is enough.
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m pipeline.train`; exit status 2 for configuration / data errors."""
    options = build_parser().parse_args(argv)
    configure_logging()
    args = TrainArgs(run_dir=options.run_dir, config_path=options.config, data_dir=options.data,
                     overrides=options.overrides, resume=options.resume)
    try:
        summary = run(args)
    except (ConfigError, TrainError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    logger.info("done: step %d, run dir %s", summary["step"], summary["run_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
