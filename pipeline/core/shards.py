"""The dataset format shared by encode / pack (writers) and train / evaluate (readers).

A dataset is a directory::

    shard-000000.tar   WebDataset tar; latent samples: KEY.mean.npy, KEY.std.npy, KEY.cls, KEY.json
    shard-000000.json  sidecar: count, sha256, bytes, failures of that shard (written after the tar is complete)
    ...
    manifest.json      everything needed to use the data (see `docs` / the encode stage); written last
    failures.jsonl     one line per item that could not be used: {"index", "path", "reason"}

Latent members: `mean.npy` and `std.npy` are float16 [2, C, h, w] (index 0 = the image, 1 = its horizontal
flip), the VAE posterior mean and standard deviation NOT multiplied by the VAE scaling factor
(`manifest["vae"]["convention"] == "unscaled"`). Raw image members: `png` (RGB uint8 at the target
resolution). Every sample has `cls` (integer label as text, -1 = unlabelled) and `json` (source path, original
size, crop box).

Shards are written through `webdataset.TarWriter` with fixed member metadata (mtime 0, fixed owner, mode 0444),
so the same samples always give byte-identical shards; a shard is written under a temporary name and renamed
when complete, then its sidecar is written: a shard counts as done only when its sidecar exists and its hash
matches.

Readers: `load_manifest(dir)`, `shard_urls(dir, manifest)`, `manifest_hash(dir)`, `iter_samples(path)` and
`decode_sample(sample)`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.atomic import AtomicFile, write_bytes_atomic, write_json_atomic
from pipeline.core.errors import InputError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"
LATENT_MEMBERS = ("mean.npy", "std.npy", "cls", "json")
IMAGE_MEMBERS = ("png", "cls", "json")
REQUIRED_MANIFEST_KEYS = ("format_version", "kind", "resolution", "num_classes", "label_map", "counts", "shards")
_HASH_BLOCK = 1 << 20


class ManifestError(InputError):
    """A dataset directory cannot be read: no usable manifest (missing, not JSON, wrong version, missing keys)
    or a damaged failures file."""


def shard_name(index: int) -> str:
    """File name of shard `index`: `shard-000042.tar`."""
    return f"shard-{index:06d}.tar"


def sidecar_name(index: int) -> str:
    """File name of the sidecar of shard `index`: `shard-000042.json`."""
    return f"shard-{index:06d}.json"


def json_bytes(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, no spaces, ASCII): the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def write_lines_atomic(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Write one canonical JSON object per line (JSON Lines) to `path` atomically."""
    write_bytes_atomic(path, b"".join(json_bytes(record) + b"\n" for record in records))


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
# Sample members


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as `.npy` bytes (format 1.0, no pickle): what `np.load` reads back."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    """Lossless PNG of an RGB uint8 [H, W, 3] array (no metadata, so equal pixels give equal bytes)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def latent_sample(key: str, mean: np.ndarray, std: np.ndarray, label: int, meta: dict[str, Any]) -> dict[str, Any]:
    """The members of one latent sample (mean / std float16 [2, C, h, w], unscaled)."""
    return {
        "__key__": key,
        "mean.npy": npy_bytes(mean.astype(np.float16)),
        "std.npy": npy_bytes(std.astype(np.float16)),
        "cls": str(int(label)).encode("ascii"),
        "json": json_bytes(meta),
    }


