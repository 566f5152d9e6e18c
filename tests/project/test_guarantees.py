"""The guarantees `docs/architecture.md` states, each tested for what it promises rather than for its line of code.

Each test here was written against a one-line bug that every earlier test let through (a mutation audit of the
object-storage, ADM-protocol, integrity, preemption and released-weights code), and was seen to fail with that bug
applied and to pass without it. The list of guarantees and the tests that fail when each is removed is in
`docs/architecture.md`, "Contracts every stage follows".

Faults are injected by wrapping the real call (`os.replace`, `os.fsync`, a worker's batch writer) so that it fails
or records, never by replacing a part with a stand-in.
"""

from __future__ import annotations

import errno
import html.parser
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import pipeline.core.atomic as atomic
from cli.main import app
from pipeline.core import shards
from pipeline.core.manifest import MANIFEST_NAME, load_manifest, shard_urls
from pipeline.core.shard_members import image_sample
from pipeline.core.storage import Location
from pipeline.core.storage_io import StorageError
from tests.support.encode_fixtures import make_image_tree
from tests.support.eval_fixtures import make_random_inception_weights, smooth_images, write_folder_reference
from tests.support.train_fixtures import write_latent_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args) -> object:
    """`diffit-pipe ARGS` in this process (errors become `error: ...` lines and exit codes, as for a user)."""
    return CliRunner().invoke(app, [str(a) for a in args])


# ----------------------------------------------------------------------------------------------------------------
# Atomic files: the data reaches the disk before the rename, the rename reaches it after


