"""Setting a run up: from the checked inputs to everything the training loop works with (`Training`).

`set_up` checks the inputs (`pipeline.train.checks`, all before Accelerate starts), starts the accelerator,
writes the run files and builds the model, its fp32 EMA and the optimizer (fused on CUDA). `prepare_loop` then
builds what the loop reads and writes -- the (compiled) network, the objective, the shard stream, trackers,
metrics log and sample writer -- and restores the checkpoint when resuming, last, so that nothing built before it
can shift the random stream it restores. Device-dependent choices are in `pipeline.train.performance`.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_text_atomic
from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.checks import (
    RUN_CONFIG,
    CheckedRun,
    DatasetInfo,
    TrainOptions,
    check_run,
    model_kwargs,
    resolve_batching,
    resolve_mixed_precision,
)
from pipeline.train.config import Config, ConfigError, config_to_dict, dump_config, tracker_names
from pipeline.train.fid import FidEvaluator, rng_devices
from pipeline.train.objective import Objective
from pipeline.train.performance import DeviceStats, configure_cuda, training_flops_per_image, use_fused
from pipeline.train.progress import METRICS, MetricsLog
from pipeline.train.samples import SampleWriter
from pipeline.train.trackers import PROJECT, GridLogger, check_trackers_installed, init_kwargs

logger = logging.getLogger(__name__)

RUN_INFO = "run.json"


@dataclass
class Layout:
    """How the global batch is spread: processes, per-device micro-batch, accumulation steps, loader workers."""

    world_size: int
    rank: int
    per_device: int
    accumulation: int
    workers: int
    mixed_precision: str


@dataclass
class Training:
    """Everything the training loop works with. `step` and `images_seen` advance with every optimizer step; the
    fields from `network` on are filled in by `prepare_loop`."""

    config: Config
    run_dir: Path
    info: DatasetInfo
    checkpoint: Path | None  # resumed from (None: a fresh start)
    layout: Layout
    accelerator: Any
    model: Any  # the prepared (possibly DDP-wrapped) model the optimizer updates
    ema: Any  # fp32 EMA copy, never wrapped
    optimizer: Any
    config_text: str  # the resolved configuration, as stored in the run dir and every checkpoint
    resolved_model: dict[str, Any]  # name + kwargs the model was built with
    null_class: int | None  # the CFG null label (None: unconditional model)
    step: int
    images_seen: int
    repa: Any = None  # `pipeline.train.repa.RepaAlignment` when repa.weight > 0 (encoder, projector and its EMA)
    network: Any = None  # what the forward pass calls: `model`, or torch.compile(model)
    objective: Objective | None = None
    batches: Iterator | None = None  # (x, class_labels, seconds waited), on the device
    stream: Any = None  # the ShardStream behind `batches` (which shards its workers found damaged)
    grids: GridLogger | None = None  # main process only, with trackers: sample grids to them
    metrics: MetricsLog | None = None  # main process only
    samples: SampleWriter | None = None  # main process only, when sample.every > 0
    fid: FidEvaluator | None = None  # every process, when eval.every > 0
    device_stats: DeviceStats | None = None  # peak memory and MFU (CUDA)
    # Check the loss before every optimizer step (reading it from the device): everywhere but CUDA, where it is
    # checked at the next log / sample / checkpoint / stop step instead (see `pipeline.train.loop`).
    check_every_step: bool = True

    def parameters(self) -> list:
        """What the optimizer trains: the model's parameters, then REPA's projector's (gradient clipping covers both,
        as REPA's, whose projectors are part of its model)."""
        params = list(self.model.parameters())
        if self.repa is not None:
            params += list(self.repa.projector.parameters())
        return params

    def train_state(self) -> dict[str, Any]:
        """What a checkpoint records besides the tensors: position, layout, model, data and diffusion."""
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "world_size": self.layout.world_size,
            "per_device_batch_size": self.layout.per_device,
            "accumulation_steps": self.layout.accumulation,
            "data_workers": self.layout.workers,
            "model": self.resolved_model,
            "dataset": self.info.dataset_entry(),
            "vae": self.info.manifest.get("vae") if self.info.kind == "latents" else None,
            # What the model's latents are (`diffit.latent_norm`): every decoder inverts it (exported as is).
            "latent_norm": self.info.latent_norm.to_dict() if self.info.latent_norm is not None else None,
            "diffusion": config_to_dict(self.config)["diffusion"],
            "run_dir": str(self.run_dir.resolve()),
        }

    def summary(self, loss: float | None) -> dict[str, Any]:
        """What `run` returns: final step, last loss, run dir."""
        return {"step": self.step, "run_dir": str(self.run_dir), "loss": loss}


