"""The encode / pack job: source images → center crops → (SD-VAE latents | PNG) → WebDataset shards, on Dask.

The driver (`run_job`) scans the source, checks the VAE before any work, plans one task per output shard
(items `k * shard_size ... (k + 1) * shard_size - 1` in sorted order go to shard `k`), runs the tasks on a Dask
cluster and, once every shard is done, writes `failures.jsonl` and then `manifest.json` (the manifest is the
"dataset complete" marker, so it is removed when a job starts and written last).

A task (`encode_shard`) first checks whether its shard is already done: sidecar present, same fingerprint (the
items with their sizes and modification times, the resolution, transform, VAE hash and dtype) and the tar's
sha256 matches. If so it returns the sidecar (resume after a kill); otherwise it decodes, crops and encodes its
items in batches, streams the samples into a temporary tar and commits it with its sidecar. Bad items become
failure records; they never stop the task. The VAE is fetched with `pipeline.core.vae.get_vae`, cached per worker
process.

What OUT may already hold (`check_overwrite`): nothing, or an earlier run - finished or interrupted - of the same
job, which is resumed. Anything this job would destroy needs `overwrite`: a manifest of another dataset (other
kind, source directory, resolution, transform settings or VAE), or a finished shard (one with a sidecar, or one
the manifest lists) that this job would rewrite with other items or settings, or would delete because this job
writes fewer shards (`--limit`, a larger `--shard-size`). Leftovers that never formed a finished shard (temporary
files, a tar without its sidecar) are cleaned up as before.

Dask: by default a `LocalCluster` of `workers` processes with one thread each (torch limited to
cores // workers threads), or an existing cluster via `scheduler="tcp://host:port"` (the source, the output and
the VAE directory must then be visible at the same paths on every worker). A worker that dies takes its task
with it; the scheduler runs the task again elsewhere (`retries` covers exceptions inside a task too). Shards
whose task still fails are reported by name and the job ends without a manifest; re-running redoes just them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shlex
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.core.atomic import remove_temporary_files, write_json_atomic
from pipeline.core.errors import InputError
from pipeline.core.shards import (
    FAILURES_NAME,
    FORMAT_VERSION,
    IMAGE_MEMBERS,
    LATENT_MEMBERS,
    MANIFEST_NAME,
    SHARD_NAME_PATTERN,
    SIDECAR_NAME_PATTERN,
    ShardWriter,
    image_sample,
    json_bytes,
    latent_sample,
    read_sidecar,
    shard_name,
    shard_problems,
    sidecar_name,
    write_lines_atomic,
)
from pipeline.core.vae import DEFAULT_VAE, VAESpec, resolve_vae
from pipeline.encode.sources import Source, SourceItem, read_item_bytes, scan_source
from pipeline.encode.transforms import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    compose_crop_box,
    prepare_image,
    transform_spec,
)

logger = logging.getLogger(__name__)

LOCK_NAME = ".diffit-pipe.lock"
LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
}


class JobError(InputError):
    """The job cannot start (bad settings, output in use) or could not finish every shard."""


@dataclass
class JobConfig:
    """Settings of one encode (kind="latents") or pack (kind="images") job."""

    source: str
    out: str
    kind: str = "latents"
    resolution: int = 256
    vae: str = DEFAULT_VAE
    vae_revision: str | None = None
    shard_size: int = 1000
    batch_size: int = 32
    workers: int = 1  # 0: run the tasks inside this process (Dask threads, no worker processes)
    scheduler: str | None = None
    dtype: str = "fp32"
    torch_threads: int | None = None  # torch intra-op threads per worker; None: cores // workers
    device: str = "auto"
    max_failure_rate: float = 0.001
    limit: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    retries: int = 2
    progress: bool = True
    command: str = ""
    overwrite: bool = False  # replace a different dataset in `out` (see the module docstring)


@dataclass
class ShardTask:
    """Everything one worker needs to produce one shard (pickled to the worker)."""

    index: int
    items: list[SourceItem]
    root: str
    out: str
    kind: str
    resolution: int
    max_pixels: int
    batch_size: int
    fingerprint: str
    vae_path: str | None
    dtype: str
    device: str
    torch_threads: int | None
    progress_topic: str | None


@dataclass
class JobResult:
    """What a job did: the manifest (None when some shard failed), shard tallies and the failure rate."""

    out: str
    manifest: dict[str, Any] | None
    shards_total: int
    shards_written: int = 0
    shards_skipped: int = 0
    failed_shards: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    failure_rate: float = 0.0
    max_failure_rate: float = 0.0
    elapsed_s: float = 0.0

    @property
    def failure_rate_exceeded(self) -> bool:
        """True when more items failed than `--max-failure-rate` allows."""
        return self.failure_rate > self.max_failure_rate

    @property
    def ok(self) -> bool:
        """True when every shard was produced and the failure rate is within the limit."""
        return not self.failed_shards and not self.failure_rate_exceeded


# ----------------------------------------------------------------------------------------------------------------
# Worker side


def _report_progress(topic: str | None, index: int, done: int) -> None:
    """Tell the driver how many items of shard `index` are done (a Dask event; no-op outside a worker)."""
    if topic is None:
        return
    try:
        from distributed import get_worker

        get_worker().log_event(topic, {"shard": index, "done": done})
    except ValueError:  # not running inside a Dask worker (direct call in tests or benchmarks)
        return


def _default_torch_threads() -> int:
    """cores // Dask threads of this worker: what a task may use without oversubscribing its machine."""
    cores = _local_cores()
    try:
        from distributed import get_worker

        nthreads = get_worker().state.nthreads
    except (ValueError, AttributeError):
        nthreads = 1
    return max(1, cores // max(1, nthreads))


def _sample_meta(item: SourceItem, record: dict[str, Any]) -> dict[str, Any]:
    """The `json` member of a sample: source path, original size, crop box (in the original's pixels)."""
    if item.packed_meta is None:
        return {"source": item.path, **record}
    packed = item.packed_meta
    box = record["crop_box"]
    if "crop_box" in packed and "original_size" in packed:
        box = compose_crop_box(packed["crop_box"], record["crop_box"], tuple(record["original_size"]))
    return {
        "source": packed.get("source", item.path),
        "packed_from": item.path,
        "original_size": packed.get("original_size", record["original_size"]),
        "crop_box": box,
        "mode": packed.get("mode", record["mode"]),
        "format": packed.get("format", record["format"]),
        "orientation": packed.get("orientation", record["orientation"]),
        "frames": packed.get("frames", record["frames"]),
    }


def _failure(item: SourceItem, root: str, reason: str) -> dict[str, Any]:
    """A failures.jsonl record: item index, its path (absolute for files), the sample key and the reason."""
    if item.shard_file is not None:
        path = f"{item.shard_file}#{item.key}"
    else:
        path = os.path.join(root, item.path)
    return {"index": item.index, "path": path, "key": item.key, "reason": reason}


def _prepare(item: SourceItem, task: ShardTask) -> tuple[np.ndarray, dict[str, Any]]:
    """Read and crop one item; raises ImageDecodeError with the reason when the item cannot be used."""
    try:
        data = read_item_bytes(item, task.root)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ImageDecodeError(f"cannot read the file: {reason}") from error
    pixels, record = prepare_image(data, task.resolution, task.max_pixels)
    return pixels, _sample_meta(item, record)


def _existing_shard(task: ShardTask) -> dict[str, Any] | None:
    """The sidecar of this shard when a previous run already produced it with the same fingerprint, intact."""
    sidecar = read_sidecar(task.out, task.index)
    if sidecar is None or sidecar.get("fingerprint") != task.fingerprint:
        return None
    if shard_problems(task.out, sidecar):
        return None
    return sidecar


def encode_shard(task: ShardTask) -> dict[str, Any]:
    """Produce (or find already done) shard `task.index`; returns its sidecar plus `"skipped": bool`."""
    existing = _existing_shard(task)
    if existing is not None:
        _report_progress(task.progress_topic, task.index, len(task.items))
        return {**existing, "skipped": True}

    vae = None
    if task.kind == "latents":
        from pipeline.core.vae import get_vae, pick_device, set_torch_threads

        set_torch_threads(task.torch_threads or _default_torch_threads())
        vae = get_vae(task.vae_path, task.dtype, pick_device(task.device))

    failures: list[dict[str, Any]] = []
    done = 0
    with ShardWriter(task.out, task.index) as writer:
        for start in range(0, len(task.items), task.batch_size):
            batch = task.items[start : start + task.batch_size]
            ready = []
            for item in batch:
                try:
                    pixels, meta = _prepare(item, task)
                except ImageDecodeError as error:
                    failures.append(_failure(item, task.root, str(error)))
                    continue
                ready.append((item, pixels, meta))
            _write_batch(writer, vae, ready, failures, task)
            done += len(batch)
            _report_progress(task.progress_topic, task.index, done)
        sidecar = writer.commit(
            {
                "fingerprint": task.fingerprint,
                "items": len(task.items),
                "first_item": task.items[0].index if task.items else None,
                "failures": failures,
            }
        )
    return {**sidecar, "skipped": False}


def _write_batch(writer: ShardWriter, vae, ready: list, failures: list, task: ShardTask) -> None:
    """Encode one batch of crops (latents) or PNG-compress them (images) and append the samples in item order."""
    if not ready:
        return
    if task.kind == "images":
        for item, pixels, meta in ready:
            writer.write(image_sample(item.key, pixels, item.label, meta))
        return
    from pipeline.core.vae import encode_pixels

    mean, std = encode_pixels(vae, np.stack([pixels for _, pixels, _ in ready]))
    mean16, std16 = mean.astype(np.float16), std.astype(np.float16)
    for j, (item, _, meta) in enumerate(ready):
        if not (np.isfinite(mean16[j]).all() and np.isfinite(std16[j]).all()):
            failures.append(_failure(item, task.root, "VAE output is not finite in float16 (NaN or overflow)"))
            continue
        writer.write(latent_sample(item.key, mean16[j], std16[j], item.label, meta))


# ----------------------------------------------------------------------------------------------------------------
# Driver side


def plan_shards(items: list[SourceItem], shard_size: int) -> list[list[SourceItem]]:
    """Split the ordered items into consecutive shards of `shard_size` (the last one may be shorter)."""
    if shard_size < 1:
        raise JobError(f"--shard-size must be at least 1, got {shard_size}")
    return [items[start : start + shard_size] for start in range(0, len(items), shard_size)]


def shard_fingerprint(settings: dict[str, Any], index: int, items: list[SourceItem]) -> str:
    """sha256 of what determines a shard's content: job settings, shard index and its items' identities."""
    digest = hashlib.sha256(json_bytes(settings))
    digest.update(json_bytes([index, [item.fingerprint_fields() for item in items]]))
    return digest.hexdigest()


@contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on the output directory so two jobs never write the same shards."""
    import fcntl

    try:
        handle = open(out / LOCK_NAME, "a")
    except OSError as error:
        raise JobError(f"cannot write to the output directory {out}: {error.strerror or error}") from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.close()
        raise JobError(f"another diffit-pipe job is writing to {out} (lock {out / LOCK_NAME} is held)") from error
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _shard_number(path: Path) -> int | None:
    """The index of a shard tar or sidecar file name (`shard-000042.tar` → 42), None for any other file."""
    if SHARD_NAME_PATTERN.fullmatch(path.name) or SIDECAR_NAME_PATTERN.fullmatch(path.name):
        return int(path.name[len("shard-") :].split(".")[0])
    return None


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`; None when the file is missing. Not an object or unreadable: {"": error}."""
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError) as error:
        return {"": str(error)}
    return value if isinstance(value, dict) else {"": "not a JSON object"}


