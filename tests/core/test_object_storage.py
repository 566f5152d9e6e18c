"""Datasets in object storage, against a real S3-compatible server (`rclone serve s3`, started here).

The server serves a local directory: `ROOT/bucket/x` is the object `s3://bucket/x`, so the tests can look at
(and damage) what was uploaded on disk, while everything the pipeline does goes through s3fs over HTTP with the
credentials and endpoint taken from the standard environment variables.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from pipeline.core import shards
from pipeline.core.dataset_verify import verify_dataset
from pipeline.core.manifest import ManifestError, load_manifest, manifest_hash
from pipeline.core.storage import Location
from pipeline.core.storage_io import StorageError
from pipeline.encode.job import EncodeOptions, run_encode
from tests.support.encode_fixtures import kill_job_midway, make_image_tree, save_tiny_vae
from tests.support.s3_server import rclone_s3_server
from tests.support.train_fixtures import read_metrics, tiny_latent_config, write_config

pytest.importorskip("s3fs", reason="object-storage tests need s3fs (pip install -e '.[test]')")

REPO = Path(__file__).resolve().parents[2]
ACCESS_KEY, SECRET_KEY = "diffitpipeaccess", "diffitpipesecret123"  # rclone wants 10+ characters
BUCKET = "datasets"
SHARD_SIZE = 2  # small shards, so that a kill lands between two of them
TEST_MAX_PIXELS = 4_000_000


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A running `rclone serve s3` on a local directory, one bucket, and the environment that points s3fs at it."""
    root = tmp_path_factory.mktemp("s3-root")
    with rclone_s3_server(root, BUCKET, ACCESS_KEY, SECRET_KEY) as server:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in server.environment.items():
                patch.setenv(key, value)
            yield SimpleNamespace(
                root=root, endpoint=server.endpoint, env=server.environment, url=lambda name: f"s3://{BUCKET}/{name}"
            )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("object-storage-data")
    labels = make_image_tree(root / "src", per_class=4)  # 18 images: 9 shards of 2
    return SimpleNamespace(root=root, src=root / "src", vae=str(save_tiny_vae(root / "vae")), items=len(labels))


def _job(data, out, kind="latents", **overrides) -> EncodeOptions:
    settings = dict(
        kind=kind,
        source=str(data.src),
        out=str(out),
        resolution=32,
        vae=data.vae if kind == "latents" else None,
        shard_size=SHARD_SIZE,
        batch_size=2,
        workers=0,
        torch_threads=1,
        max_pixels=TEST_MAX_PIXELS,
        progress=False,
    )
    settings.update(overrides)
    if settings["vae"] is None:
        settings.pop("vae")
    return EncodeOptions(**settings)


@pytest.fixture(scope="module")
def local_latents(data, tmp_path_factory):
    """The tree encoded to a local directory in this process: the reference for byte identity."""
    out = tmp_path_factory.mktemp("local") / "latents"
    threads = torch.get_num_threads()
    try:
        assert run_encode(_job(data, out)).ok
    finally:
        torch.set_num_threads(threads)
    return out


def _put(s3, name: str, data: bytes) -> None:
    """Upload one object through S3 (the server's own view of its directory must stay in step: no disk edits)."""
    import s3fs

    s3fs.S3FileSystem(endpoint_url=s3.endpoint, key=ACCESS_KEY, secret=SECRET_KEY, skip_instance_cache=True).pipe_file(
        f"{BUCKET}/{name}", data
    )


def _upload(s3, local: Path, prefix: str) -> str:
    """Upload the files of a local dataset directory under `prefix`; returns its URL."""
    for path in sorted(local.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            _put(s3, f"{prefix}/{path.name}", path.read_bytes())
    return s3.url(prefix)


def _local_files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.glob("shard-*"))}


def _comparable(manifest: dict) -> dict:
    return {key: value for key, value in manifest.items() if key not in ("created", "command")}


def _cli_command(data, out: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "from cli.main import main; main()",
        "encode",
        str(data.src),
        out,
        "--resolution",
        "32",
        "--vae",
        data.vae,
        "--shard-size",
        str(SHARD_SIZE),
        "--batch-size",
        "2",
        "--workers",
        "1",
        "--torch-threads",
        "1",
        "--max-pixels",
        str(TEST_MAX_PIXELS),
        "--no-progress",
    ]


