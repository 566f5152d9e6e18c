"""N units of a study at once on one machine with N devices (`diffit-pipe study STUDY --jobs N`).

Each unit runs exactly as a SLURM array element does: its own process, `python -m cli.main study STUDY --out OUT
--run-index I` (so a unit never shares a process, a device or a CUDA context with another), started by
`concurrent.futures` N at a time. A process gets one slot: on a machine with at least N CUDA devices slot k is
`CUDA_VISIBLE_DEVICES=k`; on CPUs the cores are shared out (`OMP_NUM_THREADS` = cores // N, which torch reads as
its thread count). Each unit's output goes to `OUT/logs/run-I.log`. A failed unit does not stop the others; the
call then raises one error naming every failed unit and its log. Resume is the units' own: a rerun skips finished
units (recognised by their outputs), so `--jobs` changes only how long a study takes, never its results.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.core.errors import JobFailedError
from pipeline.study.spec import StudyError, Unit

LOGS_DIR = "logs"


def slot_environments(jobs: int, cuda_devices: int, cpu_count: int) -> list[dict[str, str]]:
    """The environment each of the `jobs` slots adds: one CUDA device each when there are enough, else a share
    of the CPU cores."""
    if cuda_devices >= jobs:
        return [{"CUDA_VISIBLE_DEVICES": str(k)} for k in range(jobs)]
    if cuda_devices > 0:
        raise StudyError(f"--jobs {jobs}: this machine has {cuda_devices} CUDA device(s); use --jobs <= that")
    threads = str(max(1, cpu_count // jobs))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(jobs)]


def unit_command(study_file: Path, out: Path, settings: list[str], index: int) -> list[str]:
    """The command of one unit: what a SLURM array element runs."""
    command = [sys.executable, "-m", "cli.main", "study", str(study_file), "--out", str(out)]
    for setting in settings:
        command += ["--set", setting]
    return command + ["--run-index", str(index)]


def run_parallel(
    study_file: Path, out: Path, settings: list[str], units: list[Unit], jobs: int, total: int, log=print
) -> None:
    """Run `units`, `jobs` at a time, each in its own process with its own slot (see the module docstring). `units`
    are the ones still to run (a resumed study skips finished ones); `total` is the study's unit count, so that the
    log numbers a unit as the study does ("run 11/18", never "11/10")."""
    import torch

    environments = slot_environments(jobs, torch.cuda.device_count(), os.cpu_count() or 1)
    free: queue.SimpleQueue[dict[str, str]] = queue.SimpleQueue()
    for environment in environments:
        free.put(environment)
    (out / LOGS_DIR).mkdir(parents=True, exist_ok=True)

    def run_one(unit: Unit) -> tuple[Unit, int, Path]:
        slot = free.get()
        log_path = out / LOGS_DIR / f"run-{unit.index}.log"
        try:
            slot_text = " ".join(f"{k}={v}" for k, v in slot.items())
            log(f"[study] run {unit.index + 1}/{total} {unit.run_dir}: started ({slot_text}, log {log_path})")
            with open(log_path, "ab") as stream:
                code = subprocess.call(
                    unit_command(study_file, out, settings, unit.index),
                    stdout=stream,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **slot},
                )
            log(f"[study] run {unit.index + 1}/{total} {unit.run_dir}: exit {code}")
            return unit, code, log_path
        finally:
            free.put(slot)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        outcomes = list(pool.map(run_one, units))
    failed = [(unit, code, path) for unit, code, path in outcomes if code != 0]
    if failed:
        listing = "; ".join(f"{unit.run_dir} exit {code} (log {path})" for unit, code, path in failed)
        raise JobFailedError(f"{len(failed)} of {len(units)} study run(s) failed: {listing}")