def _manifest_conflict(out: Path, identity: dict[str, Any]) -> str | None:
    """Why the manifest in `out` describes another dataset than `identity` (kind, source, resolution,
    transform, VAE of this job), or None when there is none or it is this job's."""
    manifest = _read_json_object(out / MANIFEST_NAME)
    if manifest is None:
        return None
    if "" in manifest:
        return f"{out / MANIFEST_NAME} cannot be read ({manifest['']}), so it may describe another dataset"
    source = manifest.get("source")
    vae = manifest.get("vae")
    recorded = {
        "kind": manifest.get("kind"),
        "source": source.get("root") if isinstance(source, dict) else None,
        "resolution": manifest.get("resolution"),
        "transform": manifest.get("transform"),
        "vae": [vae.get("path_hash"), vae.get("dtype")] if isinstance(vae, dict) else None,
    }
    differing = [key for key in identity if recorded[key] != identity[key]]
    if not differing:
        return None
    first = differing[0]
    return (
        f"{out / MANIFEST_NAME} describes another dataset ({', '.join(differing)} differ; e.g. {first} "
        f"{recorded[first]!r}, this job {identity[first]!r})"
    )


def _finished_shard_indices(out: Path) -> set[int]:
    """Shards of an earlier job that were finished: those with a sidecar, and those the manifest lists."""
    indices = {number for path in out.glob("shard-*.json") if (number := _shard_number(path)) is not None}
    manifest = _read_json_object(out / MANIFEST_NAME)
    if manifest and isinstance(manifest.get("shards"), list):
        for entry in manifest["shards"]:
            name = entry.get("name") if isinstance(entry, dict) else None
            if isinstance(name, str) and SHARD_NAME_PATTERN.fullmatch(name):
                indices.add(_shard_number(Path(name)))
    return indices


