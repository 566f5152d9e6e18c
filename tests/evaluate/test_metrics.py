"""Metrics plumbing: Inception weights handling, reference kinds, feature cache, FID / IS / PRC / KID sanity.

The Inception weights are random (made by a fixture): the numbers only check the plumbing, never paper values.
Features come from the 64-channel layer where the metric allows it, to stay fast on CPU.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.evaluate import datasets as ds
from pipeline.evaluate import inception as incep
from pipeline.evaluate import metrics as M
from pipeline.evaluate.reference import cache as ref_cache
from pipeline.evaluate.reference import formats as refs
from tests.support.eval_fixtures import (
    smooth_images,
    write_folder_reference,
    write_npz_reference,
    write_shard_reference,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images():
    return smooth_images(16, size=16, seed=0)


@pytest.fixture(scope="module")
def extractor64(inception_weights):
    """One 64-channel feature extractor for the module (loading the network costs ~1 s each time)."""
    return incep.create_feature_extractor(_config(inception_weights), ["64"])


def _config(weights_path, **overrides) -> incep.FeatureConfig:
    settings = dict(
        layer_fid="64", layer_kid="64", layer_prc="64", batch_size=16, kid_subsets=20, kid_subset_size=8, isc_splits=2
    )
    settings.update(overrides)
    return incep.FeatureConfig(weights=incep.resolve_inception_weights(weights_path), **settings)


def _perturbed(images: np.ndarray, noise: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(images + rng.normal(0, noise, images.shape), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Inception weights


def test_missing_weights_name_the_file_and_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(incep.MissingInceptionWeightsError) as error:
        incep.resolve_inception_weights(None)
    message = str(error.value)
    assert incep.INCEPTION_WEIGHTS_FILENAME in message and "--inception-weights" in message
    assert str(tmp_path / "torch-home") in message
    with pytest.raises(incep.MissingInceptionWeightsError, match="nope.pth"):
        incep.resolve_inception_weights(tmp_path / "nope.pth")


def test_weights_in_torch_home_are_found(tmp_path, monkeypatch, inception_weights):
    checkpoints = tmp_path / "torch-home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / incep.INCEPTION_WEIGHTS_FILENAME).symlink_to(inception_weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    found = incep.resolve_inception_weights(None)
    # Named like the release file, but its hash says it is not: still plumbing-only.
    assert found.path.name == incep.INCEPTION_WEIGHTS_FILENAME or found.path == inception_weights.resolve()
    assert not found.official and found.label == incep.PLUMBING_ONLY_LABEL


def test_unsafe_or_foreign_weights_are_refused(tmp_path, inception_weights):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        incep.resolve_inception_weights(garbage)
    pickled = tmp_path / "pickled.pth"
    torch.save({"weights": torch.zeros(2), "callback": print}, pickled)  # needs pickle: refused by weights_only
    with pytest.raises(ValueError, match="pickled.pth"):
        incep.resolve_inception_weights(pickled)
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, foreign)  # loadable, but not Inception-v3
    config = incep.FeatureConfig(weights=incep.resolve_inception_weights(foreign))
    with pytest.raises(ValueError, match="not torch-fidelity Inception-v3 weights"):
        incep.create_feature_extractor(config, ["64"])


def test_official_label_follows_the_file_hash(inception_weights):
    official = incep.InceptionWeights(inception_weights, incep.OFFICIAL_INCEPTION_SHA256_PREFIX + "0" * 56)
    assert official.official and "official" in official.label
    ours = incep.resolve_inception_weights(inception_weights)
    assert not ours.official and ours.describe()["label"] == incep.PLUMBING_ONLY_LABEL
    assert len(ours.sha256) == 64


# ----------------------------------------------------------------------------------------------------------------
# Metric values


def test_fid_is_zero_against_itself_and_grows_with_perturbation(tmp_path, inception_weights, images, extractor64):
    images = images[:12]
    reference = refs.open_reference(write_npz_reference(tmp_path / "ref.npz", images))
    config = _config(inception_weights)
    cache = ref_cache.reference_cache_dir(reference)
    fids = []
    for noise in (0.0, 12.0, 48.0):
        samples = ds.ArrayDataset(_perturbed(images, noise) if noise else images)
        fids.append(
            M.compute_metrics(samples, reference, ["fid"], config, cache, extractor64)["values"][
                "frechet_inception_distance"
            ]
        )
    assert abs(fids[0]) < 1e-4 and abs(fids[0]) < 0.01 * fids[1], fids  # ~0 up to the matrix square root
    assert 0 < fids[1] < fids[2], fids


def test_is_prc_kid_ranges(tmp_path, inception_weights, images, extractor64):
    reference = refs.open_reference(write_npz_reference(tmp_path / "ref.npz", images[:8]))
    config = _config(inception_weights, kid_subset_size=4)
    samples = ds.ArrayDataset(_perturbed(images[:4], 30.0))
    inception_score = M.compute_metrics(samples, None, ["is"], config, None)
    assert 1.0 - 1e-6 <= inception_score["values"]["inception_score_mean"] <= 1008  # 1008 Inception classes
    assert inception_score["feature_layers"] == {"is": "logits_unbiased"}
    result = M.compute_metrics(
        samples, reference, ["prc", "kid"], config, ref_cache.reference_cache_dir(reference), extractor64
    )
    values = result["values"]
    assert 0.0 <= values["precision"] <= 1.0 and 0.0 <= values["recall"] <= 1.0
    assert np.isfinite(values["kernel_inception_distance_mean"])
    assert result["feature_layers"] == {"prc": "64", "kid": "64"}

    # Identical sets: every sample lies inside the other set's k-NN balls.
    same = M.compute_metrics(
        ds.ArrayDataset(images[:8]), reference, ["prc"], config, ref_cache.reference_cache_dir(reference), extractor64
    )
    assert same["values"]["precision"] == 1.0 and same["values"]["recall"] == 1.0


def test_kid_subset_larger_than_samples_is_refused(tmp_path, inception_weights, images):
    reference = refs.open_reference(write_npz_reference(tmp_path / "ref.npz", images))  # 16 images
    config = _config(inception_weights, kid_subset_size=12)
    with pytest.raises(ValueError, match="KID subset size 12"):  # before any feature extraction
        M.compute_metrics(
            ds.ArrayDataset(images[:10]), reference, ["kid"], config, ref_cache.reference_cache_dir(reference)
        )
    with pytest.raises(ValueError, match="KID subset size 20"):
        M.compute_metrics(
            ds.ArrayDataset(images),
            reference,
            ["kid"],
            _config(inception_weights, kid_subset_size=20),
            ref_cache.reference_cache_dir(reference),
        )


# ----------------------------------------------------------------------------------------------------------------
# References and the feature cache


def test_reference_kinds_give_identical_features(tmp_path, inception_weights, images, extractor64):
    subset = images[:12]
    references = [
        refs.open_reference(write_npz_reference(tmp_path / "ref.npz", subset)),
        refs.open_reference(write_folder_reference(tmp_path / "folder", subset)),
        refs.open_reference(write_shard_reference(tmp_path / "shards", subset, per_shard=5)),
    ]
    assert [r.kind for r in references] == ["npz", "folder", "shards"]
    assert all(r.resolution == (16, 16) and r.num_images == 12 for r in references)
    config = _config(inception_weights)
    features = [
        ref_cache.reference_features(r, ["64"], config, ref_cache.reference_cache_dir(r), extractor64)[0]["64"]
        for r in references
    ]
    assert features[0].shape == (12, 64)
    folder_order = sorted(range(12), key=lambda i: (i % 2, i))  # part0/*, then part1/* (sorted relative paths)
    torch.testing.assert_close(features[1], features[0][folder_order], rtol=0, atol=0)
    torch.testing.assert_close(features[2], features[0], rtol=0, atol=0)
    # The cache lives beside each reference, in a hidden folder the folder listing skips.
    assert (tmp_path / "folder" / ref_cache.CACHE_DIR_NAME).is_dir() and (
        tmp_path / "shards" / ref_cache.CACHE_DIR_NAME
    ).is_dir()
    assert len(refs.reference_dataset(references[1])) == 12


def test_reference_features_are_cached_by_content_and_extractor(
    tmp_path, inception_weights, images, monkeypatch, extractor64
):
    reference = refs.open_reference(write_npz_reference(tmp_path / "ref.npz", images[:8]))
    config = _config(inception_weights)
    cache = ref_cache.reference_cache_dir(reference)
    first, report = ref_cache.reference_features(reference, ["64"], config, cache, extractor64)
    assert report["64"]["hit"] is False

    def no_extraction(*args, **kwargs):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(ref_cache, "extract_features", no_extraction)
    again, report = ref_cache.reference_features(refs.open_reference(tmp_path / "ref.npz"), ["64"], config, cache)
    assert report["64"]["hit"] is True
    torch.testing.assert_close(again["64"], first["64"], rtol=0, atol=0)
    monkeypatch.undo()

    # Other weights (another hash) or other content: a different cache entry, computed afresh.
    other_weights = incep.FeatureConfig(
        weights=incep.InceptionWeights(config.weights.path, "f" * 64), layer_fid="64", batch_size=16
    )
    _, report_weights = ref_cache.reference_features(reference, ["64"], other_weights, cache, extractor64)
    assert report_weights["64"]["hit"] is False
    write_npz_reference(tmp_path / "ref.npz", images[8:16])
    _, report_content = ref_cache.reference_features(
        refs.open_reference(tmp_path / "ref.npz"), ["64"], config, cache, extractor64
    )
    assert report_content["64"]["hit"] is False
    assert len(list(cache.glob("features-*.safetensors"))) == 3
    mask = os.umask(0)
    os.umask(mask)
    # The usual file mode (safetensors' own save_file would make the cache files private, 0600).
    assert {path.stat().st_mode & 0o777 for path in cache.glob("features-*")} == {0o666 & ~mask}

    # A damaged cache file is reported by name, with the way out.
    damaged = Path(report_content["64"]["file"])
    damaged.write_bytes(b"not safetensors")
    with pytest.raises(ds.ReferenceInputError, match=f"{damaged.name}: unreadable reference feature cache .*delete it"):
        ref_cache.reference_features(refs.open_reference(tmp_path / "ref.npz"), ["64"], config, cache, extractor64)


def test_read_only_reference_caches_in_user_cache(tmp_path, images, monkeypatch):
    reference = refs.open_reference(write_npz_reference(tmp_path / "ref.npz", images[:4]))
    monkeypatch.setattr(ref_cache, "_writable", lambda directory: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ref_cache.reference_cache_dir(reference) == tmp_path / "xdg" / "diffit-pipe" / "fidelity"
    assert ref_cache.reference_cache_dir(reference, tmp_path / "mine") == tmp_path / "mine"


def test_statistics_reference_gives_the_same_fid(tmp_path, inception_weights, images, extractor64):
    from pipeline.evaluate.adm import feature_statistics

    images = images[:12]
    image_reference = refs.open_reference(write_npz_reference(tmp_path / "ref.npz", images))
    config = _config(inception_weights)
    cache = ref_cache.reference_cache_dir(image_reference)
    features, _ = ref_cache.reference_features(image_reference, ["64"], config, cache, extractor64)
    mu, sigma = feature_statistics(features["64"])  # what the project writes (float64, as `np.cov`)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    stats_reference = refs.open_reference(tmp_path / "stats.npz")
    assert stats_reference.kind == "stats" and not stats_reference.has_images

    samples = ds.ArrayDataset(_perturbed(images, 20.0))
    from_images = M.compute_metrics(samples, image_reference, ["fid"], config, cache, extractor64)["values"]
    from_stats = M.compute_metrics(samples, stats_reference, ["fid"], config, cache, extractor64)["values"]
    assert from_stats["frechet_inception_distance"] == pytest.approx(
        from_images["frechet_inception_distance"], rel=1e-9
    )
    with pytest.raises(ds.ReferenceInputError, match="need reference images"):
        refs.check_reference(stats_reference, (16, 16), ["fid", "kid"])
    with pytest.raises(ds.ReferenceInputError, match="feature dimension 192"):
        refs.load_reference_statistics(stats_reference, 192)  # statistics of another layer


def test_reference_problems_are_reported_clearly(tmp_path, images):
    reference = refs.open_reference(write_npz_reference(tmp_path / "ref.npz", images[:4]))
    with pytest.raises(ds.ReferenceInputError, match="wrong reference resolution"):
        refs.check_reference(reference, (32, 32), ["fid"])
    with pytest.raises(ds.ReferenceInputError, match="does not exist"):
        refs.open_reference(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ds.ReferenceInputError, match="no image files"):
        refs.open_reference(tmp_path / "empty")
    np.savez(tmp_path / "other.npz", something=np.zeros(3))
    with pytest.raises(ds.ReferenceInputError, match="arr_0"):
        refs.open_reference(tmp_path / "other.npz")

    # A folder with one image of another size: the error names that file.
    folder = write_folder_reference(tmp_path / "mixed", images[:3])
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "part0" / "zz-small.png")
    dataset = refs.reference_dataset(refs.open_reference(folder))
    with pytest.raises(ds.ReferenceInputError, match="zz-small.png"):
        [dataset[i] for i in range(len(dataset))]

    # Latent shards are not a reference; neither are shards whose files changed after packing.
    shards = write_shard_reference(tmp_path / "shards", images[:4], per_shard=2)
    manifest = json.loads((shards / "manifest.json").read_text())
    (shards / "manifest.json").write_text(json.dumps({**manifest, "kind": "latents"}))
    with pytest.raises(ds.ReferenceInputError, match="not latents"):
        refs.open_reference(shards)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with open(shards / "shard-000001.tar", "ab") as handle:
        handle.write(b"\0" * 512)
    reference = refs.open_reference(shards)
    with pytest.raises(ds.ReferenceInputError, match="shard-000001.tar"):
        ref_cache.reference_content_hash(reference, ref_cache.reference_cache_dir(reference))
