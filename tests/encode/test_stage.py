"""End-to-end tests of `encode`, `pack` and `inspect` with a tiny random AutoencoderKL loaded through `--vae PATH`.

Fast tests run the Dask job in-process (`--workers 0`); the `slow` ones start real worker processes: a 2-worker
run during which one worker is killed, and a 1-worker CLI subprocess killed mid-job and re-run. Both must give
shards byte-identical to an in-process reference run (so 1-worker and 2-worker shards are identical too).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from pipeline.core import shards as shards
from pipeline.core.dataset_verify import verify_dataset
from pipeline.core.manifest import FORMAT_VERSION, ManifestError, load_manifest, shard_urls
from pipeline.core.shard_members import decode_sample
from pipeline.encode.job import EncodeOptions, run_encode
from pipeline.encode.transforms import prepare_image
from tests.support.encode_fixtures import (
    CLASS_NAMES,
    TEST_MAX_PIXELS,
    kill_job_midway,
    make_bad_corpus,
    make_image_tree,
    save_tiny_vae,
)

REPO = Path(__file__).resolve().parents[2]
CLI_RUNNER_CODE = "from cli.main import main; main()"
# Process runs use small shards so that a kill lands between shards, and 1 torch thread per worker so that
# 1-worker and 2-worker runs do the same arithmetic.
PROCESS_SHARD_SIZE = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny VAE directory, a 3-class image tree (42 images) and the bad-input corpus."""
    root = tmp_path_factory.mktemp("encode-data")
    labels = make_image_tree(root / "src")
    outcome = make_bad_corpus(root / "bad")
    return SimpleNamespace(
        root=root,
        vae=str(save_tiny_vae(root / "vae")),
        src=root / "src",
        labels=labels,
        bad=root / "bad",
        outcome=outcome,
    )


def _encode_args(data, source, out, *options, shard_size=8, batch_size=4, workers="0") -> list:
    """`encode SOURCE OUT` at 32 px with the tiny VAE, the test pixel limit and no progress bar, plus `options`."""
    common = ["--resolution", "32", "--vae", data.vae, "--shard-size", str(shard_size), "--batch-size", str(batch_size)]
    where = ["--workers", str(workers)] if workers is not None else []
    return ["encode", source, out, *common, *where, "--max-pixels", str(TEST_MAX_PIXELS), "--no-progress", *options]


def _config(data, source, out, **overrides) -> EncodeOptions:
    settings = dict(
        source=str(source),
        out=str(out),
        resolution=32,
        vae=data.vae,
        shard_size=8,
        batch_size=4,
        workers=0,
        max_pixels=TEST_MAX_PIXELS,
        progress=False,
    )
    settings.update(overrides)
    return EncodeOptions(**settings)


def _samples(out: Path) -> dict[str, dict]:
    """Every decoded sample of a dataset by key, read through webdataset in manifest order."""
    manifest = load_manifest(out)
    samples = {}
    for url in shard_urls(out, manifest):
        for raw in shards.iter_samples(url):
            sample = decode_sample(raw)
            samples[sample["__key__"]] = sample
    return samples


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))}


def _comparable(manifest: dict) -> dict:
    """A manifest without the fields that name the run (time, command line, output-independent paths)."""
    return {k: v for k, v in manifest.items() if k not in ("created", "command")}


@pytest.fixture(scope="module")
def encoded(data, tmp_path_factory):
    """The class tree encoded in-process (shared by the tests that only read it)."""
    out = tmp_path_factory.mktemp("encoded") / "latents"
    result = run_encode(_config(data, data.src, out))
    return SimpleNamespace(out=out, result=result)


# ---------------------------------------------------------------------------------------------------------------
# In-process jobs


