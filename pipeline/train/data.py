"""WebDataset loaders for training: latent shards (`encode`) and raw image shards (`pack`).

Two modes (`data.resampled`):

* resampled (training): every worker of every process draws from ALL shards with replacement
  (`wds.ResampledShards`), so each shard is drawn equally often whatever the number of processes and workers;
  samples pass through a shuffle buffer and are batched; the stream is infinite. Its seed is derived from
  (seed, rank, worker, start step): processes and workers draw different streams, and a resumed run draws a
  *fresh* stream that does not repeat the one before the interruption (the exact position in a random stream
  is not restored -- it does not matter for i.i.d. sampling with replacement).
* deterministic (`resampled: false`): each process reads its own shards, `urls[rank::world]` (what
  `wds.split_by_node` does), each worker `[worker::num_workers]` of those (`wds.split_by_worker`), in fixed
  order, fixed epochs repeated forever, no shuffle buffer, per-sample randomness (posterior draw, flip) derived
  from (seed, epoch, shard, key). The shard count must divide evenly over processes x workers (otherwise some
  shards would be read more often than others; `check_balanced_split`). A resumed run skips exactly the
  batches consumed before the checkpoint, so the continued run sees the same batches as an uninterrupted one.
  The DataLoader hands out the workers' batches round-robin (batch k of a process comes from worker k % W),
  which is what makes the skip computable per worker (see `ShardStream.worker_shards`).
  The split is computed from explicit rank / world / worker numbers rather than read from torch.distributed
  inside the DataLoader workers, so it is the same in a forked worker, a test, or a launcher that sets no
  environment.

Integrity (`pipeline.train.shard_reading`): a shard is verified against the manifest's sha256 before any of its
samples is decoded, the next one read in a background thread. A damaged shard stops the run with a
`CorruptShardError` naming it, or, with `data.on_corrupt_shard: skip`, is left out with a warning and counted
(`ShardStream.damaged`, one flag per shard shared by the DataLoader workers).

Samples are decoded by `pipeline.train.sample_decoding` (latents: a posterior draw of the original or flipped
view; images: randomly flipped, scaled to [-1, 1]).
Batches are `(x float32 [B, C, H, W], class_labels long [B])` with -1 for unlabelled samples; a latent stream with
`images` (REPA) adds each sample's image, `(x, class_labels, images uint8 [B, 3, R, R])`; one with `targets`
(REPA, stored targets) adds each sample's stored targets of its view, `(x, class_labels, targets float16 [B, N, D])`.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import random
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.core.errors import PipelineError
from pipeline.core.storage_io import is_url, release_clients
from pipeline.train.preemption import ignore_stop_signals
from pipeline.train.sample_decoding import collate, decode_image, decode_latent
from pipeline.train.shard_reading import CorruptShardError, DataFormatError, parse_shard, read_ahead, read_shard

logger = logging.getLogger(__name__)

ON_CORRUPT = ("error", "skip")
_Item = TypeVar("_Item")


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to build its part of the stream (picklable for DataLoader workers)."""

    urls: tuple[str, ...]
    kind: str  # "latents" | "images"
    batch_size: int
    rank: int = 0
    world_size: int = 1
    resampled: bool = True
    shuffle_buffer: int = 1000
    hflip: bool = True
    scaling_factor: float = 1.0  # latents only, without `latent_norm`: scalar, no shift
    latent_norm: Any = None  # latents: a `diffit.latent_norm.LatentNorm` (None: scalar `scaling_factor`)
    resolution: int | None = None  # images: expected size of each PNG
    conditional: bool = True  # False: labels are ignored (returned as -1)
    num_classes: int = 0  # labels must lie in [0, num_classes) for conditional models
    seed: int = 0
    start_step: int = 0  # resampled: enters the seed; deterministic: see `skip_batches`
    skip_batches: int = 0  # deterministic: batches this process consumed before resuming
    sha256: tuple[str, ...] | None = None  # each shard's expected sha256 (the manifest's); None: not checked
    on_corrupt: str = "error"  # a damaged shard: "error" stops the stream, "skip" leaves it out (logged)
    images: bool = False  # latents: also each sample's `png` (flipped with its view): batches (x, labels, images)
    # latents: also each sample's stored REPA targets of its view, every member checked to be float16 of this
    # [2, N, D] shape: batches (x, labels, targets float16 [B, N, D]). None: not read.
    targets: tuple[int, int, int] | None = None


