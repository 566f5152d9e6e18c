"""`encode --dry-run` / `pack --dry-run`: what a job would do and roughly cost, without writing anything.

`plan_job` (the planning of a real run: settings and VAE checked, the source streamed into shard tasks) gives
the items, classes and shards. OUT is only read: how many shards an earlier run finished (and resume would
keep), and what a run would refuse to overwrite. A few batches spread over the planned shards are then read,
cropped and encoded in this process, with the device and torch threads of one worker, into memory: the sizes
of their samples (tar headers and padding included) give the estimated bytes, their time (the first batch, which
pays for kernel selection and allocations, left out when there are several) the estimated duration.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pipeline.encode.job import EncodeOptions, JobPlan, dataset_identity, plan_job, torch_threads_per_worker
from pipeline.encode.output import overwrite_conflicts
from pipeline.encode.plan import ShardTask, read_sidecars, trusted_shards
from pipeline.encode.worker import prepare_batch, write_batch

logger = logging.getLogger(__name__)

DRY_RUN_BATCHES = 3
_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads a closed archive to whole records
_TAR_END = 2 * _TAR_BLOCK  # two zero blocks close an archive


@dataclass
class DryRun:
    """What a job would do: its plan, what OUT already holds, and estimates from timed batches."""

    source: str
    layout: str
    items: int
    classes: int
    out: str
    shards: int
    shard_size: int
    complete_shards: int
    conflicts: list[str]
    timed_items: int
    timed_batches: int
    timed_failures: int
    bytes_per_sample: float
    estimated_bytes: int
    seconds_per_item: float
    parallel: int
    estimated_seconds: float
    device: str
    torch_threads: int
    vae_load_s: float = 0.0
    notes: list[str] = field(default_factory=list)


class _SampleSizes:
    """A stand-in for ShardWriter that counts what each sample would take in a tar (nothing is written)."""

    def __init__(self):
        self.samples = 0
        self.bytes = 0

    def write(self, sample: dict[str, Any]) -> None:
        for name, data in sample.items():
            if name != "__key__":
                self.bytes += _TAR_BLOCK + math.ceil(len(data) / _TAR_BLOCK) * _TAR_BLOCK
        self.samples += 1


def _shard_bytes(samples: float, bytes_per_sample: float) -> int:
    """Size of a shard tar of `samples` samples of `bytes_per_sample` (each member already rounded to blocks)."""
    return math.ceil((samples * bytes_per_sample + _TAR_END) / _TAR_RECORD) * _TAR_RECORD


def _sample_batches(tasks: list[ShardTask], batch_size: int, batches: int) -> list[list]:
    """The first batch of `batches` shards spread evenly over the plan (the first and the last included)."""
    if not tasks:
        return []
    count = min(batches, len(tasks))
    positions = sorted({round(i * (len(tasks) - 1) / max(1, count - 1)) for i in range(count)})
    return [tasks[position].block.unpack()[:batch_size] for position in positions]


@contextmanager
def _one_worker(plan: JobPlan) -> Iterator[tuple[Any, str, int, float]]:
    """The VAE on one worker's device with one worker's torch threads, as (vae or None, device, threads, load
    seconds); this process's torch thread count is restored afterwards."""
    from pipeline.encode.cluster import local_cores

    cfg = plan.cfg
    threads = torch_threads_per_worker(cfg) or (1 if cfg.remote else local_cores())
    if cfg.kind != "latents":
        yield None, "cpu", threads, 0.0
        return
    import torch

    from pipeline.core.vae import get_vae, pick_device, set_torch_threads

    previous = torch.get_num_threads()
    try:
        set_torch_threads(threads)
        device = pick_device(cfg.device)
        started = time.perf_counter()
        vae = get_vae(plan.vae_spec.local_path, cfg.dtype, device)
        yield vae, device, threads, time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)


