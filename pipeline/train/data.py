"""WebDataset loaders for training: latent shards (`encode`) and raw image shards (`pack`).

Each process reads its own shards: shard list -> `urls[rank::world]` (what `wds.split_by_node` does) ->
`[worker::num_workers]` (what `wds.split_by_worker` does). The split is computed from explicit rank / world /
worker numbers rather than read from torch.distributed inside the DataLoader workers, so it is the same in a
forked worker, a test, or a launcher that sets no environment.

Two modes (`data.resampled`):

* resampled (training): every worker draws its process's shards with replacement (`wds.ResampledShards`),
  passes samples through a shuffle buffer and batches them; the stream is infinite. Its seed is derived from
  (seed, rank, worker, start step), so a resumed run draws a *fresh* stream that does not repeat the one
  before the interruption (the exact position in a random stream is not restored -- it does not matter for
  i.i.d. sampling with replacement).
* deterministic (`resampled: false`): fixed shard order, fixed epochs repeated forever, no shuffle buffer,
  per-sample randomness (posterior draw, flip) derived from (seed, epoch, shard, key). A resumed run skips
  exactly the batches consumed before the checkpoint, so the continued run sees the same batches as an
  uninterrupted one. The DataLoader hands out the workers' batches round-robin (batch k of a process comes
  from worker k % W), which is what makes the skip computable per worker (see `ShardStream.worker_shards`).

Latent samples hold the VAE posterior `mean.npy` / `std.npy` (float16 [2, C, h, w], index 1 = flipped image,
unscaled); a training latent is `scaling_factor * (mean + std * eps)` of the original or the flipped view.
Image samples hold `png` (RGB uint8); they are flipped at random and scaled to [-1, 1].
Batches are `(x float32 [B, C, H, W], class_labels long [B])` with -1 for unlabelled samples.
"""

from __future__ import annotations

import io
import logging
import random
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.core.errors import InputError

logger = logging.getLogger(__name__)


class DataFormatError(InputError):
    """A sample or shard that does not follow the documented shard format."""


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
    scaling_factor: float = 1.0  # latents only
    resolution: int | None = None  # images: expected size of each PNG
    conditional: bool = True  # False: labels are ignored (returned as -1)
    num_classes: int = 0  # labels must lie in [0, num_classes) for conditional models
    seed: int = 0
    start_step: int = 0  # resampled: enters the seed; deterministic: see `skip_batches`
    skip_batches: int = 0  # deterministic: batches this process consumed before resuming


def shards_for(
    urls: tuple[str, ...] | list[str], rank: int, world_size: int, worker: int = 0, num_workers: int = 1
) -> list[str]:
    """The shards one DataLoader worker of one process reads: by node, then by worker."""
    return list(urls)[rank::world_size][worker::num_workers]


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


# ---------------------------------------------------------------------------------------------------------------
# Sample decoding
# ---------------------------------------------------------------------------------------------------------------


