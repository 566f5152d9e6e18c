"""The ADM evaluator's protocol (guided-diffusion `evaluations/evaluator.py`): the project's FID, sFID, precision and
recall against a reimplementation of the evaluator's numpy code on the same features, the sFID layer against a
forward pass written from the evaluator's definition, the streamed statistics, reference batches (layout,
resume after a kill), ADM batches feeding FID from their stored statistics, and the released-weights path.

Inception weights are random (plumbing only): the values test the math and the wiring, never paper numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.core.errors import JobFailedError
from pipeline.core.shards import sha256_file
from pipeline.evaluate import adm, sampling_settings
from pipeline.evaluate import datasets as ds
from pipeline.evaluate import features as features_lib
from pipeline.evaluate import inception as incep
from pipeline.evaluate import metrics as M
from pipeline.evaluate import model_loading as loading
from pipeline.evaluate.features import SFID_DIM, SFID_LAYER, run_extractor
from pipeline.evaluate.reference import formats as refs
from pipeline.evaluate.reference.batch import ReferenceOptions, build_reference, work_dir_for
from tests.support.eval_fixtures import kill_slow_worker, smooth_images, write_folder_reference, write_shard_reference

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------
# The evaluator's numpy code, reimplemented from guided-diffusion evaluations/evaluator.py (TensorFlow parts in
# numpy). `DistanceBlock` casts both batches to float16 and runs `_batch_pairwise_distances` in float16; when the
# whole block is finite it is used (cast to float32), else the block is recomputed in float32. float16 arithmetic
# as TensorFlow's GPU kernels round it: each elementwise op rounded to float16, the reductions (the norms' sum,
# the matmul) accumulated in float32 and rounded once.


def evaluator_statistics(activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`Evaluator.compute_statistics`."""
    return np.mean(activations, axis=0), np.cov(activations, rowvar=False)


