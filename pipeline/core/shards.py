"""The dataset format shared by encode / pack (writers) and train / evaluate (readers).

A dataset is a directory, or a prefix in an object store (`s3://bucket/x`, `gs://...`; see `pipeline.core.storage`,
through which every file here is read and written)::

    shard-000000.tar   WebDataset tar; latent samples: KEY.mean.npy, KEY.std.npy, KEY.cls, KEY.json
    shard-000000.json  sidecar: count, sha256, bytes, failures of that shard (written after the tar is complete)
    ...
    manifest.json      everything needed to use the data (see `docs` / the encode stage); written last
    failures.jsonl     one line per item that could not be used: {"index", "path", "reason"}

Latent members: `mean.npy` and `std.npy` are float16 [2, C, h, w] (index 0 = the image, 1 = its horizontal
flip), the VAE posterior mean and standard deviation NOT multiplied by the VAE scaling factor
(`manifest["vae"]["convention"] == "unscaled"`; the VAE's `scaling_factor` and `shift_factor` are in that entry,
and the per-channel mean / std of the original views' posterior means in `manifest["latent_stats"]`, see
`pipeline.core.latent_stats`). Raw image members: `png` (RGB uint8 at the target
resolution). Every sample has `cls` (integer label as text, -1 = unlabelled) and `json` (source path, original
size, crop box).

Shards are written through `webdataset.TarWriter` with fixed member metadata (mtime 0, fixed owner, mode 0444),
so the same samples always give byte-identical shards; a shard is written under a temporary name and renamed
when complete, then its sidecar is written: a shard counts as done only when its sidecar exists and its hash
matches.

This module holds the file names, the shard writer, the sidecars and `iter_samples(path)`; the manifest is
`pipeline.core.manifest` (`load_manifest(dir)`, `shard_urls(dir, manifest)`, `manifest_hash(dir)`), the sample
members `pipeline.core.shard_members` (`latent_sample`, `image_sample`, `decode_sample(sample)`), the check of a
whole dataset `pipeline.core.dataset_verify` (`verify_dataset`).

A dataset may come from anyone, so readers trust nothing in it: `load_manifest` refuses a shard name that is not
a plain `shard-NNNNNN.tar` (no scheme such as webdataset's `pipe:`, no separator, no `..`) and values that do not
add up (`check_manifest_values`); `shard_urls` returns absolute local paths (or URLs under the dataset's own
prefix); `iter_samples` opens the file itself (never through webdataset's URL handlers); `decode_sample` refuses
arrays whose header claims more data than the member holds and images over Pillow's pixel limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

from pipeline.core.atomic import json_text, write_bytes_atomic
from pipeline.core.storage import Location
from pipeline.core.storage_io import open_for_reading

FAILURES_NAME = "failures.jsonl"
_HASH_BLOCK = 1 << 20
# The only file names a manifest may list: what `shard_name` writes. ASCII digits only (`\d` would accept other
# scripts' digits); nothing else can be a URL scheme, a path separator, `..`, an option or a control character.
SHARD_NAME_PATTERN = re.compile(r"shard-[0-9]{6,}\.tar", re.ASCII)
SIDECAR_NAME_PATTERN = re.compile(r"shard-[0-9]{6,}\.json", re.ASCII)


def shard_name(index: int) -> str:
    """File name of shard `index`: `shard-000042.tar`."""
    return f"shard-{index:06d}.tar"


def sidecar_name(index: int) -> str:
    """File name of the sidecar of shard `index`: `shard-000042.json`."""
    return f"shard-{index:06d}.json"


def is_shard_name(name: Any) -> bool:
    """True for a plain shard file name as `shard_name` writes it (`shard-000042.tar`), nothing else."""
    return isinstance(name, str) and SHARD_NAME_PATTERN.fullmatch(name) is not None


def sidecar_of(name: str) -> str:
    """The sidecar file name of a (valid) shard file name: `shard-000042.tar` → `shard-000042.json`."""
    return name.removesuffix(".tar") + ".json"


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, no spaces, ASCII): the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def write_lines_atomic(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Write one canonical JSON object per line (JSON Lines) to `path` atomically."""
    write_bytes_atomic(path, b"".join(json_bytes(record) + b"\n" for record in records))


def write_json_to(location: str | os.PathLike | Location, name: str, obj: Any) -> None:
    """`json_text(obj)` as the file `name` of a dataset directory or prefix, atomically."""
    Location.of(location).write_bytes(name, json_text(obj).encode("ascii"))


def write_lines_to(location: str | os.PathLike | Location, name: str, records: list[dict[str, Any]]) -> None:
    """JSON Lines (`write_lines_atomic`) as the file `name` of a dataset directory or prefix, atomically."""
    Location.of(location).write_bytes(name, b"".join(json_bytes(record) + b"\n" for record in records))


def update_digest(digest, path: str | os.PathLike) -> None:
    """Feed a file's bytes into a hashlib `digest`, one block at a time (any file size, little memory)."""
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    update_digest(digest, path)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Writing


class _HashingFile:
    """A write-only file wrapper that hashes and counts the bytes as they are written (no re-read afterwards)."""

    def __init__(self, handle):
        self.handle = handle
        self.digest = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.bytes += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