def shards_for(
    urls: tuple[str, ...] | list[str], rank: int, world_size: int, worker: int = 0, num_workers: int = 1
) -> list[str]:
    """The shards one DataLoader worker of one process reads in deterministic mode: by node, then by worker."""
    return list(urls)[rank::world_size][worker::num_workers]


def process_shards(spec: StreamSpec) -> list[str]:
    """The shards this process reads: all of them in resampled mode (every process draws from every shard),
    its own `urls[rank::world]` in deterministic mode."""
    return list(spec.urls) if spec.resampled else shards_for(spec.urls, spec.rank, spec.world_size)


def check_shard_split(num_shards: int, world_size: int, num_workers: int) -> int:
    """Number of DataLoader workers to use: every process needs >= 1 shard, every worker >= 1 shard.

    Fewer shards than processes is an error (a process would have no data); fewer shards per process than
    workers lowers the worker count (webdataset would otherwise fail with "No samples found"), logged.
    """
    if num_shards < world_size:
        raise DataFormatError(
            f"{num_shards} shard(s) for {world_size} processes: every process needs its own "
            "shard; write more shards (encode --shard-size) or use fewer processes"
        )
    per_process = num_shards // world_size
    workers = max(num_workers, 1)
    if per_process < workers:
        logger.warning(
            "%d shard(s) per process but data.num_workers=%d: using %d DataLoader worker(s) so that "
            "every worker has a shard",
            per_process,
            num_workers,
            per_process,
        )
        workers = per_process
    return workers if num_workers > 0 else 0


