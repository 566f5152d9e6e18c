"""Faults around a trainer: a second trainer on the same run directory, signals at every moment of a run (set-up,
the first step, a checkpoint write, teardown), a killed trainer's lock, a full disk during a checkpoint write.

The signal lands in the phase a test names for sure: with DIFFIT_PIPE_TEST_PAUSE_AT=<phase> the trainer writes a
marker file when it reaches the phase and waits there for a stop signal (`pipeline.train.preemption.pause_point`);
the test sends the signal once the marker exists. No sleeps decide where a signal lands."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pipeline.train import DiskFullError, RunLockedError, TrainingStopped, TrainOptions, run_train
from pipeline.train.checkpoint import checkpoint_problem, list_checkpoints
from pipeline.train.preemption import PAUSE_AT_ENV, PAUSE_MARKER_ENV
from pipeline.train.runlock import lock_path, read_owner, run_dir_lock
from tests.support.train_fixtures import (
    REPO,
    read_metrics,
    run_train_subprocess,
    subprocess_env,
    tiny_latent_config,
    train_command,
    write_config,
    write_latent_dataset,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def wait_for_file(path: Path, process: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Wait until `path` exists (the trainer reached its pause point)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"trainer exited with {process.returncode} before {path}: {process.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def start_paused_trainer(command: list[str], phase: str, marker: Path) -> subprocess.Popen:
    """A trainer subprocess (its own process group) that pauses at `phase` until signalled."""
    env = subprocess_env()
    env.update({PAUSE_AT_ENV: phase, PAUSE_MARKER_ENV: str(marker)})
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def dataset(tmp_path):
    return write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=1, num_classes=10)


@pytest.fixture
def two_shards(tmp_path):
    """A dataset two processes can split (one shard each)."""
    return write_latent_dataset(tmp_path / "data2", num_samples=8, num_shards=2, num_classes=10)


# ---------------------------------------------------------------------------------------------------------------
# One trainer per run directory; a signal during set-up; a killed trainer's lock (real processes)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_second_trainer_is_refused_a_setup_signal_exits_75_and_a_killed_trainers_lock_is_recovered(tmp_path, dataset):
    config = write_config(
        tmp_path / "c.yaml", tiny_latent_config(train={"max_steps": 2}, checkpoint={"every": 1, "keep": 2})
    )
    run_dir = tmp_path / "run"
    command = train_command(config, dataset, run_dir)

    # 1. A trainer held in set-up (lock taken, nothing read yet); a second one on the same run dir is refused.
    first = start_paused_trainer(command, "setup", tmp_path / "setup.marker")
    try:
        wait_for_file(tmp_path / "setup.marker", first)
        second = run_train_subprocess(command)
        assert second.returncode == 2, second.stderr[-3000:]
        (line,) = error_lines(second.stderr)
        assert line.startswith(f"error: {lock_path(run_dir)}: another `diffit-pipe train` is using the run directory")
        assert f"(pid {first.pid} on host " in line and "use another --run-dir" in line
        assert "Traceback" not in second.stderr

        # 2. SIGTERM during set-up: set-up finishes, nothing is saved, exit 75 (the job script requeues).
        os.killpg(first.pid, signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 75, stderr[-3000:]
    (line,) = error_lines(stderr)
    assert line.startswith("error: stopped by SIGTERM during set-up, before the first step: nothing to save")
    assert list_checkpoints(run_dir) == [] and read_metrics(run_dir) == []
    assert read_owner(lock_path(run_dir)) is None  # released cleanly: no owner left in the lock file

    # 3. A trainer killed with SIGKILL in its first step leaves its owner record; the next one takes over.
    killed = start_paused_trainer(command, "step", tmp_path / "step.marker")
    try:
        wait_for_file(tmp_path / "step.marker", killed)
        assert read_owner(lock_path(run_dir))["pid"] == killed.pid
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.communicate(timeout=60)
    result = run_train_subprocess([*command, "--resume", "auto"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"recovered a stale lock: the trainer pid {killed.pid} on host " in result.stderr
    assert "ended without releasing it (no longer running); taking it over" in result.stderr
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert [step for step, _ in list_checkpoints(run_dir)] == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# Signals at each moment of an in-process run
# ---------------------------------------------------------------------------------------------------------------


def signal_at(phase: str, tmp_path: Path, monkeypatch, number: int = signal.SIGTERM, before=None) -> threading.Thread:
    """Make this process's run pause at `phase` and send it `number` once it is there (after calling `before`)."""
    marker = tmp_path / f"{phase}.marker"
    monkeypatch.setenv(PAUSE_AT_ENV, phase)
    monkeypatch.setenv(PAUSE_MARKER_ENV, str(marker))

    def send() -> None:
        wait_for_file(marker)
        if before is not None:
            before()
        os.kill(os.getpid(), number)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


