"""Hugging Face style parquet shards as an image source (`imagenet-1k`: an `image` struct with `bytes`, an integer
`label`), read with pyarrow one row group at a time, never a whole file.

The index pass reads each file's footer and its `label` column only (one row group at a time); an item is
(file, row group, row). A worker reads the `image` column of one row group and keeps the last few row groups it
read (`_ROW_GROUPS_KEPT`), so a shard's consecutive rows cost one read per row group. Items are ordered by file
name, then row; their relative path is `FILE_STEM/ROW` (row within the file, 8 digits). The label map comes from
the file's Hugging Face metadata (`features.label.names`, ImageNet's 1000 class names in the 0-999 order) when it
has one, else classes are named "0" ... "max". A row whose image bytes are missing or whose label is null is a
failure with the reason.

A parquet file is untrusted: what it declares is checked from its footer before anything is read for it. A row
group's `image` and `label` column chunks may not inflate to more than `MAX_INFLATION` times their stored size
past `INFLATION_FLOOR` (a cell of 200 MB of zeros stored in 7 KB is refused; encoded images barely compress), a
file may not declare more rows than it has bytes (run-length encoding lets a few bytes declare a billion rows; a
real row holds an encoded image), and a label must be below the label map's size (or `MAX_CLASSES`). Columns are
read in batches of a bounded number of rows. A file that is not parquet, or breaks one of these, is one
SourceError naming it. (pyarrow sizes a page's buffer from the page header; the footer's column sizes are what
can be checked before reading.)
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator

from pipeline.core.errors import one_line
from pipeline.core.storage_io import is_url, local_path, reading, url_to_fs
from pipeline.encode.archives import Group, Member, identify
from pipeline.encode.member_index import IndexCache
from pipeline.encode.source_items import MAX_CLASSES, SourceError, SourceScan, check_label

_ROW_GROUPS_KEPT = 4  # per worker process: the prefetch threads read neighbouring batches
MAX_INFLATION = 32  # declared uncompressed bytes per stored byte of a column chunk (images barely compress)
INFLATION_FLOOR = 32 << 20  # a column chunk may inflate to this much whatever its ratio
_BATCH_ROWS = {"label": 1 << 16, "image": 16}  # rows read at once from one column
_COLUMNS = ("image", "label")
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
    """The `ParquetFile` of `location` (its footer read); SourceError naming the file when it is not parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if is_url(location):
            fs, path = url_to_fs(location)
            return pq.ParquetFile(fs.open(path, "rb"))
        return pq.ParquetFile(location)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, ValueError, OSError) as error:
        raise SourceError(f"{location}: not a readable parquet file ({one_line(error)})") from error


def check_row_group(parquet, location: str, group: int) -> None:
    """SourceError when a needed column chunk of row group `group` declares more uncompressed bytes than
    `MAX_INFLATION` times its stored bytes and more than `INFLATION_FLOOR`: checked from the footer, before the row
    group is read."""
    meta = parquet.metadata.row_group(group)
    for index in range(meta.num_columns):
        column = meta.column(index)
        if column.path_in_schema.split(".")[0] not in _COLUMNS:
            continue
        stored, inflated = column.total_compressed_size, column.total_uncompressed_size
        if inflated > INFLATION_FLOOR and inflated > MAX_INFLATION * max(stored, 1):
            raise SourceError(
                f"{location}: row group {group} column {column.path_in_schema} declares {inflated} bytes "
                f"uncompressed from {stored} stored (more than {MAX_INFLATION}x and {INFLATION_FLOOR >> 20} MiB: "
                "refused as a compression bomb)"
            )


def _check_file(parquet, location: str, size: int) -> None:
    """SourceError when the file (of `size` bytes) declares more rows than it has bytes, or a row group that
    inflates too far."""
    rows = parquet.metadata.num_rows
    if rows > size:
        raise SourceError(
            f"{location}: declares {rows} rows in {size} bytes (every row of an image dataset holds an encoded "
            "image): refused"
        )
    for group in range(parquet.num_row_groups):
        check_row_group(parquet, location, group)


