"""The `diffit-pipe` command, and the one launch entry point for multi-process runs.

    diffit-pipe train --config manifests/demo.yaml --data DATA --run-dir RUN
    accelerate launch --multi_gpu --num_processes 8 -m cli.main train --config ... --data ... --run-dir ...

Each stage lives in its own small module that exposes `register(app)`; heavy imports (torch, diffusers,
dask, torch-fidelity) happen inside the command bodies so that `diffit-pipe --help` stays fast. Every
`PipelineError` a command raises becomes one `error: ...` line on stderr and that error's exit code
(`pipeline.core.errors`), the same for every command; so does `diffit`'s `InvalidModelFileError` (a model file
refused by the library's loaders, exit 2).
"""

from __future__ import annotations

import signal
import sys


class EarlyStopSignals:
    """SIGTERM / SIGUSR1 handler of `diffit-pipe train` from the first line of this module until the trainer's
    own handlers (`pipeline.train.preemption.StopSignals`) take over: Python's import of typer, torch, diffusers
    and accelerate takes seconds, and a cluster that preempts a job while it starts must still see exit 75 (the
    job is requeued), not a death by the signal (143 / 138). It only records the first signal's name in
    `received`; `StopSignals` finds this handler as the one it replaces and takes the recorded signal over, so the
    run stops before its first step exactly as for a signal during set-up (exit 75, or 0 when the run is already
    complete). The interpreter's own start-up, before this module runs (~25 ms), is the only moment left out."""

    def __init__(self) -> None:
        self.received: str | None = None

    def __call__(self, number: int, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name


def install_early_stop_signals(argv: list[str]) -> EarlyStopSignals | None:
    """Install `EarlyStopSignals` for `diffit-pipe train ...` (argv[1] is the command; the root has no options
    besides --help); other commands keep the default handling. Returns the handler, or None."""
    if len(argv) < 2 or argv[1] != "train":
        return None
    handler = EarlyStopSignals()
    for name in ("SIGTERM", "SIGUSR1"):  # pipeline.train.preemption.STOP_SIGNALS (not imported: it imports torch)
        number = getattr(signal, name, None)  # SIGUSR1 does not exist on Windows
        if number is not None:
            signal.signal(number, handler)
    return handler


# First, before the imports below (and the commands' heavy ones): see EarlyStopSignals.
EARLY_STOP_SIGNALS = install_early_stop_signals(sys.argv)

import importlib  # noqa: E402

import typer  # noqa: E402
from typer.core import TyperGroup  # noqa: E402


class PipelineCommands(TyperGroup):
    """The command group: turns any `PipelineError` into one clear line and its exit code."""

    def invoke(self, ctx):
        from pipeline.core.errors import EXIT_BAD_INPUT, EXIT_JOB_FAILED, PipelineError

        try:
            return super().invoke(ctx)
        except PipelineError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(error.exit_code) from None
        except MemoryError:
            typer.echo(
                f"error: diffit-pipe {ctx.invoked_subcommand}: out of memory; lower the batch size or the worker "
                "count, or run on a machine with more memory (a rerun resumes)",
                err=True,
            )
            raise typer.Exit(EXIT_JOB_FAILED) from None
        except OSError as error:
            from pipeline.core.errors import disk_full_error, is_disk_full

            if not is_disk_full(error):
                raise
            typer.echo(f"error: {disk_full_error('.', error, 'the job resumes')}", err=True)
            raise typer.Exit(EXIT_JOB_FAILED) from None
        except ValueError as error:
            # `diffit` (which never imports `pipeline`) refuses a bad model file with its own ValueError,
            # `InvalidModelFileError` ("<file>: <problem>"): bad input, whichever stage reached the loader.
            # Looked up in sys.modules so that --help does not import diffit (torch); not imported = not raised.
            checks = sys.modules.get("diffit.config_check")
            if checks is None or not isinstance(error, checks.InvalidModelFileError):
                raise
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None


app = typer.Typer(
    name="diffit-pipe",
    cls=PipelineCommands,
    help=(
        "Encode image datasets to latent shards, train DiffiT diffusion models on them, and evaluate the "
        "samples (FID / IS / precision / recall). Run `diffit-pipe COMMAND --help` for each command."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """DiffiT pipeline: encode -> train -> evaluate. Run `diffit-pipe COMMAND --help` for each command."""


# One module per stage; each adds its commands to `app`.
COMMAND_MODULES = [
    "cli.models_cmd",
    "cli.encode_cmd",
    "cli.evaluate_cmd",
    "cli.reference_cmd",
    "cli.import_cmd",
    "cli.train_cmd",
    "cli.vae_cmd",
    "cli.report_cmd",
    "cli.demo_cmd",
    "cli.study_cmd",
    "cli.attention_maps_cmd",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
