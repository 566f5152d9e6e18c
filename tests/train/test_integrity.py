"""Integrity of the train stage (issue 19): damaged shards never train silently, damaged checkpoints are never
resumed silently, ranks get balanced work, and every such failure is one clear line with exit code 2.

Each case builds its damage by hand: latents overwritten in place (same size), a flipped tar header, truncated
or bit-flipped checkpoint files, a damaged RNG state."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.core.manifest import load_manifest, shard_urls
from pipeline.core.shard_members import npy_bytes
from pipeline.core.shards import sha256_file
from pipeline.train import CheckpointError, TrainOptions, run_train
from pipeline.train.checkpoint import list_checkpoints
from pipeline.train.data import StreamSpec, infinite, make_loader
from pipeline.train.shard_reading import DataFormatError
from tests.support.train_fixtures import (
    read_metrics,
    run_train_subprocess,
    tiny_latent_config,
    train_command,
    write_config,
    write_latent_dataset,
)

SCALE = 0.18215


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_in_process(tmp_path: Path, config: dict, data: Path, name: str = "run", **kwargs) -> tuple[dict, Path]:
    run_dir = tmp_path / name
    config_path = write_config(tmp_path / f"{name}.yaml", config)
    return run_train(TrainOptions(run_dir=run_dir, config_path=config_path, data_dir=data, **kwargs)), run_dir


def cli(*args: str):
    """`diffit-pipe ARGS` in this process (the real app: PipelineErrors become one `error:` line)."""
    from cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def assert_one_clear_line(output: str, *fragments: str) -> str:
    """Exactly one `error:` line, holding every fragment; no traceback anywhere."""
    lines = error_lines(output)
    assert len(lines) == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# Damaging shards
# ---------------------------------------------------------------------------------------------------------------


def overwrite_latents(shard: Path, value: float = 40.0) -> None:
    """Every `mean.npy` of the shard set to `value`, in place: same size, valid tar, valid arrays."""
    raw = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            if member.name.endswith("mean.npy"):
                start, end = member.offset_data, member.offset_data + member.size
                array = np.load(io.BytesIO(bytes(raw[start:end])))
                replacement = npy_bytes(np.full_like(array, value))
                assert len(replacement) == member.size
                raw[start:end] = replacement
    size = shard.stat().st_size
    shard.write_bytes(bytes(raw))
    assert shard.stat().st_size == size


def flip_first_header(shard: Path) -> None:
    """Flip one bit of the first tar header's member name (its checksum no longer matches)."""
    raw = bytearray(shard.read_bytes())
    raw[3] ^= 0x01
    shard.write_bytes(bytes(raw))


