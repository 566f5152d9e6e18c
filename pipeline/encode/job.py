"""The encode / pack job: source images → center crops → (SD-VAE latents | PNG) → WebDataset shards, on Dask.

The driver (`run_encode`) plans the job (`plan_job`: checks the settings and the VAE before any work, streams the
source into one task per output shard - items `k * shard_size ... (k + 1) * shard_size - 1` in sorted order go
to shard `k` - see `pipeline.encode.plan`), keeps the finished shards that resume can trust, runs the other
tasks on a Dask cluster (`pipeline.encode.cluster`) and, once every shard is done, writes `failures.jsonl` and
then `manifest.json` (the manifest is the "dataset complete" marker, so it is removed when a job starts and
written last). `dry_run` plans the same job and times a few batches without writing anything.

A task (`pipeline.encode.worker.encode_shard`) writes one shard, or keeps it when it is already done; what OUT
may already hold, and what needs `overwrite`, is `pipeline.encode.output`.

A worker that dies takes its task with it; the scheduler runs the task again elsewhere (`retries` covers
exceptions inside a task too). Shards whose task still fails are reported by name and the job ends without a
manifest; re-running redoes just them. On a running cluster (`scheduler`, `scheduler_file`) the source, the
output, the VAE directory (and `--encoder-weights`) must be visible at the same paths on every worker.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import shlex
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.core.latent_stats import STATS_KEY, ChannelMoments, merge_shards
from pipeline.core.manifest import FORMAT_VERSION, MANIFEST_NAME
from pipeline.core.shard_members import IMAGE_MEMBER, IMAGE_MEMBERS, LATENT_MEMBERS, REPA_MEMBER
from pipeline.core.shards import FAILURES_NAME, shard_name, sidecar_name, write_json_to, write_lines_to
from pipeline.core.storage import Location
from pipeline.core.storage_io import is_url
from pipeline.core.stored_targets import REPA_TARGETS_KEY
from pipeline.core.vae import DEFAULT_VAE, VAESpec, resolve_vae
from pipeline.encode.member_index import IndexCache
from pipeline.encode.output import (
    JobError,
    check_overwrite,
    output_lock,
    prepare_output,
    read_json_object,
    same_dataset,
)
from pipeline.encode.plan import (
    ItemBlock,
    ShardTask,
    iter_shards,
    read_sidecars,
    shard_fingerprint,
    trusted_shards,
)
from pipeline.encode.sources import SourceScan, open_source
from pipeline.encode.targets import TargetsSpec, resolve_targets, targets_problem
from pipeline.encode.transforms import (
    DEFAULT_MAX_PIXELS,
    transform_spec,
)
from pipeline.encode.worker import encode_shard

logger = logging.getLogger(__name__)


@dataclass
class EncodeOptions:
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
    keep_images: bool = False  # latents: also store each crop as a PNG member (REPA's targets, `pipeline.train.repa`)
    # latents: also store REPA's targets, the tokens of this encoder (`repa.encoder`'s names) of each crop and its
    # flip (`pipeline.encode.targets`); its weights file / directory; the model token grid they are sized for.
    encoder_targets: str | None = None
    encoder_weights: str | None = None
    token_grid: int | None = None

    @property
    def remote(self) -> bool:
        """True when the job runs on a cluster started elsewhere (its workers choose their torch threads)."""
        return bool(self.scheduler or self.scheduler_file)


@dataclass
class JobPlan:
    """A planned job: the checked settings, the resolved VAE, the opened source, OUT and the shard tasks."""

    cfg: EncodeOptions
    vae_spec: VAESpec | None
    source: SourceScan
    out: Location
    tasks: list[ShardTask]
    items: int
    topic: str
    targets: TargetsSpec | None = None  # REPA's stored targets (`--encoder-targets`)


@dataclass
class EncodeResult:
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
# Driver side: planning


def _settings_for_fingerprint(
    cfg: EncodeOptions, vae_spec: VAESpec | None, targets: TargetsSpec | None = None
) -> dict[str, Any]:
    """Job settings that change shard bytes (the batch size and worker count do not)."""
    settings = {
        "format_version": FORMAT_VERSION,
        "kind": cfg.kind,
        "resolution": cfg.resolution,
        "transform": transform_spec(cfg.resolution, cfg.max_pixels),
        "vae_hash": vae_spec.path_hash if vae_spec else None,
        "dtype": cfg.dtype if vae_spec else None,
    }
    if cfg.keep_images:  # only then: the fingerprints of datasets without images stay what they were
        settings["keep_images"] = True
    if targets is not None:  # likewise: only a job that stores REPA's targets has them in its fingerprints
        settings["encoder_targets"] = targets.identity()
    return settings


def check_config(cfg: EncodeOptions) -> None:
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
    if cfg.keep_images and cfg.kind != "latents":
        raise JobError("--keep-images keeps the crops beside their latents; the shards of `pack` are images already")
    problem = targets_problem(cfg.encoder_targets, cfg.encoder_weights, cfg.token_grid, cfg.kind)
    if problem:
        raise JobError(problem)


def torch_threads_per_worker(cfg: EncodeOptions, remote: bool = False) -> int | None:
    """Torch threads per worker: `--torch-threads`, else cores // workers for a cluster started here; None on a
    running cluster (`remote`: a client was passed in, or a scheduler named), whose workers use their Dask
    thread count."""
    from pipeline.encode.cluster import local_cores

    if cfg.torch_threads is not None:
        return cfg.torch_threads
    if remote or cfg.remote:
        return None
    return max(1, local_cores() // max(1, cfg.gpus or cfg.workers))


def plan_job(cfg: EncodeOptions, remote: bool = False) -> JobPlan:
    """Check the settings and the VAE, open the source and stream it into shard tasks (nothing is written).
    `remote`: the tasks will run on a cluster this job did not start (a client was passed in)."""
    check_config(cfg)
    vae_spec = _resolve_job_vae(cfg) if cfg.kind == "latents" else None  # a bad --vae fails before any work
    targets = _resolve_job_targets(cfg, vae_spec)  # likewise a bad --encoder-weights
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
    settings = _settings_for_fingerprint(cfg, vae_spec, targets)
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
        keep_images=cfg.keep_images,
        targets=targets,
    )
    tasks, items = [], 0
    with _walk_progress(cfg.progress) as walked:
        for index, shard_items in enumerate(iter_shards(source.items, cfg.shard_size)):
            fingerprint = shard_fingerprint(settings, index, shard_items)
            tasks.append(replace(template, index=index, block=ItemBlock.pack(shard_items), fingerprint=fingerprint))
            items += len(shard_items)
            walked.update(len(shard_items))
    return JobPlan(cfg, vae_spec, source, out, tasks, items, topic, targets)


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
        "keep_images": cfg.kind == "latents" and cfg.keep_images,
        "encoder_targets": plan.targets.identity() if plan.targets is not None else None,
    }


def _resolve_job_targets(cfg: EncodeOptions, vae_spec: VAESpec | None) -> TargetsSpec | None:
    """The checked `--encoder-targets` of a latent job (None without it), for its latent size."""
    if vae_spec is None:
        return None
    return resolve_targets(
        cfg.encoder_targets, cfg.encoder_weights, cfg.token_grid, cfg.resolution // vae_spec.downsample_factor
    )


def _resolve_job_vae(cfg: EncodeOptions) -> VAESpec:
    """The checked `--vae` of a latent job, and whether the resolution fits its downsampling factor."""
    vae_spec = resolve_vae(cfg.vae, cfg.vae_revision)
    factor = vae_spec.downsample_factor
    if cfg.resolution % factor:
        raise JobError(f"--resolution {cfg.resolution} is not a multiple of the VAE's downsampling factor {factor}")
    if cfg.dtype != "fp32" and cfg.device == "cpu":
        logger.warning("--dtype %s on CPU: half-precision convolutions are usually slower than fp32", cfg.dtype)
    return vae_spec


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


def run_encode(cfg: EncodeOptions, client=None) -> EncodeResult:
    """Run an encode or pack job end to end (see the module docstring); `client`: use this Dask client."""
    started = time.perf_counter()
    plan = plan_job(cfg, remote=client is not None)
    out = plan.out
    _create_output(out)
    result = EncodeResult(
        out=str(out), manifest=None, shards_total=len(plan.tasks), max_failure_rate=cfg.max_failure_rate
    )
    with output_lock(out):
        sidecars = read_sidecars(out)
        check_overwrite(out, dataset_identity(plan), plan.tasks, sidecars, cfg.overwrite)
        previous = read_json_object(out, MANIFEST_NAME)
        prepare_output(out, len(plan.tasks))
        trusted = {} if cfg.verify else _with_stats(plan, trusted_shards(out, plan.tasks, sidecars))
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
        if previous is not None and same_dataset(previous, manifest):
            # Same shards, counts and settings: keep the manifest's bytes (and hash, which trained runs record).
            logger.info("the dataset in %s is unchanged: manifest.json is kept as it was", out)
            manifest = previous
        write_json_to(out, MANIFEST_NAME, manifest)  # last: the dataset is complete
    result.manifest = manifest
    result.counts = manifest["counts"]
    result.failure_rate = manifest["failure_rate"]
    result.elapsed_s = time.perf_counter() - started
    return result


def _sidecar_moments(plan: JobPlan, sidecar: dict[str, Any]) -> ChannelMoments | None:
    """The per-channel statistics a latent shard's sidecar records (None: missing or not sane)."""
    return ChannelMoments.from_sidecar(sidecar.get(STATS_KEY), plan.vae_spec.latent_channels)


