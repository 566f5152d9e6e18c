"""Verifying a whole dataset (`encode --verify`, `inspect`): every shard re-hashed and compared with its manifest
entry and its sidecar (matched by name), and the shard files the manifest does not list (`verify_dataset`,
`VerifyReport`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.manifest import MANIFEST_NAME, load_manifest
from pipeline.core.shards import (
    SHARD_NAME_PATTERN,
    SIDECAR_NAME_PATTERN,
    _read_sidecar_file,
    shard_problems,
    sidecar_of,
)
from pipeline.core.storage import Location


@dataclass
class VerifyReport:
    """Result of `verify_dataset`: how many shards were checked and every problem found."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def _sidecar_problems(location: Location, entry: dict[str, Any]) -> list[str]:
    """The sidecar of the shard `entry` names (found by that name, not by position) against the entry."""
    path = location.join(sidecar_of(entry["name"]))
    sidecar = _read_sidecar_file(location, entry["name"])
    if sidecar is None:
        return [f"{path}: missing or unreadable sidecar of {entry['name']}"]
    fields = ("sha256", "count", "bytes")
    if tuple(sidecar[key] for key in fields) != tuple(entry[key] for key in fields):
        return [f"{path}: disagrees with the manifest entry of {entry['name']}"]
    return []


def _unlisted_shard_problems(location: Location, listed: set[str]) -> list[str]:
    """One line per shard number that has a tar or a sidecar in `location` but no manifest entry."""
    unlisted: dict[str, list[str]] = {}
    for name in location.names():
        if SHARD_NAME_PATTERN.fullmatch(name) or SIDECAR_NAME_PATTERN.fullmatch(name):
            shard = name.rsplit(".", 1)[0] + ".tar"
            if shard not in listed:
                unlisted.setdefault(shard, []).append(name)
    return [
        f"{location.join(shard)}: {' and '.join(names)} present but not listed in {MANIFEST_NAME}"
        for shard, names in unlisted.items()
    ]


def verify_dataset(out_dir: str | os.PathLike | Location, progress: bool = False) -> VerifyReport:
    """Re-hash every shard of a dataset (a directory or an object-store prefix) and compare it with its manifest
    entry and its sidecar (matched by name), and list shard files the manifest does not know. The manifest's own
    values are checked by `load_manifest` (a ManifestError)."""
    out_dir = Location.of(out_dir)
    manifest = load_manifest(out_dir)
    report = VerifyReport()
    shards = manifest["shards"]
    iterator = shards
    if progress:
        from tqdm import tqdm

        iterator = tqdm(shards, desc="verify", unit="shard")
    for entry in iterator:
        report.checked += 1
        report.problems.extend(shard_problems(out_dir, entry))
        report.problems.extend(_sidecar_problems(out_dir, entry))
    report.problems.extend(_unlisted_shard_problems(out_dir, {entry["name"] for entry in shards}))
    return report
