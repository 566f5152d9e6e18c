"""`diffit-pipe import-nvlabs`: the released NVlabs/DiffiT weights -> an exported model directory.

    diffit-pipe import-nvlabs diffit_256.safetensors models/diffit-xl2-256
    diffit-pipe evaluate --model models/diffit-xl2-256 --reference VIRTUAL_imagenet256_labeled.npz --out eval/

The output is what `diffit-pipe export` writes (`model.safetensors` + `config.json`, read by `evaluate` and by
`diffit.load_pretrained`), with the released sampling set-up recorded so that `evaluate` uses it by default:

    {"model": {"name", "kwargs"}  (read off the tensor shapes: XL/2 at 32x32 latents for 256 px, 64x64 for 512),
     "diffusion": {"type": "adm", "noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": true},
     "vae": {"id": "stabilityai/sd-vae-ft-ema", "source": "hub", "scaling_factor": 0.18215},
     "latent_norm": {"kind": "scalar", "scaling_factor": 0.18215, "shift_factor": 0.0},
     "sampling": {"sampler": "ddpm", "steps": 250, "guidance_scale": 4.4 | 1.49,
                  "guidance_schedule": "power-cosine" | "constant", "guidance_power": 4, "guidance_channels": 3},
     "released": {"file", "sha256", "num_classes": 1000 (+ the null row of classifier-free guidance)}}

Where the set-up comes from (NVlabs/DiffiT): `sample.py` decodes with `stabilityai/sd-vae-ft-<ema>` after
dividing by 0.18215, samples with the ADM diffusion (linear schedule, 1000 steps, learned sigma) respaced to
`--num_sampling_steps 250` (DDPM); `slurm_sample_256.sh` passes `--cfg_scale 4.4`, `slurm_sample_512.sh`
`--cfg_scale 1.49`; `DiffiT.forward_with_cfg` guides the first 3 eps channels, with the power-cosine schedule
(`scale_pow` 4) for latents up to 32x32 (256 px) and a constant scale above (512 px).

The file is checked before anything is allocated (`diffit.convert.check_nvlabs_file`: the safetensors header
read by hand, floating weights only, the architecture its shapes imply bounded by `$DIFFIT_MAX_PARAMETERS`
(default 4e9 parameters), every name and shape against a model on the meta device); then the weights are read
with `safetensors.torch.load_file`, converted strictly (`diffit.convert.convert_nvlabs_state_dict`), and the
directory is written beside OUT and renamed into place. A bad file is one `error: <file>: <problem>` line, exit 2,
and OUT is not created.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from pipeline.core.atomic import replace_directory, temp_suffix, write_bytes_atomic
from pipeline.core.errors import InputError
from pipeline.core.shards import sha256_file

logger = logging.getLogger(__name__)

RELEASED_VAE = "stabilityai/sd-vae-ft-ema"
RELEASED_SCALING_FACTOR = 0.18215
RELEASED_DIFFUSION = {"type": "adm", "noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True}
# The released code switches guidance on the latent size: power-cosine up to 32x32 latents (256 px), constant above.
POWER_COSINE_MAX_LATENT = 32
RELEASED_SAMPLING_256 = {"guidance_scale": 4.4, "guidance_schedule": "power-cosine"}
RELEASED_SAMPLING_512 = {"guidance_scale": 1.49, "guidance_schedule": "constant"}
RELEASED_ORIGIN = "released NVlabs/DiffiT code"


def released_sampling(latent_size: int) -> dict[str, Any]:
    """The released code's sampling set-up for a model of `latent_size` x `latent_size` latents."""
    guidance = RELEASED_SAMPLING_256 if latent_size <= POWER_COSINE_MAX_LATENT else RELEASED_SAMPLING_512
    script = "slurm_sample_256.sh" if latent_size <= POWER_COSINE_MAX_LATENT else "slurm_sample_512.sh"
    return {
        "sampler": "ddpm",
        "steps": 250,
        **guidance,
        "guidance_power": 4.0,
        "guidance_channels": 3,
        "pixels": "truncate",  # sample.py: ((x + 1) * 127.5).clamp(0, 255).to(uint8)
        "origin": RELEASED_ORIGIN,
        "reference": f"NVlabs/DiffiT {script} (--cfg_scale, --num_sampling_steps 250), "
        "diffit/diffit.py DiffiT.forward_with_cfg (first 3 eps channels, scale_pow 4) and sample.py (pixels "
        "truncated: ((x + 1) * 127.5).clamp(0, 255).to(uint8))",
    }