class ShardWriter:
    """Writes one shard: samples go to a temporary tar (`AtomicFile`); `commit()` publishes it and writes the
    sidecar.

    Use as a context manager; leaving the block without `commit()` (an exception) removes the temporary file,
    so a failed or killed attempt never leaves a file under the final name.
    """

    def __init__(self, out_dir: str | os.PathLike | Location, index: int):
        import webdataset as wds

        self.location = Location.of(out_dir)
        self.index = index
        self._file = self.location.writer(shard_name(index))  # local: temp + rename; object store: one upload
        self._hashing = _HashingFile(self._file.handle)
        # Fixed mtime / owner / mode: the tar bytes depend only on the samples (reproducible shards).
        self._tar = wds.TarWriter(self._hashing, encoder=False, mtime=0, user="diffit", group="diffit", mode=0o444)
        self.count = 0

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample (a dict of `__key__` and member name → bytes)."""
        self._tar.write(sample)
        self.count += 1

    def commit(self, sidecar_extra: dict[str, Any], finish=None) -> dict[str, Any]:
        """Finish the tar, publish it under its final name, write the sidecar (passed through `finish` first,
        e.g. to seal it, so that it is written once), and return the sidecar dict."""
        self._tar.close()
        self._file.commit()
        sidecar = {
            "name": shard_name(self.index),
            "index": self.index,
            "count": self.count,
            "sha256": self._hashing.digest.hexdigest(),
            "bytes": self._hashing.bytes,
            **sidecar_extra,
        }
        if finish is not None:
            sidecar = finish(sidecar)
        write_json_to(self.location, sidecar_name(self.index), sidecar)
        return sidecar

    def abort(self) -> None:
        """Drop the temporary file of an unfinished shard."""
        if not self._file.done:
            with contextlib.suppress(OSError, ValueError):
                self._tar.close()  # flush tarfile's buffer now, into the file about to be deleted, not at GC time
            self._file.abort()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()


# ----------------------------------------------------------------------------------------------------------------
# Sidecars and verification


def _is_count(value: Any) -> bool:
    """A non-negative int (bool is an int in Python, but never a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_sidecar_file(location: Location, expected_name: str) -> dict[str, Any] | None:
    """The sidecar of the shard `expected_name` in `location` when it exists and describes that shard; None when
    it is missing or damaged. A sidecar that cannot be read (a dropped connection, a permission error) is a
    StorageReadError, never "missing": the shard it seals would be rewritten."""
    try:
        return parse_sidecar(location.read_bytes(sidecar_of(expected_name)), expected_name)
    except FileNotFoundError:
        return None


def parse_sidecar(data: bytes, expected_name: str) -> dict[str, Any] | None:
    """The sidecar in `data` when it is JSON describing the shard `expected_name`, else None."""
    try:
        sidecar = json.loads(data.decode("ascii"))
    except ValueError:
        return None
    if not isinstance(sidecar, dict) or not {"name", "count", "sha256", "bytes"} <= set(sidecar):
        return None
    # A sidecar's name is trusted later (resume copies it into the manifest): it must be its own shard's name.
    if sidecar["name"] != expected_name or not isinstance(sidecar["sha256"], str):
        return None
    if not (_is_count(sidecar["count"]) and _is_count(sidecar["bytes"])):
        return None
    return sidecar


def read_sidecar(out_dir: str | os.PathLike | Location, index: int) -> dict[str, Any] | None:
    """The sidecar of shard `index`, or None when it is missing, not JSON or not that shard's (the shard is then
    redone); StorageReadError when it cannot be read."""
    return _read_sidecar_file(Location.of(out_dir), shard_name(index))


def shard_problems(out_dir: str | os.PathLike | Location, entry: dict[str, Any], rehash: bool = True) -> list[str]:
    """What is wrong with one shard compared with its record (`entry`: name, bytes, sha256); [] when fine."""
    if not is_shard_name(entry.get("name")):
        return [f"{entry.get('name')!r}: not a shard file name (expected shard-NNNNNN.tar)"]
    location = Location.of(out_dir)
    path, found = location.join(entry["name"]), location.stat(entry["name"])
    if found is None or not found.regular:
        return [f"{path}: missing"]
    if found.size != entry["bytes"]:
        return [f"{path}: {found.size} bytes, expected {entry['bytes']}"]
    if rehash:
        digest = location.sha256(entry["name"])
        if digest != entry["sha256"]:
            return [f"{path}: sha256 {digest} does not match the recorded {entry['sha256']}"]
    return []


def iter_samples(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard (dicts of `__key__` and member name → bytes).

    The file is opened here, as a local file, and only its tar stream goes to webdataset's member grouping:
    webdataset's URL handlers (`pipe:`, `http:`, ...) are never involved, whatever the path looks like.
    """
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with open_for_reading(path) as stream:
        members = tar_file_expander([{"url": str(path), "stream": stream}])
        for sample in group_by_keys(members):
            yield {k: v for k, v in sample.items() if k != "__url__" and k != "__local_path__"}
