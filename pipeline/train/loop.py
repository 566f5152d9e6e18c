"""The train stage: an Accelerate trainer for latent (ADM) and image-space (EDM) DiffiT models.

Single process::

    diffit-pipe train --config manifests/demo.yaml --data DATA --run-dir runs/demo

Several processes (GPUs, or gloo on CPU) through `accelerate launch` around the same entry point::

    accelerate launch --multi_gpu --num_processes 8 --num_machines 1 --mixed_precision bf16 \\
        -m cli.main train --config manifests/imagenet256_latent_xl2.yaml --data DATA --run-dir runs/x

(`accelerate launch --num_processes 2 --cpu` runs ONE process on CPU; for a CPU gloo run use the line above
with `--mixed_precision no --dynamo_backend no`, or `torchrun --standalone --nproc_per_node 2 -m cli.main train`.)
Multi-node: add `--num_machines M --machine_rank R --main_process_ip IP --main_process_port PORT`; the run
directory must be on a filesystem every node sees (checkpoints hold each rank's RNG state).

What happens, in order: the configuration is loaded and checked, the dataset manifest is checked against the
model (kind, resolution, latent channels / size, classes) -- all before Accelerate starts or any step runs
(`pipeline.train.checks`) --, then the model, its fp32 EMA, the optimizer and the shard stream are built and a
checkpoint is restored when resuming (`pipeline.train.setup`), and the loop below runs `train.max_steps`
optimizer steps of `global_batch_size` images each (per-device batch x processes x accumulation). Every
`train.log_every` steps loss, lr, grad-norm, images/s and the fraction of step time spent waiting for data go to
the trackers and to `RUN/metrics.jsonl`; every `sample.every` steps an EMA sample grid goes to `RUN/samples/`;
every `checkpoint.every` steps (and at the end) a checkpoint (`pipeline.train.checkpoint`). A non-finite loss or
gradient norm stops the run before the optimizer step, so the last checkpoint is the last good state.

Resume (`--resume auto` = newest complete checkpoint of the run dir whose files match their recorded sha256 --
a damaged one is skipped with a warning naming the file --, or a checkpoint path, which must verify): model,
EMA, optimizer, grad scaler and every rank's RNG state are restored (an RNG state that was not restored is an
error), training continues at the checkpoint's step, and the data stream continues as follows -- deterministic
mode (`data.resampled: false`): the batches consumed before the checkpoint (step x accumulation per process)
are skipped, so the continued run is identical to an uninterrupted one; resampled mode: a fresh stream whose
seed is derived from (seed, rank, worker, step), i.e. no sample order is replayed.

Data integrity: every shard is checked against the manifest's sha256 as it is read, before any of its samples
is used; a damaged shard stops the run with one line naming it (before the next checkpoint), or with
`data.on_corrupt_shard: skip` is left out, warned about and counted (`skipped_shards` in RUN/metrics.jsonl).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

from pipeline.core.errors import EXIT_JOB_FAILED
from pipeline.train.checkpoint import save_checkpoint
from pipeline.train.checks import TrainArgs, TrainError
from pipeline.train.objective import Objective, ema_decay, learning_rate, update_ema
from pipeline.train.progress import Progress
from pipeline.train.setup import Training, prepare_loop, set_up

logger = logging.getLogger("pipeline.train")

# `run` and the error it adds, and names other code imports from here (they live in the modules named above).
__all__ = [
    "NonFiniteLossError",
    "Objective",
    "TrainArgs",
    "TrainError",
    "ema_decay",
    "learning_rate",
    "run",
    "update_ema",
]


class NonFiniteLossError(TrainError):
    """The loss or gradient norm became NaN / inf; the run stopped before the optimizer step (exit 1)."""

    exit_code = EXIT_JOB_FAILED


def run(args: TrainArgs) -> dict[str, Any]:
    """Train (or continue training) one run; returns a summary (final step, last loss, run dir)."""
    import torch

    training = set_up(args)
    config, accelerator = training.config, training.accelerator
    if training.step >= config.train.max_steps:
        logger.info("step %d >= train.max_steps %d: nothing to do", training.step, config.train.max_steps)
        accelerator.end_training()
        return training.summary(None)
    prepare_loop(training)

    progress = Progress(config.train.max_steps, training.step, enabled=accelerator.is_main_process)
    clip = config.optim.grad_clip if config.optim.grad_clip is not None else float("inf")
    last_loss = None
    training.model.train()
    try:
        while training.step < config.train.max_steps:
            # Fetch the micro-batches; forward and backward with gradient accumulation.
            step_start = time.perf_counter()
            loss, waited = forward_backward(training)

            # Clip the gradients; stop on a non-finite loss or gradient norm, before the optimizer step.
            grad_norm = accelerator.clip_grad_norm_(training.model.parameters(), clip)
            last_loss, grad_value = finite_values(training, loss, grad_norm)

            # Optimizer step at this step's learning rate, then the EMA.
            lr = optimizer_step(training)
            training.step += 1
            training.images_seen += config.train.global_batch_size
            progress.step_done(last_loss, grad_value, time.perf_counter() - step_start, waited)
            step, last = training.step, training.step == config.train.max_steps

            # Log the window of steps since the last record.
            if step % config.train.log_every == 0 or last:
                log_record(training, progress, lr)

            # EMA sample grid; previews must not shift the training RNG stream.
            if training.samples is not None and step % config.sample.every == 0:
                with torch.random.fork_rng(devices=[]):
                    path = training.samples.write(training.ema, step, training.tracker)
                logger.info("wrote %s", path)

            # Checkpoint (every rank takes part).
            if step % config.checkpoint.every == 0 or last:
                checkpoint(training)
    finally:
        progress.close()
        if training.metrics is not None:
            training.metrics.close()
    if config.data.on_corrupt_shard == "skip":
        skipped = skipped_shards(training)
        if skipped:
            logger.warning("trained without %d damaged shard(s): %s", len(skipped), ", ".join(skipped))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return training.summary(last_loss)


def forward_backward(training: Training) -> tuple[Any, float]:
    """One optimizer step's micro-batches: forward, backward of loss / accumulation (gradients are synchronised
    between processes on the last micro-batch only). Returns the loss averaged over micro-batches and processes,
    and the seconds spent waiting for data."""
    import torch

    accelerator, accumulation = training.accelerator, training.layout.accumulation
    waited = 0.0
    micro_losses = []
    for micro in range(accumulation):
        x, labels, wait = next(training.batches)
        waited += wait
        sync = contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(training.model)
        with sync:
            with accelerator.autocast():
                loss = training.objective(training.network, x, labels)
            accelerator.backward(loss / accumulation)
        micro_losses.append(loss.detach().float())
    return accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean"), waited


def finite_values(training: Training, loss, grad_norm) -> tuple[float, float]:
    """(loss, grad-norm) as floats; NonFiniteLossError when either is NaN / inf (the grad-norm is not checked
    under fp16, whose grad scaler skips such steps itself)."""
    loss_value = float(loss)
    grad_value = float(grad_norm) if grad_norm is not None else float("nan")
    if not math.isfinite(loss_value) or (training.layout.mixed_precision != "fp16" and not math.isfinite(grad_value)):
        raise NonFiniteLossError(
            f"non-finite training loss at step {training.step + 1}: loss {loss_value}, grad-norm {grad_value}; "
            f"stopped before the optimizer step, the last checkpoint in {training.run_dir / 'checkpoints'} is "
            "intact (lower optim.lr, set optim.grad_clip, or check the data)"
        )
    return loss_value, grad_value


def optimizer_step(training: Training) -> float:
    """Set this step's learning rate, step the optimizer, update the EMA; returns the lr."""
    config = training.config
    lr = learning_rate(config, training.images_seen)
    for group in training.optimizer.param_groups:
        group["lr"] = lr
    training.optimizer.step()
    training.optimizer.zero_grad(set_to_none=True)
    decay = ema_decay(config, training.images_seen, config.train.global_batch_size)
    update_ema(training.ema, training.accelerator.unwrap_model(training.model), decay)
    return lr


