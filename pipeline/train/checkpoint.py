"""Training checkpoints: save, rotate, find the newest, resume.

Layout of a run directory::

    RUN/checkpoints/step-0001000/     accelerator.save_state (model.safetensors, optimizer.bin, scaler.pt,
                                      random_states_<rank>.pkl) + ema.safetensors + train_state.json + config.yaml
                                      + files.json (size and sha256 of every other file; written last)
                                      REPA runs: + model_1.safetensors (the projector, Accelerate's second model)
                                      + ema_repa_projector.safetensors (its EMA; never exported)
    RUN/checkpoints/latest            one line: the name of the newest complete checkpoint

A checkpoint is written into `.tmp-step-XXXXXXX` and published with `pipeline.core.atomic.replace_directory`
when every file is in place, so a directory named `step-*` is always complete (a kill mid-save leaves only a
`.tmp-*` directory, removed by the next save); the `latest` pointer is replaced atomically afterwards, and older
checkpoints beyond `keep` are deleted last -- except milestones (`keep_every`: a step that is a multiple of it),
which rotation never deletes (FID-against-step curves need them). The temporary directory has a fixed name,
not a per-process one, because every rank writes its RNG state into the same directory.
Loading never unpickles arbitrary objects: the EMA is safetensors, accelerate's files are read with
`weights_only=True`. All ranks must call `save_checkpoint` (accelerate writes each rank's RNG state); the run
directory must be on a filesystem every node sees.

Integrity: `files.json` records every file's size and sha256. A checkpoint is used only when its files match
(`checkpoint_problem`): `--resume auto` (or a run directory) falls back to the newest earlier checkpoint that
verifies, with a warning naming the damaged file, and fails when none does; an explicitly named checkpoint that
does not verify is an error. Loading then checks that accelerate really restored this rank's RNG state (it only
logs a failure at INFO and carries on, which would make the resumed run silently non-deterministic).
Checkpoints written before `files.json` existed are used unverified, with a warning.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.atomic import atomic_path, replace_directory, write_json_atomic, write_text_atomic
from pipeline.core.errors import InputError, JobFailedError, weights_only_load_problem
from pipeline.core.shards import sha256_file
from pipeline.train.diskfull import DiskFullError, disk_full_message, is_disk_full
from pipeline.train.preemption import pause_point

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_POINTER = "latest"
EMA_WEIGHTS = "ema.safetensors"
PROJECTOR_EMA_WEIGHTS = "ema_repa_projector.safetensors"  # REPA's projector's EMA (`pipeline.train.repa`)
TRAIN_STATE = "train_state.json"
CONFIG_COPY = "config.yaml"
FILE_HASHES = "files.json"
RNG_STATE = "random_states_{}.pkl"  # accelerate's per-rank RNG file
_NAME_RE = re.compile(r"^step-(\d{7,})$")
_TRAIN_STATE_KEYS = ("step", "images_seen", "dataset", "model", "diffusion")


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
    candidates = _candidates(run_dir)
    return candidates[0] if candidates else None


def _candidates(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints to resume from, best first: the one `latest` names, then the older ones newest
    first (or, with no usable pointer, all of them newest first). Checkpoints newer than the pointer belong
    to a branch abandoned by resuming from an older one."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    checkpoints = [path for _, path in reversed(list_checkpoints(run_dir))]
    pointer = root / LATEST_POINTER
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate in checkpoints:
            return checkpoints[checkpoints.index(candidate) :]
        logger.warning(
            "%s names %s, which is not a complete checkpoint; using the newest complete one", pointer, candidate.name
        )
    return checkpoints


def verified_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run whose files match their recorded hashes (None: no checkpoint).

    A damaged one is skipped with a warning naming the file, in favour of the previous one; CheckpointError
    when there are checkpoints but none verifies."""
    damaged = []
    for candidate in _candidates(run_dir):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        logger.warning("checkpoint %s is damaged (%s); falling back to the previous checkpoint", candidate, problem)
        damaged.append(problem)
    if damaged:
        raise CheckpointError(
            f"{Path(run_dir) / CHECKPOINTS_DIR}: no checkpoint verifies ({len(damaged)} damaged; the newest: "
            f"{damaged[0]}); start a new run dir, or restore a checkpoint from a backup"
        )
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A verified checkpoint directory from either a checkpoint directory (used as is: an error when it is
    incomplete or damaged) or a run directory (its newest checkpoint that verifies)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    if _NAME_RE.match(path.name):
        if not is_complete(path):
            raise CheckpointError(
                f"{path}: incomplete checkpoint (missing {TRAIN_STATE}, {EMA_WEIGHTS} or the model weights)"
            )
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"damaged checkpoint: {problem}; use an earlier checkpoint (or the run directory)")
        return path
    found = verified_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"{path}: no complete checkpoint under {path / CHECKPOINTS_DIR} (expected "
            "step-XXXXXXX directories written by `diffit-pipe train`)"
        )
    return found


# ---------------------------------------------------------------------------------------------------------------
# File hashes
# ---------------------------------------------------------------------------------------------------------------


