"""Where datasets live: a local directory or an object-store prefix (an fsspec URL), behind one small interface.

    location = Location.of("s3://bucket/imagenet256")  # or gs://..., memory://..., /data/x, file:///data/x
    location.read_bytes("manifest.json")
    location.write_bytes("manifest.json", data)        # atomic
    writer = location.writer("shard-000000.tar"); writer.handle.write(...); writer.commit()   # or abort()

Local directories keep the recipe of `pipeline.core.atomic` (temporary file beside the target, fsync, rename)
and an `fcntl` lock per output directory. Object stores have neither renames nor locks, but an object becomes
visible only when its upload completes (one PUT, or the completion of a multipart upload), so a writer spools
to a local temporary file and uploads it in one call on commit: a killed writer leaves nothing under the final
name (an unfinished multipart upload is invisible; bucket lifecycle rules expire it). What readers see is then
ordered by the writers: a shard's tar, then its sidecar (the shard's commit marker), the manifest last.

URLs, their protocols and the reading of single files and objects are `pipeline.core.storage_io` (which URLs
are accepted and why, credentials and endpoints, the storage errors).

Only "not found" means missing: `FileNotFoundError` is what a missing file or object raises (and `stat` answers
None for it; a local path through a file, NotADirectoryError, is not found either); any other failure to read or
list (a dropped connection, a permission error, a directory where a file belongs) is a `StorageReadError` naming
the file, so that nothing is concluded from it (a shard is never rewritten because its sidecar could not be
read).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import stat as stat_module
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pipeline.core.atomic import (
    TEMP_MARK,
    AtomicFile,
    CommitOnSuccess,
    remove_temporary_files,
    write_bytes_atomic,
)
from pipeline.core.storage_io import (
    StorageError,
    is_url,
    join,
    local_path,
    read_url_bytes,
    reading,
    sha256_of,
    store_errors,
    url_to_fs,
)

logger = logging.getLogger(__name__)

LOCK_NAME = ".diffit-pipe.lock"


@dataclass(frozen=True)
class FileStat:
    """What resume and verification need to know of a file: its size, its modification time (ns; None where
    the store does not say) and whether it is a plain file."""

    size: int
    mtime_ns: int | None
    regular: bool


class Location(abc.ABC):
    """A directory (local) or a prefix (object store) holding a dataset's flat set of files. `Location.of`.

    Reads follow one rule: a missing file is FileNotFoundError (`stat`: None), any other failure is a
    StorageReadError naming the file (see the module docstring)."""

    url: str  # what logs and manifests show: an absolute local path, or the URL

    @staticmethod
    def of(location: str | os.PathLike | Location) -> Location:
        """The Location of a local path, a `file://` URL or an object-store URL (a Location is returned as is);
        StorageError for a URL whose protocol is not accepted (`check_protocol`)."""
        if isinstance(location, Location):
            return location
        return ObjectPrefix(str(location)) if is_url(location) else LocalDirectory(local_path(location))

    @property
    def is_local(self) -> bool:
        return isinstance(self, LocalDirectory)

    def join(self, name: str) -> str:
        """The path or URL of the file `name` here."""
        return join(self.url, name)

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:  # so that os.fspath / Path() of a local location keep working
        if not self.is_local:
            raise TypeError(f"{self.url} is not a local path")
        return self.url

    @abc.abstractmethod
    def exists(self) -> bool:
        """The directory exists (object stores: any object under the prefix)."""

    @abc.abstractmethod
    def create(self) -> None:
        """Create the directory (object stores: check that the bucket can be reached)."""

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Sorted names of the files directly inside ([] when the directory does not exist)."""

    @abc.abstractmethod
    def stat(self, name: str) -> FileStat | None:
        """The file `name`'s size, modification time and kind; None when it does not exist."""

    @abc.abstractmethod
    def read_bytes(self, name: str) -> bytes:
        """All bytes of the file `name` (FileNotFoundError when it does not exist)."""

    @abc.abstractmethod
    def write_bytes(self, name: str, data: bytes) -> None:
        """Write the file `name` atomically: readers see the old file or all of `data`."""

    @abc.abstractmethod
    def writer(self, name: str) -> CommitOnSuccess:
        """A writer of the file `name` (`.handle`, `.commit()`, `.abort()`, `.done`): nothing appears under the
        name before `commit()`."""

    @abc.abstractmethod
    def remove(self, name: str) -> None:
        """Remove the file `name` (no error when it does not exist)."""

    @abc.abstractmethod
    def remove_temporary_files(self) -> list[str]:
        """Remove what killed writers left (temporary names); returns the removed names."""

    @abc.abstractmethod
    def lock(self) -> contextlib.AbstractContextManager[None]:
        """A context manager held while a job writes here (StorageError when another job holds it)."""

    def stats(self) -> dict[str, FileStat]:
        """`stat` of every file directly inside, by name (object stores: one listing, not a request per file)."""
        return {name: found for name in self.names() if (found := self.stat(name)) is not None}

    def read_many(self, names: list[str]) -> dict[str, bytes | None]:
        """The bytes of each file of `names` (None: missing; any other failure: StorageReadError); object stores
        fetch them concurrently."""
        found: dict[str, bytes | None] = {}
        for name in names:
            try:
                found[name] = self.read_bytes(name)
            except FileNotFoundError:
                found[name] = None
        return found

    def has(self, name: str) -> bool:
        """True when the file `name` exists here."""
        return self.stat(name) is not None

    def sha256(self, name: str) -> str:
        return sha256_of(self.join(name))


