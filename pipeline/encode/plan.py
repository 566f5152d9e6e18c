"""Planning an encode / pack job: one task per output shard, its items packed compactly, and the resume rule.

Shard `k` holds items `k * shard_size ... (k + 1) * shard_size - 1` of the sorted source. The driver streams the
items of the source into shards (`iter_shards`) and keeps, per shard, only what a worker needs: an `ItemBlock`
(the items' paths, keys and labels, and for packed sources where their bytes are, zlib-compressed; about 7 KB
for 1000 ImageNet items instead of 120 KB of pickled `SourceItem`s) and the shard's fingerprint, which the
driver computes from the full items (`shard_fingerprint`: settings, index, and each item's path, key, label,
size and modification time or packed-shard hash).

Resume. A finished shard is one whose sidecar names it, carries this job's fingerprint and whose tar has the
recorded size. Such a shard is taken as done without reading its tar (`trusted_shard`) when, besides, its
sidecar is the one the job sealed (`record_sha256` over the other fields: an edited or damaged sidecar is not
trusted) and the tar was not modified after the sidecar was written (modification times). Anything else, and
every shard under `--verify`, goes to a worker, which re-hashes the tar against the sidecar and keeps the shard
only when the sha256 matches (`encode_shard`), else writes it again.

The functions here read OUT (a local directory or an object-store prefix) through its `Location`
(`pipeline.core.storage`); they never write. Object stores report modification times to the second, which
the rule below only compares (a tar uploaded before its sidecar never has the later time).
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.core.shards import SIDECAR_NAME_PATTERN, json_bytes, parse_sidecar, shard_name, sidecar_of
from pipeline.core.storage import FileStat, Location
from pipeline.encode.source_items import SourceItem

RECORD_CHECK = "record_sha256"  # sidecar field: sha256 of the sidecar's other fields (see `seal_sidecar`)
_BLOCK_COMPRESSION = 1  # zlib level: level 6 is 10% smaller for twice the driver time


@dataclass(frozen=True)
class ItemBlock:
    """The items of one shard as a worker needs them, in a few kilobytes (pickled through the scheduler).

    Sizes and modification times stay with the driver (they only enter the fingerprint): the items a worker
    unpacks have `size` -1 (files) or the member size (packed samples) and `mtime_ns` 0.
    """

    first_index: int
    count: int
    data: bytes

    @classmethod
    def pack(cls, items: list[SourceItem]) -> ItemBlock:
        """Pack consecutive items (their indices follow each other)."""
        rows = [
            (item.path, item.key, item.label, item.shard_file, item.member_offset, item.member_size, item.packed_meta)
            for item in items
        ]
        data = zlib.compress(pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL), _BLOCK_COMPRESSION)
        return cls(first_index=items[0].index if items else 0, count=len(items), data=data)

    def unpack(self) -> list[SourceItem]:
        """The items, numbered from `first_index`."""
        rows = pickle.loads(zlib.decompress(self.data))
        return [
            SourceItem(
                index=self.first_index + position,
                path=path,
                key=key,
                label=label,
                size=member_size if shard_file is not None else -1,
                shard_file=shard_file,
                member_offset=member_offset,
                member_size=member_size,
                packed_meta=packed_meta,
            )
            for position, (path, key, label, shard_file, member_offset, member_size, packed_meta) in enumerate(rows)
        ]


@dataclass
class ShardTask:
    """Everything one worker needs to produce one shard (pickled to the worker)."""

    index: int
    block: ItemBlock
    root: str
    out: str
    kind: str
    resolution: int
    max_pixels: int
    batch_size: int
    fingerprint: str
    vae_path: str | None
    dtype: str
    device: str
    torch_threads: int | None
    progress_topic: str | None
    keep_images: bool = False  # latents: also store each crop as a PNG member (`encode --keep-images`)
    targets: Any = None  # latents: a `pipeline.encode.targets.TargetsSpec` (`encode --encoder-targets`), or None

    @property
    def count(self) -> int:
        """Number of items of this shard."""
        return self.block.count


def iter_shards(items: Iterable[SourceItem], shard_size: int) -> Iterator[list[SourceItem]]:
    """Consecutive shards of `shard_size` items (the last one may be shorter), taken from an item stream."""
    stream = iter(items)
    while shard := list(itertools.islice(stream, shard_size)):
        yield shard


def shard_fingerprint(settings: dict[str, Any], index: int, items: list[SourceItem]) -> str:
    """sha256 of what determines a shard's content: job settings, shard index and its items' identities."""
    digest = hashlib.sha256(json_bytes(settings))
    digest.update(json_bytes([index, [item.fingerprint_fields() for item in items]]))
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Resume


def _record_digest(sidecar: dict[str, Any]) -> str:
    """sha256 of a sidecar's fields other than `record_sha256`, in canonical JSON."""
    return hashlib.sha256(json_bytes({k: v for k, v in sidecar.items() if k != RECORD_CHECK})).hexdigest()


def seal_sidecar(sidecar: dict[str, Any]) -> dict[str, Any]:
    """The sidecar with `record_sha256` added: what a job writes once its shard is complete."""
    return {**sidecar, RECORD_CHECK: _record_digest(sidecar)}


def _shard_number(name: str) -> int:
    """The index in a sidecar file name: `shard-000042.json` → 42."""
    return int(name[len("shard-") :].split(".")[0])


def read_sidecars(out: Location) -> dict[int, dict[str, Any] | None]:
    """The sidecars in `out` by shard index (None: a sidecar file that is unreadable or names another shard).
    Object stores fetch them in concurrent batches, not one request after the other."""
    out = Location.of(out)
    names = [name for name in out.names() if SIDECAR_NAME_PATTERN.fullmatch(name)]
    found = out.read_many(names)
    return {
        _shard_number(name): None
        if found[name] is None
        else parse_sidecar(found[name], shard_name(_shard_number(name)))
        for name in names
    }


def trusted_shard(stats: dict[str, FileStat], sidecar: dict[str, Any], fingerprint: str) -> bool:
    """True when the finished shard of `sidecar` can be taken as done without re-hashing its tar: same
    fingerprint (items, sizes, modification times, settings), the sidecar is sealed and unchanged, the tar is a
    file of the recorded size, and it was not modified after its sidecar was written (`stats`: the files of
    OUT, `Location.stats`)."""
    if sidecar.get("fingerprint") != fingerprint or sidecar.get(RECORD_CHECK) != _record_digest(sidecar):
        return False
    tar, record = stats.get(sidecar["name"]), stats.get(sidecar_of(sidecar["name"]))
    if tar is None or record is None or not tar.regular or tar.mtime_ns is None or record.mtime_ns is None:
        return False
    return tar.size == sidecar["bytes"] and tar.mtime_ns <= record.mtime_ns


def trusted_shards(
    out: Location, tasks: list[ShardTask], sidecars: dict[int, dict[str, Any] | None]
) -> dict[int, dict[str, Any]]:
    """The sidecars of the shards of `tasks` that resume can keep without reading them (`trusted_shard`)."""
    trusted = {}
    stats = Location.of(out).stats() if any(sidecars.values()) else {}
    for task in tasks:
        sidecar = sidecars.get(task.index)
        if sidecar is not None and trusted_shard(stats, sidecar, task.fingerprint):
            trusted[task.index] = sidecar
    return trusted
