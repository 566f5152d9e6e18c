"""The embedded default: `diffit-pipe demo --quick` end to end, and the README's two set-up commands."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    """The shell lines of the README's set-up section (fenced bash blocks under '## Set up')."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", section, re.S)
        for line in block.strip().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_readme_has_exactly_two_setup_commands_that_exist():
    commands = readme_commands()
    assert len(commands) == 2, commands
    demo, tests = commands
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # 1: install, then the console script's demo command
    assert demo.startswith("pip install .") and demo.endswith("diffit-pipe demo")
    assert pyproject["project"]["scripts"]["diffit-pipe"] == "cli.main:main"
    from typer.main import get_command

    from cli.main import app

    assert "demo" in get_command(app).commands
    # 2: install with the test extra, then lint, format check and pytest; .ci/run runs the same command
    assert tests == 'pip install -e ".[test]" && ruff check . && ruff format --check . && python -m pytest -q'
    assert any(requirement.startswith("ruff") for requirement in pyproject["project"]["optional-dependencies"]["test"])
    assert tests in (ROOT / ".ci" / "run").read_text()


# Every command of `diffit-pipe`, exactly: a new command is added here on purpose, a lost one fails the test.
COMMANDS = {
    "models",
    "encode",
    "pack",
    "inspect",
    "evaluate",
    "sample",
    "reference",
    "import-nvlabs",
    "train",
    "export",
    "synth",
    "vae",
    "demo",
    "report",
    "study",
    "attention-maps",
}
PLACEHOLDER = re.compile(r"\b(TODO|TBD|FIXME)\b|not implemented", re.IGNORECASE)


def _commands_with_paths(group, path=()):
    """(argument path, click command) of every command and sub-command below `group`."""
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from _commands_with_paths(command, (*path, name))


def test_registered_commands_have_real_help():
    from typer.main import get_command
    from typer.testing import CliRunner

    from cli.main import app

    root = get_command(app)
    assert set(root.commands) == COMMANDS
    runner = CliRunner()
    for path, command in _commands_with_paths(root):
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert command.help and command.help.strip(), f"{' '.join(path)} has no help text"
        assert command.help.split()[0] in result.output, path
        assert not PLACEHOLDER.search(result.output), (path, PLACEHOLDER.search(result.output).group(0))


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "FID / IS / precision / recall skipped" in result.stdout  # no Inception weights: said, not faked
    summary = json.loads((out / "summary.json").read_text())
    settings = summary["settings"]
    images = settings["classes"] * settings["per_class"]

    # synth + pack + encode: every image accounted for in both shard sets, through the fitted VAE
    for shards in ("raw_shards", "raw_shards_small", "latent_shards"):
        manifest = json.loads((Path(summary["paths"][shards]) / "manifest.json").read_text())
        assert manifest["counts"] == {"seen": images, "written": images, "failed": 0}, shards
        assert sum(s["count"] for s in manifest["shards"]) == images
        assert manifest["num_classes"] == settings["classes"]
    latents = json.loads((Path(summary["paths"]["latent_shards"]) / "manifest.json").read_text())
    assert latents["vae"]["path"] == summary["paths"]["vae"]
    assert "png" in latents["members"]  # each latent keeps its crop: REPA's targets (manifests/studies/repa_demo.yaml)
    assert (Path(summary["paths"]["vae"]) / "config.json").is_file()

    # train + export: both runs reached their step budget, with checkpoints, tensorboard logs and exports
    for kind, steps in (("latent", settings["latent_steps"]), ("image", settings["image_steps"])):
        run = Path(summary["paths"][f"{kind}_run"])
        assert summary["training"][kind]["step"] == steps
        assert (run / "checkpoints" / "latest").exists()
        assert list(run.rglob("events.out.tfevents.*")), f"{kind}: no tensorboard events"
        model_dir = Path(summary["paths"][f"{kind}_model"])
        assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()

    # evaluate: complete zarr stores, metrics.json, grids, and the class-consistency measurement
    import zarr

    for kind in ("latent", "image"):
        entry = summary["evaluation"][kind]
        store = zarr.open_group(str(Path(summary["paths"][f"{kind}_eval"]) / "samples.zarr"), mode="r")
        assert store["samples"].shape[0] == settings["num_samples"] and np.asarray(store["done"][:]).all()
        record = json.loads(Path(entry["metrics_json"]).read_text())
        assert record["num_samples"] == settings["num_samples"]
        assert Path(entry["grid"]).is_file()
        assert sum(entry["predicted_class_histogram"]) == settings["num_samples"]
        assert 0.0 <= entry["class_consistency"] <= 1.0 and 0.0 <= entry["shape_consistency"] <= 1.0
        assert (
            json.loads((Path(summary["paths"][f"{kind}_model"]) / "config.json").read_text())["diffusion"]["type"]
            == "edm"
        )
    assert summary["classifier"]["holdout_acc"] >= 0.9  # the yardstick itself must be trustworthy
    assert 0.0 <= summary["classifier"]["holdout_acc_on_vae_reconstructions"] <= 1.0
    assert summary["shape_classifier"]["grayscale"] is True and summary["classifier"]["grayscale"] is False
    assert 0.0 <= summary["shape_classifier"]["holdout_acc"] <= 1.0
    assert "shape consistency" in result.stdout

    # report: one self-contained page per run, linking its export and evaluation, printed in the summary
    for kind in ("latent", "image"):
        page_path = Path(summary["reports"][kind])
        assert page_path == Path(summary["out"]) / f"report_{kind}.html"
        assert f"{kind} model: run report {page_path}" in result.stdout
        page = page_path.read_text()
        for title in ("Training curves", "Samples over training", "FID during training", "Evaluation", "Lineage"):
            assert f"<h2>{title}</h2>" in page, (kind, title)
        # five curves and the four sample grids (sample.every = steps / 4), all embedded
        assert page.count('<img src="data:image/png;base64,') == 5 + 4, kind
        assert "✓ the manifest the run recorded" in page
        if kind == "latent":
            assert latents["vae"]["path_hash"] in page  # the VAE the latents came from, by hash
        assert f"✓ the weights of {summary['paths'][f'{kind}_model']}" in page