def _where(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def _decode_label(sample: dict, spec: StreamSpec) -> int:
    raw = sample.get("cls")
    if raw is None:
        raise DataFormatError(f"{_where(sample)}: sample has no 'cls' member")
    try:
        label = int(raw.decode() if isinstance(raw, (bytes, bytearray)) else raw)
    except ValueError:
        raise DataFormatError(f"{_where(sample)}: 'cls' is not an integer: {raw!r}") from None
    if not spec.conditional:
        return -1
    if label < 0:
        raise DataFormatError(f"{_where(sample)}: unlabelled sample (cls -1) for a class-conditional model")
    if label >= spec.num_classes:
        raise DataFormatError(f"{_where(sample)}: label {label} outside the model's {spec.num_classes} classes")
    return label


def _load_npy(sample: dict, name: str) -> np.ndarray:
    raw = sample.get(name)
    if raw is None:
        raise DataFormatError(f"{_where(sample)}: sample has no '{name}' member (is this a latent shard?)")
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError as error:
        raise DataFormatError(f"{_where(sample)}: '{name}' is not a valid .npy array ({error})") from None


def decode_latent(sample: dict, spec: StreamSpec, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
    """One training latent: scaling_factor * (mean + std * eps) of the original or flipped view."""
    mean, std = _load_npy(sample, "mean.npy"), _load_npy(sample, "std.npy")
    if mean.shape != std.shape or mean.ndim != 4 or mean.shape[0] != 2:
        raise DataFormatError(f"{_where(sample)}: mean/std must both be [2, C, h, w], got {mean.shape} and {std.shape}")
    view = int(rng.integers(2)) if spec.hflip else 0
    eps = rng.standard_normal(mean.shape[1:], dtype=np.float32)
    latent = (mean[view].astype(np.float32) + std[view].astype(np.float32) * eps) * np.float32(spec.scaling_factor)
    return torch.from_numpy(latent), _decode_label(sample, spec)


def decode_image(sample: dict, spec: StreamSpec, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
    """One training image in [-1, 1], CHW, randomly flipped."""
    from PIL import Image

    raw = sample.get("png")
    if raw is None:
        raise DataFormatError(f"{_where(sample)}: sample has no 'png' member (is this an image shard?)")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            pixels = np.array(image.convert("RGB"), dtype=np.uint8)
    except OSError as error:
        raise DataFormatError(f"{_where(sample)}: cannot decode the PNG ({error})") from None
    if spec.resolution is not None and pixels.shape[:2] != (spec.resolution, spec.resolution):
        raise DataFormatError(
            f"{_where(sample)}: image is {pixels.shape[1]}x{pixels.shape[0]}, the manifest "
            f"says {spec.resolution}x{spec.resolution}"
        )
    if spec.hflip and rng.integers(2):
        pixels = pixels[:, ::-1]
    image = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).to(torch.float32) / 127.5 - 1.0
    return image, _decode_label(sample, spec)


def collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (x, label) pairs into a batch."""
    xs, labels = zip(*samples)
    return torch.stack(xs), torch.tensor(labels, dtype=torch.long)


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
        self.spec = spec
        self.decode: Callable = decode_latent if spec.kind == "latents" else decode_image

    def worker_shards(self) -> tuple[list[str], int, int]:
        """(shards of this worker, logical worker index, number of workers).

        The DataLoader asks its workers for batches round-robin starting at worker 0, so global batch k of a
        process comes from worker k % W. A deterministic stream resumed after N batches therefore lets
        DataLoader worker w play the part of worker (w + N) % W of the uninterrupted run.
        """
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if not self.spec.resampled:
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

    def _resampled(self, shards: list[str], worker: int) -> Iterator:
        import webdataset as wds

        spec = self.spec
        seed = [spec.seed, spec.rank, worker, spec.start_step]
        rng = np.random.default_rng(seed)
        shard_seed = int(rng.integers(2**31))
        pipeline = wds.DataPipeline(
            wds.ResampledShards(shards, seed=shard_seed, worker_seed=lambda: 0, deterministic=True),
            wds.tarfile_to_samples(handler=wds.reraise_exception),
            wds.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=random.Random(int(rng.integers(2**31))))
            if spec.shuffle_buffer > 1
            else _identity,
        )
        batch = []
        for sample in pipeline:
            batch.append(self.decode(sample, spec, rng))
            if len(batch) == spec.batch_size:
                yield collate(batch)
                batch = []

    def _deterministic(self, shards: list[str], worker: int, num_workers: int) -> Iterator:
        import webdataset as wds

        spec = self.spec
        # This (logical) worker produced global batches worker, worker + W, ...; the next one the resumed run
        # needs from it is global batch skip + (DataLoader worker id), i.e. its own batch number below.
        own_skipped = (spec.skip_batches + (worker - spec.skip_batches) % num_workers) // num_workers
        samples_to_skip = own_skipped * spec.batch_size
        epoch = 0
        batch = []
        while True:
            seen = 0
            for sample in wds.tarfile_to_samples(handler=wds.reraise_exception)(iter([{"url": u} for u in shards])):
                seen += 1
                if samples_to_skip > 0:
                    samples_to_skip -= 1
                    continue
                rng = np.random.default_rng(_sample_seed(spec.seed, epoch, sample))
                batch.append(self.decode(sample, spec, rng))
                if len(batch) == spec.batch_size:
                    yield collate(batch)
                    batch = []
            if seen == 0:
                raise DataFormatError(f"shards {shards} hold no samples")
            epoch += 1


def _identity(source: Any) -> Any:
    return source


def make_loader(spec: StreamSpec, num_workers: int, prefetch_factor: int = 2) -> DataLoader:
    """A DataLoader over `ShardStream(spec)`; batches are built in the workers (batch_size=None here)."""
    workers = check_shard_split(len(spec.urls), spec.world_size, num_workers)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=False)
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
    """Iterate a DataLoader forever (the streams are infinite, this guards against a worker that stops)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise DataFormatError(
                "the data stream produced no batch: the shards hold fewer samples than one batch per worker?"
            )
