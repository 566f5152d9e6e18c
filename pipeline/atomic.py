"""Atomic writes: readers see either the old file (or directory) or the complete new one, never half of it.

Every stage writes through these: a temporary name in the same directory (unique per host, process and
attempt, so concurrent attempts never share one), flushed and fsynced, then `os.replace`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any


def temp_suffix() -> str:
    """A suffix unique to this attempt (host, process, random), for temporary files and directories."""
    return f".tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file beside it, fsync, `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + temp_suffix())
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text, atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Indented JSON with sorted keys (ASCII, so the same object always gives the same bytes), atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=True) + "\n")


def replace_directory(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the finished directory `new` in place of `target` (which may exist): two renames, then the old
    directory is removed, so `target` is always either the old or the new complete directory."""
    new, target = Path(new), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
    return target
