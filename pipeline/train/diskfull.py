"""A full disk (or quota) while training: one line naming the file, what to free, and that a rerun resumes.

The libraries a trainer writes through report a full disk each in their own way: Python's `OSError` (errno 28,
ENOSPC, or 122, EDQUOT), safetensors' `SafetensorError("... No space left on device (os error 28)")`, and
`torch.save`'s `RuntimeError("[enforce fail at inline_container.cc] ... unexpected pos ...")`, which does not say
why at all -- for that one the free space of the file system decides. `disk_full_as_error` turns any of them into
`DiskFullError` (exit 1). The checkpoint writer removes its temporary directory before the error goes up
(`pipeline.train.checkpoint.save_checkpoint`), so a full disk leaves nothing behind but the last complete
checkpoint, and `--resume auto` continues from it once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import JobFailedError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
# Below this many free bytes a write error without a reason (torch.save's) is taken for a full disk.
NEARLY_FULL_BYTES = 1 << 20


class DiskFullError(JobFailedError):
    """The disk (or quota) of the run directory filled up; nothing half-written was left (exit 1)."""


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes of the file system holding `path` (or its nearest existing parent); None if unknown."""
    path = Path(path)
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return None


def is_disk_full(error: BaseException, path: str | os.PathLike) -> bool:
    """Whether `error`, raised while writing under `path`, means the disk or quota is full."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    text = str(error).lower()
    if any(marker in text for marker in DISK_FULL_TEXTS):
        return True
    if isinstance(error, RuntimeError) and "inline_container" in text:  # torch.save: the reason is not given
        free = free_bytes(path)
        return free is not None and free < NEARLY_FULL_BYTES
    return False


def disk_full_message(path: str | os.PathLike, run_dir: str | os.PathLike, what: str) -> str:
    """`PATH: no space left on the device while writing WHAT (N bytes free); free ... and rerun ...`."""
    free = free_bytes(path)
    free_text = f"{free:,} bytes free" if free is not None else "free space unknown"
    return (
        f"{path}: no space left on the device while writing {what} ({free_text}, nothing half-written left); "
        f"free space on the file system of {run_dir} (other runs' files, or older checkpoints in "
        f"{Path(run_dir) / 'checkpoints'} beyond the newest) and rerun with `--resume auto`: it continues from the "
        "newest complete checkpoint"
    )


@contextlib.contextmanager
def disk_full_as_error(run_dir: str | os.PathLike) -> Iterator[None]:
    """Turn a full-disk error raised in the block into one DiskFullError line; any other error goes up as is."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not is_disk_full(error, run_dir):
            raise
        path = getattr(error, "filename", None) or run_dir
        raise DiskFullError(disk_full_message(path, run_dir, "a run file")) from None
