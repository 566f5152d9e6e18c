"""One error contract for every stage.

A `PipelineError` is a problem the user can act on: bad input or settings, a damaged file, a job whose result
is not acceptable. Its message is one line that names the file (or flag) and the problem; its `exit_code` is
what the command exits with. `cli.main` turns any of them into `error: MESSAGE` on stderr and that code, the
same for every command; anything else is a bug and keeps its traceback.

Exit codes: 2 bad input, settings or data (fix them and re-run); 1 the job ran but its result is not
acceptable (too many failed items, a non-finite loss, a failed verification).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_JOB_FAILED = 1


MAX_LOAD_DETAIL_CHARS = 200


def brief(value: object, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters: a message never quotes a whole (hostile) value."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """An error's message on one line (YAML, tarfile and pyarrow messages span several), at most `limit`
    characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def weights_only_load_problem(error: Exception) -> str:
    """What a failed `torch.load(weights_only=True)` says about the file, on one line. torch's own message spans
    several lines and suggests `weights_only=False` (running the file's pickle code, never done here): a file that
    needs pickle (a pickle payload, a state dict holding Python objects) is named as such, with what torch
    refused."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = " ".join(text.split(marker, 1)[1].split())
        detail = detail.split(" Check the documentation", 1)[0].split(" Please use `torch.serialization", 1)[0]
        detail = detail.rstrip(". ")[:MAX_LOAD_DETAIL_CHARS]
        return (
            f"not a plain tensor state dict: a weights-only load refuses it ({detail}); a file that needs pickle "
            "(Python objects, a pickle payload) is never loaded here"
        )
    detail = " ".join(text.split())[:MAX_LOAD_DETAIL_CHARS] or "no detail"
    return f"not a loadable tensor state dict ({type(error).__name__}: {detail})"


class PipelineError(Exception):
    """Base of every error the pipeline reports to the user as one line and an exit code."""

    exit_code: int = EXIT_BAD_INPUT


class InputError(PipelineError, ValueError):
    """Bad input: a flag, a configuration value, a dataset, a model or reference file (exit 2)."""


class JobFailedError(PipelineError, RuntimeError):
    """The job ran but its result is not acceptable (exit 1)."""

    exit_code = EXIT_JOB_FAILED


# Out of space: errno ENOSPC (device full) or EDQUOT (quota). Libraries report it each in their own way: Python's
# OSError, safetensors' `SafetensorError("... No space left on device (os error 28)")`, zarr and numpy re-raising
# the OSError, and `torch.save`'s `RuntimeError("[enforce fail at inline_container.cc] ...")`, which does not say
# why at all: for that one the free space of the file system decides.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
NEARLY_FULL_BYTES = 1 << 20  # below this, a write error without a reason (torch.save's) is taken for a full disk


class DiskFullError(JobFailedError):
    """The disk (or quota) filled up while a job wrote; nothing half-written was left (exit 1)."""


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes of the file system holding `path` (or its nearest existing parent); None if unknown."""
    path = Path(path)
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return None


def is_disk_full(error: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether `error` (raised while writing under `path`) means the disk or quota is full."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    text = str(error).lower()
    if any(marker in text for marker in DISK_FULL_TEXTS):
        return True
    if path is not None and isinstance(error, RuntimeError) and "inline_container" in text:
        free = free_bytes(path)
        return free is not None and free < NEARLY_FULL_BYTES
    return False


def disk_full_error(where: str | os.PathLike, error: BaseException, resume: str) -> DiskFullError:
    """The one-line error of a job that ran out of space while writing under `where`: the file, what is free
    on that file system, and what a rerun does (`resume`)."""
    target = Path(getattr(error, "filename", None) or where)
    free = free_bytes(target)
    free_text = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
    return DiskFullError(
        f"{target}: no space left on the device ({free_text} on its file system); free space there and run the "
        f"same command again: {resume}"
    )


@contextlib.contextmanager
def reporting_disk_full(where: str | os.PathLike, resume: str):
    """Turn an out-of-space failure inside the block into `disk_full_error` (any other error passes)."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as error:
        if not is_disk_full(error, where):
            raise
        raise disk_full_error(where, error, resume) from None
