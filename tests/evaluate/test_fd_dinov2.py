"""FD_DINOv2 (`pipeline.evaluate.dinov2`): the Fréchet distance of a set against itself is 0 and against a shifted
copy the closed form |c|^2; the DINOv2 features feed it through the reference caches and stored statistics; the
evaluate stage computes it with `--dinov2-weights` (random tiny weights: labelled plumbing-only, never FD_DINOv2)
and refuses it without weights in one error line before sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.core.encoders import EncoderWeightsError, MissingEncoderWeightsError
from pipeline.core.shards import sha256_file
from pipeline.evaluate import dinov2 as dino
from pipeline.evaluate import fd_dinov2 as fd
from pipeline.evaluate import options as opts
from pipeline.evaluate import run as ev
from pipeline.evaluate.adm import feature_statistics, frechet_distance
from pipeline.evaluate.datasets import ArrayDataset, ReferenceInputError
from pipeline.evaluate.reference.formats import open_reference
from pipeline.evaluate.sample_store import STORE_NAME
from tests.support.encoder_fixtures import save_official, tiny_timm_dinov2
from tests.support.eval_fixtures import smooth_images, write_npz_reference

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 32


@pytest.fixture(scope="module")
def dinov2_weights(tmp_path_factory):
    """A tiny random ViT of DINOv2's layout in the official key format (plumbing only)."""
    model = tiny_timm_dinov2(embed_dim=WIDTH, depth=1, grid=4, seed=7)
    return save_official(model, tmp_path_factory.mktemp("dinov2") / "tiny-dinov2.pth")


@pytest.fixture(scope="module")
def images():
    return smooth_images(48, size=16, seed=3)


def _config(weights_path) -> dino.DINOv2Config:
    return dino.DINOv2Config(weights=dino.resolve_dinov2_weights(weights_path), batch_size=16, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# The distance


def test_frechet_distance_of_a_set_against_itself_and_a_shifted_copy():
    generator = np.random.default_rng(0)
    features = generator.normal(size=(300, 12)) @ generator.normal(size=(12, 12))
    mu, sigma = feature_statistics(torch.from_numpy(features))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)
    shift = generator.normal(size=12)
    mu_shifted, sigma_shifted = feature_statistics(torch.from_numpy(features + shift))
    np.testing.assert_allclose(sigma_shifted, sigma, rtol=1e-9, atol=1e-9)  # a shift leaves the covariance
    closed_form = float(shift @ shift)  # |mu1 - mu2|^2 + tr(S + S - 2 (S S)^1/2) = |c|^2
    assert frechet_distance(mu, sigma, mu_shifted, sigma_shifted) == pytest.approx(closed_form, rel=1e-7)


def test_fd_dinov2_of_images_against_themselves_and_shifted_statistics(dinov2_weights, images, tmp_path):
    config = _config(dinov2_weights)
    samples = ArrayDataset(images, "samples")
    reference = open_reference(write_npz_reference(tmp_path / "ref.npz", images))
    result = fd.compute_fd_dinov2(samples, reference, config, tmp_path / "cache")
    assert abs(result["value"]) < 1e-6 and result["statistics_cache"]["hit"] is False
    assert result["source"] == {"from": "statistics of all reference images", "images": len(images)}
    again = fd.compute_fd_dinov2(samples, reference, config, tmp_path / "cache")
    assert again["statistics_cache"] == {**result["statistics_cache"], "hit": True} and abs(again["value"]) < 1e-6

    # Stored statistics (`mu_dinov2` / `sigma_dinov2` of a reference npz): the samples' own, shifted by c.
    extractor = dino.create_dinov2_extractor(config)
    with torch.no_grad():
        features = extractor(torch.from_numpy(images).permute(0, 3, 1, 2))[dino.DINOV2_LAYER]
    assert features.shape == (len(images), WIDTH)
    mu, sigma = feature_statistics(features)
    shift = np.linspace(-1.0, 2.0, WIDTH)
    stats_path = tmp_path / "stats.npz"
    np.savez(stats_path, mu_dinov2=mu + shift, sigma_dinov2=sigma)
    stats = open_reference(stats_path)
    assert stats.kind == "stats" and stats.stored_statistics("fd_dinov2") == ("mu_dinov2", "sigma_dinov2")
    shifted = fd.compute_fd_dinov2(samples, stats, config, tmp_path / "cache")
    assert shifted["source"]["from"] == "stored statistics" and shifted["statistics_cache"] is None
    assert shifted["value"] == pytest.approx(float(shift @ shift), rel=1e-5)