def _checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    """Every file of a checkpoint directory except `files.json`, sorted (sub-directories included)."""
    return sorted(p for p in checkpoint_dir.rglob("*") if p.is_file() and p.name != FILE_HASHES)


def write_file_hashes(checkpoint_dir: Path) -> None:
    """Record the size and sha256 of every file of a finished checkpoint directory in `files.json` (last)."""
    files = {
        path.relative_to(checkpoint_dir).as_posix(): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        for path in _checkpoint_files(checkpoint_dir)
    }
    write_json_atomic(checkpoint_dir / FILE_HASHES, {"files": files})


def checkpoint_problem(checkpoint_dir: Path) -> str | None:
    """What is wrong with a checkpoint's files against `files.json` (the first problem, naming the file), or None
    when every recorded file is present with its size and sha256. A checkpoint without `files.json` (written by
    an older diffit-pipe) cannot be verified: None, with a warning."""
    checkpoint_dir = Path(checkpoint_dir)
    record = checkpoint_dir / FILE_HASHES
    if not record.is_file():
        logger.warning("%s records no file hashes (an older checkpoint): its files are not verified", checkpoint_dir)
        return None
    try:
        files = json.loads(record.read_text())["files"]
        entries = [(name, int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"{record}: unreadable ({type(error).__name__}: {error})"
    for name, size, digest in entries:
        path = checkpoint_dir / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size} bytes, {FILE_HASHES} records {size} (truncated or overwritten)"
        actual = sha256_file(path)
        if actual != digest:
            return f"{path}: sha256 {actual} does not match the {digest} recorded in {FILE_HASHES}"
    return None


def read_train_state(checkpoint_dir: Path) -> dict[str, Any]:
    """The JSON train state (step, images seen, dataset hash, resolved model) of a checkpoint."""
    path = Path(checkpoint_dir) / TRAIN_STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read the train state ({error})") from None
    if not _is_train_state(state):
        raise CheckpointError(f"{path}: not a train state written by `diffit-pipe train` (keys missing or wrong)")
    return state


def _is_train_state(state: Any) -> bool:
    """The keys resuming and exporting read, with the right types."""
    return (
        isinstance(state, dict)
        and all(key in state for key in _TRAIN_STATE_KEYS)
        and isinstance(state["step"], int)
        and isinstance(state["images_seen"], int)
        and isinstance(state["dataset"], dict)
        and {"path", "manifest_hash"} <= set(state["dataset"])
        and isinstance(state["model"], dict)
        and {"name", "kwargs"} <= set(state["model"])
    )


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
    try:
        state = load_file(str(path), device="cpu")
    except Exception as error:  # safetensors' own error type for a damaged file
        raise CheckpointError(f"{path}: cannot read the EMA weights ({error})") from None
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
    keep_every: int = 0,
    projector_ema: nn.Module | None = None,
) -> Path:
    """Write checkpoint `step` (all ranks call this), point `latest` at it, delete the ones beyond `keep` that are
    not milestones (multiples of `keep_every`). `projector_ema`: REPA's projector's EMA, saved beside the model's."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    main = accelerator.is_main_process

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def publish() -> None:
        save_ema(ema_model, tmp / EMA_WEIGHTS)
        if projector_ema is not None:
            save_ema(projector_ema, tmp / PROJECTOR_EMA_WEIGHTS)
        write_text_atomic(tmp / CONFIG_COPY, config_text)
        write_json_atomic(tmp / TRAIN_STATE, train_state)
        write_file_hashes(tmp)  # last: it covers every other file, every rank's RNG state included
        pause_point("checkpoint")
        # `final` exists only after resuming from an older checkpoint: the new one replaces the abandoned branch.
        replace_directory(tmp, final)
        write_text_atomic(root / LATEST_POINTER, final.name + "\n")
        rotate_checkpoints(run_dir, keep, step, keep_every)
        logger.info("saved checkpoint %s", final)

    # Each phase ends with every rank learning whether any rank failed in it (instead of a plain barrier), so a
    # write that fails on one rank -- a full disk on rank 0's model file -- stops all of them with the same error.
    failure = _attempt(prepare) if main else None
    _agree_on_failure(accelerator, failure, run_dir, tmp, step)
    failure = _attempt(lambda: accelerator.save_state(str(tmp), safe_serialization=True))
    _agree_on_failure(accelerator, failure, run_dir, tmp, step)
    failure = _attempt(publish) if main else None
    _agree_on_failure(accelerator, failure, run_dir, tmp, step)
    return final


def _attempt(action) -> Exception | None:
    """Run `action`; the exception it raised, or None."""
    try:
        action()
    except Exception as error:  # noqa: BLE001 -- handed to _agree_on_failure, which raises it (or a clearer one)
        return error
    return None


def _agree_on_failure(accelerator, failure: Exception | None, run_dir: Path, tmp: Path, step: int) -> None:
    """After one phase of a checkpoint write: when any rank failed, remove the temporary directory at once (main
    process) and raise on every rank -- DiskFullError for a full disk, otherwise the error itself (on the rank
    that had it) or a CheckpointWriteError naming it (on the others)."""
    disk_full = failure is not None and is_disk_full(failure, tmp)  # before the removal frees the space
    failed = failure is not None
    if accelerator.num_processes > 1:
        flags = torch.tensor([float(failed), float(disk_full)], device=accelerator.device)
        flags = accelerator.reduce(flags, reduction="sum")
        failed, disk_full = bool(flags[0].item() > 0), bool(flags[1].item() > 0)
    if not failed:
        return
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    if disk_full:
        raise DiskFullError(disk_full_message(tmp, run_dir, f"the checkpoint of step {step}")) from None
    if failure is not None:
        raise failure
    raise CheckpointWriteError(f"{tmp}: the checkpoint of step {step} failed on another rank (see its error)")


class CheckpointWriteError(JobFailedError):
    """Writing a checkpoint failed on another rank (exit 1)."""


def is_milestone(step: int, keep_every: int) -> bool:
    """A checkpoint rotation keeps for good: its step is a multiple of `keep_every` (0: no milestones)."""
    return keep_every > 0 and step % keep_every == 0


def rotate_checkpoints(run_dir: Path, keep: int, step: int | None = None, keep_every: int = 0) -> list[Path]:
    """Delete all but the `keep` newest complete checkpoints and milestones (steps that are multiples of
    `keep_every`), and any leftover temporary directories.

    With `step` (the checkpoint just written) only checkpoints up to it count: newer ones are an abandoned
    branch (the run resumed from an older, e.g. because the newest was damaged), left alone until this run
    replaces them, so that rotation never deletes the checkpoints this run continues from."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    removed = []
    # Leftovers of killed saves: unfinished checkpoints, and replaced ones `replace_directory` had not removed yet.
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".step-*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    checkpoints = [(s, path) for s, path in list_checkpoints(run_dir) if step is None or s <= step]
    for old_step, path in checkpoints[:-keep] if keep > 0 else []:
        if is_milestone(old_step, keep_every):
            continue
        shutil.rmtree(path)
        removed.append(path)
    return removed


