"""The evaluate stage end to end with tiny models: store determinism, multi-process and resume equivalence,
paper defaults, guidance wiring, and the errors that must stop a run before any sampling.

Inception weights are random (plumbing only) and FID/KID/PRC use the 64-channel layer to stay fast.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffit.sampling_config import to_uint8
from pipeline import __version__ as pipeline_version
from pipeline.core.shards import sha256_file
from pipeline.evaluate import datasets as ds
from pipeline.evaluate import generation, sampling_settings
from pipeline.evaluate import inception as incep
from pipeline.evaluate import model_loading as loading
from pipeline.evaluate import options as opts
from pipeline.evaluate import run as ev
from pipeline.evaluate.sample_store import STORE_NAME, SampleStore, SampleStoreMismatchError
from tests.support.eval_fixtures import (
    REPO_ROOT,
    kill_slow_worker,
    make_latent_model_dir,
    make_tiny_vae,
    smooth_images,
    write_npz_reference,
)

FIXTURES = str(REPO_ROOT / "tests" / "support" / "eval_fixtures.py")
NUM_SAMPLES, BATCH, STEPS = 8, 2, 4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return write_npz_reference(tmp_path_factory.mktemp("reference") / "ref.npz", smooth_images(8, size=16))


def _options(model, out, reference=None, weights=None, metrics=("fid", "prc"), **changes) -> opts.EvaluateOptions:
    sampling = {
        "steps": STEPS,
        "guidance_scale": 4.6,
        "guidance_schedule": "power-cosine",
        **changes.pop("sampling", {}),
    }
    settings = dict(
        model_dir=model,
        out_dir=out,
        num_samples=NUM_SAMPLES,
        batch_size=BATCH,
        sampling=sampling,
        reference=reference,
        inception_weights=weights,
        metrics=metrics,
        feature_layer="64",
        feature_batch_size=8,
        device="cpu",
    )
    settings.update(changes)
    return opts.EvaluateOptions(**settings)


def _cli_arguments(options: opts.EvaluateOptions) -> list[str]:
    """The `diffit-pipe evaluate` arguments equivalent to `options` (as built by `_options`)."""
    return [
        "evaluate",
        "--model",
        str(options.model_dir),
        "--out",
        str(options.out_dir),
        "--num-samples",
        str(options.num_samples),
        "--batch-size",
        str(options.batch_size),
        "--steps",
        str(options.sampling["steps"]),
        "--guidance-scale",
        str(options.sampling["guidance_scale"]),
        "--guidance-schedule",
        options.sampling["guidance_schedule"],
        "--reference",
        str(options.reference),
        "--inception-weights",
        str(options.inception_weights),
        "--metrics",
        ",".join(options.metrics),
        "--feature-layer",
        options.feature_layer,
        "--feature-batch-size",
        str(options.feature_batch_size),
        "--device",
        "cpu",
    ]


def _images(out: Path) -> np.ndarray:
    store = SampleStore.open(out / STORE_NAME, mode="r")
    assert store.is_complete()
    return store.read_images(0, store.layout.num_samples)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, latent_model, reference, inception_weights):
    """One uninterrupted single-process evaluation that the other runs are compared with."""
    out = tmp_path_factory.mktemp("baseline")
    options = _options(latent_model, out, reference, inception_weights, export_npz=True)
    record = ev.run_evaluate(options)
    return SimpleNamespace(out=out, record=record, options=options, images=_images(out))


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def test_evaluate_writes_store_metrics_json_and_npz(baseline, inception_weights, capsys):
    record = json.loads((baseline.out / "metrics.json").read_text())
    assert record == json.loads(json.dumps(baseline.record))
    assert record["num_samples"] == NUM_SAMPLES and record["num_processes"] == 1
    # Random Inception weights: the values exist, but only under the plumbing-only key, never as "metrics".
    assert record["official_inception_weights"] is False and record["metrics"] == {}
    assert record["reportable"] is False and record["label"].startswith(incep.PLUMBING_ONLY_LABEL)
    assert "non-standard Inception feature layers" in record["label"]
    values = record["plumbing_only_metrics"]
    assert set(values) == {"fid", "precision", "recall", "f_score"}
    assert values["fid"] > 0 and 0 <= values["precision"] <= 1 and 0 <= values["recall"] <= 1
    assert record["inception_weights"]["sha256"] == sha256_file(inception_weights)
    sampling = record["sampling"]
    assert (
        sampling["sampler"],
        sampling["steps"],
        sampling["guidance_scale"],
        sampling["guidance_schedule"],
        sampling["guidance_channels"],
    ) == ("ddpm", STEPS, 4.6, "power-cosine", 3)
    assert record["model"]["weights_sha256"] == sha256_file(Path(baseline.options.model_dir) / "model.safetensors")
    assert record["reference"]["kind"] == "npz" and len(record["reference"]["content_sha256"]) == 64
    assert record["feature_extractor"]["layers"] == {"fid": "64", "prc": "64"}
    assert record["feature_extractor"]["prc_distance_precision"] == "fp16"  # the ADM evaluator's, by default
    assert record["sampling"]["pixels"] == "round"
    assert {"rank0_sampling", "total", "metrics_sample_features"} <= set(record["timings_s"])

    images = baseline.images
    assert images.shape == (NUM_SAMPLES, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 1
    with np.load(baseline.out / "samples.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        labels = data["arr_1"]
    assert labels.min() >= 0 and labels.max() < 10
    store = SampleStore.open(baseline.out / STORE_NAME, mode="r")
    assert store.settings["sampling"]["seed"] == 0 and store.settings["package_version"] == pipeline_version


def test_same_seed_same_samples_whatever_the_batch_size(baseline, tmp_path):
    batch3 = ev.run_evaluate(_options(baseline.options.model_dir, tmp_path / "b3", metrics=(), batch_size=3))
    np.testing.assert_array_equal(_images(tmp_path / "b3"), baseline.images)
    assert batch3["sample_store"]["chunk_size"] == 3
    ev.run_evaluate(_options(baseline.options.model_dir, tmp_path / "seed1", metrics=(), seed=1))
    assert not np.array_equal(_images(tmp_path / "seed1"), baseline.images)


def test_rerun_reuses_store_and_refuses_other_settings(baseline, tmp_path):
    out = tmp_path / "again"
    ev.run_evaluate(_options(baseline.options.model_dir, out, metrics=()))
    record = ev.run_evaluate(_options(baseline.options.model_dir, out, metrics=()))
    assert record["sample_store"]["chunks_sampled_this_run"] == 0
    with pytest.raises(SampleStoreMismatchError, match="seed"):
        ev.run_evaluate(_options(baseline.options.model_dir, out, metrics=(), seed=5))
    with pytest.raises(SampleStoreMismatchError, match="steps"):
        ev.run_evaluate(_options(baseline.options.model_dir, out, metrics=(), sampling={"steps": 2}))
    np.testing.assert_array_equal(_images(out), baseline.images)


@pytest.mark.slow
def test_two_processes_give_the_same_store_and_metrics(baseline, tmp_path):
    options = _options(
        baseline.options.model_dir, tmp_path / "two", baseline.options.reference, baseline.options.inception_weights
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        FIXTURES,
        "cli",
        *_cli_arguments(options),
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert record["num_processes"] == 2
    np.testing.assert_array_equal(_images(tmp_path / "two"), baseline.images)
    assert record["plumbing_only_metrics"] == baseline.record["plumbing_only_metrics"]
    assert "PLUMBING-ONLY" in result.stdout


@pytest.mark.slow
def test_killed_sampling_resumes_to_the_same_store_and_metrics(baseline, tmp_path):
    out = tmp_path / "killed"
    spec = {
        "model": str(baseline.options.model_dir),
        "out": str(out),
        "num_samples": NUM_SAMPLES,
        "batch_size": BATCH,
        "delay_s": 0.25,
        "sampling": {"steps": STEPS, "guidance_scale": 4.6, "guidance_schedule": "power-cosine"},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))

    def a_chunk_is_stored() -> bool:
        store = out / STORE_NAME
        return (store / "zarr.json").exists() and int(SampleStore.open(store, mode="r").done_mask().sum()) >= 1

    ended = kill_slow_worker("slow-sample", tmp_path / "spec.json", a_chunk_is_stored)
    assert ended is None, f"sampling ended before it could be killed:\n{ended}"
    interrupted = SampleStore.open(out / STORE_NAME, mode="r")
    assert 1 <= interrupted.done_mask().sum() < interrupted.layout.num_chunks

    record = ev.run_evaluate(
        _options(baseline.options.model_dir, out, baseline.options.reference, baseline.options.inception_weights)
    )
    assert 0 < record["sample_store"]["chunks_sampled_this_run"] < record["sample_store"]["num_chunks"]
    np.testing.assert_array_equal(_images(out), baseline.images)
    assert record["plumbing_only_metrics"] == baseline.record["plumbing_only_metrics"]


def test_image_space_edm_model(image_model, tmp_path):
    model = image_model
    record = ev.run_evaluate(
        opts.EvaluateOptions(
            model_dir=model,
            out_dir=tmp_path,
            num_samples=3,
            batch_size=2,
            sampling={"steps": 3},
            metrics=(),
            device="cpu",
        )
    )
    assert record["sampling"]["sampler"] == "edm-heun" and record["sampling"]["guidance_scale"] == 1.0
    images = _images(tmp_path)
    assert images.shape == (3, 16, 16, 3) and images.std() > 1
    np.testing.assert_array_equal(SampleStore.open(tmp_path / STORE_NAME, mode="r").read_labels(), [-1, -1, -1])


def test_only_official_weights_with_standard_layers_are_reported_as_metrics(inception_weights):
    """The labelling rule, on hand-made results: official hash + standard layers -> "metrics", else plumbing-only."""
    values = {"frechet_inception_distance": 3.5, "inception_score_mean": 200.0, "inception_score_std": 2.0}
    cases = [
        ("6726825d" + "0" * 56, {"fid": "2048", "is": "logits_unbiased"}, True),
        ("6726825d" + "0" * 56, {"fid": "64", "is": "logits_unbiased"}, False),
        ("0" * 64, {"fid": "2048", "is": "logits_unbiased"}, False),
    ]
    for sha256, layers, reportable in cases:
        config = incep.FeatureConfig(weights=incep.InceptionWeights(Path(inception_weights), sha256))
        checks = SimpleNamespace(feature_config=config, reference=None, metrics=("fid", "is"))
        record = {
            "num_samples": 10,
            "num_processes": 1,
            "sampling": {"sampler": "ddpm", "steps": 250, "guidance_scale": 4.6, "guidance_schedule": "power-cosine"},
        }
        ev.fill_metrics(record, {"values": values, "feature_layers": layers, "reference_cache": {}}, checks)
        assert record["reportable"] is reportable
        if reportable:
            assert record["metrics"] == {"fid": 3.5, "is_mean": 200.0, "is_std": 2.0}
            assert "plumbing_only_metrics" not in record and "PLUMBING" not in ev.format_summary(record)
        else:
            assert record["metrics"] == {} and record["plumbing_only_metrics"]["fid"] == 3.5
            assert "PLUMBING-ONLY, NOT REPORTABLE" in ev.format_summary(record)


# ----------------------------------------------------------------------------------------------------------------
# Errors before sampling


def test_missing_inception_weights_stop_before_sampling(latent_model, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.raises(incep.MissingInceptionWeightsError, match="--inception-weights"):
        ev.run_evaluate(_options(latent_model, tmp_path / "out", reference, None))
    assert not (tmp_path / "out" / STORE_NAME).exists()

    # Through the CLI: one clear line and exit code 2, no traceback.
    from cli.main import app

    options = _options(latent_model, tmp_path / "cli-out", reference, None)
    arguments = [a for a in _cli_arguments(options) if a != "None"]
    arguments.remove("--inception-weights")
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2
    assert incep.INCEPTION_WEIGHTS_FILENAME in result.output and "--inception-weights" in result.output
    assert not (tmp_path / "cli-out" / STORE_NAME).exists()


def test_damaged_sample_store_is_one_error_line(latent_model, tmp_path):
    from cli.main import app

    (tmp_path / "out" / STORE_NAME).mkdir(parents=True)
    (tmp_path / "out" / STORE_NAME / "zarr.json").write_text("{not json")
    options = _options(latent_model, tmp_path / "out", metrics=())
    arguments = [a for a in _cli_arguments(options) if a != "None"]
    arguments.remove("--reference")
    arguments.remove("--inception-weights")
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2, result.output
    assert f"error: {tmp_path / 'out' / STORE_NAME}: damaged sample store" in result.output


def test_wrong_reference_resolution_stops_before_sampling(latent_model, inception_weights, tmp_path):
    reference = write_npz_reference(tmp_path / "ref32.npz", smooth_images(4, size=32))
    with pytest.raises(ds.ReferenceInputError, match="wrong reference resolution"):
        ev.run_evaluate(_options(latent_model, tmp_path / "out", reference, inception_weights))
    assert not (tmp_path / "out" / STORE_NAME).exists()


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_model_vae_mismatch_and_offline_hub_vae_stop_before_sampling(tmp_path):
    vae8 = make_tiny_vae(tmp_path / "vae8", latent_channels=8)
    mismatched = make_latent_model_dir(tmp_path / "mismatched", vae8)
    with pytest.raises(opts.EvaluateInputError, match="model/VAE mismatch"):
        ev.run_evaluate(_options(mismatched, tmp_path / "out", metrics=()))
    hub = make_latent_model_dir(
        tmp_path / "hub", None, vae_entry={"id": "stabilityai/sd-vae-ft-ema", "scaling_factor": 0.18215}
    )
    with pytest.raises(opts.EvaluateInputError, match="--vae PATH"):
        ev.run_evaluate(_options(hub, tmp_path / "out", metrics=()))
    gone = str(tmp_path / "no-such-vae")
    missing_path = make_latent_model_dir(
        tmp_path / "gone", None, vae_entry={"id": gone, "path": gone, "scaling_factor": 0.18215}
    )
    with pytest.raises(opts.EvaluateInputError, match="no-such-vae"):
        ev.run_evaluate(_options(missing_path, tmp_path / "out", metrics=()))
    assert not (tmp_path / "out" / STORE_NAME).exists()


def test_vae_files_differing_from_training_are_refused_unless_chosen(tiny_vae, tmp_path):
    from pipeline.core.vae import resolve_vae

    vae = tiny_vae
    entry = {**resolve_vae(str(vae)).manifest_entry("fp32"), "path_hash": "0" * 64}  # latents encoded elsewhere
    model = make_latent_model_dir(tmp_path / "model", None, vae_entry=entry)
    with pytest.raises(opts.EvaluateInputError, match="not the VAE the training latents were encoded with"):
        ev.run_evaluate(_options(model, tmp_path / "out", metrics=()))
    assert not (tmp_path / "out" / STORE_NAME).exists()
    chosen = loading.load_model(model, vae_override=vae)  # --vae: decoding with another VAE on purpose
    assert chosen.identity["vae"]["differs_from_training_vae"] is True
    assert chosen.resolution == (16, 16)


# ----------------------------------------------------------------------------------------------------------------
# Sampling settings


def _stand_in(family="latent", kind="adm", resolution=256, num_classes=1000) -> loading.LoadedModel:
    network = SimpleNamespace(num_classes=num_classes)
    return loading.LoadedModel(
        model_dir=Path("stand-in"),
        model=network,
        config={"diffusion": {"type": kind}},
        kind=kind,
        family=family,
        sample_shape=(4, resolution // 8, resolution // 8),
        resolution=(resolution, resolution),
    )


def resolved(loaded, **settings) -> dict:
    """The settings `resolve_sampling` chose, by name, with the defaults it used."""
    config, defaults_used = sampling_settings.resolve_sampling(loaded, settings, settings.pop("classes", None))
    return {**config.settings(), "defaults_used": defaults_used}


def test_paper_defaults_per_model_kind():
    in256 = resolved(_stand_in(resolution=256))
    names = ("sampler", "steps", "guidance_scale", "guidance_schedule", "guidance_channels")
    assert tuple(in256[name] for name in names) == ("ddpm", 250, 4.6, "power-cosine", 3)
    in512 = resolved(_stand_in(resolution=512))
    assert tuple(in512[name] for name in names[:4]) == ("ddpm", 250, 1.49, "constant")
    cifar = resolved(_stand_in("image", "edm", 32, 0))
    ffhq = resolved(_stand_in("image", "edm", 64, 0))
    assert (cifar["sampler"], cifar["steps"], cifar["guidance_scale"]) == ("edm-heun", 18, 1.0)
    assert (ffhq["sampler"], ffhq["steps"], ffhq["guidance_scale"]) == ("edm-heun", 40, 1.0)
    explicit = resolved(
        _stand_in(),
        sampler="ddim",
        steps=50,
        guidance_scale=1.5,
        guidance_schedule="constant",
        guidance_channels="all",
    )
    assert (explicit["sampler"], explicit["steps"], explicit["guidance_channels"], explicit["defaults_used"]) == (
        "ddim",
        50,
        None,
        [],
    )

    with pytest.raises(opts.EvaluateInputError, match="unconditional"):
        resolved(_stand_in("image", "edm", 32, 0), guidance_scale=2.0)
    with pytest.raises(opts.EvaluateInputError, match="edm-heun"):
        resolved(_stand_in("image", "edm", 32, 0), sampler="ddpm")
    with pytest.raises(opts.EvaluateInputError, match="classes"):
        resolved(_stand_in(), classes=[3, 1000])


def test_power_cosine_schedule_end_points_and_midpoint():
    from diffit.guidance import guidance_scale, guidance_scale_at_timestep

    config = sampling_settings.resolve_sampling(_stand_in(resolution=256), {})[0].guidance
    assert guidance_scale(config, 0.0) == pytest.approx(1.0)  # start of sampling: no guidance
    assert guidance_scale(config, 1.0) == pytest.approx(4.6)  # end of sampling: full scale
    # p^4 = 1/2 puts the cosine at pi/2: halfway between 1 and 4.6.
    assert guidance_scale(config, 0.5**0.25) == pytest.approx(2.8)
    assert guidance_scale_at_timestep(config, 1000.0) == pytest.approx(1.0)
    assert guidance_scale_at_timestep(config, 0.0) == pytest.approx(4.6)


class _StandInEps(torch.nn.Module):
    """Outputs fixed per-channel values: `cond` for real labels, `uncond` for the null class (8 = 4 eps + 4 Sigma)."""

    num_classes = 10
    null_class = 10

    def __init__(self):
        super().__init__()
        self.cond = torch.tensor([2.0, 4.0, 6.0, 8.0, 11.0, 21.0, 31.0, 41.0])
        self.uncond = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0])

    def forward(self, x, noise_labels, class_labels):
        values = torch.where((class_labels == self.null_class)[:, None], self.uncond, self.cond)
        return values[:, :, None, None].expand(x.shape[0], 8, *x.shape[2:])


def test_guidance_channels_three_guides_only_the_first_three_latent_channels():
    from diffit.guidance import ClassifierFreeGuidance

    network = _StandInEps()
    x, t, y = torch.zeros(2, 4, 2, 2), torch.full((2,), 500.0), torch.tensor([1, 7])
    for channels, expected in (
        ("3", [5.6, 11.2, 16.8, 8.0, 11.0, 21.0, 31.0, 41.0]),
        ("all", [5.6, 11.2, 16.8, 22.4, 11.0, 21.0, 31.0, 41.0]),
    ):
        sampling, _ = sampling_settings.resolve_sampling(
            _stand_in(resolution=512, num_classes=10),
            {"guidance_scale": 4.6, "guidance_schedule": "constant", "guidance_channels": channels},
        )
        guided = ClassifierFreeGuidance(network, sampling.guidance, network.null_class, lambda n: n)(x, t, y)
        # uncond + 4.6 (cond - uncond) on the guided eps channels; the conditional output elsewhere.
        torch.testing.assert_close(guided[:, :, 0, 0], torch.tensor([expected, expected]))


def test_generate_passes_the_resolved_guidance_to_the_sampler(monkeypatch):
    import diffit.sampling

    captured = {}

    def fake_sample_with_stats(model, shape, class_labels, seeds, config, **kwargs):
        captured.update(kwargs, config=config, class_labels=class_labels, seeds=seeds)
        return torch.zeros(len(seeds), *shape), diffit.sampling.SamplingStats(len(seeds), 1, 0.0, 0.0)

    monkeypatch.setattr(diffit.sampling, "sample_with_stats", fake_sample_with_stats)
    loaded = _stand_in("image", "adm", 16, 10)
    loaded.sample_shape, loaded.config = (3, 16, 16), {"diffusion": {"type": "adm"}}
    sampling, _ = sampling_settings.resolve_sampling(
        loaded, {"guidance_scale": 3.0, "guidance_channels": "3", "steps": 7}
    )
    images, _ = generation.generate(
        loaded, sampling, 0, np.arange(5, 8), np.array([1, 2, 3]), batch_size=8, device="cpu"
    )
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    config = captured["config"]
    assert config.guidance.scale == 3.0 and config.guidance.channels == 3
    assert config.steps == 7 and config.sampler == "ddpm" and config.kind == "adm"
    assert captured["device"] == "cpu"
    assert list(captured["class_labels"]) == [1, 2, 3]
    from pipeline.evaluate.sample_seeds import sample_noise_seeds

    assert captured["seeds"] == sample_noise_seeds(0, [5, 6, 7])


def test_uint8_conversion_rounds_and_clamps():
    images = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).reshape(1, 1, 1, 6).expand(1, 3, 1, 6)
    pixels = generation.to_uint8_images(images)
    assert pixels.shape == (1, 1, 6, 3)
    np.testing.assert_array_equal(pixels[0, 0, :, 0], [0, 0, 128, 255, 255, 255])


def test_pixel_quantization_formulas_on_hand_computed_values():
    """round = floor(127.5 x + 128) (DiT / EDM), truncate = floor(127.5 x + 127.5) (ADM / NVlabs sample.py)."""
    x = torch.tensor([-1.0, -0.99, 0.0, 0.5, 0.996, 1.0])
    # 127.5 x + 128 = 0.5, 1.775, 128, 191.75, 254.99, 255.5;  127.5 x + 127.5 = 0, 1.275, 127.5, 191.25, 254.49, 255
    assert to_uint8(x, "round").tolist() == [0, 1, 128, 191, 254, 255]
    assert to_uint8(x, "truncate").tolist() == [0, 1, 127, 191, 254, 255]
    with pytest.raises(ValueError, match="unknown pixel quantization 'nearest'"):
        to_uint8(x, "nearest")


def test_pixels_setting_is_applied_recorded_and_exported(baseline, tmp_path):
    """--pixels truncate: the same decoded samples, one grey level darker wherever frac(127.5 x + 127.5) >= 0.5;
    recorded in metrics.json, the store settings and the npz; a store of the other setting is refused."""
    model = baseline.options.model_dir
    out = tmp_path / "truncate"
    record = ev.run_evaluate(_options(model, out, metrics=(), export_npz=True, sampling={"pixels": "truncate"}))
    truncated = _images(out)
    difference = baseline.images.astype(int) - truncated.astype(int)
    assert set(np.unique(difference)) == {0, 1} and difference.mean() > 0.2
    assert record["sampling"]["pixels"] == "truncate"
    assert SampleStore.open(out / STORE_NAME, mode="r").settings["sampling"]["pixels"] == "truncate"
    with np.load(out / "samples.npz") as data:
        assert str(data["pixel_quantization"]) == "truncate"
        np.testing.assert_array_equal(data["arr_0"], truncated)
    with pytest.raises(SampleStoreMismatchError):
        ev.run_evaluate(_options(model, out, metrics=()))  # round into the truncate store


# ----------------------------------------------------------------------------------------------------------------
# The `sample` command


def test_sample_command_writes_a_grid(latent_model, tmp_path):
    from PIL import Image

    from cli.main import app

    out = tmp_path / "grid.png"
    result = CliRunner().invoke(
        app,
        [
            "sample",
            "--model",
            str(latent_model),
            "--grid",
            str(out),
            "--classes",
            "1,2,3",
            "--per-class",
            "2",
            "--steps",
            "3",
            "--guidance-scale",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    with Image.open(out) as grid:
        assert grid.size == (2 * 16, 3 * 16)
        pixels = np.asarray(grid)
    assert pixels.std() > 1
    bad = CliRunner().invoke(app, ["sample", "--model", str(latent_model), "--grid", str(out), "--classes", "x"])
    assert bad.exit_code == 2 and "--classes" in bad.output


# ----------------------------------------------------------------------------------------------------------------
# Network precision (--precision) and compilation (--compile)


def test_precision_auto_is_bf16_on_cuda_only_and_unknown_values_are_refused():
    assert loading.resolve_precision("auto", "cpu") == "fp32"
    assert loading.resolve_precision("auto", "cuda") == "bf16"
    assert loading.resolve_precision("bf16", "cpu") == "bf16" and loading.resolve_precision("fp32", "cuda") == "fp32"
    with pytest.raises(opts.EvaluateInputError, match="--precision fp16"):
        loading.resolve_precision("fp16", "cpu")


def test_bf16_network_runs_under_autocast_and_returns_float32(latent_model):
    loaded = loading.load_model(latent_model, device="cpu")
    loading.prepare_network(loaded, "fp32", False, "cpu")
    assert loaded.network is None and loaded.sampling_network is loaded.model  # the default path is untouched
    loading.prepare_network(loaded, "bf16", False, "cpu")
    network = loaded.sampling_network
    for name in ("num_classes", "null_class", "learn_sigma", "in_channels"):
        assert getattr(network, name) == getattr(loaded.model, name)
    seen = []
    hook = loaded.model.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    x = torch.randn(2, *loaded.sample_shape)
    t, y = torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        output = network(x, t, y)
        reference = loaded.model(x, t, y)
    hook.remove()
    assert seen[0] == torch.bfloat16 and seen[1] == torch.float32  # bf16 inside the wrapper only
    assert output.dtype == torch.float32
    difference = (output - reference).abs().max().item()
    assert 0 < difference < 0.1 * reference.abs().max().item()


def test_bf16_samples_are_close_to_fp32_and_recorded(baseline, tmp_path):
    fp32 = ev.run_evaluate(_options(baseline.options.model_dir, tmp_path / "fp32", metrics=(), precision="fp32"))
    np.testing.assert_array_equal(_images(tmp_path / "fp32"), baseline.images)
    fp32_store = SampleStore.open(tmp_path / "fp32" / STORE_NAME, mode="r")
    # The default (fp32, eager) stores exactly the settings stores made before --precision existed.
    assert fp32_store.settings == SampleStore.open(baseline.out / STORE_NAME, mode="r").settings
    assert "network" not in fp32_store.settings
    assert fp32["network"] == {"precision": "fp32", "compile": False, "requested_precision": "fp32"}
    assert baseline.record["network"] == {"precision": "fp32", "compile": False, "requested_precision": "auto"}

    out = tmp_path / "bf16"
    ev.run_evaluate(_options(baseline.options.model_dir, out, metrics=(), precision="bf16"))
    images = _images(out)
    difference = np.abs(images.astype(np.int16) - baseline.images.astype(np.int16))
    assert difference.max() > 0  # bf16 forwards are not the fp32 ones...
    assert difference.mean() < 0.5 and difference.max() <= 4  # ...but the samples stay close (measured: 0.04, 1)
    record = json.loads((out / ev.METRICS_FILE).read_text())
    assert record["network"] == {"precision": "bf16", "compile": False, "requested_precision": "bf16"}
    stored = SampleStore.open(out / STORE_NAME, mode="r").settings
    assert stored["network"] == {"precision": "bf16", "compile": False}
    with pytest.raises(SampleStoreMismatchError, match="network"):
        ev.run_evaluate(_options(baseline.options.model_dir, out, metrics=(), precision="fp32"))


def test_sample_command_takes_precision(latent_model, tmp_path):
    from cli.main import app

    arguments = ["sample", "--model", str(latent_model), "--classes", "1,2", "--per-class", "1", "--steps", "2"]
    arguments += ["--device", "cpu", "--precision"]
    result = CliRunner().invoke(app, [*arguments, "bf16", "--grid", str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grid.png").is_file()
    bad = CliRunner().invoke(app, [*arguments, "fp16", "--grid", str(tmp_path / "bad.png")])
    assert bad.exit_code == 2 and "--precision" in bad.output


@pytest.mark.slow
def test_compiled_network_samples_like_the_eager_one_and_is_recorded(latent_model):
    loaded = loading.load_model(latent_model, device="cpu")
    sampling, _ = sampling_settings.resolve_sampling(loaded, {"steps": 3, "guidance_scale": 2.0})
    indices, labels = np.arange(4), np.array([0, 1, 2, 3])
    loading.prepare_network(loaded, "fp32", False, "cpu")
    eager, _ = generation.generate(loaded, sampling, 0, indices, labels, 4, "cpu")
    loading.prepare_network(loaded, "fp32", True, "cpu")  # torch.compile (inductor, CPU here)
    compiled, _ = generation.generate(loaded, sampling, 0, indices, labels, 4, "cpu")
    assert np.abs(compiled.astype(np.int16) - eager.astype(np.int16)).max() <= 1
    settings = sampling_settings.store_settings(loaded, sampling_settings.sampling_record(sampling, None, 0), 4)
    assert settings["network"] == {"precision": "fp32", "compile": True}


def test_the_old_guidance_flags_still_work_for_one_release_with_a_warning(latent_model, tmp_path):
    """`--cfg-scale` / `--cfg-schedule` / `--cfg-channels` (before diffusers' `guidance_*` names) give the same
    grid as the new flags, with a deprecation warning; both names at once are refused."""
    from cli.main import app

    common = ["sample", "--model", str(latent_model), "--classes", "1,2", "--per-class", "1", "--steps", "2"]
    common += ["--device", "cpu"]
    new = ["--guidance-scale", "2.5", "--guidance-schedule", "constant", "--guidance-channels", "all"]
    old = ["--cfg-scale", "2.5", "--cfg-schedule", "constant", "--cfg-channels", "all"]
    runner = CliRunner()
    first = runner.invoke(app, [*common, "--grid", str(tmp_path / "new.png"), *new])
    second = runner.invoke(app, [*common, "--grid", str(tmp_path / "old.png"), *old])
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert (tmp_path / "new.png").read_bytes() == (tmp_path / "old.png").read_bytes()
    assert "warning: --cfg-scale is deprecated, use --guidance-scale" in second.output
    assert "warning: --cfg-channels is deprecated, use --guidance-channels" in second.output
    assert "deprecated" not in first.output
    both = runner.invoke(app, [*common, "--grid", str(tmp_path / "x.png"), "--guidance-scale", "2", "--cfg-scale", "3"])
    assert both.exit_code == 2 and "--cfg-scale is the old name of --guidance-scale" in both.output


def test_a_guidance_interval_is_applied_recorded_and_resumes_only_its_own_store(latent_model, tmp_path):
    """--guidance-interval: an interval holding every step's sigma gives the guided samples exactly, one holding
    none the unguided ones exactly, one in between neither; the interval is recorded in metrics.json and the store
    settings (a store of another interval is refused); a store made without one records nothing new."""
    from cli.main import app

    def run(name: str, scale: float, interval=None) -> np.ndarray:
        sampling = {"guidance_scale": scale, "guidance_schedule": "constant", "guidance_interval": interval}
        ev.run_evaluate(_options(latent_model, tmp_path / name, metrics=(), sampling=sampling))
        return _images(tmp_path / name)

    guided, unguided = run("guided", 4.0), run("unguided", 1.0)
    assert not np.array_equal(guided, unguided)
    np.testing.assert_array_equal(run("all", 4.0, (0.0, 1e6)), guided)  # every sigma of the chain is in (0, 1e6]
    np.testing.assert_array_equal(run("none", 4.0, (0.0, 1e-6)), unguided)  # sigma_0 of the chain is ~0.01
    middle = run("middle", 4.0, (1.0, 10.0))  # the steps at t = 666 and 333 (sigma 9.49, 1.46) of 4
    assert not np.array_equal(middle, guided) and not np.array_equal(middle, unguided)
    record = json.loads((tmp_path / "middle" / "metrics.json").read_text())
    assert record["sampling"]["guidance_interval"] == [1.0, 10.0]
    store = SampleStore.open(tmp_path / "middle" / STORE_NAME, mode="r")
    assert store.settings["sampling"]["guidance_interval"] == [1.0, 10.0]
    assert "guidance_interval" not in SampleStore.open(tmp_path / "guided" / STORE_NAME, mode="r").settings["sampling"]
    with pytest.raises(SampleStoreMismatchError):
        run("middle", 4.0, (1.0, 12.0))
    arguments = ["evaluate", "--model", str(latent_model), "--out", str(tmp_path / "cli"), "--metrics", ""]
    bad = CliRunner().invoke(app, [*arguments, "--guidance-interval", "5,0.5"])
    assert bad.exit_code == 2 and "guidance_interval: expected LOW <= HIGH, got (5.0, 0.5)" in bad.output
    bad = CliRunner().invoke(app, [*arguments, "--guidance-interval", "0.5"])
    assert bad.exit_code == 2 and "expected LOW,HIGH" in bad.output


def test_autoguidance_with_the_model_as_its_own_guide_gives_the_unguided_samples_and_is_recorded(
    latent_model, image_model, tmp_path
):
    """--guide-model: D = D_guide + w (D - D_guide); with the model itself as guide that is D, so the samples are
    the unguided ones exactly; the guide is recorded in metrics.json and the store; a guide of another kind or
    shape is refused before sampling."""

    def run(name: str, scale: float, guide=None) -> np.ndarray:
        sampling = {"guidance_scale": scale, "guidance_schedule": "constant"}
        ev.run_evaluate(_options(latent_model, tmp_path / name, metrics=(), sampling=sampling, guide_model=guide))
        return _images(tmp_path / name)

    unguided, self_guided = run("unguided", 1.0), run("self", 4.0, latent_model)
    np.testing.assert_array_equal(self_guided, unguided)
    assert not np.array_equal(run("cfg", 4.0), unguided)
    record = json.loads((tmp_path / "self" / "metrics.json").read_text())
    assert record["guide_model"]["weights_sha256"] == record["model"]["weights_sha256"]
    store = SampleStore.open(tmp_path / "self" / STORE_NAME, mode="r")
    assert store.settings["guide_model"]["weights_sha256"] == record["model"]["weights_sha256"]
    assert "guide_model" not in SampleStore.open(tmp_path / "cfg" / STORE_NAME, mode="r").settings
    with pytest.raises(opts.EvaluateInputError, match=r"--guide-model .*: a edm model of samples \(3, 16, 16\)"):
        run("other", 4.0, image_model)
    assert not (tmp_path / "other" / STORE_NAME).exists()
