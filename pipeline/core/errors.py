"""One error contract for every stage.

A `PipelineError` is a problem the user can act on: bad input or settings, a damaged file, a job whose result
is not acceptable. Its message is one line that names the file (or flag) and the problem; its `exit_code` is
what the command exits with. `cli.main` turns any of them into `error: MESSAGE` on stderr and that code, the
same for every command; anything else is a bug and keeps its traceback.

Exit codes: 2 bad input, settings or data (fix them and re-run); 1 the job ran but its result is not
acceptable (too many failed items, a non-finite loss, a failed verification).
"""

from __future__ import annotations

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
