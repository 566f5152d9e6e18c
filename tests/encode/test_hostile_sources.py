"""Hostile encode sources (issue 31, third round): what a file declares is bounded before anything is allocated
for it, bad input is one `error: <file>: <problem>` line (exit 2, nothing written), and a cached member index is
an optimisation, never an authority.

Every hostile file is built here (a few KB). The memory claims are measured, not assumed: the CLI cases run in
one fresh process (`tests/support/hostile_probe.py`) that resets its peak-RSS counter before each case and reports it
beside the process's baseline after a warm-up run of a valid source.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from pipeline.encode.job import EncodeOptions, run_encode
from pipeline.encode.member_index import SOURCE_INDEX_NAME
from pipeline.encode.source_items import MAX_CLASSES
from tests.support.archive_fixtures import class_members, make_train_archive, tar_bytes
from tests.support.encode_fixtures import CLASS_NAMES, make_image_tree

ROOT = Path(__file__).resolve().parents[2]
PEAK_RATIO = 1.5
PACK = ["--resolution", "16", "--workers", "0", "--no-progress"]


def invoke(*args) -> object:
    """`diffit-pipe ARGS` in this process (errors become `error: ...` lines and exit codes, as for a user)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_error_line(output: str, *names: str) -> str:
    """Exactly one line, `error: ...`, naming every one of `names`; no traceback."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def _job(source, out, **overrides) -> EncodeOptions:
    settings = dict(
        source=str(source), out=str(out), kind="images", resolution=16, shard_size=8, workers=0, progress=False
    )
    settings.update(overrides)
    return EncodeOptions(**settings)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def _failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# Hostile files


def wds_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(members))
    return path


def parquet_file(path: Path, rows: list[tuple[bytes | None, int]], **write_options) -> Path:
    """A parquet file in the Hugging Face image schema (no class names: labels name the classes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("label", pa.int64())])
    table = pa.table(
        {"image": [{"bytes": b, "path": None} for b, _ in rows], "label": [label for _, label in rows]}, schema=schema
    )
    pq.write_table(table, path, **write_options)
    return path


def _mat_element(kind: int, data: bytes) -> bytes:
    return struct.pack("<II", kind, len(data)) + data + bytes(-len(data) % 8)


def _mat_header() -> bytes:
    return b"MATLAB 5.0 MAT-file, built by tests/test_hostile_sources.py".ljust(116, b" ") + bytes(8) + b"\x00\x01IM"


def _matrix_start(name: bytes, array_class: int, dims: tuple[int, ...], body: int) -> bytes:
    """The tag, flags, dimensions and name of an miMATRIX whose remaining content is `body` bytes."""
    head = _mat_element(6, struct.pack("<II", array_class, 0))
    head += _mat_element(5, struct.pack(f"<{len(dims)}i", *dims)) + _mat_element(1, name)
    return struct.pack("<II", 14, len(head) + body) + head


def mat_bomb(path: Path, inflated: int) -> Path:
    """A meta.mat whose one compressed variable `synsets` (uint8 zeros, `inflated` bytes) inflates ~1000x."""
    compressor = zlib.compressobj(9)
    chunks = [compressor.compress(_matrix_start(b"synsets", 9, (inflated, 1), 8 + inflated))]
    chunks.append(compressor.compress(struct.pack("<II", 2, inflated)))
    block = bytes(1 << 20)
    for start in range(0, inflated, len(block)):
        chunks.append(compressor.compress(block[: min(len(block), inflated - start)]))
    stream = b"".join(chunks) + compressor.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_mat_header() + struct.pack("<II", 15, len(stream)) + stream)
    return path


def mat_forged_cells(path: Path, cells: int) -> Path:
    """A 200-byte meta.mat whose variable `synsets` declares `cells` cells and holds none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_mat_header() + _matrix_start(b"synsets", 1, (cells, 1), 0))
    return path


def mat_unknown_type(path: Path) -> Path:
    """A meta.mat whose one number is stored as data type 24841: scipy indexes its type table with it unchecked
    (found by fuzzing: a bus error, not an exception)."""
    body = _mat_element(24841, bytes(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_mat_header() + _matrix_start(b"synsets", 6, (1, 1), len(body)) + body)
    return path


def valid_meta(path: Path) -> dict[str, int]:
    """The devkit's meta.mat for the three classes (as tests/encode/test_archive_sources.py builds it)."""
    from scipy.io import savemat

    ids = {CLASS_NAMES[2]: 1, CLASS_NAMES[0]: 2, CLASS_NAMES[1]: 3}
    synsets = np.array(
        [(ids[s], s, "words", 0) for s in CLASS_NAMES] + [(4, "n00001740", "entity", 3)],
        dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"synsets": synsets}, do_compression=True)
    return ids