def overwrite_conflicts(out: Path, identity: dict[str, Any], tasks: list[ShardTask]) -> list[str]:
    """What in `out` this job would destroy that is not its own earlier work (see the module docstring)."""
    conflicts = []
    manifest = _manifest_conflict(out, identity)
    if manifest:
        conflicts.append(manifest)
    fingerprints = {task.index: task.fingerprint for task in tasks}
    for index in sorted(_finished_shard_indices(out)):
        if index not in fingerprints:
            conflicts.append(f"{shard_name(index)} would be deleted (this job writes {len(tasks)} shard(s))")
            continue
        sidecar = read_sidecar(out, index)
        if sidecar is not None and sidecar.get("fingerprint") != fingerprints[index]:
            conflicts.append(f"{shard_name(index)} holds other items or settings and would be rewritten")
    return conflicts


def check_overwrite(out: Path, identity: dict[str, Any], tasks: list[ShardTask], overwrite: bool) -> None:
    """Refuse to destroy another dataset in `out` unless `overwrite` (then say what is replaced)."""
    conflicts = overwrite_conflicts(out, identity, tasks)
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


def _prepare_output(out: Path, num_shards: int) -> None:
    """Clear what a previous run left that is not a reusable shard: temp files, the manifest, stale shards
    (`check_overwrite` has made sure that they are this job's own or that --overwrite was given)."""
    removed = remove_temporary_files(out)
    if removed:
        logger.info("removed %d temporary file(s) of an interrupted run in %s", len(removed), out)
    for name in (MANIFEST_NAME, FAILURES_NAME):
        # The manifest marks a complete dataset; it is written again at the end of this run.
        (out / name).unlink(missing_ok=True)
    numbered = ((path, _shard_number(path)) for path in sorted(out.glob("shard-*.*")))
    stale = [path for path, number in numbered if number is not None and number >= num_shards]
    if stale:
        logger.warning(
            "removing %d shard file(s) of a previous, larger run in %s (first: %s)", len(stale), out, stale[0].name
        )
        for path in stale:
            path.unlink()


