"""`diffit-pipe encode --encoder-targets ENCODER --encoder-weights PATH`: REPA's targets stored beside the latents
(`repa.npy`, float16 [2, N, D], row 1 of the flipped crop), under every shard rule: the manifest records the
encoder, its weights' sha256 and the grids; the latents are those of an encode without targets; the flip row is the
encoder run on the flipped crop; the fingerprints and dataset identity change only when the targets are set (resume
never mixes datasets); a resumed job redoes a missing or damaged shard to the same bytes; bad settings are one line
naming the flag. Tiny random encoders (a DINOv2-style ViT and a
demo classifier) through the loaders the trainer uses."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.core import shards
from pipeline.core.manifest import load_manifest
from pipeline.encode.job import EncodeOptions, JobError, run_encode
from pipeline.encode.transforms import prepare_image
from tests.support.encode_fixtures import make_image_tree, samples_of, save_tiny_vae, shard_bytes, small_encode_options
from tests.support.encoder_fixtures import save_official, tiny_timm_dinov2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """14 images of 32 px (4 x 4 latents of the tiny VAE), a tiny random DINOv2 (32 wide) and a demo classifier."""
    from pipeline.demo.classifier import ClassifierConfig, SmallCNN, save_classifier

    root = tmp_path_factory.mktemp("encoder-targets")
    make_image_tree(root / "src", per_class=4)
    torch.manual_seed(0)
    classifier = SmallCNN(ClassifierConfig(num_classes=3, resolution=16, channels=(8, 16), groups=4))
    return SimpleNamespace(
        root=root,
        src=root / "src",
        vae=str(save_tiny_vae(root / "vae")),
        dinov2=save_official(tiny_timm_dinov2(), root / "dinov2" / "tiny_dinov2.pth"),
        other_dinov2=save_official(tiny_timm_dinov2(seed=1), root / "dinov2-other" / "tiny_dinov2.pth"),
        classifier=save_classifier(classifier, root / "classifier"),
    )


def options(data, out: Path, **overrides) -> EncodeOptions:
    return small_encode_options(data.src, data.vae, out, **overrides)


def with_targets(data, out: Path, **overrides) -> EncodeOptions:
    targets = {"encoder_targets": "dinov2-vitb14", "encoder_weights": str(data.dinov2)}
    return options(data, out, **{**targets, **overrides})


def crop_of(data, sample: dict) -> np.ndarray:
    crop, _ = prepare_image((data.src / sample["json"]["source"]).read_bytes(), 32)
    return crop


def test_targets_are_the_encoder_tokens_of_each_crop_and_its_flip_beside_unchanged_latents(data, tmp_path):
    from diffit.repa import encoder_input
    from pipeline.core.encoders import load_dinov2

    stored = run_encode(with_targets(data, tmp_path / "stored"))
    plain = run_encode(options(data, tmp_path / "plain"))
    assert stored.ok and plain.ok and stored.counts == plain.counts == {"seen": 14, "written": 14, "failed": 0}
    manifest, reference = load_manifest(tmp_path / "stored"), load_manifest(tmp_path / "plain")
    assert manifest["members"] == ["mean.npy", "std.npy", "cls", "json", "repa.npy"]
    assert "repa_targets" not in reference and "repa.npy" not in reference["members"]
    # 4 x 4 latents, a /2 model's 2 x 2 tokens: DINOv2 at 28 px, 2 x 2 patch tokens of 32 channels.
    assert manifest["repa_targets"] == {
        "encoder": "dinov2-vitb14",
        "weights_sha256": shards.sha256_file(data.dinov2),
        "input_grid": [2, 2],
        "grid": [2, 2],
        "dtype": "float16",
        "shape": [2, 4, 32],
        "flip": "index 0 = the crop, index 1 = its horizontal flip",
    }
    assert manifest["job_fingerprint"] != reference["job_fingerprint"]
    # Without targets the fingerprinted settings are what they were before targets existed (resume keeps old data).
    from pipeline.encode.job import _settings_for_fingerprint

    plain_settings = _settings_for_fingerprint(options(data, tmp_path / "x"), None)
    assert set(plain_settings) == {"format_version", "kind", "resolution", "transform", "vae_hash", "dtype"}
    encoder = load_dinov2(data.dinov2, img_size=28, pos_embed_rule="timm")  # the trainer's encoder, built by hand
    stored_samples, plain_samples = samples_of(tmp_path / "stored"), samples_of(tmp_path / "plain")
    assert stored_samples.keys() == plain_samples.keys() and len(stored_samples) == 14
    for key, sample in stored_samples.items():
        other = plain_samples[key]
        assert np.array_equal(sample["mean.npy"], other["mean.npy"]) and np.array_equal(
            sample["std.npy"], other["std.npy"]
        )
        crop = torch.from_numpy(crop_of(data, sample).copy()).permute(2, 0, 1)[None]
        with torch.no_grad():
            of_crop = encoder.patch_tokens(encoder_input(crop, 28))[0]
            of_flip = encoder.patch_tokens(encoder_input(crop.flip(-1), 28))[0]
        targets = sample["repa.npy"]
        assert targets.dtype == np.float16 and targets.shape == (2, 4, 32)
        torch.testing.assert_close(torch.from_numpy(targets[0]).float(), of_crop, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(torch.from_numpy(targets[1]).float(), of_flip, atol=2e-3, rtol=2e-3)
        assert not torch.allclose(of_crop, of_flip, atol=1e-2)
    for entry in manifest["shards"]:  # each shard's sha256 covers the targets too
        assert entry["sha256"] == shards.sha256_file(tmp_path / "stored" / entry["name"])


def test_a_relative_weights_path_reaches_the_workers_absolute(data, monkeypatch):
    """The workers of a running Dask cluster start in their own directories: the weights path they get is absolute,
    as the source, OUT and --vae are (a relative one failed every shard there with 'does not exist')."""
    from pipeline.encode.targets import resolve_targets

    monkeypatch.chdir(data.dinov2.parent)
    spec = resolve_targets("dinov2-vitb14", data.dinov2.name, None, latent_size=8)
    assert spec.weights == str(data.dinov2.resolve())


def test_the_demo_classifier_targets_are_its_own_grid_for_any_model(data, tmp_path):
    from pipeline.core.small_cnn import ClassifierPatchEncoder, load_classifier

    out = tmp_path / "classifier"
    result = run_encode(options(data, out, encoder_targets="demo-classifier", encoder_weights=str(data.classifier)))
    assert result.ok
    entry = load_manifest(out)["repa_targets"]
    assert (entry["input_grid"], entry["grid"], entry["shape"]) == (None, [8, 8], [2, 64, 16])
    encoder = ClassifierPatchEncoder(load_classifier(data.classifier))
    sample = next(iter(samples_of(out).values()))
    crop = torch.from_numpy(crop_of(data, sample).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        of_flip = encoder.patch_tokens(crop.flip(-1))[0]
    torch.testing.assert_close(torch.from_numpy(sample["repa.npy"][1]).float(), of_flip, atol=2e-3, rtol=2e-3)


def test_targets_resume_like_any_shard_and_never_mix_with_other_targets(data, tmp_path):
    out = tmp_path / "stored"
    run_encode(with_targets(data, out))
    original = shard_bytes(out)
    again = run_encode(with_targets(data, out))
    assert again.shards_skipped == again.shards_total == 3 and shard_bytes(out) == original
    # A missing shard and a damaged one (a byte in the middle) are written again, to the same bytes.
    (out / "shard-000001.tar").unlink()
    raw = bytearray((out / "shard-000002.tar").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (out / "shard-000002.tar").write_bytes(bytes(raw))
    redone = run_encode(with_targets(data, out, verify=True))
    assert redone.ok and redone.shards_written == 2 and shard_bytes(out) == original
    # Without targets, or with other weights, this job would rewrite the dataset: refused without --overwrite.
    with pytest.raises(JobError, match="holds another dataset.*encoder_targets"):
        run_encode(options(data, out))
    with pytest.raises(JobError, match="holds another dataset.*encoder_targets"):
        run_encode(with_targets(data, out, encoder_weights=str(data.other_dinov2)))
    assert shard_bytes(out) == original and json.loads((out / "shard-000000.json").read_text())["count"] == 6


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"encoder_targets": "dinov2-vitb14"}, "--encoder-targets dinov2-vitb14 needs --encoder-weights PATH"),
        ({"encoder_targets": "clip", "encoder_weights": "x"}, "--encoder-targets must be one of dinov2-vits14"),
        ({"encoder_weights": "x"}, "--encoder-weights and --token-grid go with --encoder-targets"),
        ({"kind": "images", "encoder_targets": "dinov2-vitb14", "encoder_weights": "x"}, "`pack` writes images"),
        ({"encoder_targets": "demo-classifier", "encoder_weights": "x", "token_grid": 2}, "--token-grid sizes"),
        ({"encoder_targets": "dinov2-vitb14", "encoder_weights": "DINOV2", "token_grid": 3}, "does not divide"),
        ({"encoder_targets": "dinov2-vitb14", "encoder_weights": "/missing/w.pth"}, "--encoder-weights: /missing"),
    ],
)
def test_bad_target_settings_are_one_line_naming_the_flag(data, tmp_path, overrides, message):
    from pipeline.core.errors import InputError

    if overrides.get("encoder_weights") == "DINOV2":
        overrides = {**overrides, "encoder_weights": str(data.dinov2)}
    with pytest.raises(InputError) as caught:
        run_encode(options(data, tmp_path / "out", **overrides))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()
