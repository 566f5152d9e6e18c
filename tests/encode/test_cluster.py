"""Scale-out of the encode stage: a cluster started from the command line (`dask scheduler --scheduler-file`,
`dask worker`), one worker per GPU, scans that stop at `--limit`, resume that trusts sealed sidecars without
re-hashing, compact tasks, and `--dry-run`.

There is no GPU here: the GPU cluster is checked through what each worker process is started with
(`CUDA_VISIBLE_DEVICES`), the GPU claim of a worker through its lock files, and `--gpus` through its error.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from pipeline.core.dataset_verify import verify_dataset
from pipeline.core.manifest import load_manifest
from pipeline.encode.job import EncodeOptions, plan_job, run_encode
from pipeline.encode.plan import RECORD_CHECK, ItemBlock
from pipeline.encode.sources import scan_folder, scan_source
from tests.support.encode_fixtures import TEST_MAX_PIXELS, make_image_tree, save_tiny_vae

REPO = Path(__file__).resolve().parents[2]
DASK = Path(sys.executable).with_name("dask")
SHARD_SIZE = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny VAE and a 3-class tree of 42 images."""
    root = tmp_path_factory.mktemp("encode-cluster")
    make_image_tree(root / "src")
    return SimpleNamespace(root=root, vae=str(save_tiny_vae(root / "vae")), src=root / "src")


def _encode_args(data, out, *options) -> list:
    common = ["--resolution", "32", "--vae", data.vae, "--shard-size", str(SHARD_SIZE), "--batch-size", "4"]
    return ["encode", data.src, out, *common, "--max-pixels", str(TEST_MAX_PIXELS), "--no-progress", *options]


def _config(data, out, **overrides) -> EncodeOptions:
    settings = dict(
        source=str(data.src),
        out=str(out),
        resolution=32,
        vae=data.vae,
        shard_size=SHARD_SIZE,
        batch_size=4,
        workers=0,
        torch_threads=1,
        max_pixels=TEST_MAX_PIXELS,
        progress=False,
    )
    return EncodeOptions(**(settings | overrides))


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))}