def test_encode_counts_labels_and_manifest(data, encoded):
    result, out = encoded.result, encoded.out
    assert result.ok and result.counts == {"seen": 42, "written": 42, "failed": 0}
    manifest = load_manifest(out)
    assert manifest["kind"] == "latents" and manifest["format_version"] == FORMAT_VERSION
    assert manifest["label_map"] == {name: i for i, name in enumerate(CLASS_NAMES)} and manifest["num_classes"] == 3
    assert (
        manifest["latent_channels"] == 4 and manifest["latent_size"] == 4 and manifest["latent_shape"] == [2, 4, 4, 4]
    )
    vae = manifest["vae"]
    assert vae["scaling_factor"] == 0.18215 and vae["convention"] == "unscaled" and vae["dtype"] == "fp32"
    assert vae["path"] == str(Path(data.vae).resolve()) and vae["source"] == "local" and len(vae["path_hash"]) == 64
    assert manifest["transform"]["name"] == "adm-center-crop" and manifest["resolution"] == 32
    assert [entry["name"] for entry in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(6)]
    assert [entry["count"] for entry in manifest["shards"]] == [8, 8, 8, 8, 8, 2]
    assert manifest["source"]["root"] == str(data.src.resolve()) and manifest["package_version"]
    for index, entry in enumerate(manifest["shards"]):
        sidecar = json.loads((out / f"shard-{index:06d}.json").read_text())
        assert (sidecar["sha256"], sidecar["bytes"], sidecar["count"]) == (
            entry["sha256"],
            entry["bytes"],
            entry["count"],
        )
        assert sidecar["sha256"] == shards.sha256_file(out / entry["name"])
    assert (out / "failures.jsonl").read_text() == ""
    assert list(out.glob("*.tmp-*")) == []

    samples = _samples(out)
    assert len(samples) == 42
    for key, sample in samples.items():
        source_path = sample["json"]["source"]
        folder = source_path.split("/")[0]
        assert sample["cls"] == data.labels[source_path] == manifest["label_map"][folder]
        assert key.startswith(folder + "/") and "." not in key
        assert sample["mean.npy"].shape == sample["std.npy"].shape == (2, 4, 4, 4)
        assert sample["mean.npy"].dtype == np.float16 and (sample["std.npy"] > 0).all()
        assert len(sample["json"]["crop_box"]) == 4 and len(sample["json"]["original_size"]) == 2


