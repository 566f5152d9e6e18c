"""The member index of an archive source, cached beside the output so that a resumed run plans without reading
the archive again.

An index is the list of `Group`s of `pipeline.encode.archives` (every image's archive file, offset, size, label,
problem), the label map, what the walk ignored, and the identities (location, size, mtime) of the archive files it
was built from. It is stored as one `.npz` (numpy arrays, never pickles: the file is read back as data) in OUT
under `SOURCE_INDEX_NAME`, written atomically through OUT's `Location`.

A cached index is an optimisation, never an authority: anyone who can write OUT can rewrite it, so it is used only
when it is bound to the source now and every location in it is one the source itself could have produced.

- Bound: its layout, every archive identity (location, size, mtime) and the source's `binding` must match. The
  binding is a SHA-256 of what the index was built from that a run can read again cheaply: the first and last
  64 KiB of every archive file (`headers_digest`: the first tar headers, a parquet footer), and for the train
  archive its outer member list.
- Checked (`check_index`): every group's location is one of the source's archive files; every readable member's
  data lies inside that file, starts on a tar block boundary after a header, and overlaps no other member's data
  (tar layouts), or names an existing row group and row (parquet); labels lie in the label map, which is no larger
  than `MAX_CLASSES`; sample keys are what `sample_key` produces, unique in their group; the source adds its own
  checks (the train archive: each group is an existing per-class tar, its members inside it, its label the
  synset's).
- Bounded: the file's members may not declare more bytes than the file holds (no inflating).

Anything else (a changed archive, another source, a damaged or rewritten file) is logged as a warning and the
archive is indexed again; it is never a traceback.

1.28M members take about 30 MB (names as one NUL-separated blob, offsets / sizes / labels as arrays).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.core.storage import Location
from pipeline.encode.archives import ArchiveIdentity, Group, Member, read_member
from pipeline.encode.source_items import MAX_CLASSES, MAX_KEY_LENGTH, keys_per_directory

logger = logging.getLogger(__name__)

SOURCE_INDEX_NAME = "source-index.npz"
INDEX_VERSION = 3  # 2: the sample keys are stored; 3: bound to the source's headers (`binding`)
TAR_LAYOUTS = ("imagenet-train", "imagenet-val", "webdataset")
_DIGEST_BYTES = 64 << 10
_TAR_BLOCK = 512


@dataclass
class MemberArrays:
    """The numbers of every member of an index, in order (what `check_index` checks, vectorised)."""

    offsets: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray
    damaged: np.ndarray  # the member has a problem: it is never read
    group: np.ndarray  # the number of its group
    keys: bytes  # the sample keys, NUL-separated


@dataclass
class MemberIndex:
    """A complete index of an archive source (see the module docstring)."""

    layout: str
    identities: list[ArchiveIdentity]
    label_map: dict[str, int]
    groups: list[Group]
    ignored: list[str]
    binding: str = ""
    arrays: MemberArrays | None = field(default=None, repr=False, compare=False)  # as read from a cached file

    def member_arrays(self) -> MemberArrays:
        """The members' offsets, sizes, labels, problem flags and group numbers as arrays (those read from the
        file for a cached index)."""
        if self.arrays is None:
            members = [member for group in self.groups for member in group.members]
            self.arrays = MemberArrays(
                np.array([m.offset for m in members], dtype=np.int64),
                np.array([m.size for m in members], dtype=np.int64),
                np.array([m.label for m in members], dtype=np.int64),
                np.array([m.problem is not None for m in members], dtype=bool),
                np.repeat(np.arange(len(self.groups)), [len(g.members) for g in self.groups]),
                "\0".join(k for g in self.groups for k in (g.keys or keys_per_directory(g.paths()))).encode("ascii"),
            )
        return self.arrays

    def header(self) -> dict[str, Any]:
        """What must match for the cache to be used."""
        return {
            "version": INDEX_VERSION,
            "layout": self.layout,
            "identities": [identity.as_json() for identity in self.identities],
            "binding": self.binding,
        }


def headers_digest(identities: list[ArchiveIdentity], extra: bytes = b"") -> str:
    """SHA-256 of the first and last 64 KiB of every archive file (their first headers; a parquet footer) and
    `extra`: what binds a cached index to the bytes it was built from, read again in two small reads per file."""
    digest = hashlib.sha256(extra)
    for identity in identities:
        head = min(identity.size, _DIGEST_BYTES)
        tail = min(identity.size - head, _DIGEST_BYTES)
        digest.update(f"{identity.location}\0{identity.size}\0".encode("utf-8", "surrogateescape"))
        digest.update(read_member(identity.location, 0, head))
        if tail:
            digest.update(read_member(identity.location, identity.size - tail, tail))
    return digest.hexdigest()


def index_bytes(index: MemberIndex) -> bytes:
    """The index as an .npz file's bytes."""
    members = [member for group in index.groups for member in group.members]
    problems = {str(i): m.problem for i, m in enumerate(members) if m.problem is not None}
    meta = {
        **index.header(),
        "label_map": index.label_map,
        "groups": [[group.prefix, group.location, len(group.members)] for group in index.groups],
        "problems": problems,
        "ignored": index.ignored,
    }
    names = "\0".join(member.name for member in members).encode("utf-8", "surrogateescape")
    keys = [key for group in index.groups for key in (group.keys or keys_per_directory(group.paths()))]
    keys_blob = "\0".join(keys).encode("ascii")  # sample keys are ASCII by construction
    buffer = io.BytesIO()
    np.savez(
        buffer,
        meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
        names=np.frombuffer(names, dtype=np.uint8),
        keys=np.frombuffer(keys_blob, dtype=np.uint8),
        offsets=np.array([m.offset for m in members], dtype=np.int64),
        sizes=np.array([m.size for m in members], dtype=np.int64),
        labels=np.array([m.label for m in members], dtype=np.int32),
    )
    return buffer.getvalue()