def _fsync_trace(monkeypatch) -> list[tuple[str, str]]:
    """Record every `os.fsync` (as the path its descriptor names) and `os.replace`, in order; both still run."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        return real_fsync(descriptor)

    def replace(source, target, **kwargs):
        events.append(("replace", f"{os.fspath(source)} -> {os.fspath(target)}"))
        return real_replace(source, target, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _write_with_atomic_file(path: Path) -> None:
    writer = atomic.AtomicFile(path)
    writer.handle.write(b"new bytes")
    writer.commit()


def _write_with_atomic_path(path: Path) -> None:
    with atomic.atomic_path(path) as temp:
        Path(temp).write_bytes(b"new bytes")


def _write_with_location_writer(path: Path) -> None:
    writer = Location.of(path.parent).writer(path.name)  # shard tars are written this way
    writer.handle.write(b"new bytes")
    writer.commit()


WRITERS = {
    "AtomicFile": _write_with_atomic_file,
    "atomic_open": lambda path: atomic.write_bytes_atomic(path, b"new bytes"),
    "atomic_path": _write_with_atomic_path,
    "Location.writer": _write_with_location_writer,
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_atomic_writer_fsyncs_the_data_before_the_rename_and_the_directory_after(tmp_path, monkeypatch, writer):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old bytes")
    events = _fsync_trace(monkeypatch)
    WRITERS[writer](target)
    assert target.read_bytes() == b"new bytes"
    renames = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    assert len(renames) == 1, events
    temp = events[renames[0]][1].split(" -> ")[0]
    assert events[renames[0]][1] == f"{temp} -> {target}" and atomic.TEMP_MARK in temp
    # The temporary file's data is on disk before its name replaces the old file (else a power loss can leave
    # an empty file under the final name), and the directory entry is on disk after the rename.
    assert ("fsync", temp) in events[: renames[0]], events
    assert ("fsync", str(tmp_path)) in events[renames[0] + 1 :], events


# ----------------------------------------------------------------------------------------------------------------
# replace_directory: a crash while the new directory is swapped in never loses the old one


def _directory(path: Path, text: str) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "a.txt").write_text(text)
    (path / "sub" / "b.txt").write_text(text * 2)
    return path


def _contents(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _failing_publish(monkeypatch, new: Path) -> None:
    """`os.replace` fails (EIO, as a crash at that point would stop it) when it would move `new` into place."""
    real_replace = os.replace

    def replace(source, target, **kwargs):
        if Path(source) == new:
            raise OSError(errno.EIO, "simulated crash while publishing", str(source))
        return real_replace(source, target, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_a_crash_while_a_directory_is_swapped_in_keeps_the_old_directory_complete(tmp_path, monkeypatch):
    target, new = _directory(tmp_path / "step-0000006", "old"), _directory(tmp_path / ".tmp-step-0000006", "new")
    old_contents = _contents(target)
    _failing_publish(monkeypatch, new)
    with pytest.raises(OSError, match="simulated crash"):
        atomic.replace_directory(new, target)
    # The old directory is still on disk, complete (under its own name or the name it was moved aside to).
    survivors = [p for p in tmp_path.iterdir() if p.is_dir() and _contents(p) == old_contents]
    assert survivors, sorted(p.name for p in tmp_path.iterdir())


def test_a_failed_directory_swap_leaves_the_old_directory_under_its_name(tmp_path, monkeypatch):
    target, new = _directory(tmp_path / "model", "old"), _directory(tmp_path / ".model.tmp-x", "new")
    old_contents = _contents(target)
    _failing_publish(monkeypatch, new)
    with pytest.raises(OSError, match="simulated crash"):
        atomic.replace_directory(new, target)
    assert target.is_dir() and _contents(target) == old_contents


# ----------------------------------------------------------------------------------------------------------------
# Commit order: shard tar before its sidecar; the manifest removed when a job starts and written last


def test_a_shard_whose_tar_cannot_be_published_gets_no_sidecar(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace(source, target, **kwargs):
        if Path(target).name == shards.shard_name(0):
            raise OSError(errno.EIO, "simulated crash while publishing the tar", str(source))
        return real_replace(source, target, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    writer = shards.ShardWriter(tmp_path, 0)
    writer.write(image_sample("c0/item", np.zeros((8, 8, 3), np.uint8), 0, {"source": "x"}))
    with pytest.raises(OSError, match="simulated crash"):
        writer.commit({"failures": 0})
    writer.abort()
    # The sidecar is a shard's commit marker: without its tar there must be none (else resume trusts a ghost).
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def pack_source(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack-source")
    make_image_tree(root / "src", per_class=2)  # 12 images
    return root / "src"


def _pack(source: Path, out: Path, *extra) -> object:
    arguments = ["pack", source, out, "--resolution", "16", "--shard-size", "4", "--workers", "0", "--no-progress"]
    return invoke(*arguments, *extra)


def test_an_overwrite_rerun_removes_the_manifest_before_it_changes_a_shard(pack_source, tmp_path, monkeypatch):
    import pipeline.encode.worker as encode_job

    out = tmp_path / "out"
    assert _pack(pack_source, out).exit_code == 0 and (out / MANIFEST_NAME).is_file()
    seen_at_first_batch: list[bool] = []

    def killed_after_observing(writer, vae, ready, failures, task):
        seen_at_first_batch.append((out / MANIFEST_NAME).exists())
        raise RuntimeError("simulated kill of the rerun")

    monkeypatch.setattr(encode_job, "write_batch", killed_after_observing)
    result = _pack(pack_source, out, "--resolution", "24", "--overwrite")
    assert result.exit_code == 1, result.output
    # While the shards change, and after the rerun died, no manifest says the dataset is complete.
    assert seen_at_first_batch and not any(seen_at_first_batch)
    assert not (out / MANIFEST_NAME).exists()


# ----------------------------------------------------------------------------------------------------------------
# Locks: one job per output directory


def test_a_second_job_on_a_locked_output_directory_stops_at_once_and_changes_nothing(pack_source, tmp_path):
    out = tmp_path / "out"
    assert _pack(pack_source, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with Location.of(out).lock():  # another job holds the directory
        result = _pack(pack_source, out, "--overwrite", "--resolution", "24")
    assert result.exit_code == 2 and "another diffit-pipe job is writing to" in result.output, result.output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# ----------------------------------------------------------------------------------------------------------------
# Trusted resume: a finished shard is kept unread only on the word of its sealed sidecar


def test_a_sidecar_edited_after_it_was_sealed_is_not_trusted(pack_source, tmp_path):
    out = tmp_path / "out"
    assert _pack(pack_source, out).exit_code == 0
    truth = shards.sha256_file(out / "shard-000001.tar")
    sidecar = json.loads((out / "shard-000001.json").read_text())
    (out / "shard-000001.json").write_text(json.dumps({**sidecar, "sha256": "0" * 64}))  # seal left as it was
    result = _pack(pack_source, out)
    assert result.exit_code == 0, result.output
    # Not trusted: its tar was re-hashed against the edited record, redone, and the manifest holds the truth.
    assert "(2 shard(s) were already complete)" in result.output, result.output
    entry = next(e for e in load_manifest(out)["shards"] if e["name"] == "shard-000001.tar")
    assert entry["sha256"] == truth == shards.sha256_file(out / "shard-000001.tar")


def test_a_tar_of_another_size_than_its_sidecar_records_is_not_trusted(pack_source, tmp_path):
    out = tmp_path / "out"
    assert _pack(pack_source, out).exit_code == 0
    tar = out / "shard-000001.tar"
    original, before = tar.read_bytes(), tar.stat()
    with open(tar, "ab") as handle:  # one more zero block: still a readable tar, but not the one recorded
        handle.write(bytes(512))
    os.utime(tar, ns=(before.st_atime_ns, before.st_mtime_ns))  # and no newer than its sidecar
    result = _pack(pack_source, out)
    assert result.exit_code == 0, result.output
    assert "(2 shard(s) were already complete)" in result.output, result.output
    assert tar.read_bytes() == original


# ----------------------------------------------------------------------------------------------------------------
# Verification: shards while training, checkpoints before resuming


def test_a_shard_rewritten_with_its_mtime_restored_is_hashed_again(tmp_path):
    from pipeline.train.shard_reading import CorruptShardError, read_shard

    data = write_latent_dataset(tmp_path / "data", num_samples=4, num_shards=2)
    shard = data / "shard-000001.tar"
    expected = shards.sha256_file(shard)
    assert bytes(read_shard(str(shard), expected)) == shard.read_bytes()  # verified once: trusted from now on
    before = shard.stat()
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    with open(shard, "r+b") as handle:  # in place: same inode, same size
        handle.write(bytes(raw))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (shard.stat().st_size, shard.stat().st_mtime_ns, shard.stat().st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    with pytest.raises(CorruptShardError, match="does not match the manifest"):
        read_shard(str(shard), expected)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run directory with checkpoints at steps 3 and 6, written by `save_checkpoint` for a tiny model."""
    from accelerate import Accelerator

    from pipeline.train.checkpoint import save_checkpoint

    run_dir = tmp_path_factory.mktemp("checkpoints") / "run"
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    for step in (3, 6):
        state = {
            "step": step,
            "images_seen": 4 * step,
            "dataset": {"path": "/data", "manifest_hash": "0" * 64},
            "model": {"name": "linear", "kwargs": {}},
            "diffusion": {},
        }
        save_checkpoint(accelerator, run_dir, step, ema, state, "model: {name: linear}\n", keep=5)
    return run_dir