def val_archive(tree: Path, labels: dict[str, int], directory: Path) -> tuple[Path, dict[str, str]]:
    """ILSVRC2012_img_val.tar of the tree's images; returns (archive, image name → synset)."""
    directory.mkdir(parents=True, exist_ok=True)
    truth, members = {}, []
    for number, rel in enumerate(sorted(labels), start=1):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        members.append((name, (tree / rel).read_bytes()))
        truth[name] = rel.split("/")[0]
    archive = directory / "ILSVRC2012_img_val.tar"
    archive.write_bytes(tar_bytes(members))
    return archive, truth


def devkit(directory: Path, truth: dict[str, str], ground_truth: bytes | None = None, meta=None) -> Path:
    """A devkit directory: data/meta.mat (valid, or written by `meta(path)`) and the ground truth."""
    data = directory / "data"
    ids = valid_meta(data / "meta.mat") if meta is None else meta(data / "meta.mat")
    if ground_truth is None:
        ground_truth = "".join(f"{ids[synset]}\n" for synset in truth.values()).encode()
    (data / "ILSVRC2012_validation_ground_truth.txt").write_bytes(ground_truth)
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 3-class tree of 12 images, its train archive, WebDataset tars and parquet shards, and hostile files."""
    root = tmp_path_factory.mktemp("sources")
    labels = make_image_tree(root / "src", per_class=2)
    archive = make_train_archive(root / "src", root / "ILSVRC2012_img_train.tar")
    images = [(root / "src" / rel).read_bytes() for rel in sorted(labels)]
    jpeg = next(image for image in images if image[:2] == b"\xff\xd8")
    data = SimpleNamespace(root=root, src=root / "src", labels=labels, archive=archive, jpeg=jpeg)
    data.wds_ok = wds_tar(root / "wds-ok" / "00000.tar", [(f"{i:03d}.jpg", jpeg) for i in range(3)])
    data.wds_huge = wds_tar(root / "wds-huge" / "00000.tar", [("000.jpg", jpeg), ("000.cls", b"2000000000")])
    data.wds_big = wds_tar(root / "wds-big" / "00000.tar", [("000.jpg", jpeg), ("000.cls", b"3000000")])
    data.pq_ok = parquet_file(root / "pq-ok" / "train.parquet", [(jpeg, 0), (jpeg, 1)])
    data.pq_huge = parquet_file(root / "pq-huge" / "train.parquet", [(jpeg, 0), (jpeg, 2_000_000_000)])
    data.pq_bomb = parquet_file(
        root / "pq-bomb" / "train.parquet", [(bytes(200 << 20), 0)], compression="zstd", use_dictionary=False
    )
    data.pq_garbage = root / "pq-garbage" / "train.parquet"
    data.pq_garbage.parent.mkdir()
    data.pq_garbage.write_bytes(b"PAR1" + b"not a parquet footer" * 50 + b"PAR1")
    data.val, data.truth = val_archive(data.src, labels, root / "val")
    data.devkit_ok = devkit(root / "devkit-ok", data.truth)
    truth = b"1\n" * len(data.truth)
    data.devkit_bomb = devkit(root / "devkit-bomb", data.truth, truth, meta=lambda p: mat_bomb(p, 400 << 20))
    data.devkit_cells = devkit(root / "devkit-cells", data.truth, truth, meta=lambda p: mat_forged_cells(p, 10**9))
    data.devkit_type = devkit(root / "devkit-type", data.truth, truth, meta=mat_unknown_type)
    return data


# ----------------------------------------------------------------------------------------------------------------
# Peak memory of the CLI on each hostile file, in one fresh process


PROBE_CASES = {
    "wds_label": lambda d: ["pack", d.wds_huge.parent, d.root / "out" / "wds_label", *PACK, "--dry-run"],
    "parquet_label": lambda d: ["pack", d.pq_huge.parent, d.root / "out" / "parquet_label", *PACK, "--dry-run"],
    "parquet_bomb": lambda d: ["pack", d.pq_bomb.parent, d.root / "out" / "parquet_bomb", *PACK, "--dry-run"],
    "meta_bomb": lambda d: ["pack", d.val, d.root / "out" / "meta_bomb", *PACK, "--labels", d.devkit_bomb],
    "meta_cells": lambda d: ["pack", d.val, d.root / "out" / "meta_cells", *PACK, "--labels", d.devkit_cells],
    "meta_type": lambda d: ["pack", d.val, d.root / "out" / "meta_type", *PACK, "--labels", d.devkit_type],
}
PROBE_FILES = {
    "wds_label": lambda d: [f"{d.wds_huge}#000.cls", "label 2000000000", f"maximum {MAX_CLASSES - 1}"],
    "parquet_label": lambda d: [f"{d.pq_huge} row 1", "label 2000000000", f"maximum {MAX_CLASSES - 1}"],
    "parquet_bomb": lambda d: [f"{d.pq_bomb}: row group 0 column image.bytes declares 2097", "compression bomb"],
    "meta_bomb": lambda d: [f"{d.devkit_bomb / 'data' / 'meta.mat'}: a compressed variable inflates to more than"],
    "meta_cells": lambda d: [f"{d.devkit_cells / 'data' / 'meta.mat'}: not a valid meta.mat"],
    "meta_type": lambda d: [f"{d.devkit_type / 'data' / 'meta.mat'}: not a valid meta.mat", "unknown type 24841"],
}


@pytest.fixture(scope="module")
def probe(data):
    """Every case in one fresh process, after a warm-up (a valid parquet dry run); {case: outcome}."""
    warm_up = ["pack", data.pq_ok.parent, data.root / "out" / "warm_up", *PACK, "--dry-run"]
    cases = [{"id": "warm_up", "kind": "cli", "args": [str(a) for a in warm_up]}]
    cases += [{"id": case, "kind": "cli", "args": [str(a) for a in args(data)]} for case, args in PROBE_CASES.items()]
    (data.root / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "support" / "hostile_probe.py"),
            str(data.root / "cases.json"),
            str(data.root / "r"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((data.root / "r").read_text())


def test_probe_warm_up_is_a_valid_source(probe):
    assert probe["warm_up"]["exit_code"] == 0, probe["warm_up"]


@pytest.mark.parametrize("case", list(PROBE_CASES))
def test_hostile_source_is_one_error_line_within_memory(probe, data, case):
    """A label of 2e9 (WebDataset .cls, parquet cell), a parquet cell of 200 MB of zeros in a few KB, a meta.mat
    inflating to 400 MB, a meta.mat declaring 10^9 cells: exit 2, one line naming the file, nothing written, and
    the peak RSS within 1.5x the process's baseline."""
    outcome = probe[case]
    assert outcome.get("exit_code") == 2, outcome
    assert_one_error_line(outcome["stderr"], *PROBE_FILES[case](data))
    assert outcome["peak_kib"] <= PEAK_RATIO * outcome["baseline_kib"], (
        f"peak {outcome['peak_kib'] / 1024:.0f} MiB over {PEAK_RATIO} x baseline {outcome['baseline_kib'] / 1024:.0f}"
    )
    assert not (data.root / "out" / case).exists()


