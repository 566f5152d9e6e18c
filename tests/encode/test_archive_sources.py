"""Encoding ImageNet as it is downloaded: the train archive (a tar of per-class tars), WebDataset tars (local and
through a real S3 server), read in place from their member index, compared with encoding the extracted folder."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipeline.encode.job import EncodeOptions, run_encode
from pipeline.encode.member_index import SOURCE_INDEX_NAME
from pipeline.encode.sources import scan_source
from tests.support.archive_fixtures import class_members, make_train_archive, tar_bytes
from tests.support.encode_fixtures import CLASS_NAMES, kill_job_midway, make_image_tree, save_tiny_vae

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 3-class tree of 18 images (awkward names included), its train archive, and a tiny VAE."""
    root = tmp_path_factory.mktemp("archives")
    labels = make_image_tree(root / "src", per_class=4)
    archive = make_train_archive(root / "src", root / "ILSVRC2012_img_train.tar")
    return SimpleNamespace(
        root=root, src=root / "src", labels=labels, archive=archive, vae=str(save_tiny_vae(root / "vae"))
    )


def _job(source, out, **overrides) -> EncodeOptions:
    settings = dict(
        source=str(source), out=str(out), kind="images", resolution=16, shard_size=8, workers=0, progress=False
    )
    settings.update(overrides)
    return EncodeOptions(**settings)


def _files(out: Path, pattern: str = "shard-*.tar") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob(pattern))}


def _without_run_fields(manifest: dict) -> dict:
    """A manifest without what names the run: time, command, the source and the job fingerprint (which covers the
    items' modification times: the archive's for archive members, each file's for a folder)."""
    return {k: v for k, v in manifest.items() if k not in ("created", "command", "source", "job_fingerprint")}


def _failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# The train archive


def test_train_archive_items_equal_the_extracted_folder(data):
    folder, archive = scan_source(data.src), scan_source(data.archive)
    assert archive.layout == "imagenet-train"
    assert archive.label_map == {name: i for i, name in enumerate(CLASS_NAMES)} == folder.label_map
    assert [(i.path, i.key, i.label) for i in archive.items] == [(i.path, i.key, i.label) for i in folder.items]
    assert len(archive.items) == len(data.labels) == 18
    # Every member is read from its offset in the outer archive: the bytes are the extracted file's.
    raw = data.archive.read_bytes()
    for item in archive.items:
        expected = (data.src / item.path).read_bytes()
        assert raw[item.member_offset : item.member_offset + item.member_size] == expected


@pytest.mark.parametrize("kind", ["images", "latents"])
def test_train_archive_encodes_byte_identical_to_its_extraction(data, tmp_path, kind):
    extra = {"vae": data.vae, "resolution": 32} if kind == "latents" else {}
    folder = run_encode(_job(data.src, tmp_path / "folder", kind=kind, **extra))
    archive = run_encode(_job(data.archive, tmp_path / "archive", kind=kind, **extra))
    assert archive.counts == folder.counts == {"seen": 18, "written": 18, "failed": 0}
    assert _files(tmp_path / "archive") == _files(tmp_path / "folder")
    assert len(_files(tmp_path / "folder")) == 3
    assert _without_run_fields(archive.manifest) == _without_run_fields(folder.manifest)
    hidden = {"count": 1, "first": [f"{CLASS_NAMES[0]}.tar/.DS_Store"]}  # as the folder walk ignores it
    assert archive.manifest["source"] == {
        "root": str(data.archive),
        "layout": "imagenet-train",
        "items": 18,
        "ignored": hidden,
    }