def _edit(path: Path) -> None:
    """A change a reader still accepts: valid JSON / YAML with another value, or one flipped byte."""
    if path.suffix == ".json":
        state = json.loads(path.read_text())
        path.write_text(json.dumps({**state, "images_seen": state["images_seen"] + 1}))
    elif path.suffix == ".yaml":
        path.write_text(path.read_text().replace("linear", "lineaR"))
    else:
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        path.write_bytes(bytes(raw))


def test_every_file_of_a_checkpoint_is_verified_before_resume(two_checkpoints, tmp_path, caplog):
    from pipeline.train.checkpoint import resolve_checkpoint

    newest = two_checkpoints / "checkpoints" / "step-0000006"
    names = sorted(p.name for p in newest.iterdir() if p.name != "files.json")
    assert {"train_state.json", "config.yaml", "ema.safetensors", "model.safetensors"} <= set(names), names
    for name in names:
        run_dir = tmp_path / name
        shutil.copytree(two_checkpoints, run_dir)
        _edit(run_dir / "checkpoints" / "step-0000006" / name)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            chosen = resolve_checkpoint(run_dir)
        assert chosen == run_dir / "checkpoints" / "step-0000003", name
        damaged = str(run_dir / "checkpoints" / "step-0000006" / name)
        assert any(damaged in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records), name


