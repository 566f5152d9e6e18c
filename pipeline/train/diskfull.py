"""A full disk (or quota) while training: one line naming the file, what to free, and that a rerun resumes.

The libraries a trainer writes through report a full disk each in their own way: Python's `OSError` (errno 28,
ENOSPC, or 122, EDQUOT), safetensors' `SafetensorError("... No space left on device (os error 28)")`, and
`torch.save`'s `RuntimeError("[enforce fail at inline_container.cc] ... unexpected pos ...")`, which does not say
why at all -- for that one the free space of the file system decides (`pipeline.core.errors.is_disk_full`).
`disk_full_as_error` turns any of them into `DiskFullError` (exit 1). The checkpoint writer removes its temporary
directory before the error goes up (`pipeline.train.checkpoint.save_checkpoint`), so a full disk leaves nothing
behind but the last complete checkpoint, and `--resume auto` continues from it once space is freed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import DiskFullError, free_bytes, is_disk_full

__all__ = ["DiskFullError", "disk_full_as_error", "disk_full_message", "is_disk_full"]


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