# ----------------------------------------------------------------------------------------------------------------
# Labels


def test_a_label_above_max_classes_writes_nothing(data, tmp_path):
    """A 1.5 KB tar with a label of 3e6 used to write a 70 MB manifest and a 58 MB index."""
    out = tmp_path / "out"
    result = invoke("pack", data.wds_big.parent, out, *PACK)
    assert result.exit_code == 2
    assert_one_error_line(result.output, f"{data.wds_big}#000.cls", "label 3000000", f"maximum {MAX_CLASSES - 1}")
    assert not out.exists()


def test_a_parquet_label_outside_its_class_names_is_refused(data, tmp_path):
    """With Hugging Face class names, the label map's size is the maximum."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = {"info": {"features": {"label": {"names": list(CLASS_NAMES)}}}}
    table = pq.read_table(data.pq_ok).set_column(1, "label", pa.array([0, 3], pa.int64()))
    table = table.replace_schema_metadata({"huggingface": json.dumps(names)})
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "train.parquet")
    result = invoke("pack", tmp_path / "pq", tmp_path / "out", *PACK)
    assert result.exit_code == 2
    assert_one_error_line(result.output, "train.parquet row 1: label 3 is above the maximum 2 (the label map's 3")


# ----------------------------------------------------------------------------------------------------------------
# Parquet


def test_a_garbage_parquet_file_is_one_error_line(data, tmp_path):
    result = invoke("pack", data.pq_garbage, tmp_path / "out", *PACK)
    assert result.exit_code == 2
    assert_one_error_line(result.output, f"{data.pq_garbage}: not a readable parquet file")
    assert not (tmp_path / "out").exists()


def test_a_parquet_file_declaring_more_rows_than_bytes_is_refused(data, tmp_path):
    """Run-length encoding lets a few KB declare 10^6 rows (null images, one label): each would be an item."""
    path = parquet_file(tmp_path / "pq" / "rows.parquet", [(None, 0)] * 10**6, compression="zstd")
    assert path.stat().st_size < 10**5
    result = invoke("pack", path, tmp_path / "out", *PACK)
    assert result.exit_code == 2
    assert_one_error_line(result.output, f"{path}: declares 1000000 rows in {path.stat().st_size} bytes")


def test_parquet_rows_are_read_in_bounded_batches(data, tmp_path, monkeypatch):
    """The label column is read in batches (a 3-row file in batches of 2 still gives every row once)."""
    from pipeline.encode import parquet_source
    from pipeline.encode.sources import scan_source

    monkeypatch.setitem(parquet_source._BATCH_ROWS, "label", 2)
    monkeypatch.setitem(parquet_source._BATCH_ROWS, "image", 2)
    path = parquet_file(tmp_path / "pq" / "three.parquet", [(data.jpeg, 0), (data.jpeg, 2), (data.jpeg, 1)])
    scan = scan_source(path.parent)
    assert [(i.label, i.member_offset, i.member_size) for i in scan.items] == [(0, 0, 0), (2, 0, 1), (1, 0, 2)]
    result = run_encode(_job(path.parent, tmp_path / "out"))
    assert result.counts == {"seen": 3, "written": 3, "failed": 0}


# ----------------------------------------------------------------------------------------------------------------
# The devkit


@pytest.mark.parametrize(
    ("ground_truth", "problem"),
    [(b"1\n2\nabc\n", "line 3 is 'abc', not an ILSVRC2012_ID"), (b"1\n\xe9\n", "line 2 is '\\\\xe9'")],
)
def test_devkit_ground_truth_that_is_not_ids_is_one_error_line(data, tmp_path, ground_truth, problem):
    kit = devkit(tmp_path / "devkit", data.truth, ground_truth=ground_truth)
    result = invoke("pack", data.val, tmp_path / "out", *PACK, "--labels", kit)
    assert result.exit_code == 2
    where = kit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    assert_one_error_line(result.output, f"{where}: {problem}")
    assert not (tmp_path / "out").exists()


def test_a_loc_val_solution_csv_that_is_not_utf8_is_one_error_line(data, tmp_path):
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_bytes(b"ImageId,PredictionString\nILSVRC2012_val_00000001,n01440764 1 2 3 4\n\xff\xfe,x\n")
    result = invoke("pack", data.val, tmp_path / "out", *PACK, "--labels", csv)
    assert result.exit_code == 2
    assert_one_error_line(result.output, f"{csv}: line 3 is not UTF-8 text")
    assert not (tmp_path / "out").exists()


def test_a_devkit_tar_gz_is_bounded_like_its_directory(data, tmp_path):
    """The same meta.mat bomb inside ILSVRC2012_devkit_t12.tar.gz; a garbage .tar.gz is one line too."""
    kit = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    with tarfile.open(kit, "w:gz") as tar:
        tar.add(data.devkit_bomb, arcname="ILSVRC2012_devkit_t12")
    assert kit.stat().st_size < 2 << 20
    result = invoke("pack", data.val, tmp_path / "out", *PACK, "--labels", kit)
    assert result.exit_code == 2
    assert_one_error_line(result.output, f"{kit}#ILSVRC2012_devkit_t12/data/meta.mat: a compressed variable inflates")
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"\x1f\x8b" + b"garbage" * 100)
    result = invoke("pack", data.val, tmp_path / "out", *PACK, "--labels", garbage)
    assert result.exit_code == 2
    assert_one_error_line(result.output, f"{garbage}: not a readable devkit tar.gz")
    assert not (tmp_path / "out").exists()


def test_a_valid_devkit_still_labels_the_validation_archive(data):
    from pipeline.encode.sources import scan_source

    scan = scan_source(data.val, labels=str(data.devkit_ok))
    assert scan.label_map == {name: i for i, name in enumerate(CLASS_NAMES)}
    assert [(i.path, i.label) for i in scan.items] == [(n, CLASS_NAMES.index(s)) for n, s in sorted(data.truth.items())]


# ----------------------------------------------------------------------------------------------------------------
# A cached index is an optimisation, never an authority


def _rewrite_index(path: Path, change) -> None:
    """Apply `change(meta, arrays)` to the cached index's meta (json) and arrays, and save it back as np.savez does."""
    with np.load(path) as stored:
        arrays = {name: stored[name] for name in stored.files}
    meta = json.loads(arrays["meta"].tobytes())
    change(meta, arrays)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def _location(meta, arrays, outside):
    meta["groups"][1][1] = str(outside)


