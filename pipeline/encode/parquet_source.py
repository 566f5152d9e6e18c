"""Hugging Face style parquet shards as an image source (`imagenet-1k`: an `image` struct with `bytes`, an integer
`label`), read with pyarrow one row group at a time, never a whole file.

The index pass reads each file's footer and its `label` column only (one row group at a time); an item is
(file, row group, row). A worker reads the `image` column of one row group and keeps the last few row groups it
read (`_ROW_GROUPS_KEPT`), so a shard's consecutive rows cost one read per row group. Items are ordered by file
name, then row; their relative path is `FILE_STEM/ROW` (row within the file, 8 digits). The label map comes from
the file's Hugging Face metadata (`features.label.names`, ImageNet's 1000 class names in the 0-999 order) when it
has one, else classes are named "0" ... "max". A row whose image bytes are missing or whose label is null is a
failure with the reason.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator

from pipeline.core.storage import is_url, local_path, reading, url_to_fs
from pipeline.encode.archives import Group, Member, identify
from pipeline.encode.member_index import IndexCache
from pipeline.encode.source_items import SourceError, SourceScan

_ROW_GROUPS_KEPT = 4  # per worker process: the prefetch threads read neighbouring batches
_kept: OrderedDict[tuple[str, int], list] = OrderedDict()
_kept_lock = threading.Lock()


def list_parquet(location: str) -> list[str]:
    """The .parquet files of a source: the file itself, or those in a directory / prefix (recursively), sorted."""
    if location.endswith(".parquet"):
        return [location]
    if is_url(location):
        fs, path = url_to_fs(location)
        fs.invalidate_cache(path)
        found = [name for name in fs.find(path) if name.endswith(".parquet")]
        protocol = location.split("://", 1)[0]
        return sorted(f"{protocol}://{name}" for name in found)
    root = local_path(location)
    found = [os.path.join(d, n) for d, _, files in os.walk(root) for n in files if n.endswith(".parquet")]
    return sorted(found)


def _open(location: str):
    import pyarrow.parquet as pq

    if is_url(location):
        fs, path = url_to_fs(location)
        return pq.ParquetFile(fs.open(path, "rb"))
    return pq.ParquetFile(location)


def _class_names(parquet) -> list[str] | None:
    """`features.label.names` of the Hugging Face metadata in the file's schema, if any."""
    metadata = parquet.schema_arrow.metadata or {}
    try:
        info = json.loads(metadata[b"huggingface"])
        names = info["info"]["features"]["label"]["names"]
    except (KeyError, ValueError, TypeError):
        return None
    return [str(name) for name in names] if isinstance(names, list) else None


def _file_members(location: str, labels: dict[str, int]) -> list[Member]:
    """One member per row: (row group, row in the group) as (offset, size); the label column read group by group."""
    parquet = _open(location)
    if "image" not in parquet.schema_arrow.names or "label" not in parquet.schema_arrow.names:
        raise SourceError(f"{location} has no `image` and `label` columns (the Hugging Face image dataset schema)")
    names = _class_names(parquet)
    if names and not labels:
        labels.update({name: i for i, name in enumerate(names)})
    members, row = [], 0
    for group in range(parquet.num_row_groups):
        for position, label in enumerate(parquet.read_row_group(group, columns=["label"]).column(0).to_pylist()):
            problem = None if isinstance(label, int) and label >= 0 else f"{location} row {row}: label is {label!r}"
            members.append(Member(f"{row:08d}", group, position, label if problem is None else -1, problem))
            if problem is None and not names:
                for value in range(len(labels), label + 1):
                    labels[str(value)] = value
            row += 1
    return members


def open_parquet(location: str, limit: int | None, cache: IndexCache | None) -> SourceScan:
    """Parquet shards in the Hugging Face image schema (see the module docstring)."""
    from pipeline.encode.archive_sources import _indexed

    files = list_parquet(location)
    if not files:
        raise SourceError(f"no .parquet file in {location}")
    identities = [identify(name) for name in files]

    def build(ignored: list[str], labels: dict[str, int]) -> Iterator[Group]:
        for name in files:
            stem = os.path.basename(name)[: -len(".parquet")]
            yield Group(stem, name, _file_members(name, labels))

    return _indexed(location.rstrip("/"), "parquet", identities, cache, limit, build)


def _row_group_images(location: str, group: int) -> list:
    """The `image` values of one row group, kept for the next rows (thread-safe, a few groups per process)."""
    with _kept_lock:
        if (location, group) in _kept:
            _kept.move_to_end((location, group))
            return _kept[(location, group)]
    with reading(location):
        images = _open(location).read_row_group(group, columns=["image"]).column(0).to_pylist()
    with _kept_lock:
        _kept[(location, group)] = images
        while len(_kept) > _ROW_GROUPS_KEPT:
            _kept.popitem(last=False)
    return images


def read_row(location: str, group: int, position: int, problem: str | None = None) -> bytes:
    """The image bytes of one row (OSError with the reason when the row has none, or the index's `problem`)."""
    if problem is not None:
        raise OSError(problem)
    try:
        image = _row_group_images(location, group)[position]
    except (ValueError, IndexError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise OSError(f"{location} row group {group}: {error}") from error
    data = image.get("bytes") if isinstance(image, dict) else None
    if not data:
        raise OSError(f"{location} row group {group} row {position}: no image bytes")
    return data
