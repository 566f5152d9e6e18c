"""`diffit-pipe encode --keep-images`: each sample's crop as a PNG member beside its latents (REPA's targets,
`pipeline.train.repa`), under every shard rule: the latents are those of an encode without it, the manifest lists
the member, the fingerprint and dataset identity change (so resume never mixes the two), a resumed job redoes a
missing or damaged shard to the same bytes, and `pack` refuses the flag."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.core import shards
from pipeline.core.manifest import load_manifest
from pipeline.encode.job import EncodeOptions, JobError, run_encode
from pipeline.encode.transforms import prepare_image
from tests.support.encode_fixtures import make_image_tree, samples_of, save_tiny_vae, shard_bytes, small_encode_options


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("keep-images")
    make_image_tree(root / "src", per_class=4)
    return SimpleNamespace(root=root, src=root / "src", vae=str(save_tiny_vae(root / "vae")))


def options(data, out: Path, **overrides) -> EncodeOptions:
    return small_encode_options(data.src, data.vae, out, **overrides)


def test_keep_images_stores_each_crop_beside_its_unchanged_latents(data, tmp_path):
    kept = run_encode(options(data, tmp_path / "kept", keep_images=True))
    plain = run_encode(options(data, tmp_path / "plain"))
    assert kept.ok and plain.ok and kept.counts == plain.counts == {"seen": 14, "written": 14, "failed": 0}
    manifest, reference = load_manifest(tmp_path / "kept"), load_manifest(tmp_path / "plain")
    assert manifest["members"] == ["mean.npy", "std.npy", "cls", "json", "png"]
    assert reference["members"] == ["mean.npy", "std.npy", "cls", "json"] and "image_shape" not in reference
    assert (manifest["image_format"], manifest["image_shape"]) == ("png", [32, 32, 3])
    assert manifest["job_fingerprint"] != reference["job_fingerprint"]  # the setting is part of every fingerprint
    kept_samples, plain_samples = samples_of(tmp_path / "kept"), samples_of(tmp_path / "plain")
    assert kept_samples.keys() == plain_samples.keys() and len(kept_samples) == 14
    for key, sample in kept_samples.items():
        # The crop the VAE encoded (index 0 of the latents; index 1 is its flip), lossless.
        crop, _ = prepare_image((data.src / sample["json"]["source"]).read_bytes(), 32)
        assert sample["png"].dtype == np.uint8 and np.array_equal(sample["png"], crop)
        # The latents, label and record are those of the encode without images, bit for bit.
        other = plain_samples[key]
        assert np.array_equal(sample["mean.npy"], other["mean.npy"]) and np.array_equal(
            sample["std.npy"], other["std.npy"]
        )
        assert (sample["cls"], sample["json"]) == (other["cls"], other["json"]) and "png" not in other
    # Every shard's sha256 in the manifest covers the images too.
    for entry in manifest["shards"]:
        assert entry["sha256"] == shards.sha256_file(tmp_path / "kept" / entry["name"])


def test_keep_images_resumes_like_any_shard_and_never_mixes_with_a_dataset_without_them(data, tmp_path):
    out = tmp_path / "kept"
    run_encode(options(data, out, keep_images=True))
    original = shard_bytes(out)
    # Rerun: every shard is kept (trusted from its sealed sidecar).
    again = run_encode(options(data, out, keep_images=True))
    assert again.shards_skipped == again.shards_total == 3 and shard_bytes(out) == original
    # A missing shard and a damaged one (a byte of an image) are written again, to the same bytes.
    (out / "shard-000001.tar").unlink()
    raw = bytearray((out / "shard-000002.tar").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (out / "shard-000002.tar").write_bytes(bytes(raw))
    redone = run_encode(options(data, out, keep_images=True, verify=True))
    assert redone.ok and redone.shards_written == 2 and shard_bytes(out) == original
    # The same command without --keep-images would rewrite this dataset: refused without --overwrite.
    with pytest.raises(JobError, match="holds another dataset.*keep_images"):
        run_encode(options(data, out))
    assert shard_bytes(out) == original
    sidecar = json.loads((out / "shard-000000.json").read_text())
    assert sidecar["count"] == 6


def test_pack_refuses_keep_images(data, tmp_path):
    with pytest.raises(JobError, match="--keep-images keeps the crops beside their latents"):
        run_encode(options(data, tmp_path / "packed", kind="images", keep_images=True))
