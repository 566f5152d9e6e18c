"""One logging set-up for every command and every process of a multi-process launch.

`setup_logging()` sends log lines to stderr with the time and, under a multi-process launch (`RANK` set by
accelerate / torchrun), the rank. Rank 0 logs at INFO (DEBUG with `verbose`); other ranks only warnings and
errors, so eight GPUs do not print eight copies of every line. Libraries that log every file they touch
(accelerate's checkpoint saving) are kept at WARNING.
"""

from __future__ import annotations

import logging
import os

QUIET_LIBRARIES = ("accelerate", "distributed", "fsspec", "s3fs", "botocore", "aiobotocore", "urllib3", "PIL")


def process_rank() -> int:
    """The rank of this process in a launch (0 when not launched as one of several)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once per command (again in the same process binds to the current stderr)."""
    rank = process_rank()
    level = (logging.DEBUG if verbose else logging.INFO) if rank == 0 else logging.WARNING
    where = f" [rank {rank}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    logging.basicConfig(
        level=level, force=True, format=f"%(asctime)s{where} %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