def _model_name(kwargs: dict[str, Any]) -> str:
    """The named configuration recorded for this architecture (see `diffit.convert.nvlabs_model_name`)."""
    from diffit.convert import nvlabs_model_name

    return nvlabs_model_name(kwargs)


def _vae_entry(vae: str | None) -> dict[str, Any]:
    """The `vae` entry: the released hub VAE (resolved when `evaluate` runs), or a local VAE given now."""
    if vae is None or vae == RELEASED_VAE:
        return {"id": RELEASED_VAE, "source": "hub", "scaling_factor": RELEASED_SCALING_FACTOR}
    from pipeline.core.vae import VAEError, resolve_vae

    try:
        spec = resolve_vae(vae)
    except VAEError as error:
        raise InputError(f"--vae {vae}: {error}") from error
    return {**spec.manifest_entry("fp32"), "scaling_factor": RELEASED_SCALING_FACTOR}


def load_released_model(checkpoint: str | Path, max_parameters: int | None = None):
    """(model with the released weights, its constructor kwargs, the model name) of a released file.

    Everything about the file is checked before a weight is read or the model is built
    (`diffit.convert.load_nvlabs_model`: header, floating dtypes, the architecture's size against the bound of
    `$DIFFIT_MAX_PARAMETERS` / `max_parameters`, names and shapes); a refusal is one `InputError` line."""
    from diffit.config_check import InvalidModelFileError
    from diffit.convert import load_nvlabs_model

    path = Path(checkpoint)
    if not path.is_file():
        raise InputError(f"{path}: no such file (the released weights, e.g. diffit_256.safetensors)")
    try:
        return load_nvlabs_model(path, max_parameters)
    except InvalidModelFileError as error:
        raise InputError(str(error)) from error
    except ValueError as error:  # the bound itself: a bad $DIFFIT_MAX_PARAMETERS
        raise InputError(f"{path}: {error}") from error
    except OSError as error:
        raise InputError(f"{path}: cannot read ({error})") from error


def import_nvlabs(
    checkpoint: str | Path, out_dir: str | Path, vae: str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Write the export directory of a released checkpoint (see the module docstring); returns its config."""
    from diffit.io import pretrained_files

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out} exists and is not empty; pass --overwrite to replace it")
    model, kwargs, name = load_released_model(checkpoint)
    extra = {
        "diffusion": dict(RELEASED_DIFFUSION),
        "vae": _vae_entry(vae),
        # The released model's latents: the SD VAE's `z * 0.18215`, no shift (whatever VAE decodes them).
        "latent_norm": {"kind": "scalar", "scaling_factor": RELEASED_SCALING_FACTOR, "shift_factor": 0.0},
        "sampling": released_sampling(kwargs["input_size"]),
        "released": {
            "file": Path(checkpoint).name,
            "sha256": sha256_file(Path(checkpoint)),
            "num_classes": kwargs["num_classes"],
            "null_class": kwargs["num_classes"],
        },
    }
    staging = out.with_name(out.name + temp_suffix())
    try:
        for file_name, data in pretrained_files(model, extra).items():
            write_bytes_atomic(staging / file_name, data)
        replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        "imported %s (%s, %dx%d latents) into %s", checkpoint, name, kwargs["input_size"], kwargs["input_size"], out
    )
    return {"model": {"name": name, "kwargs": kwargs}, **extra}
