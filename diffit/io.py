"""Explicit save / load helpers: an exported model is a directory with `model.safetensors` + `config.json`
(`diffit.export_format`); `load_pretrained(dir)` rebuilds the model in one call.

Both files are checked before anything is allocated (`diffit.config_check`, `diffit.safetensors_check`); a damaged
or hostile file raises `InvalidModelFileError` (a ValueError) whose message is `<file>: <problem>`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config_check import InvalidModelFileError, check_model_config
from .export_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    load_weights,
    meta_state_shapes,
    pretrained_files,
    read_config,
    save_pretrained,
)
from .models import create_model
from .safetensors_check import check_safetensors_header

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "InvalidModelFileError",
    "check_model_config",
    "check_safetensors_header",
    "expected_state_shapes",
    "load_pretrained",
    "load_weights",
    "pretrained_files",
    "read_config",
    "save_pretrained",
]


def expected_state_shapes(
    name: str, kwargs: dict[str, Any], path: str | os.PathLike = "config.json"
) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of `create_model(name, **kwargs)`, built on the meta device (no memory)."""
    return meta_state_shapes(lambda: create_model(name, **kwargs), path)


def load_pretrained(
    model_dir: str | os.PathLike, device: str | torch.device = "cpu", max_parameters: int | None = None
) -> tuple[nn.Module, dict]:
    """Rebuild an exported model: `(model in eval mode, config dict)`. Loading is strict. The same as
    `Model.from_pretrained(model_dir)` (`diffit.hub`), which also accepts hub ids.

    Nothing is allocated before both files are checked: config.json against the schema and the parameter bound
    (`max_parameters`, default `$DIFFIT_MAX_PARAMETERS` or 4e9), the weights' header against the shapes the
    config implies (computed on the meta device). A bad file raises `InvalidModelFileError` (a ValueError)."""
    config = read_config(model_dir, max_parameters)
    weights = Path(model_dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such file (the model directory has a config but no weights)")
    name, kwargs = config["model"]["name"], config["model"].get("kwargs", {})
    state = load_weights(weights, expected_state_shapes(name, kwargs, Path(model_dir) / CONFIG_NAME))
    model = create_model(name, **kwargs)
    model.load_state_dict(state, strict=True)
    model.pretrained_extra = {key: value for key, value in config.items() if key != "model"}
    return model.to(device).eval(), config