def test_latents_equal_direct_vae_call(data, encoded):
    import torch

    from pipeline.core.vae import load_vae

    samples = _samples(encoded.out)
    keys = sorted(samples)
    crops = np.stack([prepare_image((data.src / samples[k]["json"]["source"]).read_bytes(), 32)[0] for k in keys])
    model = load_vae(str(Path(data.vae).resolve()))
    with torch.no_grad():
        images = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
        direct = model.encode(images).latent_dist
        flipped = model.encode(images.flip(-1)).latent_dist
    stored_mean = np.stack([samples[k]["mean.npy"] for k in keys]).astype(np.float32)
    stored_std = np.stack([samples[k]["std.npy"] for k in keys]).astype(np.float32)
    # float16 storage: relative error 2^-11 on top of batch-size-dependent float32 rounding.
    np.testing.assert_allclose(stored_mean[:, 0], direct.mean.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(stored_mean[:, 1], flipped.mean.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(stored_std[:, 0], direct.std.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(stored_std[:, 1], flipped.std.numpy(), rtol=2e-3, atol=2e-3)
    assert not np.allclose(stored_mean[:, 0], stored_mean[:, 1], atol=1e-2)  # the flip is a different latent


def test_bad_inputs_are_converted_or_recorded(data, cli, tmp_path):
    out = tmp_path / "bad-latents"
    args = _encode_args(data, data.bad, out, shard_size=6)
    result = cli(*args)
    expected_failed = sorted(name for name, outcome in data.outcome.items() if outcome == "fail")
    expected_ok = sorted(name for name, outcome in data.outcome.items() if outcome == "ok")
    assert result.exit_code == 1, result.output
    assert "above --max-failure-rate 0.001" in result.output and "failures.jsonl" in result.output

    manifest = load_manifest(out)  # a complete dataset is still written, only the exit status says no
    counts = manifest["counts"]
    assert counts == {"seen": len(data.outcome), "written": len(expected_ok), "failed": len(expected_failed)}
    assert counts["seen"] == counts["written"] + counts["failed"]
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(Path(f["path"]).name for f in failures) == expected_failed
    reasons = {Path(f["path"]).name: f["reason"] for f in failures}
    assert reasons["zero_bytes.png"] == "empty file (0 bytes)"
    assert "not an image file" in reasons["notes.txt"] and "not an image file" in reasons["corrupt.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "decompression-bomb guard" in reasons["bomb.png"] and "over the limit of 40000" in reasons["huge.png"]

    written = {sample["json"]["source"]: sample for sample in _samples(out).values()}
    assert sorted(written) == expected_ok
    assert written["grey16_I16.png"]["json"]["mode"] == "I;16" and written["cmyk.jpg"]["json"]["mode"] == "CMYK"
    assert written["animated.gif"]["json"]["frames"] == 3
    assert written["exif_rotated.jpg"]["json"]["original_size"] == [24, 48]
    assert all(sample["cls"] == -1 for sample in written.values()) and manifest["num_classes"] == 0
    assert all(sample["mean.npy"].shape == (2, 4, 4, 4) for sample in written.values())

    # Same command with a tolerant limit: exit 0, and every shard is reused (resume).
    result = cli(*args, "--max-failure-rate", "0.5")
    assert result.exit_code == 0, result.output
    assert f"({-(-len(data.outcome) // 6)} shard(s) were already complete)" in result.output


def test_unreadable_file_is_recorded(data, tmp_path, cli):
    from tests.support.encode_fixtures import unreadable_case_is_readable

    if unreadable_case_is_readable(data.bad / "unreadable.png"):
        pytest.skip("running as root: a mode-000 file is still readable, so 'permission denied' cannot be produced")
    out = tmp_path / "out"
    cli(*_encode_args(data, data.bad, out, "--max-failure-rate", "1", shard_size=1000, batch_size=32))
    failures = {
        Path(f["path"]).name: f["reason"] for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())
    }
    assert "Permission denied" in failures["unreadable.png"]


def test_pack_then_encode_from_packed_shards(data, encoded, tmp_path):
    packed = tmp_path / "packed"
    result = run_encode(_config(data, data.src, packed, kind="images"))
    assert result.ok and result.counts["written"] == 42
    manifest = load_manifest(packed)
    assert manifest["kind"] == "images" and manifest["image_shape"] == [32, 32, 3] and "vae" not in manifest
    images = _samples(packed)
    for sample in images.values():
        expected, _ = prepare_image((data.src / sample["json"]["source"]).read_bytes(), 32)
        np.testing.assert_array_equal(sample["png"], expected)  # PNG is lossless

    from_packed = tmp_path / "from-packed"
    result = run_encode(_config(data, packed, from_packed))
    assert result.ok and result.counts == {"seen": 42, "written": 42, "failed": 0}
    manifest = load_manifest(from_packed)
    assert manifest["label_map"] == load_manifest(encoded.out)["label_map"]
    assert manifest["source"]["layout"] == "shards"
    direct = _samples(encoded.out)
    for key, sample in _samples(from_packed).items():
        reference = direct[key]
        assert sample["cls"] == reference["cls"]
        assert sample["json"]["source"] == reference["json"]["source"]
        assert sample["json"]["crop_box"] == reference["json"]["crop_box"]  # crop of a crop maps back to the original
        assert sample["json"]["packed_from"].endswith("#" + key)
        np.testing.assert_allclose(
            sample["mean.npy"].astype(np.float32), reference["mean.npy"].astype(np.float32), atol=2e-3
        )


def test_resume_redoes_only_missing_or_damaged_shards(data, encoded, tmp_path):
    import shutil

    out = tmp_path / "resume"
    shutil.copytree(encoded.out, out)
    reference = _shard_bytes(encoded.out)
    (out / "shard-000002.tar").unlink()  # a shard lost
    sidecar = json.loads((out / "shard-000004.json").read_text())
    sidecar["sha256"] = "0" * 64  # a sidecar that no longer matches its tar
    (out / "shard-000004.json").write_text(json.dumps(sidecar))
    (out / "shard-000001.tar.tmp-host-123-abcdef12").write_bytes(b"partial")  # leftover of a killed attempt
    (out / "shard-000009.tar").write_bytes(b"from a larger earlier run")

    result = run_encode(_config(data, data.src, out))
    assert result.ok and result.shards_skipped == 4 and result.shards_written == 2
    assert _shard_bytes(out) == reference
    assert _comparable(load_manifest(out)) == _comparable(load_manifest(encoded.out))

    # Other settings (here the resolution) never reuse a shard (they make another dataset: --overwrite).
    result = run_encode(_config(data, data.src, out, resolution=64, overwrite=True))
    assert result.ok and result.shards_skipped == 0 and load_manifest(out)["latent_size"] == 8


def test_limit_and_label_map_with_limit(data, tmp_path):
    result = run_encode(_config(data, data.src, tmp_path / "limited", limit=5))
    manifest = load_manifest(tmp_path / "limited")
    assert result.counts == {"seen": 5, "written": 5, "failed": 0}
    assert manifest["num_classes"] == 3  # the label map comes from the whole source, not from the first items


def test_inspect_summary_verify_and_preview(data, encoded, cli, tmp_path):
    import shutil

    out = tmp_path / "inspected"
    shutil.copytree(encoded.out, out)
    result = cli("inspect", out, "--verify", "--preview", tmp_path / "grid.png", "--count", "9")
    assert result.exit_code == 0, result.output
    assert "42 written / 42 seen / 0 failed" in result.output and "classes    3 (n01440764" in result.output
    assert "scaling_factor 0.18215" in result.output and "verified   6 shard(s)" in result.output
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (3 * 34 + 2, 3 * 34 + 2)  # 3x3 decoded 32 px images with 2 px padding

    data_bytes = bytearray((out / "shard-000003.tar").read_bytes())
    data_bytes[1000] ^= 0x40
    (out / "shard-000003.tar").write_bytes(bytes(data_bytes))
    result = cli("inspect", out, "--verify")
    assert result.exit_code == 1
    assert (
        "shard-000003.tar: sha256" in result.output
        and "verification failed (1 problem(s) in 6 shards)" in result.output
    )


def test_inspect_preview_of_raw_images_and_missing_manifest(data, cli, tmp_path):
    packed = tmp_path / "packed"
    run_encode(_config(data, data.src, packed, kind="images", limit=4))
    result = cli("inspect", packed, "--preview", tmp_path / "raw.png")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "raw.png") as grid:
        assert grid.size == (2 * 34 + 2, 2 * 34 + 2)
    result = cli("inspect", tmp_path / "nothing-here")
    assert result.exit_code == 2 and "no dataset manifest at" in result.output

    # Damaged files: one `error:` line naming the file, exit 2 (no traceback).
    (packed / "failures.jsonl").write_text("{not json\n")
    result = cli("inspect", packed)
    assert result.exit_code == 2 and f"error: {packed / 'failures.jsonl'}: line 1 is not JSON" in result.output
    (packed / "failures.jsonl").write_text("")
    (packed / "shard-000000.tar").write_bytes(b"damaged" * 100)
    result = cli("inspect", packed, "--preview", tmp_path / "damaged.png")
    assert result.exit_code == 2 and f"error: {packed / 'shard-000000.tar'}: cannot read its samples" in result.output


def test_bad_vae_fails_before_any_work(data, cli, tmp_path):
    out = tmp_path / "never"
    result = cli("encode", data.src, out, "--resolution", "32", "--vae", tmp_path / "no-such-vae", "--workers", "0")
    assert result.exit_code == 2
    assert "no such directory. Pass an existing local directory" in result.output
    assert not out.exists()
    result = cli("encode", data.src, out, "--resolution", "32", "--vae", "stabilityai/sd-vae-ft-ema", "--workers", "0")
    assert result.exit_code == 2 and "--vae DIR (a local path)" in result.output and not out.exists()
    result = cli("encode", data.src, out, "--resolution", "36", "--vae", data.vae, "--workers", "0")
    assert result.exit_code == 2 and "not a multiple of the VAE's downsampling factor 8" in result.output


def test_failed_shard_is_reported_and_redone_on_rerun(data, encoded, cli, tmp_path, monkeypatch):
    import pipeline.encode.worker as encode_module

    original = encode_module.write_batch

    def broken_for_shard_1(writer, vae, ready, failures, task):
        if task.index == 1:
            raise RuntimeError("disk on fire")
        return original(writer, vae, ready, failures, task)

    out = tmp_path / "partial"
    args = _encode_args(data, data.src, out)
    monkeypatch.setattr(encode_module, "write_batch", broken_for_shard_1)
    result = cli(*args)
    assert result.exit_code == 1
    assert "1 of 6 shard(s) failed, no manifest was written" in result.output
    assert "shard-000001.tar: RuntimeError: disk on fire" in result.output
    assert not (out / "manifest.json").exists() and not (out / "shard-000001.tar").exists()
    assert (out / "shard-000002.json").exists() and list(out.glob("*.tmp-*")) == []

    monkeypatch.setattr(encode_module, "write_batch", original)
    result = cli(*args)
    assert result.exit_code == 0 and "(5 shard(s) were already complete)" in result.output
    assert _shard_bytes(out) == _shard_bytes(encoded.out)


def test_scheduler_address_runs_on_that_cluster(data, encoded, cli, tmp_path):
    from distributed import LocalCluster

    from pipeline.encode.cluster import local_cores

    out = tmp_path / "remote"
    # A running cluster's worker uses as many torch threads as it has Dask threads (1 here); the in-process
    # reference used all cores, which byte identity needs here too.
    threads = ["--torch-threads", str(local_cores())]
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        dashboard_address=None,
        silence_logs=logging.ERROR,
        protocol="tcp",
    ) as cluster:
        scheduler = ["--scheduler", cluster.scheduler_address]
        result = cli(*_encode_args(data, data.src, out, *scheduler, *threads, workers=None))
    assert result.exit_code == 0, result.output
    assert _shard_bytes(out) == _shard_bytes(encoded.out)


# ---------------------------------------------------------------------------------------------------------------
# Real worker processes


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory):
    """The class tree encoded in this process with 1 torch thread: the reference for byte identity.

    The 1-worker CLI run and the 2-worker run below must both reproduce it byte for byte, hence each other.
    """
    import torch

    out = tmp_path_factory.mktemp("reference") / "latents"
    threads = torch.get_num_threads()
    try:
        result = run_encode(_config(data, data.src, out, torch_threads=1, shard_size=PROCESS_SHARD_SIZE))
    finally:
        torch.set_num_threads(threads)
    assert result.ok
    return out