def check_balanced_split(num_shards: int, world_size: int, num_workers: int, resampled: bool) -> None:
    """Deterministic mode reads each worker's own shards in turn, so the shards must divide evenly over
    processes x workers: with 3 shards over 2 processes, the process holding one shard would read it twice
    as often as the other two. Resampled mode draws every shard uniformly everywhere and needs no check."""
    parts = world_size * max(num_workers, 1)
    if resampled or num_shards % parts == 0:
        return
    raise DataFormatError(
        f"data.resampled is false (fixed order) but {num_shards} shards do not divide evenly over {world_size} "
        f"process(es) x {max(num_workers, 1)} DataLoader worker(s), so some shards would be read more often than "
        f"others; re-encode with a shard count divisible by {parts} (encode --shard-size), change "
        "data.num_workers or the number of processes, or set data.resampled: true (draws every shard uniformly)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------------------------


def _sample_seed(seed: int, epoch: int, sample: dict) -> list[int]:
    """Seed of a sample's own random draws in deterministic mode: independent of workers and of resuming.

    The shard's file name, not its full URL, enters the seed: the same dataset copied to another directory or
    machine gives the same draws.
    """
    shard_name = str(sample.get("__url__", "")).replace("\\", "/").rsplit("/", 1)[-1]
    identity = f"{shard_name}\0{sample.get('__key__', '')}".encode()
    return [seed, epoch, zlib.crc32(identity)]


class ShardStream(IterableDataset):
    """Infinite stream of batches of one process; see the module docstring for the two modes."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        if spec.kind not in ("latents", "images"):
            raise DataFormatError(f"unknown shard kind {spec.kind!r}")
        if spec.images and spec.kind != "latents":
            raise DataFormatError("only a latent stream carries images beside x (an image stream's x is the image)")
        if spec.targets is not None and (spec.kind != "latents" or spec.images):
            raise DataFormatError("stored REPA targets come with latents, instead of the images (not beside them)")
        if spec.on_corrupt not in ON_CORRUPT:
            raise DataFormatError(f"data.on_corrupt_shard must be one of {ON_CORRUPT}, got {spec.on_corrupt!r}")
        if spec.sha256 is not None and len(spec.sha256) != len(spec.urls):
            raise DataFormatError(f"{len(spec.sha256)} sha256 digests for {len(spec.urls)} shards")
        self.spec = spec
        self.decode: Callable = decode_latent if spec.kind == "latents" else decode_image
        self.index = {url: i for i, url in enumerate(spec.urls)}
        # One flag per shard, shared with the DataLoader workers: set by the worker that finds the shard damaged
        # (skip mode), read by the trainer for its count, and by every worker to leave the shard out unread.
        self.damaged = multiprocessing.Array("b", len(spec.urls))

    def worker_shards(self) -> tuple[list[str], int, int]:
        """(shards of this worker, logical worker index, number of workers).

        Resampled: every worker draws from all shards. Deterministic: the DataLoader asks its workers for
        batches round-robin starting at worker 0, so global batch k of a process comes from worker k % W. A
        deterministic stream resumed after N batches therefore lets DataLoader worker w play the part of worker
        (w + N) % W of the uninterrupted run.
        """
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.spec.resampled:
            return list(self.spec.urls), worker, num_workers
        worker = (worker + self.spec.skip_batches) % num_workers
        shards = shards_for(self.spec.urls, self.spec.rank, self.spec.world_size, worker, num_workers)
        if not shards:
            raise DataFormatError(
                f"worker {worker} of process {self.spec.rank} has no shard "
                f"({len(self.spec.urls)} shards, {self.spec.world_size} processes, "
                f"{num_workers} workers)"
            )
        return shards, worker, num_workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shards, worker, num_workers = self.worker_shards()
        if self.spec.resampled:
            return self._resampled(shards, worker)
        return self._deterministic(shards, worker, num_workers)

    # -- reading and verifying shards ------------------------------------------------------------------------

    def _read(self, url: str) -> bytes | None:
        """A shard's verified bytes (runs in the read-ahead thread); None for a shard already found damaged."""
        index = self.index[url]
        if self.damaged[index]:
            return None
        return read_shard(url, self.spec.sha256[index] if self.spec.sha256 is not None else None)

    def _samples(self, shards: list[str], items: Iterable[_Item], url_of: Callable[[_Item], str]):
        """(item, sample) for the samples of each item's shard, in order; a damaged shard raises, or in skip
        mode is flagged, logged once and left out (all of `shards` damaged: an error, nothing is left)."""
        for item, result in read_ahead(items, lambda item: self._read(url_of(item))):
            url = url_of(item)
            try:
                if isinstance(result, PipelineError):
                    raise result
                samples = parse_shard(url, result) if result is not None else []
            except CorruptShardError as error:
                if self.spec.on_corrupt != "skip":
                    raise
                self._skip(url, error)
                samples = []
            if not samples and all(self.damaged[self.index[u]] for u in shards):
                raise CorruptShardError(
                    f"every shard this worker reads is damaged ({', '.join(shards)}); nothing left to train on"
                )
            for sample in samples:
                yield item, sample

    def _skip(self, url: str, error: CorruptShardError) -> None:
        """Flag a damaged shard (skip mode) and warn once per shard."""
        with self.damaged.get_lock():
            first = not self.damaged[self.index[url]]
            self.damaged[self.index[url]] = 1
        if first:
            logger.warning("skipping a damaged shard (data.on_corrupt_shard: skip): %s", error)

    # -- the two modes -----------------------------------------------------------------------------------------

    def _resampled(self, shards: list[str], worker: int) -> Iterator:
        import webdataset as wds

        spec = self.spec
        seed = [spec.seed, spec.rank, worker, spec.start_step]
        rng = np.random.default_rng(seed)
        shard_seed = int(rng.integers(2**31))
        draws = (
            source["url"]
            for source in wds.ResampledShards(shards, seed=shard_seed, worker_seed=lambda: 0, deterministic=True)
        )
        samples = (sample for _, sample in self._samples(shards, draws, _identity))
        if spec.shuffle_buffer > 1:
            shuffle_rng = random.Random(int(rng.integers(2**31)))
            samples = wds.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=shuffle_rng)(samples)
        batch = []
        for sample in samples:
            batch.append(self.decode(sample, spec, rng))
            if len(batch) == spec.batch_size:
                yield collate(batch)
                batch = []

    def _deterministic(self, shards: list[str], worker: int, num_workers: int) -> Iterator:
        spec = self.spec
        # This (logical) worker produced global batches worker, worker + W, ...; the next one the resumed run
        # needs from it is global batch skip + (DataLoader worker id), i.e. its own batch number below.
        own_skipped = (spec.skip_batches + (worker - spec.skip_batches) % num_workers) // num_workers
        samples_to_skip = own_skipped * spec.batch_size
        # Epoch after epoch over the same shards, read ahead across the epoch boundary.
        epochs = ((epoch, url) for epoch in itertools.count() for url in shards)
        batch = []
        for (epoch, _), sample in self._samples(shards, epochs, _shard_url):
            if samples_to_skip > 0:
                samples_to_skip -= 1
                continue
            rng = np.random.default_rng(_sample_seed(spec.seed, epoch, sample))
            batch.append(self.decode(sample, spec, rng))
            if len(batch) == spec.batch_size:
                yield collate(batch)
                batch = []


