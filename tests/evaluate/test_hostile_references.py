"""Hostile reference files: `.npz` members are checked from their headers before any data is read (zip bombs,
forged shapes, statistics of impossible sizes), non-finite statistics are an error naming the file and key, and
peak memory stays near the process's baseline (measured in a subprocess)."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from re import escape as re_escape

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from pipeline.evaluate import npz_files
from pipeline.evaluate.datasets import ReferenceInputError
from pipeline.evaluate.reference.formats import open_reference
from tests.support.eval_fixtures import smooth_images, write_npz_reference

REPO = Path(__file__).resolve().parents[2]
BOMB_LIMIT = 256 * 2**20  # DIFFIT_MAX_NPZ_BYTES in the subprocesses: the bombs below declare twice that


def write_bomb(path: Path, name: str, shape: tuple[int, ...], dtype: str = "|u1", extra=None) -> Path:
    """An `.npz` whose member `name` is deflated zeros of `shape` (a few hundred KB on disk)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for key, value in (extra or {}).items():
            with archive.open(f"{key}.npy", "w") as member:
                np.lib.format.write_array(member, value)
        with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, {"descr": dtype, "fortran_order": False, "shape": shape})
            total = int(np.prod(shape)) * np.dtype(dtype).itemsize
            chunk = bytes(32 * 2**20)
            for start in range(0, total, len(chunk)):
                member.write(chunk[: min(len(chunk), total - start)])
    return path


def peak_rss_opening(path: Path) -> dict:
    """Open `path` as a reference in a fresh process: its error line and peak RSS before / after (MiB)."""
    code = f"""
import json, resource
from pipeline.evaluate.reference.formats import open_reference, reference_dataset
from pipeline.evaluate.datasets import ReferenceInputError
def peak():
    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) / 1024
before = peak()
try:
    reference = open_reference({str(path)!r})
    error = None
except ReferenceInputError as exc:
    error = str(exc)
print(json.dumps({{"before": before, "after": peak(), "error": error}}))
"""
    env = {"DIFFIT_MAX_NPZ_BYTES": str(BOMB_LIMIT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bombs")
    images = write_bomb(root / "images.npz", "arr_0", (2 * BOMB_LIMIT // (64 * 64 * 3), 64, 64, 3))
    mu = np.zeros(2048)
    # sigma declares 2048 x 65536 float64 (1 GiB): the wrong shape for mu, found from the header alone.
    sigma = write_bomb(root / "sigma.npz", "sigma", (2048, 65536), "<f8", extra={"mu": mu})
    return {"images": images, "sigma": sigma}


@pytest.mark.parametrize("kind", ["images", "sigma"])
def test_a_zip_bomb_is_refused_from_its_header_without_allocating(bombs, kind):
    path = bombs[kind]
    assert path.stat().st_size < 2 * 2**20  # a small file ...
    result = peak_rss_opening(path)  # ... declaring 512 MiB or 1 GiB
    expected = {
        "images": "arr_0 is compressed and would take 0.50 GiB in memory",
        "sigma": "mu (2048,) / sigma (2048, 65536) are not a mean [d] and a covariance [d, d]",
    }[kind]
    assert result["error"].startswith(f"{path}: ") and expected in result["error"], result["error"]
    assert result["after"] <= 1.5 * result["before"], result


def test_default_in_memory_bound_and_a_mapped_member_costs_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(npz_files.MAX_NPZ_BYTES_ENV, raising=False)
    assert npz_files.max_in_memory_bytes() == 2 * 1024**3
    path = write_npz_reference(tmp_path / "ref.npz", smooth_images(6))
    images = npz_files.load_member(path, "arr_0")
    assert isinstance(images, np.memmap) and images.shape == (6, 16, 16, 3)
    monkeypatch.setenv(npz_files.MAX_NPZ_BYTES_ENV, "10")  # the bound is for what must be inflated, not mapped
    assert open_reference(path).num_images == 6


def test_forged_and_damaged_members_are_one_error_each(tmp_path):
    # A header declaring more data than the member holds (a forged shape).
    forged = tmp_path / "forged.npz"
    with zipfile.ZipFile(forged, "w") as archive, archive.open("arr_0.npy", "w") as member:
        np.lib.format.write_array_header_1_0(
            member, {"descr": "|u1", "fortran_order": False, "shape": (10**6, 256, 256, 3)}
        )
        member.write(bytes(64))
    with pytest.raises(ReferenceInputError, match=r"forged.npz: arr_0 declares shape \(1000000, 256, 256, 3\)"):
        open_reference(forged)
    # An object array (would need pickle).
    objects = tmp_path / "objects.npz"
    np.savez(objects, arr_0=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ReferenceInputError, match="holds Python objects"):
        open_reference(objects)
    # Not a zip at all.
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ReferenceInputError, match=r"text.npz: not an .npz archive"):
        open_reference(tmp_path / "text.npz")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("key", ["mu", "sigma"])
def test_non_finite_statistics_are_an_error_naming_file_and_key(tmp_path, key, bad):
    mu, sigma = np.zeros(64), np.eye(64)
    {"mu": mu, "sigma": sigma}[key][3] = bad
    path = tmp_path / "stats.npz"
    np.savez(path, mu=mu, sigma=sigma)
    with pytest.raises(ReferenceInputError, match=rf"stats.npz: {key} holds \d+ non-finite values"):
        open_reference(path)


def test_reference_command_refuses_a_bomb_with_one_line_and_writes_nothing(bombs, tmp_path, monkeypatch):
    monkeypatch.setenv(npz_files.MAX_NPZ_BYTES_ENV, str(BOMB_LIMIT))
    out = tmp_path / "out" / "ref.npz"
    result = CliRunner().invoke(app, ["reference", str(bombs["images"]), str(out), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {bombs['images']}: arr_0 is compressed"), lines
    assert not out.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"layers_per_block": 10**7}, "layers_per_block must be an integer in [1, 32], got 10000000"),
        ({"block_out_channels": [64] * 1000}, "block_out_channels must list at most 8 channel counts"),
        ({"block_out_channels": [10**6, 64]}, "block_out_channels must list at most 8 channel counts"),
        ({"latent_channels": "4"}, "latent_channels must be an integer in [1, 256], got '4'"),
    ],
)
def test_a_vae_config_asking_for_a_giant_model_is_refused_before_building(tiny_vae, tmp_path, change, problem):
    """`load_vae` reads the VAE's config.json before diffusers builds anything from it."""
    import shutil

    from pipeline.core.vae import VAEError, load_vae

    vae = tmp_path / "vae"
    shutil.copytree(tiny_vae, vae)
    config = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(VAEError, match=rf"config.json: {re_escape(problem)}"):
        load_vae(str(vae))


def test_a_vae_weights_file_of_integers_or_garbage_is_refused(tiny_vae, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from pipeline.core.vae import VAEError, load_vae

    vae = tmp_path / "vae"
    shutil.copytree(tiny_vae, vae)
    weights = vae / "diffusion_pytorch_model.safetensors"
    save_file({k: v.to(torch.int8) for k, v in load_file(str(weights)).items()}, str(weights))
    with pytest.raises(VAEError, match=r"has dtype I8; weights must be floating point"):
        load_vae(str(vae))
    weights.write_bytes(b"PK\x03\x04 not safetensors")
    with pytest.raises(VAEError, match=r"a zip archive"):
        load_vae(str(vae))