def _cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("CMYK", (20, 24), (10, 200, 30, 0)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 24), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_damaged_members_are_failures_with_reasons_and_the_rest_is_written(data, tmp_path):
    """Class 0's inner tar is cut in the middle of its last member's data (a truncated download), class 1 holds a
    text file, a CMYK JPEG and a PNG named .JPEG (ImageNet has both: converted and written), class 2's inner tar is
    followed by garbage instead of its end blocks."""

    def edit(synset: str, inner: bytes) -> bytes:
        if synset == CLASS_NAMES[0]:
            members = [m for m in class_members(data.src / synset) if not m[0].startswith(".")]
            last_name, last_data = members[-1]
            full = tar_bytes(members)
            return full[: full.index(last_data) + len(last_data) // 2]  # cut inside the last member's data
        if synset == CLASS_NAMES[1]:
            extra = [("readme.txt", b"not an image"), ("cmyk.JPEG", _cmyk_jpeg()), ("png_inside.JPEG", _png_bytes())]
            return tar_bytes(class_members(data.src / synset) + extra)
        end = tar_bytes(class_members(data.src / synset))
        stripped = end.rstrip(b"\0")
        return stripped + b"\0" * (-len(stripped) % 512) + b"garbage!" * 64 + b"\0" * 512

    archive = make_train_archive(data.src, tmp_path / "damaged.tar", edit)
    result = run_encode(_job(archive, tmp_path / "out", max_failure_rate=1.0))
    failures = _failures(tmp_path / "out")
    reasons = {f["key"]: f["reason"] for f in failures}
    assert result.counts == {"seen": 22, "written": 19, "failed": 3}
    cut = {k: r for k, r in reasons.items() if k.startswith(f"{CLASS_NAMES[0]}/")}
    # The reverse member order puts the first name last: it is the one cut off.
    assert list(cut) == [f"{CLASS_NAMES[0]}/{CLASS_NAMES[0]}_0000"]
    assert (
        "truncated tar: member 'n01440764_0000.png' of 14558 bytes is cut off"
        in cut[f"{CLASS_NAMES[0]}/{CLASS_NAMES[0]}_0000"]
    )
    assert reasons[f"{CLASS_NAMES[1]}/readme"] == "not an image file (PIL cannot identify the format)"
    damaged = [r for k, r in reasons.items() if k.startswith(f"{CLASS_NAMES[2]}/")]
    assert len(damaged) == 1 and "not tar headers (damaged tar)" in damaged[0]
    assert all(f["path"].startswith(f"{archive}#") for f in failures)


def test_a_resumed_run_plans_from_the_cached_index_and_a_changed_archive_is_indexed_again(data, tmp_path, caplog):
    out, archive = tmp_path / "out", tmp_path / "train.tar"
    archive.write_bytes(data.archive.read_bytes())
    first = run_encode(_job(archive, out))
    assert (out / SOURCE_INDEX_NAME).is_file()
    shards = _files(out)
    with caplog.at_level(logging.INFO, logger="pipeline.encode.archive_sources"):
        again = run_encode(_job(archive, out))
    assert "planning from the cached member index" in caplog.text
    assert again.shards_skipped == 3 and again.shards_written == 0
    assert again.manifest == first.manifest and _files(out) == shards
    caplog.clear()
    os.utime(archive, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    with caplog.at_level(logging.INFO, logger="pipeline.encode"):
        # Another archive (by its mtime) means other items, as for a folder whose files changed: --overwrite.
        redone = run_encode(_job(archive, out, overwrite=True))
    assert "built from other archive files" in caplog.text
    assert redone.shards_written == 3 and _files(out) == shards  # new mtime: redone, same bytes


def test_limit_and_dry_run_write_no_index(data, tmp_path):
    limited = run_encode(_job(data.archive, tmp_path / "limited", limit=5))
    assert limited.counts["seen"] == 5 and limited.manifest["source"]["limit"] == 5
    assert not (tmp_path / "limited" / SOURCE_INDEX_NAME).exists()
    from pipeline.encode import dry_run

    dry_run(_job(data.archive, tmp_path / "dry", cache_index=False))
    assert not (tmp_path / "dry").exists()


def test_cli_killed_midway_then_rerun_is_byte_identical(data, tmp_path):
    reference = run_encode(_job(data.archive, tmp_path / "reference", shard_size=2))
    out = tmp_path / "killed"
    command = [sys.executable, "-c", "from cli.main import main; main()", "pack", str(data.archive), str(out)]
    command += ["--resolution", "16", "--shard-size", "2", "--workers", "0", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    kill_job_midway(command, REPO, env, out, shards=2)
    assert not (out / "manifest.json").exists()
    import subprocess

    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    assert _files(out) == _files(tmp_path / "reference") and len(_files(out)) == 9
    assert json.loads((out / "manifest.json").read_text())["shards"] == reference.manifest["shards"]


def test_source_format_names_the_layout_and_bad_input_is_one_error_line(data, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    args = ["pack", str(data.src), str(tmp_path / "o"), "--resolution", "16", "--workers", "0", "--no-progress"]
    refused = runner.invoke(app, [*args, "--source-format", "imagenet-train"])
    assert refused.exit_code == 2 and f"error: source {data.src} is not a tar archive file" in refused.output
    unknown = runner.invoke(app, [*args, "--source-format", "zip"])
    assert unknown.exit_code == 2 and "--source-format must be one of" in unknown.output
    notatar = tmp_path / "x.tar"
    notatar.write_bytes(b"hello" * 100)
    missing = runner.invoke(app, ["pack", str(notatar), str(tmp_path / "o2"), "--resolution", "16", "--no-progress"])
    assert missing.exit_code == 2 and "is not a directory, a tar archive or a .parquet file" in missing.output


# ---------------------------------------------------------------------------------------------------------------
# WebDataset tars


def _wds_tars(data, directory: Path) -> dict[str, int]:
    """Two WebDataset tars from the tree: KEY.jpg/png + KEY.cls (one sample labelled by json instead, one with
    an unreadable cls); returns {sample path: label}."""
    directory.mkdir(parents=True, exist_ok=True)
    expected, samples = {}, []
    for i, (rel, label) in enumerate(sorted(data.labels.items())):
        extension = "png" if rel.endswith("png") else "jpg"
        key = f"{i:06d}"
        samples.append((key, extension, (data.src / rel).read_bytes(), label))
    for shard, chunk in enumerate((samples[:10], samples[10:])):
        members = []
        for key, extension, image, label in chunk:
            members.append((f"{key}.{extension}", image))
            if key == "000003":
                members.append((f"{key}.json", json.dumps({"label": label, "url": "x"}).encode()))
            elif key == "000012":
                members.append((f"{key}.cls", b"seven"))
            else:
                members.append((f"{key}.cls", str(label).encode()))
            expected[f"{shard:05d}/{key}.{extension}"] = label
        (directory / f"{shard:05d}.tar").write_bytes(tar_bytes(members))
    return expected


def test_webdataset_tars_labels_and_an_unreadable_label_is_a_failure(data, tmp_path):
    expected = _wds_tars(data, tmp_path / "wds")
    scan = scan_source(tmp_path / "wds")
    assert scan.layout == "webdataset" and scan.label_map == {"0": 0, "1": 1, "2": 2}
    assert {i.path: i.label for i in scan.items} == {**expected, "00001/000012.png": -1}
    result = run_encode(_job(tmp_path / "wds", tmp_path / "out", max_failure_rate=1.0))
    assert result.counts == {"seen": 18, "written": 17, "failed": 1}
    [failure] = _failures(tmp_path / "out")
    assert failure["key"] == "00001/000012" and "unreadable cls label" in failure["reason"]


def test_webdataset_parquet_and_the_train_archive_at_an_s3_url_encode_as_the_local_files(data, tmp_path):
    """Each source at an s3:// URL of a real (rclone) S3 server: ranged GETs of the members / row groups give the
    local files' shards byte for byte."""
    from tests.support.s3_server import rclone_s3_server

    bucket = tmp_path / "server" / "bucket"
    _wds_tars(data, bucket / "wds")  # written before the server starts: it lists them
    _parquet_shards(data, bucket / "pq")
    (bucket / "ILSVRC2012_img_train.tar").write_bytes(data.archive.read_bytes())
    sources = {"wds": "wds", "pq": "pq", "archive": "ILSVRC2012_img_train.tar"}
    local = {
        name: run_encode(_job(bucket / path, tmp_path / f"local-{name}", max_failure_rate=1.0))
        for name, path in sources.items()
    }
    with rclone_s3_server(tmp_path / "server", "bucket", "accesskey123", "secretkey123") as server:
        saved = {k: os.environ.get(k) for k in server.environment}
        os.environ.update(server.environment)
        try:
            remote = {
                name: run_encode(_job(f"s3://bucket/{path}", tmp_path / f"remote-{name}", max_failure_rate=1.0))
                for name, path in sources.items()
            }
        finally:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    assert remote["wds"].counts == local["wds"].counts == {"seen": 18, "written": 17, "failed": 1}
    assert remote["pq"].counts == local["pq"].counts == {"seen": 18, "written": 17, "failed": 1}
    assert remote["archive"].counts == local["archive"].counts == {"seen": 18, "written": 18, "failed": 0}
    for name, path in sources.items():
        assert _files(tmp_path / f"remote-{name}") == _files(tmp_path / f"local-{name}"), name
        assert remote[name].manifest["source"]["root"] == f"s3://bucket/{path}", name
        assert (tmp_path / f"remote-{name}" / SOURCE_INDEX_NAME).is_file(), name


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face parquet shards


def _parquet_shards(data, directory: Path) -> list[tuple[str, int]]:
    """Two parquet files in the HF image schema (row groups of 4 rows), one row with null image bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    rows = [((data.src / rel).read_bytes(), label) for rel, label in sorted(data.labels.items())]
    rows[5] = (None, rows[5][1])
    features = {"features": {"label": {"names": list(CLASS_NAMES)}}}
    schema = pa.schema(
        [("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())],
        metadata={"huggingface": json.dumps({"info": features})},
    )
    for index, chunk in enumerate((rows[:11], rows[11:])):
        table = pa.table(
            {"image": [{"bytes": b, "path": None} for b, _ in chunk], "label": [label for _, label in chunk]},
            schema=schema,
        )
        pq.write_table(table, directory / f"train-{index:05d}-of-00002.parquet", row_group_size=4)
    return rows


def test_parquet_shards_rows_labels_and_a_corrupt_row(data, tmp_path):
    rows = _parquet_shards(data, tmp_path / "pq")
    scan = scan_source(tmp_path / "pq")
    assert scan.layout == "parquet" and scan.label_map == {name: i for i, name in enumerate(CLASS_NAMES)}
    assert [i.label for i in scan.items] == [label for _, label in rows]
    assert scan.items[12].path == "train-00001-of-00002/00000001" and scan.items[12].member_offset == 0
    result = run_encode(_job(tmp_path / "pq", tmp_path / "out", max_failure_rate=1.0))
    assert result.counts == {"seen": 18, "written": 17, "failed": 1}
    [failure] = _failures(tmp_path / "out")
    assert failure["key"] == "train-00000-of-00002/00000005" and "no image bytes" in failure["reason"]
    # Every row but the corrupt one is written, with its label, in row order.
    from pipeline.core import shards
    from pipeline.core.manifest import load_manifest, shard_urls
    from pipeline.core.shard_members import decode_sample

    manifest = load_manifest(tmp_path / "out")
    labels = [
        decode_sample(raw)["cls"] for url in shard_urls(tmp_path / "out", manifest) for raw in shards.iter_samples(url)
    ]
    assert labels == [label for i, (_, label) in enumerate(rows) if i != 5]


# ---------------------------------------------------------------------------------------------------------------
# The validation archive + devkit labels


def _val_archive(data, directory: Path) -> dict[str, str]:
    """ILSVRC2012_img_val.tar of the tree's images renamed ILSVRC2012_val_0000000N.JPEG; returns name → synset."""
    directory.mkdir(parents=True, exist_ok=True)
    truth, members = {}, []
    for number, rel in enumerate(sorted(data.labels), start=1):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        members.append((name, (data.src / rel).read_bytes()))
        truth[name] = rel.split("/")[0]
    (directory / "ILSVRC2012_img_val.tar").write_bytes(tar_bytes(members[::-1]))
    return truth


def test_val_archive_with_loc_val_solution_csv(data, tmp_path):
    truth = _val_archive(data, tmp_path / "val")
    lines = ["ImageId,PredictionString"]
    lines += [f"{name[:-5]},{synset} 1 2 3 4 {synset} 5 6 7 8" for name, synset in truth.items() if "00004" not in name]
    (tmp_path / "val" / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    scan = scan_source(tmp_path / "val" / "ILSVRC2012_img_val.tar")
    assert scan.layout == "imagenet-val" and scan.label_map == {name: i for i, name in enumerate(CLASS_NAMES)}
    items = scan.items
    assert [i.path for i in items] == sorted(truth)
    assert [i.label for i in items if i.packed_meta is None] == [
        CLASS_NAMES.index(truth[i.path]) for i in items if i.packed_meta is None
    ]
    result = run_encode(_job(tmp_path / "val" / "ILSVRC2012_img_val.tar", tmp_path / "out", max_failure_rate=1.0))
    assert result.counts == {"seen": 18, "written": 17, "failed": 1}
    [failure] = _failures(tmp_path / "out")
    assert failure["key"] == "ILSVRC2012_val_00000004" and "no label for this image" in failure["reason"]


def test_val_archive_with_the_devkit_ground_truth_and_meta_mat(data, tmp_path):
    from scipy.io import savemat

    truth = _val_archive(data, tmp_path / "val")
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    # ILSVRC2012 ids are not in synset order (as in the real meta.mat); a non-leaf synset has children.
    ids = {CLASS_NAMES[2]: 1, CLASS_NAMES[0]: 2, CLASS_NAMES[1]: 3}
    synsets = np.array(
        [(ids[s], s, "words", 0) for s in CLASS_NAMES] + [(4, "n00001740", "entity", 3)],
        dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")],
    )
    savemat(devkit / "meta.mat", {"synsets": synsets})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[s]}\n" for s in truth.values()))
    scan = scan_source(tmp_path / "val" / "ILSVRC2012_img_val.tar", labels=str(devkit.parent))
    assert scan.label_map == {name: i for i, name in enumerate(CLASS_NAMES)}
    assert [(i.path, i.label) for i in scan.items] == [(n, CLASS_NAMES.index(truth[n])) for n in sorted(truth)]


# ---------------------------------------------------------------------------------------------------------------
# `reference` straight from the archive


def _reference(source, out, inception_weights, **overrides):
    from pipeline.evaluate.reference.batch import ReferenceOptions, build_reference

    options = ReferenceOptions(Path(source), out, inception_weights, subset_size=7, seed=1, chunk_size=8, batch_size=8)
    options.workers, options.device, options.progress = 0, "cpu", False
    for key, value in overrides.items():
        setattr(options, key, value)
    return build_reference(options)


def test_a_reference_from_the_train_archive_equals_the_reference_of_its_packed_shards(
    data, tmp_path, inception_weights
):
    run_encode(_job(data.src, tmp_path / "packed"))  # the extracted folder, packed at 16 px
    _reference(tmp_path / "packed", tmp_path / "from_shards.npz", inception_weights)
    info = _reference(data.archive, tmp_path / "from_archive.npz", inception_weights, resolution=16)
    with np.load(tmp_path / "from_shards.npz") as expected, np.load(tmp_path / "from_archive.npz") as actual:
        for key in ("arr_0", "subset_indices", "mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)
    source = info["source"]
    assert source["kind"] == "source" and source["num_images"] == 18 and source["failed"] == {"count": 0, "first": []}
    assert source["transform"] == "adm-center-crop to 16 px (as `pack`)" and source["num_classes"] == 3


def test_a_reference_from_a_damaged_archive_lists_indexed_damage_and_stops_at_an_undecodable_member(
    data, tmp_path, inception_weights
):
    """Class 0's inner tar cut inside its last member (the index finds it: listed, left out); then a text file
    among class 1's JPEGs (found when decoded: the build stops naming it, and says how to go on)."""

    def cut(synset: str, inner: bytes) -> bytes:
        if synset != CLASS_NAMES[0]:
            return inner
        members = [m for m in class_members(data.src / synset) if not m[0].startswith(".")]
        full = tar_bytes(members)
        return full[: full.index(members[-1][1]) + len(members[-1][1]) // 2]

    info = _reference(
        make_train_archive(data.src, tmp_path / "cut.tar", cut), tmp_path / "cut.npz", inception_weights, resolution=16
    )
    failed = info["source"]["failed"]
    assert info["num_images_statistics"] == 17 and failed["count"] == 1 and info["source"]["items"] == 18
    assert "truncated tar: member 'n01440764_0000.png'" in failed["first"][0]["reason"]

    def text_member(synset: str, inner: bytes) -> bytes:
        extra = [("readme.JPEG", b"not an image")] if synset == CLASS_NAMES[1] else []
        return tar_bytes(class_members(data.src / synset) + extra)

    archive = make_train_archive(data.src, tmp_path / "text.tar", text_member)
    out = tmp_path / "text.npz"
    command = [sys.executable, "-m", "cli.main", "reference", str(archive), str(out), "--resolution", "16"]
    command += ["--inception-weights", str(inception_weights), "--device", "cpu", "--workers", "1", "--batch-size", "8"]
    import subprocess

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert f"error: {archive}#{CLASS_NAMES[1]}/readme: not an image file" in lines[0] and "diffit-pipe pack" in lines[0]
    assert "Traceback" not in result.stderr and not out.exists()


def test_dask_worker_processes_read_archive_and_parquet_members_in_place_as_one_process_does(data, tmp_path, caplog):
    """A real local Dask cluster (2 worker processes): each task seeks to its members' byte ranges in the train
    archive / reads its parquet row groups; the shards equal those of the in-process run."""
    _parquet_shards(data, tmp_path / "pq")
    for name, source in (("archive", data.archive), ("parquet", tmp_path / "pq")):
        single = run_encode(_job(source, tmp_path / f"{name}-0", shard_size=4, max_failure_rate=1.0))
        with caplog.at_level(logging.INFO, logger="pipeline.encode.cluster"):
            cluster = run_encode(_job(source, tmp_path / f"{name}-2", shard_size=4, workers=2, max_failure_rate=1.0))
        assert "local Dask cluster: 2 worker(s) x 1 thread (processes)" in caplog.text
        assert cluster.counts == single.counts and single.counts["written"] >= 17, name
        assert _files(tmp_path / f"{name}-2") == _files(tmp_path / f"{name}-0"), name
        assert len(_files(tmp_path / f"{name}-0")) == 5, name


def test_max_pixels_and_verify_behave_for_the_archive_as_for_its_extraction(data, tmp_path):
    """--max-pixels fails the same members (with the same reason) as for the folder; --verify re-hashes the shards
    of an archive-encoded dataset and rewrites the one damaged behind its sidecar's back."""
    limit = 60 * 60
    folder = run_encode(_job(data.src, tmp_path / "folder", max_pixels=limit, max_failure_rate=1.0))
    archive = run_encode(_job(data.archive, tmp_path / "archive", max_pixels=limit, max_failure_rate=1.0))
    assert archive.counts == folder.counts and 0 < folder.counts["failed"] < folder.counts["seen"]
    reasons = {f["key"]: f["reason"] for f in _failures(tmp_path / "archive")}
    assert reasons == {f["key"]: f["reason"] for f in _failures(tmp_path / "folder")}
    assert all("pixels" in reason for reason in reasons.values())
    assert _files(tmp_path / "archive") == _files(tmp_path / "folder")

    shard = tmp_path / "archive" / "shard-000001.tar"
    good, stat = shard.read_bytes(), shard.stat()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF
    shard.write_bytes(bytes(damaged))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only a re-hash sees it
    trusted = run_encode(_job(data.archive, tmp_path / "archive", max_pixels=limit, max_failure_rate=1.0))
    assert trusted.shards_written == 0 and shard.read_bytes() == bytes(damaged)
    verified = run_encode(_job(data.archive, tmp_path / "archive", max_pixels=limit, max_failure_rate=1.0, verify=True))
    assert verified.shards_written == 1 and shard.read_bytes() == good


def test_member_names_are_untrusted_no_name_becomes_a_path_on_disk(data, tmp_path):
    """Inner members named `../../escape.JPEG`, `/tmp/abs.JPEG` and `a/../../up.JPEG`: the two that climb out of
    their class are ignored and listed in the manifest (as a folder's stray files are), the absolute name is an
    image under its class with a sanitised key; nothing is created outside OUT."""
    image = (data.src / sorted(data.labels)[1]).read_bytes()
    hostile = [("../../escape.JPEG", image), ("/tmp/abs.JPEG", image), ("a/../../up.JPEG", image)]

    def add(synset: str, inner: bytes) -> bytes:
        return tar_bytes(class_members(data.src / synset) + (hostile if synset == CLASS_NAMES[2] else []))

    (tmp_path / "work").mkdir()
    archive = make_train_archive(data.src, tmp_path / "work" / "hostile.tar", add)
    before = sorted(p for p in tmp_path.rglob("*"))
    result = run_encode(_job(archive, tmp_path / "work" / "out", max_failure_rate=1.0))
    assert result.counts == {"seen": 19, "written": 19, "failed": 0}
    ignored = result.manifest["source"]["ignored"]["first"]
    assert f"{CLASS_NAMES[2]}.tar/../../escape.JPEG" in ignored and f"{CLASS_NAMES[2]}.tar/a/../../up.JPEG" in ignored
    created = sorted(set(tmp_path.rglob("*")) - set(before))
    assert created and all(p.is_relative_to(tmp_path / "work" / "out") for p in created), created
    assert not any(p.name.startswith(("escape", "abs", "up")) for p in tmp_path.rglob("*"))
    from pipeline.core import shards
    from pipeline.core.manifest import load_manifest, shard_urls
    from pipeline.core.shard_members import decode_sample

    keys = [
        decode_sample(raw)["__key__"]
        for url in shard_urls(tmp_path / "work" / "out", load_manifest(tmp_path / "work" / "out"))
        for raw in shards.iter_samples(url)
    ]
    assert not any(".." in key or key.startswith("/") for key in keys)
    strange = [key for key in keys if "abs" in key]
    assert len(strange) == 1 and strange[0].startswith(f"{CLASS_NAMES[2]}/tmp/abs"), strange
