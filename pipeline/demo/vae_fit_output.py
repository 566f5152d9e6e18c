"""The output directory of a VAE fit: its file names, the settings a finished fit is compared on before it is
reused (`fit_settings`, `finished_fit`), the resume checkpoints in `OUT.partial/` (`save_checkpoint`,
`load_checkpoint`), the check that `OUT` may be written, and the atomic publication of the fitted VAE, its
`fit_report.json` and `reconstructions.png`. The fit loop is `pipeline.demo.vae_fit`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.atomic import atomic_path, write_json_atomic, write_text_atomic
from pipeline.core.grids import write_png
from pipeline.demo.staging import staged_directory
from pipeline.demo.vae_fit_config import VAEFitConfig, VAEFitError, validate_config

logger = logging.getLogger(__name__)


REPORT_NAME = "fit_report.json"
GRID_NAME = "reconstructions.png"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PARTIAL_SUFFIX = ".partial"


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as JSON round-trips them (tuples become lists), for comparisons with a stored report."""
    return json.loads(json.dumps(settings))


def finished_fit(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The report of a complete fit in `out` made with exactly `settings`, else None."""
    report_path = out / REPORT_NAME
    if not (report_path.is_file() and (out / "config.json").is_file() and (out / WEIGHTS_NAME).is_file()):
        return None
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if report.get("settings") == _comparable(settings) else None


def save_checkpoint(partial: Path, vae, optimizer, step: int, settings: dict[str, Any], history: list) -> None:
    """Write the resume state into `partial`: weights (safetensors), optimiser state, then `state.json`.

    Each file is replaced atomically and records `step`; `load_checkpoint` uses the state only when all three
    agree, so a kill between the renames cannot pair the weights of one step with the optimiser of another.
    """
    from safetensors.torch import save_file

    weights = {name: tensor.detach().contiguous() for name, tensor in vae.state_dict().items()}
    with atomic_path(partial / "model.safetensors") as temp:
        save_file(weights, str(temp), metadata={"step": str(step)})
    with atomic_path(partial / "optimizer.pt") as temp:
        torch.save({"step": step, "optimizer": optimizer.state_dict()}, temp)
    write_json_atomic(partial / "state.json", {"step": step, "settings": _comparable(settings), "history": history})


def load_checkpoint(partial: Path, vae, optimizer, settings: dict[str, Any]) -> tuple[int, list]:
    """Restore a resume state written by `save_checkpoint` with the same settings: (step, loss history).

    Without a usable state (none, other settings, files of different steps) the fit starts at step 0 and the
    log says why.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    state_path = partial / "state.json"
    if not state_path.is_file():
        return 0, []
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        with safe_open(str(partial / "model.safetensors"), framework="pt") as handle:
            weights_step = int(handle.metadata()["step"])
        optimizer_state = torch.load(partial / "optimizer.pt", weights_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        logger.warning("ignoring the unreadable resume state in %s (%s): starting from step 0", partial, error)
        return 0, []
    if state.get("settings") != _comparable(settings):
        logger.warning("%s was written by a fit with other settings: starting from step 0", partial)
        return 0, []
    if not state["step"] == weights_step == optimizer_state["step"]:
        logger.warning(
            "the resume files in %s are from different steps (killed while saving): starting from step 0", partial
        )
        return 0, []
    vae.load_state_dict(load_file(str(partial / "model.safetensors")))
    optimizer.load_state_dict(optimizer_state["optimizer"])
    logger.info("resuming the VAE fit from step %d (%s)", state["step"], partial)
    return int(state["step"]), list(state.get("history", []))


def check_output_dir(out: Path, overwrite: bool) -> None:
    """`out` may be absent, empty, a previous fit (replaced only with `overwrite`), never something else."""
    if not out.exists():
        return
    if not out.is_dir():
        raise VAEFitError(f"{out} exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise VAEFitError(
            f"{out} already holds a VAE fitted with other settings (or other files); pass overwrite=True "
            "(--overwrite) to replace it, or choose another output directory"
        )
    if not (out / REPORT_NAME).is_file():
        raise VAEFitError(
            f"{out} is not empty and holds no {REPORT_NAME}: refusing to replace a directory this command did not write"
        )


def fit_settings(
    config: VAEFitConfig, data: str | os.PathLike, holdout: str | os.PathLike | None, time_budget: float | None
) -> dict[str, Any]:
    """Everything a finished fit is compared on before it is reused (and stored as its report's "settings"):
    the config, the resolved data and holdout paths, and the time budget (which can end a fit early)."""
    data_path = Path(data).expanduser()
    if not data_path.exists():
        raise VAEFitError(f"data {data} does not exist")
    validate_config(config)
    return _comparable(
        {
            **asdict(config),
            "time_budget_s": time_budget,
            "data": str(data_path.resolve()),
            "holdout": str(Path(holdout).expanduser().resolve()) if holdout else None,
        }
    )


def publish(vae, out: Path, report: dict[str, Any], grid: np.ndarray) -> None:
    """Write the VAE, its report and the reconstruction grid into `out`, which appears complete or not at all."""
    with staged_directory(out) as temp:
        vae.save_pretrained(str(temp), safe_serialization=True)
        write_png(temp / GRID_NAME, grid)
        write_text_atomic(temp / REPORT_NAME, json.dumps(report, indent=2) + "\n")