def evaluator_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """`FIDStatistics.frechet_distance` (its `sqrtm(..., disp=False)` is silent; scipy 1.17 deprecates `disp`,
    so the root is taken without it and its warning silenced)."""
    import warnings

    from scipy import linalg

    warnings.simplefilter("ignore", linalg.LinAlgWarning)
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def evaluator_inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """`Evaluator.compute_inception_score` (the softmax of the bias-free logits, consecutive splits)."""
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    preds = exp / exp.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _pairwise(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """`_batch_pairwise_distances`: squared distances, float32."""
    norm_u = np.sum(np.square(u), 1).reshape(-1, 1)
    norm_v = np.sum(np.square(v), 1).reshape(1, -1)
    return np.maximum(norm_u - 2 * np.matmul(u, v.T) + norm_v, 0.0)


def _pairwise_fp16(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """`_batch_pairwise_distances(tf.cast(U, tf.float16), tf.cast(V, tf.float16))`, float16."""
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    norm_u = np.square(u16).astype(np.float32).sum(1).astype(np.float16).reshape(-1, 1)
    norm_v = np.square(v16).astype(np.float32).sum(1).astype(np.float16).reshape(1, -1)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is the case the fallback is for
        products = np.matmul(u16.astype(np.float32), v16.astype(np.float32).T).astype(np.float16)
        return np.maximum(norm_u - np.float16(2) * products + norm_v, np.float16(0))


def distance_block(u: np.ndarray, v: np.ndarray, precision: str = "fp16") -> np.ndarray:
    """`DistanceBlock.distance_block` (precision "fp32": the float32 graph alone)."""
    if precision == "fp16":
        block16 = _pairwise_fp16(u, v)
        if np.all(np.isfinite(block16)):
            return block16.astype(np.float32)
    return _pairwise(u, v).astype(np.float32)


def evaluator_radii(features: np.ndarray, k: int = 3, batch: int = 10000, precision: str = "fp16") -> np.ndarray:
    """`ManifoldEstimator.manifold_radii` with nhood_sizes=(k,)."""
    n = len(features)
    radii = np.zeros([n, 1], dtype=np.float32)
    distance_batch = np.zeros([batch, n], dtype=np.float32)
    for begin1 in range(0, n, batch):
        end1 = min(begin1 + batch, n)
        for begin2 in range(0, n, batch):
            end2 = min(begin2 + batch, n)
            distance_batch[0 : end1 - begin1, begin2:end2] = distance_block(
                features[begin1:end1], features[begin2:end2], precision
            )
        partitioned = np.partition(distance_batch[0 : end1 - begin1, :], np.arange(k + 1), axis=1)
        radii[begin1:end1, :] = partitioned[:, [k]]
    return radii


def evaluator_precision_recall(
    reference: np.ndarray, samples: np.ndarray, batch: int = 10000, precision: str = "fp16", k: int = 3
) -> tuple[float, float]:
    """`Evaluator.compute_prec_recall` -> `ManifoldEstimator.evaluate_pr` / `DistanceBlock.less_thans`."""
    radii_1 = evaluator_radii(reference, k, batch, precision)
    radii_2 = evaluator_radii(samples, k, batch, precision)
    status_1 = np.zeros([len(reference), 1], dtype=bool)
    status_2 = np.zeros([len(samples), 1], dtype=bool)
    for begin_1 in range(0, len(reference), batch):
        batch_1 = reference[begin_1 : begin_1 + batch]
        for begin_2 in range(0, len(samples), batch):
            batch_2 = samples[begin_2 : begin_2 + batch]
            dist32 = distance_block(batch_1, batch_2, precision)[..., None]
            status_1[begin_1 : begin_1 + batch] |= np.any(dist32 <= radii_2[begin_2 : begin_2 + batch], axis=1)
            status_2[begin_2 : begin_2 + batch] |= np.any(dist32 <= radii_1[begin_1 : begin_1 + batch][:, None], axis=0)
    return float(np.mean(status_2.astype(np.float64))), float(np.mean(status_1.astype(np.float64)))


def _quantised_features(rng, count: int, dim: int, shift: float = 0.0) -> np.ndarray:
    """Gaussian features on a 1/8 grid: every float32 dot product and squared distance is then exact, in numpy
    and torch alike, so the two implementations must agree bit for bit (ties included)."""
    return (np.round((rng.normal(0.0, 2.0, (count, dim)) + shift) * 8) / 8).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance


@pytest.mark.parametrize("count", [500, 40])  # well-conditioned; singular covariances (fewer images than dims)
def test_frechet_distance_equals_the_evaluator(count):
    rng = np.random.default_rng(count)
    a = rng.normal(0.0, 1.0, (count, 64)).astype(np.float32)
    b = (rng.normal(0.3, 1.2, (count, 64)) @ rng.normal(0, 0.3, (64, 64))).astype(np.float32)
    ours = adm.frechet_distance(*adm.feature_statistics(a), *adm.feature_statistics(b))
    theirs = evaluator_frechet_distance(*evaluator_statistics(a), *evaluator_statistics(b))
    assert ours == pytest.approx(theirs, rel=1e-6)
    if count == 500:  # an independent formula: tr sqrt(S1 S2) = sum of the square roots of its eigenvalues
        mu1, s1 = evaluator_statistics(a.astype(np.float64))
        mu2, s2 = evaluator_statistics(b.astype(np.float64))
        roots = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
        assert ours == pytest.approx(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * roots, rel=1e-8)


def test_frechet_distance_offsets_a_singular_product_and_refuses_imaginary_roots(caplog):
    # A nilpotent product has no square root (scipy returns inf): both add eps = 1e-6 to the diagonals, whose
    # product then has the double eigenvalue ~1e-6 and the root's trace 2 sqrt(1e-6 (1 + 1e-6)).
    nilpotent, identity, mu = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2), np.zeros(2)
    with caplog.at_level("WARNING", logger="pipeline.evaluate.adm"):
        value = adm.frechet_distance(mu, nilpotent, mu + 1, identity)
    assert value == pytest.approx(evaluator_frechet_distance(mu, nilpotent, mu + 1, identity), rel=1e-6)
    assert value == pytest.approx(2 + 2 - 4 * np.sqrt(1e-6 * (1 + 1e-6)), rel=1e-9) and "singular" in caplog.text
    indefinite = np.array([[1.0, 0.0], [0.0, -4.0]])  # not a covariance: its product has a negative eigenvalue
    with pytest.raises(ValueError, match="Imaginary"):
        evaluator_frechet_distance(np.zeros(2), indefinite, np.zeros(2), np.eye(2))
    with pytest.raises(JobFailedError, match="imaginary component"):
        adm.frechet_distance(np.zeros(2), indefinite, np.zeros(2), np.eye(2))


def test_inception_score_equals_the_evaluator():
    rng = np.random.default_rng(2)
    logits = rng.normal(0.0, 3.0, (12_000, 1008))  # 5000 + 5000 + a partial split of 2000, as the evaluator cuts
    mean, std = adm.inception_score(logits)
    assert mean == pytest.approx(evaluator_inception_score(logits), rel=1e-9)
    assert std > 0 and adm.inception_score(logits[:5000])[1] == 0.0  # one split: no spread


def test_running_moments_are_np_cov_whatever_the_chunking():
    rng = np.random.default_rng(0)
    features = (rng.normal(5.0, 3.0, (1000, 32)) * rng.uniform(0.1, 10, 32)).astype(np.float32)
    mean, cov = np.mean(features.astype(np.float64), axis=0), np.cov(features.astype(np.float64), rowvar=False)
    for sizes in ([1000], [1, 999], [7] * 142 + [6], [300, 300, 400]):
        parts = np.split(features, np.cumsum(sizes)[:-1])
        total = adm.RunningMoments.empty(32)
        for part in parts:
            chunk = adm.RunningMoments.empty(32)
            chunk.update(torch.from_numpy(part))
            restored = adm.RunningMoments.from_arrays(chunk.arrays("x."), "x.")  # as a partial file reads back
            total.merge(restored)
        mu, sigma = total.statistics()
        assert total.count == 1000
        np.testing.assert_allclose(mu, mean, rtol=1e-12)
        np.testing.assert_allclose(sigma, cov, rtol=1e-10, atol=1e-10 * np.abs(cov).max())


# ----------------------------------------------------------------------------------------------------------------
# Precision / recall


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
@pytest.mark.parametrize("shift", [0.0, 0.7])
def test_precision_recall_equal_the_evaluator_at_any_memory_bound(shift, precision, monkeypatch):
    rng = np.random.default_rng(1)
    reference = _quantised_features(rng, 300, 64)
    samples = _quantised_features(rng, 420, 64, shift)
    precision_value, recall = evaluator_precision_recall(reference, samples, batch=128, precision=precision)
    assert (precision_value, recall) == evaluator_precision_recall(reference, samples, precision=precision)
    assert 0.0 < precision_value < 1.0 and 0.0 < recall < 1.0

    largest = []
    measured = "squared_distances_fp16" if precision == "fp16" else "squared_distances"
    original = getattr(adm, measured)

    def recording(u, v, u_norms, v_norms):
        largest.append(u.shape[0] * v.shape[0])
        return original(u, v, u_norms, v_norms)

    monkeypatch.setattr(adm, measured, recording)
    for memory_bytes in (adm.DEFAULT_PRC_MEMORY_BYTES, 8 * 420 * 5, 8 * 100):  # whole; rows of 5; column pieces
        largest.clear()
        values = adm.precision_recall(reference, samples, memory_bytes=memory_bytes, precision=precision)
        assert (values["precision"], values["recall"]) == (precision_value, recall), memory_bytes
        assert max(largest) * adm.BYTES_PER_BLOCK_ELEMENT <= memory_bytes
        assert values["f_score"] == pytest.approx(2 * precision_value * recall / (precision_value + recall))
    assert min(largest) <= 100  # the smallest bound really split rows into column pieces


def test_float16_distances_differ_from_float32_as_the_evaluator_rounds_them():
    """A hand-computed case (k = 1, one dimension) where the evaluator's float16 distances change recall.

    Reference {48, 45}, samples {43.5, 43}. float32: the samples' radius is (43.5 - 43)^2 = 0.25 and no reference
    point lies within 0.25 of a sample (the nearest pair is 45 / 43.5 at 2.25): recall 0; both samples lie within
    the reference radius (48 - 45)^2 = 9: precision 1. float16 (grid step 1 in [1024, 2048), 2 in [2048, 4096)):
    43.5^2 = 1892.25 -> 1892; 43.5 * 43 = 1870.5 -> 1870 (half to even), so the samples' radius is
    1892 - 3740 + 1849 = 1; 45 * 43.5 = 1957.5 -> 1958, so |45 - 43.5|^2 = 2025 - 3916 + 1892 = 1 <= 1: 45 is
    inside a sample's ball, recall 1/2."""
    reference = np.array([[48.0], [45.0]], np.float32)
    samples = np.array([[43.5], [43.0]], np.float32)
    u16 = torch.tensor([[45.0]]).half()
    v16 = torch.tensor([[43.5]]).half()
    assert adm.squared_distances_fp16(u16, v16, adm.half_norms(u16), adm.half_norms(v16)).item() == 1.0
    assert adm.half_norms(v16).item() == 1892.0
    for precision, expected in (("fp16", (1.0, 0.5)), ("fp32", (1.0, 0.0))):
        values = adm.precision_recall(reference, samples, k=1, precision=precision)
        assert (values["precision"], values["recall"]) == expected, precision
        assert evaluator_precision_recall(reference, samples, precision=precision, k=1) == expected, precision


def test_a_non_finite_float16_block_is_recomputed_in_float32_block_by_block(monkeypatch):
    """Features whose squared norms overflow float16 (> 65504) make their evaluator block float32; the other
    blocks stay float16. With evaluator blocks of 8 rows, only the blocks touching the large rows fall back."""
    rng = np.random.default_rng(3)
    reference = _quantised_features(rng, 24, 16, 40.0)  # norms ~ 16 * 40^2 = 25,600: finite in float16
    samples = _quantised_features(rng, 20, 16, 40.0)
    reference[:4] *= 2  # ~102,400: these blocks overflow
    expected = evaluator_precision_recall(reference, samples, batch=8, precision="fp16")
    assert expected != evaluator_precision_recall(reference, samples, batch=8, precision="fp32")
    assert expected != evaluator_precision_recall(reference, samples, batch=24, precision="fp16")
    monkeypatch.setattr(adm, "EVALUATOR_BLOCK", 8)
    values = adm.precision_recall(reference, samples, precision="fp16", memory_bytes=8 * 3 * 8)
    assert (values["precision"], values["recall"]) == expected


def test_block_shape_bounds_50k_by_10k_within_the_default():
    rows, cols = adm.block_shape(10_000, 50_000, adm.DEFAULT_PRC_MEMORY_BYTES)
    assert cols == 50_000 and rows * cols * adm.BYTES_PER_BLOCK_ELEMENT <= adm.DEFAULT_PRC_MEMORY_BYTES
    assert adm.block_shape(3, 10, 8) == (1, 1)
    assert adm.subsample_indices(10, 10, 0) is None
    chosen = adm.subsample_indices(50, 10, 7)
    assert len(chosen) == 10 and np.all(np.diff(chosen) > 0)
    np.testing.assert_array_equal(chosen, adm.subsample_indices(50, 10, 7))  # the seed fixes the subset


# ----------------------------------------------------------------------------------------------------------------
# The sFID layer


@pytest.fixture(scope="module")
def feature_config(inception_weights):
    return incep.FeatureConfig(weights=incep.resolve_inception_weights(inception_weights), batch_size=16)


@pytest.fixture(scope="module")
def extractor(feature_config):
    return incep.create_feature_extractor(feature_config, ["2048", SFID_LAYER])


def evaluator_spatial_features(base, images: torch.Tensor) -> torch.Tensor:
    """`mixed_6/conv:0[..., :7]`, reshaped per image, written out from the TensorFlow graph's definition on
    torch-fidelity's modules: resize to 299 and scale as the graph does, then the stem and the mixed blocks up to
    `mixed_6` (the 7th: mixed, mixed_1, ..., mixed_6), whose `conv` tower is the 1x1 conv + batchnorm + ReLU."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
    x = (x - 128) / 128
    stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    mixed = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"]  # mixed .. mixed_5
    with torch.no_grad():
        for name in [*stem, "MaxPool_2", *mixed]:
            x = getattr(base, name)(x)
        conv = base.Mixed_6d.branch1x1(x)  # mixed_6/conv
    nhwc = conv.permute(0, 2, 3, 1)  # TensorFlow's layout
    return nhwc[..., :7].reshape(nhwc.shape[0], -1)


def test_sfid_features_are_mixed_6_conv_first_7_channels(extractor, feature_config):
    blocks = [name for name, _ in extractor.base.named_children() if name.startswith("Mixed_")]
    tensorflow_blocks = ["mixed"] + [f"mixed_{i}" for i in range(1, 11)]
    assert len(blocks) == len(tensorflow_blocks) and blocks[tensorflow_blocks.index("mixed_6")] == "Mixed_6d"
    images = torch.from_numpy(smooth_images(3, size=16, seed=4)).permute(0, 3, 1, 2).contiguous()
    features = run_extractor(extractor, images)
    expected = evaluator_spatial_features(extractor.base, images)
    assert features[SFID_LAYER].shape == (3, SFID_DIM) == (3, 7 * 17 * 17)
    torch.testing.assert_close(features[SFID_LAYER], expected, rtol=0, atol=0)
    assert features["2048"].shape == (3, 2048)
    # Only sFID requested: the network still runs far enough, and the same values come out.
    only = incep.create_feature_extractor(feature_config, [SFID_LAYER])
    torch.testing.assert_close(run_extractor(only, images)[SFID_LAYER], expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Statistics and ADM reference batches feeding the metrics


def _samples(count: int = 12, seed: int = 0) -> np.ndarray:
    return smooth_images(count, size=16, seed=seed)


def test_shifted_mean_moves_fid_by_exactly_the_squared_shift(tmp_path, inception_weights):
    """The issue's measurement: reference = the samples' own statistics with mu shifted by 3 in every dimension.
    A statistics-only file and an ADM batch (arr_0 + statistics) must both give FID = 64 x 9 = 576 on 64-d
    features: FID comes from the stored statistics, never from arr_0 (which here equals the samples)."""
    config = incep.FeatureConfig(
        weights=incep.resolve_inception_weights(inception_weights), layer_fid="64", batch_size=16
    )
    extractor64 = incep.create_feature_extractor(config, ["64"])
    images = _samples()
    samples = ds.ArrayDataset(images)
    features = incep.extract_features(samples, extractor64, config)["64"]
    mu, sigma = adm.feature_statistics(features)
    np.savez(tmp_path / "same.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "shifted.npz", mu=mu + 3.0, sigma=sigma)
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=mu + 3.0, sigma=sigma)
    results = {}
    for name in ("same", "shifted", "adm"):
        reference = refs.open_reference(tmp_path / f"{name}.npz")
        results[name] = M.compute_metrics(samples, reference, ["fid"], config, tmp_path / "cache", extractor64)
    fid = {name: result["values"]["frechet_inception_distance"] for name, result in results.items()}
    assert refs.open_reference(tmp_path / "adm.npz").kind == "adm"
    assert abs(fid["same"]) < 1e-3
    assert fid["shifted"] - fid["same"] == pytest.approx(64 * 9.0, rel=1e-9)
    assert fid["adm"] == pytest.approx(fid["shifted"], rel=1e-12)
    assert results["adm"]["sources"]["fid"] == {
        "from": "stored statistics",
        "file": str(tmp_path / "adm.npz"),
        "keys": ["mu", "sigma"],
    }


def test_a_reference_above_the_limit_is_subsampled_with_a_logged_seed(tmp_path, inception_weights, caplog):
    """20 reference images, limit 8: precision/recall against a seeded subset of 8 (logged and recorded), FID
    from the streamed statistics of all 20 (equal to those of all their features), cached for the next run."""
    config = _random_weights_config(inception_weights, layer_fid="64", layer_prc="64", prc_seed=5)
    extractor64 = incep.create_feature_extractor(config, ["64"])
    np.savez(tmp_path / "ref.npz", arr_0=_samples(20, seed=6))
    reference = refs.open_reference(tmp_path / "ref.npz")
    samples = ds.ArrayDataset(_samples(10, seed=7))
    everything = M.compute_metrics(samples, reference, ["fid", "prc"], config, tmp_path / "all", extractor64)
    config.prc_reference_limit = 8
    with caplog.at_level("WARNING", logger="pipeline.evaluate.metrics"):
        limited = M.compute_metrics(samples, reference, ["fid", "prc"], config, tmp_path / "cache", extractor64)
    assert "random subset of 8 drawn with seed 5" in caplog.text
    subset = adm.subsample_indices(20, 8, 5)
    assert limited["sources"]["prc"] == {"from": "reference images", "images": 8, "of": 20, "subset_seed": 5}
    assert limited["sources"]["fid"] == {"from": "streamed statistics of all reference images", "images": 20}
    fid_key = "frechet_inception_distance"
    assert limited["values"][fid_key] == pytest.approx(everything["values"][fid_key], rel=1e-9)
    subset_images = torch.utils.data.Subset(refs.reference_dataset(reference), subset.tolist())
    features = incep.extract_features(subset_images, extractor64, config)["64"]
    sample_features = incep.extract_features(samples, extractor64, config)["64"]
    expected = adm.precision_recall(features, sample_features)
    assert (limited["values"]["precision"], limited["values"]["recall"]) == (expected["precision"], expected["recall"])
    assert limited["reference_statistics_cache"]["hit"] is False
    again = M.compute_metrics(samples, reference, ["fid"], config, tmp_path / "cache", extractor64)
    assert again["reference_statistics_cache"]["hit"] is True
    assert again["values"][fid_key] == limited["values"][fid_key]


def _random_weights_config(weights, **changes) -> incep.FeatureConfig:
    return incep.FeatureConfig(weights=incep.resolve_inception_weights(weights), batch_size=16, **changes)


@pytest.mark.slow
def test_project_metrics_equal_the_evaluator_on_the_same_features(tmp_path, inception_weights, extractor):
    """FID (64-d here), sFID (2023-d), precision and recall through `compute_metrics` on an ADM-style image
    reference, against the reimplemented evaluator fed with the same features (sFID ones from the forward pass
    written from the evaluator's definition)."""
    config = _random_weights_config(inception_weights, layer_fid="64", layer_prc="64")
    reference_images, sample_images = _samples(24, seed=1), _samples(20, seed=2)
    np.savez(tmp_path / "ref.npz", arr_0=reference_images)
    reference = refs.open_reference(tmp_path / "ref.npz")
    result = M.compute_metrics(ds.ArrayDataset(sample_images), reference, ["fid", "sfid", "prc"], config, tmp_path)
    values = result["values"]

    pool = incep.create_feature_extractor(config, ["64"])

    def features(images):
        batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        # The pool features batched as compute_metrics batches them: bit-identical to the ones it compared.
        pooled = incep.extract_features(ds.ArrayDataset(images), pool, config)["64"].numpy()
        return pooled, evaluator_spatial_features(extractor.base, batch).numpy()

    (ref64, ref_spatial), (sample64, sample_spatial) = features(reference_images), features(sample_images)
    fid = evaluator_frechet_distance(*evaluator_statistics(sample64), *evaluator_statistics(ref64))
    sfid = evaluator_frechet_distance(*evaluator_statistics(sample_spatial), *evaluator_statistics(ref_spatial))
    assert values["frechet_inception_distance"] == pytest.approx(fid, rel=1e-6)
    assert values["spatial_frechet_inception_distance"] == pytest.approx(sfid, rel=1e-6)
    precision, recall = evaluator_precision_recall(ref64, sample64)
    # numpy's and torch's float32 matmuls may round one borderline distance differently: one point at most.
    assert abs(values["precision"] - precision) <= 1 / 20 and abs(values["recall"] - recall) <= 1 / 24
    assert result["sources"]["sfid"]["from"] == "features of all reference images"


# ----------------------------------------------------------------------------------------------------------------
# `diffit-pipe reference`: ADM-layout batches with streamed, resumable statistics


def _source_images() -> np.ndarray:
    return smooth_images(20, size=16, seed=5)


def test_reference_batch_has_the_adm_layout_and_whole_source_statistics(tmp_path, inception_weights, feature_config):
    images = _source_images()
    source = write_shard_reference(tmp_path / "shards", images, per_shard=6)
    out = tmp_path / "ref.npz"
    options = ReferenceOptions(source, out, inception_weights, subset_size=6, seed=3, chunk_size=8, batch_size=8)
    options.workers, options.device = 0, "cpu"
    info = build_reference(options)
    with np.load(out, allow_pickle=False) as batch:
        arrays = {key: batch[key] for key in batch.files}
    assert set(arrays) == {"arr_0", "mu", "sigma", "mu_s", "sigma_s", "subset_indices", "info"}
    np.testing.assert_array_equal(arrays["subset_indices"], adm.subsample_indices(20, 6, 3))
    np.testing.assert_array_equal(arrays["arr_0"], images[arrays["subset_indices"]])
    assert arrays["mu"].shape == (2048,) and arrays["sigma"].shape == (2048, 2048)
    assert arrays["mu_s"].shape == (SFID_DIM,) and arrays["sigma_s"].shape == (SFID_DIM, SFID_DIM)
    assert arrays["mu"].dtype == arrays["sigma_s"].dtype == np.float64
    # Whole-source statistics: np.mean / np.cov of every image's features (batches of 8, as the chunks were).
    extractor = incep.create_feature_extractor(feature_config, ["2048", SFID_LAYER])
    features = features_lib.extract_all(ds.ArrayDataset(images), extractor, batch_size=8, progress=False)
    for layer, (mean_key, cov_key) in (("2048", ("mu", "sigma")), (SFID_LAYER, ("mu_s", "sigma_s"))):
        values = features[layer].double().numpy()
        np.testing.assert_allclose(arrays[mean_key], values.mean(axis=0), rtol=1e-10, atol=1e-12)
        cov = np.cov(values, rowvar=False)
        np.testing.assert_allclose(arrays[cov_key], cov, rtol=1e-8, atol=1e-10 * np.abs(cov).max())
    record = json.loads(str(arrays["info"]))
    assert record == json.loads(json.dumps(info)) and record["num_images_statistics"] == 20
    assert record["subset_seed"] == 3 and record["inception_weights"]["official"] is False
    reference = refs.open_reference(out)
    assert reference.kind == "adm" and reference.num_images == 6
    # arr_0 is memory-mapped out of the zip64 member the streaming writer wrote: the offsets must be right.
    dataset = refs.reference_dataset(reference)
    np.testing.assert_array_equal(np.stack([dataset[i].permute(1, 2, 0).numpy() for i in range(6)]), arrays["arr_0"])
    assert reference.stored_statistics("fid") == ("mu", "sigma")
    assert reference.stored_statistics("sfid") == ("mu_s", "sigma_s")
    assert not work_dir_for(out).exists()  # the partial statistics are gone once the batch is written

    # Statistics only (FID and sFID, no images) through the command line; an existing OUT needs --overwrite.
    from cli.main import app

    stats = tmp_path / "stats.npz"
    arguments = ["reference", str(source), str(stats), "--inception-weights", str(inception_weights)]
    arguments += ["--statistics-only", "--chunk-size", "8", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    with np.load(stats) as only:
        assert set(only.files) == {"mu", "sigma", "mu_s", "sigma_s", "info"}
        np.testing.assert_array_equal(only["mu"], arrays["mu"])
    assert refs.open_reference(stats).kind == "stats"
    again = CliRunner().invoke(app, arguments)
    assert again.exit_code == 2 and "--overwrite" in again.output


def _reference_spec(tmp_path: Path, source: Path, out: Path, weights: Path, delay_s: float) -> Path:
    spec = {
        "source": str(source),
        "out": str(out),
        "weights": str(weights),
        "subset": 5,
        "chunk_size": 8,
        "batch_size": 4,
        "delay_s": delay_s,
    }
    path = tmp_path / f"spec-{out.stem}.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.slow
def test_reference_resumes_after_a_kill(tmp_path, inception_weights, monkeypatch):
    import pipeline.evaluate.reference.batch as reference_batch

    source = write_folder_reference(tmp_path / "folder", _source_images())
    out = tmp_path / "resumed.npz"
    spec = _reference_spec(tmp_path, source, out, inception_weights, delay_s=0.4)
    ended = kill_slow_worker("slow-reference", spec, lambda: (work_dir_for(out) / "chunk-000000.npz").exists())
    assert ended is None, f"the build ended before it could be killed:\n{ended}"
    assert not out.exists() and (work_dir_for(out) / "chunk-000000.npz").exists()

    computed = []
    compute_part = reference_batch._compute_part

    def counting(dataset, *args, **kwargs):
        computed.append(dataset.indices[0])
        return compute_part(dataset, *args, **kwargs)

    monkeypatch.setattr(reference_batch, "_compute_part", counting)
    options = ReferenceOptions(source, out, inception_weights, subset_size=5, chunk_size=8, batch_size=4)
    options.workers, options.device, options.progress = 0, "cpu", False
    build_reference(options)
    assert 0 not in computed and len(computed) < 3, computed  # chunk 0 (images 0-7) came from the killed run
    monkeypatch.undo()
    uninterrupted = tmp_path / "uninterrupted.npz"
    options.out = uninterrupted
    build_reference(options)
    with np.load(out) as resumed, np.load(uninterrupted) as expected:
        for key in ("arr_0", "subset_indices", "mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_allclose(resumed[key], expected[key], rtol=1e-12, atol=0, err_msg=key)


# ----------------------------------------------------------------------------------------------------------------
# From the released weights to the protocol: `import-nvlabs`, then `evaluate`


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A random tiny model saved as the released code saves its weights (safetensors, released key names)."""
    from safetensors.torch import save_file

    import diffit
    from diffit.convert import to_nvlabs_state_dict

    torch.manual_seed(3)
    model = diffit.create_model("DiffiT-Tiny/2")
    with torch.no_grad():  # a non-zero output layer, so that the untrained network predicts something
        model.final_layer.linear.weight.normal_(0, 0.05)
        model.final_layer.linear.bias.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("released") / "diffit_256.safetensors"
    save_file({key: value.contiguous() for key, value in to_nvlabs_state_dict(model).items()}, str(path))
    return path, model


def test_import_nvlabs_writes_an_export_with_the_released_setup(released, tiny_vae, tmp_path):
    from cli.main import app
    from diffit.io import load_pretrained
    from pipeline.train.released import released_sampling

    path, model = released
    out = tmp_path / "imported"
    result = CliRunner().invoke(app, ["import-nvlabs", str(path), str(out), "--vae", str(tiny_vae)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == {"name": "DiffiT-Tiny/2", "kwargs": {**model.model_config["kwargs"], "mlp_ratio": 4.0}}
    assert config["diffusion"] == {
        "type": "adm",
        "noise_schedule": "linear",
        "diffusion_steps": 1000,
        "learn_sigma": True,
    }
    sampling = config["sampling"]
    assert (sampling["sampler"], sampling["steps"], sampling["guidance_scale"], sampling["guidance_schedule"]) == (
        "ddpm",
        250,
        4.4,
        "power-cosine",
    )
    assert (sampling["guidance_power"], sampling["guidance_channels"]) == (4.0, 3)
    assert config["vae"]["scaling_factor"] == 0.18215 and config["vae"]["path"] == str(tiny_vae.resolve())
    assert config["released"]["sha256"] == sha256_file(path) and config["released"]["null_class"] == 10
    loaded, _ = load_pretrained(out)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    # `evaluate` samples it with the released set-up by default, and says where the defaults came from.
    resolved, defaults_used = sampling_settings.resolve_sampling(loading.load_model(out), {})
    assert resolved.pixels == "truncate"  # the released sample.py's conversion
    assert sampling_settings.resolve_sampling(loading.load_model(out), {"pixels": "round"})[0].pixels == "round"
    assert (resolved.guidance.scale, resolved.guidance.schedule, resolved.steps) == (4.4, "power-cosine", 250)
    assert "guidance_scale=4.4 (released NVlabs/DiffiT code)" in defaults_used
    chosen, _ = sampling_settings.resolve_sampling(loading.load_model(out), {"guidance_scale": 4.6})
    assert chosen.guidance.scale == 4.6
    # 512 px (64x64 latents): constant 1.49, as the released code switches above 32x32 latents.
    assert (released_sampling(64)["guidance_scale"], released_sampling(64)["guidance_schedule"]) == (1.49, "constant")

    # Without --vae: the released sd-vae-ft-ema, resolved when evaluating; a non-empty OUT needs --overwrite.
    hub = tmp_path / "hub"
    assert CliRunner().invoke(app, ["import-nvlabs", str(path), str(hub)]).exit_code == 0
    vae = json.loads((hub / "config.json").read_text())["vae"]
    assert vae == {"id": "stabilityai/sd-vae-ft-ema", "source": "hub", "scaling_factor": 0.18215}
    again = CliRunner().invoke(app, ["import-nvlabs", str(path), str(hub)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(foreign))
    refused = CliRunner().invoke(app, ["import-nvlabs", str(foreign), str(tmp_path / "x")])
    assert refused.exit_code == 2 and "not a released NVlabs/DiffiT latent checkpoint" in refused.output


@pytest.mark.slow
def test_released_weights_to_the_adm_protocol_end_to_end(released, tiny_vae, inception_weights, tmp_path):
    """The documented commands: import-nvlabs, reference (for this tiny 16 px model), evaluate with defaults."""
    from cli.main import app

    path, _ = released
    runner = CliRunner()
    model = tmp_path / "model"
    assert runner.invoke(app, ["import-nvlabs", str(path), str(model), "--vae", str(tiny_vae)]).exit_code == 0
    source = write_folder_reference(tmp_path / "images", smooth_images(24, size=16, seed=9))
    reference = tmp_path / "reference.npz"
    weights = ["--inception-weights", str(inception_weights)]
    built = runner.invoke(
        app, ["reference", str(source), str(reference), *weights, "--subset", "12", "--workers", "0", "--device", "cpu"]
    )
    assert built.exit_code == 0, built.output
    arguments = ["evaluate", "--model", str(model), "--reference", str(reference), "--out", str(tmp_path / "eval")]
    arguments += [*weights, "--num-samples", "10", "--steps", "4", "--batch-size", "5", "--device", "cpu"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert record["sampling"]["guidance_scale"] == 4.4 and record["sampling"]["guidance_schedule"] == "power-cosine"
    assert record["metrics_requested"] == ["fid", "sfid", "is", "prc"]
    values = record["plumbing_only_metrics"]
    assert set(values) == {"fid", "sfid", "is_mean", "is_std", "precision", "recall", "f_score"}
    assert all(np.isfinite(v) for v in values.values()) and values["fid"] > 0 and values["sfid"] > 0
    sources = record["metric_sources"]
    assert sources["fid"] == {"from": "stored statistics", "file": str(reference), "keys": ["mu", "sigma"]}
    assert sources["sfid"] == {"from": "stored statistics", "file": str(reference), "keys": ["mu_s", "sigma_s"]}
    assert sources["prc"] == {"from": "reference images", "images": 12, "of": 12, "subset_seed": None}
    assert sources["is"] == {"from": "samples only"}
    assert record["reference"]["kind"] == "adm" and record["feature_extractor"]["layers"]["sfid"] == SFID_LAYER
    assert "stored statistics" in record["label"]