class LocalDirectory(Location):
    """A local directory: atomic files by rename, an `fcntl` lock."""

    def __init__(self, path: Path):
        self.path = path
        self.url = str(path)

    def exists(self) -> bool:
        return self.path.is_dir()

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def names(self) -> list[str]:
        try:
            with reading(self.url):
                return sorted(entry.name for entry in os.scandir(self.path) if entry.is_file(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def stat(self, name: str) -> FileStat | None:
        try:
            with reading(self.join(name)):
                result = os.stat(self.path / name)
        except FileNotFoundError:
            return None
        return FileStat(result.st_size, result.st_mtime_ns, stat_module.S_ISREG(result.st_mode))

    def read_bytes(self, name: str) -> bytes:
        return read_url_bytes(self.path / name)

    def write_bytes(self, name: str, data: bytes) -> None:
        write_bytes_atomic(self.path / name, data)

    def writer(self, name: str) -> AtomicFile:
        return AtomicFile(self.path / name)

    def remove(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def remove_temporary_files(self) -> list[str]:
        return remove_temporary_files(self.path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock on the directory: a second job writing here fails at once (StorageError)."""
        import fcntl

        try:
            handle = open(self.path / LOCK_NAME, "a")
        except OSError as error:
            raise StorageError(f"cannot write to the output directory {self.path}: {error.strerror or error}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StorageError(
                f"another diffit-pipe job is writing to {self.path} (lock {self.path / LOCK_NAME} is held)"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


class SpooledUpload(CommitOnSuccess):
    """A file written to a local temporary file and uploaded to `url` in one call by `commit()`: the object
    appears complete or not at all. `abort()` (or an exception in a `with` block) uploads nothing."""

    def __init__(self, url: str):
        self.url = url
        self._spool = tempfile.NamedTemporaryFile(prefix="diffit-pipe-upload-", suffix=TEMP_MARK.strip("-"))
        self.handle: IO = self._spool
        self.done = False

    def commit(self) -> str:
        try:
            self._spool.flush()
            fs, path = url_to_fs(self.url, writing=True)
            with store_errors(self.url):
                fs.put_file(self._spool.name, path)
        finally:
            self.done = True
            self._spool.close()  # deletes the spool file
        return self.url

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self._spool.close()


class ObjectPrefix(Location):
    """A prefix in an object store (`s3://bucket/datasets/x`): one upload per file, listings never cached.
    Client errors other than OSError (no credentials, access denied, ...) become one StorageError line, failed
    reads other than "not found" a StorageReadError."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = url_to_fs(self.url, writing=True)  # a Location may be written: atomic uploads only

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self) -> bool:
        return bool(self._listing())

    def create(self) -> None:
        # Prefixes need not be created; check that the bucket is reachable now rather than after the first shard.
        bucket = self.root.split("/", 1)[0]
        try:
            with store_errors(self.url):
                self.fs.ls(bucket, detail=False)
        except FileNotFoundError:
            raise StorageError(f"{self.url}: the bucket {bucket!r} does not exist (create it first)") from None
        except OSError as error:
            raise StorageError(f"{self.url}: cannot access the bucket {bucket!r} ({error})") from None

    def _listing(self) -> list[dict[str, Any]]:
        # Other processes (Dask workers, a previous run) write here: never answer from a cached listing.
        self.fs.invalidate_cache(self.root)
        try:
            with reading(self.url):
                return self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []

    def names(self) -> list[str]:
        return sorted(entry["name"].rsplit("/", 1)[-1] for entry in self._listing() if entry.get("type") == "file")

    def stats(self) -> dict[str, FileStat]:
        return {
            entry["name"].rsplit("/", 1)[-1]: FileStat(int(entry.get("size") or 0), _mtime_ns(entry), True)
            for entry in self._listing()
            if entry.get("type") == "file"
        }

    def read_many(self, names: list[str]) -> dict[str, bytes | None]:
        self.fs.invalidate_cache(self.root)
        paths = [self._path(name) for name in names]
        if getattr(self.fs, "async_impl", False):
            results = _fetch_concurrently(self.fs, paths)
        else:
            results = []
            for path in paths:
                try:
                    results.append(self.fs.cat_file(path))
                except Exception as error:  # collected like the concurrent branch's, sorted out below
                    results.append(error)
        found: dict[str, bytes | None] = {}
        for name, result in zip(names, results):
            if isinstance(result, FileNotFoundError):
                found[name] = None
            elif isinstance(result, BaseException):
                with reading(self.join(name)):
                    raise result  # a dropped connection, no credentials, ...: one error line, never "missing"
            else:
                found[name] = bytes(result)
        return found

    def stat(self, name: str) -> FileStat | None:
        self.fs.invalidate_cache(self._path(name))
        try:
            with reading(self.join(name)):
                info = self.fs.info(self._path(name))
        except FileNotFoundError:
            return None
        return FileStat(int(info.get("size") or 0), _mtime_ns(info), info.get("type") == "file")

    def read_bytes(self, name: str) -> bytes:
        self.fs.invalidate_cache(self._path(name))
        try:
            with reading(self.join(name)):
                return self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.join(name)}: no such object") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        with store_errors(self.join(name)):
            self.fs.pipe_file(self._path(name), data)  # one PUT: the object appears complete or not at all

    def writer(self, name: str) -> SpooledUpload:
        return SpooledUpload(self.join(name))

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError), store_errors(self.join(name)):
            self.fs.rm_file(self._path(name))

    def remove_temporary_files(self) -> list[str]:
        removed = [name for name in self.names() if TEMP_MARK in name]
        for name in removed:
            self.remove(name)
        return removed

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Object stores have no locks: say so once; running two jobs on one prefix is the user's to avoid."""
        logger.info("%s is an object store, which has no locks: run one encode/pack job per output URL", self.url)
        yield


_CONCURRENT_REQUESTS = 64


def _fetch_concurrently(fs, paths: list[str]) -> list:
    """`fs._cat_file` of every path on the file system's event loop, at most `_CONCURRENT_REQUESTS` at a time
    (fsspec's own `cat` of a list first asks for each path's info: a request more per object); exceptions are
    returned in place of their results."""
    import asyncio

    from fsspec.asyn import sync

    async def fetch_all() -> list:
        limit = asyncio.Semaphore(_CONCURRENT_REQUESTS)

        async def fetch(path: str):
            async with limit:
                return await fs._cat_file(path)

        return await asyncio.gather(*(fetch(path) for path in paths), return_exceptions=True)

    return sync(fs.loop, fetch_all)


def _mtime_ns(info: dict[str, Any]) -> int | None:
    """The modification time in an fsspec `info` dict (s3fs: LastModified, gcsfs: updated, local: mtime)."""
    import datetime

    for key in ("LastModified", "last_modified", "updated", "mtime", "modified"):
        value = info.get(key)
        if isinstance(value, datetime.datetime):
            return int(value.timestamp() * 1_000_000_000)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return int(value * 1_000_000_000)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
    return None
