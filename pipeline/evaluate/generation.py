"""Generation: seeded samples of store chunks, decoded to uint8 images, written chunk by chunk by each rank."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from diffit.sampling_config import SamplingConfig
from pipeline.evaluate.model_loading import LoadedModel
from pipeline.evaluate.sample_seeds import sample_class_labels, sample_noise_seeds
from pipeline.evaluate.sample_store import SampleStore, assign_chunks

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Generation


@dataclass
class GenerationStats:
    """Where sampling time went, summed over the batches of one process."""

    samples: int = 0
    network_calls: int = 0
    network_time_s: float = 0.0
    sampler_time_s: float = 0.0
    decode_time_s: float = 0.0
    write_time_s: float = 0.0
    total_time_s: float = 0.0

    def add(self, other: GenerationStats) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))


def to_uint8_images(images: torch.Tensor, pixels: str = "round") -> np.ndarray:
    """[-1, 1] float [N, 3, H, W] -> uint8 [N, H, W, 3] by `pixels` ("round" | "truncate", see `to_uint8`)."""
    from diffit.sampling_config import to_uint8

    return to_uint8(images, pixels).permute(0, 2, 3, 1).cpu().numpy()


def decode(loaded: LoadedModel, samples: torch.Tensor) -> torch.Tensor:
    """Sampler output -> images in [-1, 1]: VAE decode of the latents the model's `LatentNorm` maps them back to
    (`x / scaling_factor + shift_factor`, or per channel `x * std_c + mean_c`) for latent models."""
    if loaded.vae is None:
        return samples
    with torch.no_grad():
        return loaded.vae.decode(loaded.latent_norm.denormalize(samples)).sample


def generate(
    loaded: LoadedModel,
    sampling: SamplingConfig,
    seed: int,
    indices: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    device: torch.device | str,
) -> tuple[np.ndarray, GenerationStats]:
    """uint8 [n, H, W, 3] images for sample `indices` (noise seeds from (seed, index)), in batches."""
    from diffit.sampling import sample_with_stats

    stats = GenerationStats()
    outputs = []
    for start in range(0, len(indices), batch_size):
        batch_indices = indices[start : start + batch_size]
        seeds = sample_noise_seeds(seed, batch_indices)
        class_labels = labels[start : start + batch_size] if loaded.num_classes > 0 else None
        began = time.perf_counter()
        network = loaded.sampling_network
        guide = loaded.guide.sampling_network if loaded.guide is not None else None
        latents, run = sample_with_stats(
            network, loaded.sample_shape, class_labels, seeds, sampling, device=device, guide=guide
        )
        sampled = time.perf_counter()
        images = to_uint8_images(decode(loaded, latents), sampling.pixels)
        stats.decode_time_s += time.perf_counter() - sampled
        stats.sampler_time_s += sampled - began
        stats.network_calls += run.network_calls
        stats.network_time_s += run.network_time_s
        stats.samples += len(batch_indices)
        outputs.append(images)
    return np.concatenate(outputs), stats


def sample_into_store(
    store: SampleStore,
    loaded: LoadedModel,
    sampling: SamplingConfig,
    seed: int,
    classes: list[int] | None,
    rank: int,
    world_size: int,
    batch_size: int,
    device: torch.device | str,
    missing: Sequence[int] | None = None,
) -> GenerationStats:
    """Generate this rank's share of the missing chunks and write each one as soon as it is done."""
    from tqdm.auto import tqdm

    missing = store.missing_chunks() if missing is None else list(missing)
    mine = assign_chunks(missing, rank, world_size)
    totals = GenerationStats()
    began = time.perf_counter()
    layout = store.layout
    count = sum(stop - start for start, stop in map(layout.chunk_range, mine))
    # One bar in images with its ETA; sampling and VAE decoding run batch by batch inside each chunk, so the
    # postfix shows how the time splits between them.
    bar = tqdm(total=count, desc=f"sampling+decoding (rank {rank})", unit="img", disable=rank != 0 or not mine)
    with bar:
        for chunk in mine:
            start, stop = layout.chunk_range(chunk)
            indices = np.arange(start, stop)
            labels = sample_class_labels(seed, indices, loaded.num_classes, classes)
            images, stats = generate(loaded, sampling, seed, indices, labels, batch_size, device)
            written = time.perf_counter()
            store.write_chunk(chunk, images, labels)
            stats.write_time_s = time.perf_counter() - written
            totals.add(stats)
            bar.update(stop - start)
            bar.set_postfix(sample_s=f"{totals.sampler_time_s:.0f}", decode_s=f"{totals.decode_time_s:.0f}")
    totals.total_time_s = time.perf_counter() - began
    logger.info(
        "rank %d/%d: wrote %d chunks (%d samples) in %.1f s",
        rank,
        world_size,
        len(mine),
        totals.samples,
        totals.total_time_s,
    )
    return totals
