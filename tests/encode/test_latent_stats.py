"""The per-channel statistics `encode` records (`pipeline.core.latent_stats`): per shard in its sidecar, merged
across the job's Dask tasks into the manifest's `latent_stats`, equal to numpy over every latent read back from the
shards (original views, float64) - also after a resumed job - and bounded when a manifest is read."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.core import shards
from pipeline.core.latent_stats import ChannelMoments, merge_shards, shard_moments
from pipeline.core.manifest import ManifestError, load_manifest, shard_urls
from pipeline.core.shard_members import decode_sample
from pipeline.encode.job import EncodeOptions, run_encode
from pipeline.encode.plan import RECORD_CHECK, seal_sidecar
from tests.support.encode_fixtures import TEST_MAX_PIXELS, make_image_tree, save_tiny_vae

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """A 3-class tree of 18 images encoded at 32 px with the tiny VAE into 4 shards (4 Dask tasks, in-process)."""
    root = tmp_path_factory.mktemp("latent-stats")
    make_image_tree(root / "src", per_class=4)
    vae = save_tiny_vae(root / "vae")
    config = EncodeOptions(
        source=str(root / "src"),
        out=str(root / "latents"),
        resolution=32,
        vae=str(vae),
        shard_size=5,
        batch_size=3,
        workers=0,
        max_pixels=TEST_MAX_PIXELS,
        progress=False,
    )
    result = run_encode(config)
    assert result.ok and result.shards_written == 4
    return SimpleNamespace(config=config, out=root / "latents", manifest=load_manifest(root / "latents"))


def _original_views(out: Path) -> np.ndarray:
    """Every sample's stored posterior mean of the original view, float64 [N, C, h, w], read back from the shards."""
    manifest = load_manifest(out)
    latents = [
        decode_sample(raw)["mean.npy"][0].astype(np.float64)
        for url in shard_urls(out, manifest)
        for raw in shards.iter_samples(url)
    ]
    return np.stack(latents)


def test_manifest_statistics_equal_numpy_over_all_latents(encoded):
    latents = _original_views(encoded.out)
    stats = encoded.manifest["latent_stats"]
    count, channels, size = latents.shape[0], latents.shape[1], latents.shape[2]
    assert stats["count"] == count == encoded.manifest["counts"]["written"] and stats["views"] == "original"
    assert stats["values"] == count * size * size and len(stats["mean"]) == len(stats["std"]) == channels
    np.testing.assert_allclose(stats["mean"], latents.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stats["std"], latents.std(axis=(0, 2, 3)), rtol=1e-12)
    # Each shard's sidecar holds its own share; merged in shard order they give the manifest's numbers exactly.
    parts = [
        ChannelMoments.from_sidecar(json.loads((encoded.out / shards.sidecar_name(i)).read_text())["latent_stats"])
        for i in range(4)
    ]
    assert [part.samples for part in parts] == [entry["count"] for entry in encoded.manifest["shards"]]
    assert merge_shards(parts).manifest_entry() == stats


def test_a_resumed_encode_merges_the_same_statistics(encoded, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(encoded.out, out)
    before = {path.name: path.read_bytes() for path in out.glob("shard-*")}
    # As a job killed midway leaves it: no manifest, one shard never written, ...
    (out / "manifest.json").unlink()
    (out / "shard-000002.tar").unlink()
    (out / "shard-000002.json").unlink()
    # ... and a shard finished by a version that recorded no statistics (sealed: trusted, but read back).
    sidecar = json.loads((out / "shard-000001.json").read_text())
    del sidecar["latent_stats"], sidecar[RECORD_CHECK]
    (out / "shard-000001.json").write_text(json.dumps(seal_sidecar(sidecar)))

    result = run_encode(EncodeOptions(**{**vars(encoded.config), "out": str(out)}))
    assert result.ok and result.shards_written == 1 and result.shards_skipped == 3
    assert {path.name: path.read_bytes() for path in out.glob("shard-*")} == before  # sidecars identical too
    stats = load_manifest(out)["latent_stats"]
    assert stats == encoded.manifest["latent_stats"]
    latents = _original_views(out)
    np.testing.assert_allclose(stats["mean"], latents.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(stats["std"], latents.std(axis=(0, 2, 3)), rtol=1e-12)


def test_moments_merge_exactly_whatever_the_grouping():
    rng = np.random.default_rng(0)
    latents = (rng.standard_normal((23, 2, 16, 4, 4)) * [[[[3.0]]]] + 5.0).astype(np.float16)
    expected_mean = latents[:, 0].astype(np.float64).mean(axis=(0, 2, 3))
    expected_std = latents[:, 0].astype(np.float64).std(axis=(0, 2, 3))
    for cuts in ([23], [1, 22], [5, 5, 5, 8], [0, 10, 0, 13]):
        parts, start = [], 0
        for size in cuts:
            parts.append(shard_moments(latents[start : start + size]))
            start += size
        merged = merge_shards(parts)
        assert merged.samples == 23 and merged.values == 23 * 16
        np.testing.assert_allclose(merged.mean, expected_mean, rtol=1e-12)
        np.testing.assert_allclose(merged.std, expected_std, rtol=1e-12)
    # A sidecar's JSON round-trips the moments exactly; an empty shard contributes nothing.
    part = shard_moments(latents[:5])
    again = ChannelMoments.from_sidecar(json.loads(json.dumps(part.to_sidecar())), channels=16)
    assert np.array_equal(again.mean, part.mean) and np.array_equal(again.m2, part.m2)
    assert ChannelMoments.from_sidecar(ChannelMoments().to_sidecar()).values == 0
    assert ChannelMoments.from_sidecar({**part.to_sidecar(), "mean": [math.nan] * 16}) is None
    assert ChannelMoments.from_sidecar(part.to_sidecar(), channels=4) is None


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"mean": [math.nan, 0.0, 0.0, 0.0]}, "latent_stats.mean holds a value that is not a finite number"),
        ({"std": [1.0, 1.0, 1.0, -1.0]}, "latent_stats.std holds a value that is not a finite number in \\[0,"),
        ({"std": [1.0, 1.0, 1.0, 1e30]}, "latent_stats.std holds a value that is not a finite number"),
        ({"mean": [0.0] * 3}, "latent_stats.mean has 3 entries for 4 latent channels"),
        ({"std": [1.0] * 100_000}, "latent_stats.std is not a list of 1 to 256 numbers"),
        ({"count": 0}, "latent_stats.count 0 is not a positive integer"),
        ({"count": True}, "latent_stats.count True is not a positive integer"),
    ],
)
def test_a_manifest_with_bad_statistics_is_refused(encoded, tmp_path, change, problem):
    out = tmp_path / "bad"
    shutil.copytree(encoded.out, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["latent_stats"] = {**manifest["latent_stats"], **change}
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=problem):
        load_manifest(out)


def test_vae_shift_factor_is_recorded_and_bounded(encoded, tmp_path):
    assert encoded.manifest["vae"]["shift_factor"] == 0.0  # the tiny SD-like VAE has none
    out = tmp_path / "shifted"
    shutil.copytree(encoded.out, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["vae"]["shift_factor"] = math.inf
    (out / "manifest.json").write_text(json.dumps(manifest).replace("Infinity", "1e999"))
    with pytest.raises(ManifestError, match="vae.shift_factor inf is not a finite number"):
        load_manifest(out)
