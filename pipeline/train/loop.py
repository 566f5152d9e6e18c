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
every `eval.every` steps the EMA's FID against `eval.reference` (`pipeline.train.fid`; every rank samples its
share) goes to both as `fid_{N}k`; every `checkpoint.every` steps (and at the end) a checkpoint
(`pipeline.train.checkpoint`; multiples of `checkpoint.keep_every` are kept for good).

A non-finite loss or gradient norm stops the run before anything of it is written, so the last checkpoint is the
last good state. On CPU it is checked at every step, before the optimizer step. On CUDA reading the loss would
make the host wait for the GPU at every step, so the step's loss and gradient norm stay on the device and are
checked -- every step since the last check -- at the next step that reads or writes anything: a log record, a
sample grid, a checkpoint or a stop. The steps in between may have updated the weights with NaN, but nothing of
theirs is ever written: the error names the first non-finite step and the step it was found at.

Preemption (`pipeline.train.preemption`): SIGTERM / SIGUSR1 finish the current step; every rank then logs it,
writes a checkpoint of it and stops with exit code 75; `--resume auto` continues from that checkpoint. The
handlers are installed before any set-up work and stay through teardown: a signal during set-up stops with 75
before the first step (nothing to save), one after the last step lets the run finish (exit 0).

One trainer per run directory (`pipeline.train.runlock`): rank 0 holds the run directory's lock for the whole run;
a second trainer fails with one line (exit 2). A full disk (`pipeline.train.diskfull`) is one line naming the
file, exit 1; a checkpoint write that fails removes its temporary directory at once.

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
import time
from typing import Any

from pipeline.core.errors import EXIT_JOB_FAILED
from pipeline.train.checkpoint import CHECKPOINTS_DIR, checkpoint_name, save_checkpoint
from pipeline.train.checks import TrainError, TrainOptions
from pipeline.train.diskfull import DiskFullError, disk_full_as_error
from pipeline.train.objective import Objective, ema_decay, learning_rate, update_ema
from pipeline.train.preemption import EXIT_STOPPED, StopAgreement, StopSignals, TrainingStopped, pause_point
from pipeline.train.progress import Progress
from pipeline.train.runlock import RunLockedError, is_lock_rank, run_dir_lock
from pipeline.train.setup import Training, prepare_loop, set_up

logger = logging.getLogger("pipeline.train")

# `run` and the errors it adds, and names other code imports from here (they live in the modules named above).
__all__ = [
    "EXIT_STOPPED",
    "DiskFullError",
    "NonFiniteLossError",
    "Objective",
    "TrainOptions",
    "RunLockedError",
    "TrainError",
    "TrainingStopped",
    "ema_decay",
    "learning_rate",
    "run_train",
    "update_ema",
]


class NonFiniteLossError(TrainError):
    """The loss or gradient norm became NaN / inf; the run stopped before writing anything of it (exit 1)."""

    exit_code = EXIT_JOB_FAILED


def run_train(args: TrainOptions) -> dict[str, Any]:
    """Train (or continue training) one run; returns a summary (final step, last loss, run dir). Raises
    TrainingStopped (exit 75) on SIGTERM / SIGUSR1 (after the checkpoint of the current step; before the first
    step with nothing to save), RunLockedError (exit 2) when another trainer uses the run directory, DiskFullError
    (exit 1) when the disk fills up."""
    # The handlers come first and stay until the run has returned or raised: a signal at any moment -- set-up,
    # a step, a checkpoint write, teardown -- is an orderly stop, never a kill (pipeline.train.preemption).
    with StopSignals() as signals:
        lock = run_dir_lock(args.run_dir) if is_lock_rank() else contextlib.nullcontext()
        with lock, disk_full_as_error(args.run_dir):
            return _run(args, signals)


def _run(args: TrainOptions, signals: StopSignals) -> dict[str, Any]:
    """`run` under the handlers and the run directory's lock."""
    pause_point("setup")
    training = set_up(args)
    config, accelerator = training.config, training.accelerator
    if training.step >= config.train.max_steps:
        logger.info("step %d >= train.max_steps %d: nothing to do", training.step, config.train.max_steps)
        accelerator.end_training()
        return training.summary(None)
    stop = StopAgreement(accelerator, signals)
    progress = None
    try:
        prepare_loop(training)
        if stop.before_first_step():
            raise TrainingStopped(setup_stop_message(training, signals.received))
        progress = Progress(config.train.max_steps, training.step, enabled=accelerator.is_main_process)
        stopped = train_steps(training, progress, stop)
        if config.data.on_corrupt_shard == "skip":
            skipped = skipped_shards(training)
            if skipped:
                logger.warning("trained without %d damaged shard(s): %s", len(skipped), ", ".join(skipped))
        pause_point("teardown")
        accelerator.wait_for_everyone()
    finally:
        close_loop(training, progress)
    accelerator.end_training()
    if stopped:
        raise TrainingStopped(stop_message(training, signals.received))
    if signals.received is not None:
        logger.warning("received %s after the last step: the run is complete (exit code 0)", signals.received)
    return training.summary(progress.last_loss)


