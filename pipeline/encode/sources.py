"""Image sources of the encode / pack stage: what items a dataset holds, in which order, with which labels.

Three layouts are understood:

- **class folders** (ImageNet train: `root/n01440764/*.JPEG`, or any tree of one folder per class): the class
  index of an image is the position of its top-level folder in the sorted list of folder names, so the label
  map of ImageNet is the usual synset order; images may sit at any depth below their class folder;
- **flat folder** (only files directly under `root`): no labels, every item gets class -1 (unconditional);
- **packed shards** (a directory written by `diffit-pipe pack`, recognised by its `manifest.json` of kind
  "images"): the items are the packed samples, with the labels and label map recorded at packing time, so
  `encode` can run from packed shards.

Items are ordered by their relative path (packed shards: by shard, then position inside the shard). The order
and the item keys depend only on the source, never on timing or on the number of workers, which is what makes
shard `k` hold the same items on every run.

`open_source(root, limit)` lists the top level only and returns a `SourceScan` whose `items` are produced lazily,
in that order, while the tree is walked (directories in sorted order, each listed once): a job streams them into
shards without holding 1.28M item objects, and `limit=N` stops the walk once the first N items are known, so
`--limit 64` on ImageNet lists a class folder or two instead of the whole tree. `scan_source` is the same walk
collected into a list. A key depends only on the files of its own directory (see `_FolderWalk`), so the first N
items and their keys are the same whether the walk stops after them or runs to the end.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from stat import S_ISREG
from typing import Any

from pipeline.core.manifest import MANIFEST_NAME, load_manifest
from pipeline.core.storage_io import open_regular_file
from pipeline.encode.source_items import (
    Source,
    SourceError,
    SourceItem,
    SourceScan,
    unique_keys,
)

logger = logging.getLogger(__name__)

_PACKED_KEY = re.compile(r"[A-Za-z0-9_\-]+(?:/[A-Za-z0-9_\-]+)*", re.ASCII)
_MAX_PACKED_KEY_LENGTH = 200
_MAX_SMALL_MEMBER_BYTES = 1 << 20  # a cls or json member is a few bytes; never read more than this into memory


def _is_hidden(name: str) -> bool:
    """Hidden files and folders (`.DS_Store`, `.ipynb_checkpoints`) are not dataset items."""
    return name.startswith(".")


def _directory_identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """(device, inode) of the directory `path` leads to (links followed), or None when it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


def _list_directory(directory: Path) -> list[os.DirEntry]:
    """The entries of one directory (SourceError naming it when it cannot be listed)."""
    try:
        with os.scandir(directory) as entries:
            return list(entries)
    except OSError as error:
        raise SourceError(f"cannot list {error.filename or directory}: {error.strerror or error}") from error


def _stat_or_none(path: str) -> os.stat_result | None:
    """The stat of `path` (links followed); None for a dangling link or a vanished file, which stays an item
    whose read fails later with a reason."""
    try:
        return os.stat(path)
    except OSError:
        return None


