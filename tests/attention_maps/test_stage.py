"""`diffit-pipe attention-maps` end to end on tiny exports: the PNG's pixel size, the npz's maps equal to the pure
function's on the same inputs, and every bad option one `error:` line (exit 2, nothing written)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import diffit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ADM = {"type": "adm", "noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True}


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A class-conditional latent ADM export (DiffiT-Tiny/2, 4x4 tokens, 2 blocks, 2 heads; no VAE is read) and an
    unconditional image-space EDM export (DiffiT-UNet-Tiny with 8-px windows: 3 blocks, windows 8, 8, 8)."""
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    latent = diffit.create_model("DiffiT-Tiny/2", num_classes=10)
    diffit.save_pretrained(latent, root / "latent", {"diffusion": ADM})
    image = diffit.create_model("DiffiT-UNet-Tiny", window_size=8)
    diffit.save_pretrained(image, root / "image", {"diffusion": {"type": "edm", "sigma_data": 0.5}})
    return {"latent": root / "latent", "image": root / "image"}


def run(*args) -> object:
    from cli.main import app

    return CliRunner().invoke(app, ["attention-maps", *map(str, args)])


def test_the_command_writes_the_picture_and_the_maps(exports, tmp_path):
    from PIL import Image

    from pipeline.attention_maps.render import picture_size

    out = tmp_path / "figs" / "grid.png"
    flags = "--class 3 --timesteps 999,500,100 --blocks 0,1 --heads 0,1 --seed 5".split()
    result = run(exports["latent"], *flags, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout and f"wrote {out.with_suffix('.npz')}" in result.stdout
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        assert (picture.height, picture.width) == picture_size(rows=4, columns=3)
    with np.load(out.with_suffix(".npz"), allow_pickle=False) as data:
        maps = data["maps"]
        assert maps.shape == (2, 2, 3, 4, 4)  # blocks, heads, times, 4x4 token grid
        np.testing.assert_allclose(maps.sum(axis=(-2, -1)), 1.0, atol=1e-5)
        assert data["times"].tolist() == [999.0, 500.0, 100.0] and data["noise_labels"].tolist() == [999, 500, 100]
        assert data["blocks"].tolist() == [0, 1] and data["heads"].tolist() == [0, 1]
        assert data["query"].tolist() == [[2, 2], [2, 2]] and data["query_grid"].tolist() == [2, 2]
        assert str(data["kind"]) == "adm" and "ADM timestep" in str(data["time_variable"])
        assert int(data["class_label"]) == 3 and int(data["seed"]) == 5
        assert np.isnan(data["time_key"]).all()
        stage_maps = maps

    # the same maps as the pure function on the same network input
    from diffit.attention_maps import attention_maps, noised_input
    from diffit.diffusion import randn_per_sample

    model, _ = diffit.load_pretrained(exports["latent"])
    noise = randn_per_sample([torch.Generator().manual_seed(5)], (4, 8, 8))[0]
    for column, time in enumerate((999, 500, 100)):
        x, label = noised_input("adm", noise, time, ADM)
        expected = attention_maps(model, x[None], label[None], torch.tensor([3]), [0, 1], [0, 1]).stacked()[0]
        np.testing.assert_allclose(stage_maps[:, :, column], expected.numpy(), atol=1e-6)


def test_an_image_model_draws_the_querys_window_in_its_own_time_variable(exports, tmp_path):
    from PIL import Image

    from pipeline.attention_maps.render import picture_size

    out = tmp_path / "unet.png"
    result = run(exports["image"], "--blocks", "2,0,1", "--heads", "1", "--query", "3,14", "--out", out)
    assert result.exit_code == 0, result.output
    assert "sigma = 80,2,0.1" in result.stdout  # EDM's default times, named by its variable
    with Image.open(out) as picture:
        assert (picture.height, picture.width) == picture_size(rows=3, columns=3)
    with np.load(out.with_suffix(".npz"), allow_pickle=False) as data:
        assert data["maps"].shape == (3, 1, 3, 8, 8) and data["map_size"].tolist() == [8, 8, 8]
        assert data["feature_size"].tolist() == [16, 16, 8]  # decoder at 16 px, encoder 0 at 16, encoder 1 at 8
        # pixel (3, 14): window (0, 8) at 16 px, in-window (3, 6); at 8 px token (1, 7) of the one window
        assert data["query"].tolist() == [[3, 6], [3, 6], [1, 7]]
        assert data["origin"].tolist() == [[0, 8], [0, 8], [0, 0]]
        assert data["times"].tolist() == [80.0, 2.0, 0.1]
        np.testing.assert_allclose(data["noise_labels"], np.log([80.0, 2.0, 0.1]) / 4, rtol=1e-6)
        assert int(data["class_label"]) == -1


@pytest.mark.parametrize(
    ("model", "args", "fragments"),
    [
        ("latent", ["--class", "1", "--blocks", "0,2"], ["--blocks 2: no such attention block", "has 2 (0..1"]),
        ("latent", ["--class", "1", "--blocks", "0;1"], ["--blocks '0;1': expected comma-separated integers"]),
        ("latent", ["--class", "1", "--heads", "5"], ["--heads 5: no such head", "has 2 (0..1)"]),
        ("latent", ["--class", "1", "--timesteps", "999,1000"], ["--timesteps 1000", "integers 0..999"]),
        ("latent", ["--class", "1", "--query", "4,0"], ["--query 4,0: outside the model's 4x4 grid"]),
        ("latent", ["--query", "1"], ["--query '1': expected 'center' or ROW,COL"]),
        ("latent", [], ["--class:", "is class-conditional"]),
        ("latent", ["--class", "11"], ["--class 11: expected 0..9 (or 10, the null class)"]),
        ("image", ["--class", "0"], ["--class 0:", "is unconditional"]),
        ("image", ["--timesteps", "0"], ["--timesteps 0: an EDM sigma must be > 0"]),
    ],
)
def test_a_bad_option_is_one_error_line_and_nothing_is_written(exports, tmp_path, model, args, fragments):
    out = tmp_path / "grid.png"
    result = run(exports[model], *args, "--out", out)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # the error contract's exit, not an escaped exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []


def test_an_out_that_is_not_a_png_and_a_missing_model_are_one_line(exports, tmp_path):
    result = run(exports["image"], "--out", tmp_path / "grid.jpg")
    assert result.exit_code == 2 and "error: --out" in result.stderr and "FILE.png" in result.stderr
    result = run(tmp_path / "nowhere", "--out", tmp_path / "grid.png")
    assert result.exit_code == 2 and "not an exported model directory" in result.stderr
    assert list(tmp_path.iterdir()) == []
