"""What every image source yields: items (`SourceItem`: where an image is, its key and label), a lazy scan of
them (`SourceScan`), and the rule that turns a relative path into a WebDataset-safe sample key. The folder walk
and packed shards (`pipeline.encode.sources`), archives (`archive_sources`) and parquet files (`parquet_source`)
all build on these.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.errors import InputError

# WebDataset member names are `key + "." + extension`; USTAR names hold 100 characters (+155 of prefix), so a
# key stays well below that once the longest extension (".mean.npy") is appended.
MAX_KEY_LENGTH = 80
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")
# A path whose key is itself without its extension (safe directory and file names, one extension): most paths,
# e.g. every ImageNet file; `sample_key` answers those without the general rule's work (1.28M keys per plan).
_PLAIN_PATH = re.compile(r"(?:[A-Za-z0-9_\-]+/)*[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+")
# A sample key read from a packed shard becomes a member name of the shards written from it: only what
# `sample_key` produces (no `..`, no leading `/`, no control characters), and short enough for a tar header.


# The most classes a source may have: a label is an index into the label map, which names every class up to the
# largest label (WebDataset and parquet sources without class names: "0" ... "max"). A file's label is checked
# against this before any map is grown for it, so a label of 2e9 in a 10 KB tar is refused instead of building a
# 2-billion-entry map. ImageNet-21k has 21,841 classes, Google Landmarks v2 about 200,000.
MAX_CLASSES = 10**6


class SourceError(InputError):
    """The source directory cannot be used (missing, empty, unreadable, or an invalid packed dataset)."""


def check_label(label: int, where: str, num_classes: int | None = None) -> int:
    """`label` when it is a class index below `num_classes` (the label map's size, when the source names its
    classes) and below MAX_CLASSES; otherwise SourceError naming `where` (the file and member / row), the label
    and the maximum. Negative labels are the caller's business (an unlabelled item or a failure)."""
    limit = MAX_CLASSES if num_classes is None else min(num_classes, MAX_CLASSES)
    if label >= limit:
        names = "the label map's" if num_classes is not None and num_classes <= MAX_CLASSES else "MAX_CLASSES ="
        raise SourceError(f"{where}: label {label} is above the maximum {limit - 1} ({names} {limit} classes)")
    return label


@dataclass(frozen=True, slots=True)
class SourceItem:
    """One input image: where its bytes are, its stable sample key, and its class label.

    For files, `path` is the path relative to the source root (POSIX separators). For packed shards, `path`
    is `"shard-000000.tar#key"` and `member_offset` / `member_size` locate the PNG bytes inside that shard, so a
    worker reads one member without scanning the archive; `packed_meta` is the sample's json from packing.
    Slots: a 1.28M-item source is held (and pickled) as compactly as a dataclass allows.
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


def item_location(item: SourceItem, root: str) -> str:
    """Where an item is, for messages: `ARCHIVE_OR_SHARD#key` inside a file, else the file's path."""
    if item.shard_file is not None:
        return f"{item.shard_file}#{item.key}"
    return os.path.join(root, item.path)


def _description(
    root: str, layout: str, count: int, ignored: list[str], packed_manifest: dict | None, limit: int | None
) -> dict[str, Any]:
    """Summary of a source recorded in the manifest under `source` (`items`: how many were scanned)."""
    info: dict[str, Any] = {"root": root, "layout": layout, "items": count}
    if limit is not None:
        info["limit"] = limit  # the walk stopped after the first `limit` items: `items` is not the source's total
    if ignored:
        info["ignored"] = {"count": len(ignored), "first": ignored[:10]}
    if packed_manifest is not None:
        info["packed_from"] = {
            "source": packed_manifest.get("source"),
            "resolution": packed_manifest.get("resolution"),
            "transform": packed_manifest.get("transform"),
        }
    return info


@dataclass
class Source:
    """A scanned source: its root, layout, ordered items and label map."""

    root: str
    layout: str  # "class-folders" | "flat" | "shards"
    items: list[SourceItem]
    label_map: dict[str, int]
    ignored: list[str] = field(default_factory=list)
    packed_manifest: dict[str, Any] | None = None
    limit: int | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for an unlabelled, unconditional source)."""
        return len(self.label_map)

    def describe(self) -> dict[str, Any]:
        """Summary recorded in the manifest under `source`."""
        return _description(self.root, self.layout, len(self.items), self.ignored, self.packed_manifest, self.limit)


@dataclass
class SourceScan:
    """An opened source whose items are produced while they are iterated (one pass, in the source's order).

    `label_map` and `layout` are known from the top level; `ignored` grows as the walk goes on. Iterating
    `items` raises SourceError when the source has no item at all.
    """

    root: str
    layout: str
    label_map: dict[str, int]
    items: Iterator[SourceItem] = field(repr=False)
    ignored: list[str] = field(default_factory=list)
    packed_manifest: dict[str, Any] | None = None
    limit: int | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for an unlabelled, unconditional source)."""
        return len(self.label_map)

    def describe(self, count: int) -> dict[str, Any]:
        """Summary recorded in the manifest under `source`, once `count` items were taken from `items`."""
        return _description(self.root, self.layout, count, self.ignored, self.packed_manifest, self.limit)


def sample_key(relative_path: str) -> str:
    """Turn a relative path into a WebDataset-safe key: `n01440764/n01440764_10026.JPEG` → `n01440764/n01440764_10026`.

    The extension is dropped; characters other than letters, digits, `_` and `-` (dots included, which would
    split the WebDataset extension; `..`; unicode) become `_`; the key never starts with `/`. When the key
    differs from the plain path-without-extension, or had to be shortened, a short hash of the full relative
    path is appended so that different files never end up with the same key.
    """
    if len(relative_path) <= MAX_KEY_LENGTH and _PLAIN_PATH.fullmatch(relative_path):
        return relative_path.rpartition(".")[0]
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
    if text.isascii():
        return text  # nothing to decompose: the common case, and half the time of a 1.28M-file scan otherwise
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


def keys_per_directory(paths: list[str]) -> list[str]:
    """`unique_keys` applied to the paths of each directory on their own (the folder walk's rule), in order."""
    by_directory: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        by_directory.setdefault(path.rpartition("/")[0], []).append(i)
    keys = [""] * len(paths)
    for positions in by_directory.values():
        for i, key in zip(positions, unique_keys([paths[i] for i in positions])):
            keys[i] = key
    return keys
