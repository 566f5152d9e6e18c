"""What sample `i` of an evaluation is: its noise seed and class label, from (`seed`, `i`) alone, so the samples
do not depend on the number of processes or the batch size."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Independent streams of the per-sample hash: the noise seed and the class label of sample i must not be
# correlated, so each gets its own constant mixed into the key.
_NOISE_STREAM = 0x6E6F697365  # "noise"
_LABEL_STREAM = 0x6C6162656C  # "label"


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays: a cheap, platform-independent 64-bit hash (wrap-around intended)."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _per_sample_hash(seed: int, indices: np.ndarray, stream: int) -> np.ndarray:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    key = _splitmix64(np.array([(seed ^ stream) & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    return _splitmix64(key ^ np.asarray(indices, dtype=np.uint64))


def sample_noise_seeds(seed: int, indices: Sequence[int] | np.ndarray) -> list[int]:
    """The noise seed of each sample index: a 63-bit hash of (`seed`, index), usable with `torch.Generator`."""
    hashed = _per_sample_hash(seed, np.asarray(indices), _NOISE_STREAM) >> np.uint64(1)
    return [int(value) for value in hashed]


def sample_class_labels(
    seed: int, indices: Sequence[int] | np.ndarray, num_classes: int, classes: Sequence[int] | None = None
) -> np.ndarray:
    """Class label of each sample index (int64).

    `classes` given: sample i gets `classes[i % len(classes)]` (cycling, e.g. for a class-balanced set).
    Otherwise uniform over `num_classes` from a hash of (`seed`, i); the modulo bias of a 64-bit hash is < 1e-15.
    Unconditional models (`num_classes == 0`) get -1.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if classes is not None:
        if len(classes) == 0:
            raise ValueError("classes: empty list")
        return np.asarray(classes, dtype=np.int64)[indices % len(classes)]
    if num_classes <= 0:
        return np.full(indices.shape, -1, dtype=np.int64)
    hashed = _per_sample_hash(seed, indices, _LABEL_STREAM)
    return (hashed % np.uint64(num_classes)).astype(np.int64)
