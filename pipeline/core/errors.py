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


class PipelineError(Exception):
    """Base of every error the pipeline reports to the user as one line and an exit code."""

    exit_code: int = EXIT_BAD_INPUT


class InputError(PipelineError, ValueError):
    """Bad input: a flag, a configuration value, a dataset, a model or reference file (exit 2)."""


class JobFailedError(PipelineError, RuntimeError):
    """The job ran but its result is not acceptable (exit 1)."""

    exit_code = EXIT_JOB_FAILED


# Out of space: errno ENOSPC (device full) or EDQUOT (quota); libraries that wrap the OSError keep its text.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """True for an out-of-space failure, raised by the OS or wrapped by a library (safetensors, zarr)."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    return any(text in str(error) for text in ("No space left on device", "Disk quota exceeded"))


def disk_full_error(where: str | os.PathLike, error: BaseException, resume: str) -> JobFailedError:
    """The one-line error of a job that ran out of space while writing under `where`: the file, what is free
    on that file system, and what a rerun does (`resume`)."""
    target = Path(getattr(error, "filename", None) or where)
    existing = next((p for p in (target, *target.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    return JobFailedError(
        f"{target}: no space left on the device ({free / 2**20:.1f} MiB free on the file system of {existing}); "
        f"free space there and run the same command again: {resume}"
    )


@contextlib.contextmanager
def reporting_disk_full(where: str | os.PathLike, resume: str):
    """Turn an out-of-space failure inside the block into `disk_full_error` (any other error passes)."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise disk_full_error(where, error, resume) from error