class _FolderWalk:
    """The non-hidden regular files below some directories, produced in sorted relative-path order.

    Each directory is listed once, when the walk reaches it. Its sub-directories are then marked as listed in
    name order, so a link to a directory that is (or will be) walked under another path is skipped and recorded
    in `ignored` (a loop such as `a/loop -> ..` ends; the root and the class folders are marked up front). The
    directory's files and sub-directories are visited in the order of their relative paths (a folder `x` sorts
    as `x/`), which makes the produced order the sorted order of all relative paths. Hidden entries, FIFOs and
    devices go to `ignored`.

    Keys are made unique among the files of one directory (`unique_keys`): keys that could collide (`a.jpg`,
    `a.png`) always share a directory, and a file's key then depends only on its own directory, whatever part
    of the tree is walked. A file reached by a second path (a file link, a hard link, a linked directory) is one
    item, under the first of its paths in sorted order (`duplicates` counts the others).
    """

    def __init__(self, root: Path, ignored: list[str], listed: set[tuple[int, int]]):
        self.root = root
        self.ignored = ignored
        self.listed = listed
        self.seen: set[int | str] = set()  # identities of the files produced: (device << 64) | inode
        self.special: list[str] = []
        self.duplicates = 0

    def files(self, directory: Path, prefix: str) -> Iterator[tuple[str, str, os.stat_result | None]]:
        """(relative path, key, stat) of every file below `directory` (`prefix`: its relative path + "/")."""
        files, subdirectories = self._classify(directory, prefix)
        keys = unique_keys([prefix + name for name, _ in files]) if files else []
        entries = [(name, stat, key) for (name, stat), key in zip(files, keys)]
        entries += [(name + "/", None, None) for name in subdirectories]
        for name, stat, key in sorted(entries, key=lambda entry: entry[0]):
            if key is None:
                yield from self.files(directory / name[:-1], prefix + name)
            elif self._first_path(prefix + name, stat):
                yield prefix + name, key, stat

    def _classify(self, directory: Path, prefix: str) -> tuple[list[tuple[str, os.stat_result | None]], list[str]]:
        """The files (name, stat) and the sub-directories to walk of one directory, in name order."""
        files, subdirectories = [], []
        for entry in sorted(_list_directory(directory), key=lambda entry: entry.name):
            is_directory = entry.is_dir()  # links followed; False for a dangling link
            if is_directory:
                identity = _directory_identity(entry.path)
                if _is_hidden(entry.name) or identity in self.listed:
                    self.ignored.append(prefix + entry.name + "/")
                    continue
                if identity is not None:
                    self.listed.add(identity)
                subdirectories.append(entry.name)
            elif _is_hidden(entry.name):
                self.ignored.append(prefix + entry.name)
            else:
                stat = _stat_or_none(entry.path)
                if stat is not None and not S_ISREG(stat.st_mode):
                    self.ignored.append(prefix + entry.name)  # a FIFO, socket or device (a link to /dev/zero)
                    self.special.append(prefix + entry.name)
                    continue
                files.append((entry.name, stat))
        return files, subdirectories

    def _first_path(self, relative: str, stat: os.stat_result | None) -> bool:
        """True the first time a real file is reached; a dangling link is identified by its resolved path."""
        identity = (stat.st_dev << 64) | stat.st_ino if stat is not None else os.path.realpath(self.root / relative)
        if identity in self.seen:
            self.ignored.append(relative)
            self.duplicates += 1
            return False
        self.seen.add(identity)
        return True

    def report(self) -> None:
        """Log what the walk left out (once, at its end)."""
        if self.special:
            logger.warning(
                "ignored %d entries under %s that are not regular files (first: %s)",
                len(self.special),
                self.root,
                self.special[0],
            )
        if self.duplicates:
            logger.warning(
                "%d path(s) under %s lead to files already listed under another path (links); each file is used once",
                self.duplicates,
                self.root,
            )


def _source_root(root: str | os.PathLike) -> Path:
    """The absolute source directory; SourceError when it is missing or not a directory."""
    root_path = Path(root).expanduser().resolve()
    if not root_path.exists():
        raise SourceError(f"source {root} does not exist")
    if not root_path.is_dir():
        raise SourceError(f"source {root} is not a directory")
    return root_path


def _folder_items(
    walk: _FolderWalk, tops: list[tuple[str, int]], limit: int | None, ignored: list[str]
) -> Iterator[SourceItem]:
    """The items of the walk over the top folders `tops` (name, label; "" = the root itself), numbered in order,
    stopping after `limit` items."""
    count = 0
    # Folder `x` holds the paths that start with `x/`: visiting the tops by that string keeps the order sorted.
    for name, label in sorted(tops, key=lambda top: top[0] + "/"):
        prefix = name + "/" if name else ""
        for relative, key, stat in walk.files(walk.root / name if name else walk.root, prefix):
            yield SourceItem(
                index=count,
                path=relative,
                key=key,
                label=label,
                size=stat.st_size if stat else -1,
                mtime_ns=stat.st_mtime_ns if stat else 0,
            )
            count += 1
            if count == limit:
                break
        if count == limit:
            break
    walk.report()
    if count == 0:
        raise SourceError(f"no image files found under {walk.root} (expected class folders or image files)")
    if ignored:
        logger.info("ignored %d hidden or loose entries under %s", len(ignored), walk.root)