def train_args(tmp_path: Path, data_dir: Path, run_dir: Path, resume: str | None = None, **sections) -> TrainOptions:
    config = write_config(tmp_path / "c.yaml", tiny_latent_config(**sections))
    return TrainOptions(run_dir=run_dir, config_path=config, data_dir=data_dir, resume=resume)


def test_a_signal_in_the_first_step_checkpoints_step_1_and_exits_75(tmp_path, monkeypatch, dataset):
    import psutil

    run_dir = tmp_path / "run"
    seen = {}

    def look() -> None:  # while paused: which processes hold the lock file open
        holders = [psutil.Process(), *psutil.Process().children(recursive=True)]
        seen["workers"] = len(holders) - 1
        seen["holders"] = [p.pid for p in holders if str(lock_path(run_dir)) in {f.path for f in p.open_files()}]

    signal_at("step", tmp_path, monkeypatch, signal.SIGUSR1, before=look)
    args = train_args(
        tmp_path, dataset, run_dir, data={"num_workers": 1}, train={"max_steps": 5}, checkpoint={"every": 100}
    )
    with pytest.raises(TrainingStopped, match=r"^stopped by SIGUSR1 after step 1: checkpoint ") as stopped:
        run_train(args)
    # The trainer holds the lock; its DataLoader worker (a child; earlier tests of a session may have left
    # others, such as a test server or compile workers) closed the copy it inherited.
    assert seen["workers"] >= 1 and seen["holders"] == [os.getpid()]
    assert stopped.value.exit_code == 75
    ((step, checkpoint),) = list_checkpoints(run_dir)
    assert step == 1 and checkpoint_problem(checkpoint) is None
    assert [r["step"] for r in read_metrics(run_dir)] == [1]
    assert read_owner(lock_path(run_dir)) is None


def test_a_signal_during_a_checkpoint_write_completes_it_and_stops_after_the_next_step(tmp_path, monkeypatch, dataset):
    run_dir = tmp_path / "run"
    signal_at("checkpoint", tmp_path, monkeypatch)
    args = train_args(tmp_path, dataset, run_dir, train={"max_steps": 5}, checkpoint={"every": 1, "keep": 5})
    # Paused inside the checkpoint of step 1 (every file written, not yet published): it is published, the stop
    # is agreed on after step 2, whose checkpoint is the last.
    with pytest.raises(TrainingStopped, match=r"^stopped by SIGTERM after step 2: checkpoint "):
        run_train(args)
    assert [step for step, _ in list_checkpoints(run_dir)] == [1, 2]
    assert all(checkpoint_problem(path) is None for _, path in list_checkpoints(run_dir))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-0000001", "step-0000002"]


def test_a_signal_during_teardown_finishes_the_run_with_exit_0(tmp_path, monkeypatch, dataset, caplog):
    run_dir = tmp_path / "run"
    previous = signal.getsignal(signal.SIGTERM)
    signal_at("teardown", tmp_path, monkeypatch)
    args = train_args(tmp_path, dataset, run_dir, train={"max_steps": 2}, checkpoint={"every": 100})
    summary = run_train(args)  # no TrainingStopped: the run is complete
    assert summary["step"] == 2
    assert [step for step, _ in list_checkpoints(run_dir)] == [2]
    assert "received SIGTERM after the last step: the run is complete (exit code 0)" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_signal_during_the_last_step_finishes_the_run_with_exit_0(tmp_path, monkeypatch, dataset, caplog):
    """SIGTERM inside the only step of a run (max_steps = 1): the step is the last, so the run completes, writes
    its final checkpoint and returns (exit 0); a stop there (exit 75) would have SLURM requeue a finished run."""
    run_dir = tmp_path / "run"
    signal_at("step", tmp_path, monkeypatch)
    args = train_args(tmp_path, dataset, run_dir, train={"max_steps": 1}, checkpoint={"every": 100})
    summary = run_train(args)  # no TrainingStopped
    assert summary["step"] == 1
    assert [step for step, _ in list_checkpoints(run_dir)] == [1]
    assert "received SIGTERM after the last step: the run is complete (exit code 0)" in caplog.text


