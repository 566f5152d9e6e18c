"""`diffit-pipe train` and `diffit-pipe export`: thin wrappers around `pipeline.train` and `pipeline.export`."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn, Optional

import typer

TRAIN_HELP = """Train a DiffiT model on shards written by `encode` (latents) or `pack` (images).

\b
One process:
  diffit-pipe train --config manifests/demo.yaml --data data/demo --run-dir runs/demo
\b
Several processes / GPUs / nodes (the same entry point under accelerate):
  accelerate launch --multi_gpu --num_processes 8 --num_machines 1 --mixed_precision bf16 \\
      -m pipeline.train --config manifests/imagenet256_latent_xl2.yaml --data DATA --run-dir runs/xl2
  multi-node: add --num_machines M --machine_rank R --main_process_ip IP --main_process_port PORT
  (the run dir must be on a filesystem all nodes see).
\b
On CPU (gloo), note `accelerate launch --num_processes 2 --cpu` silently runs ONE process; use
  accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
      --dynamo_backend no -m pipeline.train --config ... --data ... --run-dir ...
  or: torchrun --standalone --nproc_per_node 2 -m pipeline.train --config ... --data ... --run-dir ...
\b
Global batch = per-device batch x processes x accumulation steps (train.global_batch_size,
train.per_device_batch_size). The resolved config goes to RUN/config.yaml; metrics to RUN/metrics.jsonl and
tensorboard (RUN/logs); EMA sample grids to RUN/samples/; checkpoints to RUN/checkpoints/ (latest pointer).
Resume after a stop or a kill with --resume auto (the same command line, or just --run-dir and --resume)."""

EXPORT_HELP = """Export the EMA weights of a run (its latest checkpoint) or of one checkpoint directory.

\b
  diffit-pipe export runs/xl2 models/xl2
  diffit-pipe export runs/xl2/checkpoints/step-0400000 models/xl2-400k
\b
OUT holds model.safetensors + config.json (model, diffusion settings, the dataset's VAE and manifest hash,
training step); `diffit.load_pretrained(OUT)` rebuilds the model and `diffit-pipe evaluate` samples it."""


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error and exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML preset, e.g. manifests/imagenet256_latent_xl2.yaml (optional when resuming: RUN/config.yaml is used)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset directory written by encode / pack (optional when resuming: the run's recorded data dir)."),
    run_dir: Path = typer.Option(..., "--run-dir", "-o", help="Run directory: config, metrics, logs, samples, checkpoints."),
    overrides: list[str] = typer.Option([], "--set", help="Override one config value: --set optim.lr=1e-4 --set train.max_steps=1000 (repeatable, type-checked)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'auto': continue from the newest complete checkpoint of --run-dir (start fresh if none); or a checkpoint directory."),
) -> None:
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import ConfigError
    from pipeline.train import NonFiniteLossError, TrainArgs, TrainError, configure_logging, run

    configure_logging()
    args = TrainArgs(run_dir=run_dir, config_path=config, data_dir=data, overrides=list(overrides), resume=resume)
    try:
        summary = run(args)
    except NonFiniteLossError as error:
        _fail(str(error), code=1)
    except (ConfigError, TrainError, CheckpointError) as error:
        _fail(str(error))
    loss = f", last loss {summary['loss']:.5f}" if summary["loss"] is not None else ""
    typer.echo(f"trained to step {summary['step']}{loss}; run dir {summary['run_dir']} "
               f"(export with: diffit-pipe export {summary['run_dir']} OUT)")


def export(
    source: Path = typer.Argument(..., help="A run directory (its latest checkpoint) or a checkpoint directory."),
    out: Path = typer.Argument(..., help="Output directory (model.safetensors + config.json)."),
) -> None:
    from pipeline.checkpoint import CheckpointError
    from pipeline.config import ConfigError
    from pipeline.export import export_checkpoint
    from pipeline.train import configure_logging

    configure_logging()
    try:
        path = export_checkpoint(source, out)
    except (CheckpointError, ConfigError) as error:
        _fail(str(error))
    typer.echo(f"exported {path} (load with diffit.load_pretrained('{path}'))")


def register(app: typer.Typer) -> None:
    """Add `train` and `export` to the diffit-pipe app."""
    app.command("train", help=TRAIN_HELP)(train)
    app.command("export", help=EXPORT_HELP)(export)