def _with_stats(plan: JobPlan, trusted: dict[int, dict]) -> dict[int, dict]:
    """The trusted shards whose sidecars carry usable statistics (latent jobs): a shard finished by a version that
    did not record them goes to a worker, which verifies its tar and reads them back from it."""
    if plan.cfg.kind != "latents":
        return trusted
    return {index: sidecar for index, sidecar in trusted.items() if _sidecar_moments(plan, sidecar) is not None}


def _execute(plan: JobPlan, trusted: dict[int, dict], result: EncodeResult, client) -> dict[int, dict]:
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


def _run_tasks(plan: JobPlan, todo: list[ShardTask], progress, sidecars: dict, result: EncodeResult, client) -> None:
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
    if vae_spec is not None:
        moments = []
        for task in plan.tasks:
            found = _sidecar_moments(plan, sidecars[task.index])
            if found is None or found.samples != sidecars[task.index]["count"]:
                raise JobError(f"sidecar {sidecar_name(task.index)} lacks sane latent_stats for its samples")
            moments.append(found)
        stats = merge_shards(moments).manifest_entry()
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
        "members": _members(cfg),
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
        if cfg.keep_images:
            manifest["image_format"] = "png"  # the `png` member: the crop of index 0, unflipped
            manifest["image_shape"] = [cfg.resolution, cfg.resolution, 3]
        if plan.targets is not None:  # the `repa.npy` member: REPA's targets of the crop and its flip
            manifest[REPA_TARGETS_KEY] = plan.targets.manifest_entry()
        manifest["vae"] = vae_spec.manifest_entry(cfg.dtype)
        if stats is not None:  # per-channel mean / std of the original views' posterior means, all shards merged
            manifest[STATS_KEY] = stats
    else:
        manifest["image_format"] = "png"
        manifest["image_shape"] = [cfg.resolution, cfg.resolution, 3]
    return manifest, failures


def _members(cfg: EncodeOptions) -> list[str]:
    """The members of every sample, as the manifest lists them (the trainer reads from here whether latent samples
    hold their PNG or stored targets: REPA's targets online or stored)."""
    if cfg.kind != "latents":
        return list(IMAGE_MEMBERS)
    members = [*LATENT_MEMBERS, IMAGE_MEMBER] if cfg.keep_images else list(LATENT_MEMBERS)
    return [*members, REPA_MEMBER] if cfg.encoder_targets is not None else members


def command_line() -> str:
    """The command line of this process, quoted so it can be pasted back into a shell."""
    return shlex.join([Path(sys.argv[0]).name] + sys.argv[1:])