# ---------------------------------------------------------------------------------------------------------------
# encode / pack to a URL


@pytest.mark.slow
def test_encode_to_s3_killed_midway_then_rerun_gives_the_local_bytes(data, local_latents, s3):
    url = s3.url("killed")
    stored = s3.root / BUCKET / "killed"  # what the server holds, seen from its disk
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    log = kill_job_midway(_cli_command(data, url), REPO, env, stored)
    total = len(list(local_latents.glob("shard-*.tar")))
    done_before = len(list(stored.glob("shard-*.json")))
    assert 2 <= done_before < total, f"kill did not land mid-job ({done_before}/{total} shards):\n{log}"
    # Only whole objects are visible: every tar there has its final bytes or is not there at all.
    reference = _local_files(local_latents)
    for path in stored.glob("shard-*.tar"):
        assert path.read_bytes() == reference[path.name]
    with pytest.raises(ManifestError, match=rf"no dataset manifest at {url}/manifest.json .*re-run"):
        load_manifest(url)

    rerun = subprocess.run(_cli_command(data, url), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    skipped = int(re.search(r"\((\d+) shard\(s\) were already complete\)", rerun.stdout).group(1))
    assert skipped >= done_before - 1  # at most the shard whose sidecar was being uploaded at kill time
    assert f"to {url} " in rerun.stdout
    assert _local_files(stored) == reference  # tars and sidecars: byte for byte the local run's
    manifest = load_manifest(url)
    assert _comparable(manifest) == _comparable(load_manifest(local_latents))
    assert verify_dataset(url).ok
    assert sorted(path.name for path in stored.iterdir()) == sorted([*reference, "failures.jsonl", "manifest.json"])


def test_a_rerun_trusts_uploaded_shards_by_their_sidecars_and_verify_rehashes_them(data, s3):
    url, stored = s3.url("again"), s3.root / BUCKET / "again"
    first = run_encode(_job(data, url))
    assert first.ok and first.shards_skipped == 0
    first_hash = manifest_hash(url)
    original = (stored / "shard-000001.tar").read_bytes()
    # The same size, and the sidecar uploaded again after it: a rerun that trusts sealed sidecars (and the
    # objects' sizes and times) cannot tell; one that reads the tar can.
    _put(s3, "again/shard-000001.tar", bytes(reversed(original)))
    time.sleep(1.1)  # S3 times have one-second steps
    _put(s3, "again/shard-000001.json", (stored / "shard-000001.json").read_bytes())

    trusted = run_encode(_job(data, url))
    assert trusted.ok and trusted.shards_skipped == trusted.shards_total == first.shards_total
    assert (stored / "shard-000001.tar").read_bytes() == bytes(reversed(original))  # not read, not rewritten
    assert manifest_hash(url) == first_hash  # the same dataset: runs trained on it can still resume

    verified = run_encode(_job(data, url, verify=True))
    assert (
        verified.ok and verified.shards_skipped == first.shards_total - 1
    )  # the damaged shard was re-hashed and written again
    assert (stored / "shard-000001.tar").read_bytes() == original
    assert verify_dataset(url).ok and manifest_hash(url) == first_hash


def test_dry_run_against_a_url_counts_the_finished_shards_and_writes_nothing(data, s3):
    from pipeline.encode import dry_run

    url, stored = s3.url("dry"), s3.root / BUCKET / "dry"
    planned = dry_run(_job(data, url))
    assert planned.complete_shards == 0 and planned.out == url and not stored.exists()
    assert run_encode(_job(data, url)).ok
    before = {path.name: path.stat().st_mtime_ns for path in stored.iterdir()}
    again = dry_run(_job(data, url))
    assert again.complete_shards == again.shards == -(-data.items // SHARD_SIZE) and again.conflicts == []
    assert {path.name: path.stat().st_mtime_ns for path in stored.iterdir()} == before
    other = dry_run(_job(data, url, resolution=64))  # another dataset would replace this one: said, not done
    assert other.complete_shards == 0 and "describes another dataset (resolution" in other.conflicts[0]


def test_pack_to_s3_then_inspect_and_verify_find_a_damaged_object(data, s3):
    url = s3.url("images")
    assert run_encode(_job(data, url, kind="images")).ok
    runner = CliRunner()
    shown = runner.invoke(app, ["inspect", url, "--verify"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    assert f"dataset    {url}" in shown.output
    assert f"items      {data.items} written / {data.items} seen / 0 failed" in shown.output
    assert f"verified   {-(-data.items // SHARD_SIZE)} shard(s): every sha256 matches the manifest" in shown.output

    stored = s3.root / BUCKET / "images"
    damaged = bytearray((stored / "shard-000003.tar").read_bytes())
    damaged[600] ^= 0xFF  # same size: only the hash can tell
    _put(s3, "images/shard-000003.tar", bytes(damaged))
    _put(s3, "images/shard-000009.tar", b"stray")
    failed = runner.invoke(app, ["inspect", url, "--verify"], catch_exceptions=False)
    assert failed.exit_code == 1
    assert f"{url}/shard-000003.tar: sha256 " in failed.output and "does not match the recorded" in failed.output
    assert f"{url}/shard-000009.tar: shard-000009.tar present but not listed in manifest.json" in failed.output


def test_missing_bucket_and_missing_dataset_are_clear_errors(data, s3):
    with pytest.raises(StorageError, match=r"s3://no-such-bucket/x: the bucket 'no-such-bucket' does not exist"):
        run_encode(_job(data, "s3://no-such-bucket/x"))
    result = CliRunner().invoke(app, ["inspect", s3.url("nothing-here")], catch_exceptions=False)
    assert result.exit_code == 2
    assert f"error: no dataset manifest at {s3.url('nothing-here')}/manifest.json" in result.output


def test_a_crafted_shard_name_in_an_s3_manifest_is_refused(data, s3, local_latents):
    url = _upload(s3, local_latents, "crafted")
    manifest = json.loads((local_latents / "manifest.json").read_text())
    manifest["shards"][0]["name"] = "pipe:touch /tmp/owned"
    _put(s3, "crafted/manifest.json", json.dumps(manifest).encode())
    with pytest.raises(ManifestError, match=r"crafted/manifest.json: shards\[0\] has the name 'pipe:touch"):
        load_manifest(url)


# ---------------------------------------------------------------------------------------------------------------
# train from a URL


def test_train_two_steps_from_s3_equals_training_from_the_local_copy(data, local_latents, s3, tmp_path):
    from pipeline.train import TrainOptions, run_train

    url = _upload(s3, local_latents, "train-data")  # the same bytes, served over S3
    latent_size = load_manifest(local_latents)["latent_size"]
    config = tiny_latent_config(
        model={"input_size": latent_size},
        data={"num_workers": 1},  # a loader worker process opens its own S3 connection
        train={"max_steps": 2, "global_batch_size": 2},
        checkpoint={"every": 2, "keep": 1},
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for name, where in (("local", local_latents), ("s3", url)):
            run_dir = tmp_path / name
            run_train(
                TrainOptions(
                    run_dir=run_dir, config_path=write_config(tmp_path / f"{name}.yaml", config), data_dir=where
                )
            )
            runs[name] = run_dir
    finally:
        torch.set_num_threads(threads)
    local, remote = (read_metrics(runs[name]) for name in ("local", "s3"))
    assert [record["step"] for record in remote if "loss" in record] == [1, 2]
    assert [r["loss"] for r in remote if "loss" in r] == [r["loss"] for r in local if "loss" in r]
    state = json.loads((sorted((runs["s3"] / "checkpoints").iterdir())[-1] / "train_state.json").read_text())
    assert state["dataset"]["path"] == url
    assert state["dataset"]["manifest_hash"] == manifest_hash(local_latents)

    # The run report reads the manifest of the run's dataset from the store and links it to the run.
    from pipeline.report.collect import read_run

    dataset = read_run(runs["s3"], [], [], False).dataset
    assert dataset.path == url and dataset.manifest.path == f"{url}/manifest.json"
    assert dataset.manifest.sha256 == dataset.recorded_hash == manifest_hash(url)
    assert dataset.manifest.data == load_manifest(local_latents)


def test_train_reports_a_damaged_object_by_its_url(data, local_latents, s3, tmp_path):
    from pipeline.train import TrainOptions, run_train
    from pipeline.train.shard_reading import CorruptShardError

    url = _upload(s3, local_latents, "damaged-train")
    damaged = bytearray((local_latents / "shard-000000.tar").read_bytes())
    damaged[700] ^= 0x01
    _put(s3, "damaged-train/shard-000000.tar", bytes(damaged))
    latent_size = load_manifest(local_latents)["latent_size"]
    config = tiny_latent_config(model={"input_size": latent_size}, train={"max_steps": 1, "global_batch_size": 2})
    with pytest.raises(CorruptShardError, match=rf"{url}/shard-000000.tar: sha256 "):
        run_train(
            TrainOptions(
                run_dir=tmp_path / "run",
                config_path=write_config(tmp_path / "c.yaml", config),
                data_dir=url,
            )
        )


def test_storage_round_trip_of_names_stats_and_atomic_writers(s3):
    location = Location.of(s3.url("unit/"))
    assert location.url == s3.url("unit") and not location.is_local and not location.exists()
    location.write_bytes("a.json", b"{}")
    with location.writer("b.bin") as writer:
        writer.handle.write(b"x" * 3000)
    aborted = location.writer("c.bin")
    aborted.handle.write(b"never")
    aborted.abort()
    with pytest.raises(RuntimeError), location.writer("d.bin") as writer:
        writer.handle.write(b"half")
        raise RuntimeError("a failure mid-write")
    assert location.names() == ["a.json", "b.bin"]  # the aborted and the failed writer uploaded nothing
    stat = location.stat("b.bin")
    assert stat.size == 3000 and stat.regular and stat.mtime_ns is not None
    assert location.stat("c.bin") is None and location.read_bytes("a.json") == b"{}"
    location.remove("a.json")
    assert Location.of(s3.url("unit").replace("s3://", "s3a://", 1)).names() == ["b.bin"]  # s3fs's other name
    assert location.names() == ["b.bin"] and np.array_equal(
        np.frombuffer(location.read_bytes("b.bin"), np.uint8), np.full(3000, ord("x"), np.uint8)
    )


# ---------------------------------------------------------------------------------------------------------------
# evaluate --reference URL


def _evaluate(latent_model, weights, reference: str, out: Path):
    arguments = ["evaluate", "--model", str(latent_model), "--out", str(out), "--reference", reference]
    arguments += ["--inception-weights", str(weights), "--metrics", "fid,prc", "--feature-layer", "64"]
    arguments += ["--num-samples", "8", "--steps", "3", "--batch-size", "4", "--feature-batch-size", "8"]
    result = CliRunner().invoke(app, [*arguments, "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text())


def test_evaluate_with_a_reference_url_scores_as_the_local_file(
    s3, latent_model, inception_weights, tmp_path, monkeypatch
):
    from tests.support.eval_fixtures import smooth_images

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    images = smooth_images(12, size=16, seed=3)  # uint8 NHWC, as ADM batches hold them
    local = tmp_path / "reference.npz"
    np.savez(local, arr_0=images)
    _put(s3, "refs/reference.npz", local.read_bytes())
    url = s3.url("refs/reference.npz")

    from_url = _evaluate(latent_model, inception_weights, url, tmp_path / "eval-url")
    from_disk = _evaluate(latent_model, inception_weights, str(local), tmp_path / "eval-local")
    assert from_url["plumbing_only_metrics"] == from_disk["plumbing_only_metrics"]
    assert from_url["reference"]["url"] == url
    copies = list((tmp_path / "cache" / "diffit-pipe" / "references").glob("*-reference.npz"))
    assert len(copies) == 1 and copies[0].read_bytes() == local.read_bytes()
    assert from_url["reference"]["content_sha256"] == from_disk["reference"]["content_sha256"]


def test_a_pack_dataset_reference_url_is_copied_checked_and_a_damaged_shard_refused(data, s3, tmp_path):
    from pipeline.evaluate.reference.formats import open_reference
    from pipeline.evaluate.reference.remote import RemoteReferenceError, stage_reference

    url = s3.url("ref-images")
    assert run_encode(_job(data, url, kind="images")).ok
    copy = stage_reference(url, tmp_path / "first")
    stored = s3.root / BUCKET / "ref-images"
    listed = [e["name"] for e in load_manifest(url)["shards"] if e["count"]]
    assert sorted(p.name for p in copy.iterdir()) == sorted([*listed, "manifest.json"])
    assert all((copy / name).read_bytes() == (stored / name).read_bytes() for name in [*listed, "manifest.json"])
    reference = open_reference(url)
    assert reference.kind == "shards" and reference.num_images == data.items and reference.details["url"] == url

    damaged = bytearray((stored / "shard-000002.tar").read_bytes())
    damaged[512] ^= 0x10
    _put(s3, "ref-images/shard-000002.tar", bytes(damaged))
    with pytest.raises(RemoteReferenceError, match=rf"{url}/shard-000002.tar: sha256 .* the reference is damaged"):
        stage_reference(url, tmp_path / "second")
    assert not (tmp_path / "second").exists() or not list((tmp_path / "second").rglob("manifest.json"))
    assert not list((tmp_path / "second").rglob("shard-000002.tar*"))  # nothing of the damaged copy is kept
    with pytest.raises(RemoteReferenceError, match=r"not an .npz object and no manifest.json under it"):
        stage_reference(s3.url("nothing-here"), tmp_path / "third")


# ---------------------------------------------------------------------------------------------------------------
# Other ways in: fsspec's configuration, other file systems


def test_credentials_and_endpoint_from_fsspec_configuration_alone(data, s3):
    url = s3.url("configured")
    assert run_encode(_job(data, url, kind="images")).ok
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env["FSSPEC_S3"] = json.dumps({"endpoint_url": s3.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY})
    env["PYTHONPATH"] = str(REPO)
    command = [sys.executable, "-c", "from cli.main import main; main()", "inspect", url, "--verify"]
    shown = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"verified   {-(-data.items // SHARD_SIZE)} shard(s)" in shown.stdout
    env.pop("FSSPEC_S3")  # and without any credentials: one line naming the URL, not a traceback
    refused = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert f"{url}/manifest.json" in refused.stderr


def test_any_fsspec_file_system_holds_a_dataset_the_same_way(data, local_latents):
    import fsspec

    url = "memory://diffit-pipe-test/latents"
    result = run_encode(_job(data, url))
    assert result.ok and result.shards_written == result.shards_total
    memory = fsspec.filesystem("memory")
    stored = {name.rsplit("/", 1)[-1]: memory.cat_file(name) for name in memory.ls(url, detail=False)}
    assert {k: v for k, v in stored.items() if k.startswith("shard-")} == _local_files(local_latents)
    assert _comparable(load_manifest(url)) == _comparable(load_manifest(local_latents))
    # This store reports no modification times, so a rerun cannot trust sidecars alone: it re-hashes every shard
    # (and keeps them all, since they match).
    rerun = run_encode(_job(data, url))
    assert rerun.ok and rerun.shards_skipped == rerun.shards_total and rerun.shards_written == 0


def test_a_shard_larger_than_one_upload_part_round_trips(s3, tmp_path):
    # s3fs uploads files over 50 MiB in parts and the readers fetch whole objects: 60 MiB through every path.
    from pipeline.core.storage_io import download, read_object, sha256_of

    data = np.random.default_rng(0).integers(0, 256, 60 << 20, dtype=np.uint8).tobytes()
    location = Location.of(s3.url("large"))
    with location.writer("shard-000000.tar") as writer:
        writer.handle.write(data)
    url = location.join("shard-000000.tar")
    assert location.stat("shard-000000.tar").size == len(data)
    assert read_object(url) == data
    assert sha256_of(url) == hashlib.sha256(data).hexdigest()
    assert download(url, tmp_path / "copy.tar").read_bytes() == data


# ---------------------------------------------------------------------------------------------------------------
# Which stores are accepted, what "missing" means, the Location interface


@pytest.mark.parametrize(
    "url",
    [
        "sftp://host/x",
        "ssh://host/x",
        "ftp://host/x",
        "hdfs://namenode/x",
        "webhdfs://namenode/x",
        "webdav://host/x",
        "https://host/x",
        "local:///tmp/x",
        "simplecache::s3://bucket/x",
    ],
)
def test_stores_that_write_in_place_are_refused_by_their_url_alone(url):
    import fsspec

    loaded = set(fsspec.registry)
    with pytest.raises(StorageError) as refused:
        Location.of(url)
    message = str(refused.value)
    assert message.startswith(f"{url}: ") and refused.value.exit_code == 2
    accepted = (
        "accepted: a local path or file:// URL, s3://, s3a://, gs://, gcs://, az://, abfs://, abfss://, memory://"
    )
    assert accepted in message
    assert set(fsspec.registry) == loaded  # no file system class was even imported: nothing was connected to


def test_encode_to_sftp_is_one_error_line_before_any_connection(data):
    # paramiko (sftp) is not installed here: were the URL handed to fsspec, the error would be its ImportError.
    result = CliRunner().invoke(
        app, ["encode", str(data.src), "sftp://host/x", "--resolution", "32", "--vae", data.vae, "--no-progress"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: sftp://host/x: the protocol sftp:// is not supported: a dataset's files must appear whole or not at "
        "all, and a store that writes in place (sftp, ftp, hdfs, webdav, ...) leaves a half-written file under its "
        "final name after a crash; accepted: a local path or file:// URL, s3://, s3a://, gs://, gcs://, az://, "
        "abfs://, abfss://, memory:// (stores whose single-request uploads appear whole), and http(s):// only to "
        "read one reference .npz"
    ]


def test_a_reference_npz_can_be_read_over_http_but_http_holds_no_dataset(tmp_path):
    import functools
    import http.server
    import threading

    from pipeline.evaluate.reference.remote import stage_reference

    served = tmp_path / "served"
    served.mkdir()
    np.savez(served / "reference.npz", arr_0=np.arange(48, dtype=np.uint8).reshape(1, 4, 4, 3))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        copy = stage_reference(f"{base}/reference.npz", tmp_path / "cache")
        assert copy.parent == tmp_path / "cache" and copy.read_bytes() == (served / "reference.npz").read_bytes()
        with pytest.raises(StorageError, match=rf"^{base}/dataset: http:// is read-only here"):
            stage_reference(f"{base}/dataset/", tmp_path / "cache")
        with pytest.raises(StorageError, match=rf"^{base}/out: http:// is read-only here"):
            Location.of(f"{base}/out")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def observed_memory():
    """fsspec's memory file system, as `memory://`, with two misbehaviours of real remote stores switched on per
    test: `unreachable` (an fnmatch pattern): reads of those objects fail as a dropped connection does;
    `replaced_after_read` {path: bytes}: an object replaced by another writer just after its first read. `reads`
    lists every object read. A real file system subclass: everything else is the memory store's own code."""
    import fnmatch

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class ObservedMemory(MemoryFileSystem):
        unreachable: str | None = None
        replaced_after_read: dict[str, bytes] = {}
        reads: list[str] = []

        def cat_file(self, path, start=None, end=None, **kwargs):
            path = self._strip_protocol(path)
            type(self).reads.append(path)
            if self.unreachable and fnmatch.fnmatch(path, self.unreachable):
                raise ConnectionResetError(104, "Connection reset by peer")
            data = super().cat_file(path, start, end, **kwargs)
            if path in self.replaced_after_read:
                self.pipe_file(path, self.replaced_after_read.pop(path))
            return data

    fsspec.register_implementation("memory", ObservedMemory, clobber=True)
    try:
        yield ObservedMemory
    finally:
        fsspec.register_implementation("memory", MemoryFileSystem, clobber=True)


def _memory_url(tmp_path: Path, name: str) -> str:
    return f"memory://{tmp_path.name}/{name}"  # the memory store is one per process: a prefix per test


def test_a_sidecar_that_cannot_be_read_stops_the_job_and_no_shard_is_rewritten(data, tmp_path, observed_memory):
    import fsspec

    from pipeline.core.storage_io import StorageReadError
    from pipeline.encode.job import JobError

    url = _memory_url(tmp_path, "images")
    assert run_encode(_job(data, url, kind="images")).ok
    memory = fsspec.filesystem("memory")
    memory.rm_file(f"{url}/manifest.json")  # as a job killed before its manifest: the sidecars are the record
    before = {path: memory.cat_file(path) for path in memory.ls(url, detail=False)}

    # Readable sidecars: a job with other settings would rewrite their shards, so it is refused.
    with pytest.raises(JobError, match=r"holds another dataset: shard-000000.tar holds other items or settings"):
        run_encode(_job(data, url, kind="images", resolution=16))
    observed_memory.unreachable = "*/shard-*.json"
    with pytest.raises(StorageReadError) as unreadable:
        run_encode(_job(data, url, kind="images", resolution=16))
    assert str(unreadable.value) == (
        f"{url}/shard-000000.json: cannot be read (ConnectionResetError: Connection reset by peer); nothing was "
        "concluded from it: re-run once it can be read"
    )
    result = CliRunner().invoke(
        app, ["pack", str(data.src), url, "--resolution", "16", "--shard-size", str(SHARD_SIZE), "--workers", "0"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error: ")] == [f"error: {unreadable.value}"]
    observed_memory.unreachable = None
    assert {path: memory.cat_file(path) for path in memory.ls(url, detail=False)} == before


def test_only_not_found_means_missing_in_a_local_directory(tmp_path):
    from pipeline.core.storage_io import StorageReadError

    location = Location.of(tmp_path)
    assert shards.read_sidecar(tmp_path, 0) is None and location.stat("shard-000000.json") is None
    assert location.read_many(["shard-000000.json"]) == {"shard-000000.json": None}
    (tmp_path / "shard-000000.json").mkdir()  # a real failure that is not "not found" (root ignores chmod)
    sidecar = tmp_path / "shard-000000.json"
    with pytest.raises(StorageReadError) as unreadable:
        shards.read_sidecar(tmp_path, 0)
    assert str(unreadable.value) == (
        f"{sidecar}: cannot be read (OSError: {sidecar}: not a regular file); nothing was concluded from it: re-run "
        "once it can be read"
    )
    assert unreadable.value.exit_code == 1
    with pytest.raises(StorageReadError, match=rf"^{sidecar}: cannot be read"):
        location.read_many(["shard-000000.json"])
    (tmp_path / "a-file").write_text("x")  # a path through a file (NotADirectoryError): nothing can be there
    assert Location.of(tmp_path / "a-file").stat("manifest.json") is None
    with pytest.raises(ManifestError, match=rf"^no dataset manifest at {tmp_path / 'a-file'}/manifest.json$"):
        load_manifest(tmp_path / "a-file")


def test_a_reference_manifest_is_read_once_and_staged_as_the_bytes_parsed(data, tmp_path, observed_memory):
    import fsspec

    from pipeline.evaluate.reference.remote import stage_reference

    url, other = _memory_url(tmp_path, "reference"), _memory_url(tmp_path, "other")
    assert run_encode(_job(data, url, kind="images")).ok
    assert run_encode(_job(data, other, kind="images", resolution=16)).ok  # same shard names, other contents
    memory = fsspec.filesystem("memory")
    first = memory.cat_file(f"{url}/manifest.json")
    # Another writer replaces the dataset's manifest just after it is read (its shards would follow).
    manifest_path = memory._strip_protocol(f"{url}/manifest.json")
    observed_memory.replaced_after_read = {manifest_path: memory.cat_file(f"{other}/manifest.json")}
    observed_memory.reads = []
    copy = stage_reference(url, tmp_path / "cache")
    assert observed_memory.reads.count(manifest_path) == 1
    assert (copy / "manifest.json").read_bytes() == first
    staged = json.loads(first)
    for entry in (entry for entry in staged["shards"] if entry["count"]):
        assert hashlib.sha256((copy / entry["name"]).read_bytes()).hexdigest() == entry["sha256"]


def test_location_is_an_abstract_base_and_no_stub_returns_none():
    import ast

    assert Location.__abstractmethods__ == {
        "exists",
        "create",
        "names",
        "stat",
        "read_bytes",
        "write_bytes",
        "writer",
        "remove",
        "remove_temporary_files",
        "lock",
    }

    class OnlyExists(Location):
        def exists(self) -> bool:
            return True

    with pytest.raises(TypeError, match="abstract"):
        OnlyExists()
    stubs = []  # functions whose body is `...` (after a docstring) that are not abstract: they return None
    for path in sorted(p for package in ("diffit", "pipeline", "cli") for p in (REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            value = body[0].value if len(body) == 1 and isinstance(body[0], ast.Expr) else None
            is_stub = isinstance(value, ast.Constant) and value.value is Ellipsis
            decorators = {ast.unparse(decorator).rsplit(".", 1)[-1] for decorator in node.decorator_list}
            if is_stub and not decorators & {"abstractmethod", "overload"}:
                stubs.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert stubs == []
