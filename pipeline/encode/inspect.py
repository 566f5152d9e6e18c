"""`diffit-pipe inspect`: summarise, verify and preview a dataset written by `encode` or `pack`.

- `summarize(dir)` reads the manifest, the failures file and the shard sizes (no shard is opened);
- `verify_dataset(dir)` (from `pipeline.core.dataset_verify`) re-hashes every shard against the manifest and sidecars;
- `write_preview(dir, png)` decodes the first few latents through the VAE recorded in the manifest (raw image
  datasets: the images themselves) and saves them as one PNG grid.
"""

from __future__ import annotations

import collections
import json
import os
import re
import tarfile
from typing import Any

import numpy as np

from pipeline.core.errors import InputError
from pipeline.core.grids import image_grid, write_png
from pipeline.core.manifest import ManifestError, load_manifest, shard_urls
from pipeline.core.shard_members import decode_sample
from pipeline.core.shards import FAILURES_NAME, iter_samples
from pipeline.core.storage import Location
from pipeline.core.stored_targets import REPA_TARGETS_KEY

PREVIEW_PADDING = 2  # white pixels between (and around) the preview's images
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class PreviewError(InputError):
    """A preview cannot be made (no samples, or the recorded VAE is not available / not the same)."""


def _reason_group(reason: str) -> str:
    """The general part of a failure reason: `corrupt or truncated image data (...)` → `corrupt or truncated
    image data`."""
    return reason.split(" (")[0].split(": ")[0]


def read_failures(directory: str | os.PathLike | Location) -> list[dict[str, Any]]:
    """The records of `failures.jsonl` (empty when every item was written)."""
    location = Location.of(directory)
    path = location.join(FAILURES_NAME)
    try:
        text = location.read_bytes(FAILURES_NAME).decode("utf-8")
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        raise ManifestError(f"{path}: cannot read ({error})") from error
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise ManifestError(f"{path}: line {number} is not JSON ({error})") from error
        if not isinstance(record, dict) or not all(isinstance(record.get(key), str) for key in ("path", "reason")):
            raise ManifestError(f"{path}: line {number} is not a failure record (needs 'path' and 'reason' texts)")
        records.append(record)
    return records


def summarize(directory: str | os.PathLike) -> dict[str, Any]:
    """Facts about a dataset: counts, classes, shards, bytes, failure reasons, VAE."""
    directory = Location.of(directory)
    manifest = load_manifest(directory)
    failures = read_failures(directory)
    reasons = collections.Counter(_reason_group(f["reason"]) for f in failures)
    examples = {}
    for failure in failures:
        examples.setdefault(_reason_group(failure["reason"]), failure["path"])
    return {
        "directory": directory.url,
        "kind": manifest["kind"],
        "format_version": manifest["format_version"],
        "resolution": manifest["resolution"],
        "counts": manifest["counts"],
        "failure_rate": manifest.get("failure_rate"),
        "num_classes": manifest["num_classes"],
        "label_map": manifest["label_map"],
        "shards": len(manifest["shards"]),
        "empty_shards": sum(1 for entry in manifest["shards"] if entry["count"] == 0),
        "bytes": sum(entry["bytes"] for entry in manifest["shards"]),
        "failure_reasons": [(reason, count, examples[reason]) for reason, count in reasons.most_common()],
        "vae": manifest.get("vae"),
        "repa_targets": manifest.get(REPA_TARGETS_KEY),
        "sample_shape": manifest.get("latent_shape") or manifest.get("image_shape"),
        "source": source.get("root") if isinstance(source := manifest.get("source"), dict) else None,
        "created": manifest.get("created"),
        "command": manifest.get("command"),
    }


