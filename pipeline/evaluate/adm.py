"""The metric math of the ADM evaluator (guided-diffusion `evaluations/evaluator.py`), the protocol behind the
published ImageNet numbers, in bounded memory and on the GPU when there is one.

- `frechet_distance`: `FIDStatistics.frechet_distance`, in float64: `scipy.linalg.sqrtm` of the covariance product;
  when that is not finite (a singular product), `eps` = 1e-6 is added to both diagonals and the root taken again;
  imaginary parts of the root's diagonal beyond 1e-3 are an error, smaller ones are dropped.
- `RunningMoments`: mean and covariance accumulated batch by batch in float64 (Chan et al.'s pairwise update of
  the centred scatter matrix), so the statistics of a 1.28M-image set never need all its features in memory; the
  covariance is `np.cov`'s (divided by n - 1).
- `inception_score`: `Evaluator.compute_inception_score`, consecutive splits of 5000 samples, no shuffling.
- `manifold_radii` / `precision_recall`: `ManifoldEstimator` with k = 3. A point's radius is the k-th smallest
  squared distance to the points of its own set (the point itself, at distance 0, is the 0-th); a sample counts
  for precision when it lies within the radius of some reference point, a reference point counts for recall when
  it lies within the radius of some sample. Squared distances are `max(|u|^2 - 2 u.v + |v|^2, 0)` as in the
  evaluator's `_batch_pairwise_distances`, computed block by block so that the distance blocks never exceed
  `memory_bytes`, whatever the numbers of samples and references.

  Precision ("fp16", the default, as the evaluator): `DistanceBlock` casts both feature batches to float16 and
  computes the distances in float16; where a block of the evaluator's size (10,000 x 10,000, `EVALUATOR_BLOCK`)
  holds a value that is not finite, that whole block is recomputed in float32. At pool-feature norms the float16
  grid is coarse (steps of 2 near 2,000), so many distances tie on the `<=` radius test: the published precision /
  recall carry those ties. Float16 arithmetic is emulated the way the evaluator's GPU kernels round: each
  elementwise op (square, -2 u.v + |u|^2, + |v|^2) rounded to float16, the sums of the norms and of the matmul
  accumulated in float32 and rounded to float16 once. "fp32" computes every distance in float32 (the choice of
  torch-fidelity and of this project before the evaluator's rounding was reproduced).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core.errors import InputError, JobFailedError

logger = logging.getLogger(__name__)

PRC_NEIGHBOURHOOD = 3
ADM_IS_SPLIT_SIZE = 5000  # the evaluator's `split_size`: 50k samples -> 10 consecutive splits
FRECHET_EPS = 1e-6
# Bytes one element of a distance block costs at the peak of `_block_memberships`: the float32 distance and two
# bool comparison results (one alive at a time) plus slack for the matmul's own workspace.
BYTES_PER_BLOCK_ELEMENT = 8
DEFAULT_PRC_MEMORY_BYTES = 2 * 1024**3
# `ManifoldEstimator(row_batch_size=10000, col_batch_size=10000)`: the blocks whose float16 distances are kept
# when all finite and recomputed in float32 otherwise.
EVALUATOR_BLOCK = 10_000
DISTANCE_PRECISIONS = ("fp16", "fp32")


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance


def _matrix_sqrt(matrix: np.ndarray) -> np.ndarray:
    """`scipy.linalg.sqrtm` (NaN where it fails outright, so the caller's finiteness check takes over)."""
    import warnings

    from scipy import linalg

    try:
        with warnings.catch_warnings():  # a singular product is handled (and logged) by the caller
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            root = linalg.sqrtm(matrix)
    except (linalg.LinAlgError, ValueError):
        return np.full_like(matrix, np.nan)
    return root[0] if isinstance(root, tuple) else root


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = FRECHET_EPS
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), exactly as the ADM evaluator computes it."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise InputError(
            f"Fréchet distance of statistics of different sizes: mu {mu1.shape} / {mu2.shape}, "
            f"sigma {sigma1.shape} / {sigma2.shape}"
        )
    for name, values in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(values).all():
            raise InputError(f"Fréchet distance: {name} holds NaN or inf values; statistics must be finite")
    diff = mu1 - mu2
    covmean = _matrix_sqrt(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        logger.warning("Fréchet distance: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _matrix_sqrt((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise JobFailedError(
                f"Fréchet distance: the square root of the covariance product has an imaginary component "
                f"{np.max(np.abs(covmean.imag)):.3g} (degenerate statistics: too few images for the dimension?)"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------------------------
# Inception Score


def inception_score(logits: torch.Tensor | np.ndarray, split_size: int = ADM_IS_SPLIT_SIZE) -> tuple[float, float]:
    """`Evaluator.compute_inception_score`: softmax over the (bias-free) logits, then for consecutive splits of
    `split_size` samples exp(mean_x KL(p(y|x) || p(y))) with p(y) the split's mean; returns (mean, std) over the
    splits (the evaluator reports the mean). In float64, with log p from `log_softmax` (the evaluator's
    `np.log(softmax)` gives -inf * 0 = NaN where a probability underflows; the value is otherwise the same)."""
    logits = torch.as_tensor(logits).double()
    probabilities, log_probabilities = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for start in range(0, logits.shape[0], split_size):
        p, log_p = probabilities[start : start + split_size], log_probabilities[start : start + split_size]
        kl = (p * (log_p - p.mean(dim=0, keepdim=True).log())).sum(dim=1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------------------------------
# Streamed statistics


@dataclass
class RunningMoments:
    """Count, mean and centred scatter matrix sum (x - mean)(x - mean)^T of the features seen so far (float64).

    `update` takes a batch on any device and does the float64 work there; `merge` combines two accumulators
    (e.g. per-chunk partial results read back after a restart). Both use the pairwise update
    M = M_a + M_b + delta delta^T n_a n_b / n, which stays accurate where the naive sum of squares would cancel.
    """

    count: int
    mean: torch.Tensor
    scatter: torch.Tensor

    @classmethod
    def empty(cls, dim: int, device: torch.device | str = "cpu") -> RunningMoments:
        zeros = torch.zeros(dim, dtype=torch.float64, device=device)
        return cls(0, zeros, torch.zeros(dim, dim, dtype=torch.float64, device=device))

    @classmethod
    def of(cls, features: torch.Tensor) -> RunningMoments:
        """The moments of one batch [n, dim]."""
        values = features.reshape(features.shape[0], -1).to(torch.float64)
        mean = values.mean(dim=0)
        centred = values - mean
        return cls(int(values.shape[0]), mean, centred.T @ centred)

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features [n, dim]."""
        if features.shape[0]:
            self.merge(RunningMoments.of(features.to(self.mean.device)))

    def merge(self, other: RunningMoments) -> None:
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.scatter = other.count, other.mean.clone(), other.scatter.clone()
            return
        total = self.count + other.count
        delta = other.mean.to(self.mean.device) - self.mean
        self.scatter += other.scatter.to(self.mean.device) + torch.outer(delta, delta) * (
            self.count * other.count / total
        )
        self.mean += delta * (other.count / total)
        self.count = total

    def covariance(self) -> np.ndarray:
        """`np.cov(features, rowvar=False)` of everything seen (ddof 1)."""
        if self.count < 2:
            raise InputError(f"a covariance needs at least 2 images, got {self.count}")
        return (self.scatter / (self.count - 1)).cpu().numpy()

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) as float64 numpy arrays."""
        return self.mean.cpu().numpy().copy(), self.covariance()

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The accumulator as arrays (for a partial-result file)."""
        return {
            f"{prefix}count": np.asarray(self.count, np.int64),
            f"{prefix}mean": self.mean.cpu().numpy(),
            f"{prefix}scatter": self.scatter.cpu().numpy(),
        }

    @classmethod
    def from_arrays(cls, arrays, prefix: str, device: torch.device | str = "cpu") -> RunningMoments:
        return cls(
            int(arrays[f"{prefix}count"]),
            torch.as_tensor(np.asarray(arrays[f"{prefix}mean"], np.float64), device=device),
            torch.as_tensor(np.asarray(arrays[f"{prefix}scatter"], np.float64), device=device),
        )


def feature_statistics(
    features: torch.Tensor | np.ndarray, device: torch.device | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a feature matrix [n, dim] in float64 (`np.mean`, `np.cov(rowvar=False)`), computed on
    `device` (default: where the features are)."""
    features = torch.as_tensor(features)
    return RunningMoments.of(features.to(device) if device is not None else features).statistics()


# ----------------------------------------------------------------------------------------------------------------
# Precision and recall (k-NN manifolds)


def block_shape(rows: int, cols: int, memory_bytes: int) -> tuple[int, int]:
    """(row block, column block) of a distance computation whose blocks fit in `memory_bytes`: whole rows of
    `cols` columns when at least one fits, else one row in column pieces."""
    elements = max(1, int(memory_bytes) // BYTES_PER_BLOCK_ELEMENT)
    if elements >= cols:
        return max(1, min(rows, elements // cols)), cols
    return 1, elements


def squared_distances(u: torch.Tensor, v: torch.Tensor, u_norms: torch.Tensor, v_norms: torch.Tensor) -> torch.Tensor:
    """max(|u|^2 - 2 u.v + |v|^2, 0) for every pair of rows (the evaluator's `_batch_pairwise_distances`)."""
    distances = u @ v.T
    distances.mul_(-2).add_(u_norms[:, None]).add_(v_norms[None, :])
    return distances.clamp_(min=0)


def squared_distances_fp16(
    u: torch.Tensor, v: torch.Tensor, u_norms: torch.Tensor, v_norms: torch.Tensor
) -> torch.Tensor:
    """`_batch_pairwise_distances` on float16 features and norms (`half_norms`), rounded as in float16: the
    matmul accumulated in float32 (exact products of float16 values) and rounded once, then -2 u.v + |u|^2 and
    + |v|^2 each rounded to float16 (a - 2b and -2b + a are the same IEEE operation). Returns float16."""
    distances = (u.float() @ v.float().T).half()
    distances.mul_(-2).add_(u_norms[:, None]).add_(v_norms[None, :])
    return distances.clamp_(min=0)


def half_norms(features: torch.Tensor) -> torch.Tensor:
    """|u|^2 of float16 rows as the evaluator's float16 graph gives it: squares rounded to float16, summed in
    float32, the sum rounded to float16."""
    return (features * features).float().sum(dim=1).half()


@dataclass
class _Points:
    """A feature set with what the distance blocks need: float32 rows and norms, and their float16 versions."""

    values: torch.Tensor
    norms: torch.Tensor
    values16: torch.Tensor | None = None
    norms16: torch.Tensor | None = None

    @classmethod
    def of(cls, features: torch.Tensor, precision: str) -> _Points:
        points = cls(features, features.pow(2).sum(dim=1))
        if precision == "fp16":
            points.values16 = features.half()
            points.norms16 = half_norms(points.values16)
        return points

    def __len__(self) -> int:
        return self.values.shape[0]


def _distance_block(a: _Points, rows: tuple[int, int], b: _Points, cols: tuple[int, int], fp16: bool) -> torch.Tensor:
    (r0, r1), (c0, c1) = rows, cols
    if fp16:
        return squared_distances_fp16(a.values16[r0:r1], b.values16[c0:c1], a.norms16[r0:r1], b.norms16[c0:c1])
    return squared_distances(a.values[r0:r1], b.values[c0:c1], a.norms[r0:r1], b.norms[c0:c1])


def _blocks(count: int, size: int):
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="block", disable=not enabled, leave=False)


def _tiles(rows: int, cols: int, memory_bytes: int):
    """The evaluator's blocks ((row range), (column range)) and, for each, the memory-bounded blocks inside it."""
    plan = []
    for tile_rows in _blocks(rows, EVALUATOR_BLOCK):
        for tile_cols in _blocks(cols, EVALUATOR_BLOCK):
            height, width = block_shape(tile_rows[1] - tile_rows[0], tile_cols[1] - tile_cols[0], memory_bytes)
            inner = [
                ((tile_rows[0] + r0, tile_rows[0] + r1), (tile_cols[0] + c0, tile_cols[0] + c1))
                for r0, r1 in _blocks(tile_rows[1] - tile_rows[0], height)
                for c0, c1 in _blocks(tile_cols[1] - tile_cols[0], width)
            ]
            plan.append((tile_rows, tile_cols, inner))
    return plan


def _per_tile(a: _Points, b: _Points, precision: str, memory_bytes: int, progress, description: str, reduce):
    """Run `reduce(rows, cols, block, state)` over every memory block of every evaluator block, in `precision`;
    an evaluator block with a non-finite float16 distance is run again from a fresh state in float32. Yields
    (tile rows, tile cols, state) per evaluator block."""
    plan = _tiles(len(a), len(b), memory_bytes)
    with _progress(sum(len(inner) for *_, inner in plan), description, progress) as bar:
        for tile_rows, tile_cols, inner in plan:
            fp16 = precision == "fp16"
            while True:
                state, finite = {}, True
                for rows, cols in inner:
                    block = _distance_block(a, rows, b, cols, fp16)
                    if fp16 and not bool(torch.isfinite(block).all()):
                        finite = False
                        break
                    reduce(rows, cols, block, state)
                    del block
                    bar.update(1)
                if finite:
                    break
                logger.info("%s: a float16 distance block is not finite; recomputing it in float32", description)
                fp16 = False
            yield tile_rows, tile_cols, state


def manifold_radii(
    features: torch.Tensor,
    k: int = PRC_NEIGHBOURHOOD,
    memory_bytes: int = DEFAULT_PRC_MEMORY_BYTES,
    progress: bool = False,
    description: str = "k-NN radii",
    precision: str = "fp16",
) -> torch.Tensor:
    """The k-th smallest squared distance of every row to the rows of `features` (itself included, at index 0),
    float32 (of float16 distances when `precision` is "fp16").

    The k + 1 smallest distances of a row block are kept while its column blocks stream past, so memory is one
    distance block, however many rows there are.
    """
    count = features.shape[0]
    if count <= k:
        raise InputError(f"precision/recall with k = {k} needs more than {k} feature vectors per set, got {count}")
    points = _Points.of(features, _check_precision(precision))

    def keep_nearest(rows, cols, block, state):
        smallest = torch.topk(block.float(), min(k + 1, cols[1] - cols[0]), dim=1, largest=False).values
        previous = state.get(rows)
        merged = smallest if previous is None else torch.cat([previous, smallest], dim=1)
        state[rows] = torch.topk(merged, min(k + 1, merged.shape[1]), dim=1, largest=False).values

    nearest: dict[tuple[int, int], torch.Tensor] = {}  # evaluator row block -> its k + 1 smallest so far
    for tile_rows, _, state in _per_tile(points, points, precision, memory_bytes, progress, description, keep_nearest):
        candidates = torch.cat([state[rows] for rows in sorted(state)], dim=0)  # the memory blocks' rows, in order
        previous = nearest.get(tile_rows)
        merged = candidates if previous is None else torch.cat([previous, candidates], dim=1)
        nearest[tile_rows] = torch.topk(merged, min(k + 1, merged.shape[1]), dim=1, largest=False).values
    radii = torch.empty(count, dtype=torch.float32, device=features.device)
    for (r0, r1), candidates in nearest.items():
        radii[r0:r1] = torch.sort(candidates, dim=1).values[:, k]
    return radii


def _block_memberships(
    reference: _Points,
    reference_radii: torch.Tensor,
    samples: _Points,
    sample_radii: torch.Tensor,
    memory_bytes: int,
    progress: bool,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference point inside some sample ball, sample inside some reference ball), over all blocks."""
    reference_in = torch.zeros(len(reference), dtype=torch.bool, device=reference.values.device)
    samples_in = torch.zeros(len(samples), dtype=torch.bool, device=reference.values.device)

    def memberships(rows, cols, block, state):
        (r0, r1), (c0, c1) = rows, cols
        state.setdefault(("reference", rows), torch.zeros(r1 - r0, dtype=torch.bool, device=block.device))
        state.setdefault(("samples", cols), torch.zeros(c1 - c0, dtype=torch.bool, device=block.device))
        state[("reference", rows)] |= (block <= sample_radii[None, c0:c1]).any(dim=1)
        state[("samples", cols)] |= (block <= reference_radii[r0:r1, None]).any(dim=0)

    tiles = _per_tile(reference, samples, precision, memory_bytes, progress, "precision/recall", memberships)
    for _, _, state in tiles:
        for (side, (start, stop)), inside in state.items():
            target = reference_in if side == "reference" else samples_in
            target[start:stop] |= inside
    return reference_in, samples_in


def _check_precision(precision: str) -> str:
    if precision not in DISTANCE_PRECISIONS:
        raise InputError(f"precision/recall distances: expected one of {DISTANCE_PRECISIONS}, got {precision!r}")
    return precision


def precision_recall(
    reference: torch.Tensor | np.ndarray,
    samples: torch.Tensor | np.ndarray,
    k: int = PRC_NEIGHBOURHOOD,
    memory_bytes: int = DEFAULT_PRC_MEMORY_BYTES,
    device: torch.device | str | None = None,
    progress: bool = False,
    precision: str = "fp16",
) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as the ADM evaluator computes them.

    `reference` [n_ref, d] and `samples` [n_samples, d] features (float32 on `device`, default: where they are);
    `precision` of the distances: "fp16" (the evaluator's, see the module docstring) or "fp32".
    Returns {"precision", "recall", "f_score"} (f_score = harmonic mean, as torch-fidelity reports it).
    """
    _check_precision(precision)
    reference, samples = torch.as_tensor(reference), torch.as_tensor(samples)
    device = torch.device(device) if device is not None else reference.device
    reference = reference.to(device=device, dtype=torch.float32)
    samples = samples.to(device=device, dtype=torch.float32)
    if reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]:
        raise InputError(f"precision/recall needs [n, d] features of one d, got {reference.shape} / {samples.shape}")
    reference_radii = manifold_radii(reference, k, memory_bytes, progress, "k-NN radii (reference)", precision)
    sample_radii = manifold_radii(samples, k, memory_bytes, progress, "k-NN radii (samples)", precision)
    reference_in, samples_in = _block_memberships(
        _Points.of(reference, precision),
        reference_radii,
        _Points.of(samples, precision),
        sample_radii,
        memory_bytes,
        progress,
        precision,
    )
    precision_value = float(samples_in.double().mean())
    recall = float(reference_in.double().mean())
    total = precision_value + recall
    f_score = 2 * precision_value * recall / total if total > 0 else 0.0
    return {"precision": precision_value, "recall": recall, "f_score": f_score}


def peak_block_bytes(rows: int, cols: int, memory_bytes: int) -> int:
    """The bytes of the largest distance block `precision_recall` allocates for these counts (for reports)."""
    r, c = block_shape(rows, cols, memory_bytes)
    return int(r * c * BYTES_PER_BLOCK_ELEMENT)


def subsample_indices(count: int, limit: int, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded random subset of `limit` of `count` items, or None when all fit."""
    if count <= limit:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=limit, replace=False))


def describe_block_plan(rows: int, cols: int, memory_bytes: int) -> str:
    r, c = block_shape(rows, cols, memory_bytes)
    blocks = math.ceil(rows / r) * math.ceil(cols / c)
    return f"{blocks} blocks of {r} x {c} ({r * c * 4 / 1e9:.2f} GB of float32 distances each)"
