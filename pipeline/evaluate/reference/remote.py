"""References in object storage (`--reference s3://...`, `eval.reference: gs://...`): copied once to a local cache.

An ADM batch or statistics `.npz` is read by random access (`np.load`, memory maps), and reference features are
cached beside the reference, so a reference URL is first copied to `$XDG_CACHE_HOME/diffit-pipe/references/`
(`~/.cache/...`): an `.npz` object as one file, a `pack` dataset as its manifest and every listed shard, each
shard checked against the manifest's sha256 while it is copied. The copy is named after the URL and the object's
size and modification time (the manifest's hash for datasets), so a changed object is copied again, and every
file is written atomically, so concurrent ranks and killed runs never leave a partial reference behind.

A dataset's `manifest.json` is read once: the bytes that are hashed (naming the copy) are the bytes parsed
(choosing and checking the shards) and the bytes written into the copy, so a manifest replaced while a reference
is staged can never pair the shards of one version with the manifest of another.

URLs: those of `pipeline.core.storage` (s3://, gs://, az://, memory://); an `.npz` may also be read over
http(s):// (read-only: nothing is written there, the copy is local and atomic).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from pipeline.core.atomic import atomic_open, atomic_path
from pipeline.core.errors import InputError
from pipeline.core.manifest import MANIFEST_NAME, parse_manifest
from pipeline.core.shards import json_bytes, sha256_file
from pipeline.core.storage import Location
from pipeline.core.storage_io import download, reading, url_to_fs

logger = logging.getLogger(__name__)


class RemoteReferenceError(InputError):
    """A reference URL that is neither an `.npz` object nor a dataset prefix with a manifest, or whose shards do
    not match their manifest."""


def reference_download_dir() -> Path:
    """Where reference URLs are copied: `$XDG_CACHE_HOME/diffit-pipe/references` (default `~/.cache/...`)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "diffit-pipe" / "references"


def _tag(*parts: object) -> str:
    return hashlib.sha256(json_bytes([str(part) for part in parts])).hexdigest()[:16]


def stage_reference(url: str, cache: Path | None = None) -> Path:
    """A local copy of the reference at `url` (see the module docstring); reused while the object is unchanged."""
    cache = cache or reference_download_dir()
    if url.rstrip("/").endswith(".npz"):
        return _stage_file(url.rstrip("/"), cache)
    location = Location.of(url)
    if location.has(MANIFEST_NAME):
        return _stage_dataset(location, cache)
    raise RemoteReferenceError(
        f"{url}: not an .npz object and no {MANIFEST_NAME} under it; a reference in object storage is an ADM / "
        "statistics .npz or a raw image dataset written by `diffit-pipe pack` (image folders: pack them first)"
    )


def _stage_file(url: str, cache: Path) -> Path:
    fs, path = url_to_fs(url)
    fs.invalidate_cache(path)
    try:
        with reading(url):
            info = fs.info(path)
    except FileNotFoundError:
        raise RemoteReferenceError(f"{url}: no such object") from None
    stamp = info.get("ETag") or info.get("LastModified") or info.get("mtime")
    target = cache / f"{_tag(url, info.get('size'), stamp)}-{url.rsplit('/', 1)[-1]}"
    if target.is_file() and target.stat().st_size == info.get("size"):
        logger.info("reference %s: using the local copy %s", url, target)
        return target
    logger.info("reference %s: copying %.1f MB to %s", url, (info.get("size") or 0) / 1e6, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return download(url, target)


def _stage_dataset(location: Location, cache: Path) -> Path:
    """Copy the dataset at `location` (manifest read once: see the module docstring)."""
    try:
        manifest_bytes = location.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:  # removed since `stage_reference` saw it
        raise RemoteReferenceError(f"{location.join(MANIFEST_NAME)}: no such object") from None
    target = cache / _tag(location.url, hashlib.sha256(manifest_bytes).hexdigest())
    if (target / MANIFEST_NAME).is_file():  # written last: the copy is complete
        logger.info("reference %s: using the local copy %s", location.url, target)
        return target
    # These very bytes: their names and values are checked before anything is copied.
    manifest = parse_manifest(manifest_bytes, location.join(MANIFEST_NAME))
    shards = [entry for entry in manifest["shards"] if entry["count"] > 0]
    logger.info("reference %s: copying %d shard(s) to %s", location.url, len(shards), target)
    target.mkdir(parents=True, exist_ok=True)
    for entry in shards:
        _copy_checked(location, entry, target / entry["name"])
    with atomic_open(target / MANIFEST_NAME) as handle:
        handle.write(manifest_bytes)
    return target


def _copy_checked(location: Location, entry: dict, target: Path) -> None:
    """Copy one shard and check its sha256; RemoteReferenceError (nothing kept) when it is not the manifest's."""
    if target.is_file() and target.stat().st_size == entry["bytes"]:
        return  # copied (and checked) by an earlier, interrupted staging
    url = location.join(entry["name"])
    with atomic_path(target) as temp:
        try:
            download(url, temp)
        except FileNotFoundError:
            raise RemoteReferenceError(f"{url}: listed in {MANIFEST_NAME} but no such object") from None
        digest = sha256_file(temp)
        if digest != entry["sha256"]:
            raise RemoteReferenceError(
                f"{url}: sha256 {digest} does not match the manifest's {entry['sha256']}; the reference is damaged"
            )


__all__ = ["RemoteReferenceError", "reference_download_dir", "stage_reference"]
