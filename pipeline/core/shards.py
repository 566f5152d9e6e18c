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

Readers: `load_manifest(dir)`, `shard_urls(dir, manifest)`, `manifest_hash(dir)`, `iter_samples(path)` and
`decode_sample(sample)`.

A dataset may come from anyone, so readers trust nothing in it: `load_manifest` refuses a shard name that is not
a plain `shard-NNNNNN.tar` (no scheme such as webdataset's `pipe:`, no separator, no `..`) and values that do not
add up (`check_manifest_values`); `shard_urls` returns absolute local paths (or URLs under the dataset's own
prefix); `iter_samples` opens the file itself (never through webdataset's URL handlers); `decode_sample` refuses
arrays whose header claims more data than the member holds and images over Pillow's pixel limit.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.core.atomic import json_text, write_bytes_atomic
from pipeline.core.errors import InputError
from pipeline.core.latent_stats import MAX_LATENT_CHANNELS, STATS_KEY, manifest_stats_problems
from pipeline.core.storage import Location, open_for_reading
from pipeline.core.storage import open_regular_file as open_regular_file  # moved to storage; kept importable here

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FAILURES_NAME = "failures.jsonl"
# The members of a sample (see docs/architecture.md, "Data formats"), by name everywhere they are read or written.
MEAN_MEMBER, STD_MEMBER, IMAGE_MEMBER, LABEL_MEMBER, META_MEMBER = "mean.npy", "std.npy", "png", "cls", "json"
LATENT_MEMBERS = (MEAN_MEMBER, STD_MEMBER, LABEL_MEMBER, META_MEMBER)
IMAGE_MEMBERS = (IMAGE_MEMBER, LABEL_MEMBER, META_MEMBER)
REQUIRED_MANIFEST_KEYS = ("format_version", "kind", "resolution", "num_classes", "label_map", "counts", "shards")
_HASH_BLOCK = 1 << 20
# The only file names a manifest may list: what `shard_name` writes. ASCII digits only (`\d` would accept other
# scripts' digits); nothing else can be a URL scheme, a path separator, `..`, an option or a control character.
SHARD_NAME_PATTERN = re.compile(r"shard-[0-9]{6,}\.tar", re.ASCII)
SIDECAR_NAME_PATTERN = re.compile(r"shard-[0-9]{6,}\.json", re.ASCII)
MAX_RESOLUTION = 65536  # pixels per side: far above any dataset, far below what overflows a shape computation
MAX_SCALING_FACTOR = 10.0  # SD VAEs use 0.18215 / 0.13025; anything above 10 is a damaged or crafted manifest
_MAX_LISTED_PROBLEMS = 5  # a one-line error names this many problems, then counts the rest


class ManifestError(InputError):
    """A dataset directory cannot be read: no usable manifest (missing, not JSON, wrong version, missing keys)
    or a damaged failures file."""


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
        MEAN_MEMBER: npy_bytes(mean.astype(np.float16)),
        STD_MEMBER: npy_bytes(std.astype(np.float16)),
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


# ----------------------------------------------------------------------------------------------------------------
# Manifest values


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shard_entry_problems(shards: Any) -> list[str]:
    """Every shard entry: a valid, unique file name, counts and sizes that are non-negative ints, a hex sha256."""
    if not isinstance(shards, list):
        return [f"shards is {type(shards).__name__}, expected a list of entries"]
    problems, names = [], set()
    for position, entry in enumerate(shards):
        if not isinstance(entry, dict):
            problems.append(f"shards[{position}] is not an object")
            continue
        name = entry.get("name")
        if not is_shard_name(name):
            problems.append(f"shards[{position}] has the name {name!r}, not a plain shard file name (shard-NNNNNN.tar)")
        elif name in names:
            problems.append(f"shards[{position}] lists {name} a second time")
        names.add(name)
        if not (_is_count(entry.get("count")) and _is_count(entry.get("bytes"))):
            problems.append(f"shards[{position}] count / bytes must be non-negative integers")
        sha = entry.get("sha256")
        if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha, re.ASCII)):
            problems.append(f"shards[{position}] sha256 {sha!r} is not a hex sha256")
    return problems