def log_record(training: Training, progress: Progress, lr: float) -> None:
    """The record of the steps since the last one: to the trackers, and (main process) to RUN/metrics.jsonl and
    the progress bar. With `data.on_corrupt_shard: skip` it counts the damaged shards skipped so far."""
    record = progress.take_record(training.step, lr, training.images_seen, training.config.train.global_batch_size)
    if training.config.data.on_corrupt_shard == "skip":
        record["skipped_shards"] = len(skipped_shards(training))
    training.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=training.step)
    if training.metrics is not None:
        training.metrics.write(record)
        progress.show(record)


def skipped_shards(training: Training) -> list[str]:
    """The damaged shards skipped so far by any worker of any process (every rank must call this: the ranks'
    flags are combined with a reduction)."""
    import torch

    stream = training.stream
    flags = torch.tensor(list(stream.damaged), dtype=torch.float32, device=training.accelerator.device)
    flags = training.accelerator.reduce(flags, reduction="sum")
    return [url for url, flag in zip(stream.spec.urls, flags.tolist()) if flag > 0]


def checkpoint(training: Training) -> None:
    """Checkpoint of the current step (all ranks call this; rank 0 writes, rotates and moves `latest`)."""
    config = training.config
    save_checkpoint(
        training.accelerator,
        training.run_dir,
        training.step,
        training.ema,
        training.train_state(),
        training.config_text,
        config.checkpoint.keep,
    )
