"""The Dask cluster an encode / pack job runs on.

- default: a `LocalCluster` of `--workers` processes with one thread each (`--workers 0`: threads in this
  process);
- `--gpus N`: a local cluster of one worker process per GPU. With dask-cuda installed it is its
  `LocalCUDACluster`; otherwise `PinnedGPUCluster` does what matters of it here: each worker process starts with
  `CUDA_VISIBLE_DEVICES` listing its own GPU first (worker i: GPUs i, i+1, ..., 0, ..., i-1), so that its "cuda"
  device is GPU i, set before torch is imported;
- `--scheduler tcp://HOST:PORT` or `--scheduler-file PATH` (written by `dask scheduler --scheduler-file PATH`, the
  usual way on SLURM): a running cluster. Its workers may have been started without a GPU pin (`dask worker
  --nworkers 8` on an 8-GPU host); `pipeline.core.vae.pick_device` then spreads the worker processes of a host
  over its GPUs.

Torch threads: in a local cluster each worker gets cores // workers (the driver puts it in the tasks); a worker
of a running cluster uses as many torch threads as it has Dask threads (`worker_threads`: `dask worker
--nthreads K`), never all the cores of its host, which 8 workers on one host would oversubscribe 8 times.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from distributed import LocalCluster

from pipeline.core.errors import InputError
from pipeline.core.vae import PINNED_GPU_ENV, visible_gpus

logger = logging.getLogger(__name__)

LOCAL_CLUSTER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
}
CONNECT_TIMEOUT_S = 30
SCHEDULER_FILE_WAIT_S = 60  # on SLURM the scheduler may still be starting when the driver does


class ClusterError(InputError):
    """The Dask cluster cannot be started or reached (--gpus, --scheduler, --scheduler-file)."""


def local_cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_threads() -> int:
    """Dask threads of the worker running this task (1 outside a worker): the cores it was given."""
    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ValueError, AttributeError):
        return 1


@contextmanager
def quiet_cluster_logs(level: int = logging.ERROR) -> Iterator[None]:
    """Keep a local cluster's chatter (an INFO line for every scheduler, nanny and worker event) off the terminal.

    LocalCluster's `silence_logs` only quiets the handler that distributed installs for itself, and distributed
    installs none when logging is already set up (`setup_logging` runs before distributed is imported): its
    records then reach the root handler. So the level of distributed's loggers is raised while the block runs
    (after distributed is imported: its import sets that level).
    """
    distributed_logger = logging.getLogger("distributed")
    previous = distributed_logger.level
    distributed_logger.setLevel(level)
    try:
        yield
    finally:
        distributed_logger.setLevel(previous)


class PinnedGPUCluster(LocalCluster):
    """A LocalCluster of one single-threaded worker process per GPU in `devices` (CUDA_VISIBLE_DEVICES entries).

    Worker `d` (named after its GPU, so a restarted worker gets the same one) starts with `CUDA_VISIBLE_DEVICES`
    rotated to list `d` first, the way dask-cuda does, and with `DIFFIT_PIPE_PINNED_GPU=1`, which tells
    `pick_device` to use its "cuda:0" as it is.
    """

    def __init__(self, devices: list[str], **options: Any):
        if not devices:
            raise ClusterError("a GPU cluster needs at least one GPU")
        self.devices = list(devices)
        options = {"dashboard_address": None, "silence_logs": logging.ERROR, **options}
        # LocalCluster builds the workers it is given at construction from one spec: start with none, then
        # scale, which asks `new_worker_spec` for each (as dask-cuda's LocalCUDACluster does).
        super().__init__(n_workers=0, threads_per_worker=1, processes=True, **options)
        self.scale(len(self.devices))
        self.sync(self._correct_state)

    def new_worker_spec(self) -> dict[str, dict[str, Any]]:
        name = next(device for device in self.devices if device not in self.worker_spec)
        position = self.devices.index(name)
        rotated = self.devices[position:] + self.devices[:position]
        spec = copy.deepcopy(self.new_spec)
        options = spec.setdefault("options", {})
        options["env"] = {**options.get("env", {}), "CUDA_VISIBLE_DEVICES": ",".join(rotated), PINNED_GPU_ENV: "1"}
        return {name: spec}


def chosen_gpus(gpus: int, devices: list[str] | None = None) -> list[str]:
    """The first `gpus` of `devices` (default: the GPUs visible here); ClusterError when there are fewer."""
    devices = visible_gpus() if devices is None else devices
    if not devices:
        raise ClusterError(
            f"--gpus {gpus}: no CUDA GPU is visible to this process (torch.cuda.is_available() is False); "
            "leave out --gpus to encode on CPU workers (--workers N)"
        )
    if gpus > len(devices):
        raise ClusterError(f"--gpus {gpus}: only {len(devices)} GPU(s) are visible ({', '.join(devices)})")
    return devices[:gpus]


def gpu_cluster(gpus: int, devices: list[str] | None = None) -> LocalCluster:
    """A local cluster of one worker per GPU for the first `gpus` of `devices` (default: the visible GPUs):
    dask-cuda's LocalCUDACluster when it is installed, else `PinnedGPUCluster`."""
    chosen = chosen_gpus(gpus, devices)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        logger.info("starting %d GPU worker(s), one per GPU (%s)", gpus, ", ".join(chosen))
        return PinnedGPUCluster(chosen)
    logger.info("starting %d GPU worker(s) with dask-cuda (%s)", gpus, ", ".join(chosen))
    return LocalCUDACluster(
        CUDA_VISIBLE_DEVICES=",".join(chosen),
        n_workers=gpus,
        threads_per_worker=1,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )


def _cpu_cluster(workers: int) -> LocalCluster:
    """`workers` local processes x 1 thread (0: one thread in this process)."""
    processes = workers > 0
    n_workers = max(1, workers)
    logger.info(
        "starting a local Dask cluster: %d worker(s) x 1 thread (%s)",
        n_workers,
        "processes" if processes else "in-process",
    )
    return LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=processes,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )


def _wait_for_file(path: Path, seconds: float) -> None:
    """Wait until `path` exists (a scheduler being started writes it); ClusterError after `seconds`."""
    deadline = time.monotonic() + seconds
    if not path.exists():
        logger.info("waiting for the Dask scheduler file %s", path)
    while not path.exists():
        if time.monotonic() > deadline:
            raise ClusterError(
                f"--scheduler-file {path} does not exist after {seconds:g} s; start the scheduler with "
                f"`dask scheduler --scheduler-file {path}` on a file system the workers and this process share"
            )
        time.sleep(0.1)


@contextmanager
def _remote_client(scheduler: str | None, scheduler_file: str | None) -> Iterator[Any]:
    """A client of a running cluster, by address or by scheduler file."""
    from distributed import Client

    if scheduler_file:
        path = Path(scheduler_file).expanduser()
        _wait_for_file(path, SCHEDULER_FILE_WAIT_S)
        where, target = f"the Dask scheduler of {path}", {"scheduler_file": str(path)}
    else:
        where, target = f"the Dask scheduler at {scheduler}", {"address": scheduler}
    logger.info("connecting to %s", where)
    try:
        remote = Client(timeout=f"{CONNECT_TIMEOUT_S}s", **target)
    except (OSError, TimeoutError, ValueError) as error:
        raise ClusterError(f"cannot connect to {where}: {error}") from error
    with remote:
        yield remote


def check_cluster_settings(workers: int, gpus: int, scheduler: str | None, scheduler_file: str | None) -> None:
    """Refuse cluster flags that contradict each other, with the flags to change."""
    if workers < 0:
        raise ClusterError(f"--workers must be 0 (in-process) or more, got {workers}")
    if gpus < 0:
        raise ClusterError(f"--gpus must be 0 (no GPU cluster) or more, got {gpus}")
    if scheduler and scheduler_file:
        raise ClusterError("--scheduler and --scheduler-file both name a cluster; pass one of them")
    if gpus and (scheduler or scheduler_file):
        raise ClusterError(
            "--gpus starts a local GPU cluster, --scheduler / --scheduler-file join a running one; pass one of them"
        )
    if gpus:
        chosen_gpus(gpus)  # no GPU, or too few: refused before any work


@contextmanager
def dask_client(
    workers: int = 1, gpus: int = 0, scheduler: str | None = None, scheduler_file: str | None = None, client=None
) -> Iterator[Any]:
    """A Dask client: the one given, a running cluster (`scheduler` / `scheduler_file`), or a local cluster
    started here (`gpus` workers, one per GPU, or `workers` CPU workers) and closed at the end."""
    import dask
    from distributed import Client

    if client is not None:
        yield client
        return
    if scheduler or scheduler_file:
        with _remote_client(scheduler, scheduler_file) as remote:
            yield remote
        return
    # Without a dashboard nobody reads the statistical profiler (a stack sample every 10 ms) or frequent system
    # samples; turned off they stop taking CPU and the GIL from the encoding thread (an idle worker: 3% → 0.4%).
    with dask.config.set(LOCAL_CLUSTER_CONFIG), quiet_cluster_logs():
        cluster = gpu_cluster(gpus) if gpus else _cpu_cluster(workers)
        try:
            with Client(cluster) as local:
                yield local
        finally:
            cluster.close()
