"""The `diffit-pipe` command.

Each stage lives in its own small module that exposes `register(app)`; heavy imports (torch, diffusers,
dask, torch-fidelity) happen inside the command bodies so that `diffit-pipe --help` stays fast.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="diffit-pipe",
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


# One module per stage; each adds its commands to `app`. Only modules that exist are listed here:
# a command appears in `--help` only once it really works.
COMMAND_MODULES = [
    "cli.models_cmd",
    "cli.encode_cmd",
    "cli.evaluate_cmd",
    "cli.train_cmd",
    "cli.vae_cmd",
    "cli.demo_cmd",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
