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
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tarfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any

from pipeline.core.errors import InputError
from pipeline.core.shards import MANIFEST_NAME, load_manifest, open_regular_file

logger = logging.getLogger(__name__)

# WebDataset member names are `key + "." + extension`; USTAR names hold 100 characters (+155 of prefix), so a
# key stays well below that once the longest extension (".mean.npy") is appended.
MAX_KEY_LENGTH = 80
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")
# A sample key read from a packed shard becomes a member name of the shards written from it: only what
# `sample_key` produces (no `..`, no leading `/`, no control characters), and short enough for a tar header.
_PACKED_KEY = re.compile(r"[A-Za-z0-9_\-]+(?:/[A-Za-z0-9_\-]+)*", re.ASCII)
_MAX_PACKED_KEY_LENGTH = 200
_MAX_SMALL_MEMBER_BYTES = 1 << 20  # a cls or json member is a few bytes; never read more than this into memory


class SourceError(InputError):
    """The source directory cannot be used (missing, empty, unreadable, or an invalid packed dataset)."""


@dataclass(frozen=True)
class SourceItem:
    """One input image: where its bytes are, its stable sample key, and its class label.

    For files, `path` is the path relative to the source root (POSIX separators). For packed shards, `path`
    is `"shard-000000.tar#key"` and `member_offset` / `member_size` locate the PNG bytes inside that shard, so a
    worker reads one member without scanning the archive; `packed_meta` is the sample's json from packing.
    """

    index: int
    path: str
    key: str
    label: int
    size: int
    mtime_ns: int = 0
    shard_file: str | None = None
    member_offset: int = 0
    member_size: int = 0
    packed_meta: dict[str, Any] | None = None
    shard_sha256: str = ""

    def fingerprint_fields(self) -> list[Any]:
        """What identifies this item's content for resume checks: path, key, label, size, and the modification
        time (files) or the hash of the shard holding it (packed samples)."""
        return [self.path, self.key, self.label, self.size, self.mtime_ns, self.shard_sha256]