def record_shard_as_is(data: Path, name: str) -> None:
    """Rewrite the manifest entry of shard `name` with the file's current sha256 (a dataset written damaged)."""
    manifest = json.loads((data / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry["sha256"] = sha256_file(data / name)
    (data / "manifest.json").write_text(json.dumps(manifest))


def stream_spec(data: Path, verified: bool = True, **overrides) -> StreamSpec:
    """A fixed-order latent stream over `data`; `verified`: with the manifest's sha256 of each shard."""
    manifest = load_manifest(data)
    base = dict(
        urls=tuple(shard_urls(data, manifest)),
        kind="latents",
        batch_size=2,
        resampled=False,
        hflip=False,
        scaling_factor=SCALE,
        num_classes=16,
    )
    if verified:
        base["sha256"] = tuple(entry["sha256"] for entry in manifest["shards"] if entry["count"] > 0)
    return StreamSpec(**{**base, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# Item 4 / 8: corrupted shards
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_checks_each_shard_before_any_of_its_samples_is_used(tmp_path, workers):
    # Two shards of 4 samples, batches of 2: shard 0 gives two clean batches, shard 1 (latents = 40) none.
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=2, num_classes=16)
    overwrite_latents(data / "shard-000001.tar")
    batches = []
    with pytest.raises(DataFormatError) as caught:
        for batch in infinite(make_loader(stream_spec(data), workers)):
            batches.append(batch)
    message = str(caught.value)
    assert "\n" not in message and "shard-000001.tar: sha256" in message and "does not match the manifest" in message
    # Every batch before the error is from shard 0 (labels 0-3), none holds a latent of the damaged shard.
    assert len(batches) == (2 if workers == 0 else 1)
    assert all(set(labels.tolist()) <= {0, 1, 2, 3} for _, labels in batches)
    assert all(float(x.abs().max()) < 6.0 for x, _ in batches)  # a damaged latent is 40 x 0.18 = 7.3


def test_a_verified_shard_is_hashed_once_per_process_and_again_after_any_write(tmp_path, monkeypatch):
    from pipeline.train import shard_reading

    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=2, num_classes=16)
    url = str(data / "shard-000001.tar")
    expected = sha256_file(url)
    hashed = []
    real_sha256 = shard_reading.hashlib.sha256

    def counting_sha256(*args):
        hashed.append(url)
        return real_sha256(*args)

    monkeypatch.setattr(shard_reading.hashlib, "sha256", counting_sha256)
    monkeypatch.setattr(shard_reading, "_VERIFIED", set())
    first = shard_reading.read_shard(url, expected)
    assert shard_reading.read_shard(url, expected) == first and len(hashed) == 1  # unchanged: trusted
    overwrite_latents(data / "shard-000001.tar")  # same size, new content: its ctime changes
    with pytest.raises(DataFormatError, match="does not match the manifest"):
        shard_reading.read_shard(url, expected)
    assert len(hashed) == 2


@pytest.mark.slow
def test_train_stops_on_a_corrupted_shard_of_the_right_size_before_another_checkpoint(tmp_path):
    # The real command, 2 DataLoader workers (worker 1 reads shard 1), a checkpoint after every step: the error
    # comes from a worker process, is one line naming the shard, and no checkpoint follows the damaged data.
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=2, num_classes=10)
    overwrite_latents(data / "shard-000001.tar")
    config = write_config(
        tmp_path / "c.yaml",
        tiny_latent_config(
            data={"num_workers": 2},
            train={"max_steps": 10, "global_batch_size": 2},
            checkpoint={"every": 1, "keep": 20},
        ),
    )
    run_dir = tmp_path / "run"
    result = run_train_subprocess(train_command(config, data, run_dir))
    assert result.returncode == 2, result.stderr[-3000:]
    assert_one_clear_line(result.stderr, "shard-000001.tar", "does not match the manifest")
    assert result.stderr.rstrip().splitlines()[-1].startswith("error:")
    # Batch 1 (step 1) came from worker 0; batch 2 would have been the damaged shard's first.
    assert [step for step, _ in list_checkpoints(run_dir)] == [1]
    assert [r["step"] for r in read_metrics(run_dir)] == [1]


def test_skip_opt_in_trains_without_the_damaged_shard_and_counts_it(tmp_path, caplog):
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=2, num_classes=10)
    overwrite_latents(data / "shard-000001.tar")
    config = tiny_latent_config(
        data={"on_corrupt_shard": "skip"}, train={"max_steps": 6, "global_batch_size": 2}, checkpoint={"every": 3}
    )
    with caplog.at_level(logging.WARNING):
        summary, run_dir = train_in_process(tmp_path, config, data)
    assert summary["step"] == 6 and np.isfinite(summary["loss"])
    warnings = [r.getMessage() for r in caplog.records if "shard-000001.tar" in r.getMessage()]
    assert any("skipping a damaged shard" in w and "does not match the manifest" in w for w in warnings), warnings
    assert any("trained without 1 damaged shard(s)" in w for w in warnings), warnings
    assert sum("skipping a damaged shard" in w for w in warnings) == 1  # one warning per shard, not per epoch
    records = read_metrics(run_dir)
    counts = [r["skipped_shards"] for r in records]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 1, counts
    # Steps 3 to 6 would have read shard 1 (labels 4-7): they trained on shard 0 again.
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]


def test_skip_with_every_shard_damaged_is_an_error_not_a_hang(tmp_path):
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=2, num_classes=16)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        overwrite_latents(data / name)
    for resampled in (False, True):
        loader = make_loader(stream_spec(data, resampled=resampled, on_corrupt="skip"), 0)
        with pytest.raises(DataFormatError, match="every shard this worker reads is damaged"):
            next(infinite(loader))


