"""`diffit-pipe report`: the HTML page of a real tiny run (trained, exported, evaluated here), rendered by headless
Chromium; missing pieces, damaged files and hostile strings in the run's files."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from pipeline.core.errors import PipelineError
from tests.support.train_fixtures import REPO, subprocess_env, tiny_image_config, write_config, write_image_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

# The page's sections and the lineage's steps, as the issue names them.
SECTION_TITLES = ("Training curves", "Samples over training", "FID during training", "Evaluation", "Lineage")
LINEAGE_TITLES = ("Dataset manifest", "Run config", "Checkpoints", "Export", "Metrics")
CURVE_TITLES = ("Loss", "Learning rate", "Images per second", "Data wait", "Gradient norm")
# FID and FD_DINOv2 during training, as the trainer logs them: `fid_{N}k` / `fd_dinov2_{N}k` keys in metrics.jsonl.
FID_RECORDS = (
    {"step": 4, "fid_5k": 301.5, "fd_dinov2_5k": 812.0},
    {"step": 8, "fid_5k": 250.25, "fd_dinov2_5k": 640.5},
)
BROWSER_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def report_app() -> typer.Typer:
    """The `diffit-pipe` command group with `report` registered (as cli.main registers every command module)."""
    from cli import report_cmd
    from cli.main import PipelineCommands

    app = typer.Typer(cls=PipelineCommands)

    @app.callback()
    def _root() -> None:
        """diffit-pipe."""

    report_cmd.register(app)
    return app


def run_report(*args: str):
    return CliRunner().invoke(report_app(), ["report", *map(str, args)])


def images_of(page: str) -> list[tuple[str, bytes]]:
    """(alt text, PNG bytes) of every <img> of a page; every one must be an embedded PNG."""
    found = []
    for tag in re.findall(r"<img [^>]*>", page):
        source = re.search(r'src="([^"]*)"', tag).group(1)
        assert source.startswith("data:image/png;base64,"), source[:60]
        found.append((re.search(r'alt="([^"]*)"', tag).group(1), base64.b64decode(source.split(",", 1)[1])))
    return found


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


def assert_self_contained(page: str) -> None:
    """Nothing the page would fetch: no script, stylesheet link, frame, external url() or non-data source."""
    lowered = page.lower()
    for forbidden in ("<script", "<link", "<iframe", "<object", "<embed", "url(", "@import"):
        assert forbidden not in lowered, forbidden
    assert not re.search(r'(src|href)="(?!data:image/png;base64,|#)', page)


# ---------------------------------------------------------------------------------------------------------------
# A real tiny run: 8 steps of DiffiT-UNet-Tiny on 16 px images, exported, sampled and scored (plumbing-only FID).


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, inception_weights):
    from pipeline.evaluate import EvaluateOptions, run_evaluate
    from pipeline.train import TrainOptions, export_checkpoint, run_train

    root = tmp_path_factory.mktemp("report-run")
    data = write_image_dataset(root / "data", num_samples=8, num_classes=2)
    config = tiny_image_config(
        train={"max_steps": 8, "log_every": 1},
        sample={"every": 4, "count": 4, "steps": 4},
        checkpoint={"every": 4, "keep": 2},
    )
    run_dir = root / "run"
    run_train(TrainOptions(run_dir=run_dir, config_path=write_config(root / "config.yaml", config), data_dir=data))
    with open(run_dir / "metrics.jsonl", "a") as handle:  # FID during training, as the trainer would log it
        handle.writelines(json.dumps(record) + "\n" for record in FID_RECORDS)
    export_checkpoint(run_dir, root / "export")
    options = EvaluateOptions(
        model_dir=root / "export",
        out_dir=root / "eval",
        num_samples=4,
        batch_size=4,
        sampling={"steps": 3},
        reference=data,
        inception_weights=Path(inception_weights),
        metrics=("fid",),
        feature_layer="64",  # FID's matrix square root on 64 features, not 2048: milliseconds, not a minute
        feature_workers=0,
        device="cpu",
    )
    run_evaluate(options)
    return root


def test_report_of_a_tiny_run_names_every_section_and_links_the_lineage_by_hash(tiny_run, tmp_path):
    out = tmp_path / "page" / "report.html"
    result = run_report(tiny_run / "run", "--export", tiny_run / "export", "--eval", tiny_run / "eval", "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]  # written atomically, nothing left over
    page = out.read_text()
    for title in SECTION_TITLES:
        assert f"<h2>{title}</h2>" in page, title
    for step, title in enumerate(LINEAGE_TITLES, start=1):
        assert f"<h3>{step}. {title}</h3>" in page, title
    assert "not present" not in page  # every piece is there
    # The summary reads the last training record, not the FID records logged after it.
    last = [json.loads(line) for line in (tiny_run / "run" / "metrics.jsonl").read_text().splitlines()][-3]
    assert last["step"] == 8 and last["images_seen"] == 32
    assert "<tr><th>images seen</th><td>32</td></tr>" in page
    assert f"<tr><th>last loss</th><td>{last['loss']:.6g}</td></tr>" in page
    assert_self_contained(page)

    # Five curves, the FID and FD_DINOv2 charts (matplotlib, 560 x 320 px), the two sample grids (4 samples of 16 px).
    images = dict(images_of(page))
    metric_charts = ("FID during training", "FD_DINOv2 during training")  # one chart each: their scales differ
    assert set(images) == {*CURVE_TITLES, *metric_charts, "samples at step 4", "samples at step 8"}
    for title in (*CURVE_TITLES, *metric_charts):
        assert png_size(images[title]) == (560, 320), title
    for step in (4, 8):
        assert images[f"samples at step {step}"] == reencoded(tiny_run / "run" / "samples" / f"step-{step:07d}.png")
    assert "<td>301.5</td>" in page and "<td>250.25</td>" in page  # the table of metrics during training
    assert "<td>812</td>" in page and "<td>640.5</td>" in page

    # The lineage: every hash, and every link checked.
    run_dir = tiny_run / "run"
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert [p.name for p in checkpoints] == ["step-0000004", "step-0000008"]
    hashes = [sha256(tiny_run / "data" / "manifest.json"), sha256(run_dir / "config.yaml")]
    for checkpoint in checkpoints:
        files = json.loads((checkpoint / "files.json").read_text())["files"]
        hashes += [entry["sha256"] for entry in files.values()]
    hashes += [sha256(tiny_run / "export" / name) for name in ("config.json", "model.safetensors")]
    hashes.append(sha256(tiny_run / "eval" / "metrics.json"))
    for value in hashes:
        assert value in page, value
    assert "✓ the manifest the run recorded" in page
    assert "✓ step-0000008 holds this config" in page
    assert page.count("✓ sizes match files.json") == 2
    assert "✓ step-0000008 of this run" in page
    assert "✓ the EMA of step-0000008 (ema.safetensors, same sha256)" in page
    assert f"✓ the weights of {tiny_run / 'export'}" in page
    assert page.count("✗") == 1  # only the evaluation's label: its FID is plumbing-only

    # The evaluation's plumbing-only FID, with its label.
    record = json.loads((tiny_run / "eval" / "metrics.json").read_text())
    fid = record["plumbing_only_metrics"]["fid"]
    assert f"<tr><th>fid</th><td>{fid:.6g}</td></tr>" in page
    assert "✗ plumbing-only" in page


def reencoded(path: Path) -> bytes:
    """A grid as the report embeds it (decoded and written again as PNG by Pillow)."""
    from PIL import Image

    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.convert("RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def require_chromium() -> str:
    """The headless browser the report test renders with: a failure naming the install command when it is
    missing (CI installs it), a skip only when DIFFIT_NO_BROWSER=1 asks for one."""
    if os.environ.get("DIFFIT_NO_BROWSER") == "1":
        pytest.skip("DIFFIT_NO_BROWSER=1: the report is not rendered in a browser")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail(
            "the run-report test renders the page in headless Chromium, which is not installed: "
            "apt-get install -y chromium (Debian/Ubuntu; .ci/run does it), or set DIFFIT_NO_BROWSER=1 to skip"
        )
    return browser


def screenshot(browser: str, page: Path, out: Path, profile: Path) -> np.ndarray:
    """The page rendered by headless Chromium at 1280 x 2000, as an RGB array."""
    from PIL import Image

    command = [
        browser,
        *BROWSER_FLAGS,
        f"--user-data-dir={profile}",
        "--window-size=1280,2000",
        f"--screenshot={out}",
        page.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and out.is_file(), result.stderr[-2000:]
    with Image.open(out) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tiny_run, tmp_path):
    browser = require_chromium()
    out = tmp_path / "report.html"
    result = run_report(tiny_run / "run", "--export", tiny_run / "export", "--eval", tiny_run / "eval", "--out", out)
    assert result.exit_code == 0, result.output
    pixels = screenshot(browser, out, tmp_path / "shot.png", tmp_path / "profile")
    assert pixels.shape == (2000, 1280, 3)
    non_white = (pixels < 250).any(axis=2)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    # A blank page is all white; the header and tables alone are grey text on white (a few hundred colours, a few
    # per cent of the pixels). The charts' lines and the random-looking sample grids bring thousands of colours.
    assert non_white.mean() > 0.08, non_white.mean()
    assert colours > 2000, colours
    # The upper part (header and curves) and the lower part (sample grids) both have content.
    assert non_white[:1000].mean() > 0.05 and non_white[1000:].mean() > 0.05


# ---------------------------------------------------------------------------------------------------------------
# Missing, damaged and hostile inputs


def test_an_empty_run_dir_gives_a_page_of_not_present(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = run_report(run_dir)
    assert result.exit_code == 0, result.output
    page = (run_dir / "report.html").read_text()
    for title in SECTION_TITLES:
        assert f"<h2>{title}</h2>" in page
    for title in LINEAGE_TITLES:
        assert f". {title}</h3>" in page
    assert "<img" not in page
    absent = re.findall(r'<p class="absent">not present: ([^<]*)</p>', page)
    assert absent == [
        f"{run_dir / 'metrics.jsonl'} (no metrics records)",
        f"{run_dir / 'samples'}/step-*.png (sample.every was 0?)",
        "fid_* / fd_dinov2_* values in metrics.jsonl (FID during training was not run)",
        "evaluation metrics (pass --eval DIR, or keep them as RUN/eval*)",
        "the dataset (RUN/run.json and the checkpoints name none)",
        str(run_dir / "config.yaml"),
        str(run_dir / "run.json"),
        f"{run_dir / 'checkpoints'}/step-* (no complete checkpoint)",
        "an export (pass --export DIR, or keep it as RUN/export*)",
        "metrics.json of an evaluation (pass --eval DIR, or keep it as RUN/eval*)",
    ]


def test_a_missing_run_dir_is_a_one_line_error(tmp_path):
    import pipeline.report

    missing = tmp_path / "nope"
    result = run_report(missing)
    assert result.exit_code == 2
    assert f"error: {missing}: does not exist (expected a run directory written by `diffit-pipe train`)" in (
        result.output
    )
    assert not missing.exists()
    (tmp_path / "run.txt").write_text("a file, not a run directory")
    with pytest.raises(pipeline.report.ReportError) as caught:
        pipeline.report.run_report(pipeline.report.ReportOptions(tmp_path / "run.txt"))
    assert isinstance(caught.value, PipelineError) and str(caught.value) == (
        f"{tmp_path / 'run.txt'}: is not a directory (expected a run directory written by `diffit-pipe train`)"
    )


def test_strings_from_the_run_files_are_escaped(tmp_path):
    hostile = "<script>alert(1)</script>"
    data = tmp_path / "data<b>"
    data.mkdir()
    manifest = {
        "kind": "images",
        "resolution": 16,
        "num_classes": 0,
        "counts": {"seen": 2, "written": 1, "failed": 1},
        "source": {"root": f"</td>{hostile}", "layout": "flat", "items": 2},
        "created": '"><img src=x onerror=alert(1)>',
    }
    (data / "manifest.json").write_text(json.dumps(manifest))
    (data / "failures.jsonl").write_text(json.dumps({"index": 1, "path": "a.png", "reason": "<iframe src=x>"}) + "\n")
    run_dir = tmp_path / "run"
    (run_dir / "eval-1").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"model:\n  name: {hostile}\n")
    (run_dir / "run.json").write_text(json.dumps({"dataset": {"path": str(data)}, "command": [hostile]}))
    records = [{"step": 1, "loss": 0.5, "fid_5k": hostile}, {"step": 2, "loss": 0.25, hostile: 1.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    evaluation = {
        "label": hostile,
        "reportable": False,
        "plumbing_only_metrics": {hostile: 1.5},
        "model": {"weights_sha256": [hostile]},  # not even a string
    }
    (run_dir / "eval-1" / "metrics.json").write_text(json.dumps(evaluation))

    result = run_report(run_dir)
    assert result.exit_code == 0, result.output
    page = (run_dir / "report.html").read_text()
    assert_self_contained(page)
    lowered = page.lower()
    assert "<b>" not in lowered and "<img src=x" not in lowered and "<iframe" not in lowered
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    # config.yaml, the run's command, the FID note, the evaluation's label and metric name, the source root
    assert page.count(escaped) == 6, page.count(escaped)
    assert "&lt;iframe src=x&gt;" in page and "data&lt;b&gt;" in page
    assert "1 line(s) that are not metrics records were skipped" in page
    assert "✗ the run recorded no manifest hash" in page  # run.json names the data but records no hash
    assert [alt for alt, _ in images_of(page)] == ["Loss"]  # the hostile key is not a curve; no FID number


def make_grid_run(run_dir: Path, count: int) -> None:
    """A run directory with only sample grids: a large one (step 1), `count` small ones, a damaged one (last)."""
    from PIL import Image

    samples = run_dir / "samples"
    samples.mkdir(parents=True)
    Image.new("RGB", (2000, 1000), (0, 0, 255)).save(samples / f"step-{1:07d}.png")
    for step in range(2, count + 2):
        Image.new("RGB", (8, 8), (step, 0, 0)).save(samples / f"step-{step:07d}.png")
    (samples / f"step-{count + 2:07d}.png").write_text("not a png")
    (samples / "step-x.png").write_text("not a grid name: ignored")


def test_many_grids_are_thinned_large_ones_scaled_damaged_ones_named(tmp_path):
    from pipeline.report.charts import evenly_spaced

    assert evenly_spaced(3, 12) == [0, 1, 2]
    assert evenly_spaced(32, 12) == [0, 3, 6, 8, 11, 14, 17, 20, 23, 25, 28, 31]
    assert evenly_spaced(5, 1) == [4]

    make_grid_run(tmp_path / "run", 30)
    result = run_report(tmp_path / "run")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "run" / "report.html").read_text()
    assert "12 of 32 grids" in page
    shown = [int(step) for step in re.findall(r"<figcaption>step (\d+)</figcaption>", page)]
    assert shown == [1, 4, 7, 9, 12, 15, 18, 21, 24, 26, 29, 32]  # evenly_spaced(32, 12) + 1
    images = dict(images_of(page))
    assert png_size(images["samples at step 1"]) == (768, 384)  # 2000 x 1000 scaled to 768 wide
    assert png_size(images["samples at step 4"]) == (8, 8)
    assert "samples at step 32" not in images
    assert "grid: not a readable image (UnidentifiedImageError)" in page


def test_damaged_checkpoints_are_flagged_by_size_and_with_verify_by_hash(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run_dir)
    ema = run_dir / "checkpoints" / "step-0000004" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:-1])  # truncated
    weights = run_dir / "checkpoints" / "step-0000008" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: only re-hashing finds it
    weights.write_bytes(bytes(data))

    assert run_report(run_dir).exit_code == 0
    page = (run_dir / "report.html").read_text()
    size = ema.stat().st_size
    assert f"✗ ema.safetensors: {size} bytes, files.json records {size + 1}" in page
    assert "✓ sizes match files.json (--verify re-hashes)" in page  # step 8: same sizes

    assert run_report(run_dir, "--verify").exit_code == 0
    page = (run_dir / "report.html").read_text()
    assert f"✗ {weights}: sha256 {sha256(weights)} does not match the" in page
    assert "✓ verified" not in page


def test_the_report_command_does_not_load_matplotlib_until_it_runs():
    code = (
        "import sys, cli.main, cli.report_cmd, pipeline.report\n"
        "cli.report_cmd.register(cli.main.app)\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported at start-up'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True)
    assert result.returncode == 0, result.stderr.decode()[-2000:]


def test_links_out_of_the_run_and_non_regular_files_are_skipped_and_listed(tmp_path):
    from PIL import Image

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.yaml").write_text("model:\n  name: SECRET-CONFIG-TEXT\n")
    (outside / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 123.456}) + "\n")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(outside / "private.png")
    run_dir = tmp_path / "run"
    samples = run_dir / "samples"
    samples.mkdir(parents=True)
    (run_dir / "config.yaml").symlink_to(outside / "secret.yaml")
    (run_dir / "metrics.jsonl").symlink_to(outside / "metrics.jsonl")
    (samples / "step-0000001.png").symlink_to(outside / "private.png")
    # A link that stays inside the run is followed (it shows nothing the run does not hold).
    Image.new("RGB", (8, 8), (0, 0, 2)).save(run_dir / "kept.png")
    (samples / "step-0000002.png").symlink_to(run_dir / "kept.png")
    Image.new("RGB", (8, 8), (0, 0, 3)).save(samples / "step-0000003.png")
    os.mkfifo(samples / "step-0000004.png")  # would block a reader forever
    (samples / "step-0000005.png").symlink_to(tmp_path / "missing.png")  # dangling: simply not present

    result = run_report(run_dir)
    assert result.exit_code == 0, result.output
    page = (run_dir / "report.html").read_text()
    assert "SECRET-CONFIG-TEXT" not in page and "123.456" not in page and str(outside) not in page
    images = dict(images_of(page))
    assert sorted(images) == ["samples at step 2", "samples at step 3"]
    assert {reencoded_pixel(images[name]) for name in images} == {(0, 0, 2), (0, 0, 3)}
    skipped = page[page.index('<section id="skipped">') :]
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td></tr>", skipped)
    link = "a symbolic link pointing outside the run (not read)"
    assert rows == [
        ("RUN/config.yaml", link),
        ("RUN/metrics.jsonl", link),
        ("RUN/samples/step-0000001.png", link),
        ("RUN/samples/step-0000004.png", "not a regular file where a file was expected (not read)"),
    ]


def test_a_run_without_links_lists_no_skipped_files(tmp_path):
    (tmp_path / "run").mkdir()
    assert run_report(tmp_path / "run").exit_code == 0
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<h2>Skipped files</h2>" in page
    assert "none: every file shown was read from inside the run" in page


def reencoded_pixel(png: bytes) -> tuple[int, int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return image.convert("RGB").getpixel((0, 0))


def test_plumbing_only_values_are_listed_not_plotted_and_not_called_absent():
    """Metrics during training with random or unrecognised weights: the values are listed under their
    `plumbing_only_*` key beside the label, never drawn as FID / FD_DINOv2, and the section does not say the
    metrics were not run."""
    from types import SimpleNamespace

    from pipeline.report import charts, page

    label = "plumbing-only (DINOv2 weights tiny.pth not the published ViT-L/14)"
    records = [
        {"step": 2, "plumbing_only_fd_dinov2_0.006k": 12.5, "fd_dinov2_note": label},
        {"step": 4, "plumbing_only_fd_dinov2_0.006k": 11.25, "fd_dinov2_note": label},
    ]
    run = SimpleNamespace(records=records)
    pngs, keys, plumbing = charts.fid_pngs(records), charts.fid_keys(records), charts.plumbing_keys(records)
    assert pngs == [] and keys == [] and plumbing == ["plumbing_only_fd_dinov2_0.006k"]
    html = page.fid_section(run, pngs, keys, plumbing, charts.fid_notes(records))
    assert "<img" not in html and "not present" not in html
    assert "<td>12.5</td>" in html and "<td>11.25</td>" in html and f"fd_dinov2_note: {label}" in html