def open_folder(root: str | os.PathLike, limit: int | None = None) -> SourceScan:
    """Open an image folder (class folders or flat): the label map now, the items as they are walked."""
    root_path = _source_root(root)
    entries = sorted(_list_directory(root_path), key=lambda entry: entry.name)
    ignored: list[str] = []
    class_dirs = [e.name for e in entries if e.is_dir() and not _is_hidden(e.name)]
    if class_dirs:
        layout = "class-folders"
        label_map = {name: index for index, name in enumerate(class_dirs)}
        loose = [e.name for e in entries if not e.is_dir() and not _is_hidden(e.name)]
        if loose:
            logger.warning(
                "%d file(s) directly under %s are not in a class folder and are ignored (first: %s)",
                len(loose),
                root_path,
                ", ".join(loose[:5]),
            )
            ignored.extend(loose)
        # The root and every class folder are walked on their own: a link to one of them is never followed.
        listed = {_directory_identity(path) for path in [root_path, *(root_path / name for name in class_dirs)]}
        listed.discard(None)
        tops = list(label_map.items())
    else:
        layout, label_map, tops = "flat", {}, [("", -1)]
        listed = {_directory_identity(root_path)} - {None}
    walk = _FolderWalk(root_path, ignored, listed)
    items = _folder_items(walk, tops, limit, ignored)
    return SourceScan(str(root_path), layout, label_map, items, ignored, limit=limit)


def _collect(scan: SourceScan) -> Source:
    """A SourceScan walked to its end (or its limit) into a Source with an item list."""
    items = list(scan.items)
    return Source(scan.root, scan.layout, items, scan.label_map, scan.ignored, scan.packed_manifest, scan.limit)


def scan_folder(root: str | os.PathLike, limit: int | None = None) -> Source:
    """Scan an image folder (class folders or flat) into a Source with sorted items and a label map."""
    return _collect(open_folder(root, limit))


def open_packed(root: str | os.PathLike, limit: int | None = None) -> SourceScan:
    """Open packed raw-image shards (output of `pack`): the samples are indexed shard by shard as they are
    iterated (member offsets, labels, json), and only the shards that hold the first `limit` samples are read."""
    root_path = Path(root).expanduser().resolve()
    manifest = load_manifest(root_path)
    if manifest.get("kind") != "images":
        raise SourceError(
            f"{root_path / MANIFEST_NAME} describes a dataset of kind {manifest.get('kind')!r}; only raw image "
            "shards written by `diffit-pipe pack` can be a source"
        )
    label_map = dict(manifest.get("label_map", {}))
    return SourceScan(
        str(root_path), "shards", label_map, _packed_items(root_path, manifest, limit), [], manifest, limit
    )


def _packed_items(root_path: Path, manifest: dict[str, Any], limit: int | None) -> Iterator[SourceItem]:
    """The samples of the packed shards listed in `manifest`, in order, up to `limit`."""
    count = 0
    for shard in manifest["shards"]:
        shard_path = root_path / shard["name"]
        if not shard_path.is_file():
            raise SourceError(f"packed shard {shard_path} listed in the manifest is missing")
        if shard_path.stat().st_size != shard["bytes"]:
            raise SourceError(
                f"packed shard {shard_path} has {shard_path.stat().st_size} bytes but the manifest says "
                f"{shard['bytes']}; run `diffit-pipe inspect {root_path} --verify`"
            )
        for item in _index_packed_shard(shard_path, shard["sha256"], count, manifest["num_classes"]):
            yield item
            count += 1
            if count == limit:
                return
    if count != manifest["counts"]["written"]:
        raise SourceError(
            f"packed shards under {root_path} hold {count} samples but the manifest says "
            f"{manifest['counts']['written']}"
        )


def scan_packed(root: str | os.PathLike, limit: int | None = None) -> Source:
    """List the samples of packed raw-image shards (output of `pack`) as items with member offsets."""
    return _collect(open_packed(root, limit))


