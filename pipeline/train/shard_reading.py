"""Reading training shards: a shard is read whole (a local file or an object), hashed as it is read and compared
with the manifest's sha256, then parsed as a tar from the bytes and grouped into samples as webdataset groups them
(`read_shard`, `parse_shard`); `read_ahead` reads the next shard in a background thread. The errors for data that
does not follow the shard format (`DataFormatError`, `CorruptShardError`) live here too.

Integrity: a shard is read whole into memory (shards are tens of MB) while its sha256 is computed, compared
with the manifest's (`StreamSpec.sha256`), and only then parsed as a tar (from the bytes, never through a URL
handler) -- so no sample of a damaged shard is ever trained. The next shard is read and hashed in a background
thread while the current one is decoded (reading and hashing release the GIL), which keeps the hash off the
loader's critical path. A damaged shard (wrong sha256, not a tar, unreadable, no samples) stops the run with a
`CorruptShardError` naming it, or, with `data.on_corrupt_shard: skip`, is left out with a warning and counted
(`ShardStream.damaged`, one flag per shard shared by the DataLoader workers).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pipeline.core.errors import InputError, PipelineError
from pipeline.core.storage_io import is_url, read_object

_READ_BLOCK = 1 << 20
_Item = TypeVar("_Item")


class DataFormatError(InputError):
    """A sample or shard that does not follow the documented shard format."""


class CorruptShardError(DataFormatError):
    """A shard whose bytes are damaged: sha256 other than the manifest's, not a tar, unreadable, or empty."""


# Shards this process has verified, by file identity (device, inode, size, mtime, ctime) and expected hash: a
# file that has not changed since -- any write changes its ctime -- is not hashed again in later epochs, so the
# check costs one hash per shard per process rather than one per read (docs/benchmarks.md, loader).
_VERIFIED: set[tuple] = set()


def read_shard(url: str, expected_sha256: str | None) -> bytes | bytearray:
    """The bytes of a shard (a local file or an object-store URL), hashed block by block as they are read (one
    pass); CorruptShardError when the sha256 differs from `expected_sha256` (None: not checked) or the shard
    cannot be read. A local file this process already verified and that has not changed since is not hashed
    again; objects are downloaded, so hashed, every time."""
    if is_url(url):
        return _read_object(url, expected_sha256)
    try:
        with open(url, "rb", buffering=0) as handle:
            stat = os.fstat(handle.fileno())
            size = stat.st_size
            identity = (stat.st_dev, stat.st_ino, size, stat.st_mtime_ns, stat.st_ctime_ns, expected_sha256)
            check = expected_sha256 is not None and identity not in _VERIFIED
            digest = hashlib.sha256() if check else None
            data = bytearray(size)
            view, done = memoryview(data), 0
            while done < size:
                count = handle.readinto(view[done : done + _READ_BLOCK])
                if not count:
                    break
                if digest is not None:
                    digest.update(view[done : done + count])
                done += count
    except OSError as error:
        raise CorruptShardError(f"{url}: cannot read the shard ({error.strerror or error})") from None
    if done != size:
        raise CorruptShardError(f"{url}: the shard shrank while it was read ({done} of {size} bytes)")
    if digest is not None:
        if digest.hexdigest() != expected_sha256:
            raise CorruptShardError(
                f"{url}: sha256 {digest.hexdigest()} does not match the manifest's {expected_sha256}: the shard is "
                "damaged (re-run encode/pack, or set data.on_corrupt_shard: skip to train without it)"
            )
        _VERIFIED.add(identity)
    return data


def _read_object(url: str, expected_sha256: str | None) -> bytes:
    """`read_shard` for an object: one GET of the whole object, then its sha256."""
    try:
        data = read_object(url)
    except (OSError, PipelineError) as error:  # FileNotFoundError, a dropped connection, no credentials
        raise CorruptShardError(f"{url}: cannot read the shard ({error})") from None
    if expected_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected_sha256:
            raise CorruptShardError(
                f"{url}: sha256 {digest} does not match the manifest's {expected_sha256}: the shard is "
                "damaged (re-run encode/pack, or set data.on_corrupt_shard: skip to train without it)"
            )
    return data  # parsed as it is: no copy of the shard


class _BufferReader(io.RawIOBase):
    """A read-only, seekable file over an in-memory buffer for tarfile; unlike `io.BytesIO(bytearray)` it does not
    copy the whole shard first."""

    def __init__(self, buffer: bytes | bytearray):
        super().__init__()
        self.view = memoryview(buffer)
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        count = min(len(target), len(self.view) - self.position)
        target[:count] = self.view[self.position : self.position + count]
        self.position += count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: len(self.view)}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position


