"""Out of disk space, for real: `evaluate` and `reference` write into a small tmpfs that is then filled up. The
job stops with one `error:` line (exit 1) naming the file, what is free and that a rerun resumes; no temporary
file of the failed write is left; after space is freed, the same command finishes with the result of an
uninterrupted run."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from pipeline.evaluate.sample_store import STORE_NAME, SampleStore
from tests.support.eval_fixtures import smooth_images, write_npz_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def fill(mount: Path, leave: int) -> Path:
    """A file that takes all but `leave` bytes of the file system."""
    filler = mount / "filler"
    free = shutil.disk_usage(mount).free
    with open(filler, "wb") as handle:
        handle.write(bytes(max(0, free - leave)))
    return filler


def leftovers(directory: Path) -> list[str]:
    """Temporary files of failed writes (the atomic writers' `.tmp-` names and spool files)."""
    return sorted(str(p) for p in directory.rglob("*") if ".tmp-" in p.name or p.name.endswith(".partial.tmp"))


def _evaluate_arguments(model: Path, out: Path) -> list[str]:
    return [
        "evaluate", "--model", str(model), "--out", str(out), "--num-samples", "8", "--batch-size", "2",
        "--steps", "3", "--metrics", "", "--device", "cpu", "--export-npz",
    ]  # fmt: skip


def test_evaluate_out_of_space_is_one_line_and_a_rerun_finishes(latent_model, small_disk, tmp_path):
    runner = CliRunner()
    expected = tmp_path / "elsewhere"
    assert runner.invoke(app, _evaluate_arguments(latent_model, expected)).exit_code == 0
    out = small_disk / "eval"
    filler = fill(small_disk, leave=24 * 1024)  # room for the store's metadata and a chunk or two, not the npz
    result = runner.invoke(app, _evaluate_arguments(latent_model, out))
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "no space left on the device" in lines[0] and "MiB free on its file system" in lines[0], lines[0]
    assert "sampling resumes where it stopped" in lines[0]
    assert leftovers(out) == []
    filler.unlink()
    again = runner.invoke(app, _evaluate_arguments(latent_model, out))
    assert again.exit_code == 0, again.output
    stored = SampleStore.open(out / STORE_NAME, mode="r")
    reference_store = SampleStore.open(expected / STORE_NAME, mode="r")
    np.testing.assert_array_equal(stored.read_images(0, 8), reference_store.read_images(0, 8))
    assert (out / "samples.npz").read_bytes() == (expected / "samples.npz").read_bytes()


def test_reference_out_of_space_is_one_line_and_a_rerun_finishes(inception_weights, small_disk, tmp_path):
    source = write_npz_reference(tmp_path / "source.npz", smooth_images(12, size=16))
    runner = CliRunner()
    arguments = ["--inception-weights", str(inception_weights), "--device", "cpu", "--chunk-size", "12"]
    expected = tmp_path / "expected.npz"
    assert runner.invoke(app, ["reference", str(source), str(expected), *arguments]).exit_code == 0
    out = small_disk / "ref.npz"
    # The one chunk's moments (the size of the output's statistics) fit; the output after them does not.
    filler = fill(small_disk, leave=expected.stat().st_size * 3 // 2)
    result = runner.invoke(app, ["reference", str(source), str(out), *arguments])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no space left on the device" in lines[0], result.output
    assert "are kept and the build resumes" in lines[0]
    assert not out.exists() and leftovers(small_disk) == []
    filler.unlink()
    again = runner.invoke(app, ["reference", str(source), str(out), *arguments])
    assert again.exit_code == 0, again.output
    with np.load(out) as resumed, np.load(expected) as whole:
        for key in ("arr_0", "mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_array_equal(resumed[key], whole[key])
    assert not os.path.exists(small_disk / ".ref.npz.partial")