def load_checkpoint(
    accelerator, checkpoint_dir: Path, ema_model: nn.Module, projector_ema: nn.Module | None = None
) -> dict[str, Any]:
    """Restore model (and REPA's projector), optimizer, scaler and per-rank RNG (accelerate, weights_only) and the
    EMA (and the projector's, `projector_ema`); return the train state. The checkpoint's files were verified when it
    was chosen (`resolve_checkpoint`); a file that still cannot be loaded, or an RNG state accelerate did not
    restore, is a CheckpointError naming it."""
    checkpoint_dir = Path(checkpoint_dir)
    if not is_complete(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir}: not a complete checkpoint")
    train_state = read_train_state(checkpoint_dir)
    rng_file = checkpoint_dir / RNG_STATE.format(accelerator.process_index)
    if not rng_file.is_file():
        raise CheckpointError(
            f"{checkpoint_dir}: no RNG state for process {accelerator.process_index} (was it "
            f"written by {train_state.get('world_size', '?')} processes?)"
        )
    rng_state = read_rng_state(rng_file)
    try:
        accelerator.load_state(str(checkpoint_dir), load_kwargs={"weights_only": True})
    except Exception as error:  # safetensors / torch.load errors of a damaged file: one line naming the checkpoint
        raise CheckpointError(f"{checkpoint_dir}: cannot be loaded: {weights_only_load_problem(error)}") from None
    check_rng_restored(rng_state, rng_file)
    load_ema(ema_model, checkpoint_dir / EMA_WEIGHTS)
    if projector_ema is not None:
        load_ema(projector_ema, checkpoint_dir / PROJECTOR_EMA_WEIGHTS)
    return train_state


def read_rng_state(path: Path) -> dict[str, Any]:
    """A rank's RNG state as accelerate wrote it (read with weights_only, as accelerate reads it)."""
    from accelerate.utils import load

    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it then refuses
            warnings.simplefilter("ignore")
            state = load(path, weights_only=True)
        state["torch_manual_seed"]
    except Exception as error:
        raise CheckpointError(f"{path}: cannot read the RNG state: {weights_only_load_problem(error)}") from None
    return state


def check_rng_restored(state: dict[str, Any], path: Path) -> None:
    """The process's RNG state is the one `state` holds: accelerate logs a failed RNG load at INFO and goes on,
    which would make the resumed run silently differ from an uninterrupted one."""
    import random

    import numpy as np

    restored = torch.equal(torch.get_rng_state(), state["torch_manual_seed"])
    if "numpy_random_seed" in state:
        ours, theirs = np.random.get_state(), state["numpy_random_seed"]
        restored = restored and ours[0] == theirs[0] and np.array_equal(ours[1], theirs[1]) and ours[2:] == theirs[2:]
    if "random_state" in state:
        restored = restored and random.getstate() == state["random_state"]
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in state:
        restored = restored and all(
            torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), state["torch_cuda_manual_seed"])
        )
    if not restored:
        raise CheckpointError(f"{path}: the RNG state was not restored; the resumed run would not be reproducible")
