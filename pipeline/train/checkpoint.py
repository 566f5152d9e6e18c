"""Training checkpoints: save, rotate, find the newest, resume.

Layout of a run directory::

    RUN/checkpoints/step-0001000/     accelerator.save_state (model.safetensors, optimizer.bin, scaler.pt,
                                      random_states_<rank>.pkl) + ema.safetensors + train_state.json + config.yaml
    RUN/checkpoints/latest            one line: the name of the newest complete checkpoint

A checkpoint is written into `.tmp-step-XXXXXXX` and published with `pipeline.core.atomic.replace_directory`
when every file is in place, so a directory named `step-*` is always complete (a kill mid-save leaves only a
`.tmp-*` directory, removed by the next save); the `latest` pointer is replaced atomically afterwards, and older
checkpoints beyond `keep` are deleted last. The temporary directory has a fixed name, not a per-process one,
because every rank writes its RNG state into the same directory.
Loading never unpickles arbitrary objects: the EMA is safetensors, accelerate's files are read with
`weights_only=True`. All ranks must call `save_checkpoint` (accelerate writes each rank's RNG state); the run
directory must be on a filesystem every node sees.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.atomic import atomic_path, replace_directory, write_json_atomic, write_text_atomic
from pipeline.core.errors import InputError

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_POINTER = "latest"
EMA_WEIGHTS = "ema.safetensors"
TRAIN_STATE = "train_state.json"
CONFIG_COPY = "config.yaml"
_NAME_RE = re.compile(r"^step-(\d{7,})$")


class CheckpointError(InputError):
    """A checkpoint that is missing, incomplete or does not fit the run."""


def checkpoint_name(step: int) -> str:
    """Directory name of the checkpoint taken after `step` optimizer steps."""
    return f"step-{step:07d}"


def is_complete(path: Path) -> bool:
    """A finished checkpoint: named `step-*`, with its train state, EMA and model weights."""
    return (
        _NAME_RE.match(path.name) is not None
        and (path / TRAIN_STATE).is_file()
        and (path / EMA_WEIGHTS).is_file()
        and any(path.glob("model*.safetensors"))
    )


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first, as (step, path)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME_RE.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint the `latest` pointer names, or (pointer missing or stale) the newest complete one."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_POINTER
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir() and is_complete(candidate):
            return candidate
        logger.warning(
            "%s names %s, which is not a complete checkpoint; using the newest complete one", pointer, candidate.name
        )
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from either a checkpoint directory or a run directory (its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    if _NAME_RE.match(path.name):
        if not is_complete(path):
            raise CheckpointError(
                f"{path}: incomplete checkpoint (missing {TRAIN_STATE}, {EMA_WEIGHTS} or the model weights)"
            )
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"{path}: no complete checkpoint under {path / CHECKPOINTS_DIR} (expected "
            "step-XXXXXXX directories written by `diffit-pipe train`)"
        )
    return found


def read_train_state(checkpoint_dir: Path) -> dict[str, Any]:
    """The JSON train state (step, images seen, dataset hash, resolved model) of a checkpoint."""
    path = Path(checkpoint_dir) / TRAIN_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read the train state ({error})") from None


def save_ema(ema_model: nn.Module, path: Path) -> None:
    """EMA weights as safetensors (fp32, CPU, contiguous), written atomically."""
    from safetensors.torch import save_file

    state = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in ema_model.state_dict().items()
    }
    with atomic_path(path) as temp:
        save_file(state, str(temp))


def load_ema(ema_model: nn.Module, path: Path) -> None:
    """Load EMA weights saved by `save_ema` (strict: every key must match)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing EMA weights")
    state = load_file(str(path), device="cpu")
    try:
        ema_model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: EMA weights do not fit the model ({error})") from None


def save_checkpoint(
    accelerator,
    run_dir: Path,
    step: int,
    ema_model: nn.Module,
    train_state: dict[str, Any],
    config_text: str,
    keep: int,
) -> Path:
    """Write checkpoint `step` (all ranks call this), point `latest` at it, delete the ones beyond `keep`."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_ema(ema_model, tmp / EMA_WEIGHTS)
        write_text_atomic(tmp / CONFIG_COPY, config_text)
        write_json_atomic(tmp / TRAIN_STATE, train_state)
        # `final` exists only after resuming from an older checkpoint: the new one replaces the abandoned branch.
        replace_directory(tmp, final)
        write_text_atomic(root / LATEST_POINTER, final.name + "\n")
        rotate_checkpoints(run_dir, keep)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the `keep` newest complete checkpoints and any leftover temporary directories."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    removed = []
    # Leftovers of killed saves: unfinished checkpoints, and replaced ones `replace_directory` had not removed yet.
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".step-*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    checkpoints = list_checkpoints(run_dir)
    for _, path in checkpoints[:-keep] if keep > 0 else []:
        shutil.rmtree(path)
        removed.append(path)
    return removed


def load_checkpoint(accelerator, checkpoint_dir: Path, ema_model: nn.Module) -> dict[str, Any]:
    """Restore model, optimizer, scaler and per-rank RNG (accelerate, weights_only) and the EMA; return the
    train state."""
    checkpoint_dir = Path(checkpoint_dir)
    if not is_complete(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir}: not a complete checkpoint")
    train_state = read_train_state(checkpoint_dir)
    rng_file = checkpoint_dir / f"random_states_{accelerator.process_index}.pkl"
    if not rng_file.is_file():
        raise CheckpointError(
            f"{checkpoint_dir}: no RNG state for process {accelerator.process_index} (was it "
            f"written by {train_state.get('world_size', '?')} processes?)"
        )
    accelerator.load_state(str(checkpoint_dir), load_kwargs={"weights_only": True})
    load_ema(ema_model, checkpoint_dir / EMA_WEIGHTS)
    return train_state