def set_up(args: TrainOptions) -> Training:
    """Check the inputs, start the accelerator, write the run files, build model, EMA and optimizer."""
    run_dir = Path(args.run_dir)
    checked = check_run(args)
    config = checked.config
    check_trackers_installed(tracker_names(config.train.tracker))
    accelerator, layout = start_accelerator(config, checked.info, run_dir)
    config_text = dump_config(config)
    if accelerator.is_main_process:
        write_run_files(run_dir, config_text, checked, layout)
    accelerator.wait_for_everyone()
    logger.info(
        "world size %d, per-device batch %d, accumulation %d (global %d), precision %s, %d shards",
        layout.world_size,
        layout.per_device,
        layout.accumulation,
        config.train.global_batch_size,
        layout.mixed_precision,
        len(checked.info.urls),
    )
    model, ema, optimizer, resolved_model, null_class, repa = build_model(config, checked.info, accelerator)
    return Training(
        config=config,
        run_dir=run_dir,
        info=checked.info,
        checkpoint=checked.checkpoint,
        layout=layout,
        accelerator=accelerator,
        model=model,
        ema=ema,
        optimizer=optimizer,
        config_text=config_text,
        resolved_model=resolved_model,
        null_class=null_class,
        step=checked.step,
        images_seen=checked.images_seen,
        repa=repa,
    )


def start_accelerator(config: Config, info: DatasetInfo, run_dir: Path):
    """The Accelerator (trackers logging under RUN/logs) and the batch layout over its processes."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from pipeline.train.data import check_balanced_split, check_shard_split

    mixed_precision = resolve_mixed_precision(config.train.mixed_precision)
    configure_cuda(config.train.tf32)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        log_with=tracker_names(config.train.tracker) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
    )
    world_size = accelerator.num_processes
    per_device, accumulation = resolve_batching(config, world_size)
    workers = check_shard_split(len(info.urls), world_size, config.data.num_workers)
    check_balanced_split(len(info.urls), world_size, workers, config.data.resampled)
    layout = Layout(world_size, accelerator.process_index, per_device, accumulation, workers, mixed_precision)
    return accelerator, layout


def write_run_files(run_dir: Path, config_text: str, checked: CheckedRun, layout: Layout) -> None:
    """RUN/config.yaml (the resolved configuration) and RUN/run.json (data, layout, command line)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / RUN_CONFIG, config_text)
    run_info = {
        "dataset": checked.info.dataset_entry(),
        "world_size": layout.world_size,
        "per_device_batch_size": layout.per_device,
        "accumulation_steps": layout.accumulation,
        "mixed_precision": layout.mixed_precision,
        "data_workers": layout.workers,
        "command": sys.argv,
        "resumed_from": str(checked.checkpoint) if checked.checkpoint else None,
    }
    write_text_atomic(run_dir / RUN_INFO, json.dumps(run_info, indent=2) + "\n")


