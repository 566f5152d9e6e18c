"""What the encode / pack job's OUT already holds (the driver side, `pipeline.encode.job`).

`check_overwrite`: nothing, or an earlier run - finished or interrupted - of the same job, which is resumed.
Anything this job would destroy needs `overwrite`: a manifest of another dataset (other kind, source directory,
resolution, transform settings or VAE), or a finished shard (one with a sidecar, or one the manifest lists) that
this job would rewrite with other items or settings, or would delete because this job writes fewer shards
(`--limit`, a larger `--shard-size`). Leftovers that never formed a finished shard (temporary files, a tar without
its sidecar) are cleaned up. One job per output directory (`output_lock`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.core.errors import InputError
from pipeline.core.manifest import MANIFEST_NAME
from pipeline.core.shard_members import IMAGE_MEMBER
from pipeline.core.shards import FAILURES_NAME, SHARD_NAME_PATTERN, SIDECAR_NAME_PATTERN, shard_name
from pipeline.core.storage import Location
from pipeline.core.storage_io import StorageError
from pipeline.core.stored_targets import REPA_TARGETS_KEY
from pipeline.encode.plan import (
    ShardTask,
)

logger = logging.getLogger(__name__)


class JobError(InputError):
    """The job cannot start (bad settings, output in use) or could not finish every shard."""


# ----------------------------------------------------------------------------------------------------------------
# Driver side: what OUT holds


@contextmanager
def output_lock(out: Location) -> Iterator[None]:
    """Hold an exclusive lock on the output directory so two jobs never write the same shards (object stores
    have no locks: see `pipeline.core.storage`)."""
    try:
        lock = out.lock()
        lock.__enter__()
    except StorageError as error:
        raise JobError(str(error)) from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _shard_number(name: str) -> int | None:
    """The index of a shard tar or sidecar file name (`shard-000042.tar` → 42), None for any other file."""
    if SHARD_NAME_PATTERN.fullmatch(name) or SIDECAR_NAME_PATTERN.fullmatch(name):
        return int(name[len("shard-") :].split(".")[0])
    return None


def read_json_object(out: Location, name: str) -> dict[str, Any] | None:
    """A JSON object from the file `name` in `out`; None when it is missing. Not an object or unreadable:
    {"": error}."""
    try:
        value = json.loads(out.read_bytes(name).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return {"": str(error)}
    return value if isinstance(value, dict) else {"": "not a JSON object"}


def same_dataset(previous: dict[str, Any], manifest: dict[str, Any]) -> bool:
    """True when two manifests describe the same dataset: equal but for when and by which command line."""
    volatile = ("created", "command")
    return {k: v for k, v in previous.items() if k not in volatile} == {
        k: v for k, v in manifest.items() if k not in volatile
    }


def _recorded_targets(entry: Any) -> dict[str, Any] | None:
    """The identity of the stored targets a manifest records (`TargetsSpec.identity`), None without them."""
    if not isinstance(entry, dict):
        return None
    return {key: entry.get(key) for key in ("encoder", "weights_sha256", "input_grid")}


def _manifest_conflict(out: Location, identity: dict[str, Any]) -> str | None:
    """Why the manifest in `out` describes another dataset than `identity` (kind, source, resolution,
    transform, VAE of this job), or None when there is none or it is this job's."""
    manifest = read_json_object(out, MANIFEST_NAME)
    if manifest is None:
        return None
    if "" in manifest:
        return f"{out.join(MANIFEST_NAME)} cannot be read ({manifest['']}), so it may describe another dataset"
    source = manifest.get("source")
    vae = manifest.get("vae")
    recorded = {
        "kind": manifest.get("kind"),
        "source": source.get("root") if isinstance(source, dict) else None,
        "resolution": manifest.get("resolution"),
        "transform": manifest.get("transform"),
        "vae": [vae.get("path_hash"), vae.get("dtype")] if isinstance(vae, dict) else None,
        "keep_images": manifest.get("kind") == "latents" and IMAGE_MEMBER in (manifest.get("members") or []),
        "encoder_targets": _recorded_targets(manifest.get(REPA_TARGETS_KEY)),
    }
    differing = [key for key in identity if recorded[key] != identity[key]]
    if not differing:
        return None
    first = differing[0]
    return (
        f"{out.join(MANIFEST_NAME)} describes another dataset ({', '.join(differing)} differ; e.g. {first} "
        f"{recorded[first]!r}, this job {identity[first]!r})"
    )


def _finished_shard_indices(out: Location, sidecars: dict[int, dict[str, Any] | None]) -> set[int]:
    """Shards of an earlier job that were finished: those with a sidecar, and those the manifest lists."""
    indices = set(sidecars)
    manifest = read_json_object(out, MANIFEST_NAME)
    if manifest and isinstance(manifest.get("shards"), list):
        for entry in manifest["shards"]:
            name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str) and SHARD_NAME_PATTERN.fullmatch(name):
                indices.add(_shard_number(name))
    return indices


def overwrite_conflicts(
    out: Location, identity: dict[str, Any], tasks: list[ShardTask], sidecars: dict[int, dict[str, Any] | None]
) -> list[str]:
    """What in `out` this job would destroy that is not its own earlier work (see the module docstring);
    `sidecars`: the sidecars in `out` by shard index (`read_sidecars`)."""
    conflicts = []
    manifest = _manifest_conflict(out, identity)
    if manifest:
        conflicts.append(manifest)
    fingerprints = {task.index: task.fingerprint for task in tasks}
    for index in sorted(_finished_shard_indices(out, sidecars)):
        if index not in fingerprints:
            conflicts.append(f"{shard_name(index)} would be deleted (this job writes {len(tasks)} shard(s))")
            continue
        sidecar = sidecars.get(index)
        if sidecar is not None and sidecar.get("fingerprint") != fingerprints[index]:
            conflicts.append(f"{shard_name(index)} holds other items or settings and would be rewritten")
    return conflicts


def check_overwrite(
    out: Location,
    identity: dict[str, Any],
    tasks: list[ShardTask],
    sidecars: dict[int, dict[str, Any] | None],
    overwrite: bool,
) -> None:
    """Refuse to destroy another dataset in `out` unless `overwrite` (then say what is replaced)."""
    conflicts = overwrite_conflicts(out, identity, tasks, sidecars)
    if not conflicts:
        return
    more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
    if overwrite:
        logger.warning("--overwrite: replacing what %s holds: %s%s", out, conflicts[0], more)
        return
    raise JobError(
        f"{out} holds another dataset: {conflicts[0]}{more}; nothing was changed. Pass --overwrite to replace "
        "it, or choose another OUT"
    )


def prepare_output(out: Location, num_shards: int) -> None:
    """Clear what a previous run left that is not a reusable shard: temp files, the manifest, stale shards
    (`check_overwrite` has made sure that they are this job's own or that --overwrite was given)."""
    removed = out.remove_temporary_files()
    if removed:
        logger.info("removed %d temporary file(s) of an interrupted run in %s", len(removed), out)
    for name in (MANIFEST_NAME, FAILURES_NAME):
        # The manifest marks a complete dataset; it is written again at the end of this run.
        out.remove(name)
    numbered = ((name, _shard_number(name)) for name in out.names())
    stale = [name for name, number in numbered if number is not None and number >= num_shards]
    if stale:
        logger.warning(
            "removing %d shard file(s) of a previous, larger run in %s (first: %s)", len(stale), out, stale[0]
        )
        for name in stale:
            out.remove(name)