def _local_cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def quiet_cluster_logs(level: int = logging.ERROR) -> Iterator[None]:
    """Keep a local cluster's chatter (an INFO line for every scheduler, nanny and worker event) off the terminal.

    LocalCluster's `silence_logs` only quiets the handler that distributed installs for itself, and distributed
    installs none when logging is already set up (`setup_logging` runs before distributed is imported): its
    records then reach the root handler. So the level of distributed's loggers is raised while the block runs
    (after distributed is imported: its import sets that level).
    """
    distributed_logger = logging.getLogger("distributed")
    previous = distributed_logger.level
    distributed_logger.setLevel(level)
    try:
        yield
    finally:
        distributed_logger.setLevel(previous)


@contextmanager
def _dask_client(cfg: JobConfig, client=None) -> Iterator[Any]:
    """A Dask client: the one given, a running cluster (`scheduler`), or a LocalCluster started here."""
    from distributed import Client, LocalCluster

    if client is not None:
        yield client
        return
    if cfg.scheduler:
        logger.info("connecting to the Dask scheduler at %s", cfg.scheduler)
        try:
            remote = Client(cfg.scheduler, timeout="30s")
        except OSError as error:
            raise JobError(f"cannot connect to the Dask scheduler at {cfg.scheduler}: {error}") from error
        with remote:
            yield remote
        return
    import dask

    processes = cfg.workers > 0
    n_workers = max(1, cfg.workers)
    logger.info(
        "starting a local Dask cluster: %d worker(s) x 1 thread (%s)",
        n_workers,
        "processes" if processes else "in-process",
    )
    # Without a dashboard nobody reads the statistical profiler (a stack sample every 10 ms) or frequent system
    # samples; turned off they stop taking CPU and the GIL from the encoding thread (an idle worker: 3% → 0.4%).
    with dask.config.set(LOCAL_CLUSTER_CONFIG), quiet_cluster_logs():
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=processes,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        try:
            with Client(cluster) as local:
                yield local
        finally:
            cluster.close()