def _packed_members(shard_path: Path) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The sample keys of one packed shard in order, and per key: the PNG member's (offset, size) and the
    bytes of the small cls / json members."""
    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    try:
        with tarfile.open(shard_path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, extension = member.name.partition(".")
                if len(key) > _MAX_PACKED_KEY_LENGTH or not _PACKED_KEY.fullmatch(key):
                    raise SourceError(f"packed shard {shard_path}: member {member.name!r} has an unsafe sample key")
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                if extension == "png":
                    samples[key]["png"] = (member.offset_data, member.size)
                elif extension in ("cls", "json"):
                    if member.size > _MAX_SMALL_MEMBER_BYTES:
                        raise SourceError(f"packed shard {shard_path}: member {member.name!r} is {member.size} bytes")
                    samples[key][extension] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as error:
        raise SourceError(f"cannot read packed shard {shard_path}: {error}") from error
    return order, samples


def _is_number_list(value: Any, length: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def _packed_label_and_meta(sample: dict[str, Any], num_classes: int, where: str) -> tuple[int, dict[str, Any]]:
    """The label (-1, or a class index of the packed dataset) and the json record of one packed sample; the
    record's crop box and original size, used to map crops back to the original, must be numbers."""
    try:
        label = int(sample["cls"].decode("ascii"))
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as error:
        raise SourceError(f"{where} has an unreadable cls/json member: {error}") from error
    if not (label == -1 or 0 <= label < num_classes):
        raise SourceError(f"{where} has the label {label}, outside the dataset's {num_classes} classes")
    if not isinstance(meta, dict):
        raise SourceError(f"{where}: its json member is not an object")
    if "crop_box" in meta and not _is_number_list(meta["crop_box"], 4):
        raise SourceError(f"{where}: json crop_box {meta['crop_box']!r} is not 4 numbers")
    if "original_size" in meta and not (
        _is_number_list(meta["original_size"], 2) and all(v > 0 for v in meta["original_size"])
    ):
        raise SourceError(f"{where}: json original_size {meta['original_size']!r} is not 2 positive numbers")
    return label, meta


def _index_packed_shard(shard_path: Path, shard_sha256: str, start: int, num_classes: int) -> list[SourceItem]:
    """Read the member headers of one packed shard (and its small cls/json members) into items."""
    order, samples = _packed_members(shard_path)
    items = []
    for key in order:
        sample = samples[key]
        missing = {"png", "cls", "json"} - set(sample)
        if missing:
            raise SourceError(f"sample {key!r} in {shard_path} lacks member(s) {sorted(missing)}")
        label, meta = _packed_label_and_meta(sample, num_classes, f"sample {key!r} in {shard_path}")
        offset, size = sample["png"]
        items.append(
            SourceItem(
                index=start + len(items),
                path=f"{shard_path.name}#{key}",
                key=key,
                label=label,
                size=size,
                mtime_ns=0,
                shard_file=str(shard_path),
                member_offset=offset,
                member_size=size,
                packed_meta=meta,
                # The shard hash stands in for the modification time: resume redoes work when the input changed.
                shard_sha256=shard_sha256,
            )
        )
    return items


SOURCE_FORMATS = ("auto", "folder", "shards", "imagenet-train", "imagenet-val", "webdataset", "parquet")


def detect_format(root: str) -> str:
    """The format of a source (see `SOURCE_FORMATS`) from what it holds: packed shards (`manifest.json`),
    parquet files, WebDataset tars (a directory or URL prefix of `.tar` files), a tar (train archive when its
    members are `nXXXXXXXX.tar`, validation archive when they are `ILSVRC2012_val_*.JPEG`, else WebDataset), else
    an image folder."""
    from pipeline.core.storage_io import is_url

    if root.endswith(".parquet"):
        return "parquet"
    if is_url(root):
        if root.endswith(".tar"):
            from pipeline.encode.archive_sources import looks_like

            return looks_like(root) or "webdataset"
        from pipeline.encode.archive_sources import list_tars

        return "webdataset" if list_tars(root) else "parquet"
    path = Path(root).expanduser()
    if path.is_file():
        from pipeline.encode.archive_sources import looks_like

        found = looks_like(str(path))
        if found is None:
            raise SourceError(f"source {root} is not a directory, a tar archive or a .parquet file")
        return found
    if (path / MANIFEST_NAME).is_file():
        return "shards"
    if path.is_dir():
        names = [name for name in os.listdir(path) if not _is_hidden(name)]
        files = [name for name in names if (path / name).is_file()]
        if files and len(files) == len(names):
            if all(name.endswith(".parquet") for name in files):
                return "parquet"
            if any(name.endswith(".tar") for name in files) and not any(_looks_like_image(n) for n in files):
                return "webdataset"  # img2dataset also writes .parquet / _stats.json files beside its tars
    return "folder"