def test_flipped_tar_header_is_one_clear_line(tmp_path):
    config = write_config(tmp_path / "c.yaml", tiny_latent_config(train={"max_steps": 6, "global_batch_size": 2}))
    # As found on disk: the sha256 check names the shard.
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=2, num_classes=10)
    flip_first_header(data / "shard-000001.tar")
    result = cli("train", "--config", config, "--data", data, "--run-dir", tmp_path / "run1")
    assert result.exit_code == 2, result.output[-3000:]
    assert_one_clear_line(result.output, "shard-000001.tar", "does not match the manifest")
    # Written damaged (the manifest records the damaged bytes): the tar parser's error, named, on one line.
    record_shard_as_is(data, "shard-000001.tar")
    result = cli("train", "--config", config, "--data", data, "--run-dir", tmp_path / "run2")
    assert result.exit_code == 2, result.output[-3000:]
    assert_one_clear_line(result.output, "shard-000001.tar", "not a readable tar shard")


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "bytes, expected"),
        ("delete", "missing"),
        ("manifest", "manifest.json"),
        ("member", "is not a valid .npy array"),
        ("empty-tar", "holds no sample"),
    ],
)
def test_every_damaged_dataset_is_one_clear_line(tmp_path, damage, message):
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=2, num_classes=10)
    shard = data / "shard-000001.tar"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-1024])
    elif damage == "delete":
        shard.unlink()
    elif damage == "manifest":
        (data / "manifest.json").write_text('{"format_version": 1, "kind": ')
    elif damage == "member":  # a valid tar whose mean.npy is not an array, recorded as it is
        _rewrite_member(shard, "mean.npy", b"not an array")
        _record_size_and_hash(data, shard.name)
    elif damage == "empty-tar":
        with tarfile.open(shard, "w"):
            pass
        _record_size_and_hash(data, shard.name)
    config = write_config(tmp_path / "c.yaml", tiny_latent_config(train={"max_steps": 6, "global_batch_size": 2}))
    result = cli("train", "--config", config, "--data", data, "--run-dir", tmp_path / "run")
    assert result.exit_code == 2, result.output[-3000:]
    assert_one_clear_line(result.output, message)


def _rewrite_member(shard: Path, suffix: str, payload: bytes) -> None:
    members = []
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            members.append((member, tar.extractfile(member).read()))
    with tarfile.open(shard, "w") as tar:
        for member, content in members:
            if member.name.endswith(suffix):
                content = payload
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(content))


def _record_size_and_hash(data: Path, name: str) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry["sha256"], entry["bytes"] = sha256_file(data / name), (data / name).stat().st_size
    (data / "manifest.json").write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------------------------
# Item 7: balanced work over ranks
# ---------------------------------------------------------------------------------------------------------------


