"""The exported-model format, read and written: a directory with `model.safetensors` + `config.json`.

`config.json` holds `{"model": {"name", "kwargs"}, ...extra}`; `extra` is what the exporter adds (diffusion
type and settings, VAE, dataset identity). Both files are checked before anything is allocated
(`diffit.config_check`, `diffit.safetensors_check`); a damaged or hostile file raises `InvalidModelFileError` (a
ValueError) whose message is `<file>: <problem>`. Weights never go through pickle. This module builds no model
(`diffit.io.load_pretrained` does), so the model classes' Hub mixin (`diffit.hub`) can use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config_check import InvalidModelFileError, check_model_config, parse_config_file
from .safetensors_check import check_safetensors_header

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


def read_config(model_dir: str | os.PathLike, max_parameters: int | None = None) -> dict[str, Any]:
    """The `config.json` of an exported model, checked before anything is built (`check_model_config`: schema,
    ranges, the parameter bound); `InvalidModelFileError` naming the file otherwise."""
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; an exported model directory holds {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} (write one with `diffit-pipe export`)"
        )
    config = parse_config_file(path)
    check_model_config(config, path, max_parameters)
    return config


def load_weights(path: str | os.PathLike, expected_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, after its header was checked against `expected_shapes` (names,
    shapes, floating dtypes, offsets; see `check_safetensors_header`); any damage is an `InvalidModelFileError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors_header(path, expected_shapes)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as error:  # changed or unreadable after the header was checked
        raise InvalidModelFileError(path, f"cannot read the weights ({error})") from None


def meta_state_shapes(build: Callable[[], nn.Module], path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of the model `build()` makes, built on the meta device (no memory); call after
    `check_model_config`. A constructor's own refusal becomes `InvalidModelFileError(path, ...)`."""
    try:
        with torch.device("meta"):
            model = build()
    except (ValueError, TypeError, KeyError) as error:
        raise InvalidModelFileError(path, f"model.kwargs: {error}") from None
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}