def close_loop(training: Training, progress: Progress | None) -> None:
    """Close the progress bar and metrics log and stop the DataLoader workers (here, under the handlers, rather
    than whenever the garbage collector gets to them)."""
    if progress is not None:
        progress.close()
    if training.metrics is not None:
        training.metrics.close()
    if training.batches is not None:
        training.batches.close()  # ends the loader's iterator: its workers are shut down now
        training.batches = None


def train_steps(training: Training, progress: Progress, stop: StopAgreement) -> bool:
    """The optimizer steps up to `train.max_steps`, or up to a stop every rank agreed on. Returns whether the
    run stopped early."""
    import torch

    config, accelerator = training.config, training.accelerator
    clip = config.optim.grad_clip if config.optim.grad_clip is not None else float("inf")
    training.model.train()
    while training.step < config.train.max_steps:
        # Fetch the micro-batches; forward and backward with gradient accumulation.
        step_start = time.perf_counter()
        loss, waited, repa_loss = forward_backward(training)

        # Clip the gradients. Off CUDA, stop on a non-finite loss or gradient norm before the optimizer step.
        grad_norm = accelerator.clip_grad_norm_(training.parameters(), clip)
        progress.step_values(loss, grad_norm, repa_loss)
        if training.check_every_step:
            check_finite(training, progress, inside_step=True)

        # Optimizer step at this step's learning rate, then the EMA.
        lr = optimizer_step(training)
        pause_point("step")
        training.step += 1
        training.images_seen += config.train.global_batch_size
        progress.step_done(time.perf_counter() - step_start, waited)
        step, last = training.step, training.step == config.train.max_steps
        stopping = stop.should_stop() and not last  # every rank calls it: a collective on several processes

        # Log the window of steps since the last record.
        if step % config.train.log_every == 0 or last or stopping:
            log_record(training, progress, lr)

        # EMA sample grid (main process; every rank checks the loss, so that all stop at the same step);
        # previews must not shift the training RNG stream.
        if config.sample.every > 0 and step % config.sample.every == 0:
            check_finite(training, progress)
            if training.samples is not None:
                with torch.random.fork_rng(devices=[]):
                    path = training.samples.write(training.ema, step, training.grids)
                logger.info("wrote %s", path)

        # FID of the EMA (every rank samples its share; nothing of the training RNG is drawn).
        if config.eval.every > 0 and step % config.eval.every == 0:
            check_finite(training, progress)
            log_fid(training)

        # Checkpoint (every rank takes part).
        if step % config.checkpoint.every == 0 or last or stopping:
            check_finite(training, progress)
            checkpoint(training)
        if stopping:
            return True
    return False


def forward_backward(training: Training) -> tuple[Any, float, Any]:
    """One optimizer step's micro-batches: forward, backward of loss / accumulation (gradients are synchronised
    between processes on the last micro-batch only). With REPA the loss backpropagated is the objective's loss +
    repa.weight * repa_loss (`pipeline.train.repa`). Returns the objective's loss averaged over micro-batches and
    processes (a tensor, on the device), the seconds spent waiting for data, and REPA's loss averaged the same way
    (None without REPA)."""
    import torch

    accelerator, accumulation, repa = training.accelerator, training.layout.accumulation, training.repa
    waited = 0.0
    micro_losses = []
    for micro in range(accumulation):
        x, labels, wait, images = next(training.batches)
        waited += wait
        with _sync_on_last(training, micro == accumulation - 1):
            with accelerator.autocast():
                if repa is None:
                    loss = total = training.objective(training.network, x, labels)
                else:
                    loss, alignment = repa(training.objective, training.network, x, labels, images)
                    total = loss + repa.weight * alignment
            accelerator.backward(total / accumulation)
        micro_losses.append(
            loss.detach().float() if repa is None else torch.stack([loss.float(), alignment.float()]).detach()
        )
    means = accelerator.reduce(torch.stack(micro_losses).mean(dim=0), reduction="mean")  # one reduction
    return (means, waited, None) if repa is None else (means[0], waited, means[1])


