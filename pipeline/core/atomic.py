"""Atomic writes: a reader sees either the old file (or directory) or the complete new one, never half of it.

Every writer in the pipeline goes through this module. The one recipe: write under a temporary name in the
same directory (unique per host, process and attempt, so concurrent attempts never share one), flush and
fsync, `os.replace` onto the final name, fsync the directory; on any failure (an exception, including
KeyboardInterrupt) the temporary file is removed and the old file is left as it was.

    with atomic_open(path) as handle:        # a file object: write into it
        handle.write(data)
    with atomic_path(path) as temp:          # a path: for libraries that write by name (PIL, torch.save, ...)
        image.save(temp, format="PNG")
    writer = AtomicFile(path); ...; writer.commit()   # long-lived writers (shard tars): commit / abort by hand
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TEMP_MARK = ".tmp-"


def temp_suffix() -> str:
    """A suffix unique to this attempt (host, process, random), for temporary files and directories."""
    return f"{TEMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def temp_path_for(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside `path` (same directory, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(path.name + temp_suffix())


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable (no-op where directories cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Files get the mode a plain open() gives (0666 minus the umask), also when a library wrote the temporary file
# through its own private temp + rename (safetensors' save_file leaves 0600).
FILE_MODE = 0o666 & ~_umask()


def _publish(temp: Path, path: Path) -> None:
    """fsync the finished temporary file, give it the usual file mode and rename it onto `path`."""
    os.chmod(temp, FILE_MODE)
    with open(temp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temp, path)
    _fsync_directory(path.parent)


def _discard(temp: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()


class CommitOnSuccess(abc.ABC):
    """A writer used as a context manager: a block that ends normally commits (unless `commit()` was called
    already), one that raises aborts and re-raises."""

    done: bool  # committed or aborted: nothing more to do

    @abc.abstractmethod
    def commit(self):
        """Publish what was written."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop what was written."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.done:
            self.commit()
        else:
            self.abort()


class AtomicFile(CommitOnSuccess):
    """An open file written under a temporary name beside `path`; `commit()` publishes it, `abort()` drops it.

    As a context manager: a block that ends normally commits (unless `commit()` was called already), one that
    raises aborts and re-raises.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "wb"):
        if "w" not in mode:
            raise ValueError(f"AtomicFile writes new files: mode must contain 'w', got {mode!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.temp_path = temp_path_for(self.path)
        self.handle: IO = open(self.temp_path, mode)
        self.done = False

    def commit(self) -> Path:
        """Flush, fsync and rename onto the final path; returns it."""
        try:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
            os.replace(self.temp_path, self.path)
            _fsync_directory(self.path.parent)
        except BaseException:
            self.abort()
            raise
        self.done = True
        return self.path

    def abort(self) -> None:
        """Close and remove the temporary file (the final path keeps whatever it held)."""
        if self.done:
            return
        self.done = True
        with contextlib.suppress(OSError, ValueError):
            self.handle.close()
        _discard(self.temp_path)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file object for `path` that appears under that name only when the block ends without an error."""
    with AtomicFile(path, mode) as atomic:
        yield atomic.handle


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a library to write to by name; published when the block ends
    without an error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path_for(path)
    try:
        yield temp
        if not temp.is_file():
            raise FileNotFoundError(f"{temp}: nothing was written to the temporary file for {path}")
        _publish(temp, path)
    finally:
        _discard(temp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """`data` into `path`, atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text, atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def json_text(obj: Any, indent: int | None = 2) -> str:
    """Indented JSON with sorted keys (ASCII, so the same object always gives the same bytes), newline-ended."""
    return json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=True) + "\n"


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """`json_text(obj)`, atomically."""
    return write_text_atomic(path, json_text(obj, indent))


def replace_directory(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the finished directory `new` in place of `target` (which may exist): the old one is renamed aside,
    the new one renamed in, then the old one removed. When the second rename fails, the old directory is renamed
    back before the error propagates, so `target` is the old or the new complete directory; only a process killed
    between the two renames leaves the old one under `.NAME.old-*` (complete, beside the target)."""
    new, target = Path(new), Path(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
    _fsync_directory(target.parent)
    return target


def remove_temporary_files(directory: str | os.PathLike) -> list[str]:
    """Delete the leftovers of killed attempts (`*.tmp-*` files) in `directory`; returns their names."""
    removed = []
    for path in Path(directory).glob(f"*{TEMP_MARK}*"):
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    return sorted(removed)
