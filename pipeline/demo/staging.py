"""Output directories that appear whole or not at all (a fitted VAE, a trained classifier).

A model directory holds several files that only make sense together (weights, config, report). They are written
into a fresh temporary directory beside the final one, which `pipeline.core.atomic.replace_directory` then puts
in place: a reader sees the old directory or the complete new one, and a failed or killed save leaves the old
one as it was.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.atomic import replace_directory, temp_path_for


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A new temporary directory beside `out` to write into; it replaces `out` when the block ends without an
    error and is removed otherwise."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(out)
    temp.mkdir()
    try:
        yield temp
        replace_directory(temp, out)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # nothing left after a successful replace