# ----------------------------------------------------------------------------------------------------------------
# The shard split of deterministic streams: by process first, then by DataLoader worker


def test_shards_go_to_processes_first_then_to_their_workers():
    from pipeline.train.data import shards_for

    urls = [str(i) for i in range(8)]
    assert shards_for(urls, rank=0, world_size=2, worker=1, num_workers=2) == ["2", "6"]
    assert shards_for(urls, rank=1, world_size=2, worker=0, num_workers=2) == ["1", "5"]
    # A process reads its share urls[rank::world] whatever its number of workers.
    for rank in (0, 1):
        for workers in (1, 2, 4):
            read = sorted(s for w in range(workers) for s in shards_for(urls, rank, 2, w, workers))
            assert read == sorted(urls[rank::2]), (rank, workers)


def test_a_process_reads_the_same_samples_whatever_its_number_of_workers(tmp_path):
    from pipeline.train.data import StreamSpec, make_loader

    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=8, num_classes=8)  # label = sample
    urls = tuple(shard_urls(data, load_manifest(data)))
    for rank in (0, 1):
        read = {}
        for workers in (0, 2):
            spec = StreamSpec(
                urls=urls, kind="latents", batch_size=1, resampled=False, hflip=False, scaling_factor=0.18215,
                num_classes=8, rank=rank, world_size=2,
            )  # fmt: skip
            batches = iter(make_loader(spec, workers))
            read[workers] = sorted(int(next(batches)[1]) for _ in range(4))  # one pass over the process's shards
        assert read[0] == read[2] == list(range(rank, 8, 2)), (rank, read)


# ----------------------------------------------------------------------------------------------------------------
# The released weights: the EMA weights, the 256-px sampling set-up up to 32x32 latents


def _released_state(seed: int, input_size: int = 8) -> dict[str, torch.Tensor]:
    import diffit
    from diffit.convert import to_nvlabs_state_dict

    torch.manual_seed(seed)
    model = diffit.create_model("DiffiT-Tiny/2", input_size=input_size)
    return {key: value.contiguous() for key, value in to_nvlabs_state_dict(model).items()}