def image_sample(key: str, pixels: np.ndarray, label: int, meta: dict[str, Any]) -> dict[str, Any]:
    """The members of one raw image sample (PNG of RGB uint8 [R, R, 3])."""
    return {
        "__key__": key,
        "png": png_bytes(pixels),
        "cls": str(int(label)).encode("ascii"),
        "json": json_bytes(meta),
    }


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

    def __init__(self, out_dir: str | os.PathLike, index: int):
        import webdataset as wds

        self.out_dir = Path(out_dir)
        self.index = index
        self._file = AtomicFile(self.out_dir / shard_name(index))
        self.final_path = self._file.path
        self.temp_path = self._file.temp_path
        self._hashing = _HashingFile(self._file.handle)
        # Fixed mtime / owner / mode: the tar bytes depend only on the samples (reproducible shards).
        self._tar = wds.TarWriter(self._hashing, encoder=False, mtime=0, user="diffit", group="diffit", mode=0o444)
        self.count = 0

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample (a dict of `__key__` and member name → bytes)."""
        self._tar.write(sample)
        self.count += 1

    def commit(self, sidecar_extra: dict[str, Any]) -> dict[str, Any]:
        """Finish the tar, publish it under its final name, write the sidecar, and return the sidecar dict."""
        self._tar.close()
        self._file.commit()
        sidecar = {
            "name": self.final_path.name,
            "index": self.index,
            "count": self.count,
            "sha256": self._hashing.digest.hexdigest(),
            "bytes": self._hashing.bytes,
            **sidecar_extra,
        }
        write_json_atomic(self.out_dir / sidecar_name(self.index), sidecar)
        return sidecar

    def abort(self) -> None:
        """Drop the temporary file of an unfinished shard."""
        if not self._file.done:
            try:
                self._tar.close()  # flush tarfile's buffer now, into the file about to be deleted, not at GC time
            except (OSError, ValueError):
                pass
            self._file.abort()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()


# ----------------------------------------------------------------------------------------------------------------
# Sidecars and verification


def read_sidecar(out_dir: str | os.PathLike, index: int) -> dict[str, Any] | None:
    """The sidecar of shard `index`, or None when it is missing or unreadable (the shard is then redone)."""
    path = Path(out_dir) / sidecar_name(index)
    try:
        with open(path, encoding="ascii") as handle:
            sidecar = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(sidecar, dict) or not {"name", "count", "sha256", "bytes"} <= set(sidecar):
        return None
    return sidecar


def shard_problems(out_dir: str | os.PathLike, entry: dict[str, Any], rehash: bool = True) -> list[str]:
    """What is wrong with one shard compared with its record (`entry`: name, bytes, sha256); [] when fine."""
    path = Path(out_dir) / entry["name"]
    if not path.is_file():
        return [f"{path}: missing"]
    size = path.stat().st_size
    if size != entry["bytes"]:
        return [f"{path}: {size} bytes, expected {entry['bytes']}"]
    if rehash:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            return [f"{path}: sha256 {digest} does not match the recorded {entry['sha256']}"]
    return []


@dataclass
class VerifyReport:
    """Result of `verify_dataset`: how many shards were checked and every problem found."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def verify_dataset(out_dir: str | os.PathLike, progress: bool = False) -> VerifyReport:
    """Re-hash every shard of a dataset and compare with the manifest and the sidecars."""
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    report = VerifyReport()
    shards = manifest["shards"]
    iterator = shards
    if progress:
        from tqdm import tqdm

        iterator = tqdm(shards, desc="verify", unit="shard")
    total = 0
    for index, entry in enumerate(iterator):
        report.checked += 1
        total += entry["count"]
        report.problems.extend(shard_problems(out_dir, entry))
        sidecar = read_sidecar(out_dir, index)
        if sidecar is None:
            report.problems.append(f"{out_dir / sidecar_name(index)}: missing or unreadable sidecar")
        elif (sidecar["sha256"], sidecar["count"], sidecar["bytes"]) != (
            entry["sha256"],
            entry["count"],
            entry["bytes"],
        ):
            report.problems.append(
                f"{out_dir / sidecar_name(index)}: disagrees with the manifest entry of {entry['name']}"
            )
    if total != manifest["counts"]["written"]:
        report.problems.append(f"shards hold {total} samples but the manifest counts {manifest['counts']['written']}")
    counts = manifest["counts"]
    if counts["seen"] != counts["written"] + counts["failed"]:
        report.problems.append(f"manifest counts do not add up: {counts}")
    return report


# ----------------------------------------------------------------------------------------------------------------
# Reading


def load_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check `DIR/manifest.json`; raises ManifestError naming the file when it is missing or invalid."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        hint = ""
        if Path(directory).is_dir() and any(Path(directory).glob("shard-*.json")):
            hint = " (shards exist but the job did not finish: re-run the same encode/pack command to complete it)"
        raise ManifestError(f"no dataset manifest at {path}{hint}")
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError) as error:
        raise ManifestError(f"cannot read {path}: {error}") from error
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} does not hold a JSON object")
    missing = [key for key in REQUIRED_MANIFEST_KEYS if key not in manifest]
    if missing:
        raise ManifestError(f"{path} lacks the key(s) {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has format_version {manifest['format_version']}; this diffit-pipe reads version {FORMAT_VERSION}"
        )
    if manifest["kind"] not in ("latents", "images"):
        raise ManifestError(f"{path} has an unknown kind {manifest['kind']!r}")
    return manifest


def shard_urls(directory: str | os.PathLike, manifest: dict[str, Any]) -> list[str]:
    """Paths of the shards that hold samples, in manifest order (empty shards, whose items all failed, are left out)."""
    return [str(Path(directory) / entry["name"]) for entry in manifest["shards"] if entry["count"] > 0]


def manifest_hash(directory: str | os.PathLike) -> str:
    """sha256 of the manifest file's bytes: identifies the exact dataset a model was trained on."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"no dataset manifest at {path}")
    return sha256_file(path)


def iter_samples(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard (dicts of `__key__` and member name → bytes), read with webdataset."""
    import webdataset as wds

    dataset = wds.WebDataset([str(path)], shardshuffle=False, empty_check=False)
    for sample in dataset:
        yield {k: v for k, v in sample.items() if k != "__url__" and k != "__local_path__"}


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode the members of a raw sample: arrays for `mean.npy` / `std.npy` / `png`, int `cls`, dict `json`."""
    decoded: dict[str, Any] = {"__key__": sample["__key__"]}
    for name, value in sample.items():
        if name.endswith(".npy"):
            decoded[name] = np.load(io.BytesIO(value), allow_pickle=False)
        elif name == "png":
            from PIL import Image

            with Image.open(io.BytesIO(value)) as image:
                decoded[name] = np.asarray(image.convert("RGB"))
        elif name == "cls":
            decoded[name] = int(value.decode("ascii"))
        elif name == "json":
            decoded[name] = json.loads(value)
    return decoded