@pytest.mark.slow
def test_two_workers_identical_and_survive_a_worker_kill(data, reference_run, tmp_path):
    import dask
    from distributed import Client, LocalCluster

    from pipeline.core.vae import vae_load_count
    from pipeline.encode.cluster import LOCAL_CLUSTER_CONFIG

    out = tmp_path / "two-workers"
    config = _config(data, data.src, out, torch_threads=1, shard_size=PROCESS_SHARD_SIZE)
    total = len(list(reference_run.glob("shard-*.tar")))
    with (
        dask.config.set(LOCAL_CLUSTER_CONFIG),
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
        ) as cluster,
        Client(cluster) as client,
    ):
        worker_pids = set(client.run(os.getpid).values())
        outcome = {}
        job = threading.Thread(target=lambda: outcome.update(result=run_encode(config, client=client)))
        job.start()
        killed = None
        deadline = time.monotonic() + 180
        while job.is_alive() and killed is None and time.monotonic() < deadline:
            # A temporary shard file names the pid writing it: kill that worker while it is in the middle of a
            # shard. Once a third of the shards are done, so that the survivor finishes the job before the nanny's
            # replacement worker has imported torch (which would only make the test slower).
            if len(list(out.glob("shard-*.json"))) < total // 3:
                time.sleep(0.002)
                continue
            for partial in out.glob("shard-*.tar.tmp-*"):
                pid = int(partial.name.rsplit("-", 2)[1])
                if pid in worker_pids:
                    os.kill(pid, signal.SIGKILL)
                    killed = pid
                    break
            time.sleep(0.002)
        job.join(timeout=300)
        assert killed is not None, "the job finished before a worker could be killed"
        loads = client.run(vae_load_count)
    result = outcome["result"]
    assert result.ok and result.counts == {"seen": 42, "written": 42, "failed": 0}, result.failed_shards
    assert _shard_bytes(out) == _shard_bytes(reference_run)
    assert _comparable(load_manifest(out)) == _comparable(load_manifest(reference_run))
    assert list(out.glob("*.tmp-*")) == []  # the killed attempt's partial file was cleaned up
    assert all(count <= 1 for count in loads.values())  # the VAE is built once per worker, not once per task