def shard_draws(data: Path, rank: int, world_size: int, samples: int, workers: int = 0) -> Counter:
    """How many samples of each shard one rank's stream yields (3 shards of 2 samples; label // 2 = shard)."""
    spec = stream_spec(
        data, verified=False, rank=rank, world_size=world_size, resampled=True, shuffle_buffer=0, batch_size=50
    )
    counts: Counter = Counter()
    stream = infinite(make_loader(spec, workers))
    while sum(counts.values()) < samples:
        _, labels = next(stream)
        counts.update(label // 2 for label in labels.tolist())
    return counts


def test_resampled_mode_draws_every_shard_uniformly_on_every_rank(tmp_path):
    # 3 shards over 2 ranks: before, rank 0 drew only shards 0 and 2 and rank 1 only shard 1 (shard 1 twice as
    # often overall). Now every rank draws every shard with probability 1/3: 1500 shard draws per rank, each
    # count within 5 standard deviations (5 x 18 draws) of 500.
    data = write_latent_dataset(tmp_path / "data", num_samples=6, num_shards=3, num_classes=16)
    draws = 1500
    sigma = (draws * (1 / 3) * (2 / 3)) ** 0.5
    for rank, workers in ((0, 0), (1, 0), (1, 2)):
        counts = shard_draws(data, rank, 2, 2 * draws, workers)
        per_shard = [counts[shard] / 2 for shard in range(3)]  # a draw of a shard yields its 2 samples
        assert all(abs(n - draws / 3) < 5 * sigma for n in per_shard), (rank, workers, per_shard)


def test_deterministic_mode_refuses_shards_that_do_not_divide_over_ranks_and_workers(tmp_path):
    data = write_latent_dataset(tmp_path / "data", num_samples=6, num_shards=3, num_classes=16)
    with pytest.raises(DataFormatError, match=r"3 shards do not divide evenly over 2 process\(es\) x 1") as caught:
        make_loader(stream_spec(data, verified=False, rank=0, world_size=2), 0)
    assert "divisible by 2" in str(caught.value) and "data.resampled: true" in str(caught.value)
    with pytest.raises(DataFormatError, match=r"over 1 process\(es\) x 2 DataLoader worker"):
        make_loader(stream_spec(data, verified=False), 2)
    make_loader(stream_spec(data, verified=False), 0)  # 3 shards, 1 process, 1 worker: balanced
    make_loader(stream_spec(data, verified=False, world_size=2, resampled=True), 0)  # resampled: uniform anyway
    # The trainer refuses before any step.
    config = tiny_latent_config(data={"num_workers": 2}, train={"max_steps": 2, "global_batch_size": 2})
    with pytest.raises(DataFormatError, match="do not divide evenly"):
        train_in_process(tmp_path, config, data)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------
# Item 6: damaged checkpoints
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run with checkpoints at steps 3 and 6 (and its dataset), copied by each test before damaging it."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained")
    data = write_latent_dataset(root / "data", num_samples=8, num_shards=2, num_classes=10)
    config = tiny_latent_config(train={"max_steps": 6, "global_batch_size": 2}, checkpoint={"every": 3, "keep": 5})
    _, run_dir = train_in_process(root, config, data)
    assert [step for step, _ in list_checkpoints(run_dir)] == [3, 6]
    return root, data, config


def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    else:  # one bit flipped in the middle of the file (same size)
        flipped = bytearray(raw)
        flipped[len(raw) // 2] ^= 0x10
        path.write_bytes(bytes(flipped))


CHECKPOINT_DAMAGE = [
    ("model.safetensors", "truncate"),
    ("model.safetensors", "flip"),
    ("random_states_0.pkl", "flip"),
    ("ema.safetensors", "truncate"),
    ("optimizer.bin", "truncate"),
]


def copy_run(trained_run, tmp_path: Path) -> tuple[Path, Path, dict]:
    root, data, config = trained_run
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir)
    return run_dir, data, config


@pytest.mark.parametrize("name, how", CHECKPOINT_DAMAGE)
def test_resume_auto_falls_back_from_a_damaged_checkpoint_and_says_so(trained_run, tmp_path, caplog, name, how):
    run_dir, data, config = copy_run(trained_run, tmp_path)
    damaged = run_dir / "checkpoints" / "step-0000006" / name
    damage(damaged, how)
    config = {**config, "train": {**config["train"], "max_steps": 7}}
    with caplog.at_level(logging.INFO):
        summary, _ = train_in_process(tmp_path, config, data, resume="auto")
    messages = [r.getMessage() for r in caplog.records]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(damaged) in w and "falling back to the previous checkpoint" in w for w in warnings), warnings
    previous = run_dir / "checkpoints" / "step-0000003"
    assert any(f"resumed from {previous} at step 3" in m for m in messages), messages
    assert summary["step"] == 7
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6, 7]
    # The damaged step 6 was replaced by the continued run's own step 6.
    assert [step for step, _ in list_checkpoints(run_dir)] == [3, 6, 7]
    from pipeline.train.checkpoint import checkpoint_problem

    assert checkpoint_problem(run_dir / "checkpoints" / "step-0000006") is None