_BLOCK = 512
_REGULAR = (b"0", b"\0")
_NOT_A_FILE = (b"1", b"2", b"3", b"4", b"5", b"6", b"7")  # links, devices, directories, FIFOs: skipped
# Names webdataset skips (tar_file_iterator's meta files).
_META_NAME = re.compile(r"__[^/]*__($|/)")


def _ustar_members(url: str, view: memoryview) -> list[tuple[str, bytes]] | None:
    """(name, content) of every regular file of a plain ustar tar in memory -- what the shard writer produces --
    read straight from the buffer (tarfile's stream mode costs ~5x more per member). None when the archive uses
    anything else (pax / GNU extended headers, base-256 sizes): tarfile reads those. A header whose checksum
    does not match, or a member cut short, is a CorruptShardError."""
    members, offset = [], 0
    while offset + _BLOCK <= len(view):
        header = bytes(view[offset : offset + _BLOCK])
        if header.count(0) == _BLOCK:
            return members  # the end-of-archive block
        try:
            recorded = int(header[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
        except ValueError:
            recorded = -1
        if recorded != sum(header) - sum(header[148:156]) + 8 * 32:
            if offset == 0 or header[257:262] != b"ustar":
                raise CorruptShardError(f"{url}: not a readable tar shard (bad header checksum at byte {offset})")
            return None  # a signed-sum checksum or another writer's quirk: let tarfile judge
        kind, size_field = header[156:157], header[124:136]
        if header[257:262] != b"ustar" or kind not in _REGULAR + _NOT_A_FILE or size_field[0] & 0x80:
            return None
        size = int(size_field.replace(b"\0", b" ").strip() or b"0", 8)
        start = offset + _BLOCK
        if start + size > len(view):
            raise CorruptShardError(f"{url}: not a readable tar shard (member at byte {offset} is cut short)")
        if kind in _REGULAR:
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
            name = (prefix + b"/" + name) if prefix else name
            members.append((name.decode("utf-8", "surrogateescape"), bytes(view[start : start + size])))
        offset = start + -(-size // _BLOCK) * _BLOCK
    raise CorruptShardError(f"{url}: not a readable tar shard (no end-of-archive block)")


def _tarfile_members(data: bytes | bytearray) -> list[tuple[str, bytes]]:
    """(name, content) of every regular file, read by tarfile (any tar format, compressed too)."""
    with tarfile.open(fileobj=_BufferReader(data), mode="r:*") as tar:
        return [(member.name, tar.extractfile(member).read()) for member in tar if member.isreg()]


def parse_shard(url: str, data: bytes | bytearray) -> list[dict[str, Any]]:
    """The samples of a shard's tar bytes, grouped by key exactly as webdataset groups them (each with `__key__`
    and `__url__`); CorruptShardError when the bytes are not a tar or hold no sample."""
    from webdataset.handlers import reraise_exception
    from webdataset.tariterators import group_by_keys

    try:
        members = _ustar_members(url, memoryview(data))
        if members is None:
            members = _tarfile_members(data)
        files = ({"fname": name, "data": content, "__url__": url} for name, content in members)
        kept = (file for file in files if not _META_NAME.match(file["fname"]))
        samples = list(group_by_keys(kept, handler=reraise_exception))
    except CorruptShardError:
        raise
    except (tarfile.TarError, EOFError, ValueError) as error:
        reason = error.args[0] if error.args else type(error).__name__
        raise CorruptShardError(f"{url}: not a readable tar shard ({reason})") from None
    if not samples:
        raise CorruptShardError(f"{url}: the shard holds no sample (the manifest lists it as non-empty)")
    return samples


def read_ahead(items: Iterable[_Item], read: Callable[[_Item], Any]) -> Iterator[tuple[_Item, Any]]:
    """(item, read(item)) for each item in order, reading the next item in a background thread while the caller
    works on the current one. An exception of `read` is returned in place of the result (for the caller to raise
    or handle when it gets to that item)."""

    def attempt(item: _Item) -> Any:
        try:
            return read(item)
        except PipelineError as error:
            return error

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-read") as pool:
        pending = None
        for item in items:
            future = pool.submit(attempt, item)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (item, future)
        if pending is not None:
            yield pending[0], pending[1].result()