def _misaligned(meta, arrays, outside):
    arrays["offsets"] = arrays["offsets"] + np.arange(len(arrays["offsets"])) % 2


def _overlap(meta, arrays, outside):
    offsets = arrays["offsets"].copy()
    offsets[1] = offsets[0]
    arrays["offsets"] = offsets


def _unsafe_key(meta, arrays, outside):
    arrays["keys"] = np.frombuffer(arrays["keys"].tobytes().replace(b"n01443537/", b"../../x/", 1), dtype=np.uint8)


def _label(meta, arrays, outside):
    arrays["labels"] = np.full_like(arrays["labels"], 7)


@pytest.mark.parametrize("change", [_location, _misaligned, _overlap, _unsafe_key, _label])
def test_a_tampered_index_is_rebuilt_with_a_warning_and_the_shards_are_the_clean_runs(data, tmp_path, caplog, change):
    """One group's location rewritten to a file outside the source (a same-sized file of other bytes), member
    offsets moved off their data, a key that climbs out, labels outside the label map: the rerun logs a warning,
    indexes the archive again and writes the clean run's shards; nothing outside the source is read."""
    clean = tmp_path / "clean"
    run_encode(_job(data.archive, clean))
    outside = tmp_path / "outside.tar"
    outside.write_bytes(bytes(b ^ 0x5A for b in data.archive.read_bytes()))
    out = tmp_path / "out"
    out.mkdir()
    (out / SOURCE_INDEX_NAME).write_bytes((clean / SOURCE_INDEX_NAME).read_bytes())
    _rewrite_index(out / SOURCE_INDEX_NAME, lambda meta, arrays: change(meta, arrays, outside))
    with caplog.at_level(logging.WARNING, logger="pipeline.encode"):
        result = run_encode(_job(data.archive, out))
    assert "ignoring the source index" in caplog.text and "indexing again" in caplog.text
    assert result.counts == {"seen": 12, "written": 12, "failed": 0}
    assert _files(out) == _files(clean)
    with np.load(out / SOURCE_INDEX_NAME) as rebuilt, np.load(clean / SOURCE_INDEX_NAME) as original:
        assert all(np.array_equal(rebuilt[name], original[name]) for name in original.files)