def _cli_command(data, out) -> list[str]:
    arguments = _encode_args(data, data.src, out, "--torch-threads", "1", shard_size=PROCESS_SHARD_SIZE, workers=1)
    return [sys.executable, "-c", CLI_RUNNER_CODE, *map(str, arguments)]


@pytest.mark.slow
def test_cli_killed_midway_then_rerun_gives_identical_shards(data, reference_run, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    log = kill_job_midway(_cli_command(data, out), REPO, env, out)
    total = len(list(reference_run.glob("shard-*.tar")))
    done_before = len(list(out.glob("shard-*.json")))
    assert 2 <= done_before < total, f"kill did not land mid-job ({done_before}/{total} shards):\n{log}"
    assert not (out / "manifest.json").exists()
    with pytest.raises(ManifestError, match="did not finish: re-run"):
        load_manifest(out)

    rerun = subprocess.run(_cli_command(data, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    skipped = int(re.search(r"\((\d+) shard\(s\) were already complete\)", rerun.stdout).group(1))
    assert skipped >= done_before - 1  # at most the shard being renamed at kill time lacks its sidecar
    assert _shard_bytes(out) == _shard_bytes(reference_run)
    manifest = load_manifest(out)
    assert manifest["counts"] == {"seen": 42, "written": 42, "failed": 0}
    assert _comparable(manifest) == _comparable(load_manifest(reference_run))
    assert verify_dataset(out).ok and list(out.glob("*.tmp-*")) == []


# ---------------------------------------------------------------------------------------------------------------
# Batches prepared ahead on threads (issue 16)


def _run_shards_with_markers(data, out: Path, kind: str, prefetch: int, monkeypatch) -> dict:
    """Every shard of the bad corpus written by `encode_shard` with `prefetch` batches prepared ahead (3 items a
    batch, so a batch can hold several decode failures). The real write_batch is wrapped to append one marker
    failure per batch (standing in for a VAE failure, which comes after the batch's decode failures) and, when
    prefetching, to wait until the following batches are being prepared: the overlap is shown, not assumed."""
    import pipeline.encode.job as job
    import pipeline.encode.worker as worker

    prepared: list[tuple[int, int, str]] = []  # (shard, first item, thread name) per prepare_batch call
    waited: list[bool] = []
    real_prepare, real_write = worker.prepare_batch, worker.write_batch

    def recording_prepare(batch, task, failures):
        prepared.append((task.index, batch[0].index, threading.current_thread().name))
        return real_prepare(batch, task, failures)

    def write_with_marker(writer, vae, ready, failures, task):
        batches = -(-task.count // task.batch_size)
        written = sum(1 for failure in failures if failure["reason"].startswith("marker")) + 1
        if prefetch:
            wanted = min(written + prefetch, batches)  # this batch and the ones prepared ahead of it
            deadline = time.monotonic() + 30
            while sum(1 for shard, _, _ in prepared if shard == task.index) < wanted and time.monotonic() < deadline:
                time.sleep(0.001)
            waited.append(sum(1 for shard, _, _ in prepared if shard == task.index) >= wanted)
        real_write(writer, vae, ready, failures, task)
        failures.append({"index": -1, "reason": f"marker {written - 1}"})

    monkeypatch.setattr(worker, "prepare_batch", recording_prepare)
    monkeypatch.setattr(worker, "write_batch", write_with_marker)
    plan = job.plan_job(_config(data, data.bad, out, kind=kind, shard_size=8, batch_size=3))
    out.mkdir(parents=True)
    sidecars = [worker.encode_shard(task, prefetch_batches=prefetch) for task in plan.tasks]
    monkeypatch.undo()
    return {"sidecars": sidecars, "prepared": prepared, "waited": waited, "tasks": plan.tasks}


@pytest.mark.parametrize("kind", ["latents", "images"])
def test_prefetched_batches_give_identical_shards_and_failures(data, tmp_path, monkeypatch, kind):
    sequential = _run_shards_with_markers(data, tmp_path / "sequential", kind, 0, monkeypatch)
    prefetched = _run_shards_with_markers(data, tmp_path / "prefetched", kind, 2, monkeypatch)

    assert _shard_bytes(tmp_path / "prefetched") == _shard_bytes(tmp_path / "sequential")
    assert prefetched["sidecars"] == sequential["sidecars"]  # counts, sha256, and the failure records in order
    assert {name for _, _, name in sequential["prepared"]} == {"MainThread"}
    assert all(name.startswith("encode-prepare") for _, _, name in prefetched["prepared"])
    assert prefetched["waited"] and all(prefetched["waited"])  # batch k + 1 and k + 2 were prepared while k was written
    # Each batch prepared once, in order: 21 items in shards of 8 and batches of 3 → [0, 3, 6], [8, 11, 14], [16, 19].
    assert [first for _, first, _ in prefetched["prepared"]] == [0, 3, 6, 8, 11, 14, 16, 19]

    # The order of today's sequential loop: per batch, its decode failures (in item order), then its marker.
    expected_failed = sorted(name for name, outcome in data.outcome.items() if outcome == "fail")
    for task, sidecar in zip(sequential["tasks"], sequential["sidecars"]):
        first = task.block.unpack()[0].index
        order = [
            (int(f["reason"].split()[1]), 1) if f["index"] < 0 else ((f["index"] - first) // 3, 0)
            for f in sidecar["failures"]
        ]
        assert order == sorted(order) and [o for o in order if o[1]] == [(b, 1) for b in range(-(-task.count // 3))]
    decode_failures = [f for s in sequential["sidecars"] for f in s["failures"] if f["index"] >= 0]
    assert sorted(Path(f["path"]).name for f in decode_failures) == expected_failed
    assert [f["index"] for f in decode_failures] == sorted(f["index"] for f in decode_failures)


def test_walk_progress_counts_items_and_changes_no_file(data, encoded, tmp_path, capsys):
    out = tmp_path / "with-progress"
    capsys.readouterr()
    run_encode(_config(data, data.src, out, progress=True))
    err = capsys.readouterr().err
    assert re.search(r"listing source: 42 items \[", err), err  # the counter of the walk (no total) ...
    assert " items/s]" in err  # ... with its rate
    assert _shard_bytes(out) == _shard_bytes(encoded.out)
    assert (out / "failures.jsonl").read_bytes() == (encoded.out / "failures.jsonl").read_bytes()
    assert _comparable(load_manifest(out)) == _comparable(load_manifest(encoded.out))
