"""Explicit save / load helpers: an exported model is a directory with `model.safetensors` + `config.json`.

`config.json` holds `{"model": {"name", "kwargs"}, ...extra}`; `extra` is what the exporter adds (diffusion
type and settings, VAE, dataset identity), so that `load_pretrained(dir)` rebuilds the model in one call and
`evaluate` knows how to sample it. Weights never go through pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import create_model

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def pretrained_files(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, bytes]:
    """The two files of an exported model as bytes: `{WEIGHTS_NAME: safetensors, CONFIG_NAME: JSON}`.

    `save_pretrained` writes them; a caller with its own storage layer (the pipeline's atomic writer, an object
    store) writes these bytes itself.
    """
    from safetensors.torch import save

    if not hasattr(model, "model_config"):
        raise ValueError("model has no `model_config`: build it with diffit.models.create_model")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = {"model": model.model_config, **(extra or {})}
    return {WEIGHTS_NAME: save(state), CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write `model`'s weights and its configuration (plus `extra`) into `out_dir`, each file atomically
    (a temporary file beside it, fsynced, renamed; removed if anything fails)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in pretrained_files(model, extra).items():
        temp = out / f".{name}.tmp-{os.getpid()}"
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, out / name)
        finally:
            temp.unlink(missing_ok=True)
    return out


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` of an exported model, with a clear error when it is missing or malformed."""
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; an exported model directory holds {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} (write one with `diffit-pipe export`)"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(config.get("model"), dict) or "name" not in config["model"]:
        raise ValueError(f"{path}: missing the 'model': {{'name', 'kwargs'}} entry")
    return config


def load_pretrained(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild an exported model: `(model in eval mode, config dict)`. Loading is strict. The same as
    `Model.from_pretrained(model_dir)` (`diffit.hub`), which also accepts hub ids."""
    from safetensors.torch import load_file

    config = read_config(model_dir)
    weights = Path(model_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such file (the model directory has a config but no weights)")
    model = create_model(config["model"]["name"], **config["model"].get("kwargs", {}))
    model.load_state_dict(load_file(str(weights), device="cpu"), strict=True)
    model.pretrained_extra = {key: value for key, value in config.items() if key != "model"}
    return model.to(device).eval(), config
