"""Fitting a small AutoencoderKL: the loss falls, the output loads with diffusers, the scaling factor is 1/std of
the latent means, finished fits are reused, and a killed fit resumes to exactly the uninterrupted result."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from pipeline.demo.labelled_images import load_labelled_images
from pipeline.demo.procedural import generate_dataset
from pipeline.demo.vae_fit import fit_vae
from pipeline.demo.vae_fit_config import VAEFitConfig, VAEFitError
from pipeline.demo.vae_fit_math import batch_indices, psnr_uint8, reconstruction_grid
from pipeline.demo.vae_fit_output import GRID_NAME, REPORT_NAME

# A VAE small enough for a test: 16 px images, two stages (/2 -> 8x8x4 latents), 8 channels per group.
TINY = dict(resolution=16, block_out_channels=(8, 16), batch_size=4, lr=3e-3, warmup_steps=2, eval_images=6)


def tiny(steps: int, **fields) -> VAEFitConfig:
    """The tiny VAE's config with `steps` and any other field changed."""
    return VAEFitConfig(**{**TINY, "steps": steps, **fields})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, num_classes=3, per_class=4, resolution=16, seed=0, holdout_per_class=2, progress=False)
    return root


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(path / "diffusion_pytorch_model.safetensors"))


def test_fit_reduces_loss_and_saves_a_loadable_vae(dataset, tmp_path):
    from diffusers import AutoencoderKL

    recon = []
    out = tmp_path / "vae"
    report = fit_vae(
        dataset / "train",
        out,
        tiny(40),
        holdout=dataset / "holdout",
        on_step=lambda step, losses: recon.append(losses["recon"]),
        progress=False,
    )
    assert report["steps"] == 40 and report["stopped_by"] == "steps" and not report["skipped"]
    assert np.mean(recon[-5:]) < 0.7 * np.mean(recon[:5])
    assert (out / GRID_NAME).is_file()
    stored = json.loads((out / REPORT_NAME).read_text())
    assert stored["holdout_images"] == 6 and stored["train_images"] == 12
    assert stored["latent_shape"] == [4, 8, 8]

    vae = AutoencoderKL.from_pretrained(out, local_files_only=True).eval()
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert vae.config.block_out_channels == [8, 16] and vae.config.sample_size == 16
    train = load_labelled_images(dataset / "train", 16)
    images = torch.from_numpy(train.images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        means = vae.encode(images).latent_dist.mean
        decoded = vae.decode(means).sample
    assert means.shape == (12, 4, 8, 8) and decoded.shape == (12, 3, 16, 16)
    # scaling factor = 1 / std of the posterior means of the training images (all 12 here).
    assert report["scaling_factor"] == pytest.approx(1.0 / float(means.flatten().std()), rel=1e-4)

    # The held-out PSNR in the report is the one of decode(mode(encode(x))) on the holdout images.
    held = load_labelled_images(dataset / "holdout", 16)
    with torch.no_grad():
        held_images = torch.from_numpy(held.images).permute(0, 3, 1, 2).float() / 127.5 - 1
        out_images = vae.decode(vae.encode(held_images).latent_dist.mode()).sample
    reconstructed = ((out_images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert report["holdout_psnr"] == pytest.approx(float(psnr_uint8(held.images, reconstructed).mean()), abs=1e-3)


def test_finished_fit_is_reused_and_other_settings_are_refused(dataset, tmp_path, caplog):
    out = tmp_path / "vae"
    first = fit_vae(dataset, out, tiny(3), progress=False)
    weights = (out / "diffusion_pytorch_model.safetensors").read_bytes()
    with caplog.at_level("INFO"):
        again = fit_vae(dataset, out, tiny(3), progress=False)
    assert again["skipped"] and "skipping the fit" in caplog.text
    assert again["scaling_factor"] == first["scaling_factor"]
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == weights
    with pytest.raises(VAEFitError, match="overwrite"):
        fit_vae(dataset, out, tiny(4), progress=False)
    replaced = fit_vae(dataset, out, tiny(4), overwrite=True, progress=False)
    assert replaced["steps"] == 4 and json.loads((out / REPORT_NAME).read_text())["steps"] == 4


def test_deterministic_and_resume_equals_uninterrupted(dataset, tmp_path):
    settings = dict(config=tiny(6), checkpoint_every=2, progress=False)
    fit_vae(dataset, tmp_path / "a", **settings)
    fit_vae(dataset, tmp_path / "b", **settings)

    class Killed(Exception):
        pass

    def kill_at_step_5(step, losses):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        fit_vae(dataset, tmp_path / "c", on_step=kill_at_step_5, **settings)
    assert not (tmp_path / "c").exists()  # nothing published by a killed fit
    assert json.loads((tmp_path / "c.partial" / "state.json").read_text())["step"] == 4
    resumed = fit_vae(dataset, tmp_path / "c", **settings)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == 6
    assert not (tmp_path / "c.partial").exists()

    state_a, state_b, state_c = _state(tmp_path / "a"), _state(tmp_path / "b"), _state(tmp_path / "c")
    for name, tensor in state_a.items():
        assert torch.equal(tensor, state_b[name]), name
        assert torch.equal(tensor, state_c[name]), name


def test_batches_cover_each_epoch_once():
    seen = np.concatenate([batch_indices(10, 5, step, seed=3) for step in range(4)])
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # a new permutation each epoch


def test_bad_settings_are_refused(dataset, tmp_path):
    with pytest.raises(VAEFitError, match="not divisible"):
        fit_vae(dataset, tmp_path / "v", tiny(2, resolution=15), progress=False)
    with pytest.raises(VAEFitError, match="crop_size"):
        fit_vae(dataset, tmp_path / "v", tiny(2, crop_size=5), progress=False)  # not a multiple of the factor 2
    with pytest.raises(VAEFitError, match="does not exist"):
        fit_vae(tmp_path / "missing", tmp_path / "v", tiny(2), progress=False)
    with pytest.raises(VAEFitError, match="recon_loss"):
        fit_vae(dataset, tmp_path / "v", tiny(2, recon_loss="l2"), progress=False)
    with pytest.raises(TypeError, match="layers"):
        tiny(2, layers=2)  # an unknown setting is refused, not ignored
    assert not (tmp_path / "v").exists()


def test_reconstruction_grid_puts_each_row_of_originals_above_its_reconstructions():
    rng = np.random.default_rng(0)
    originals = rng.integers(0, 256, (16, 4, 4, 3), dtype=np.uint8)
    reconstructions = rng.integers(0, 256, (16, 4, 4, 3), dtype=np.uint8)
    grid = reconstruction_grid(originals, reconstructions)  # 2 bands of 8 columns
    assert grid.shape == (4 * 4, 8 * 4, 3) and grid.dtype == np.uint8
    for band in range(2):
        for column in range(8):
            index, left = band * 8 + column, column * 4
            np.testing.assert_array_equal(grid[band * 8 : band * 8 + 4, left : left + 4], originals[index])
            np.testing.assert_array_equal(grid[band * 8 + 4 : band * 8 + 8, left : left + 4], reconstructions[index])


def test_crops_train_a_vae_that_runs_on_whole_images(dataset, tmp_path):
    report = fit_vae(dataset, tmp_path / "v", tiny(3, crop_size=8), progress=False)
    assert report["latent_shape"] == [4, 8, 8] and np.isfinite(report["holdout_psnr"])


def test_vae_fit_command(dataset, tmp_path):
    runner = CliRunner()
    out = tmp_path / "vae"
    args = [
        "vae",
        "fit",
        str(dataset),
        str(out),
        "--resolution",
        "16",
        "--block-out-channels",
        "8,16",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--crop-size",
        "0",
        "--json",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / REPORT_NAME).read_text())["steps"] == 2
    again = runner.invoke(app, args[:-1])
    assert again.exit_code == 0 and "found VAE" in again.output
    bad = runner.invoke(app, ["vae", "fit", str(tmp_path / "nothing"), str(out)])
    assert bad.exit_code == 2 and "does not exist" in bad.output
    assert "Stable Diffusion VAE" in runner.invoke(app, ["vae", "fit", "--help"]).output


def test_time_budget_stops_the_fit_and_is_reported(dataset, tmp_path):
    report = fit_vae(dataset, tmp_path / "v", tiny(50), time_budget=0.0, progress=False)
    assert report["stopped_by"] == "time_budget" and report["steps"] == 1
    assert json.loads((tmp_path / "v" / REPORT_NAME).read_text())["stopped_by"] == "time_budget"
