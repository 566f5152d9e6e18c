"""What a study's numbers depend on besides its file: the content of its dataset, demo-metric reference and
classifiers, and of the evaluate reference and Inception weights. Recorded in `plan.json` (`inputs`) and compared
on every resume, so that `--set data=B` on a study directory made with data A is refused instead of mixing both.

A fingerprint is of content, not of a path, so a study whose inputs moved (same bytes) resumes:
- a dataset directory from `encode` / `pack` (it has `manifest.json`, which lists every shard with its sha256): the
  sha256 of the manifest;
- any other directory: the sha256 of its file listing (relative names and sizes, at most `MAX_LISTED_FILES`),
  plus the contents of its small files (a classifier's config and weights) up to `MAX_HASHED_BYTES` in all;
- a file: the sha256 of its bytes (up to `MAX_HASHED_BYTES`; larger: its size);
- an object-store URL: the URL itself (its dataset manifest is checked by the trainer).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from pipeline.core.storage_io import is_url

MAX_LISTED_FILES = 200_000
MAX_HASHED_BYTES = 1 << 30
_CHUNK = 1 << 20


def fingerprint(location: str | None) -> dict[str, Any] | None:
    """The content identity of a path or URL (see the module docstring); None for None."""
    if location is None:
        return None
    if is_url(location):
        return {"url": location}
    path = Path(location)
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.is_file():
            return {"manifest_sha256": _file_sha256(manifest, MAX_HASHED_BYTES)}
        return _directory_fingerprint(path)
    if path.is_file():
        return {"sha256": _file_sha256(path, MAX_HASHED_BYTES), "size": path.stat().st_size}
    return {"missing": True}


def _file_sha256(path: Path, budget: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while budget > 0 and (chunk := handle.read(min(_CHUNK, budget))):
            digest.update(chunk)
            budget -= len(chunk)
    return digest.hexdigest()


def _directory_fingerprint(root: Path) -> dict[str, Any]:
    files: list[tuple[str, int]] = []
    for directory, names, file_names in os.walk(root):
        names.sort()
        for name in sorted(file_names):
            full = Path(directory) / name
            if full.is_file():
                files.append((full.relative_to(root).as_posix(), full.stat().st_size))
            if len(files) > MAX_LISTED_FILES:
                break
        if len(files) > MAX_LISTED_FILES:
            break
    files.sort()
    listing = hashlib.sha256("\n".join(f"{name}\t{size}" for name, size in files).encode())
    budget = MAX_HASHED_BYTES
    for name, size in files:  # the small files' bytes: a classifier's weights, a dataset's labels
        if size <= budget:
            listing.update(_file_sha256(root / name, size).encode())
            budget -= size
    return {"files": min(len(files), MAX_LISTED_FILES), "listing_sha256": listing.hexdigest()}