class _Progress:
    """Items/s progress bar fed by per-batch events from the workers (and corrected when a shard completes)."""

    def __init__(self, total: int, enabled: bool, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.1)
        self.done: dict[int, int] = {}
        self.lock = threading.Lock()

    def update(self, shard: int, done: int) -> None:
        """Record that `done` items of `shard` are finished (events may repeat when a task is retried)."""
        with self.lock:
            previous = self.done.get(shard, 0)
            if done > previous:
                self.done[shard] = done
                self.bar.update(done - previous)

    def on_event(self, event) -> None:
        """Handler for Dask events `(timestamp, {"shard", "done"})`."""
        _, message = event
        self.update(int(message["shard"]), int(message["done"]))

    def close(self) -> None:
        self.bar.close()


def _settings_for_fingerprint(cfg: JobConfig, vae_spec: VAESpec | None) -> dict[str, Any]:
    """Job settings that change shard bytes (the batch size and worker count do not)."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": cfg.kind,
        "resolution": cfg.resolution,
        "transform": transform_spec(cfg.resolution, cfg.max_pixels),
        "vae_hash": vae_spec.path_hash if vae_spec else None,
        "dtype": cfg.dtype if vae_spec else None,
    }


def check_config(cfg: JobConfig) -> None:
    """Refuse settings that cannot work, with the flag to change."""
    if cfg.kind not in ("latents", "images"):
        raise JobError(f"unknown job kind {cfg.kind!r}")
    if cfg.resolution < 8:
        raise JobError(f"--resolution must be at least 8, got {cfg.resolution}")
    if cfg.batch_size < 1:
        raise JobError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.workers < 0:
        raise JobError(f"--workers must be 0 (in-process) or more, got {cfg.workers}")
    if not 0.0 <= cfg.max_failure_rate <= 1.0:
        raise JobError(f"--max-failure-rate must be within [0, 1], got {cfg.max_failure_rate}")
    if cfg.limit is not None and cfg.limit < 1:
        raise JobError(f"--limit must be at least 1, got {cfg.limit}")
    if cfg.max_pixels < 1:
        raise JobError(f"--max-pixels must be positive, got {cfg.max_pixels}")
    if cfg.dtype not in ("fp32", "fp16", "bf16"):
        raise JobError(f"--dtype must be fp32, fp16 or bf16, got {cfg.dtype!r}")


def run_job(cfg: JobConfig, client=None) -> JobResult:
    """Run an encode or pack job end to end (see the module docstring); `client`: use this Dask client."""
    started = time.perf_counter()
    check_config(cfg)
    vae_spec = _resolve_job_vae(cfg) if cfg.kind == "latents" else None  # a bad --vae fails before any work
    source = scan_source(cfg.source)
    items = source.items[: cfg.limit] if cfg.limit else source.items
    if source.layout == "shards" and source.packed_manifest and cfg.resolution > source.packed_manifest["resolution"]:
        logger.warning(
            "encoding at %d px from shards packed at %d px: images are upsampled",
            cfg.resolution,
            source.packed_manifest["resolution"],
        )

    out = _output_directory(cfg.out, source)
    topic = f"diffit-pipe-progress-{uuid.uuid4().hex[:8]}"
    tasks = _shard_tasks(cfg, source, items, out, vae_spec, topic, local=not cfg.scheduler and client is None)

    result = JobResult(out=str(out), manifest=None, shards_total=len(tasks), max_failure_rate=cfg.max_failure_rate)
    with _output_lock(out):
        check_overwrite(out, _dataset_identity(cfg, source, vae_spec), tasks, cfg.overwrite)
        _prepare_output(out, len(tasks))
        logger.info("%s: %d items from %s in %d shard(s) → %s", cfg.kind, len(items), source.root, len(tasks), out)
        sidecars = _execute(cfg, tasks, topic, result, client)
        remove_temporary_files(out)  # leftovers of attempts whose worker died
        if result.failed_shards:
            result.elapsed_s = time.perf_counter() - started
            return result
        manifest, failures = _build_manifest(cfg, source, items, tasks, sidecars, vae_spec)
        write_lines_atomic(out / FAILURES_NAME, failures)
        write_json_atomic(out / MANIFEST_NAME, manifest)
    result.manifest = manifest
    result.counts = manifest["counts"]
    result.failure_rate = manifest["failure_rate"]
    result.elapsed_s = time.perf_counter() - started
    return result


def _output_directory(out_arg: str, source: Source) -> Path:
    """The absolute output directory, created; JobError (one line) when it cannot be one."""
    try:
        out = Path(out_arg).expanduser().resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop: RuntimeError before Python 3.13
        raise JobError(f"the output directory {out_arg} cannot be resolved: {error}") from error
    if out == Path(source.root) or Path(source.root) in out.parents:
        # Shards inside the source tree would be read as images (or a class folder) by the next run.
        raise JobError(f"the output directory {out} is inside the source {source.root}; choose another OUT")
    if out.exists() and not out.is_dir():
        raise JobError(f"the output directory {out} is an existing file, not a directory; choose another OUT")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a parent is a file (Not a directory), permission denied, read-only file system
        raise JobError(f"cannot create the output directory {out}: {error.strerror or error}") from error
    return out


def _dataset_identity(cfg: JobConfig, source: Source, vae_spec: VAESpec | None) -> dict[str, Any]:
    """What makes a dataset this job's, as its manifest records it (compared by `check_overwrite`)."""
    return {
        "kind": cfg.kind,
        "source": source.root,
        "resolution": cfg.resolution,
        "transform": transform_spec(cfg.resolution, cfg.max_pixels),
        "vae": [vae_spec.path_hash, cfg.dtype] if vae_spec else None,
    }


