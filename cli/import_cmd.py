"""`diffit-pipe import-nvlabs`: the released NVlabs/DiffiT weights as an exported model directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.evaluate_cmd import docstring_help

CHECKPOINT_HELP = "The released weights: diffit_256.safetensors or diffit_512.safetensors (read with safetensors)."
VAE_HELP = (
    "The VAE to record: the released stabilityai/sd-vae-ft-ema by default (looked up in the local Hugging Face "
    "cache when evaluating), or a local diffusers AutoencoderKL folder."
)


def import_nvlabs(
    checkpoint: Annotated[Path, typer.Argument(help=CHECKPOINT_HELP)],
    out: Annotated[Path, typer.Argument(help="The model directory to write (model.safetensors + config.json).")],
    vae: Annotated[str | None, typer.Option("--vae", help=VAE_HELP)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty OUT.")] = False,
) -> None:
    """Import the released DiffiT latent model so that `evaluate --model OUT` reproduces the published numbers.

    The architecture is read off the weights (XL/2; 32x32 latents at 256 px, 64x64 at 512 px), and the released
    sampling set-up is recorded in OUT/config.json and used by `evaluate` by default: sd-vae-ft-ema with latents
    divided by 0.18215, ADM linear schedule of 1000 steps with learned sigma, DDPM with 250 steps, 1000 classes
    plus the null class, classifier-free guidance on the first 3 latent channels, power-cosine (exponent 4) with
    scale 4.4 at 256 px (the released code's setting for FID 1.73; the paper text says 4.6, pass --guidance-scale 4.6
    to evaluate with it) and a constant 1.49 at 512 px.

    The file is checked before anything is allocated (header, floating dtypes, names and shapes); the
    architecture its shapes imply may hold at most 4e9 parameters (DiffiT-XL/2: 561M): set the environment
    variable DIFFIT_MAX_PARAMETERS to import a larger model.

    Then: diffit-pipe evaluate --model OUT --reference VIRTUAL_imagenet256_labeled.npz --out EVAL
    """
    from pipeline.core.logs import setup_logging
    from pipeline.train import import_nvlabs as run_import

    setup_logging()
    config = run_import(checkpoint, out, vae=vae, overwrite=overwrite)
    sampling = config["sampling"]
    typer.echo(
        f"wrote {out}: {config['model']['name']} ({config['model']['kwargs']['input_size']}x"
        f"{config['model']['kwargs']['input_size']} latents), guidance {sampling['guidance_scale']} "
        f"{sampling['guidance_schedule']}, {sampling['sampler']}-{sampling['steps']}"
    )


def register(app: typer.Typer) -> None:
    """Add `import-nvlabs` to the diffit-pipe app."""
    app.command("import-nvlabs", help=docstring_help(import_nvlabs))(import_nvlabs)
