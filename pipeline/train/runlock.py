"""One trainer per run directory: the exclusive lock `encode` and `pack` take on their output, on RUN.

The lock is `pipeline.core.storage.LocalDirectory.lock` -- an `fcntl.flock` on `RUN/.diffit-pipe.lock`, taken by
the process of global rank 0 before it reads anything of the run (the resume point included), held for the whole
run and released on any exit: the kernel drops a `flock` when the last descriptor of it closes, so a trainer
killed with SIGKILL leaves no lock behind. A second trainer on the same run directory fails at once with one line
naming the holder (exit 2).

While it holds the lock the trainer writes who it is (host, pid, start time) into the lock file, and clears it on
a clean exit. A lock file that still names an owner when the lock is free was left by a trainer that died without
its clean-up (SIGKILL, out of memory, a lost node): the new trainer says so -- on the same host it also checks
that the pid is gone -- and takes the lock over. The lock file is the one file written in place rather than
through `pipeline.core.atomic`: replacing it would give the next trainer a different inode to lock.

DataLoader workers are forked with a copy of the lock's descriptor; `close_inherited_lock` (their
`worker_init_fn`) closes it, so that a worker orphaned by a killed trainer cannot keep the run locked.

`flock` works on local disks and on most shared file systems (NFSv4, Lustre mounted with `flock`, GPFS, CephFS,
BeeGFS); where it is not enforced across nodes (Lustre `localflock` / `noflock`, some NFSv3 set-ups) two trainers
on different nodes are not kept apart: see docs/slurm.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError
from pipeline.core.storage import LOCK_NAME, LocalDirectory
from pipeline.core.storage_io import StorageError

logger = logging.getLogger(__name__)

# The path of the lock file this process holds (None: none); forked DataLoader workers close their copy of it.
_HELD: Path | None = None


class RunLockedError(InputError):
    """Another trainer holds the run directory's lock (exit 2)."""


def lock_path(run_dir: str | os.PathLike) -> Path:
    """The lock file of a run directory."""
    return Path(run_dir) / LOCK_NAME


def is_lock_rank() -> bool:
    """Whether this process takes the lock: the global rank 0 of a launch (RANK, set by accelerate launch /
    torchrun / the srun template), or a single process. The other ranks work under rank 0's lock."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock on `run_dir` (created if missing) for the block; RunLockedError when another
    trainer holds it."""
    global _HELD
    run_dir = Path(run_dir)
    path = lock_path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunLockedError(f"{run_dir}: cannot create the run directory ({error.strerror or error})") from None
    lock = LocalDirectory(run_dir).lock()
    try:
        lock.__enter__()
    except StorageError:
        raise RunLockedError(
            f"{path}: another `diffit-pipe train` is using the run directory {run_dir} ({describe(read_owner(path))}); "
            "wait for it to end, or use another --run-dir"
        ) from None
    try:
        previous = read_owner(path)
        if previous:
            logger.warning("%s: recovered a stale lock: %s", path, stale_reason(previous))
        write_owner(path, {"host": socket.gethostname(), "pid": os.getpid(), "since": _now()})
        _HELD = path
        try:
            yield
        finally:
            _HELD = None
            with contextlib.suppress(OSError):  # a full disk must not hide the run's own error
                write_owner(path, None)
    finally:
        lock.__exit__(None, None, None)


def read_owner(path: Path) -> dict[str, Any] | None:
    """The owner recorded in a lock file (None: none recorded, or unreadable)."""
    try:
        owner = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def write_owner(path: Path, owner: dict[str, Any] | None) -> None:
    """Record (or, with None, clear) the owner in the lock file, in place (see the module docstring)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        os.ftruncate(descriptor, 0)
        if owner is not None:
            os.write(descriptor, (json.dumps(owner) + "\n").encode())
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def describe(owner: dict[str, Any] | None) -> str:
    """'pid 123 on host h since 2026-...' for an error message."""
    if not owner:
        return "its owner is not recorded"
    return f"pid {owner.get('pid')} on host {owner.get('host')} since {owner.get('since')}"


def stale_reason(owner: dict[str, Any]) -> str:
    """Why a recorded owner whose lock was free is stale, for the warning."""
    pid, host = owner.get("pid"), owner.get("host")
    if host == socket.gethostname() and isinstance(pid, int):
        state = "no longer running" if not _alive(pid) else "running, but no longer holding it"
        return f"the trainer {describe(owner)} ended without releasing it ({state}); taking it over"
    return f"the trainer {describe(owner)} ended without releasing it (its lock is free); taking it over"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def close_inherited_lock() -> None:
    """In a forked child (a DataLoader worker): close the descriptors of the lock file this process inherited,
    so that the child never keeps the run locked after its trainer died."""
    if _HELD is None:
        return
    target = os.stat(_HELD)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
            with contextlib.suppress(OSError, ValueError):
                descriptor = int(name)
                info = os.fstat(descriptor)
                if (info.st_dev, info.st_ino) == (target.st_dev, target.st_ino):
                    # /dev/null in its place rather than a close: the inherited file object may still close
                    # this number one day, which must not hit another file opened later under it.
                    os.dup2(null, descriptor)
    finally:
        os.close(null)