def _comparable(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k not in ("created", "command")}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The tree encoded in this process with 1 torch thread: the reference for byte identity."""
    import torch

    out = tmp_path_factory.mktemp("reference") / "latents"
    threads = torch.get_num_threads()
    try:
        result = run_encode(_config(data, out))
    finally:
        torch.set_num_threads(threads)
    assert result.ok
    return out


# ---------------------------------------------------------------------------------------------------------------
# A cluster started from the command line


def _stop(processes: list[subprocess.Popen]) -> None:
    """End the scheduler and worker processes (each in its own session, with its nanny's children)."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture
def command_line_cluster(tmp_path):
    """`dask scheduler --scheduler-file F` and two `dask worker --scheduler-file F --nthreads 1` processes, as on
    a SLURM allocation; yields (F, a client of that cluster)."""
    from distributed import Client

    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    common = dict(cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scheduler = [str(DASK), "scheduler", "--scheduler-file", str(scheduler_file), "--port", "0", "--no-dashboard"]
    worker = [str(DASK), "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1", "--no-dashboard"]
    processes = [subprocess.Popen(scheduler, **common)]
    try:
        processes += [subprocess.Popen(worker, **common) for _ in range(2)]
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, "the scheduler did not write its file within 60 s"
            assert processes[0].poll() is None, "the scheduler exited"
            time.sleep(0.1)
        with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            yield scheduler_file, client
    finally:
        _stop(processes)


@pytest.mark.slow
def test_scheduler_file_cluster_gives_the_local_shards(data, reference, command_line_cluster, cli, tmp_path):
    import torch

    from pipeline.core.vae import vae_load_count
    from pipeline.encode.cluster import local_cores

    scheduler_file, client = command_line_cluster
    out = tmp_path / "on-cluster"
    result = cli(*_encode_args(data, out, "--scheduler-file", scheduler_file))  # no --torch-threads
    assert result.exit_code == 0, result.output
    assert _shard_bytes(out) == _shard_bytes(reference)  # tars and sealed sidecars, byte for byte
    assert _comparable(load_manifest(out)) == _comparable(load_manifest(reference))
    # Each worker encoded (loaded the VAE once) with as many torch threads as its --nthreads, not all cores.
    assert sorted(client.run(vae_load_count).values()) == [1, 1]
    assert sorted(client.run(torch.get_num_threads).values()) == [1, 1]
    assert local_cores() > 1 or pytest.skip("one core: nthreads and cores cannot be told apart")


def test_missing_scheduler_file_and_contradicting_flags_are_clear_errors(data, cli, tmp_path, monkeypatch):
    from pipeline.encode import cluster

    monkeypatch.setattr(cluster, "SCHEDULER_FILE_WAIT_S", 0.3)
    out = tmp_path / "never"
    result = cli(*_encode_args(data, out, "--scheduler-file", tmp_path / "none.json"))
    assert result.exit_code == 2
    assert f"--scheduler-file {tmp_path / 'none.json'} does not exist after 0.3 s" in result.output
    assert "dask scheduler --scheduler-file" in result.output
    result = cli(*_encode_args(data, out, "--scheduler-file", "f.json", "--scheduler", "tcp://127.0.0.1:1"))
    assert result.exit_code == 2 and "--scheduler and --scheduler-file both name a cluster" in result.output
    result = cli(*_encode_args(data, out, "--gpus", "1", "--scheduler-file", "f.json"))
    assert result.exit_code == 2 and "--gpus starts a local GPU cluster" in result.output


# ---------------------------------------------------------------------------------------------------------------
# GPUs


def test_gpus_without_a_gpu_is_refused_before_any_work(data, cli, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    out = tmp_path / "gpus"
    result = cli(*_encode_args(data, out, "--gpus", "2"))
    assert result.exit_code == 2
    assert "error: --gpus 2: no CUDA GPU is visible to this process" in result.output
    assert not out.exists()


@pytest.mark.slow
def test_pinned_gpu_cluster_starts_each_worker_on_its_own_gpu():
    from distributed import Client

    from pipeline.core.vae import PINNED_GPU_ENV
    from pipeline.encode.cluster import PinnedGPUCluster

    def environment():
        return os.environ["CUDA_VISIBLE_DEVICES"], os.environ[PINNED_GPU_ENV]

    with PinnedGPUCluster(["2", "GPU-b", "0"]) as cluster, Client(cluster) as client:
        seen = client.run(environment)
        names = {info["name"]: address for address, info in client.scheduler_info()["workers"].items()}
    # Worker d sees GPU d first (its "cuda:0"), then the others in rotation, like dask-cuda's workers.
    assert {name: seen[address] for name, address in names.items()} == {
        "2": ("2,GPU-b,0", "1"),
        "GPU-b": ("GPU-b,0,2", "1"),
        "0": ("0,2,GPU-b", "1"),
    }


CLAIM_CODE = (
    "import sys; from pipeline.core.vae import claim_gpu\n"
    "position, handle = claim_gpu(['GPU-a', 'GPU-b'], sys.argv[1]); print(position, handle.name, flush=True)\n"
)


def test_gpu_claims_spread_processes_over_the_gpus(tmp_path):
    from pipeline.core.vae import claim_gpu

    first = claim_gpu(["GPU-a", "GPU-b"], tmp_path)
    second = claim_gpu(["GPU-a", "GPU-b"], tmp_path)
    assert (first[0], second[0]) == (0, 1)  # each GPU once before any is shared
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", CLAIM_CODE, str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", str(tmp_path / "gpu-GPU-a-1.lock")]  # another process: round 1
    first[1].close()  # a process that ends releases its GPU
    third = claim_gpu(["GPU-b", "GPU-a"], tmp_path)  # GPU-b is held: its first free GPU is GPU-a
    assert third[0] == 1 and third[1].name == str(tmp_path / "gpu-GPU-a-0.lock")
    second[1].close()
    third[1].close()


# ---------------------------------------------------------------------------------------------------------------
# Scan once, resume cheaply


def _tricky_tree(root: Path) -> None:
    """Class folders whose names sort differently with and without the `/` (`cat`, `cat-2`), nested folders
    between files, same-stem files, a hard link and a hidden file in the last folder."""
    names = [
        "cat/b.png",
        "cat/a/x.png",
        "cat/a.png",
        "cat/dup.jpg",
        "cat/dup.png",
        "cat-2/z.png",
        "cat-2/m/n.png",
        "dog/1.png",
        "dog/2.png",
    ]
    for index, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (index * 20, 0, 0)).save(root / name, format="PNG")
    os.link(root / "cat/a.png", root / "dog/0-link.png")  # the same file as cat/a.png
    (root / "dog" / ".hidden").write_bytes(b"x")


def test_limit_stops_the_walk_and_keeps_the_first_items(tmp_path):
    _tricky_tree(tmp_path / "src")
    full = scan_folder(tmp_path / "src")
    paths = [item.path for item in full.items]
    assert paths == sorted(paths) and len(paths) == 9  # cat/a.png's hard link in dog/ is one item with it
    assert paths[:3] == ["cat-2/m/n.png", "cat-2/z.png", "cat/a.png"]
    assert full.label_map == {"cat": 0, "cat-2": 1, "dog": 2}
    for limit in range(1, len(paths) + 1):
        limited = scan_folder(tmp_path / "src", limit=limit)
        assert limited.items == full.items[:limit]  # same items, keys (dup.jpg / dup.png) and labels
        assert limited.label_map == full.label_map
    # The walk stopped before the last class folder: its hidden file was never listed.
    assert "dog/.hidden" in full.ignored and "dog/.hidden" not in scan_folder(tmp_path / "src", limit=7).ignored
    assert scan_folder(tmp_path / "src", limit=7).describe()["items"] == 7
    assert scan_folder(tmp_path / "src", limit=7).describe()["limit"] == 7


def test_tasks_carry_compact_item_blocks(data, tmp_path):
    plan = plan_job(_config(data, tmp_path / "out"))
    items = scan_source(data.src).items
    unpacked = [item for task in plan.tasks for item in task.block.unpack()]
    fields = ("index", "path", "key", "label", "shard_file")
    assert [[getattr(i, f) for f in fields] for i in unpacked] == [[getattr(i, f) for f in fields] for i in items]
    assert [task.count for task in plan.tasks] == [4] * 10 + [2] and plan.items == 42
    assert not (tmp_path / "out").exists()  # planning writes nothing
    block = ItemBlock.pack(items[:4])
    assert len(pickle.dumps(block)) < len(pickle.dumps(items[:4]))


def _flip_byte_keep_mtime(path: Path, offset: int = 700) -> None:
    """Change one byte of a file in place, then give it back its modification time."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_resume_trusts_sealed_sidecars_without_rehashing_unless_verify(data, reference, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(reference, out)  # copy2 keeps the modification times
    sidecar = json.loads((out / "shard-000001.json").read_text())
    assert sidecar[RECORD_CHECK]  # sealed by the job that wrote it
    _flip_byte_keep_mtime(out / "shard-000001.tar")
    damaged = (out / "shard-000001.tar").read_bytes()

    result = run_encode(_config(data, out))
    assert result.ok and (result.shards_skipped, result.shards_written) == (11, 0)
    assert (out / "shard-000001.tar").read_bytes() == damaged  # trusted: never read

    _flip_byte_keep_mtime(out / "shard-000003.tar")
    (out / "shard-000003.tar").touch()  # modified after its sidecar: not trusted, re-hashed and redone
    legacy = json.loads((out / "shard-000005.json").read_text())
    del legacy[RECORD_CHECK]  # an unsealed sidecar (killed before sealing, or an older version): re-hashed, kept
    (out / "shard-000005.json").write_text(json.dumps(legacy))
    result = run_encode(_config(data, out))
    assert result.ok and (result.shards_skipped, result.shards_written) == (10, 1)
    assert (out / "shard-000001.tar").read_bytes() == damaged
    assert (out / "shard-000003.tar").read_bytes() == (reference / "shard-000003.tar").read_bytes()

    result = run_encode(_config(data, out, verify=True))  # every shard re-hashed: shard 1 is redone
    assert result.ok and (result.shards_skipped, result.shards_written) == (10, 1)
    assert (out / "shard-000001.tar").read_bytes() == (reference / "shard-000001.tar").read_bytes()
    assert verify_dataset(out).ok


# ---------------------------------------------------------------------------------------------------------------
# --dry-run


def _files(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir()) if p.is_file()}


def test_dry_run_reports_the_job_and_writes_nothing(data, reference, cli, tmp_path):
    out = tmp_path / "dry"
    result = cli(*_encode_args(data, out, "--dry-run", "--torch-threads", "1"))
    assert result.exit_code == 0, result.output
    total = sum(shard["bytes"] for shard in load_manifest(reference)["shards"])
    lines = result.stdout.splitlines()  # the report; log lines go to stderr
    assert lines[0] == "dry run: nothing was written"
    assert lines[1] == f"source     {data.src} (class-folders): 42 items, 3 classes"
    assert lines[2] == f"shards     11 x up to 4 items → {out} (0 already complete)"
    # Every latent sample of this tree takes 4 members of one header + one data block: the estimate is exact.
    assert lines[3].startswith(f"bytes      ≈ {total / 1e6:.3f} MB ({total} bytes; 4096 per sample from 10 items")
    assert lines[4].startswith("time       ≈ ") and "on cpu with 1 torch thread(s)" in lines[4]
    assert not out.exists()

    # Against a finished dataset: what resume keeps, nothing touched; with --limit: what it would refuse.
    before = _files(reference)
    result = cli(*_encode_args(data, reference, "--dry-run", "--torch-threads", "1"))
    assert result.exit_code == 0 and "(11 already complete)" in result.output
    result = cli(*_encode_args(data, reference, "--dry-run", "--limit", "6"))
    assert result.exit_code == 0 and "6 items, 3 classes" in result.output
    refusal = "would refuse (pass --overwrite to replace): shard-000001.tar holds other items or settings"
    assert f"OUT        {refusal} and would be rewritten (and 9 more)" in result.stdout
    assert _files(reference) == before

    result = cli("pack", data.src, out, "--resolution", "32", "--shard-size", "8", "--dry-run")
    assert result.exit_code == 0 and "42 items, 3 classes" in result.output and "6 x up to 8 items" in result.output
    assert not out.exists()
