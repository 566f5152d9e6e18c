"""`diffit-pipe train` and `diffit-pipe export`: thin wrappers around `pipeline.train`.

Errors are `PipelineError`s raised by the pipeline; `cli.main` turns them into one line and the exit code (2 for
configuration / data / checkpoint problems, 1 for a non-finite loss, 75 for a stop on SIGTERM / SIGUSR1 after its
checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import typer

TRAIN_HELP = """Train a DiffiT model on shards written by `encode` (latents) or `pack` (images).

\b
One process:
  diffit-pipe train --config manifests/demo.yaml --data data/demo --run-dir runs/demo
\b
Several processes / GPUs / nodes (the same entry point under accelerate):
  accelerate launch --multi_gpu --num_processes 8 --num_machines 1 --mixed_precision bf16 \\
      -m cli.main train --config manifests/imagenet256_latent_xl2.yaml --data DATA --run-dir runs/xl2
  multi-node: add --num_machines M --machine_rank R --main_process_ip IP --main_process_port PORT
  (the run dir must be on a filesystem all nodes see).
\b
On CPU (gloo), note `accelerate launch --num_processes 2 --cpu` silently runs ONE process; use
  accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
      --dynamo_backend no -m cli.main train --config ... --data ... --run-dir ...
  or: torchrun --standalone --nproc_per_node 2 -m cli.main train --config ... --data ... --run-dir ...
\b
Global batch = per-device batch x processes x accumulation steps (train.global_batch_size,
train.per_device_batch_size). The resolved config goes to RUN/config.yaml; metrics to RUN/metrics.jsonl and
the trackers of train.tracker (tensorboard in RUN/logs by default; wandb, mlflow, aim, ... or a list); EMA
sample grids to RUN/samples/ and the trackers; checkpoints to RUN/checkpoints/ (latest pointer; multiples of
checkpoint.keep_every are never rotated away).
Resume after a stop or a kill with --resume auto (the same command line, or just --run-dir and --resume).
\b
Preemption: SIGTERM or SIGUSR1 (SLURM: preemption, or #SBATCH --signal=USR1@180 before the time limit)
finishes the current step on every rank, writes a checkpoint of it and exits with code 75 (EX_TEMPFAIL);
a job script requeues on 75 and continues with --resume auto. Under accelerate launch / torchrun the
launcher exits 1 instead: launch one process per GPU with srun to keep the 75 (docs: the sbatch template).
\b
Integrity: every shard is checked against the manifest's sha256 as it is read; a damaged one stops the run
(or, with --set data.on_corrupt_shard=skip, is left out, warned about and counted in metrics.jsonl).
Checkpoints record the sha256 of their files: --resume auto falls back from a damaged checkpoint to the
newest one that verifies (with a warning); an explicitly named damaged checkpoint is an error."""

EXPORT_HELP = """Export the EMA weights of a run (its latest checkpoint) or of one checkpoint directory.

\b
  diffit-pipe export runs/xl2 models/xl2
  diffit-pipe export runs/xl2/checkpoints/step-0400000 models/xl2-400k
\b
OUT holds model.safetensors + config.json (model, diffusion settings, the dataset's VAE and manifest hash,
training step); `diffit.load_pretrained(OUT)` rebuilds the model and `diffit-pipe evaluate` samples it."""


CONFIG_HELP = (
    "YAML preset, e.g. manifests/imagenet256_latent_xl2.yaml (optional when resuming: RUN/config.yaml is used)."
)
DATA_HELP = (
    "Dataset written by encode / pack: a directory or an object-store URL (s3://bucket/prefix, gs://...; "
    "credentials from the usual environment). Optional when resuming: the run's recorded data."
)
SET_HELP = "Override one config value: --set optim.lr=1e-4 --set train.max_steps=1000 (repeatable, type-checked)."
RESUME_HELP = (
    "'auto': continue from the newest complete checkpoint of --run-dir whose files verify (start fresh if none); "
    "or a checkpoint directory (an error if it does not verify)."
)


def train(
    config: Path | None = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    data: str | None = typer.Option(None, "--data", "-d", help=DATA_HELP),
    run_dir: Path = typer.Option(
        ..., "--run-dir", "-o", help="Run directory: config, metrics, logs, samples, checkpoints."
    ),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: str | None = typer.Option(None, "--resume", help=RESUME_HELP),
) -> None:
    """`diffit-pipe train` (see TRAIN_HELP)."""
    from pipeline.core.logs import setup_logging
    from pipeline.train import RUN_CONFIG, TrainOptions, load_config, run_train

    setup_logging()
    # A bad config or --set value (a negative seed, ...) is refused before the run directory is created or locked;
    # the trainer reads the same file with the same overrides again (pipeline.train.checks.prepare_config).
    stored = run_dir / RUN_CONFIG
    if config is not None:
        load_config(config, list(overrides))
    elif resume and stored.is_file():
        load_config(stored, list(overrides))
    summary = run_train(
        TrainOptions(run_dir=run_dir, config_path=config, data_dir=data, overrides=list(overrides), resume=resume)
    )
    loss = f", last loss {summary['loss']:.5f}" if summary["loss"] is not None else ""
    typer.echo(
        f"trained to step {summary['step']}{loss}; run dir {summary['run_dir']} "
        f"(export with: diffit-pipe export {summary['run_dir']} OUT)"
    )


def export(
    source: Path = typer.Argument(..., help="A run directory (its latest checkpoint) or a checkpoint directory."),
    out: Path = typer.Argument(..., help="Output directory (model.safetensors + config.json)."),
) -> None:
    """`diffit-pipe export` (see EXPORT_HELP)."""
    from pipeline.core.logs import setup_logging
    from pipeline.train import export_checkpoint

    setup_logging()
    path = export_checkpoint(source, out)
    typer.echo(f"exported {path} (load with diffit.load_pretrained('{path}'))")


def register(app: typer.Typer) -> None:
    """Add `train` and `export` to the diffit-pipe app."""
    app.command("train", help=TRAIN_HELP)(train)
    app.command("export", help=EXPORT_HELP)(export)
