"""Integrity of the encode side (issue 19): what a crafted or damaged dataset, source tree or OUT directory can
make `encode`, `pack`, `inspect` and the dataset readers do.

Each case is a probe that failed on the code before the fix: a shard name that runs a shell command, a symlink
loop in a source tree, a job that deletes another dataset, a file as OUT, a pixel limit that did nothing, a
verification that matched sidecars by position and believed any manifest value.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from pipeline.core import shards
from pipeline.core.dataset_verify import verify_dataset
from pipeline.core.manifest import MANIFEST_NAME, ManifestError, load_manifest, shard_urls
from pipeline.core.shard_members import decode_sample, latent_sample
from pipeline.encode.job import EncodeOptions, run_encode
from pipeline.encode.sources import SourceError, scan_folder, scan_source
from tests.support.encode_fixtures import (
    TEST_MAX_PIXELS,
    make_image_tree,
    png_with_huge_header,
    save_tiny_vae,
    write_small_dataset,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli():
    """The diffit-pipe app in this process; an exception escaping a command (a traceback) gives exit code 1."""
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    return invoke


def _files(directory: Path) -> dict[str, bytes]:
    """Every file of a directory tree by relative path (the lock file aside): to show nothing was changed."""
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != ".diffit-pipe.lock"
    }


def _manifest(directory: Path) -> dict:
    return json.loads((directory / MANIFEST_NAME).read_text())


def _write_manifest(directory: Path, manifest: dict) -> None:
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------------------------
# 1. Shard names from a manifest never run a command or leave the dataset


def _plant_shard_name(dataset: Path, outside: Path, kind: str) -> str:
    """Rename shard 0 of `dataset` to a hostile name of `kind`; the file it names exists and is a valid shard."""
    shard = dataset / "shard-000000.tar"
    if kind == "pipe":
        name = "pipe:touch PWNED"
        shutil.copyfile(shard, dataset / name)
    elif kind == "parent":
        name = "../outside.tar"
        shutil.copyfile(shard, outside / "outside.tar")
    else:
        name = str(outside / "absolute.tar")
        shutil.copyfile(shard, name)
    manifest = _manifest(dataset)
    manifest["shards"][0]["name"] = name
    _write_manifest(dataset, manifest)
    return name


@pytest.mark.parametrize("kind", ["pipe", "parent", "absolute"])
def test_crafted_shard_name_runs_nothing_and_the_error_names_the_manifest(tmp_path, monkeypatch, cli, kind):
    outside = tmp_path
    dataset = tmp_path / "dataset"
    write_small_dataset(dataset, kind="images", num_shards=2)
    name = _plant_shard_name(dataset, outside, kind)
    monkeypatch.chdir(dataset)

    result = cli("inspect", ".", "--preview", "g.png")
    assert not (dataset / "PWNED").exists() and not (tmp_path / "PWNED").exists(), "the shard name ran a command"
    assert result.exit_code == 2, result.output
    assert "manifest.json" in result.output and repr(name) in result.output
    assert not (dataset / "g.png").exists()

    # The readers the trainer uses: the manifest is refused, and shard_urls refuses a manifest built by hand.
    with pytest.raises(ManifestError, match=r"manifest\.json: shards\[0\] has the name"):
        load_manifest(".")
    with pytest.raises(ManifestError, match="manifest.json"):
        shard_urls(".", _manifest(dataset))
    assert not (dataset / "PWNED").exists()


def test_shard_urls_are_absolute_and_read_as_local_files(tmp_path, monkeypatch):
    dataset = tmp_path / "dataset"
    write_small_dataset(dataset, kind="latents", num_shards=2)
    monkeypatch.chdir(dataset)
    urls = shard_urls(".", load_manifest("."))
    assert urls == [str(dataset / "shard-000000.tar"), str(dataset / "shard-000001.tar")]
    assert all(os.path.isabs(url) for url in urls)

    # A shard whose file name looks like a URL is still opened as a local file by iter_samples.
    (dataset / "pipe:touch PWNED").write_bytes((dataset / "shard-000000.tar").read_bytes())
    samples = list(shards.iter_samples("pipe:touch PWNED"))
    assert len(samples) == 2 and not (dataset / "PWNED").exists()


def test_a_sidecar_naming_another_file_is_not_trusted(tmp_path):
    dataset = tmp_path / "dataset"
    write_small_dataset(dataset, num_shards=2)
    sidecar = json.loads((dataset / "shard-000001.json").read_text())
    assert shards.read_sidecar(dataset, 1) is not None
    (dataset / "shard-000001.json").write_text(json.dumps({**sidecar, "name": "pipe:touch PWNED"}))
    assert shards.read_sidecar(dataset, 1) is None  # resume redoes the shard instead of copying the name


def _crafted_npy(shape: tuple[int, ...]) -> bytes:
    header = "{'descr': '<f2', 'fortran_order': False, 'shape': " + repr(shape) + ", }"
    header += " " * (127 - 10 - len(header)) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 16


def test_array_header_claiming_terabytes_is_a_clear_error(tmp_path, cli):
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    with shards.ShardWriter(dataset, 0) as writer:
        sample = latent_sample("k", np.zeros((2, 4, 4, 4)), np.ones((2, 4, 4, 4)), 0, {})
        writer.write({**sample, "mean.npy": _crafted_npy((100000, 100000, 1000))})
        sidecar = writer.commit({})
    manifest = write_small_dataset(tmp_path / "template", num_shards=1, per_shard=1)
    manifest["shards"] = [{k: sidecar[k] for k in ("name", "count", "sha256", "bytes")}]
    _write_manifest(dataset, manifest)

    raw = next(shards.iter_samples(dataset / "shard-000000.tar"))
    with pytest.raises(ValueError, match=r"k\.mean\.npy: \.npy header says \[100000, 100000, 1000\]"):
        decode_sample(raw)
    result = cli("inspect", dataset, "--preview", tmp_path / "g.png")
    assert result.exit_code == 2 and "cannot read its samples" in result.output


# ---------------------------------------------------------------------------------------------------------------
# 2. Symlink loops in a source tree


def _four_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    for index in range(4):
        Image.new("RGB", (16, 12), (index * 60, 30, 90)).save(folder / f"img{index}.png")


def test_symlink_loop_gives_each_image_once(tmp_path):
    source = tmp_path / "source"
    _four_images(source / "a")
    os.symlink("..", source / "a" / "loop")
    os.symlink("img0.png", source / "a" / "alias.png")  # a second path to the same file

    scanned = scan_folder(source)
    # Each real file once, under the first of its paths in sorted order (a/alias.png sorts before a/img0.png).
    assert sorted(item.path for item in scanned.items) == ["a/alias.png"] + [f"a/img{i}.png" for i in range(1, 4)]
    assert "a/loop/" in scanned.ignored and "a/img0.png" in scanned.ignored
    result = run_encode(
        EncodeOptions(
            source=str(source), out=str(tmp_path / "out"), kind="images", resolution=8, workers=0, progress=False
        )
    )
    assert result.ok and result.counts == {"seen": 4, "written": 4, "failed": 0}


SCAN_CODE = "import sys; from pipeline.encode.sources import scan_folder; print(len(scan_folder(sys.argv[1]).items))"


@pytest.mark.parametrize("layout", ["class-folders", "flat-below-a-class"])
def test_two_links_to_the_same_directory_terminate(tmp_path, layout):
    source = tmp_path / "source"
    folder = source / "a" if layout == "class-folders" else source / "a" / "deeper"
    _four_images(folder)
    os.symlink(".", folder / "x")
    os.symlink(".", folder / "y")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCAN_CODE, str(source)], capture_output=True, text=True, timeout=60, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail("scanning a tree with two links to '.' did not end within 60 s")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4"


READ_CODE = (
    "import sys; from pipeline.encode.sources import SourceItem, read_item_bytes\n"
    "try:\n"
    "    read_item_bytes(SourceItem(index=0, path=sys.argv[2], key='k', label=0, size=0), sys.argv[1])\n"
    "except OSError as error:\n"
    "    print(error)\n"
)


def test_fifo_and_device_in_a_source_tree_are_never_read(tmp_path):
    source = tmp_path / "source"
    _four_images(source / "a")
    os.mkfifo(source / "a" / "fifo.png")  # opening it for reading would wait for a writer forever
    os.symlink("/dev/zero", source / "a" / "zero.png")  # reading it would never end

    scanned = scan_folder(source)
    assert [item.path for item in scanned.items] == [f"a/img{i}.png" for i in range(4)]
    assert {"a/fifo.png", "a/zero.png"} <= set(scanned.ignored)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("a/fifo.png", "a/zero.png"):  # the same refusal when the file is swapped after the scan
        try:
            done = subprocess.run(
                [sys.executable, "-c", READ_CODE, str(source), name],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"reading {name} did not end within 60 s")
        assert "not a regular file" in done.stdout, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------------------------
# 3. encode / pack never destroy another dataset unasked; 4. OUT that cannot be a directory


@pytest.fixture(scope="module")
def job_data(tmp_path_factory):
    """A tiny VAE and an 18-image class tree (3 classes x 4 + 6 awkward names)."""
    root = tmp_path_factory.mktemp("integrity-encode")
    make_image_tree(root / "src", per_class=4)
    return SimpleNamespace(vae=str(save_tiny_vae(root / "vae")), src=root / "src")


def _encode(job_data, out, *options):
    common = ["--resolution", "32", "--vae", job_data.vae, "--shard-size", "2", "--workers", "0"]
    return ["encode", job_data.src, out, *common, "--max-pixels", str(TEST_MAX_PIXELS), "--no-progress", *options]


def _pack(job_data, out, *options):
    return ["pack", job_data.src, out, "--resolution", "32", "--shard-size", "2", "--workers", "0", "--no-progress"]


def test_pack_into_a_latent_dataset_is_refused_unless_overwrite(job_data, tmp_path, cli):
    out = tmp_path / "latents"
    assert cli(*_encode(job_data, out)).exit_code == 0
    before = _files(out)

    result = cli(*_pack(job_data, out))
    assert result.exit_code == 2, result.output
    assert f"{out} holds another dataset" in result.output and "--overwrite" in result.output
    assert "kind" in result.output and _files(out) == before  # nothing deleted or replaced

    result = cli(*_pack(job_data, out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert _manifest(out)["kind"] == "images" and verify_dataset(out).ok


def test_limit_into_a_larger_dataset_is_refused_unless_overwrite(job_data, tmp_path, cli):
    out = tmp_path / "latents"
    assert cli(*_encode(job_data, out)).exit_code == 0
    assert len(list(out.glob("shard-*.tar"))) == 9
    before = _files(out)

    result = cli(*_encode(job_data, out, "--limit", "4"))
    assert result.exit_code == 2, result.output
    assert "shard-000002.tar would be deleted" in result.output and "(and 6 more)" in result.output
    assert _files(out) == before

    # The same command as before resumes: every shard is already complete.
    result = cli(*_encode(job_data, out))
    assert result.exit_code == 0 and "(9 shard(s) were already complete)" in result.output

    result = cli(*_encode(job_data, out, "--limit", "4", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert "(2 shard(s) were already complete)" in result.output  # the shards it keeps are reused
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert _manifest(out)["counts"] == {"seen": 4, "written": 4, "failed": 0}


def test_other_settings_in_out_are_refused_but_resume_of_an_interrupted_run_is_not(job_data, tmp_path, cli):
    out = tmp_path / "latents"
    assert cli(*_encode(job_data, out)).exit_code == 0
    # An interrupted run of the same command: no manifest, a shard lost, another without its sidecar.
    (out / "manifest.json").unlink()
    (out / "shard-000003.tar").unlink()
    (out / "shard-000005.json").unlink()
    result = cli(*_encode(job_data, out))
    assert result.exit_code == 0 and "(7 shard(s) were already complete)" in result.output
    assert verify_dataset(out).ok

    before = _files(out)
    result = cli(*_encode(job_data, out, "--max-pixels", "50000"))  # other transform settings
    assert result.exit_code == 2 and "transform" in result.output and _files(out) == before


def test_out_that_is_a_file_or_under_a_file_is_one_clear_error(job_data, tmp_path, cli):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    for out, message in ((blocker, "is an existing file"), (blocker / "sub", "Not a directory")):
        for command in (_encode(job_data, out), _pack(job_data, out)):
            result = cli(*command)
            assert result.exit_code == 2, result.output
            assert "error: " in result.output and message in result.output and str(out) in result.output
            assert "Traceback" not in result.output
    assert blocker.read_text() == "keep me"


def test_unwritable_out_is_one_clear_error(job_data, tmp_path, cli):
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a read-only directory is still writable")
        result = cli(*_pack(job_data, locked / "out"))
        assert result.exit_code == 2 and "cannot create the output directory" in result.output
        result = cli(*_pack(job_data, locked))
        assert result.exit_code == 2 and "cannot write to the output directory" in result.output
    finally:
        os.chmod(locked, 0o700)


# ---------------------------------------------------------------------------------------------------------------
# 5. --max-pixels above Pillow's own limit takes effect


def test_max_pixels_above_pillows_limit_takes_effect(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "big.png").write_bytes(png_with_huge_header(20000, 9000))  # 180,000,000 > 2 x Pillow's limit
    Image.new("RGB", (20, 20), (10, 200, 30)).save(source / "good.png")

    def failure_reason(out: Path, **settings) -> str:
        config = EncodeOptions(
            source=str(source), out=str(out), kind="images", resolution=8, workers=0, progress=False, **settings
        )
        run_encode(config)
        (failure,) = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
        assert failure["path"].endswith("big.png")
        return failure["reason"]

    reason = failure_reason(tmp_path / "default")
    assert reason.startswith("too many pixels: image is 180000000 pixels, over the limit of 89478485")
    assert "raise --max-pixels" in reason

    reason = failure_reason(tmp_path / "raised", max_pixels=200_000_000)
    assert "too many pixels" not in reason and "decompression" not in reason and "DecompressionBomb" not in reason
    assert "truncated" in reason  # now decoded, and its missing data is the problem
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's limit is back to its default


# ---------------------------------------------------------------------------------------------------------------
# 6. inspect --verify matches sidecars by name; manifest values are checked wherever a dataset is read


def test_verify_names_exactly_the_shard_whose_sidecar_or_entry_is_missing(tmp_path):
    dataset = tmp_path / "dataset"
    manifest = write_small_dataset(dataset, num_shards=5)
    assert verify_dataset(dataset).ok

    (dataset / "shard-000002.json").rename(tmp_path / "kept.json")
    report = verify_dataset(dataset)
    assert len(report.problems) == 1 and "shard-000002" in report.problems[0]
    (tmp_path / "kept.json").rename(dataset / "shard-000002.json")

    # The manifest loses the entry of shard 2 (its counts adjusted): one problem, about shard 2 only.
    entries = [entry for entry in manifest["shards"] if entry["name"] != "shard-000002.tar"]
    counts = {"seen": 8, "written": 8, "failed": 0}
    _write_manifest(dataset, {**manifest, "shards": entries, "counts": counts})
    report = verify_dataset(dataset)
    assert report.checked == 4 and len(report.problems) == 1, report.problems
    assert "shard-000002.tar" in report.problems[0] and "not listed in manifest.json" in report.problems[0]


def _set(manifest: dict, path: str, value) -> dict:
    target = manifest
    *parents, last = path.split(".")
    for key in parents:
        target = target[key]
    target[last] = value
    return manifest


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("vae.scaling_factor", 1e30, "vae.scaling_factor"),
        ("vae.scaling_factor", float("nan"), "vae.scaling_factor"),
        ("vae.scaling_factor", 0, "vae.scaling_factor"),
        ("counts.seen", 11, "counts do not add up"),
        ("counts", {"seen": 12, "written": 12, "failed": 0}, "counts.written is 12"),
        ("resolution", -32, "resolution"),
        ("resolution", 64, "resolution 64"),
        ("latent_shape", [2, 4, 8, 8], "latent_shape"),
        ("num_classes", 3, "label_map"),
        ("num_classes", -1, "num_classes"),
        ("label_map", {"c0": 0, "c1": 5}, "label_map"),
        ("shards.1.sha256", "x", "sha256"),
        ("shards.1.count", -2, "count"),
    ],
)
def test_insane_manifest_values_are_refused_naming_the_field(tmp_path, cli, field, value, named):
    dataset = tmp_path / "dataset"
    manifest = write_small_dataset(dataset, num_shards=5)
    if field.startswith("shards."):
        _, position, key = field.split(".")
        manifest["shards"][int(position)][key] = value
    else:
        _set(manifest, field, value)
    _write_manifest(dataset, manifest)

    with pytest.raises(ManifestError, match=str(dataset / "manifest.json")) as raised:
        load_manifest(dataset)
    assert named in str(raised.value)
    result = cli("inspect", dataset, "--verify")
    assert result.exit_code == 2 and named in result.output, result.output


def test_duplicate_shard_entry_is_refused(tmp_path):
    dataset = tmp_path / "dataset"
    manifest = write_small_dataset(dataset, num_shards=2)
    manifest["shards"].append(manifest["shards"][0])
    manifest["counts"] = {"seen": 6, "written": 6, "failed": 0}
    _write_manifest(dataset, manifest)
    with pytest.raises(ManifestError, match="lists shard-000000.tar a second time"):
        load_manifest(dataset)


# ---------------------------------------------------------------------------------------------------------------
# Packed sources: member names and values from another dataset's tar


def _packed_source(directory: Path, key: str = "c0/item", label: bytes = b"0", meta: bytes = b"{}") -> Path:
    """A one-sample packed dataset whose tar members are written by hand (any name, any content)."""
    write_small_dataset(directory, kind="images", num_shards=1, per_shard=1)
    members = {f"{key}.cls": label, f"{key}.json": meta, f"{key}.png": _png_bytes()}
    with tarfile.open(directory / "shard-000000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, fileobj=io.BytesIO(data))
    manifest = _manifest(directory)
    path = directory / "shard-000000.tar"
    manifest["shards"][0] |= {"bytes": path.stat().st_size, "sha256": shards.sha256_file(path)}
    _write_manifest(directory, manifest)
    return directory


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_packed_source_accepts_a_well_formed_sample(tmp_path):
    source = scan_source(_packed_source(tmp_path / "packed"))
    assert [(item.key, item.label) for item in source.items] == [("c0/item", 0)]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"key": "/etc/evil"}, "unsafe sample key"),
        ({"key": "a\nb"}, "unsafe sample key"),
        ({"label": b"99"}, "label 99, outside the dataset's 2 classes"),
        ({"meta": b"[1, 2]"}, "json member is not an object"),
        ({"meta": b'{"crop_box": "x"}'}, "crop_box"),
    ],
)
def test_packed_source_with_hostile_members_is_refused(tmp_path, settings, message):
    packed = _packed_source(tmp_path / "packed", **settings)
    with pytest.raises(SourceError, match=message):
        scan_source(packed)


# ---------------------------------------------------------------------------------------------------------------
# What `inspect` prints from a dataset


def test_inspect_prints_no_terminal_control_characters_from_a_manifest(tmp_path, cli):
    dataset = tmp_path / "dataset"
    manifest = write_small_dataset(dataset, num_shards=1)
    _write_manifest(dataset, {**manifest, "command": "\x1b]0;owned\x07\x1b[2J", "vae": {"scaling_factor": 0.5}})
    result = cli("inspect", dataset)
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output and "?]0;owned??[2J" in result.output


def test_failure_record_without_text_fields_is_one_clear_error(tmp_path, cli):
    dataset = tmp_path / "dataset"
    write_small_dataset(dataset, num_shards=1)
    (dataset / "failures.jsonl").write_text(json.dumps({"path": 1, "reason": ["x"]}) + "\n")
    result = cli("inspect", dataset)
    assert result.exit_code == 2 and "line 1 is not a failure record" in result.output, result.output