def test_a_signal_during_set_up_of_a_resumed_run_saves_nothing_and_exits_75(tmp_path, monkeypatch, dataset):
    run_dir = tmp_path / "run"
    run_train(train_args(tmp_path, dataset, run_dir, train={"max_steps": 1}, checkpoint={"every": 1}))
    signal_at("setup", tmp_path, monkeypatch)
    args = train_args(tmp_path, dataset, run_dir, "auto", train={"max_steps": 3}, checkpoint={"every": 1})
    with pytest.raises(TrainingStopped) as stopped:
        run_train(args)
    checkpoint = run_dir / "checkpoints" / "step-0000001"
    assert str(stopped.value) == (
        "stopped by SIGTERM during set-up, before the first step: nothing to save (the run continues from "
        f"checkpoint {checkpoint}); continue with the same command and `--resume auto` (exit code 75)"
    )
    assert [step for step, _ in list_checkpoints(run_dir)] == [1]
    assert [r["step"] for r in read_metrics(run_dir)] == [1]


def test_the_lock_is_held_for_the_run_and_released_on_an_error(tmp_path, dataset):
    run_dir = tmp_path / "run"
    args = train_args(tmp_path, dataset, run_dir, train={"max_steps": 1})
    with run_dir_lock(run_dir):  # another holder (its own open file: flock refuses it like another process)
        with pytest.raises(RunLockedError, match=r"another `diffit-pipe train` is using the run directory") as e:
            run_train(args)
    assert e.value.exit_code == 2
    with pytest.raises(Exception, match="train.max_steps"):
        run_train(train_args(tmp_path, dataset, run_dir, train={"max_steps": -1}))
    with run_dir_lock(run_dir):  # the failed run released it
        assert read_owner(lock_path(run_dir))["pid"] == os.getpid()


# ---------------------------------------------------------------------------------------------------------------
# A full disk during a checkpoint write
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.disk_size("8m")
def test_a_full_disk_in_a_checkpoint_write_is_one_error_leaves_no_temporary_files_and_a_rerun_resumes(
    tmp_path, dataset, small_disk
):
    run_dir = small_disk / "run"
    sections = dict(checkpoint={"every": 1, "keep": 2})
    run_train(train_args(tmp_path, dataset, run_dir, train={"max_steps": 1}, **sections))
    ((_, first),) = list_checkpoints(run_dir)
    size = sum(p.stat().st_size for p in first.iterdir())
    # Leave room for the run's small files but not for a second checkpoint.
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize - size // 2))

    args = train_args(tmp_path, dataset, run_dir, "auto", train={"max_steps": 2}, **sections)
    with pytest.raises(DiskFullError) as full:
        run_train(args)
    message = str(full.value)
    assert full.value.exit_code == 1 and "\n" not in message
    assert message.startswith(
        f"{run_dir / 'checkpoints' / '.tmp-step-0000002'}: no space left on the device while writing the "
        "checkpoint of step 2 ("
    )
    assert "nothing half-written left); free space on the file system of" in message
    assert message.endswith("rerun with `--resume auto`: it continues from the newest complete checkpoint")
    # The temporary directory went at once; the previous checkpoint is intact and still `latest`.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-0000001"]
    assert checkpoint_problem(first) is None
    assert read_owner(lock_path(run_dir)) is None  # released, owner cleared (the small write fits)

    filler.unlink()
    assert run_train(args)["step"] == 2
    assert [step for step, _ in list_checkpoints(run_dir)] == [1, 2]


# ---------------------------------------------------------------------------------------------------------------
# A real two-node launch: two `accelerate launch` processes, one machine rank each
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(command: list[str], machines: int, machine_rank: int | None, port: int) -> list[str]:
    """`accelerate launch` of a trainer command: 2 processes in all, on one machine or one per machine."""
    import sys

    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", str(machines), "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    if machine_rank is not None:
        launch += ["--machine_rank", str(machine_rank)]
    return [*launch, "-m", *command[2:]]