def _identity(source: Any) -> Any:
    return source


def _shard_url(item: tuple[int, str]) -> str:
    return item[1]


def make_loader(spec: StreamSpec, num_workers: int, prefetch_factor: int = 2) -> DataLoader:
    """A DataLoader over `ShardStream(spec)`; batches are built in the workers (batch_size=None here)."""
    workers = check_shard_split(len(spec.urls), spec.world_size, num_workers)
    check_balanced_split(len(spec.urls), spec.world_size, workers, spec.resampled)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        # Workers ignore SIGTERM / SIGUSR1: the trainer stops on them after a checkpoint, then stops the workers.
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=False, worker_init_fn=ignore_stop_signals)
    # The loader's own generator: creating its iterator must not draw from the global RNG (which the trainer
    # restores on resume and uses for noise and timesteps).
    generator = torch.Generator().manual_seed(spec.seed)
    return DataLoader(
        ShardStream(spec),
        batch_size=None,
        num_workers=workers,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
        **kwargs,
    )


def infinite(loader: DataLoader) -> Iterator:
    """Iterate a DataLoader forever (the streams are infinite, this guards against a worker that stops).

    A PipelineError raised in a DataLoader worker reaches this process as the same class with torch's
    "Caught ... in DataLoader worker process N. Original Traceback ..." text; it is raised again here with its
    own one-line message, so the user sees the shard and the problem, not a traceback.
    """
    spec = getattr(loader.dataset, "spec", None)
    remote = loader.num_workers > 0 and spec is not None and any(is_url(url) for url in spec.urls)
    while True:
        yielded = False
        if remote:
            release_clients()  # before the workers fork (see `pipeline.core.storage_io.release_clients`)
        batches, failure = iter(loader), None
        try:
            for batch in batches:
                yielded = True
                yield batch
        except PipelineError as error:
            failure = worker_error(error).with_traceback(None)  # holds no frame that holds the loader's iterator
        if failure is not None:
            # Stop and join the workers now. Left to interpreter exit, a worker that already ended with this
            # error can fire the DataLoader's SIGCHLD check inside multiprocessing's atexit join, which prints a
            # traceback after the one-line error.
            del batches
            raise failure from None
        if not yielded:
            raise DataFormatError(
                "the data stream produced no batch: the shards hold fewer samples than one batch per worker?"
            )


def worker_error(error: PipelineError) -> PipelineError:
    """`error` with the one-line message it had in the DataLoader worker (unchanged if it was not re-raised
    from a worker)."""
    text = str(error)
    if "Original Traceback" not in text:
        return error
    name = type(error).__name__
    for line in reversed(text.splitlines()):
        head, _, message = line.partition(": ")
        if message and head.rsplit(".", 1)[-1] == name:
            try:
                return type(error)(message)
            except TypeError:
                break
    return error