def _zip_bomb_index(path: Path) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("meta.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": (64 << 20,)})
            for _ in range(64):
                member.write(bytes(1 << 20))


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b"not an npz at all"),
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
        lambda p: _rewrite_index(p, lambda meta, arrays: meta.__setitem__("groups", "x")),
        lambda p: _rewrite_index(p, lambda meta, arrays: meta.__setitem__("identities", [{"size": "big"}])),
        lambda p: _rewrite_index(p, lambda meta, arrays: arrays.__setitem__("offsets", arrays["offsets"][:-1])),
        lambda p: _rewrite_index(p, lambda meta, arrays: meta["problems"].__setitem__("99999", 3)),
        _zip_bomb_index,
    ],
    ids=["garbage", "truncated", "groups", "identities", "lengths", "problems", "zip-bomb"],
)
def test_a_malformed_index_is_never_a_traceback(data, tmp_path, caplog, damage):
    clean = tmp_path / "clean"
    run_encode(_job(data.archive, clean))
    out = tmp_path / "out"
    out.mkdir()
    (out / SOURCE_INDEX_NAME).write_bytes((clean / SOURCE_INDEX_NAME).read_bytes())
    damage(out / SOURCE_INDEX_NAME)
    with caplog.at_level(logging.WARNING, logger="pipeline.encode"):
        result = run_encode(_job(data.archive, out))
    assert "source index" in caplog.text and "indexing again" in caplog.text
    assert result.counts["written"] == 12 and _files(out) == _files(clean)


