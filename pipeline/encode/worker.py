"""The worker side of the encode / pack job: one task (`encode_shard`) writes one shard.

A task first checks whether its shard is already done: sidecar present, same fingerprint (the items with their
sizes and modification times, the resolution, transform, VAE hash and dtype) and the tar's sha256 matches. If so
it returns the sidecar (resume after a kill, or `--verify`); otherwise it decodes, crops and encodes its items in
batches (the next batches are read and cropped on threads while one is encoded, `PREFETCH_BATCHES`), streams the
samples into a temporary tar in item order and commits it with its sidecar, which it then seals (`seal_sidecar`).
Bad items become failure records; they never stop the task. A latent shard's sidecar also records the per-channel
statistics of its samples' posterior means (`latent_stats`, see `pipeline.core.latent_stats`), accumulated while
it is written, or read back from the tar of a shard found done (so a resumed job merges exactly what an
uninterrupted one does). The VAE is fetched with `pipeline.core.vae.get_vae`,
cached per worker process, on the worker's own GPU if it has one. The driver is `pipeline.encode.job`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any

import numpy as np

from pipeline.core.latent_stats import STATS_KEY, ChannelMoments, shard_moments
from pipeline.core.shard_members import MEAN_MEMBER, decode_sample, image_sample, latent_sample, load_npy_bytes
from pipeline.core.shards import (
    ShardWriter,
    iter_samples,
    read_sidecar,
    shard_name,
    shard_problems,
    sidecar_name,
    write_json_to,
)
from pipeline.core.storage import Location
from pipeline.encode.plan import (
    RECORD_CHECK,
    ShardTask,
    seal_sidecar,
)
from pipeline.encode.source_items import item_location
from pipeline.encode.sources import SourceItem, read_item_bytes
from pipeline.encode.targets import encode_targets
from pipeline.encode.transforms import (
    ImageDecodeError,
    compose_crop_box,
    prepare_image,
)

logger = logging.getLogger(__name__)


# Batches a task prepares (reads, decodes, crops) ahead of the one being encoded, each on its own thread: PIL's
# decode and resize release the GIL, so on a GPU the next crops are ready when the VAE finishes a batch. The task's
# thread still writes every sample, in item order, so the shard bytes do not depend on this. 0: prepare each
# batch on the task's thread just before it is encoded.
PREFETCH_BATCHES = 2


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
    if task.kind == "latents":  # verified by hash: its statistics are read back from the tar, not trusted
        sidecar = {**sidecar, STATS_KEY: read_shard_moments(task).to_sidecar()}
    sealed = seal_sidecar({key: value for key, value in sidecar.items() if key != RECORD_CHECK})
    if sealed != sidecar:  # verified by hash: seal it, so that the dataset's bytes equal an uninterrupted run's
        write_json_to(task.out, sidecar_name(task.index), sealed)
    return sealed


class _MomentsWriter:
    """A ShardWriter that also gathers the statistics of the latent samples it writes: their original views' stored
    (float16) posterior means, decoded from the very bytes written, as `read_shard_moments` reads them back."""

    def __init__(self, writer: ShardWriter):
        self.writer = writer
        self.moments = ChannelMoments()

    def write(self, sample: dict[str, Any]) -> None:
        self.writer.write(sample)
        self.moments.add_latent(load_npy_bytes(sample[MEAN_MEMBER], MEAN_MEMBER)[0])


def read_shard_moments(task: ShardTask) -> ChannelMoments:
    """The `latent_stats` of a finished latent shard, read back from its tar (the same bits as when written)."""
    path = Location.of(task.out).join(shard_name(task.index))
    return shard_moments(decode_sample(raw)[MEAN_MEMBER] for raw in iter_samples(path))


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
        target = _MomentsWriter(writer) if task.kind == "latents" else writer
        for batch, ready, decode_failures in batches:
            # Same order as preparing and encoding one batch after the other: its decode failures, then its
            # VAE failures (appended by write_batch), then the next batch's.
            failures.extend(decode_failures)
            write_batch(target, vae, ready, failures, task)
            done += len(batch)
            _report_progress(task.progress_topic, task.index, done)
        extra = {
            "fingerprint": task.fingerprint,
            "items": len(items),
            "first_item": items[0].index if items else None,
            "failures": failures,
        }
        if task.kind == "latents":
            extra[STATS_KEY] = target.moments.to_sidecar()
        sidecar = writer.commit(
            extra,
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

    crops = np.stack([pixels for _, pixels, _ in ready])
    mean, std = encode_pixels(vae, crops)
    mean16, std16 = mean.astype(np.float16), std.astype(np.float16)
    targets16 = _batch_targets(task, crops)
    for j, (item, pixels, meta) in enumerate(ready):
        if not (np.isfinite(mean16[j]).all() and np.isfinite(std16[j]).all()):
            failures.append(_failure(item, task.root, "VAE output is not finite in float16 (NaN or overflow)"))
            continue
        if targets16 is not None and not np.isfinite(targets16[j]).all():
            failures.append(_failure(item, task.root, "encoder targets are not finite in float16 (NaN or overflow)"))
            continue
        # With --keep-images the crop the VAE encoded goes with its latents (their index 1 is its flip); with
        # --encoder-targets the encoder's tokens of the crop and of its flip, in that order.
        writer.write(
            latent_sample(
                item.key,
                mean16[j],
                std16[j],
                item.label,
                meta,
                pixels if task.keep_images else None,
                targets16[j] if targets16 is not None else None,
            )
        )


def _batch_targets(task: ShardTask, crops: np.ndarray) -> np.ndarray | None:
    """REPA's targets of a batch of crops, float16 [B, 2, N, D] (`--encoder-targets`; None without), on the
    worker's device (the VAE's)."""
    if task.targets is None:
        return None
    from pipeline.core.vae import pick_device

    with np.errstate(over="ignore"):  # an overflow becomes inf, refused per item by the caller
        return encode_targets(task.targets, crops, pick_device(task.device)).astype(np.float16)