def _check_declared_sizes(data: bytes) -> None:
    """ValueError when a member of the .npz declares more bytes than the whole file holds (np.savez stores its
    members uncompressed: a larger one was not written by `index_bytes`)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.file_size > len(data):
                raise ValueError(f"member {info.filename} declares {info.file_size} bytes in a {len(data)}-byte file")


def _expect(condition: bool, problem: str) -> None:
    if not condition:
        raise ValueError(problem)


def index_from_bytes(data: bytes) -> MemberIndex:
    """Parse an .npz written by `index_bytes` (ValueError / KeyError / TypeError when it is not one)."""
    _check_declared_sizes(data)
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
        _expect(isinstance(meta, dict) and isinstance(meta.get("groups"), list), "no group list")
        blob = arrays["names"].tobytes().decode("utf-8", "surrogateescape")
        names = blob.split("\0") if blob or meta["groups"] else []
        key_blob = arrays["keys"].tobytes().decode("ascii")
        keys = key_blob.split("\0") if key_blob or meta["groups"] else []
        offsets_array, sizes_array, labels_array = arrays["offsets"], arrays["sizes"], arrays["labels"]
        _expect(offsets_array.dtype == sizes_array.dtype == np.int64 and labels_array.dtype == np.int32, "wrong types")
        _expect(offsets_array.ndim == sizes_array.ndim == labels_array.ndim == 1, "wrong array shapes")
        offsets, sizes, labels = offsets_array.tolist(), sizes_array.tolist(), labels_array.tolist()
    for group in meta["groups"]:
        _expect(
            isinstance(group, list)
            and len(group) == 3
            and isinstance(group[0], str)
            and isinstance(group[1], str)
            and type(group[2]) is int
            and group[2] >= 0,
            "a malformed group entry",
        )
    count = sum(g[2] for g in meta["groups"])
    if not len(names) == len(keys) == len(offsets) == len(sizes) == len(labels) == count:
        raise ValueError("the index arrays have different lengths")
    problems: list[str | None] = [None] * count
    _expect(isinstance(meta["problems"], dict), "a malformed problem list")
    for position, problem in meta["problems"].items():
        _expect(isinstance(problem, str) and position.isdigit() and int(position) < count, "a malformed problem")
        problems[int(position)] = problem
    groups, start = [], 0
    for prefix, location, size in meta["groups"]:
        stop = start + size
        members = list(map(Member, names[start:stop], offsets[start:stop], sizes[start:stop], labels[start:stop],
                           problems[start:stop]))  # fmt: skip
        groups.append(Group(prefix, location, members, keys[start:stop]))
        start = stop
    identities = [ArchiveIdentity(**identity) for identity in meta["identities"]]
    label_map, ignored = meta["label_map"], meta["ignored"]
    _expect(isinstance(label_map, dict) and all(type(v) is int for v in label_map.values()), "a malformed label map")
    _expect(isinstance(ignored, list) and all(isinstance(n, str) for n in ignored), "a malformed ignored list")
    damaged = np.zeros(count, dtype=bool)
    damaged[[int(position) for position in meta["problems"]]] = True
    group_of = np.repeat(np.arange(len(groups)), [g[2] for g in meta["groups"]])
    numbers = MemberArrays(
        offsets_array, sizes_array, labels_array.astype(np.int64), damaged, group_of, key_blob.encode()
    )
    return MemberIndex(meta["layout"], identities, label_map, groups, ignored, str(meta.get("binding", "")), numbers)


def _check_keys(index: MemberIndex, blob: bytes) -> None:
    """Every sample key is what `sample_key` makes (letters, digits, `_`, `-`, single `/` between parts, at most
    MAX_KEY_LENGTH), and keys are unique within their group."""
    codes = np.frombuffer(blob, dtype=np.uint8)
    allowed = np.zeros(256, dtype=bool)
    allowed[list(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-/\0")] = True
    _expect(bool(allowed[codes].all()), "a sample key holds a character `sample_key` never writes")
    _expect(
        not any(part in blob for part in (b"//", b"/\0", b"\0/", b"\0\0")) and not blob.startswith((b"/", b"\0")),
        "an empty or unsafe sample key",
    )
    _expect(not blob.endswith((b"/", b"\0")) or not blob, "an empty or unsafe sample key")
    ends = np.flatnonzero(codes == 0)
    lengths = np.diff(np.concatenate(([-1], ends, [len(codes)]))) - 1 if len(codes) else np.zeros(0)
    _expect(bool((lengths <= MAX_KEY_LENGTH).all()), f"a sample key is longer than {MAX_KEY_LENGTH} characters")
    for group in index.groups:
        keys = group.keys or []
        _expect(len(set(keys)) == len(keys), f"group {group.prefix!r} repeats a sample key")


def check_index(index: MemberIndex, identities: list[ArchiveIdentity], parquet_rows=None) -> None:
    """ValueError naming the first thing in `index` that the source's files could not have produced (see the
    module docstring). `parquet_rows(location)`: the row counts of a parquet file's row groups. Vectorised: a
    1.28M-member index is checked in about a second."""
    sizes = {identity.location: identity.size for identity in identities}
    classes = len(index.label_map)
    _expect(classes <= MAX_CLASSES, f"its label map has {classes} classes, more than {MAX_CLASSES}")
    _expect(sorted(index.label_map.values()) == list(range(classes)), "its label map is not the classes 0 ... n-1")
    for group in index.groups:
        _expect(group.location in sizes, f"group {group.prefix!r} points at {group.location}, not a file of the source")
    numbers = index.member_arrays()
    _expect(bool(((numbers.labels >= -1) & (numbers.labels < classes)).all()), "a label outside the label map")
    _check_keys(index, numbers.keys)
    readable = ~numbers.damaged  # a damaged member is never read: `read_member` / `read_row` raise its problem
    offsets, lengths, group = numbers.offsets[readable], numbers.sizes[readable], numbers.group[readable]
    locations = sorted(sizes)
    number_of = {location: number for number, location in enumerate(locations)}
    file_of = np.array([number_of[g.location] for g in index.groups], dtype=np.int64)[group]
    if index.layout == "parquet":
        for number, location in enumerate(locations):
            rows = np.array(parquet_rows(location) if (file_of == number).any() else [], dtype=np.int64)
            row_group, position = offsets[file_of == number], lengths[file_of == number]
            _expect(bool(((row_group >= 0) & (row_group < len(rows))).all()), f"{location}: a row group it lacks")
            _expect(bool(((position >= 0) & (position < rows[row_group])).all()), f"{location}: a row it lacks")
        return
    file_sizes = np.array([sizes[location] for location in locations], dtype=np.int64)[file_of]
    _expect(
        bool(((offsets >= _TAR_BLOCK) & (offsets % _TAR_BLOCK == 0) & (lengths >= 0)).all()),
        "an offset that is not the start of a tar member's data",
    )
    inside = (offsets <= file_sizes) & (lengths <= file_sizes)  # (so that their sum cannot overflow)
    _expect(
        bool(inside.all()) and bool((offsets + lengths <= file_sizes).all()), "a member's bytes lie outside its file"
    )
    ends = offsets + lengths
    order = np.lexsort((offsets, file_of))
    same_file = file_of[order][1:] == file_of[order][:-1]
    _expect(bool((ends[order][:-1][same_file] <= offsets[order][1:][same_file]).all()), "two members' data overlap")


@dataclass
class IndexCache:
    """Where a source's member index is kept (OUT), and whether a new one may be written there (not by a dry
    run, which writes nothing)."""

    location: Location
    writable: bool = True


def load_cached_index(
    cache: IndexCache | None,
    layout: str,
    identities: list[ArchiveIdentity],
    binding: Callable[[], str] = lambda: "",
    check: Callable[[MemberIndex], None] | None = None,
) -> MemberIndex | None:
    """The index cached in `cache` when it was built from these very archive files and passes `check_index` and
    the source's own `check` (ValueError), else None (logged: a warning when the file is unusable)."""
    if cache is None:
        return None
    try:
        data = cache.location.read_bytes(SOURCE_INDEX_NAME)
    except FileNotFoundError:
        return None
    where = cache.location.join(SOURCE_INDEX_NAME)
    try:
        index = index_from_bytes(data)
    except Exception as error:  # noqa: BLE001 - a file in OUT is data: whatever it holds, index again
        logger.warning("ignoring the unreadable source index %s (%s); indexing again", where, error)
        return None
    wanted = {"version": INDEX_VERSION, "layout": layout, "identities": [i.as_json() for i in identities]}
    if {k: v for k, v in index.header().items() if k != "binding"} != wanted or index.binding != binding():
        logger.info("the source index in %s was built from other archive files; indexing again", cache.location)
        return None
    try:
        if check is not None:
            check(index)
    except Exception as error:  # noqa: BLE001 - see above
        logger.warning("ignoring the source index %s: the source does not match it (%s); indexing again", where, error)
        return None
    return index


def save_index(cache: IndexCache | None, index: MemberIndex) -> None:
    """Write the index into `cache` when it is writable (atomically; the directory is created)."""
    if cache is None or not cache.writable:
        return
    cache.location.create()
    cache.location.write_bytes(SOURCE_INDEX_NAME, index_bytes(index))