# ----------------------------------------------------------------------------------------------------------------
# Links, duplicate keys, a truncated outer tar


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, target, 1_600_000_000
    return info


def test_link_members_are_listed_with_their_reason(data, tmp_path):
    """A symbolic and a hard link inside a per-class tar and a WebDataset tar: never read, listed in the manifest's
    ignored members with why."""

    def add_links(synset: str, inner: bytes) -> bytes:
        if synset != CLASS_NAMES[2]:
            return inner
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, content in class_members(data.src / synset):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(content), 1_600_000_000
                tar.addfile(info, io.BytesIO(content))
            tar.addfile(_link("evil.JPEG", "/etc/passwd", tarfile.SYMTYPE))
            tar.addfile(_link("hard.JPEG", "/etc/shadow", tarfile.LNKTYPE))
        return buffer.getvalue()

    archive = make_train_archive(data.src, tmp_path / "links.tar", add_links)
    result = run_encode(_job(archive, tmp_path / "out"))
    assert result.counts == {"seen": 12, "written": 12, "failed": 0}
    ignored = result.manifest["source"]["ignored"]["first"]
    assert f"{CLASS_NAMES[2]}.tar/evil.JPEG (a symbolic link to '/etc/passwd': links are not followed)" in ignored
    assert f"{CLASS_NAMES[2]}.tar/hard.JPEG (a hard link to '/etc/shadow': links are not followed)" in ignored

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("000.jpg")
        info.size = len(data.jpeg)
        tar.addfile(info, io.BytesIO(data.jpeg))
        tar.addfile(_link("001.jpg", "/etc/passwd", tarfile.SYMTYPE))
    wds = tmp_path / "wds" / "00000.tar"
    wds.parent.mkdir()
    wds.write_bytes(buffer.getvalue())
    result = run_encode(_job(wds.parent, tmp_path / "wds-out"))
    assert result.manifest["source"]["ignored"]["first"] == [
        f"{wds}#001.jpg (a symbolic link to '/etc/passwd': links are not followed)"
    ]


def test_a_duplicate_webdataset_key_is_a_listed_failure(data, tmp_path):
    """`000` has two .cls members (0 and 1): which label is meant is unknown; the sample is a failure with the
    reason, the second member is listed, the other samples are written."""
    members = [("000.jpg", data.jpeg), ("000.cls", b"0"), ("000.cls", b"1"), ("001.jpg", data.jpeg), ("001.cls", b"1")]
    members += [("002.jpg", data.jpeg), ("002.cls", b"0"), ("002.jpg", data.jpeg)]
    tar = wds_tar(tmp_path / "wds" / "00000.tar", members)
    result = run_encode(_job(tar.parent, tmp_path / "out", max_failure_rate=1.0))
    assert result.counts == {"seen": 3, "written": 1, "failed": 2}
    reasons = {f["key"]: f["reason"] for f in _failures(tmp_path / "out")}
    assert set(reasons) == {"00000/000", "00000/002"}
    assert "duplicate key: 000.cls repeat(s) a member" in reasons["00000/000"]
    assert "duplicate key: 002.jpg repeat(s) a member" in reasons["00000/002"]
    ignored = result.manifest["source"]["ignored"]["first"]
    assert (
        f"{tar}#000.cls (a duplicate of the key 000)" in ignored
        and f"{tar}#002.jpg (a duplicate of the key 002)" in ignored
    )


def test_a_truncated_outer_train_tar_keeps_what_can_be_read_and_lists_the_rest(data, tmp_path):
    """The download is cut inside the header of the last per-class tar: the classes before it are written, the
    unreadable rest is one listed failure (it used to refuse the whole archive)."""
    raw = data.archive.read_bytes()
    with tarfile.open(data.archive) as tar:
        last = tar.getmembers()[-1]
    cut = tmp_path / "ILSVRC2012_img_train.tar"
    cut.write_bytes(raw[: last.offset + 200])  # inside the last member's header
    result = run_encode(_job(cut, tmp_path / "out", max_failure_rate=1.0))
    lost = len([rel for rel in data.labels if rel.startswith(last.name[: -len(".tar")])])
    assert result.counts == {"seen": 12 - lost + 1, "written": 12 - lost, "failed": 1}
    [failure] = _failures(tmp_path / "out")
    assert "bytes after the last readable member are not tar headers" in failure["reason"]
    assert "the members after byte" in failure["reason"] and "cannot be listed" in failure["reason"]
    assert last.name[: -len(".tar")] not in result.manifest["label_map"]