def _column_batches(parquet, location: str, group: int, column: str) -> Iterator[list]:
    """The values of one column of one row group, as lists of at most `_BATCH_ROWS[column]` values."""
    import pyarrow as pa

    try:
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS[column], row_groups=[group], columns=[column]):
            yield batch.column(0).to_pylist()
    except (pa.ArrowException, ValueError, OSError) as error:
        if isinstance(error, SourceError):
            raise
        raise SourceError(
            f"{location}: row group {group} column {column} cannot be read ({one_line(error)})"
        ) from error


def _class_names(parquet) -> list[str] | None:
    """`features.label.names` of the Hugging Face metadata in the file's schema, if any."""
    metadata = parquet.schema_arrow.metadata or {}
    try:
        info = json.loads(metadata[b"huggingface"])
        names = info["info"]["features"]["label"]["names"]
    except (KeyError, ValueError, TypeError, RecursionError):
        return None
    return [str(name) for name in names] if isinstance(names, list) else None


def _file_members(location: str, size: int, labels: dict[str, int]) -> list[Member]:
    """One member per row: (row group, row in the group) as (offset, size); the label column read in batches."""
    parquet = _open(location)
    if "image" not in parquet.schema_arrow.names or "label" not in parquet.schema_arrow.names:
        raise SourceError(f"{location} has no `image` and `label` columns (the Hugging Face image dataset schema)")
    _check_file(parquet, location, size)
    names = _class_names(parquet)
    if names and len(names) > MAX_CLASSES:
        raise SourceError(f"{location}: its metadata names {len(names)} classes, more than MAX_CLASSES = {MAX_CLASSES}")
    if names and not labels:
        labels.update({name: i for i, name in enumerate(names)})
    members, row = [], 0
    for group in range(parquet.num_row_groups):
        position = 0
        for batch in _column_batches(parquet, location, group, "label"):
            for label in batch:
                ok = isinstance(label, int) and not isinstance(label, bool) and label >= 0
                if ok:  # bounded before the label map grows for it
                    check_label(label, f"{location} row {row}", len(labels) if names else None)
                problem = None if ok else f"{location} row {row}: label is {label!r}"
                members.append(Member(f"{row:08d}", group, position, label if ok else -1, problem))
                if ok and not names:
                    for value in range(len(labels), label + 1):
                        labels[str(value)] = value
                row += 1
                position += 1
    return members


def open_parquet(location: str, limit: int | None, cache: IndexCache | None) -> SourceScan:
    """Parquet shards in the Hugging Face image schema (see the module docstring)."""
    from pipeline.encode.archive_sources import _indexed

    files = list_parquet(location)
    if not files:
        raise SourceError(f"no .parquet file in {location}")
    identities = [identify(name) for name in files]

    def build(ignored: list[str], labels: dict[str, int]) -> Iterator[Group]:
        for name, identity in zip(files, identities):
            stem = os.path.basename(name)[: -len(".parquet")]
            yield Group(stem, identity.location, _file_members(identity.location, identity.size, labels))

    return _indexed(location.rstrip("/"), "parquet", identities, cache, limit, build, row_counts=row_group_rows)


def row_group_rows(location: str) -> list[int]:
    """The number of rows of each row group of a parquet file (its footer): what a cached index is checked
    against."""
    parquet = _open(location)
    return [parquet.metadata.row_group(group).num_rows for group in range(parquet.num_row_groups)]


def _row_group_images(location: str, group: int) -> list:
    """The `image` values of one row group, kept for the next rows (thread-safe, a few groups per process)."""
    with _kept_lock:
        if (location, group) in _kept:
            _kept.move_to_end((location, group))
            return _kept[(location, group)]
    with reading(location):
        parquet = _open(location)
        if not 0 <= group < parquet.num_row_groups:
            raise ValueError(f"no row group {group} (the file has {parquet.num_row_groups})")
        check_row_group(parquet, location, group)
        images = [image for batch in _column_batches(parquet, location, group, "image") for image in batch]
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
    except (ValueError, IndexError) as error:  # pyarrow's ArrowInvalid and SourceError are ValueErrors
        raise OSError(f"{location} row group {group}: {error}") from error
    data = image.get("bytes") if isinstance(image, dict) else None
    if not data:
        raise OSError(f"{location} row group {group} row {position}: no image bytes")
    return data
