"""Single files and objects by path or URL, and the object stores behind the URLs: which protocols are accepted
(`check_protocol`, `WRITABLE_PROTOCOLS`, `READ_ONLY_PROTOCOLS`), the storage errors (`StorageError`,
`StorageReadError`) and the one rule for reads (`reading`: only "not found" means missing), the fsspec clients
(`url_to_fs`, `release_clients`), and reading, hashing and downloading one file or object (`read_object`,
`open_for_reading`, `open_regular_file`, `read_url_bytes`, `sha256_of`, `download`). A dataset directory or
prefix as a whole is a `pipeline.core.storage.Location`.

Credentials and endpoints come from each file system's usual environment (s3fs: `AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, ...; gcsfs: `GOOGLE_APPLICATION_CREDENTIALS`) or from
fsspec's configuration (`FSSPEC_S3='{"endpoint_url": "http://..."}'`, `FSSPEC_S3_KEY=...`, or a JSON file in
`~/.config/fsspec/`), which fsspec applies to every file system it creates, in every process.

File systems are looked up per call (`fsspec.core.url_to_fs`, which caches instances per process), never
pickled: async file systems such as s3fs cannot cross a fork, and Dask workers and data-loader workers each
build their own.

Which URLs are accepted (`check_protocol`, before fsspec is asked for anything, so before any connection): only
stores whose single-request upload appears whole, `WRITABLE_PROTOCOLS` (S3, GCS, Azure Blob, and the in-process
`memory://` of tests); local paths and `file://` URLs go to a `LocalDirectory`. File systems that write in place
(`sftp://`, `ftp://`, `hdfs://`, WebDAV, `local://`, chained URLs such as `simplecache::s3://`) would leave a
half-written tar or manifest under its final name after a crash: refused with a `StorageError` naming the URL.
`http(s)://` is accepted for reading one object only (`READ_ONLY_PROTOCOLS`: a reference `.npz`, copied to a
local file atomically), never as a dataset `Location`, which may be written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat as stat_module
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.core.atomic import atomic_path
from pipeline.core.errors import EXIT_JOB_FAILED, InputError, PipelineError

_BLOCK = 1 << 20


# Stores whose upload of a file in one request (a PUT, or a multipart upload completed in one call) appears whole
# or not at all, by fsspec protocol name. `memory://` is process-local (tests): a crash loses all of it anyway.
WRITABLE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")
# Protocols from which one object may be read (and copied atomically to a local file), never written.
READ_ONLY_PROTOCOLS = ("http", "https")
_ACCEPTED = (
    "accepted: a local path or file:// URL, "
    + ", ".join(f"{protocol}://" for protocol in WRITABLE_PROTOCOLS)
    + " (stores whose single-request uploads appear whole), and http(s):// only to read one reference .npz"
)


class StorageError(InputError):
    """A storage URL that cannot be used (exit 2): a protocol that is not accepted (see `check_protocol`), its
    package missing, no credentials or no access."""


class StorageReadError(PipelineError):
    """A file or object that may exist but could not be read or listed: a dropped connection, a permission or
    I/O error, a directory where a file belongs (anything but "not found"). Exit 1: the job stops without
    concluding anything from it (a sidecar that cannot be read is not taken as missing); re-run when the store
    answers again."""

    exit_code = EXIT_JOB_FAILED


def protocol_of(url: str) -> str:
    """The fsspec protocol of a URL (`s3` of `s3://b/x`; a chained URL's whole chain, `simplecache::s3`)."""
    return url.split("://", 1)[0] if "://" in url else "file"


def check_protocol(url: str, writing: bool) -> None:
    """StorageError naming `url` unless its protocol is accepted: `WRITABLE_PROTOCOLS` for a location that may be
    written (`writing`), also `READ_ONLY_PROTOCOLS` for reading one object. Only the URL's text is looked at."""
    protocol = protocol_of(url)
    if protocol in WRITABLE_PROTOCOLS:
        return
    if protocol in READ_ONLY_PROTOCOLS:
        if writing:
            raise StorageError(
                f"{url}: {protocol}:// is read-only here (one reference .npz can be read from it, but a dataset or "
                f"an output cannot live there); {_ACCEPTED}"
            )
        return
    raise StorageError(
        f"{url}: the protocol {protocol}:// is not supported: a dataset's files must appear whole or not at all, and "
        f"a store that writes in place (sftp, ftp, hdfs, webdav, ...) leaves a half-written file under its final "
        f"name after a crash; {_ACCEPTED}"
    )


def is_url(location: Any) -> bool:
    """True for a URL with a scheme other than `file://` (`s3://b/x`, `gs://b/x`, `memory://x`); local paths and
    `file://` URLs are local."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike) -> Path:
    """A local path or `file://` URL as an absolute Path (symlinks resolved)."""
    text = os.fspath(location)
    if text.startswith("file://"):
        text = text[len("file://") :]
    return Path(text).expanduser().resolve()


def join(location: str | os.PathLike, name: str) -> str:
    """The path or URL of the file `name` inside the directory or prefix `location`."""
    if is_url(location):
        return str(location).rstrip("/") + "/" + name
    return str(local_path(location) / name)


@contextlib.contextmanager
def reading(url: str) -> Iterator[None]:
    """Around a read or listing of `url`: FileNotFoundError passes (the file is missing; so is a local path that
    runs through a file, NotADirectoryError, where nothing can exist), any other OSError becomes a StorageReadError
    naming `url`, client errors a StorageError (`store_errors`)."""
    try:
        with store_errors(url):
            yield
    except FileNotFoundError:
        raise
    except NotADirectoryError as error:
        raise FileNotFoundError(error.errno, error.strerror, error.filename) from error
    except OSError as error:
        raise StorageReadError(
            f"{url}: cannot be read ({type(error).__name__}: {error.strerror or error}); nothing was concluded from "
            "it: re-run once it can be read"
        ) from error


@contextlib.contextmanager
def store_errors(url: str) -> Iterator[None]:
    """Turn what an object-store client raises besides OSError (botocore's NoCredentialsError, ClientError, ...,
    google-auth errors) into one StorageError line naming `url`; OSErrors and PipelineErrors pass."""
    try:
        yield
    except (OSError, PipelineError):
        raise
    except Exception as error:  # the clients' exception types differ per protocol
        raise StorageError(f"{url}: {type(error).__name__}: {error}") from error


def url_to_fs(url: str, writing: bool = False):
    """(file system, path inside it) for an object-store URL; StorageError naming the URL when the protocol is
    not accepted (`check_protocol`: checked first, so a refused URL is never connected to) or its package (s3fs,
    gcsfs, ...) is not installed."""
    check_protocol(url, writing)
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        raise StorageError(
            f"{url}: cannot open this URL ({error}); s3:// needs `pip install s3fs`, gs:// needs `pip install gcsfs`"
        ) from None


def release_clients() -> None:
    """Close this process's object-store clients (async fsspec file systems such as s3fs) before it forks: a
    forked child that garbage-collects an inherited client shuts down connections it shares with the parent, whose
    next request then waits for the read timeout (measured: 15 s with s3fs). The parent opens new ones on use."""
    import gc
    import sys

    if "fsspec" not in sys.modules:
        return
    import fsspec

    for cls in list(fsspec.registry.values()):
        if getattr(cls, "async_impl", False):
            cls.clear_instance_cache()
    gc.collect()  # runs the clients' finalizers here, in the parent, on the parent's own event loop


def read_object(url: str) -> bytes:
    """An object's bytes in one GET of the whole object (ranged reads of large objects through `open` fail on
    some S3 servers' checksums, and one request is also the fastest way to read a shard whole).
    FileNotFoundError when it does not exist, StorageReadError when it cannot be read."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)
    with reading(url):
        return fs.cat_file(path)


def open_regular_file(path: str | os.PathLike) -> IO[bytes]:
    """`open(path, "rb")` that refuses anything but a regular file (OSError "not a regular file"): a FIFO would
    block the open forever and a device such as /dev/zero would never end a read. The open itself does not block
    (O_NONBLOCK, which has no effect on regular files)."""
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat_module.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(f"{path}: not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def open_for_reading(path_or_url: str | os.PathLike) -> IO[bytes]:
    """A binary file object for reading a local file (regular files only: a FIFO or device would block or never
    end) or an object-store URL."""
    if is_url(path_or_url):
        fs, path = url_to_fs(str(path_or_url))
        fs.invalidate_cache(path)  # a cached listing from before the object was written would say "not found"
        return fs.open(path, "rb")
    return open_regular_file(local_path(path_or_url))


def read_url_bytes(path_or_url: str | os.PathLike) -> bytes:
    """All bytes of a local file or an object (FileNotFoundError: missing; StorageReadError: unreadable)."""
    with reading(str(path_or_url)), open_for_reading(path_or_url) as handle:
        return handle.read()


def sha256_of(path_or_url: str | os.PathLike) -> str:
    """Hex sha256 of a local file (read block by block) or an object (one GET of the whole object);
    FileNotFoundError when it does not exist, StorageReadError when it cannot be read."""
    if is_url(path_or_url):
        return hashlib.sha256(read_object(str(path_or_url))).hexdigest()
    digest = hashlib.sha256()
    with reading(str(path_or_url)), open_for_reading(path_or_url) as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path) -> Path:
    """Copy an object to a local file atomically (a killed copy leaves no file under `target`), streamed in one
    GET of the whole object; FileNotFoundError when it does not exist, StorageReadError (naming the URL) for any
    other failure of the copy."""
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)
    with atomic_path(target) as temp, reading(url):
        fs.get_file(path, str(temp))
    return target
