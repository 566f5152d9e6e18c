"""Preemption-safe training: a real SIGTERM / SIGUSR1 to a real trainer finishes the step, writes a checkpoint
that verifies and exits 75, on every rank at the same step; `--resume auto` then continues exactly. Milestone
checkpoints survive rotation. The deferred (CUDA) non-finite check, forced on CPU, stops before anything of a
NaN step is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.train import EXIT_STOPPED, NonFiniteLossError, TrainingStopped, TrainOptions, run_train
from pipeline.train.checkpoint import checkpoint_problem, list_checkpoints, read_train_state
from tests.support.train_fixtures import (
    REPO,
    assert_same_weights,
    kill_tree,
    read_metrics,
    run_train_subprocess,
    subprocess_env,
    tiny_latent_config,
    train_command,
    write_config,
    write_latent_dataset,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def wait_for_records(run_dir: Path, count: int, process=None, timeout: float = 120) -> int:
    """Wait until RUN/metrics.jsonl holds `count` records (the trainer has made progress); returns how many."""
    path, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return len(lines)
        time.sleep(0.02)
    raise AssertionError(f"no {count} records in {path} (process exit code {process and process.poll()})")


# ---------------------------------------------------------------------------------------------------------------
# Real signals to real trainers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_exits_75_and_resume_continues_exactly(tmp_path):
    import psutil

    # Deterministic data over 4 shards, 2 DataLoader workers, accumulation 2; no periodic checkpoint within reach,
    # so the only checkpoint is the one the signal causes.
    data = write_latent_dataset(tmp_path / "data", num_samples=12, num_shards=4, num_classes=10, std=0.1)
    steps = 16
    settings = dict(
        data={"num_workers": 2},
        train={"max_steps": steps, "global_batch_size": 2, "per_device_batch_size": 1},
        checkpoint={"every": 1000, "keep": 1},
    )
    config = write_config(tmp_path / "c.yaml", tiny_latent_config(**settings))
    reference_dir = tmp_path / "reference"
    result = run_train_subprocess(train_command(config, data, reference_dir))
    assert result.returncode == 0, result.stderr[-3000:]

    run_dir = tmp_path / "stopped"
    process = subprocess.Popen(
        train_command(config, data, run_dir, "--set", "train.max_steps=100000"),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        seen = wait_for_records(run_dir, 3, process)
        # As SLURM does: the whole process group, DataLoader workers included (they must not die of it).
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        kill_tree(psutil.Process(process.pid) if process.poll() is None else None)
    assert process.returncode == EXIT_STOPPED == 75, stderr[-3000:]

    records = read_metrics(run_dir)
    stopped_at = records[-1]["step"]
    assert [r["step"] for r in records] == list(range(1, stopped_at + 1))  # the last step was logged too
    assert seen <= stopped_at < steps
    ((step, checkpoint),) = list_checkpoints(run_dir)
    assert step == stopped_at and read_train_state(checkpoint)["step"] == stopped_at
    assert checkpoint_problem(checkpoint) is None  # complete, every file matches files.json
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    assert f"error: stopped by SIGTERM after step {stopped_at}: checkpoint {checkpoint} written" in stderr
    assert "--resume auto" in stderr and "(exit code 75)" in stderr

    result = run_train_subprocess(train_command(config, data, run_dir, "--resume", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {checkpoint} at step {stopped_at}" in result.stderr
    reference, resumed = read_metrics(reference_dir), read_metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]  # bit-identical, before and after
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in reference]
    name = f"step-{steps:07d}"
    assert_same_weights(run_dir / "checkpoints" / name, reference_dir / "checkpoints" / name)


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    import psutil

    data = write_latent_dataset(tmp_path / "data", num_samples=16, num_shards=4, num_classes=10)
    config = write_config(
        tmp_path / "c.yaml",
        tiny_latent_config(
            data={"num_workers": 1},
            train={"max_steps": 100000, "global_batch_size": 4, "per_device_batch_size": 2},
            checkpoint={"every": 1000, "keep": 1},
        ),
    )
    run_dir = tmp_path / "run"
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", *train_command(config, data, run_dir)[2:]]
    process = subprocess.Popen(
        launch, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    launcher = psutil.Process(process.pid)
    try:
        wait_for_records(run_dir, 3, process, timeout=240)
        # The launcher's children are the ranks (their DataLoader workers are grandchildren): SIGUSR1 to rank 1.
        (rank1,) = [p for p in launcher.children() if p.environ().get("RANK") == "1"]
        rank1.send_signal(signal.SIGUSR1)
        _, stderr = process.communicate(timeout=180)
    finally:
        kill_tree(launcher)
    # Each rank exits 75; accelerate's launcher reports a failed child as 1 (the sbatch template uses srun).
    assert process.returncode == 1, stderr[-3000:]
    stopped_at = read_metrics(run_dir)[-1]["step"]
    assert stderr.count("error: stopped by") == 2  # one line per rank
    assert f"error: stopped by SIGUSR1 after step {stopped_at}:" in stderr  # rank 1
    assert f"error: stopped by a signal to another rank after step {stopped_at}:" in stderr  # rank 0
    ((step, checkpoint),) = list_checkpoints(run_dir)
    assert step == stopped_at and checkpoint_problem(checkpoint) is None
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    assert json.loads((run_dir / "run.json").read_text())["world_size"] == 2


def test_a_signal_during_an_in_process_run_raises_training_stopped_and_restores_the_handlers(tmp_path):
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=1, num_classes=10)
    config = tiny_latent_config(train={"max_steps": 100000}, checkpoint={"every": 1000})
    run_dir = tmp_path / "run"
    previous = signal.getsignal(signal.SIGUSR1)
    sender = threading.Thread(
        target=lambda: (wait_for_records(run_dir, 2), os.kill(os.getpid(), signal.SIGUSR1)), daemon=True
    )
    sender.start()
    with pytest.raises(TrainingStopped, match=r"stopped by SIGUSR1 after step (\d+)") as stopped:
        run_train(TrainOptions(run_dir=run_dir, config_path=write_config(tmp_path / "c.yaml", config), data_dir=data))
    assert stopped.value.exit_code == 75
    assert signal.getsignal(signal.SIGUSR1) is previous
    step = read_metrics(run_dir)[-1]["step"]  # the step the signal arrived in, logged
    assert [s for s, _ in list_checkpoints(run_dir)] == [step]
    assert f"after step {step}:" in str(stopped.value)


# ---------------------------------------------------------------------------------------------------------------
# Milestones
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_every,expected", [(0, [7, 8]), (3, [3, 6, 7, 8]), (4, [4, 7, 8])])
def test_rotation_keeps_the_newest_and_every_milestone(tmp_path, keep_every, expected):
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=1, num_classes=10)
    config = tiny_latent_config(
        train={"max_steps": 8, "log_every": 8}, checkpoint={"every": 1, "keep": 2, "keep_every": keep_every}
    )
    run_dir = tmp_path / "run"
    run_train(TrainOptions(run_dir=run_dir, config_path=write_config(tmp_path / "c.yaml", config), data_dir=data))
    assert [step for step, _ in list_checkpoints(run_dir)] == expected


# ---------------------------------------------------------------------------------------------------------------
# The deferred non-finite check (CUDA's), forced on CPU
# ---------------------------------------------------------------------------------------------------------------


def test_deferred_finite_check_stops_before_writing_anything_of_a_nan_step(tmp_path, monkeypatch):
    from pipeline.train import setup

    monkeypatch.setattr(setup, "checks_loss_every_step", lambda device: False)
    # Sample 6 holds a NaN: with batches of 2 in fixed order, step 4 is the first to see it. Nothing reads the
    # loss until the checkpoint of step 6, which must not be written.
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=1, num_classes=10, nan_at=6)
    config = tiny_latent_config(
        train={"max_steps": 10, "global_batch_size": 2, "log_every": 100}, checkpoint={"every": 3, "keep": 5}
    )
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 4: loss nan.*found at step 6"):
        run_train(
            TrainOptions(run_dir=tmp_path / "run", config_path=write_config(tmp_path / "c.yaml", config), data_dir=data)
        )
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [3]
    assert read_metrics(tmp_path / "run") == []
