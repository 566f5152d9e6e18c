"""Per-channel statistics of a latent dataset's posterior means: what `data.latent_norm: channel` standardises with.

Which values: the posterior means of the ORIGINAL views only (index 0 of each sample's `mean.npy`), exactly as
stored (float16, read as float64), every spatial position, over every sample the dataset holds. The flipped views
(index 1) are left out: they are the same images mirrored, so they would count each image twice while adding next
to nothing (a horizontal flip permutes the positions; only the encoder's small asymmetry differs), and the
statistics then do not depend on `data.hflip`. (REPA / LightningDiT measure over their training latents, flips
included; EDM2 over its dataset's images.) Posterior samples (mean + std * eps) are not what is measured either.

How: per sample, per channel, the mean and the sum of squared deviations (M2) over its h x w values, two-pass in
float64; samples are merged one after the other in item order, and a dataset's shards in shard order, with Chan et
al.'s parallel update (count, mean, M2), which is exact up to float64 rounding (no cancellation, unlike sums of
squares). Because the fold always goes sample by sample, a shard's statistics are the same bits whether they are
accumulated while the shard is encoded or read back from its tar (resume, `--verify`).

Where: each shard's sidecar records its `latent_stats` {count (samples), values (per channel), mean, m2}; the job
merges them into the manifest's `latent_stats` {count, values, mean, std, views} (population std, as numpy's
default `ddof=0`). `manifest_stats_problems` bounds what a manifest declares.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

STATS_KEY = "latent_stats"
VIEWS = "original"  # the manifest says which views the statistics cover
# As `diffit.latent_norm.MAX_LATENT_CHANNELS` (an AutoencoderKL config's bound; not imported: `import diffit`
# imports torch, and manifest readers need none).
MAX_LATENT_CHANNELS = 256
FP16_MAX = 65504.0  # stored latents are float16: no mean or std can exceed this


@dataclass
class ChannelMoments:
    """Count, mean and M2 (sum of squared deviations) per channel; `values`: values per channel so far."""

    samples: int = 0
    values: int = 0
    mean: np.ndarray | None = None  # float64 [C]
    m2: np.ndarray | None = None  # float64 [C]

    @staticmethod
    def of_latent(latent: np.ndarray) -> ChannelMoments:
        """The moments of one latent [C, h, w] (two-pass, float64)."""
        values = np.asarray(latent, dtype=np.float64).reshape(latent.shape[0], -1)
        mean = values.mean(axis=1)
        m2 = np.square(values - mean[:, None]).sum(axis=1)
        return ChannelMoments(1, values.shape[1], mean, m2)

    def merge(self, other: ChannelMoments) -> None:
        """Add `other`'s values (Chan et al.'s parallel update)."""
        if other.values == 0:
            return
        if self.values == 0:
            self.samples, self.values, self.mean, self.m2 = other.samples, other.values, other.mean, other.m2
            return
        if len(other.mean) != len(self.mean):
            raise ValueError(f"latent statistics of {len(other.mean)} channels merged into {len(self.mean)}")
        total = self.values + other.values
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.values / total)
        self.m2 = self.m2 + other.m2 + np.square(delta) * (self.values * other.values / total)
        self.samples += other.samples
        self.values = total

    def add_latent(self, latent: np.ndarray) -> None:
        """Add one latent [C, h, w]."""
        self.merge(ChannelMoments.of_latent(latent))

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation per channel (numpy's `std`, ddof=0)."""
        return np.sqrt(np.maximum(self.m2, 0.0) / self.values)

    def to_sidecar(self) -> dict[str, Any]:
        """A shard sidecar's `latent_stats` (exact: JSON floats round-trip)."""
        if self.values == 0:
            return {"count": 0, "values": 0, "mean": [], "m2": []}
        return {
            "count": self.samples,
            "values": self.values,
            "mean": [float(v) for v in self.mean],
            "m2": [float(v) for v in self.m2],
        }

    @staticmethod
    def from_sidecar(entry: Any, channels: int | None = None) -> ChannelMoments | None:
        """The moments a sidecar records; None when they are missing or not sane (the shard is then read back)."""
        if not isinstance(entry, dict):
            return None
        samples, values, mean, m2 = (entry.get(key) for key in ("count", "values", "mean", "m2"))
        if not (_is_count(samples) and _is_count(values)) or not (isinstance(mean, list) and isinstance(m2, list)):
            return None
        if values == 0:
            return ChannelMoments() if samples == 0 and not mean and not m2 else None
        if samples == 0 or len(mean) != len(m2) or not mean or (channels is not None and len(mean) != channels):
            return None
        if not all(_is_finite(v) and abs(v) <= FP16_MAX for v in mean) or not all(_is_finite(v) and v >= 0 for v in m2):
            return None
        return ChannelMoments(samples, values, np.array(mean, dtype=np.float64), np.array(m2, dtype=np.float64))

    def manifest_entry(self) -> dict[str, Any] | None:
        """The manifest's `latent_stats` (None for a dataset without samples)."""
        if self.values == 0:
            return None
        return {
            "count": self.samples,
            "values": self.values,
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "views": VIEWS,
        }


def shard_moments(latents: Iterable[np.ndarray]) -> ChannelMoments:
    """The moments of the original views of a shard's `mean.npy` arrays [2, C, h, w], in item order."""
    moments = ChannelMoments()
    for mean in latents:
        moments.add_latent(mean[0])
    return moments


def merge_shards(entries: Iterable[ChannelMoments]) -> ChannelMoments:
    """The moments of a whole dataset from its shards' (in shard order)."""
    total = ChannelMoments()
    for entry in entries:
        total.merge(entry)
    return total


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def manifest_stats_problems(stats: Any, channels: Any, max_channels: int) -> list[str]:
    """What is wrong with a manifest's `latent_stats`: an object with a positive count, and `mean` / `std` lists of
    `latent_channels` finite numbers within the float16 range (std >= 0); [] when sane."""
    if not isinstance(stats, dict):
        return [f"{STATS_KEY} is not an object"]
    problems = []
    if not (_is_count(stats.get("count")) and stats["count"] > 0):
        problems.append(f"{STATS_KEY}.count {stats.get('count')!r:.40} is not a positive integer")
    if "values" in stats and not (_is_count(stats["values"]) and stats["values"] > 0):
        problems.append(f"{STATS_KEY}.values {stats.get('values')!r:.40} is not a positive integer")
    for key, low in (("mean", -FP16_MAX), ("std", 0.0)):
        values = stats.get(key)
        if not isinstance(values, list) or not 1 <= len(values) <= max_channels:
            problems.append(f"{STATS_KEY}.{key} is not a list of 1 to {max_channels} numbers")
        elif channels is not None and len(values) != channels:
            problems.append(f"{STATS_KEY}.{key} has {len(values)} entries for {channels} latent channels")
        elif not all(_is_finite(v) and low <= v <= FP16_MAX for v in values):
            problems.append(f"{STATS_KEY}.{key} holds a value that is not a finite number in [{low:g}, {FP16_MAX:g}]")
    return problems