def _count_problems(counts: Any, shards: list[dict[str, Any]]) -> list[str]:
    """seen == written + failed, and written == the samples the shard entries hold."""
    if not isinstance(counts, dict) or not all(_is_count(counts.get(key)) for key in ("seen", "written", "failed")):
        return [f"counts {counts!r} must hold non-negative integers seen, written and failed"]
    problems = []
    if counts["seen"] != counts["written"] + counts["failed"]:
        problems.append(
            f"counts do not add up: seen {counts['seen']} != written {counts['written']} + failed {counts['failed']}"
        )
    held = sum(entry["count"] for entry in shards)
    if held != counts["written"]:
        problems.append(f"the shards hold {held} samples but counts.written is {counts['written']}")
    return problems


def _class_problems(num_classes: Any, label_map: Any) -> list[str]:
    """num_classes >= 0 and label_map a {name: index} map of exactly the indices 0 .. num_classes - 1."""
    if not (_is_int(num_classes) and num_classes >= 0):
        return [f"num_classes {num_classes!r} is not a non-negative integer"]
    if not isinstance(label_map, dict) or not all(_is_int(value) for value in label_map.values()):
        return ["label_map must map class names to integer indices"]
    if sorted(label_map.values()) != list(range(num_classes)):
        return [f"label_map does not hold exactly the class indices 0..{num_classes - 1} (num_classes {num_classes})"]
    return []


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _vae_problems(vae: Any) -> list[str]:
    """The recorded VAE: an object whose scaling factor is finite and in (0, MAX_SCALING_FACTOR], and whose shift
    factor (SD3 / FLUX VAEs; absent in manifests written before it was recorded) is finite, |shift| <= the same."""
    if not isinstance(vae, dict):
        return ["vae is not an object"]
    factor = vae.get("scaling_factor")
    if "scaling_factor" in vae and not (_is_number(factor) and 0 < factor <= MAX_SCALING_FACTOR):
        return [f"vae.scaling_factor {factor!r} is not a finite number in (0, {MAX_SCALING_FACTOR:g}]"]
    shift = vae.get("shift_factor")
    if "shift_factor" in vae and not (_is_number(shift) and abs(shift) <= MAX_SCALING_FACTOR):
        return [f"vae.shift_factor {shift!r} is not a finite number of magnitude at most {MAX_SCALING_FACTOR:g}"]
    return []


def _shape_problems(manifest: dict[str, Any]) -> list[str]:
    """Resolution in range; latent grid = resolution / the VAE's downsampling; stored shapes agree with both."""
    resolution = manifest["resolution"]
    if not (_is_int(resolution) and 1 <= resolution <= MAX_RESOLUTION):
        return [f"resolution {resolution!r} is not an integer in [1, {MAX_RESOLUTION}]"]
    problems = _vae_problems(manifest["vae"]) if "vae" in manifest else []
    if "image_shape" in manifest and manifest["image_shape"] != [resolution, resolution, 3]:
        problems.append(f"image_shape {manifest['image_shape']!r} is not [{resolution}, {resolution}, 3]")
    size, channels = manifest.get("latent_size"), manifest.get("latent_channels")
    for key, value in (("latent_size", size), ("latent_channels", channels)):
        if key in manifest and not (_is_int(value) and 1 <= value <= MAX_RESOLUTION):
            problems.append(f"{key} {value!r} is not a positive integer")
    if "latent_shape" in manifest and manifest["latent_shape"] != [2, channels, size, size]:
        problems.append(
            f"latent_shape {manifest['latent_shape']!r} is not [2, latent_channels, latent_size, latent_size]"
        )
    if STATS_KEY in manifest:  # per-channel statistics of the posterior means (`pipeline.core.latent_stats`)
        known = channels if _is_int(channels) else None
        problems += manifest_stats_problems(manifest[STATS_KEY], known, MAX_LATENT_CHANNELS)
    factor = manifest.get("vae", {}).get("downsample_factor") if isinstance(manifest.get("vae"), dict) else None
    if _is_int(factor) and _is_int(size) and factor > 0 and size * factor != resolution:
        problems.append(f"latent_size {size} x vae.downsample_factor {factor} != resolution {resolution}")
    return problems


def manifest_value_problems(manifest: dict[str, Any]) -> list[str]:
    """What is wrong with the values of a manifest that has every required key; [] when they are sane."""
    problems = _shard_entry_problems(manifest["shards"])
    if not problems:  # the counts can only be added up over well-formed entries
        problems += _count_problems(manifest["counts"], manifest["shards"])
    return problems + _class_problems(manifest["num_classes"], manifest["label_map"]) + _shape_problems(manifest)


