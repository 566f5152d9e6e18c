"""`diffit-pipe export`: a training checkpoint's EMA weights -> an exported model directory.

The output is what `diffit.save_pretrained` writes (`model.safetensors` + `config.json`), with `config.json`
extended by what sampling and evaluation need, so `diffit.load_pretrained(OUT)` rebuilds the model in one call:

    {"model": {"name", "kwargs"},
     "diffusion": {"type": "adm", "noise_schedule", "diffusion_steps", "learn_sigma"}
                | {"type": "edm", "sigma_data", "P_mean", "P_std", "precond", "augment"}
                | {"type": "flow", "time_sampling", "logit_mean", "logit_std", "time_shift"},
     "vae": {...the dataset manifest's vae entry (latent models only)...},
     "latent_norm": {"kind": "scalar", "scaling_factor", "shift_factor"} | {"kind": "channel", "mean", "std"}
                    (latent models: what the model's latents are, `diffit.latent_norm`; every decoder inverts it),
     "dataset": {"manifest_hash", "resolution", "num_classes", "kind", ...},
     "train": {"step", "images_seen", "run_dir", "checkpoint"}}

Only the EMA is exported (it is what DiT, EDM and DiffiT sample from). Nothing is unpickled: the EMA is read
from safetensors, the train state from JSON.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_bytes_atomic
from pipeline.train.checkpoint import (
    CONFIG_COPY,
    EMA_WEIGHTS,
    CheckpointError,
    load_ema,
    read_train_state,
    resolve_checkpoint,
)
from pipeline.train.config import load_config

logger = logging.getLogger(__name__)


def diffusion_entry(diffusion: dict[str, Any], augment: float = 0.0) -> dict[str, Any]:
    """The `diffusion` block of an exported config, from the resolved training config's `diffusion` section (and
    `data.augment`, EDM's augmentation probability, recorded with EDM's other training settings). "precond" is
    what sampling rebuilds the denoiser with; a train state written before it existed was EDM's."""
    if diffusion["type"] == "adm":
        return {
            "type": "adm",
            "noise_schedule": diffusion["noise_schedule"],
            "diffusion_steps": diffusion["diffusion_steps"],
            "learn_sigma": diffusion["learn_sigma"],
        }
    if diffusion["type"] == "flow":
        keys = ("time_sampling", "logit_mean", "logit_std", "time_shift")
        return {"type": "flow", **{key: diffusion[key] for key in keys}}
    return {
        "type": "edm",
        "sigma_data": diffusion["sigma_data"],
        "P_mean": diffusion["P_mean"],
        "P_std": diffusion["P_std"],
        "precond": diffusion.get("precond", "edm"),
        "augment": float(augment),
    }


def _checked_latent_norm(entry: Any, checkpoint: Path) -> dict[str, Any]:
    """A train state's latent_norm, checked (`diffit.latent_norm.LatentNorm.from_dict`) before it is exported."""
    from diffit.latent_norm import LatentNorm

    try:
        return LatentNorm.from_dict(entry).to_dict()
    except ValueError as error:
        raise CheckpointError(f"{checkpoint}: train state: {error}") from None


def export_checkpoint(source: str | Path, out_dir: str | Path) -> Path:
    """Export the EMA of `source` (a run directory -> its latest checkpoint, or a checkpoint directory)."""
    from diffit.io import pretrained_files
    from diffit.models import create_model

    checkpoint = resolve_checkpoint(source)
    state = read_train_state(checkpoint)
    config = load_config(checkpoint / CONFIG_COPY)
    model = create_model(state["model"]["name"], **state["model"]["kwargs"])
    load_ema(model, checkpoint / EMA_WEIGHTS)
    extra: dict[str, Any] = {
        "diffusion": diffusion_entry({**state["diffusion"], "type": config.diffusion.type}, config.data.augment),
        "dataset": state["dataset"],
        "train": {
            "step": state["step"],
            "images_seen": state["images_seen"],
            "run_dir": state["run_dir"],
            "checkpoint": str(Path(checkpoint).resolve()),
        },
    }
    if state.get("vae") is not None:
        extra["vae"] = state["vae"]
    if state.get("latent_norm") is not None:  # checkpoints written before it existed: scalar, no shift (implied)
        extra["latent_norm"] = _checked_latent_norm(state["latent_norm"], checkpoint)
    out = Path(out_dir)
    for name, data in pretrained_files(model.eval(), extra).items():
        write_bytes_atomic(out / name, data)
    logger.info("exported the EMA of %s (step %d) to %s", checkpoint, state["step"], out)
    return out
