"""Files an older main wrote are read by today's code (issue 33: names changed, files on disk did not).

`tests/support/old_main/` holds what `tests/support/make_old_main.py` wrote with the main of 2026-12-06 (commit
f831b0e, before the sampling settings, guidance names and doors were renamed): a training run stopped at a
checkpoint, exports, an evaluate store made with `--cfg-*` flags, a saved `DiffiTPipeline` folder whose
model_index.json nests guidance, and a finished study whose plan.json says `cfg_*`. Each test copies them and
runs today's commands on them: the result must be what that main computed (same samples, same numbers).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from cli.main import app

OLD_MAIN = Path(__file__).parents[1] / "support" / "old_main"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def old(tmp_path) -> Path:
    """A writable copy of the older main's files."""
    return Path(shutil.copytree(OLD_MAIN, tmp_path / "old"))


def run_cli(arguments: list) -> str:
    result = CliRunner().invoke(app, [str(a) for a in arguments])
    assert result.exit_code == 0, result.output
    return result.output


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["loss"] for record in records if "loss" in record}


def test_a_run_of_the_older_main_resumes_where_it_stopped_and_trains_as_a_run_started_today(old, tmp_path):
    """The run stopped at step 4 (its checkpoint, config.yaml and run.json as written then, the data moved since)
    continues to step 6; its steps 5 and 6 are the ones of today's uninterrupted run of the same config."""
    resume = ["--resume", "auto", "--set", "train.max_steps=6"]
    run_cli(["train", "--run-dir", old / "image-run", "--data", old / "image-data", *resume])
    run_cli(
        ["train", "--config", old / "image.yaml", "--data", old / "image-data", "--run-dir", tmp_path / "today"]
        + ["--set", "train.max_steps=6"]
    )
    resumed, today = losses(old / "image-run"), losses(tmp_path / "today")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[step] for step in (5, 6)] == [today[step] for step in (5, 6)]


def test_an_evaluate_store_of_the_older_main_is_resumed_by_todays_names_and_holds_todays_samples(old, tmp_path):
    """The store made with --cfg-scale 1.5 --cfg-channels all is the one --guidance-scale 1.5 --guidance-channels
    all asks for (accepted, nothing sampled again), and today's sampling of the same settings gives its images."""
    settings = ["--num-samples", "4", "--batch-size", "2", "--steps", "2", "--metrics", ""]
    settings += ["--guidance-scale", "1.5", "--guidance-channels", "all"]
    before = zarr.open_group(str(old / "image-eval" / "samples.zarr"), mode="r")["samples"][:]
    run_cli(["evaluate", "--model", old / "image-export", "--out", old / "image-eval", *settings])
    run_cli(["evaluate", "--model", old / "image-export", "--out", tmp_path / "today", *settings])
    record = json.loads((old / "image-eval" / "metrics.json").read_text())
    assert record["sample_store"]["chunks_sampled_this_run"] == 0
    today = zarr.open_group(str(tmp_path / "today" / "samples.zarr"), mode="r")["samples"][:]
    np.testing.assert_array_equal(today, before)
    assert record["sampling"]["guidance_scale"] == 1.5 and record["sampling"]["guidance_channels"] is None


def test_a_pipeline_folder_of_the_older_main_loads_and_samples_its_latents(old):
    """model_index.json with the nested guidance object and the scheduler under its former module: loaded, the
    stored settings read as today's flat ones, the same guided latents as then."""
    from diffit import DiffiTPipeline
    from diffit.guidance import GuidanceConfig

    pipe = DiffiTPipeline.from_pretrained(old / "latent-pipeline")
    assert pipe.sampling_config.guidance == GuidanceConfig(scale=1.0, schedule="constant", power=4.0, channels=3)
    assert (pipe.sampling_config.sampler, pipe.sampling_config.steps) == ("ddpm", 250)
    latents = pipe(class_labels=[1, 7], guidance_scale=3.0, num_inference_steps=5, seeds=[0, 1], output_type="latent")
    np.testing.assert_array_equal(latents.images.float().numpy(), np.load(old / "latent-pipeline-samples.npy"))
    again = DiffiTPipeline.from_pretrained(old / "latent-export", vae=pipe.vae)
    latents = again(class_labels=[1, 7], guidance_scale=3.0, num_inference_steps=5, seeds=[0, 1], output_type="latent")
    np.testing.assert_array_equal(latents.images.float().numpy(), np.load(old / "latent-pipeline-samples.npy"))


def test_a_study_of_the_older_main_resumes_and_aggregates_to_the_numbers_it_had(old, monkeypatch):
    """plan.json with `cfg_*` names and no recorded inputs; one evaluation lost (as a kill would leave it) and
    study.json removed: today's `study` redoes that evaluation only and writes the same FD_demo per seed."""
    monkeypatch.chdir(old)
    shutil.rmtree(old / "study" / "evals" / "s2" / "seed-1")
    (old / "study" / "study.json").unlink()
    output = run_cli(["study", "study.yaml", "--out", "study"])
    assert "runs/base/seed-1" in output
    table = json.loads((old / "study" / "study.json").read_text())["table"]
    then = json.loads((OLD_MAIN / "study" / "study.json").read_text())["table"]
    values = {(row["variant"], row["metric"]): row["values"] for row in table}
    assert values == {(row["variant"], row["metric"]): row["values"] for row in then}
    assert values[("s2", "FD_demo")].keys() == {"0", "1"}