def test_an_index_is_bound_to_the_bytes_it_was_built_from(data, tmp_path, caplog):
    """Same size and mtime, other bytes in the archive's first headers: the cached index is not used."""
    archive = tmp_path / "train.tar"
    archive.write_bytes(data.archive.read_bytes())
    stat = archive.stat()
    run_encode(_job(archive, tmp_path / "out"))
    raw = bytearray(archive.read_bytes())
    with tarfile.open(archive) as tar:
        first = tar.getmembers()[0]
    raw[first.offset_data + 600] ^= 0xFF  # inside the first inner tar, in the first 64 KiB
    archive.write_bytes(bytes(raw))
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with caplog.at_level(logging.INFO, logger="pipeline.encode"):
        run_encode(_job(archive, tmp_path / "out", overwrite=True, max_failure_rate=1.0))
    assert "built from other archive files" in caplog.text
    assert "planning from the cached member index" not in caplog.text


def test_a_member_header_declaring_8_gib_is_a_failure_and_the_index_stays_usable(data, tmp_path, caplog):
    """A WebDataset tar whose second image's header declares 8 GiB (no data follows): a failure with the reason,
    nothing is read for it, and the cached index (which holds it as damaged) is used by the rerun."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("000.jpg")
        info.size = len(data.jpeg)
        tar.addfile(info, io.BytesIO(data.jpeg))
        huge = tarfile.TarInfo("001.jpg")
        huge.size = 8 << 30
        tar.addfile(huge)  # the header only
    wds = tmp_path / "wds" / "00000.tar"
    wds.parent.mkdir()
    wds.write_bytes(buffer.getvalue())
    assert wds.stat().st_size < 20_000
    result = run_encode(_job(wds.parent, tmp_path / "out", max_failure_rate=1.0))
    assert result.counts == {"seen": 2, "written": 1, "failed": 1}
    [failure] = _failures(tmp_path / "out")
    assert "truncated tar: member '001.jpg' of 8589934592 bytes is cut off" in failure["reason"]
    with caplog.at_level(logging.INFO, logger="pipeline.encode"):
        again = run_encode(_job(wds.parent, tmp_path / "out", max_failure_rate=1.0))
    assert "planning from the cached member index" in caplog.text and "indexing again" not in caplog.text
    assert again.counts == result.counts


def test_a_truncated_validation_archive_keeps_what_can_be_read(data, tmp_path):
    """The validation archive cut inside its last member's header: the images before it are labelled and written,
    the rest is one listed failure (it used to refuse the whole archive)."""
    with tarfile.open(data.val) as tar:
        last = tar.getmembers()[-1]
    cut = tmp_path / "ILSVRC2012_img_val.tar"
    cut.write_bytes(data.val.read_bytes()[: last.offset + 300])
    result = run_encode(_job(cut, tmp_path / "out", labels=str(data.devkit_ok), max_failure_rate=1.0))
    assert result.counts == {"seen": 12, "written": 11, "failed": 1}
    [failure] = _failures(tmp_path / "out")
    assert failure["key"].startswith("_damaged-ILSVRC2012_img_val") and "cannot be listed" in failure["reason"]


@pytest.mark.parametrize("layout", ["imagenet-train", "imagenet-val", "webdataset", "parquet"])
def test_a_valid_cached_index_passes_every_check(data, tmp_path, caplog, layout):
    """The checks refuse only what the source could not have produced: every layout's own index is used."""
    source, extra = {
        "imagenet-train": (data.archive, {}),
        "imagenet-val": (data.val, {"labels": str(data.devkit_ok)}),
        "webdataset": (data.wds_ok.parent, {}),
        "parquet": (data.pq_ok.parent, {}),
    }[layout]
    first = run_encode(_job(source, tmp_path / "out", **extra))
    assert (tmp_path / "out" / SOURCE_INDEX_NAME).is_file()
    with caplog.at_level(logging.INFO, logger="pipeline.encode"):
        again = run_encode(_job(source, tmp_path / "out", **extra))
    assert "planning from the cached member index" in caplog.text and "indexing again" not in caplog.text
    assert again.manifest["shards"] == first.manifest["shards"]