def _looks_like_image(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def open_source(
    root: str | os.PathLike,
    limit: int | None = None,
    source_format: str = "auto",
    labels: str | None = None,
    index_cache=None,
) -> SourceScan:
    """Open any supported source for streaming; its items stop after the first `limit`.

    `source_format`: one of `SOURCE_FORMATS` ("auto": `detect_format`). `labels`: the devkit or
    LOC_val_solution.csv of the ImageNet validation archive. `index_cache`: a `Location` (OUT) where archive and
    parquet sources keep their member index (read, and written after a complete walk; None: not cached)."""
    root = os.fspath(root)
    if source_format not in SOURCE_FORMATS:
        raise SourceError(f"--source-format must be one of {', '.join(SOURCE_FORMATS)}, got {source_format!r}")
    if source_format == "auto":
        source_format = detect_format(root)
    if labels is not None and source_format != "imagenet-val":
        raise SourceError(f"--labels is for the ImageNet validation archive, not a {source_format} source")
    if source_format == "shards":
        return open_packed(root, limit)
    if source_format == "folder":
        return open_folder(root, limit)
    from pipeline.encode import archive_sources

    location = _archive_location(root, need_file=source_format.startswith("imagenet-"))
    if source_format == "imagenet-train":
        return archive_sources.open_train_archive(location, limit, index_cache)
    if source_format == "imagenet-val":
        return archive_sources.open_val_archive(location, limit, index_cache, labels)
    if source_format == "webdataset":
        return archive_sources.open_webdataset(location, limit, index_cache)
    from pipeline.encode.parquet_source import open_parquet

    return open_parquet(location, limit, index_cache)


def _archive_location(root: str, need_file: bool) -> str:
    """A URL as it is, a local path made absolute (SourceError when it does not exist, or is not a file where
    an archive file is `need_file`)."""
    from pipeline.core.storage_io import check_protocol, is_url

    if is_url(root):
        check_protocol(root, writing=False)
        return root
    path = Path(root).expanduser().resolve()
    if not path.exists():
        raise SourceError(f"source {root} does not exist")
    if need_file and not path.is_file():
        raise SourceError(f"source {root} is not a tar archive file")
    return str(path)


def scan_source(
    root: str | os.PathLike, limit: int | None = None, source_format: str = "auto", labels: str | None = None
) -> Source:
    """Scan any supported source (see `open_source`) into a Source with its item list."""
    return _collect(open_source(root, limit, source_format, labels))


def read_item_bytes(item: SourceItem, root: str) -> bytes:
    """The encoded image bytes of an item: file contents, the PNG member of a packed shard, an archive member
    (seek + read, or a ranged GET for a URL), or a parquet row's image bytes. OSError with the reason when they
    cannot be read, or when the index found the member damaged (`index_problem`)."""
    if item.shard_file is not None:
        problem = item.packed_meta.get("index_problem") if item.packed_meta else None
        if item.shard_file.endswith(".parquet"):
            from pipeline.encode.parquet_source import read_row

            return read_row(item.shard_file, item.member_offset, item.member_size, problem)
        from pipeline.encode.archives import read_member

        return read_member(item.shard_file, item.member_offset, item.member_size, problem)
    with open_regular_file(os.path.join(root, item.path)) as handle:  # a FIFO or device fails, never blocks
        return handle.read()