def build_model(config: Config, info: DatasetInfo, accelerator):
    """Model (same initial weights on every rank), fp32 EMA copy, optimizer, prepared by Accelerate; then the
    per-rank training seed. With REPA also its encoder, projector (trained by the same optimizer, prepared too) and
    the projector's EMA (`pipeline.train.repa`). Returns (model, ema, optimizer, resolved model config, CFG null
    class, RepaAlignment or None)."""
    import torch

    from diffit.models import create_model
    from pipeline.train.repa import build_repa

    # Same initial weights on every rank (DDP also broadcasts rank 0's), then per-rank training randomness.
    torch.manual_seed(config.train.seed)
    model = create_model(config.model.name, **model_kwargs(config, info))
    # After the model: its initial weights are those of a run without REPA.
    repa = build_repa(config, model, info.manifest)
    if config.model.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise ConfigError(f"model.gradient_checkpointing: {config.model.name} does not support it")
        model.gradient_checkpointing = True
    ema = copy.deepcopy(model).float().eval().requires_grad_(False)
    if repa is not None:
        repa.attach()  # the hook on block k: on the trained model only, not on its EMA copy
    null_class = model.num_classes if model.num_classes > 0 else None
    resolved_model = dict(model.model_config)
    # On the device before the optimizer is built: whether it can be fused depends on where the parameters are.
    model.to(accelerator.device)
    if config.model.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if repa is not None:
        repa.projector.to(accelerator.device)
        params += list(repa.projector.parameters())
    optimizer_cls = torch.optim.AdamW if config.optim.name == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(
        params,
        lr=config.optim.lr,
        betas=tuple(config.optim.betas),
        eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
        fused=use_fused(config.optim.fused, params),
    )
    if repa is None:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        # Accelerate saves the projector as a second model (model_1.safetensors) and restores it on resume.
        model, repa.projector, optimizer = accelerator.prepare(model, repa.projector, optimizer)
        repa.ema_projector.to(accelerator.device)
        if repa.encoder is not None:  # None: the batches carry stored targets
            repa.encoder.to(accelerator.device)
    ema.to(accelerator.device)
    torch.manual_seed(config.train.seed * 1_000_003 + accelerator.process_index + 1)
    return model, ema, optimizer, resolved_model, null_class, repa


def prepare_loop(training: Training) -> None:
    """Network, objective, data stream, trackers, metrics log and sample writer; then the checkpoint's state.

    Everything that might draw from the global RNG is built before the checkpoint's RNG state is restored, so a
    resumed run continues the exact random stream of the interrupted one.
    """
    import torch

    config, accelerator = training.config, training.accelerator
    training.network = torch.compile(training.model) if config.model.compile else training.model
    training.objective = Objective(config, training.null_class, accelerator.device)
    training.batches, training.stream = open_stream(training)
    training.check_every_step = checks_loss_every_step(accelerator.device)
    training.device_stats = device_stats(training)
    main = accelerator.is_main_process
    trackers = tracker_names(config.train.tracker)
    if trackers:
        # Acts on the main process only.
        accelerator.init_trackers(
            PROJECT, config=_flat_hparams(config), init_kwargs=init_kwargs(trackers, training.run_dir)
        )
        if main:
            training.grids = GridLogger(accelerator, trackers)
    if main:
        training.metrics = MetricsLog(training.run_dir / METRICS, training.step)
    if main and config.sample.every > 0:
        training.samples = SampleWriter(config, training.info, training.run_dir, training.accelerator.device)
    if config.eval.every > 0:
        # Loading the VAE may initialise weights from the RNG before reading them: keep the training streams.
        with torch.random.fork_rng(devices=rng_devices(accelerator.device)):
            training.fid = FidEvaluator(config, training.info, accelerator)
    if training.checkpoint is not None:
        restore_checkpoint(training)


def checks_loss_every_step(device) -> bool:
    """Whether the loss is read and checked before every optimizer step: everywhere but on CUDA, where reading
    it would make the host wait for the GPU at every step (see `pipeline.train.loop`)."""
    return device.type != "cuda"


def device_stats(training: Training) -> DeviceStats:
    """Peak memory and MFU reporting; the model's FLOPs are counted (on the meta device) only on CUDA."""
    device = training.accelerator.device
    flops = None
    if device.type == "cuda":
        try:
            flops = training_flops_per_image(training.resolved_model["name"], training.resolved_model["kwargs"])
        except Exception as error:  # noqa: BLE001 -- a FLOP count that fails costs the MFU figure, not the run
            logger.warning(
                "MFU not reported: the model's FLOPs could not be counted (%s: %s)", type(error).__name__, error
            )
    return DeviceStats(device, flops, training.layout.world_size)