def _resolve_job_vae(cfg: JobConfig) -> VAESpec:
    """The checked `--vae` of a latent job, and whether the resolution fits its downsampling factor."""
    vae_spec = resolve_vae(cfg.vae, cfg.vae_revision)
    factor = vae_spec.downsample_factor
    if cfg.resolution % factor:
        raise JobError(f"--resolution {cfg.resolution} is not a multiple of the VAE's downsampling factor {factor}")
    if cfg.dtype != "fp32" and cfg.device == "cpu":
        logger.warning("--dtype %s on CPU: half-precision convolutions are usually slower than fp32", cfg.dtype)
    return vae_spec


def _shard_tasks(
    cfg: JobConfig,
    source: Source,
    items: list[SourceItem],
    out: Path,
    vae_spec: VAESpec | None,
    topic: str,
    local: bool,
) -> list[ShardTask]:
    """One task per output shard. `local`: the cluster is started here, so torch threads = cores // workers."""
    settings = _settings_for_fingerprint(cfg, vae_spec)
    torch_threads = cfg.torch_threads
    if torch_threads is None and local:
        torch_threads = max(1, _local_cores() // max(1, cfg.workers))
    return [
        ShardTask(
            index=index,
            items=shard_items,
            root=source.root,
            out=str(out),
            kind=cfg.kind,
            resolution=cfg.resolution,
            max_pixels=cfg.max_pixels,
            batch_size=cfg.batch_size,
            fingerprint=shard_fingerprint(settings, index, shard_items),
            vae_path=vae_spec.local_path if vae_spec else None,
            dtype=cfg.dtype,
            device=cfg.device,
            torch_threads=torch_threads,
            progress_topic=topic,
        )
        for index, shard_items in enumerate(plan_shards(items, cfg.shard_size))
    ]


def _execute(cfg: JobConfig, tasks: list[ShardTask], topic: str, result: JobResult, client) -> dict[int, dict]:
    """Run the shard tasks on Dask; returns the sidecars by shard index and fills the tallies of `result`."""
    from distributed import as_completed

    sidecars: dict[int, dict[str, Any]] = {}
    progress = _Progress(sum(len(t.items) for t in tasks), cfg.progress, desc=cfg.kind)
    try:
        with _dask_client(cfg, client) as dask_client:
            dask_client.subscribe_topic(topic, progress.on_event)
            futures = {
                dask_client.submit(
                    encode_shard,
                    task,
                    key=f"{cfg.kind}-{shard_name(task.index)}-{topic[-8:]}",
                    pure=False,
                    retries=cfg.retries,
                ): task
                for task in tasks
            }
            for future in as_completed(futures):
                task = futures[future]
                try:
                    sidecar = future.result()
                except Exception as error:  # the task failed on every attempt, or its workers kept dying
                    result.failed_shards[shard_name(task.index)] = f"{type(error).__name__}: {error}"
                    logger.error("shard %s failed: %s: %s", shard_name(task.index), type(error).__name__, error)
                    continue
                progress.update(task.index, len(task.items))
                if sidecar.pop("skipped"):
                    result.shards_skipped += 1
                else:
                    result.shards_written += 1
                sidecars[task.index] = sidecar
            dask_client.unsubscribe_topic(topic)
    finally:
        progress.close()
    if result.shards_skipped:
        logger.info(
            "%d shard(s) were already complete and verified; %d written now",
            result.shards_skipped,
            result.shards_written,
        )
    return sidecars


def _build_manifest(
    cfg: JobConfig,
    source: Source,
    items: list[SourceItem],
    tasks: list[ShardTask],
    sidecars: dict[int, dict[str, Any]],
    vae_spec: VAESpec | None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The manifest and the failure records of a finished job (checking that the sidecars add up)."""
    entries, failures = [], []
    for task in tasks:
        sidecar = sidecars[task.index]
        if sidecar["items"] != len(task.items) or sidecar["count"] + len(sidecar["failures"]) != len(task.items):
            raise JobError(
                f"sidecar {sidecar_name(task.index)} does not add up: {sidecar['count']} written + "
                f"{len(sidecar['failures'])} failed != {len(task.items)} items"
            )
        entries.append(
            {
                "name": sidecar["name"],
                "count": sidecar["count"],
                "sha256": sidecar["sha256"],
                "bytes": sidecar["bytes"],
                "failures": len(sidecar["failures"]),
            }
        )
        failures.extend(sidecar["failures"])
    written = sum(entry["count"] for entry in entries)
    seen = len(items)
    counts = {"seen": seen, "written": written, "failed": len(failures)}
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": cfg.kind,
        "resolution": cfg.resolution,
        "num_classes": source.num_classes,
        "label_map": source.label_map,
        "counts": counts,
        "failure_rate": round(len(failures) / seen, 6) if seen else 0.0,
        "shard_size": cfg.shard_size,
        "shards": entries,
        "members": list(LATENT_MEMBERS if cfg.kind == "latents" else IMAGE_MEMBERS),
        "source": source.describe(),
        "transform": transform_spec(cfg.resolution, cfg.max_pixels),
        "failures_file": FAILURES_NAME,
        "job_fingerprint": hashlib.sha256("".join(t.fingerprint for t in tasks).encode()).hexdigest(),
        "command": cfg.command,
        "package_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if vae_spec is not None:
        latent_size = cfg.resolution // vae_spec.downsample_factor
        manifest["latent_channels"] = vae_spec.latent_channels
        manifest["latent_size"] = latent_size
        manifest["latent_shape"] = [2, vae_spec.latent_channels, latent_size, latent_size]
        manifest["latent_dtype"] = "float16"
        manifest["flip"] = "index 0 = image, index 1 = horizontally flipped image"
        manifest["vae"] = vae_spec.manifest_entry(cfg.dtype)
    else:
        manifest["image_format"] = "png"
        manifest["image_shape"] = [cfg.resolution, cfg.resolution, 3]
    return manifest, failures


def command_line() -> str:
    """The command line of this process, quoted so it can be pasted back into a shell."""
    return shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])