def test_a_released_file_holding_ema_and_model_weights_imports_the_ema_weights(tiny_vae, tmp_path):
    from diffit.convert import to_nvlabs_state_dict
    from diffit.io import load_pretrained

    ema, model = _released_state(seed=1), _released_state(seed=2)
    assert any(not torch.equal(ema[key], model[key]) for key in ema)
    path = tmp_path / "diffit_256.pt"
    torch.save({"model": model, "ema": ema}, path)
    result = invoke("import-nvlabs", path, tmp_path / "imported", "--vae", tiny_vae)
    assert result.exit_code == 0, result.output
    loaded, _ = load_pretrained(tmp_path / "imported")
    for key, value in to_nvlabs_state_dict(loaded).items():
        torch.testing.assert_close(value, ema[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    "latent_size, scale, schedule",
    [(16, 4.4, "power-cosine"), (32, 4.4, "power-cosine"), (34, 1.49, "constant"), (64, 1.49, "constant")],
)
def test_the_released_guidance_switches_above_32x32_latents(latent_size, scale, schedule):
    from pipeline.train.released import released_sampling

    sampling = released_sampling(latent_size)
    assert (sampling["guidance_scale"], sampling["guidance_schedule"]) == (scale, schedule)


def test_a_released_256px_model_imports_with_the_256px_sampling_set_up(tiny_vae, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "diffit_256.safetensors"
    save_file(_released_state(seed=0, input_size=32), str(path))  # 32x32 latents: the 256-px model
    result = invoke("import-nvlabs", path, tmp_path / "imported", "--vae", tiny_vae)
    assert result.exit_code == 0, result.output
    sampling = json.loads((tmp_path / "imported" / "config.json").read_text())["sampling"]
    assert (sampling["guidance_scale"], sampling["guidance_schedule"], sampling["steps"]) == (4.4, "power-cosine", 250)


# ----------------------------------------------------------------------------------------------------------------
# Precision / recall: a point exactly on a ball's boundary is inside it (the evaluator's <=)


def test_precision_and_recall_count_a_point_on_the_boundary_as_inside():
    from pipeline.evaluate.adm import precision_recall

    # 1-d features, k = 3. Reference 0..4: radii (3rd nearest squared distance) 9, 4, 4, 4, 9. Samples 7..11:
    # radii 9, 4, 4, 4, 9. Sample 7 is at squared distance 9 of reference 4, exactly its radius: inside;
    # every other sample is farther. Reference 4 is at 9 of sample 7, exactly that sample's radius: inside.
    reference = np.arange(0, 5, dtype=np.float32)[:, None]
    samples = np.arange(7, 12, dtype=np.float32)[:, None]
    for memory_bytes in (2 << 30, 16):  # whole blocks, and blocks of one element
        result = precision_recall(reference, samples, memory_bytes=memory_bytes)
        assert (result["precision"], result["recall"]) == (0.2, 0.2), memory_bytes
        assert result["f_score"] == pytest.approx(0.2, rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics: partial results of other Inception weights are never mixed in


def _reference_options(source: Path, out: Path, weights: Path):
    from pipeline.evaluate import ReferenceOptions

    options = ReferenceOptions(source, out, weights, subset_size=0, chunk_size=3, batch_size=3, images=False)
    options.workers, options.device, options.progress = 0, "cpu", False
    return options


def _build_killed_after_the_first_chunk(options, monkeypatch) -> None:
    """`build_reference(options)` dying (KeyboardInterrupt) while its second statistics chunk is computed: the
    first chunk stays in OUT's partial directory."""
    import pipeline.evaluate.reference.batch as reference_batch
    from pipeline.evaluate import build_reference

    compute_part = reference_batch._compute_part
    chunks: list[int] = []

    def killed_after_the_first_chunk(dataset, *args, **kwargs):
        if chunks:
            raise KeyboardInterrupt
        chunks.append(dataset.indices[0])
        return compute_part(dataset, *args, **kwargs)

    monkeypatch.setattr(reference_batch, "_compute_part", killed_after_the_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_reference(options)
    monkeypatch.undo()
    partial = options.out.parent / f".{options.out.name}.partial"
    assert (partial / "chunk-000000.npz").is_file() and not options.out.exists()


def test_a_reference_build_resumed_with_other_weights_recomputes_every_chunk(
    tmp_path, tmp_path_factory, inception_weights, monkeypatch, caplog
):
    from pipeline.evaluate import build_reference

    other_weights = make_random_inception_weights(tmp_path_factory.mktemp("other") / "inception-2.pth", seed=1)
    source = write_folder_reference(tmp_path / "images", smooth_images(6, size=16, seed=4))
    out = tmp_path / "resumed.npz"
    _build_killed_after_the_first_chunk(_reference_options(source, out, inception_weights), monkeypatch)

    with caplog.at_level(logging.WARNING):
        build_reference(_reference_options(source, out, other_weights))
    assert any("partial statistics of other settings" in r.getMessage() for r in caplog.records)
    build_reference(_reference_options(source, tmp_path / "uninterrupted.npz", other_weights))
    with np.load(out) as resumed, np.load(tmp_path / "uninterrupted.npz") as expected:
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)


# ----------------------------------------------------------------------------------------------------------------
# Escaping: what a run directory holds never becomes markup, not even inside an attribute


class _Elements(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, attrs))


def test_escaped_text_stays_one_attribute_value():
    from pipeline.report.page import esc

    for hostile in ('x" onmouseover="alert(1)', "x' onmouseover='alert(1)", "a\"b'c<d>&e"):
        parser = _Elements()
        for quote in ('"', "'"):
            parser.feed(f"<img alt={quote}{esc(hostile)}{quote}>")
        assert parser.elements == [("img", [("alt", hostile)])] * 2, parser.elements


def test_quotes_in_a_run_directory_reach_the_report_escaped(tmp_path):
    hostile = 'q"uote\' onmouseover="alert(1)'
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(f"model:\n  name: {json.dumps(hostile)}\n")
    (run_dir / "run.json").write_text(json.dumps({"command": [hostile]}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    result = invoke("report", run_dir)
    assert result.exit_code == 0, result.output
    page = (run_dir / "report.html").read_text()
    assert hostile not in page and 'onmouseover="' not in page
    assert "<td>q&quot;uote&#x27; onmouseover=&quot;alert(1)</td>" in page  # the run's command
    assert "name: &quot;q\\&quot;uote&#x27; onmouseover=\\&quot;alert(1)&quot;" in page  # the config text
    parser = _Elements()
    parser.feed(page)
    assert not [attrs for _, attrs in parser.elements if any(name.startswith("on") for name, _ in attrs)]


# ----------------------------------------------------------------------------------------------------------------
# Object storage: listings are never answered from fsspec's cache


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    pytest.importorskip("s3fs", reason="object-storage tests need s3fs (pip install -e '.[test]')")
    from tests.support.s3_server import rclone_s3_server

    root = tmp_path_factory.mktemp("s3-root")
    with rclone_s3_server(root, "bucket", "guaranteeskey1", "guaranteessecret1") as server:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in server.environment.items():
                patch.setenv(key, value)
            yield SimpleNamespace(url="s3://bucket/dataset")


def test_an_object_written_by_another_client_is_listed_and_found(s3):
    import s3fs

    location = Location.of(s3.url)
    location.write_bytes("shard-000000.json", b"{}")
    assert location.names() == ["shard-000000.json"]  # fills this process's listing cache
    other = s3fs.S3FileSystem(skip_instance_cache=True)  # another process's client: its own connections, no cache
    other.pipe_file("bucket/dataset/shard-000001.json", b'{"x": 1}')
    assert location.stat("shard-000001.json").size == 8  # asked before any new listing
    assert location.read_bytes("shard-000001.json") == b'{"x": 1}'
    assert location.names() == ["shard-000000.json", "shard-000001.json"]
    assert set(location.stats()) == {"shard-000000.json", "shard-000001.json"}
    other.rm_file("bucket/dataset/shard-000001.json")
    assert location.stat("shard-000001.json") is None
    assert location.names() == ["shard-000000.json"] and set(location.stats()) == {"shard-000000.json"}
    with pytest.raises(StorageError):
        Location.of("s3://no-such-bucket-here/x").create()


# ----------------------------------------------------------------------------------------------------------------
# Third audit (studies, references, metrics, training, report): each test fails with the bug its docstring names


def test_a_reference_build_resumed_at_another_resolution_recomputes_every_chunk(
    tmp_path, inception_weights, monkeypatch, caplog
):
    """A source reference killed at 16 px and rebuilt at 8 px into the same OUT equals an uninterrupted 8 px build
    (a content identity without the resolution reused the 16 px statistics chunks)."""
    from pipeline.evaluate import build_reference

    source = write_folder_reference(tmp_path / "images", smooth_images(6, size=16, seed=5))
    out = tmp_path / "resumed.npz"

    def options(target: Path, resolution: int):
        built = _reference_options(source, target, inception_weights)
        built.resolution = resolution
        return built

    _build_killed_after_the_first_chunk(options(out, 16), monkeypatch)
    with caplog.at_level(logging.WARNING):
        build_reference(options(out, 8))
    assert any("partial statistics of other settings" in r.getMessage() for r in caplog.records)
    build_reference(options(tmp_path / "uninterrupted.npz", 8))
    build_reference(options(tmp_path / "at-16.npz", 16))
    with np.load(out) as resumed, np.load(tmp_path / "uninterrupted.npz") as expected:
        with np.load(tmp_path / "at-16.npz") as other:
            assert not np.array_equal(other["mu"], expected["mu"])  # the two resolutions do differ
        for key in ("mu", "sigma", "mu_s", "sigma_s"):
            np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "deflated"])
def test_a_fortran_order_npz_member_reads_back_as_written(tmp_path, compressed):
    """`np.savez(x=np.asfortranarray(a))` stores the bytes column-major; mapping them as C order would read
    [[1, 2, 3], [4, 5, 6]] as [[1, 4, 2], [5, 3, 6]]."""
    from pipeline.evaluate.npz_files import load_member, read_member_header

    array = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    path = tmp_path / "fortran.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=np.asfortranarray(array), c=array)
    assert read_member_header(path, "x").fortran_order and not read_member_header(path, "c").fortran_order
    for name in ("x", "c"):
        loaded = load_member(path, name)
        np.testing.assert_array_equal(np.asarray(loaded), array, err_msg=name)
        assert np.asarray(loaded).tolist() == [[1, 2, 3], [4, 5, 6]]


def test_an_infinite_metric_is_refused_like_nan(tmp_path, inception_weights):
    """Reference statistics with a finite mean of 1e200 make FID overflow to +inf: no metrics.json may carry it
    (a check for NaN only let inf through)."""
    from pipeline.core.errors import JobFailedError
    from pipeline.evaluate import datasets, inception, metrics
    from pipeline.evaluate.reference import formats as references

    np.savez(tmp_path / "far.npz", mu=np.full(64, 1e200), sigma=np.eye(64))
    reference = references.open_reference(tmp_path / "far.npz")
    config = inception.FeatureConfig(
        weights=inception.resolve_inception_weights(inception_weights), layer_fid="64", batch_size=8
    )
    samples = datasets.ArrayDataset(smooth_images(8, size=16, seed=6))
    with pytest.raises(JobFailedError, match=r"metrics \['frechet_inception_distance'\] are not finite .*inf"):
        metrics.compute_metrics(samples, reference, ["fid"], config, tmp_path / "cache")


def test_the_report_gate_refuses_a_sibling_directory_that_shares_the_runs_name_as_a_prefix(tmp_path):
    """`RUN-other/` is outside `RUN/`: a link into it is skipped and listed (a string-prefix test admitted it)."""
    from cli.report_cmd import register

    run_dir, sibling = tmp_path / "run", tmp_path / "run-other"
    run_dir.mkdir()
    sibling.mkdir()
    (sibling / "config.yaml").write_text("model:\n  name: SIBLING-SECRET\n")
    (run_dir / "config.yaml").symlink_to(sibling / "config.yaml")
    report = typer_app_with(register)
    result = CliRunner().invoke(report, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    page = (run_dir / "report.html").read_text()
    assert "SIBLING-SECRET" not in page
    assert "<tr><td>RUN/config.yaml</td><td>a symbolic link pointing outside the run (not read)</td></tr>" in page


def typer_app_with(register):
    import typer

    application = typer.Typer()
    register(application)
    application.command("noop", hidden=True)(lambda: None)  # two commands: typer keeps the command name
    return application


def test_an_object_written_by_another_client_is_listed_by_names_alone(s3):
    """`names()` right after another client's write and delete, with no `stat` in between to clear the cached
    listing as a side effect (a listing answered from fsspec's cache misses both)."""
    import s3fs

    location = Location.of(s3.url + "-names")
    location.write_bytes("a.json", b"{}")
    assert location.names() == ["a.json"]  # fills this process's listing cache
    other = s3fs.S3FileSystem(skip_instance_cache=True)
    other.pipe_file("bucket/dataset-names/b.json", b"{}")
    assert location.names() == ["a.json", "b.json"]
    other.rm_file("bucket/dataset-names/a.json")
    assert location.names() == ["b.json"]


@pytest.mark.parametrize("model", ["DiffiT-Tiny/2", "DiffiT-UNet-Tiny"])
def test_a_fourier_time_embedding_is_the_fourier_features_not_the_sinusoids(model):
    """`time_embedding: fourier` changes the model: its time token is MLP([cos 2pi B t, sin 2pi B t]) and its
    output differs from the positional model with the same weights (a model ignoring the setting trained
    positional embeddings in a Fourier study)."""
    import math

    import diffit
    from diffit.layers import timestep_embedding

    kwargs = {"input_size": 8} if model.endswith("/2") else {"channels": [16, 16], "num_groups": 4, "num_heads": 2}
    kwargs["num_classes"] = 10
    torch.manual_seed(0)
    positional = diffit.create_model(model, time_embedding="positional", **kwargs).eval()
    fourier = diffit.create_model(model, time_embedding="fourier", **kwargs).eval()
    with torch.no_grad():  # zero-initialised output layers (DiT's) would make every output 0
        for parameter in positional.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.1)
    missing, unexpected = fourier.load_state_dict(positional.state_dict(), strict=False)
    assert unexpected == [] and [key for key in missing if not key.endswith("freqs")] == []
    t = torch.tensor([0.25, 3.0])
    freqs = fourier.time_embed.fourier.freqs
    assert freqs.shape == (fourier.time_embed.frequency_size // 2,) and freqs.std() > 1  # B ~ N(0, 16^2)
    angles = 2 * math.pi * t[:, None] * freqs[None, :]
    mlp = positional.time_embed.mlp  # the same weights in both models
    with torch.no_grad():
        torch.testing.assert_close(fourier.time_embed(t), mlp(torch.cat([angles.cos(), angles.sin()], dim=1)))
        sinusoids = timestep_embedding(t, positional.time_embed.frequency_size)
        torch.testing.assert_close(positional.time_embed(t), mlp(sinusoids))
        channels = positional.in_channels
        x = torch.randn(2, channels, 8, 8) if model.endswith("/2") else torch.randn(2, 3, 16, 16)
        labels = torch.tensor([1, 2])
        assert not torch.allclose(fourier(x, t, labels), positional(x, t, labels))


def test_evaluate_of_an_imported_release_writes_truncated_pixels_without_being_asked(tiny_vae, tmp_path):
    """`import-nvlabs` records the released code's pixel conversion ("truncate"); evaluate without --pixels uses
    it: the same samples, one grey level darker than "round" wherever frac(127.5 x + 127.5) >= 0.5 (an evaluate
    ignoring the recorded setting wrote rounded pixels)."""
    from safetensors.torch import save_file

    from pipeline.evaluate import STORE_NAME, EvaluateOptions, SampleStore, run_evaluate

    path = tmp_path / "diffit_256.safetensors"
    save_file(_released_state(seed=3), str(path))
    assert invoke("import-nvlabs", path, tmp_path / "imported", "--vae", tiny_vae).exit_code == 0
    assert json.loads((tmp_path / "imported" / "config.json").read_text())["sampling"]["pixels"] == "truncate"
    images = {}
    for name, pixels in (("default", None), ("round", "round")):
        sampling = {"steps": 2, "guidance_scale": 1.0, "pixels": pixels}
        options = EvaluateOptions(
            tmp_path / "imported", tmp_path / name, num_samples=4, batch_size=4, sampling=sampling, metrics=()
        )
        options.device = "cpu"
        record = run_evaluate(options)
        assert record["sampling"]["pixels"] == ("truncate" if pixels is None else "round")
        store = SampleStore.open(tmp_path / name / STORE_NAME, mode="r")
        images[name] = store.read_images(0, 4).astype(int)
    difference = images["round"] - images["default"]
    assert set(np.unique(difference)) == {0, 1} and difference.mean() > 0.2