def open_stream(training: Training) -> tuple[Iterator, Any]:
    """This process's shard stream (continuing after the batches a resumed run consumed; every shard checked
    against the manifest's sha256 as it is read), recorded in RUN/shards-rank<R>.json. Returns the batches
    -- (x, class_labels, seconds waited) on the device -- and the ShardStream behind them."""
    from pipeline.train.data import StreamSpec, infinite, make_loader, process_shards
    from pipeline.train.repa import stored_targets_shape

    config, info, layout = training.config, training.info, training.layout
    spec = StreamSpec(
        urls=tuple(info.urls),
        kind=info.kind,
        batch_size=layout.per_device,
        rank=layout.rank,
        world_size=layout.world_size,
        resampled=config.data.resampled,
        shuffle_buffer=config.data.shuffle_buffer,
        hflip=config.data.hflip,
        # REPA on latents: each sample's image for the encoder (online), or its stored targets.
        images=training.repa is not None and info.kind == "latents" and training.repa.encoder is not None,
        targets=stored_targets_shape(training.repa, info.manifest),
        scaling_factor=info.scaling_factor,
        latent_norm=info.latent_norm,
        resolution=int(info.manifest["resolution"]),
        conditional=training.null_class is not None,
        num_classes=info.num_classes,
        seed=config.train.seed,
        start_step=training.step,
        skip_batches=training.step * layout.accumulation,
        sha256=tuple(info.sha256),
        on_corrupt=config.data.on_corrupt_shard,
    )
    loader = make_loader(spec, layout.workers, config.data.prefetch_factor)
    shards = {"rank": layout.rank, "world_size": layout.world_size, "shards": process_shards(spec)}
    write_text_atomic(training.run_dir / f"shards-rank{layout.rank}.json", json.dumps(shards, indent=2) + "\n")
    batches = _timed_batches(infinite(loader), training.accelerator.device, config.model.channels_last)
    return batches, loader.dataset


def _timed_batches(iterator: Iterator, device, channels_last: bool = False) -> Iterator[tuple[Any, Any, float, Any]]:
    """(x, class_labels, seconds waited for the batch, REPA's source or None) on `device`: the loader pins its
    batches on CUDA, so the copies do not block. REPA's source: the uint8 images of a latent stream that carries
    them (online targets), or the float16 stored targets of the views the batch took (`repa.targets: stored`)."""
    import torch

    memory_format = torch.channels_last if channels_last else torch.preserve_format
    while True:
        start = time.perf_counter()
        batch = next(iterator)
        waited = time.perf_counter() - start
        x = batch[0].to(device, non_blocking=True, memory_format=memory_format)
        images = batch[2].to(device, non_blocking=True) if len(batch) > 2 else None
        yield x, batch[1].to(device, non_blocking=True), waited, images


def restore_checkpoint(training: Training) -> None:
    """Model, optimizer, scaler, this rank's RNG state and the EMA from the resumed checkpoint."""
    projector_ema = training.repa.ema_projector if training.repa is not None else None
    train_state = load_checkpoint(training.accelerator, training.checkpoint, training.ema, projector_ema)
    layout = training.layout
    saved_layout = (
        train_state.get("world_size"),
        train_state.get("per_device_batch_size"),
        train_state.get("data_workers"),
    )
    if not training.config.data.resampled and saved_layout != (layout.world_size, layout.per_device, layout.workers):
        logger.warning(
            "resuming a deterministic-order run with a different process / batch / worker layout: "
            "the batches after the resume differ from an uninterrupted run"
        )
    logger.info("resumed from %s at step %d (%d images seen)", training.checkpoint, training.step, training.images_seen)


def _flat_hparams(config: Config) -> dict[str, Any]:
    """Scalars of the config for tensorboard's hparams table (None/lists/dicts as text)."""
    flat = {}
    for section, values in config_to_dict(config).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