def start(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=REPO, env=env or subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def two_node_launch(command: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, ...]:
    """Two launcher processes on this machine, `--num_machines 2 --machine_rank 0|1`, 1 process each."""
    port = free_port()
    return tuple(start(accelerate_launch(command, 2, rank, port), env) for rank in (0, 1))


def finish(processes, timeout: float = 240) -> list[str]:
    """Wait for the launchers; their stderr. On a timeout each is killed with its trainers (a failed test's)."""
    import psutil

    from tests.support.train_fixtures import kill_tree

    stderrs = []
    for process in processes:
        try:
            stderrs.append(process.communicate(timeout=timeout)[1])
        except subprocess.TimeoutExpired:
            kill_tree(psutil.Process(process.pid))
            stderrs.append(process.communicate()[1])
    return stderrs


@pytest.mark.slow
def test_two_node_launch_trains_like_two_processes_on_one_node(tmp_path, two_shards):
    dataset = two_shards
    from tests.support.train_fixtures import assert_same_weights

    config = write_config(
        tmp_path / "c.yaml",
        tiny_latent_config(train={"max_steps": 2, "global_batch_size": 4}, checkpoint={"every": 100}),
    )
    one_node, two_nodes = tmp_path / "one-node", tmp_path / "two-nodes"
    single = start(accelerate_launch(train_command(config, dataset, one_node), 1, None, free_port()))
    (stderr,) = finish([single])
    assert single.returncode == 0, stderr[-3000:]
    launchers = two_node_launch(train_command(config, dataset, two_nodes))
    stderrs = finish(launchers)
    assert [p.returncode for p in launchers] == [0, 0], stderrs[0][-2000:] + stderrs[1][-2000:]

    assert json.loads((two_nodes / "run.json").read_text())["world_size"] == 2
    ours, theirs = read_metrics(two_nodes), read_metrics(one_node)
    assert [r["step"] for r in ours] == [1, 2]
    assert [r["loss"] for r in ours] == [r["loss"] for r in theirs]
    assert [r["grad_norm"] for r in ours] == [r["grad_norm"] for r in theirs]
    assert_same_weights(two_nodes / "checkpoints" / "step-0000002", one_node / "checkpoints" / "step-0000002")


@pytest.mark.slow
def test_sigterm_to_one_node_stops_both_nodes_with_exit_75(tmp_path, two_shards):
    dataset = two_shards
    config = write_config(
        tmp_path / "c.yaml",
        tiny_latent_config(train={"max_steps": 1000, "global_batch_size": 4}, checkpoint={"every": 100}),
    )
    run_dir, marker = tmp_path / "run", tmp_path / "step.marker"
    env = subprocess_env()
    # Rank 1 (machine rank 1) waits in its first step for the signal; rank 0 waits for it in the next collective.
    env.update({PAUSE_AT_ENV: "step", PAUSE_MARKER_ENV: str(marker), "DIFFIT_PIPE_TEST_PAUSE_RANK": "1"})
    launchers = two_node_launch(train_command(config, dataset, run_dir), env)
    signalled = False
    try:
        wait_for_file(marker, launchers[1], timeout=180)
        # SIGTERM to node 1's trainer (the pid its pause marker names), as SLURM signals a task.
        os.kill(int(marker.read_text().split()[1]), signal.SIGTERM)
        signalled = True
    finally:
        stderrs = finish(launchers, 240 if signalled else 0.1)
    both = "".join(stderrs)
    # Each trainer exits 75 after the checkpoint of step 1: torch elastic's launcher reports a child that failed
    # as exit code 1 and names the child's code in its summary (the sbatch template runs the trainers as srun
    # tasks, whose codes reach the job script).
    assert [p.returncode for p in launchers] == [1, 1], both[-4000:]
    assert "error: stopped by SIGTERM after step 1:" in stderrs[1]
    assert "error: stopped by a signal to another rank after step 1:" in stderrs[0]
    for stderr in stderrs:
        assert re.search(r"exitcode\s*:\s*75\b", stderr), stderr[-3000:]
    ((step, checkpoint),) = list_checkpoints(run_dir)
    assert step == 1 and checkpoint_problem(checkpoint) is None
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
