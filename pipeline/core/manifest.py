"""The dataset manifest (`manifest.json`, written last by encode / pack): its name and format version, the keys it
must hold, the checks of its values that every reader goes through (`check_manifest_values`: safe shard names,
counts that add up, sane resolutions, shapes and VAE factors, a label map matching num_classes), and reading it
(`load_manifest`, `parse_manifest`, `shard_urls`, `manifest_hash`). A manifest that cannot be used is a
`ManifestError`. The shards and sidecars it lists are `pipeline.core.shards`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from typing import Any

from pipeline.core.errors import InputError
from pipeline.core.latent_stats import MAX_LATENT_CHANNELS, STATS_KEY, manifest_stats_problems
from pipeline.core.shards import SIDECAR_NAME_PATTERN, _is_count, is_shard_name
from pipeline.core.storage import Location
from pipeline.core.stored_targets import REPA_TARGETS_KEY, targets_entry_problems

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REQUIRED_MANIFEST_KEYS = ("format_version", "kind", "resolution", "num_classes", "label_map", "counts", "shards")
MAX_RESOLUTION = 65536  # pixels per side: far above any dataset, far below what overflows a shape computation
MAX_SCALING_FACTOR = 10.0  # SD VAEs use 0.18215 / 0.13025; anything above 10 is a damaged or crafted manifest
_MAX_LISTED_PROBLEMS = 5  # a one-line error names this many problems, then counts the rest


class ManifestError(InputError):
    """A dataset directory cannot be read: no usable manifest (missing, not JSON, wrong version, missing keys)
    or a damaged failures file."""


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
    if REPA_TARGETS_KEY in manifest:  # REPA's stored targets (`pipeline.core.stored_targets`)
        problems += targets_entry_problems(manifest[REPA_TARGETS_KEY])
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