def check_manifest_values(manifest: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise ManifestError (one line naming `path` and the fields) when the manifest's values are not sane:
    unsafe shard names, counts that do not add up, impossible resolutions, shapes or VAE scaling factors, a
    label map that does not match num_classes. Everything that reads a dataset goes through this."""
    problems = manifest_value_problems(manifest)
    if problems:
        shown = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
        more = f" (and {len(problems) - _MAX_LISTED_PROBLEMS} more)" if len(problems) > _MAX_LISTED_PROBLEMS else ""
        raise ManifestError(f"{path}: {shown}{more}")


# ----------------------------------------------------------------------------------------------------------------
# Reading


def load_manifest(directory: str | os.PathLike | Location) -> dict[str, Any]:
    """Read and check `DIR/manifest.json` (DIR: a directory or an object-store URL); raises ManifestError naming
    the file when it is missing or invalid."""
    location = Location.of(directory)
    path = location.join(MANIFEST_NAME)
    try:
        data = location.read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        hint = ""
        if any(SIDECAR_NAME_PATTERN.fullmatch(name) for name in location.names()):
            hint = " (shards exist but the job did not finish: re-run the same encode/pack command to complete it)"
        raise ManifestError(f"no dataset manifest at {path}{hint}") from None
    return parse_manifest(data, path)


def parse_manifest(data: bytes, path: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest in `data`, the bytes of the manifest at `path` (named in errors); ManifestError when
    it is invalid. For callers that must use the very bytes they read (and hash, or copy)."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except ValueError as error:
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
    check_manifest_values(manifest, path)
    return manifest


def shard_urls(directory: str | os.PathLike | Location, manifest: dict[str, Any]) -> list[str]:
    """Absolute local paths (or object-store URLs) of the shards that hold samples, in manifest order (empty
    shards, whose items all failed, are left out).

    Absolute, so that no path can ever be read as a URL with another scheme (webdataset runs `pipe:CMD` through
    a shell), even for `--data .`; and every name is checked again, for manifests that did not come through
    `load_manifest`. Readers open these themselves (`open_for_reading`), never through webdataset's handlers.
    """
    location = Location.of(directory)
    urls = []
    for entry in manifest["shards"]:
        if not is_shard_name(entry.get("name")):
            raise ManifestError(
                f"{location.join(MANIFEST_NAME)}: shard name {entry.get('name')!r} is not a plain shard file name "
                "(shard-NNNNNN.tar)"
            )
        if entry["count"] > 0:
            urls.append(location.join(entry["name"]))
    return urls


def manifest_hash(directory: str | os.PathLike | Location) -> str:
    """sha256 of the manifest file's bytes: identifies the exact dataset a model was trained on."""
    location = Location.of(directory)
    try:
        return hashlib.sha256(location.read_bytes(MANIFEST_NAME)).hexdigest()
    except FileNotFoundError:
        raise ManifestError(f"no dataset manifest at {location.join(MANIFEST_NAME)}") from None


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


def load_npy_bytes(value: bytes, name: str = "array") -> np.ndarray:
    """An array from `.npy` bytes (no pickle), refusing a header that claims more data than the bytes hold (a
    crafted shape would otherwise make numpy allocate terabytes before it notices); ValueError naming `name`."""
    buffer = io.BytesIO(value)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(buffer)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(buffer)
        else:
            raise ValueError(f".npy format version {version} is not supported")
    except (ValueError, TypeError, SyntaxError) as error:
        raise ValueError(f"{name}: not a valid .npy array ({error})") from error
    needed = math.prod(shape) * dtype.itemsize
    if dtype.hasobject or needed != len(value) - buffer.tell():
        raise ValueError(
            f"{name}: .npy header says {list(shape)} {dtype}, which does not match the {len(value)} bytes stored"
        )
    return np.load(io.BytesIO(value), allow_pickle=False)


def _decode_png(value: bytes, name: str) -> np.ndarray:
    """RGB pixels of a PNG member; ValueError for images Pillow refuses as too large (decompression bombs)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(value)) as image:
            return np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError as error:
        raise ValueError(f"{name}: {error}") from error


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode the members of a raw sample: arrays for `mean.npy` / `std.npy` / `png`, int `cls`, dict `json`."""
    decoded: dict[str, Any] = {"__key__": sample["__key__"]}
    for name, value in sample.items():
        if name.endswith(".npy"):
            decoded[name] = load_npy_bytes(value, f"{sample['__key__']}.{name}")
        elif name == "png":
            decoded[name] = _decode_png(value, f"{sample['__key__']}.png")
        elif name == "cls":
            decoded[name] = int(value.decode("ascii"))
        elif name == "json":
            decoded[name] = json.loads(value)
    return decoded