@dataclass
class Source:
    """A scanned source: its root, layout, ordered items and label map."""

    root: str
    layout: str  # "class-folders" | "flat" | "shards"
    items: list[SourceItem]
    label_map: dict[str, int]
    ignored: list[str] = field(default_factory=list)
    packed_manifest: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for an unlabelled, unconditional source)."""
        return len(self.label_map)

    def describe(self) -> dict[str, Any]:
        """Summary recorded in the manifest under `source`."""
        info: dict[str, Any] = {"root": self.root, "layout": self.layout, "items": len(self.items)}
        if self.ignored:
            info["ignored"] = {"count": len(self.ignored), "first": self.ignored[:10]}
        if self.packed_manifest is not None:
            info["packed_from"] = {
                "source": self.packed_manifest.get("source"),
                "resolution": self.packed_manifest.get("resolution"),
                "transform": self.packed_manifest.get("transform"),
            }
        return info


def sample_key(relative_path: str) -> str:
    """Turn a relative path into a WebDataset-safe key: `n01440764/n01440764_10026.JPEG` → `n01440764/n01440764_10026`.

    The extension is dropped; characters other than letters, digits, `_` and `-` (dots included, which would
    split the WebDataset extension; `..`; unicode) become `_`; the key never starts with `/`. When the key
    differs from the plain path-without-extension, or had to be shortened, a short hash of the full relative
    path is appended so that different files never end up with the same key.
    """
    parts = [p for p in relative_path.split("/") if p not in ("", ".")]
    if not parts:
        raise SourceError(f"empty relative path {relative_path!r}")
    stem = parts[-1].rsplit(".", 1)[0] if "." in parts[-1][1:] else parts[-1]
    natural = parts[:-1] + [stem]
    safe = [_UNSAFE_KEY_CHARS.sub("_", _ascii_fold(p)) or "_" for p in natural]
    key = "/".join(safe)
    if key != "/".join(natural) or len(key) > MAX_KEY_LENGTH:
        key = _with_hash(key, relative_path)
    return key


def _ascii_fold(text: str) -> str:
    """Drop accents so that unicode names stay readable in keys (`ñandú` → `nandu`); other characters stay."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def _with_hash(key: str, relative_path: str) -> str:
    """Append an 8-hex-digit hash of the full relative path to `key`, shortening it to fit MAX_KEY_LENGTH."""
    digest = hashlib.sha256(relative_path.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    budget = MAX_KEY_LENGTH - len(digest) - 1
    if len(key) > budget:
        key = key[:budget].rstrip("/") or "_"
    return f"{key}-{digest}"


def unique_keys(relative_paths: list[str]) -> list[str]:
    """Keys for a list of paths, made unique: paths whose keys collide (e.g. `a.jpg` and `a.png`) all get a hash."""
    keys = [sample_key(p) for p in relative_paths]
    positions: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        positions.setdefault(key, []).append(i)
    for key, where in positions.items():
        if len(where) > 1:
            for i in where:
                keys[i] = _with_hash(key, relative_paths[i])
    if len(set(keys)) != len(keys):
        raise SourceError("could not make the sample keys unique (hash collision); rename the colliding files")
    return keys


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


def _walk_files(
    top: Path, root: Path, ignored: list[str], listed: set[tuple[int, int]]
) -> list[tuple[str, os.stat_result | None]]:
    """All non-hidden regular files below `top` as (POSIX path relative to `root`, stat or None); other entries
    (hidden ones, FIFOs, devices) go to `ignored`.

    Links are followed, but every real directory is listed once per scan: `listed` holds the (device, inode) of
    the directories already walked (or walked on their own, such as the root and the class folders), and a link
    to one of them is skipped and recorded in `ignored`. So a loop (`a/loop -> ..`, two links to `.`) ends, and a
    directory reached by two paths gives its files once. Sub-directories are visited in sorted order, so which
    path wins does not depend on the file system's listing order.
    """

    def fail(error: OSError) -> None:
        raise SourceError(f"cannot list {error.filename}: {error.strerror or error}") from error

    found, special = [], []
    for dirpath, dirnames, filenames in os.walk(top, onerror=fail, followlinks=True):
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(dirnames):
            identity = _directory_identity(os.path.join(dirpath, name))
            if _is_hidden(name) or identity in listed:
                ignored.append((rel_dir / name).as_posix() + "/")
                dirnames.remove(name)
            elif identity is not None:
                listed.add(identity)
        dirnames.sort()
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            if _is_hidden(name):
                ignored.append(rel)
                continue
            try:
                stat = os.stat(os.path.join(dirpath, name))
            except OSError:
                stat = None  # a dangling link or a vanished file: kept as an item, its read fails with a reason
            if stat is not None and not S_ISREG(stat.st_mode):
                ignored.append(rel)  # a FIFO, socket or device (a link to /dev/zero): never an image
                special.append(rel)
                continue
            found.append((rel, stat))
    if special:
        logger.warning(
            "ignored %d entries under %s that are not regular files (first: %s)", len(special), top, special[0]
        )
    return found


def _drop_duplicate_files(
    root: Path, files: list[tuple[str, os.stat_result | None, int]], ignored: list[str]
) -> list[tuple[str, os.stat_result | None, int]]:
    """Keep the first (in sorted relative-path order) of the paths that lead to the same real file (a file link,
    a directory linked inside another, a hard link): an image is one item however many paths reach it.

    The file's identity is its (device, inode) from the stat already taken (no extra system call per file);
    a dangling link, which has no stat, is identified by its resolved path.
    """
    kept, seen = [], set()
    for rel, stat, label in sorted(files, key=lambda f: f[0]):
        identity = (stat.st_dev, stat.st_ino) if stat is not None else os.path.realpath(root / rel)
        if identity in seen:
            ignored.append(rel)
            continue
        seen.add(identity)
        kept.append((rel, stat, label))
    if len(kept) < len(files):
        logger.warning(
            "%d path(s) under %s lead to files already listed under another path (links); each file is used once",
            len(files) - len(kept),
            root,
        )
    return kept


def scan_folder(root: str | os.PathLike) -> Source:
    """Scan an image folder (class folders or flat) into a Source with sorted items and a label map."""
    root_path = Path(root).expanduser().resolve()
    if not root_path.exists():
        raise SourceError(f"source {root} does not exist")
    if not root_path.is_dir():
        raise SourceError(f"source {root} is not a directory")
    try:
        entries = sorted(os.scandir(root_path), key=lambda e: e.name)
    except OSError as error:
        raise SourceError(f"cannot list source {root_path}: {error.strerror or error}") from error

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
        files = []
        for name in class_dirs:
            walked = _walk_files(root_path / name, root_path, ignored, listed)
            files.extend((rel, stat, label_map[name]) for rel, stat in walked)
    else:
        layout = "flat"
        label_map = {}
        walked = _walk_files(root_path, root_path, ignored, {_directory_identity(root_path)})
        files = [(rel, stat, -1) for rel, stat in walked]

    files = _drop_duplicate_files(root_path, files, ignored)
    if not files:
        raise SourceError(f"no image files found under {root_path} (expected class folders or image files)")
    keys = unique_keys([rel for rel, _, _ in files])
    items = [
        SourceItem(
            index=i,
            path=rel,
            key=key,
            label=label,
            size=stat.st_size if stat else -1,
            mtime_ns=stat.st_mtime_ns if stat else 0,
        )
        for i, ((rel, stat, label), key) in enumerate(zip(files, keys))
    ]
    if ignored:
        logger.info("ignored %d hidden or loose entries under %s", len(ignored), root_path)
    return Source(root=str(root_path), layout=layout, items=items, label_map=label_map, ignored=ignored)


def scan_packed(root: str | os.PathLike) -> Source:
    """List the samples of packed raw-image shards (output of `pack`) as items with member offsets."""
    root_path = Path(root).expanduser().resolve()
    manifest = load_manifest(root_path)
    if manifest.get("kind") != "images":
        raise SourceError(
            f"{root_path / MANIFEST_NAME} describes a dataset of kind {manifest.get('kind')!r}; only raw image "
            "shards written by `diffit-pipe pack` can be a source"
        )
    items: list[SourceItem] = []
    for shard in manifest["shards"]:
        shard_path = root_path / shard["name"]
        if not shard_path.is_file():
            raise SourceError(f"packed shard {shard_path} listed in the manifest is missing")
        if shard_path.stat().st_size != shard["bytes"]:
            raise SourceError(
                f"packed shard {shard_path} has {shard_path.stat().st_size} bytes but the manifest says "
                f"{shard['bytes']}; run `diffit-pipe inspect {root_path} --verify`"
            )
        items.extend(_index_packed_shard(shard_path, shard["sha256"], len(items), manifest["num_classes"]))
    if len(items) != manifest["counts"]["written"]:
        raise SourceError(
            f"packed shards under {root_path} hold {len(items)} samples but the manifest says "
            f"{manifest['counts']['written']}"
        )
    return Source(
        root=str(root_path),
        layout="shards",
        items=items,
        label_map=dict(manifest.get("label_map", {})),
        packed_manifest=manifest,
    )


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


def scan_source(root: str | os.PathLike) -> Source:
    """Scan any supported source: packed shards when `root/manifest.json` exists, else an image folder."""
    if (Path(root).expanduser() / MANIFEST_NAME).is_file():
        return scan_packed(root)
    return scan_folder(root)


def read_item_bytes(item: SourceItem, root: str) -> bytes:
    """The encoded image bytes of an item (file contents, or the PNG member of a packed shard)."""
    if item.shard_file is not None:
        with open(item.shard_file, "rb") as handle:
            handle.seek(item.member_offset)
            data = handle.read(item.member_size)
        if len(data) != item.member_size:
            raise OSError(f"packed shard {item.shard_file} is shorter than its index says")
        return data
    with open_regular_file(os.path.join(root, item.path)) as handle:  # a FIFO or device fails, never blocks
        return handle.read()