@pytest.mark.parametrize("name, how", CHECKPOINT_DAMAGE)
def test_explicit_resume_of_a_damaged_checkpoint_is_an_error_naming_the_file(trained_run, tmp_path, name, how):
    run_dir, data, _ = copy_run(trained_run, tmp_path)
    checkpoint = run_dir / "checkpoints" / "step-0000006"
    damage(checkpoint / name, how)
    result = cli("train", "--run-dir", run_dir, "--data", data, "--resume", checkpoint)
    assert result.exit_code == 2, result.output[-3000:]
    assert_one_clear_line(result.output, str(checkpoint / name), "damaged checkpoint")
    assert not (run_dir / "checkpoints" / "step-0000007").exists()


def test_no_checkpoint_that_verifies_is_a_clear_error(trained_run, tmp_path):
    run_dir, data, _ = copy_run(trained_run, tmp_path)
    for step in ("step-0000003", "step-0000006"):
        damage(run_dir / "checkpoints" / step / "model.safetensors", "flip")
    result = cli("train", "--run-dir", run_dir, "--data", data, "--resume", "auto")
    assert result.exit_code == 2, result.output[-3000:]
    assert_one_clear_line(result.output, "no checkpoint verifies", "model.safetensors")


def test_an_rng_state_accelerate_cannot_restore_is_an_error_not_an_info_line(trained_run, tmp_path):
    # A readable RNG file (its hash recorded as it is) whose numpy state is unusable: accelerate logs "Could not
    # load random states" at INFO and carries on with an unrestored torch RNG; the trainer must stop instead.
    from accelerate.utils import load

    from pipeline.train.checkpoint import write_file_hashes

    run_dir, data, config = copy_run(trained_run, tmp_path)
    checkpoint = run_dir / "checkpoints" / "step-0000006"
    state = load(checkpoint / "random_states_0.pkl", weights_only=True)
    state["numpy_random_seed"] = ("MT19937", np.zeros(3, dtype=np.uint32), 0, 0, 0.0)
    torch.save(state, checkpoint / "random_states_0.pkl")
    (checkpoint / "files.json").unlink()
    write_file_hashes(checkpoint)
    config = {**config, "train": {**config["train"], "max_steps": 7}}
    with pytest.raises(CheckpointError, match=r"random_states_0.pkl: the RNG state was not restored"):
        train_in_process(tmp_path, config, data, resume="auto")
    assert not (run_dir / "checkpoints" / "step-0000007").exists()


def test_a_metrics_line_cut_short_by_a_kill_does_not_stop_the_resume(trained_run, tmp_path):
    run_dir, data, config = copy_run(trained_run, tmp_path)
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 7, "loss": 0.1')  # a kill mid-write
    config = {**config, "train": {**config["train"], "max_steps": 7}}
    summary, _ = train_in_process(tmp_path, config, data, resume="auto")
    assert summary["step"] == 7 and [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6, 7]


def test_export_verifies_the_checkpoint_it_exports(trained_run, tmp_path):
    run_dir, _, _ = copy_run(trained_run, tmp_path)
    checkpoint = run_dir / "checkpoints" / "step-0000006"
    damage(checkpoint / "ema.safetensors", "flip")
    result = cli("export", checkpoint, tmp_path / "model")
    assert result.exit_code == 2, result.output[-3000:]
    assert_one_clear_line(result.output, str(checkpoint / "ema.safetensors"), "damaged checkpoint")
    assert not (tmp_path / "model").exists()
    # A run directory: its newest checkpoint that verifies, saying so.
    result = cli("export", run_dir, tmp_path / "model")
    assert result.exit_code == 0, result.output[-3000:]
    assert "falling back to the previous checkpoint" in result.output
    assert json.loads((tmp_path / "model" / "config.json").read_text())["train"]["step"] == 3


def test_rotation_keeps_the_checkpoints_a_fallen_back_run_continues_from(tmp_path):
    # Resumed from step 3 because step 6 was damaged, keep 1: saving step 4 removes step 3 and leaves the abandoned
    # step 6 (replaced once this run reaches it) -- never the checkpoint just written.
    from pipeline.train.checkpoint import rotate_checkpoints

    for step in (3, 4, 6):
        path = tmp_path / "checkpoints" / f"step-{step:07d}"
        path.mkdir(parents=True)
        for name in ("train_state.json", "ema.safetensors", "model.safetensors"):
            (path / name).write_text("{}")
    rotate_checkpoints(tmp_path, keep=1, step=4)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 6]