def _time_batches(plan: JobPlan, batches: list[list], vae) -> tuple[list[float], _SampleSizes, int]:
    """Seconds per batch, sample sizes and failures of running `batches` through the worker's code."""
    task = plan.tasks[0]
    sizes, failures, seconds = _SampleSizes(), [], []
    for batch in batches:
        started = time.perf_counter()
        write_batch(sizes, vae, prepare_batch(batch, task, failures), failures, task)
        seconds.append(time.perf_counter() - started)
    return seconds, sizes, len(failures)


def _out_state(plan: JobPlan) -> tuple[int, list[str]]:
    """How many shards of an earlier run resume would keep, and what the run would refuse to overwrite."""
    if not plan.out.exists():
        return 0, []
    sidecars = read_sidecars(plan.out)
    conflicts = overwrite_conflicts(plan.out, dataset_identity(plan), plan.tasks, sidecars)
    return len(trusted_shards(plan.out, plan.tasks, sidecars)), conflicts


def dry_run(cfg: EncodeOptions, batches: int = DRY_RUN_BATCHES) -> DryRun:
    """Plan the job of `cfg` and time `batches` batches of it in this process; nothing is written."""
    plan = plan_job(cfg)
    complete, conflicts = _out_state(plan)
    sample = _sample_batches(plan.tasks, cfg.batch_size, batches)
    with _one_worker(plan) as (vae, device, threads, load_s):
        seconds, sizes, failed = _time_batches(plan, sample, vae)
    timed_items = sum(len(batch) for batch in sample)
    steady = slice(1, None) if len(sample) > 1 else slice(None)  # the first batch pays for the warm-up
    steady_items = sum(len(batch) for batch in sample[steady])
    seconds_per_item = sum(seconds[steady]) / steady_items if steady_items else 0.0
    bytes_per_sample = sizes.bytes / sizes.samples if sizes.samples else 0.0
    written_share = sizes.samples / timed_items if timed_items else 0.0
    parallel = 1 if cfg.remote else max(1, cfg.gpus or cfg.workers)
    notes = ["time is for 1 worker of the running cluster; divide by its worker count"] if cfg.remote else []
    return DryRun(
        source=plan.source.root,
        layout=plan.source.layout,
        items=plan.items,
        classes=plan.source.num_classes,
        out=str(plan.out),
        shards=len(plan.tasks),
        shard_size=cfg.shard_size,
        complete_shards=complete,
        conflicts=conflicts,
        timed_items=timed_items,
        timed_batches=len(sample),
        timed_failures=failed,
        bytes_per_sample=bytes_per_sample,
        estimated_bytes=sum(_shard_bytes(task.count * written_share, bytes_per_sample) for task in plan.tasks),
        seconds_per_item=seconds_per_item,
        parallel=parallel,
        estimated_seconds=seconds_per_item * plan.items / parallel,
        device=device,
        torch_threads=threads,
        vae_load_s=load_s,
        notes=notes,
    )


def format_dry_run(report: DryRun, overwrite: bool) -> str:
    """The dry run as the lines `--dry-run` prints."""
    lines = [
        "dry run: nothing was written",
        f"source     {report.source} ({report.layout}): {report.items} items, {report.classes} classes",
        f"shards     {report.shards} x up to {report.shard_size} items → {report.out} "
        f"({report.complete_shards} already complete)",
        f"bytes      ≈ {report.estimated_bytes / 1e6:.3f} MB ({report.estimated_bytes} bytes; "
        f"{report.bytes_per_sample:.0f} per sample from {report.timed_items} items in {report.timed_batches} "
        f"batch(es), {report.timed_failures} failed)",
        f"time       ≈ {report.estimated_seconds:.1f} s with {report.parallel} worker(s) "
        f"({report.seconds_per_item:.4f} s per item on {report.device} with {report.torch_threads} torch "
        f"thread(s); VAE load {report.vae_load_s:.1f} s and cluster start not included)",
    ]
    if report.conflicts:
        action = "would replace (--overwrite)" if overwrite else "would refuse (pass --overwrite to replace)"
        more = f" (and {len(report.conflicts) - 1} more)" if len(report.conflicts) > 1 else ""
        lines.append(f"OUT        {action}: {report.conflicts[0]}{more}")
    lines += [f"note       {note}" for note in report.notes]
    return "\n".join(lines)