def _human_bytes(count: int) -> str:
    """1234567 → `1.2 MB`."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1000
    return f"{count} B"


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable lines for `summarize` output."""
    counts = summary["counts"]
    rate = counts["failed"] / counts["seen"] if counts["seen"] else 0.0
    names = list(summary["label_map"])
    classes = f"{summary['num_classes']}" + (
        f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else " (unlabelled, class -1)"
    )
    lines = [
        f"dataset    {summary['directory']}",
        f"kind       {summary['kind']} (format {summary['format_version']}), resolution {summary['resolution']}, "
        f"sample {summary['sample_shape']}",
        f"items      {counts['written']} written / {counts['seen']} seen / {counts['failed']} failed ({rate:.2%})",
        f"classes    {classes}",
        f"shards     {summary['shards']} ({summary['empty_shards']} empty), {_human_bytes(summary['bytes'])}",
        f"source     {summary['source']}",
    ]
    vae = summary["vae"]
    if isinstance(vae, dict):
        identity = f"revision {vae['revision']}" if vae.get("revision") else f"sha256 {str(vae.get('path_hash'))[:16]}"
        lines.append(
            f"vae        {vae.get('id')} ({identity}), scaling_factor {vae.get('scaling_factor')}, "
            f"dtype {vae.get('dtype')}, stored {vae.get('convention')}"
        )
    targets = summary.get("repa_targets")
    if isinstance(targets, dict):  # REPA's stored targets (`encode --encoder-targets`)
        lines.append(
            f"repa       {targets.get('encoder')} targets (weights sha256 {str(targets.get('weights_sha256'))[:16]}), "
            f"{targets.get('dtype')} {targets.get('shape')} per sample, for a {targets.get('input_grid')} token grid"
        )
    if summary["failure_reasons"]:
        lines.append(
            "failures   "
            + "; ".join(
                f"{count} x {reason} (e.g. {example})" for reason, count, example in summary["failure_reasons"][:6]
            )
        )
    lines.append(f"created    {summary['created']} by: {summary['command']}")
    return "\n".join(_printable(line) for line in lines)


def _printable(text: str) -> str:
    """`text` with control characters (terminal escape sequences from a crafted manifest) shown as `?`."""
    return _CONTROL_CHARACTERS.sub("?", text)


def first_samples(directory: str | os.PathLike, count: int) -> list[dict[str, Any]]:
    """The first `count` decoded samples in shard order."""
    directory = Location.of(directory)
    manifest = load_manifest(directory)
    samples: list[dict[str, Any]] = []
    for url in shard_urls(directory, manifest):
        try:
            for sample in iter_samples(url):
                samples.append(decode_sample(sample))
                if len(samples) >= count:
                    return samples
        except (OSError, ValueError, KeyError, tarfile.TarError) as error:
            # A damaged shard (`inspect --verify` says which bytes differ); PIL's decode errors are OSErrors.
            raise PreviewError(f"{url}: cannot read its samples ({type(error).__name__}: {error})") from error
    return samples


def _recorded_vae_spec(recorded: Any):
    """The VAE a manifest's `vae` entry names: its hub id and revision, or its local path when the files there
    still have the recorded sha256."""
    from pipeline.core.vae import VAEError, resolve_vae

    where = "id" if isinstance(recorded, dict) and recorded.get("source") == "hub" else "path"
    if not isinstance(recorded, dict) or not isinstance(recorded.get(where), str):
        raise PreviewError("the manifest of these latents records no usable VAE; pass --vae PATH")
    if where == "id":
        return resolve_vae(recorded["id"], recorded.get("revision"))
    try:
        spec = resolve_vae(recorded["path"])
    except VAEError as error:
        raise PreviewError(f"the VAE recorded in the manifest is not available ({error}); pass --vae PATH") from error
    if spec.path_hash != recorded.get("path_hash"):
        raise PreviewError(
            f"the VAE at {recorded['path']} is not the one the latents were made with (sha256 differs); "
            "pass the right one with --vae PATH"
        )
    return spec


def _recorded_vae(manifest: dict[str, Any], override: str | None):
    """Load the VAE the latents were made with (or `override`), refusing a local VAE whose files changed."""
    from pipeline.core.vae import get_vae, resolve_vae

    spec = resolve_vae(override) if override else _recorded_vae_spec(manifest.get("vae"))
    try:
        return get_vae(spec.local_path, "fp32", "cpu")
    except (OSError, ValueError, RuntimeError) as error:  # diffusers: unreadable files, weights that do not fit
        raise PreviewError(f"{spec.local_path}: cannot load the VAE ({error})") from error


def write_preview(
    directory: str | os.PathLike, png_path: str | os.PathLike, count: int = 16, vae: str | None = None
) -> int:
    """Save a grid of the first `count` samples (latents decoded through the VAE) to `png_path`; returns the
    number shown."""
    manifest = load_manifest(directory)
    samples = first_samples(directory, count)
    if not samples:
        raise PreviewError(f"{directory} holds no samples to preview")
    if manifest["kind"] == "latents":
        from pipeline.core.vae import decode_latents

        model = _recorded_vae(manifest, vae)
        latents = np.stack([s["mean.npy"][0].astype(np.float32) for s in samples])
        images = decode_latents(model, latents)
    else:
        images = np.stack([s["png"] for s in samples])
    write_png(png_path, image_grid(images, padding=PREVIEW_PADDING, pad_value=255))
    return len(samples)