def test_preprocessing_is_edm2_torch_mode():
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    x = torch.nn.functional.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(dino.preprocess(images), (x - mean) / std)


def test_stored_dinov2_statistics_are_bounded_before_reading(tmp_path):
    path = tmp_path / "huge.npz"
    np.savez(path, mu_dinov2=np.zeros(5000, np.float32), sigma_dinov2=np.zeros((1, 1), np.float32))
    with pytest.raises(ReferenceInputError, match="mu_dinov2"):
        open_reference(path)
    fid_only = tmp_path / "fid-only.npz"
    np.savez(fid_only, mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ReferenceInputError, match="no mu_dinov2/sigma_dinov2 statistics for fd_dinov2"):
        from pipeline.evaluate.reference.formats import check_reference

        check_reference(open_reference(fid_only), (16, 16), ["fd_dinov2"])


# ----------------------------------------------------------------------------------------------------------------
# Which weights give FD_DINOv2


def test_only_the_published_backbone_is_labelled_fd_dinov2(dinov2_weights, tmp_path):
    weights = dino.resolve_dinov2_weights(dinov2_weights)
    assert not weights.recognised and weights.sha256 == sha256_file(dinov2_weights)
    assert weights.label.startswith("plumbing-only (DINOv2 weights tiny-dinov2.pth")
    assert "architecture custom" in weights.label and "file name is not dinov2_vitl14_pretrain.pth" in weights.label
    assert weights.describe()["sha256_pinned"] is False
    # The published name alone is not enough: the architecture must be ViT-L/14 too.
    renamed = tmp_path / "dinov2_vitl14_pretrain.pth"
    renamed.write_bytes(dinov2_weights.read_bytes())
    problems = dino.resolve_dinov2_weights(renamed).problems
    assert len(problems) == 1 and problems[0].startswith("architecture custom")
    recognised = dino.DINOv2Weights(renamed, "0" * 64, {"architecture": "dinov2_vitl14"})
    assert recognised.recognised and recognised.label.startswith("FD_DINOv2 with dinov2_vitl14_pretrain.pth")
    assert "not pinned" in recognised.label
    with pytest.raises(MissingEncoderWeightsError, match="--dinov2-weights"):
        dino.resolve_dinov2_weights(None)
    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(2)}, bad)
    with pytest.raises(EncoderWeightsError, match="not a DINOv2 ViT"):
        dino.resolve_dinov2_weights(bad)


# ----------------------------------------------------------------------------------------------------------------
# The evaluate stage


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_npz_reference(tmp_path_factory.mktemp("reference") / "ref.npz", smooth_images(8, size=16))


def _options(model, out, reference, dinov2_weights=None, **changes) -> opts.EvaluateOptions:
    settings = dict(
        model_dir=model,
        out_dir=out,
        num_samples=8,
        batch_size=4,
        sampling={"steps": 2, "guidance_scale": 1.0},
        reference=reference,
        dinov2_weights=dinov2_weights,
        metrics=("fd_dinov2",),
        feature_batch_size=8,
        device="cpu",
    )
    settings.update(changes)
    return opts.EvaluateOptions(**settings)


def test_evaluate_fd_dinov2_alone_is_a_labelled_plumbing_value(latent_model, reference, dinov2_weights, tmp_path):
    """No Inception weights are needed for fd_dinov2 alone; tiny random weights give a plumbing-only value."""
    record = ev.run_evaluate(_options(latent_model, tmp_path / "out", reference, dinov2_weights))
    assert record == json.loads((tmp_path / "out" / ev.METRICS_FILE).read_text())
    assert record["reportable"] is False and record["metrics"] == {}
    assert set(record["plumbing_only_metrics"]) == {"fd_dinov2"}
    assert np.isfinite(record["plumbing_only_metrics"]["fd_dinov2"])
    assert record["label"].startswith("plumbing-only (DINOv2 weights tiny-dinov2.pth not the published ViT-L/14")
    assert record["inception_weights"] is None and record["feature_extractor"] is None
    assert record["dinov2_weights"]["sha256"] == sha256_file(dinov2_weights)
    assert record["feature_extractor_dinov2"]["weights_sha256"] == sha256_file(dinov2_weights)
    assert record["metric_sources"]["fd_dinov2"]["from"] == "statistics of all reference images"
    assert record["reference"]["dinov2_statistics_cache"]["hit"] is False
    assert "PLUMBING-ONLY, NOT REPORTABLE" in ev.format_summary(record)


