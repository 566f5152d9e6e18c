"""The member index of an archive source, cached beside the output so that a resumed run plans without reading
the archive again.

An index is the list of `Group`s of `pipeline.encode.archives` (every image's archive file, offset, size, label,
problem), the label map, what the walk ignored, and the identities (location, size, mtime) of the archive files it
was built from. It is stored as one `.npz` (numpy arrays, never pickles: the file is read back as data) in OUT
under `SOURCE_INDEX_NAME`, written atomically through OUT's `Location`. A cached index is used only when its
layout and every archive identity match the source now; anything else (a changed archive, another source, a
damaged file) is logged and the archive is indexed again.

1.28M members take about 30 MB (names as one NUL-separated blob, offsets / sizes / labels as arrays).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.core.storage import Location
from pipeline.encode.archives import ArchiveIdentity, Group, Member
from pipeline.encode.source_items import keys_per_directory

logger = logging.getLogger(__name__)

SOURCE_INDEX_NAME = "source-index.npz"
INDEX_VERSION = 2  # 2: the sample keys are stored (a resumed plan does not recompute 1.28M keys)


@dataclass
class MemberIndex:
    """A complete index of an archive source (see the module docstring)."""

    layout: str
    identities: list[ArchiveIdentity]
    label_map: dict[str, int]
    groups: list[Group]
    ignored: list[str]

    def header(self) -> dict[str, Any]:
        """What must match for the cache to be used."""
        return {
            "version": INDEX_VERSION,
            "layout": self.layout,
            "identities": [identity.as_json() for identity in self.identities],
        }


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


def index_from_bytes(data: bytes) -> MemberIndex:
    """Parse an .npz written by `index_bytes` (ValueError / KeyError when it is not one)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
        blob = arrays["names"].tobytes().decode("utf-8", "surrogateescape")
        names = blob.split("\0") if blob or meta["groups"] else []
        key_blob = arrays["keys"].tobytes().decode("ascii")
        keys = key_blob.split("\0") if key_blob or meta["groups"] else []
        offsets, sizes, labels = arrays["offsets"].tolist(), arrays["sizes"].tolist(), arrays["labels"].tolist()
    count = sum(g[2] for g in meta["groups"])
    if not len(names) == len(keys) == len(offsets) == len(sizes) == len(labels) == count:
        raise ValueError("the index arrays have different lengths")
    problems: list[str | None] = [None] * count
    for position, problem in meta["problems"].items():
        problems[int(position)] = problem
    groups, start = [], 0
    for prefix, location, size in meta["groups"]:
        stop = start + size
        members = list(map(Member, names[start:stop], offsets[start:stop], sizes[start:stop], labels[start:stop],
                           problems[start:stop]))  # fmt: skip
        groups.append(Group(prefix, location, members, keys[start:stop]))
        start = stop
    identities = [ArchiveIdentity(**identity) for identity in meta["identities"]]
    return MemberIndex(meta["layout"], identities, meta["label_map"], groups, meta["ignored"])


@dataclass
class IndexCache:
    """Where a source's member index is kept (OUT), and whether a new one may be written there (not by a dry
    run, which writes nothing)."""

    location: Location
    writable: bool = True


def load_cached_index(cache: IndexCache | None, layout: str, identities: list[ArchiveIdentity]) -> MemberIndex | None:
    """The index cached in `cache` when it was built from these very archive files, else None (logged)."""
    if cache is None:
        return None
    try:
        data = cache.location.read_bytes(SOURCE_INDEX_NAME)
    except FileNotFoundError:
        return None
    try:
        index = index_from_bytes(data)
    except (ValueError, KeyError, OSError) as error:
        where = cache.location.join(SOURCE_INDEX_NAME)
        logger.warning("ignoring the unreadable source index %s (%s); indexing again", where, error)
        return None
    wanted = {"version": INDEX_VERSION, "layout": layout, "identities": [i.as_json() for i in identities]}
    if index.header() != wanted:
        logger.info("the source index in %s was built from other archive files; indexing again", cache.location)
        return None
    return index


def save_index(cache: IndexCache | None, index: MemberIndex) -> None:
    """Write the index into `cache` when it is writable (atomically; the directory is created)."""
    if cache is None or not cache.writable:
        return
    cache.location.create()
    cache.location.write_bytes(SOURCE_INDEX_NAME, index_bytes(index))
