"""The encode / pack job: source images → center crops → (SD-VAE latents | PNG) → WebDataset shards, on Dask.

The driver (`run_job`) plans the job (`plan_job`: checks the settings and the VAE before any work, streams the
source into one task per output shard - items `k * shard_size ... (k + 1) * shard_size - 1` in sorted order go
to shard `k` - see `pipeline.encode.plan`), keeps the finished shards that resume can trust, runs the other
tasks on a Dask cluster (`pipeline.encode.cluster`) and, once every shard is done, writes `failures.jsonl` and
then `manifest.json` (the manifest is the "dataset complete" marker, so it is removed when a job starts and
written last). `dry_run` plans the same job and times a few batches without writing anything.

A task (`encode_shard`) first checks whether its shard is already done: sidecar present, same fingerprint (the
items with their sizes and modification times, the resolution, transform, VAE hash and dtype) and the tar's
sha256 matches. If so it returns the sidecar (resume after a kill, or `--verify`); otherwise it decodes, crops
and encodes its items in batches (the next batches are read and cropped on threads while one is encoded,
`PREFETCH_BATCHES`), streams the samples into a temporary tar in item order and commits it with its sidecar,
which it then seals (`seal_sidecar`). Bad items become failure records; they never stop the task. The VAE is
fetched with `pipeline.core.vae.get_vae`, cached per worker process, on the worker's own GPU if it has one.

What OUT may already hold (`check_overwrite`): nothing, or an earlier run - finished or interrupted - of the same
job, which is resumed. Anything this job would destroy needs `overwrite`: a manifest of another dataset (other
kind, source directory, resolution, transform settings or VAE), or a finished shard (one with a sidecar, or one
the manifest lists) that this job would rewrite with other items or settings, or would delete because this job
writes fewer shards (`--limit`, a larger `--shard-size`). Leftovers that never formed a finished shard (temporary
files, a tar without its sidecar) are cleaned up as before.

A worker that dies takes its task with it; the scheduler runs the task again elsewhere (`retries` covers
exceptions inside a task too). Shards whose task still fails are reported by name and the job ends without a
manifest; re-running redoes just them. On a running cluster (`scheduler`, `scheduler_file`) the source, the
output and the VAE directory must be visible at the same paths on every worker.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import shlex
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
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
    latent_sample,
    read_sidecar,
    shard_name,
    shard_problems,
    sidecar_name,
    write_json_to,
    write_lines_to,
)
from pipeline.core.storage import Location, StorageError, is_url
from pipeline.core.vae import DEFAULT_VAE, VAESpec, resolve_vae
from pipeline.encode.member_index import IndexCache
from pipeline.encode.plan import (
    RECORD_CHECK,
    ItemBlock,
    ShardTask,
    iter_shards,
    read_sidecars,
    seal_sidecar,
    shard_fingerprint,
    trusted_shards,
)
from pipeline.encode.source_items import item_location
from pipeline.encode.sources import SourceItem, SourceScan, open_source, read_item_bytes
from pipeline.encode.transforms import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    compose_crop_box,
    prepare_image,
    transform_spec,
)

logger = logging.getLogger(__name__)

# Batches a task prepares (reads, decodes, crops) ahead of the one being encoded, each on its own thread: PIL's
# decode and resize release the GIL, so on a GPU the next crops are ready when the VAE finishes a batch. The task's
# thread still writes every sample, in item order, so the shard bytes do not depend on this. 0: prepare each
# batch on the task's thread just before it is encoded.
PREFETCH_BATCHES = 2


class JobError(InputError):
    """The job cannot start (bad settings, output in use) or could not finish every shard."""


@dataclass
class JobConfig:
    """Settings of one encode (kind="latents") or pack (kind="images") job."""

    source: str
    out: str
    kind: str = "latents"
    source_format: str = "auto"  # see `pipeline.encode.sources.SOURCE_FORMATS`
    labels: str | None = None  # the ImageNet validation archive's devkit or LOC_val_solution.csv
    cache_index: bool = True  # write an archive / parquet source's member index into OUT (False: a dry run)
    resolution: int = 256
    vae: str = DEFAULT_VAE
    vae_revision: str | None = None
    shard_size: int = 1000
    batch_size: int = 32
    workers: int = 1  # 0: run the tasks inside this process (Dask threads, no worker processes)
    gpus: int = 0  # > 0: a local cluster of one worker per GPU instead of `workers` CPU workers
    scheduler: str | None = None  # tcp://HOST:PORT of a running cluster
    scheduler_file: str | None = None  # or the file `dask scheduler --scheduler-file PATH` wrote
    dtype: str = "fp32"
    torch_threads: int | None = None  # torch intra-op threads per worker; None: cores // local workers
    device: str = "auto"
    max_failure_rate: float = 0.001
    limit: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    retries: int = 2
    progress: bool = True
    command: str = ""
    overwrite: bool = False  # replace a different dataset in `out` (see the module docstring)
    verify: bool = False  # re-hash finished shards on resume instead of trusting their sealed sidecars

    @property
    def remote(self) -> bool:
        """True when the job runs on a cluster started elsewhere (its workers choose their torch threads)."""
        return bool(self.scheduler or self.scheduler_file)


@dataclass
class JobPlan:
    """A planned job: the checked settings, the resolved VAE, the opened source, OUT and the shard tasks."""

    cfg: JobConfig
    vae_spec: VAESpec | None
    source: SourceScan
    out: Location
    tasks: list[ShardTask]
    items: int
    topic: str


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
    return {"index": item.index, "path": item_location(item, root), "key": item.key, "reason": reason}


def _prepare(item: SourceItem, task: ShardTask) -> tuple[np.ndarray, dict[str, Any]]:
    """Read and crop one item; raises ImageDecodeError with the reason when the item cannot be used."""
    try:
        data = read_item_bytes(item, task.root)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ImageDecodeError(f"cannot read the file: {reason}") from error
    pixels, record = prepare_image(data, task.resolution, task.max_pixels)
    return pixels, _sample_meta(item, record)


def prepare_batch(batch: list[SourceItem], task: ShardTask, failures: list[dict[str, Any]]) -> list[tuple]:
    """(item, crop, json record) of the items of `batch` that can be used; the others go to `failures`."""
    ready = []
    for item in batch:
        try:
            pixels, meta = _prepare(item, task)
        except ImageDecodeError as error:
            failures.append(_failure(item, task.root, str(error)))
            continue
        ready.append((item, pixels, meta))
    return ready


def _existing_shard(task: ShardTask) -> dict[str, Any] | None:
    """The sidecar of this shard when a previous run already produced it with the same fingerprint and its tar's
    sha256 matches (the full check: the driver sends a task only for a shard it could not trust, or under
    --verify)."""
    sidecar = read_sidecar(task.out, task.index)
    if sidecar is None or sidecar.get("fingerprint") != task.fingerprint:
        return None
    if shard_problems(task.out, sidecar):
        return None
    sealed = seal_sidecar({key: value for key, value in sidecar.items() if key != RECORD_CHECK})
    if sealed != sidecar:  # verified by hash: seal it, so that the dataset's bytes equal an uninterrupted run's
        write_json_to(task.out, sidecar_name(task.index), sealed)
    return sealed


def task_vae(task: ShardTask):
    """The VAE of a latent task on this worker's device (its own GPU, or CPU), with the task's torch threads
    (default: the worker's Dask threads)."""
    from pipeline.core.vae import get_vae, pick_device, set_torch_threads
    from pipeline.encode.cluster import worker_threads

    set_torch_threads(task.torch_threads or worker_threads())
    return get_vae(task.vae_path, task.dtype, pick_device(task.device))


def _prepare_alone(batch: list[SourceItem], task: ShardTask) -> tuple[list[tuple], list[dict[str, Any]]]:
    """`prepare_batch` with failures of its own (merged into the shard's list in batch order by the caller)."""
    failures: list[dict[str, Any]] = []
    return prepare_batch(batch, task, failures), failures


def prepared_batches(
    items: list[SourceItem], task: ShardTask, prefetch_batches: int
) -> Iterator[tuple[list[SourceItem], list[tuple], list[dict[str, Any]]]]:
    """(batch, ready crops, decode failures) of the consecutive batches of `items`, in order; up to
    `prefetch_batches` following batches are prepared on worker threads meanwhile (0: none, all on this thread).
    Close it (`contextlib.closing`) so that an error while a batch is encoded cancels the prefetched work."""
    batches = [items[start : start + task.batch_size] for start in range(0, len(items), task.batch_size)]
    if prefetch_batches <= 0:
        for batch in batches:
            yield batch, *_prepare_alone(batch, task)
        return
    with ThreadPoolExecutor(max_workers=prefetch_batches, thread_name_prefix="encode-prepare") as pool:
        pending: deque = deque()  # (batch, future) of the batches submitted and not yet handed out, in order
        try:
            for batch in batches:
                pending.append((batch, pool.submit(_prepare_alone, batch, task)))
                if len(pending) > prefetch_batches:
                    oldest, future = pending.popleft()
                    yield oldest, *future.result()
            while pending:
                oldest, future = pending.popleft()
                yield oldest, *future.result()
        finally:
            for _, future in pending:
                future.cancel()


def encode_shard(task: ShardTask, prefetch_batches: int | None = None) -> dict[str, Any]:
    """Produce (or find already done) shard `task.index`; returns its sidecar plus `"skipped": bool`.
    `prefetch_batches`: batches prepared ahead on threads (default `PREFETCH_BATCHES`; 0: sequential)."""
    existing = _existing_shard(task)
    if existing is not None:
        _report_progress(task.progress_topic, task.index, task.count)
        return {**existing, "skipped": True}

    vae = task_vae(task) if task.kind == "latents" else None
    items = task.block.unpack()
    prefetch = PREFETCH_BATCHES if prefetch_batches is None else prefetch_batches
    failures: list[dict[str, Any]] = []
    done = 0
    with ShardWriter(task.out, task.index) as writer, closing(prepared_batches(items, task, prefetch)) as batches:
        for batch, ready, decode_failures in batches:
            # Same order as preparing and encoding one batch after the other: its decode failures, then its
            # VAE failures (appended by write_batch), then the next batch's.
            failures.extend(decode_failures)
            write_batch(writer, vae, ready, failures, task)
            done += len(batch)
            _report_progress(task.progress_topic, task.index, done)
        sidecar = writer.commit(
            {
                "fingerprint": task.fingerprint,
                "items": len(items),
                "first_item": items[0].index if items else None,
                "failures": failures,
            },
            # Sealed: resume trusts this sidecar without re-hashing the tar (see `pipeline.encode.plan`).
            finish=seal_sidecar,
        )
    return {**sidecar, "skipped": False}


def write_batch(writer, vae, ready: list, failures: list, task: ShardTask) -> None:
    """Encode one batch of crops (latents) or PNG-compress them (images) and append the samples in item order
    (`writer`: a ShardWriter, or anything with `write(sample)`)."""
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
# Driver side: planning


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
    from pipeline.encode.cluster import check_cluster_settings

    if cfg.kind not in ("latents", "images"):
        raise JobError(f"unknown job kind {cfg.kind!r}")
    if cfg.resolution < 8:
        raise JobError(f"--resolution must be at least 8, got {cfg.resolution}")
    if cfg.batch_size < 1:
        raise JobError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.shard_size < 1:
        raise JobError(f"--shard-size must be at least 1, got {cfg.shard_size}")
    check_cluster_settings(cfg.workers, cfg.gpus, cfg.scheduler, cfg.scheduler_file)
    if cfg.gpus and cfg.device not in ("auto", "cuda"):
        raise JobError(f"--gpus puts each worker on its own GPU; --device {cfg.device} contradicts it (use auto)")
    if not 0.0 <= cfg.max_failure_rate <= 1.0:
        raise JobError(f"--max-failure-rate must be within [0, 1], got {cfg.max_failure_rate}")
    if cfg.limit is not None and cfg.limit < 1:
        raise JobError(f"--limit must be at least 1, got {cfg.limit}")
    if cfg.max_pixels < 1:
        raise JobError(f"--max-pixels must be positive, got {cfg.max_pixels}")
    if cfg.dtype not in ("fp32", "fp16", "bf16"):
        raise JobError(f"--dtype must be fp32, fp16 or bf16, got {cfg.dtype!r}")


def torch_threads_per_worker(cfg: JobConfig, remote: bool = False) -> int | None:
    """Torch threads per worker: `--torch-threads`, else cores // workers for a cluster started here; None on a
    running cluster (`remote`: a client was passed in, or a scheduler named), whose workers use their Dask
    thread count."""
    from pipeline.encode.cluster import local_cores

    if cfg.torch_threads is not None:
        return cfg.torch_threads
    if remote or cfg.remote:
        return None
    return max(1, local_cores() // max(1, cfg.gpus or cfg.workers))


def plan_job(cfg: JobConfig, remote: bool = False) -> JobPlan:
    """Check the settings and the VAE, open the source and stream it into shard tasks (nothing is written).
    `remote`: the tasks will run on a cluster this job did not start (a client was passed in)."""
    check_config(cfg)
    vae_spec = _resolve_job_vae(cfg) if cfg.kind == "latents" else None  # a bad --vae fails before any work
    out = _output_path(cfg.out, _local_root(cfg.source))
    # An archive's member index is kept in OUT: a resumed run plans from it without reading the archive again.
    source = open_source(cfg.source, cfg.limit, cfg.source_format, cfg.labels, IndexCache(out, cfg.cache_index))
    if source.layout == "shards" and source.packed_manifest and cfg.resolution > source.packed_manifest["resolution"]:
        logger.warning(
            "encoding at %d px from shards packed at %d px: images are upsampled",
            cfg.resolution,
            source.packed_manifest["resolution"],
        )
    topic = f"diffit-pipe-progress-{uuid.uuid4().hex[:8]}"
    settings = _settings_for_fingerprint(cfg, vae_spec)
    template = ShardTask(
        index=0,
        block=ItemBlock(0, 0, b""),
        root=source.root,
        out=str(out),
        kind=cfg.kind,
        resolution=cfg.resolution,
        max_pixels=cfg.max_pixels,
        batch_size=cfg.batch_size,
        fingerprint="",
        vae_path=vae_spec.local_path if vae_spec else None,
        dtype=cfg.dtype,
        device=cfg.device,
        torch_threads=torch_threads_per_worker(cfg, remote),
        progress_topic=topic,
    )
    tasks, items = [], 0
    with _walk_progress(cfg.progress) as walked:
        for index, shard_items in enumerate(iter_shards(source.items, cfg.shard_size)):
            fingerprint = shard_fingerprint(settings, index, shard_items)
            tasks.append(replace(template, index=index, block=ItemBlock.pack(shard_items), fingerprint=fingerprint))
            items += len(shard_items)
            walked.update(len(shard_items))
    return JobPlan(cfg, vae_spec, source, out, tasks, items, topic)


def _walk_progress(enabled: bool):
    """A counter of the items found while the source is walked, with items/s (the total is known only at the
    end); on stderr, only with progress enabled."""
    from tqdm import tqdm

    return tqdm(desc="listing source", unit=" items", disable=not enabled, dynamic_ncols=True)


def _local_root(source: str) -> str:
    """The absolute path of a local source (a URL as it is), to check that OUT is not inside it."""
    return source if is_url(source) else str(Path(source).expanduser().resolve())


def _output_path(out_arg: str, source_root: str) -> Location:
    """The output: an object-store prefix (URL), or the absolute output directory (not created); JobError (one
    line) when it cannot be one."""
    if is_url(out_arg):
        return Location.of(out_arg)
    try:
        out = Path(out_arg).expanduser().resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop: RuntimeError before Python 3.13
        raise JobError(f"the output directory {out_arg} cannot be resolved: {error}") from error
    if out == Path(source_root) or Path(source_root) in out.parents:
        # Shards inside the source tree would be read as images (or a class folder) by the next run.
        raise JobError(f"the output directory {out} is inside the source {source_root}; choose another OUT")
    if out.exists() and not out.is_dir():
        raise JobError(f"the output directory {out} is an existing file, not a directory; choose another OUT")
    return Location.of(out)


def _create_output(out: Location) -> None:
    """Create the output directory (object stores: check the bucket); JobError (one line) when it cannot be."""
    try:
        out.create()
    except OSError as error:  # a parent is a file (Not a directory), permission denied, read-only file system
        raise JobError(f"cannot create the output directory {out}: {error.strerror or error}") from error


def dataset_identity(plan: JobPlan) -> dict[str, Any]:
    """What makes a dataset this job's, as its manifest records it (compared by `check_overwrite`)."""
    cfg = plan.cfg
    return {
        "kind": cfg.kind,
        "source": plan.source.root,
        "resolution": cfg.resolution,
        "transform": transform_spec(cfg.resolution, cfg.max_pixels),
        "vae": [plan.vae_spec.path_hash, cfg.dtype] if plan.vae_spec else None,
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


# ----------------------------------------------------------------------------------------------------------------
# Driver side: what OUT holds


@contextmanager
def _output_lock(out: Location) -> Iterator[None]:
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


def _read_json_object(out: Location, name: str) -> dict[str, Any] | None:
    """A JSON object from the file `name` in `out`; None when it is missing. Not an object or unreadable:
    {"": error}."""
    try:
        value = json.loads(out.read_bytes(name).decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return {"": str(error)}
    return value if isinstance(value, dict) else {"": "not a JSON object"}


def _same_dataset(previous: dict[str, Any], manifest: dict[str, Any]) -> bool:
    """True when two manifests describe the same dataset: equal but for when and by which command line."""
    volatile = ("created", "command")
    return {k: v for k, v in previous.items() if k not in volatile} == {
        k: v for k, v in manifest.items() if k not in volatile
    }


def _manifest_conflict(out: Location, identity: dict[str, Any]) -> str | None:
    """Why the manifest in `out` describes another dataset than `identity` (kind, source, resolution,
    transform, VAE of this job), or None when there is none or it is this job's."""
    manifest = _read_json_object(out, MANIFEST_NAME)
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
    manifest = _read_json_object(out, MANIFEST_NAME)
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


def _prepare_output(out: Location, num_shards: int) -> None:
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


# ----------------------------------------------------------------------------------------------------------------
# Driver side: running


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


def run_job(cfg: JobConfig, client=None) -> JobResult:
    """Run an encode or pack job end to end (see the module docstring); `client`: use this Dask client."""
    started = time.perf_counter()
    plan = plan_job(cfg, remote=client is not None)
    out = plan.out
    _create_output(out)
    result = JobResult(out=str(out), manifest=None, shards_total=len(plan.tasks), max_failure_rate=cfg.max_failure_rate)
    with _output_lock(out):
        sidecars = read_sidecars(out)
        check_overwrite(out, dataset_identity(plan), plan.tasks, sidecars, cfg.overwrite)
        previous = _read_json_object(out, MANIFEST_NAME)
        _prepare_output(out, len(plan.tasks))
        trusted = {} if cfg.verify else trusted_shards(out, plan.tasks, sidecars)
        logger.info(
            "%s: %d items from %s in %d shard(s) → %s (%d already complete)",
            cfg.kind,
            plan.items,
            plan.source.root,
            len(plan.tasks),
            out,
            len(trusted),
        )
        done = _execute(plan, trusted, result, client)
        out.remove_temporary_files()  # leftovers of attempts whose worker died
        if result.failed_shards:
            result.elapsed_s = time.perf_counter() - started
            return result
        manifest, failures = _build_manifest(plan, done)
        write_lines_to(out, FAILURES_NAME, failures)
        if previous is not None and _same_dataset(previous, manifest):
            # Same shards, counts and settings: keep the manifest's bytes (and hash, which trained runs record).
            logger.info("the dataset in %s is unchanged: manifest.json is kept as it was", out)
            manifest = previous
        write_json_to(out, MANIFEST_NAME, manifest)  # last: the dataset is complete
    result.manifest = manifest
    result.counts = manifest["counts"]
    result.failure_rate = manifest["failure_rate"]
    result.elapsed_s = time.perf_counter() - started
    return result


def _execute(plan: JobPlan, trusted: dict[int, dict], result: JobResult, client) -> dict[int, dict]:
    """Run the tasks of the shards that are not `trusted` (kept as they are) on Dask; returns the sidecars of
    all shards by index and fills the tallies of `result`. No cluster is started when nothing is left to do."""
    cfg = plan.cfg
    sidecars: dict[int, dict[str, Any]] = dict(trusted)
    result.shards_skipped = len(trusted)
    todo = [task for task in plan.tasks if task.index not in trusted]
    progress = _Progress(plan.items, cfg.progress and bool(todo), desc=cfg.kind)
    try:
        for task in plan.tasks:
            if task.index in trusted:
                progress.update(task.index, task.count)
        if todo:
            _run_tasks(plan, todo, progress, sidecars, result, client)
    finally:
        progress.close()
    if result.shards_skipped:
        logger.info(
            "%d shard(s) were already complete (%d trusted from their sealed sidecars, %d verified by sha256); "
            "%d written now",
            result.shards_skipped,
            len(trusted),
            result.shards_skipped - len(trusted),
            result.shards_written,
        )
    return sidecars


def _run_tasks(plan: JobPlan, todo: list[ShardTask], progress, sidecars: dict, result: JobResult, client) -> None:
    """Submit `todo` to the job's Dask cluster and collect the sidecars as the tasks finish."""
    from distributed import as_completed

    from pipeline.encode.cluster import dask_client

    cfg = plan.cfg
    with dask_client(cfg.workers, cfg.gpus, cfg.scheduler, cfg.scheduler_file, client) as dask:
        dask.subscribe_topic(plan.topic, progress.on_event)
        futures = {
            dask.submit(
                encode_shard,
                task,
                key=f"{cfg.kind}-{shard_name(task.index)}-{plan.topic[-8:]}",
                pure=False,
                retries=cfg.retries,
            ): task
            for task in todo
        }
        for future in as_completed(futures):
            task = futures[future]
            try:
                sidecar = future.result()
            except Exception as error:  # the task failed on every attempt, or its workers kept dying
                result.failed_shards[shard_name(task.index)] = f"{type(error).__name__}: {error}"
                logger.error("shard %s failed: %s: %s", shard_name(task.index), type(error).__name__, error)
                continue
            progress.update(task.index, task.count)
            if sidecar.pop("skipped"):
                result.shards_skipped += 1
            else:
                result.shards_written += 1
            sidecars[task.index] = sidecar
        dask.unsubscribe_topic(plan.topic)


def _build_manifest(plan: JobPlan, sidecars: dict[int, dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The manifest and the failure records of a finished job (checking that the sidecars add up)."""
    cfg, vae_spec, source = plan.cfg, plan.vae_spec, plan.source
    entries, failures = [], []
    for task in plan.tasks:
        sidecar = sidecars[task.index]
        if sidecar["items"] != task.count or sidecar["count"] + len(sidecar["failures"]) != task.count:
            raise JobError(
                f"sidecar {sidecar_name(task.index)} does not add up: {sidecar['count']} written + "
                f"{len(sidecar['failures'])} failed != {task.count} items"
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
    seen = plan.items
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
        "source": source.describe(plan.items),
        "transform": transform_spec(cfg.resolution, cfg.max_pixels),
        "failures_file": FAILURES_NAME,
        "job_fingerprint": hashlib.sha256("".join(t.fingerprint for t in plan.tasks).encode()).hexdigest(),
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