def _sync_on_last(training: Training, last: bool):
    """No gradient synchronisation between processes before the last micro-batch (the model's and REPA's
    projector's, each a DDP module of its own on several processes)."""
    stack = contextlib.ExitStack()
    if not last:
        stack.enter_context(training.accelerator.no_sync(training.model))
        if training.repa is not None:
            stack.enter_context(training.accelerator.no_sync(training.repa.projector))
    return stack


def check_finite(training: Training, progress: Progress, inside_step: bool = False) -> None:
    """NonFiniteLossError when a step since the last check had a NaN / inf loss or gradient norm (the
    gradient norm is not checked under fp16, whose grad scaler skips such steps itself). Reads the values from
    the device: every rank calls it at the same steps, and all see the same (reduced) values."""
    fp16 = training.layout.mixed_precision == "fp16"
    bad = progress.window.first_non_finite(check_grad_norm=not fp16, timed=not inside_step)
    if bad is None:
        return
    bad_step, loss, grad_norm = bad
    if training.check_every_step:
        when = "stopped before the optimizer step"
    else:
        when = (
            f"found at step {training.step} (on CUDA the loss is checked at log, sample, checkpoint and stop "
            "steps), nothing written since"
        )
    raise NonFiniteLossError(
        f"non-finite training loss at step {bad_step}: loss {loss}, grad-norm {grad_norm}; {when}, the last "
        f"checkpoint in {training.run_dir / CHECKPOINTS_DIR} is intact (lower optim.lr, set optim.grad_clip, or "
        "check the data)"
    )


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
    if training.repa is not None:  # REPA's EMA holds its projectors too (train.py: update_ema(ema, model))
        update_ema(training.repa.ema_projector, training.accelerator.unwrap_model(training.repa.projector), decay)
    return lr


def log_record(training: Training, progress: Progress, lr: float) -> None:
    """The record of the steps since the last one: to the trackers, and (main process) to RUN/metrics.jsonl and
    the progress bar. Checks the window's losses first. With
    `data.on_corrupt_shard: skip` it counts the damaged shards skipped so far."""
    check_finite(training, progress)
    config = training.config
    record = progress.take_record(training.step, lr, training.images_seen, config.train.global_batch_size)
    record.update(training.device_stats.record(record["images_per_s"]))
    if config.data.on_corrupt_shard == "skip":
        record["skipped_shards"] = len(skipped_shards(training))
    training.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=training.step)
    if training.metrics is not None:
        training.metrics.write(record)
        progress.show(record)


def log_fid(training: Training) -> None:
    """FID of the EMA at this step (every rank takes part) to the trackers and RUN/metrics.jsonl; text values
    (the plumbing-only label) go to metrics.jsonl only."""
    record = training.fid.evaluate(training.ema, training.step)
    if training.accelerator.is_main_process:
        numbers = {key: value for key, value in record.items() if not isinstance(value, str)}
        training.accelerator.log(numbers, step=training.step)
        if training.metrics is not None:
            training.metrics.write({"step": training.step, **record})


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
        config.checkpoint.keep_every,
        projector_ema=training.repa.ema_projector if training.repa is not None else None,
    )


def stop_message(training: Training, signal_name: str | None) -> str:
    """What a stopped run says: the signal, the step, the checkpoint, how to continue, the exit code."""
    path = training.run_dir / CHECKPOINTS_DIR / checkpoint_name(training.step)
    return (
        f"stopped by {signal_name or 'a signal to another rank'} after step {training.step}: checkpoint {path} "
        f"written; continue with `diffit-pipe train --run-dir {training.run_dir} --resume auto` "
        f"(exit code {EXIT_STOPPED})"
    )


def setup_stop_message(training: Training, signal_name: str | None) -> str:
    """What a run stopped during set-up says: nothing was saved, how to continue, the exit code."""
    where = f"checkpoint {training.checkpoint}" if training.checkpoint is not None else "step 0"
    return (
        f"stopped by {signal_name or 'a signal to another rank'} during set-up, before the first step: nothing to "
        f"save (the run continues from {where}); continue with the same command and `--resume auto` "
        f"(exit code {EXIT_STOPPED})"
    )
