"""Tar archives as image sources: ImageNet's train archive (a tar of per-class tars), its validation archive (one
flat tar + the devkit's labels) and WebDataset tars, read in place: nothing is ever extracted.

One pass over the tar headers builds a `MemberIndex` (for every image: the archive, the absolute byte offset and
size of its data, its relative path and label). Workers read an image with one `seek` + `read` (one ranged GET for
a URL) of exactly those bytes (`read_member`). For the train archive the inner tars' headers are parsed at their
offsets inside the outer archive, without reading a JPEG byte; the whole first pass reads about 1 KiB per image.

Member names are untrusted text: they become sample keys through `sources.sample_key` (letters, digits, `_`, `-`)
and the `source` field of a sample's json, never a path on disk.

The items of the train archive equal those of its extraction (`ROOT/<synset>/<file>`) item by item: same relative
paths, keys (`unique_keys` per directory), labels (position of the synset in the sorted synset list, ImageNet's
0-999 order) and order (sorted relative paths); the shards encoded from either are byte-identical.

A member that the index finds damaged (its data cut off by the end of a truncated inner or outer tar, an inner
"tar" that is not one) stays an item: it is recorded as a failure with the reason when a worker reaches it
(`MemberIndex.problems`; `read_member` raises it), so that every member is accounted for as with folders. A tar
(inner or outer) whose rest cannot be read keeps the members read before the damage, and the unreadable rest
becomes one failed item named `~damaged-TAR` with the reason. Links and other members that are not regular files
are never read; they are listed among the source's ignored members with the reason.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from typing import IO, Any

from pipeline.core.storage_io import is_url, local_path, open_for_reading, reading, url_to_fs

logger = logging.getLogger(__name__)

TRAIN_MEMBER = re.compile(r"n\d{8}\.tar")  # the outer members of ILSVRC2012_img_train.tar
VAL_MEMBER = re.compile(r"ILSVRC2012_val_\d{8}\.JPEG")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # WebDataset image members (lower case)
LABEL_EXTENSIONS = ("cls", "json")
_MAX_LABEL_MEMBER_BYTES = 1 << 20
_TAR_BLOCK = 512
# An intact tar ends with two zero blocks padded to its record size (10 KiB by default, 20 blocks); more bytes
# than this after the last member that tarfile can read means that the rest of the tar is damaged.
_MAX_TAIL_BYTES = 1 << 20


@dataclass(slots=True)
class Member:
    """One image of an archive: its name inside its tar, where its data lies in the archive file, its label (-1:
    none, or the group's) and the problem found by the index (None: readable)."""

    name: str
    offset: int
    size: int
    label: int = -1
    problem: str | None = None


@dataclass
class ArchiveIdentity:
    """What identifies an archive's content for the index cache and resume: path or URL, size, mtime."""

    location: str
    size: int
    mtime_ns: int

    def as_json(self) -> dict[str, Any]:
        return {"location": self.location, "size": self.size, "mtime_ns": self.mtime_ns}


def identify(location: str) -> ArchiveIdentity:
    """Size and modification time of a local archive or an object (SourceError-free: OSError when missing)."""
    if is_url(location):
        fs, path = url_to_fs(location)
        fs.invalidate_cache(path)
        with reading(location):
            info = fs.info(path)
        from pipeline.core.storage import _mtime_ns

        return ArchiveIdentity(location, int(info["size"]), _mtime_ns(info) or 0)
    stat = os.stat(local_path(location))
    return ArchiveIdentity(str(local_path(location)), stat.st_size, stat.st_mtime_ns)


class _Window(io.RawIOBase):
    """The bytes [start, start + length) of a seekable file as a file of their own (tarfile reads an inner tar
    through it, so a truncated inner tar never runs into the next outer member)."""

    def __init__(self, handle: IO[bytes], start: int, length: int):
        self.handle, self.start, self.length, self.position = handle, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.position, 2: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def read(self, size: int = -1) -> bytes:
        left = max(0, self.length - self.position)
        size = left if size is None or size < 0 else min(size, left)
        if size == 0:
            return b""
        self.handle.seek(self.start + self.position)
        data = self.handle.read(size)
        self.position += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _clean_name(name: str) -> str:
    """A member name without leading `./` or `/` (names are text only; they never reach the file system)."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _is_hidden(name: str) -> bool:
    """Hidden members (`._n0144.JPEG` from macOS tar, `.DS_Store`) are not images, as in folders."""
    return any(part.startswith(".") for part in name.split("/") if part)


def _tail_problem(handle: IO[bytes], end_of_members: int, length: int) -> str | None:
    """Why the bytes after the last readable member of a tar of `length` bytes are not a clean end (None: they
    are zero padding of a normal size)."""
    tail = length - end_of_members
    if tail <= 0:
        return None
    if tail > _MAX_TAIL_BYTES:
        return f"{tail} bytes after the last readable member are not tar headers (damaged tar)"
    handle.seek(end_of_members)
    if handle.read(tail).strip(b"\0"):
        return f"{tail} bytes after the last readable member are not tar headers (damaged tar)"
    return None


def not_read(member: tarfile.TarInfo, name: str) -> str:
    """How a member that is neither a regular file nor a directory is listed among the ignored: its name and why
    it is not read (a link is never followed: its target may lie outside the archive)."""
    if member.issym():
        return f"{name} (a symbolic link to {member.linkname!r}: links are not followed)"
    if member.islnk():
        return f"{name} (a hard link to {member.linkname!r}: links are not followed)"
    return f"{name} (not a regular file)"


def scan_tar(
    handle: IO[bytes], length: int, base: int = 0, ignored: list[str] | None = None, prefix: str = ""
) -> tuple[list[tarfile.TarInfo], str | None]:
    """The regular-file members of the tar in `handle` (headers only: data is skipped with seeks) with
    `offset_data` made absolute by `base`, and a problem when the tar ends damaged (None when clean). Members that
    are neither files nor directories (links, devices) go to `ignored` as `prefix + name (why)`."""
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    members.append(member)
                elif not member.isdir() and ignored is not None:
                    ignored.append(not_read(member, prefix + member.name))
            end = tar.offset
    except tarfile.TarError as error:
        problem: str | None = f"not a readable tar ({' '.join(str(error).split())})"
    else:
        problem = _tail_problem(handle, end, length)
    for member in members:
        member.offset_data += base
    return members, problem


@dataclass
class Group:
    """Images that share a directory prefix and an archive file (train: one inner tar, whose prefix is its synset;
    val: the whole archive, no prefix; WebDataset: one tar, prefix = its name without `.tar`), in item order."""

    prefix: str
    location: str
    members: list[Member] = field(default_factory=list)
    keys: list[str] | None = None  # the members' sample keys, when a cached index holds them

    def paths(self) -> list[str]:
        """The members' relative paths (`prefix/name`): what their keys are made from."""
        return [f"{self.prefix}/{m.name}" if self.prefix else m.name for m in self.members]


def _cut_off(member: tarfile.TarInfo, available: int, tar_name: str) -> str | None:
    """The problem of a member whose data runs past the `available` bytes of its tar (a truncated tar)."""
    end = member.offset_data + member.size
    if end <= available:
        return None
    return f"truncated tar: member {member.name!r} of {member.size} bytes is cut off by the end of {tar_name}"


def index_inner_tar(
    handle: IO[bytes], archive_size: int, inner: tarfile.TarInfo, label: int, ignored: list[str]
) -> list[Member]:
    """The images of one per-class tar of the train archive, sorted by name, offsets absolute in the archive.

    Only its headers are read. Hidden members and non-files go to `ignored`; a name that appears twice keeps its
    last copy (as extraction would); a member cut off by the end of the tar (or of the archive) is kept with its
    problem; a damaged rest of the tar becomes one member named after the tar, with the reason."""
    available = min(inner.size, archive_size - inner.offset_data)
    window = _Window(handle, inner.offset_data, max(0, available))
    tar_members, problem = scan_tar(window, max(0, available), ignored=ignored, prefix=f"{inner.name}/")
    if available < inner.size and problem is None:
        problem = f"the archive ends {inner.size - available} bytes before the end of {inner.name}"
    by_name: dict[str, Member] = {}
    for member in tar_members:
        name = _clean_name(member.name)
        if not name or _is_hidden(name):
            ignored.append(f"{inner.name}/{member.name}")
            continue
        if name in by_name:
            ignored.append(f"{inner.name}/{name}")  # an earlier copy: extraction keeps the last one
        cut = _cut_off(member, available, inner.name)
        by_name[name] = Member(name, inner.offset_data + member.offset_data, member.size, label, cut)
    members = [by_name[name] for name in sorted(by_name)]
    if problem is not None and not any(member.problem for member in members):
        # (A member cut off by the end of the tar already accounts for the truncation.)
        # Named so that it sorts after the readable members and never equals an image name of the tar.
        members.append(Member(f"~damaged-{inner.name}", inner.offset_data, 0, label, f"{inner.name}: {problem}"))
    return members


def read_member(location: str, offset: int, size: int, problem: str | None = None) -> bytes:
    """The `size` bytes at `offset` of a local archive (seek + read) or an object (one ranged GET); OSError (which
    a worker records as the item's failure) with the index's `problem`, or when fewer bytes are there than the
    index says."""
    if problem is not None:
        raise OSError(problem)
    if is_url(location):
        fs, path = url_to_fs(location)
        with reading(location):
            data = fs.cat_file(path, start=offset, end=offset + size)
    else:
        with open_for_reading(location) as handle:
            handle.seek(offset)
            data = handle.read(size)
    if len(data) != size:
        raise OSError(f"{location} holds {len(data)} of the {size} bytes at offset {offset} (truncated)")
    return data


def open_archive(location: str) -> IO[bytes]:
    """A seekable binary handle on a local archive or an object (fsspec, read ahead in large blocks so that
    skipping over small members does not cost one request each)."""
    if is_url(location):
        fs, path = url_to_fs(location)
        fs.invalidate_cache(path)
        return fs.open(path, "rb", block_size=8 << 20, cache_type="readahead")
    return open_for_reading(location)
