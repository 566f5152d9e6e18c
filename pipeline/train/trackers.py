"""Experiment trackers: any Accelerate tracker (`train.tracker`), scalars and sample grids in each one's form.

Scalars go through `accelerator.log`, which every tracker takes. Images have no common form: TensorBoard wants
an array and its layout (`dataformats`), W&B and SwanLab a list of images they wrap themselves, Aim an image per
key, MLflow and Comet their own `log_image` on the unwrapped run; `log_grid` holds one small branch per tracker,
and trackers without image support (dvclive, trackio) get the scalars only -- the grids are in RUN/samples
either way. Everything here runs on the main process only (Accelerate creates trackers there).

Where files go: TensorBoard and Aim under RUN/logs; W&B under $WANDB_DIR, or RUN/logs when it is unset (the
run named after the run directory; WANDB_MODE=offline works without a network); MLflow, Comet, ClearML,
SwanLab and Trackio where their usual environment variables say. A tracker whose package is not installed is
an error before training starts (Accelerate would leave it out silently).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from pipeline.train.checks import TrainError

logger = logging.getLogger(__name__)

PROJECT = "train"  # the tracker project (TensorBoard: RUN/logs/train)
# The module each tracker needs, and the pip extra that installs it (where pyproject has one).
PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "aim": "aim",
    "comet_ml": "comet_ml",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


def check_trackers_installed(names: list[str]) -> None:
    """A TrainError naming the tracker and the install command when its package is missing."""
    for name in names:
        module = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            hint = "pip install 'diffit-pipe[wandb]'" if name == "wandb" else f"pip install {module}"
            raise TrainError(f"train.tracker: {name!r} needs the {module} package ({hint}), or set another tracker")


def init_kwargs(names: list[str], run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per-tracker arguments of `accelerator.init_trackers`: W&B's run name and directory, MLflow's run name."""
    kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in names:
        wandb_dir = os.environ.get("WANDB_DIR") or str(run_dir / "logs")
        Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        kwargs["wandb"] = {"name": run_dir.resolve().name, "dir": wandb_dir}
    if "mlflow" in names:
        kwargs["mlflow"] = {"run_name": run_dir.resolve().name}
    return kwargs


class GridLogger:
    """Logs a sample grid (uint8 [H, W, 3]) to every tracker of the run that takes images (main process)."""

    def __init__(self, accelerator, names: list[str]):
        self.accelerator = accelerator
        self.names = [name for name in names if name in IMAGE_LOGGERS]
        without = [name for name in names if name not in IMAGE_LOGGERS]
        if without:
            logger.info("sample grids are not sent to %s (no image logging); see RUN/samples", ", ".join(without))

    def log(self, key: str, grid, step: int) -> None:
        for name in self.names:
            IMAGE_LOGGERS[name](self.accelerator, key, grid, step)


def _tensorboard(accelerator, key: str, grid, step: int) -> None:
    accelerator.get_tracker("tensorboard").log_images({key: grid[None]}, step=step, dataformats="NHWC")


def _listed(name: str):
    """W&B, SwanLab: Accelerate wraps each image of a list in the tracker's own image type."""

    def log(accelerator, key: str, grid, step: int) -> None:
        accelerator.get_tracker(name).log_images({key: [grid]}, step=step)

    return log


def _aim(accelerator, key: str, grid, step: int) -> None:
    accelerator.get_tracker("aim").log_images({key: (grid, f"step {step}")}, step=step)


def _mlflow(accelerator, key: str, grid, step: int) -> None:
    import inspect

    from mlflow import MlflowClient

    # The run Accelerate started, written before returning: MLflow 3's `log_image` uploads from background threads
    # by default (they keep the interpreter alive about a second longer at exit); 2.12's has no `synchronous`
    # argument and always writes at once.
    run_id = accelerator.get_tracker("mlflow", unwrap=True).info.run_id
    now = {"synchronous": True} if "synchronous" in inspect.signature(MlflowClient.log_image).parameters else {}
    MlflowClient().log_image(run_id, grid, key=key, step=step, **now)


def _comet(accelerator, key: str, grid, step: int) -> None:
    from PIL import Image

    # A PIL image: Comet first tries an array as a file path (`os.path.isfile(array)`, a DeprecationWarning).
    accelerator.get_tracker("comet_ml", unwrap=True).log_image(Image.fromarray(grid), name=key, step=step)


def _clearml(accelerator, key: str, grid, step: int) -> None:
    accelerator.get_tracker("clearml").log_images({key: grid}, step=step)  # report_image takes one image


IMAGE_LOGGERS = {
    "tensorboard": _tensorboard,
    "wandb": _listed("wandb"),
    "swanlab": _listed("swanlab"),
    "aim": _aim,
    "mlflow": _mlflow,
    "comet_ml": _comet,
    "clearml": _clearml,
}
