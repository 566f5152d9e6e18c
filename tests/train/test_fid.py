"""FID and FD_DINOv2 during training (`eval.every`, `eval.metrics`): logged at the right steps, equal to what
`diffit-pipe evaluate` computes on the exported EMA with the same seeds / reference / feature layer / DINOv2 weights,
and without shifting the training RNG."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipeline.train import TrainOptions, export_checkpoint, run_train
from pipeline.train.config import ConfigError, config_from_dict
from pipeline.train.fid import fid_key, index_share, metric_key
from tests.support.eval_fixtures import smooth_images, write_npz_reference
from tests.support.train_fixtures import read_metrics, tiny_image_config, write_config, write_image_dataset

NUM_SAMPLES = 6
KEY = "plumbing_only_fid_0.006k"  # random Inception weights: never under a `fid_*` key
DINOV2_KEY = "plumbing_only_fd_dinov2_0.006k"  # random DINOv2 weights: never under a `fd_dinov2_*` key


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(eval_section: dict | None) -> dict:
    config = tiny_image_config(
        model={"input_size": 8},
        train={"max_steps": 4, "global_batch_size": 4},
        checkpoint={"every": 2, "keep": 2},
        sample={"every": 0, "sampler": "edm-heun", "steps": 2},
    )
    if eval_section is not None:
        config["eval"] = eval_section
    return config


def _train(tmp_path: Path, name: str, config: dict, data: Path) -> Path:
    run_dir = tmp_path / name
    run_train(TrainOptions(run_dir=run_dir, config_path=write_config(tmp_path / f"{name}.yaml", config), data_dir=data))
    return run_dir


def test_fid_and_fd_dinov2_during_training_match_the_evaluate_stage(tmp_path, inception_weights):
    from pipeline.evaluate import PLUMBING_ONLY_LABEL, EvaluateOptions, run_evaluate
    from tests.support.encoder_fixtures import save_official, tiny_timm_dinov2

    data = write_image_dataset(tmp_path / "data", num_samples=4, num_shards=1, resolution=8)
    reference = write_npz_reference(tmp_path / "ref.npz", smooth_images(5, size=8))
    dinov2 = save_official(tiny_timm_dinov2(embed_dim=16, depth=1, grid=4, seed=7), tmp_path / "tiny-dinov2.pth")
    eval_section = {
        "every": 2,
        "num_samples": NUM_SAMPLES,
        "metrics": ["fid", "fd_dinov2"],
        "reference": str(reference),
        "dinov2_weights": str(dinov2),
        "inception_weights": str(inception_weights),
        "feature_layer": "64",
        "batch_size": 4,  # two sampler calls, the second one short
        "feature_batch_size": 4,
        "seed": 3,
    }
    with_fid = _train(tmp_path, "with", _config(eval_section), data)
    without = _train(tmp_path, "without", _config(None), data)

    records = read_metrics(with_fid)
    fid_records = [r for r in records if KEY in r]
    assert [r["step"] for r in fid_records] == [2, 4]
    assert all(math.isfinite(r[KEY]) and r[KEY] > 0 for r in fid_records)
    assert all(r["fid_note"] == PLUMBING_ONLY_LABEL for r in fid_records)
    assert not any(
        k.startswith(("fid_", "fd_dinov2_")) and not isinstance(v, str) for r in records for k, v in r.items()
    )
    # FD_DINOv2 from the same samples, in the same records, labelled as the tiny random weights' plumbing.
    assert [r["step"] for r in records if DINOV2_KEY in r] == [2, 4]
    assert all(r["fd_dinov2_note"].startswith("plumbing-only (DINOv2 weights tiny-dinov2.pth") for r in fid_records)
    # The EMA changed between the evaluations, so did its FID and FD_DINOv2.
    assert fid_records[0][KEY] != fid_records[1][KEY]
    assert fid_records[0][DINOV2_KEY] != fid_records[1][DINOV2_KEY]

    # The training RNG is not shifted: the losses with and without the evaluations are identical.
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses == [r["loss"] for r in read_metrics(without)] and len(losses) == 4

    # `diffit-pipe evaluate` on the exported step-4 EMA: same seeds, sampler, reference and feature layer.
    model_dir = export_checkpoint(with_fid, tmp_path / "exported")
    options = EvaluateOptions(
        model_dir=model_dir,
        out_dir=tmp_path / "evaluation",
        num_samples=NUM_SAMPLES,
        batch_size=NUM_SAMPLES,
        sampling={"sampler": "edm-heun", "steps": 2},
        seed=3,
        reference=reference,
        inception_weights=inception_weights,
        metrics=("fid", "fd_dinov2"),
        dinov2_weights=dinov2,
        feature_layer="64",
        feature_batch_size=NUM_SAMPLES,
        feature_workers=0,
        device="cpu",
    )
    record = run_evaluate(options)
    assert record["plumbing_only_metrics"]["fid"] == pytest.approx(fid_records[1][KEY], rel=1e-6)
    assert record["plumbing_only_metrics"]["fd_dinov2"] == pytest.approx(fid_records[1][DINOV2_KEY], rel=1e-6)


def test_fid_keys_and_index_shares():
    assert fid_key(5000, official=True) == "fid_5k"
    assert fid_key(50_000, official=True) == "fid_50k"
    assert fid_key(50, official=True) == "fid_0.05k"
    assert fid_key(5000, official=False) == "plumbing_only_fid_5k"
    assert metric_key("fd_dinov2", 5000, official=True) == "fd_dinov2_5k"
    assert metric_key("fd_dinov2", 50, official=False) == "plumbing_only_fd_dinov2_0.05k"
    # Contiguous shares covering 0..N-1 exactly once, in rank order, for any number of processes.
    for count, world in ((10, 3), (2, 4), (7, 1)):
        shares = [index_share(count, rank, world) for rank in range(world)]
        assert [i for share in shares for i in share] == list(range(count))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_eval_settings_are_checked():
    base = _config(None)
    with pytest.raises(ConfigError, match="eval.reference: FID during training"):
        config_from_dict({**base, "eval": {"every": 2}})
    with pytest.raises(ConfigError, match="eval.num_samples must be >= 2"):
        config_from_dict({**base, "eval": {"every": 2, "num_samples": 1, "reference": "r.npz"}})
    with pytest.raises(ConfigError, match="eval.sampler 'ddim' does not fit diffusion.type 'edm'"):
        config_from_dict({**base, "eval": {"every": 2, "reference": "r.npz", "sampler": "ddim"}})
    with pytest.raises(ConfigError, match="eval.metrics must be a non-empty list of distinct names"):
        config_from_dict({**base, "eval": {"every": 2, "reference": "r.npz", "metrics": ["fid", "is"]}})
    with pytest.raises(ConfigError, match="eval.dinov2_weights: fd_dinov2 during training needs"):
        config_from_dict({**base, "eval": {"every": 2, "reference": "r.npz", "metrics": ["fd_dinov2"]}})
    assert config_from_dict(base).eval.every == 0


def test_a_reference_that_cannot_serve_a_metric_is_refused_before_the_first_step(tmp_path):
    """FD_DINOv2 against a statistics file holding FID's mu / sigma only, or a reference of another resolution:
    refused when the evaluator is built, as `diffit-pipe evaluate` refuses it, not at the first evaluation after
    `eval.every` steps of training (which died there, before that step's checkpoint)."""
    import numpy as np

    from pipeline.train.checks import TrainError
    from tests.support.encoder_fixtures import save_official, tiny_timm_dinov2

    data = write_image_dataset(tmp_path / "data", num_samples=4, num_shards=1, resolution=8)
    dinov2 = save_official(tiny_timm_dinov2(embed_dim=16, depth=1, grid=4, seed=7), tmp_path / "tiny-dinov2.pth")
    statistics = tmp_path / "fid-stats.npz"
    np.savez(statistics, mu=np.zeros(64), sigma=np.eye(64))
    eval_section = {"every": 2, "num_samples": 4, "metrics": ["fd_dinov2"], "dinov2_weights": str(dinov2)}
    with pytest.raises(TrainError, match=r"eval.reference: .*fid-stats.npz: no mu_dinov2/sigma_dinov2 statistics"):
        _train(tmp_path, "stats", _config({**eval_section, "reference": str(statistics)}), data)
    assert not [r for r in read_metrics(tmp_path / "stats") if "loss" in r]  # no step was trained

    wrong_size = write_npz_reference(tmp_path / "ref16.npz", smooth_images(4, size=16))
    with pytest.raises(TrainError, match=r"reference images are 16x16, the model generates 8x8"):
        _train(tmp_path, "size", _config({**eval_section, "reference": str(wrong_size)}), data)


@pytest.mark.slow
def test_two_processes_gather_the_features_of_every_sample(tmp_path, inception_weights):
    # Two gloo processes with uneven shares (3 + 2 samples), a latent model decoded through the dataset's VAE:
    # the logged FID is the one-process evaluate stage's on the exported EMA.
    import sys

    from pipeline.evaluate import EvaluateOptions, run_evaluate
    from tests.support.encode_fixtures import save_tiny_vae
    from tests.support.train_fixtures import run_train_subprocess, tiny_latent_config, write_latent_dataset

    vae = save_tiny_vae(tmp_path / "vae")
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=2, vae_path=str(vae))
    reference = write_npz_reference(tmp_path / "ref.npz", smooth_images(5, size=64))
    eval_section = {
        "every": 2,
        "num_samples": 5,
        "reference": str(reference),
        "inception_weights": str(inception_weights),
        "feature_layer": "64",
        "batch_size": 2,
        "steps": 2,
        "seed": 7,
    }
    config = tiny_latent_config(
        train={"max_steps": 2, "global_batch_size": 4, "per_device_batch_size": 2},
        checkpoint={"every": 2},
    )
    config["eval"] = eval_section
    run_dir = tmp_path / "run"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "cli.main", "train"]
    command += ["--config", str(write_config(tmp_path / "c.yaml", config)), "--data", str(data)]
    result = run_train_subprocess(command + ["--run-dir", str(run_dir)], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [r for r in read_metrics(run_dir) if "plumbing_only_fid_0.005k" in r]
    assert [r["step"] for r in logged] == [2]

    options = EvaluateOptions(
        model_dir=export_checkpoint(run_dir, tmp_path / "exported"),
        out_dir=tmp_path / "evaluation",
        num_samples=5,
        batch_size=5,
        sampling={"sampler": "ddim", "steps": 2, "guidance_scale": 1.0, "guidance_schedule": "constant"},
        seed=7,
        reference=reference,
        inception_weights=inception_weights,
        metrics=("fid",),
        feature_layer="64",
        feature_workers=0,
        vae=vae,  # the fixture dataset records a placeholder VAE hash
        device="cpu",
    )
    record = run_evaluate(options)
    assert record["plumbing_only_metrics"]["fid"] == pytest.approx(logged[0]["plumbing_only_fid_0.005k"], rel=1e-6)