def test_evaluate_cli_fid_and_fd_dinov2(latent_model, reference, dinov2_weights, inception_weights, tmp_path):
    from cli.main import app

    out = tmp_path / "out"
    arguments = [
        "evaluate",
        *("--model", str(latent_model), "--out", str(out), "--num-samples", "8", "--batch-size", "4"),
        *("--steps", "2", "--guidance-scale", "1.0", "--reference", str(reference)),
        *("--inception-weights", str(inception_weights), "--dinov2-weights", str(dinov2_weights)),
        *("--metrics", "fid,fd_dinov2", "--feature-layer", "64", "--feature-batch-size", "8", "--device", "cpu"),
    ]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    record = json.loads((out / ev.METRICS_FILE).read_text())
    assert record["metrics"] == {} and set(record["plumbing_only_metrics"]) == {"fid", "fd_dinov2"}
    assert "non-official Inception weights" in record["label"] and "tiny-dinov2.pth" in record["label"]
    assert record["feature_extractor"]["layers"] == {"fid": "64"}
    assert record["metrics_requested"] == ["fid", "fd_dinov2"]


def test_fd_dinov2_without_weights_stops_before_sampling(latent_model, reference, tmp_path):
    with pytest.raises(MissingEncoderWeightsError, match="dinov2_vitl14_pretrain.pth"):
        ev.run_evaluate(_options(latent_model, tmp_path / "out", reference))
    assert not (tmp_path / "out" / STORE_NAME).exists()

    from cli.main import app

    out = tmp_path / "cli-out"
    arguments = ["evaluate", "--model", str(latent_model), "--out", str(out), "--num-samples", "8"]
    result = CliRunner().invoke(app, [*arguments, "--reference", str(reference), "--metrics", "fd_dinov2"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "dinov2_vitl14_pretrain.pth" in errors[0] and "--dinov2-weights" in errors[0]
    assert "Traceback" not in result.output and not (out / STORE_NAME).exists()


def test_reference_batch_stores_dinov2_statistics(dinov2_weights, inception_weights, tmp_path):
    """`diffit-pipe reference --dinov2-weights` adds mu_dinov2 / sigma_dinov2 (streamed with the Inception
    statistics, in one pass); evaluate then uses them as stored statistics."""
    from pipeline.evaluate.reference.batch import ReferenceOptions, build_reference

    images = smooth_images(12, size=16, seed=5)
    source = write_npz_reference(tmp_path / "source.npz", images)
    out = tmp_path / "ref.npz"
    options = ReferenceOptions(
        source=source,
        out=out,
        inception_weights=inception_weights,
        dinov2_weights=dinov2_weights,
        images=False,
        chunk_size=5,
        batch_size=4,
        workers=0,
        device="cpu",
        progress=False,
    )
    info = build_reference(options)
    assert info["dinov2_weights"]["sha256"] == sha256_file(dinov2_weights)
    with np.load(out) as data:
        assert {"mu", "sigma", "mu_s", "sigma_s", "mu_dinov2", "sigma_dinov2"} <= set(data.files)
        stored = data["mu_dinov2"], data["sigma_dinov2"]
    config = _config(dinov2_weights)
    with torch.no_grad():
        features = dino.create_dinov2_extractor(config)(torch.from_numpy(images).permute(0, 3, 1, 2))
    mu, sigma = feature_statistics(features[dino.DINOV2_LAYER])
    np.testing.assert_allclose(stored[0], mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stored[1], sigma, rtol=1e-5, atol=1e-6)
    reference = open_reference(out)
    assert reference.kind == "stats" and reference.stored_statistics("fd_dinov2") is not None
    (ref_mu, _), source_record, _ = fd.reference_dinov2_statistics(reference, config, tmp_path / "cache")
    assert source_record["keys"] == ["mu_dinov2", "sigma_dinov2"]
    np.testing.assert_array_equal(ref_mu, stored[0])
