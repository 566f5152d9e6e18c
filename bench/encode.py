"""Throughput and memory of the encode stage on CPU (a benchmark, not a test).

For two random-init AutoencoderKLs at 256 px — the real SD-VAE architecture (block_out_channels
(128, 256, 512, 512), layers_per_block 2; ~84M parameters) and a small one — it measures images/s of:

  (a) the bare batched VAE forward (`pipeline.core.vae.encode_pixels`, image + flip) on pre-cropped arrays, in this
      process with 1 and 2 torch threads;
  (b) the full Dask pipeline (`pipeline.encode.run_encode`: read, decode, ADM crop, VAE, float16, tar, sha256,
      sidecars, manifest) with 1 worker x 1 torch thread, (c) 2 workers x 1 thread, (d) 1 worker x 2 threads.

Pipeline runs are timed on warm workers (VAE loaded and one batch run beforehand, reported as "warm-up"), so
the images/s compare like for like with (a), which also runs one warm-up batch. Peak memory is the peak RSS
(VmHWM, reset before each run) of each worker process during the run.
Targets: pipeline overhead over (a) <= 10 % (b vs a at 1 thread); 2 workers >= 1.8x one worker (c vs b).

Run:  .venv/bin/python bench/encode.py            (about 3 minutes on 2 idle cores)
      .venv/bin/python bench/encode.py --quick    (fewer images, for a smoke run)

Planning (`--planning`): what the driver does before the first task runs, on an ImageNet-sized tree (1000 class
folders x 1281 files = 1,281,000 files, built once under --tree and removed at the end unless --keep-tree):
the scan, the shard plan and the tasks' pickled size (what goes through the scheduler), for a full job and for
`--limit 64`, each in a fresh process (wall time, peak RSS). `--base DIR` names a checkout of another version
(e.g. `git worktree add /tmp/base-encode HEAD`) measured the same way, interleaved with this one. The files are
empty (0 data blocks, 1 inode each): planning never reads them. They are distinct files, not hard links of one
JPEG: the scan counts a file reached by several paths once, so a tree of links would plan 1000 items. It also
times the resume check of finished shards: re-hashing each tar (every shard before; now only with --verify)
against trusting its sealed sidecar.

      .venv/bin/python bench/encode.py --planning --base /tmp/base-encode   (about 10 minutes)

VAE throughput per device (`--vae-throughput`): `encode_pixels` alone (uint8 crops in, float32 mean/std out, each
crop encoded with its flip) for the SD-VAE architecture at 256 px, one timed pass per dtype per round, the dtypes
interleaved round by round; reports crops/s (the encode stage's images/s; the VAE sees twice as many), peak GPU
memory and how many batches were retried in fp32. On CUDA the VAE runs channels-last.

      .venv/bin/python bench/encode.py --vae-throughput --device cuda --dtypes fp16,bf16,fp32 --batch 64
      .venv/bin/python bench/encode.py --vae-throughput --device cpu --quick     (small VAE, smoke run)
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
SMALL_VAE = dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=32)


@dataclass
class Case:
    """One VAE to benchmark: its architecture and how many images / which batch and shard sizes to use."""

    name: str
    config: dict
    images: int
    batch_size: int
    shard_size: int
    warm_up: bool  # run one batch before timing (skipped where one forward takes seconds: <1% first-call cost)


def save_random_vae(directory: Path, config: dict, seed: int = 0) -> str:
    """Save a seeded random-init AutoencoderKL (4 blocks: /8 like SD) as safetensors; returns the path."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=256,
        **config,
    )
    vae.save_pretrained(directory, safe_serialization=True)
    return str(directory.resolve())


def make_jpegs(root: Path, count: int, seed: int = 0) -> None:
    """`count` photo-like 384x320 JPEGs in two class folders (decode + box-halving + bicubic like ImageNet)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        y, x = np.mgrid[0:320, 0:384]
        pixels = (
            rng.uniform(0, 255, 3) + x[..., None] * rng.uniform(-0.5, 0.5, 3) + y[..., None] * rng.uniform(-0.5, 0.5, 3)
        )
        pixels = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"img{i:05d}.JPEG", quality=90)


def bare_forward(vae_path: str, source: Path, case: Case, threads: int) -> float:
    """Images/s of `encode_pixels` alone on pre-cropped images (after one warm-up batch)."""
    import torch

    from pipeline.core.vae import encode_pixels, load_vae
    from pipeline.encode.sources import scan_source
    from pipeline.encode.transforms import prepare_image

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        vae = load_vae(vae_path)
        items = scan_source(source).items
        crops = np.stack([prepare_image((source / item.path).read_bytes(), 256)[0] for item in items])
        if case.warm_up:
            encode_pixels(vae, crops[: case.batch_size])  # first-call allocations and kernel selection
        start, cpu_start = time.perf_counter(), time.process_time()
        for first in range(0, len(crops), case.batch_size):
            encode_pixels(vae, crops[first : first + case.batch_size])
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        return {"images_per_s": len(crops) / elapsed, "cpu_s_per_image": cpu / len(crops)}
    finally:
        torch.set_num_threads(previous)


def vae_throughput(device: str, dtypes: list[str], batch: int, rounds: int, config: dict, tmp: Path) -> list[dict]:
    """Crops/s of `encode_pixels` per dtype on `device` (median of `rounds` interleaved passes of 4 batches)."""
    import torch

    from pipeline.core.vae import encode_pixels, fp32_retry_count, load_vae

    vae_path = save_random_vae(tmp / "vae-throughput", config)
    crops = np.random.default_rng(0).integers(0, 256, size=(batch, 256, 256, 3), dtype=np.uint8)
    models = {dtype: load_vae(vae_path, dtype, device) for dtype in dtypes}
    cuda = device.startswith("cuda")
    results = {dtype: {"dtype": dtype, "rates": [], "peak_gib": 0.0, "retries": 0} for dtype in dtypes}
    for dtype in dtypes:
        encode_pixels(models[dtype], crops)  # warm-up: allocations, kernel selection
    for _ in range(rounds):
        for dtype in dtypes:  # interleaved: a drifting clock or a shared core hits every dtype alike
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            retries, start = fp32_retry_count(), time.perf_counter()
            for _ in range(4):
                encode_pixels(models[dtype], crops)  # returns host arrays: each call ends synchronised
            results[dtype]["rates"].append(4 * batch / (time.perf_counter() - start))
            results[dtype]["retries"] += fp32_retry_count() - retries
            if cuda:
                peak = torch.cuda.max_memory_allocated(device) / 2**30
                results[dtype]["peak_gib"] = max(results[dtype]["peak_gib"], peak)
    return [{**row, "crops_per_s": float(np.median(row["rates"]))} for row in results.values()]


def print_vae_throughput(rows: list[dict], device: str, batch: int, name: str) -> None:
    """One markdown table of `vae_throughput` rows."""
    import torch

    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(f"\nVAE encode, {name}, 256 px, batch {batch} crops (+{batch} flips), {where}, torch {torch.__version__}\n")
    print("| dtype | crops/s (median) | VAE images/s | peak GPU memory GiB | batches retried in fp32 |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['dtype']} | {row['crops_per_s']:.1f} | {2 * row['crops_per_s']:.1f} | "
            f"{row['peak_gib']:.2f} | {row['retries']} |"
        )


def _warm_worker(vae_path: str, threads: int, batch_size: int) -> int:
    """On a worker: set torch threads, load (cache) the VAE and run one batch when `batch_size` > 0, as the bare
    forward's warm-up does."""
    from pipeline.core.vae import encode_pixels, get_vae, set_torch_threads

    set_torch_threads(threads)
    vae = get_vae(vae_path, "fp32", "cpu")
    if batch_size:
        encode_pixels(vae, np.zeros((batch_size, 256, 256, 3), np.uint8))
    return os.getpid()


def _reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) so the next reading covers one run only (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process from /proc (VmHWM). ru_maxrss would include the parent's peak, which a
    spawned worker inherits across exec."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_cluster(workers: int):
    """A LocalCluster of `workers` processes x 1 Dask thread, and its client."""
    import dask
    from distributed import Client, LocalCluster

    from pipeline.encode.cluster import LOCAL_CLUSTER_CONFIG

    # What `run_encode` does for the clusters it starts: its settings, and distributed's INFO lines kept quiet
    # (for the whole benchmark: this cluster lives across several calls; see `quiet_cluster_logs`).
    logging.getLogger("distributed").setLevel(logging.ERROR)
    with dask.config.set(LOCAL_CLUSTER_CONFIG):
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR
        )
    return cluster, Client(cluster)


def _timed_job(client, config) -> tuple[float, float]:
    """Run one job on `client`: (wall seconds, CPU seconds of the workers and of the driver, which hosts the
    scheduler)."""
    from pipeline.encode.job import run_encode

    workers_cpu = client.run(_cpu_seconds)
    began, driver_cpu = time.perf_counter(), time.process_time()
    result = run_encode(config, client=client)
    elapsed, driver_cpu = time.perf_counter() - began, time.process_time() - driver_cpu
    workers_cpu = sum(after - workers_cpu[worker] for worker, after in client.run(_cpu_seconds).items())
    assert result.ok, (result.counts, result.failed_shards)
    return elapsed, workers_cpu + driver_cpu


def pipeline_run(client, vae_path: str, source: Path, out: Path, case: Case, threads: int, fixed_cost: bool) -> dict:
    """Warm the workers for this VAE, run the encode job, and report images/s and peak RSS per worker.

    With `fixed_cost`, a 1-image job runs first: its time is the per-job cost (scan, VAE hash, scheduling,
    manifest), and (N - 1) / (t_N - t_1) is the steady-state rate a long job approaches.
    """
    from pipeline.encode.job import EncodeOptions

    started = time.perf_counter()
    client.run(_warm_worker, vae_path, threads, case.batch_size if case.warm_up else 0)
    warm_s = time.perf_counter() - started

    def config(target: Path, limit=None) -> EncodeOptions:
        return EncodeOptions(
            source=str(source),
            out=str(target),
            resolution=256,
            vae=vae_path,
            shard_size=case.shard_size,
            batch_size=case.batch_size,
            torch_threads=threads,
            progress=False,
            limit=limit,
        )

    run = {"warm_s": warm_s}
    if fixed_cost:
        run["one_wall_s"], run["one_cpu_s"] = _timed_job(client, config(out.with_name(out.name + "-one"), limit=1))
    client.run(_reset_peak_rss)
    elapsed, cpu = _timed_job(client, config(out))
    run.update(
        images_per_s=case.images / elapsed,
        wall_s=elapsed,
        cpu_s_per_image=cpu / case.images,
        peak_rss_gib=[round(v / 2**30, 2) for v in client.run(_peak_rss_bytes).values()],
    )
    if fixed_cost:
        run["steady_images_per_s"] = (case.images - 1) / (elapsed - run["one_wall_s"])
        run["steady_cpu_s_per_image"] = (cpu - run["one_cpu_s"]) / (case.images - 1)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images (smoke run)")
    parser.add_argument("--planning", action="store_true", help="driver planning time and memory (see above)")
    parser.add_argument("--tree", type=Path, default=Path(tempfile.gettempdir()) / "bench-encode-tree")
    parser.add_argument("--base", type=Path, help="checkout of the version to compare with (--planning)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=1281)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep-tree", action="store_true")
    parser.add_argument("--vae-throughput", action="store_true", help="encode_pixels per dtype (see above)")
    parser.add_argument("--device", default="cuda", help="device of --vae-throughput")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32", help="comma-separated dtypes of --vae-throughput")
    parser.add_argument("--batch", type=int, default=64, help="crops per batch of --vae-throughput")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --vae-throughput")
    parser.add_argument("--plan-child", nargs=3, metavar=("CODE", "TREE", "LIMIT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.plan_child:
        plan_child(Path(args.plan_child[0]), Path(args.plan_child[1]), int(args.plan_child[2]))
        return
    if args.planning:
        planning(args)
        return
    if args.vae_throughput:
        config, name = (SMALL_VAE, "small VAE") if args.quick else (SD_VAE, "SD-VAE architecture")
        with tempfile.TemporaryDirectory(prefix="bench-vae-") as tmp:
            rows = vae_throughput(args.device, args.dtypes.split(","), args.batch, args.rounds, config, Path(tmp))
        print_vae_throughput(rows, args.device, args.batch, name)
        return
    from pipeline.core.logs import setup_logging

    setup_logging()
    logging.getLogger("pipeline").setLevel(logging.WARNING)  # the jobs' INFO lines would bury the progress lines
    # Two shards per case, so that 2 workers get one each. The small VAE goes first on each cluster so that the
    # SD-VAE's peak memory is the one that includes both cached models (the small one weighs a few MB).
    cases = [
        Case(
            "small (32,64,128,128) x1",
            SMALL_VAE,
            images=8 if args.quick else 16,
            batch_size=4,
            shard_size=4 if args.quick else 8,
            warm_up=True,
        ),
        Case("SD-VAE arch (128,256,512,512) x2", SD_VAE, images=2, batch_size=1, shard_size=1, warm_up=False),
    ]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        rows = run_cases(cases, Path(tmp))
    load_after = os.getloadavg()

    print(
        f"\nencode benchmark, 256 px, CPU ({os.cpu_count()} cores), load average {load_before[0]:.1f} before / "
        f"{load_after[0]:.1f} after (other jobs share these cores: wall-clock timings are contended; CPU seconds "
        "per image are not affected by waiting for a core)\n"
    )
    print_table(rows)
    print()
    print_summary(rows)


def run_cases(cases: list[Case], tmp: Path) -> list[tuple[Case, dict, dict | None, dict]]:
    """Bare forwards, then the pipeline on one cluster per worker count; rows of (case, bare1, bare2, runs)."""
    prepared = []
    for case_index, case in enumerate(cases):
        source = tmp / f"src{case_index}"
        make_jpegs(source, case.images)
        vae_path = save_random_vae(tmp / f"vae{case_index}", case.config)
        bare1 = bare_forward(vae_path, source, case, threads=1)
        bare2 = bare_forward(vae_path, source, case, threads=2) if case.warm_up else None  # SD: time budget
        prepared.append((case_index, case, source, vae_path, bare1, bare2, {}))
        print(f"bare forward done: {case.name}", file=sys.stderr, flush=True)
    # One cluster per worker count, reused by both VAEs (1 worker: 1 then 2 torch threads).
    for workers, thread_options in ((1, (1, 2)), (2, (1,))):
        cluster, client = start_cluster(workers)
        try:
            for case_index, case, source, vae_path, _, _, runs in prepared:
                for threads in thread_options:
                    out = tmp / f"out{case_index}-{workers}x{threads}"
                    runs[(workers, threads)] = pipeline_run(
                        client, vae_path, source, out, case, threads, fixed_cost=(workers, threads) == (1, 1)
                    )
                    print(f"pipeline done: {case.name} {workers}x{threads}", file=sys.stderr, flush=True)
        finally:
            client.close()
            cluster.close()
    return [(case, bare1, bare2, runs) for _, case, _, _, bare1, bare2, runs in prepared]


def print_table(rows) -> None:
    """The markdown table: bare forwards and pipeline runs, images/s and CPU s per image against the bare one."""
    print(
        "| VAE | images | run | images/s (wall) | vs bare 1 thread | CPU s / image | CPU vs bare | wall s | "
        "warm-up s | peak RSS / worker (GiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    labels = {
        (1, 1): "(b) pipeline 1 worker x 1 thread",
        (2, 1): "(c) pipeline 2 workers x 1 thread",
        (1, 2): "(d) pipeline 1 worker x 2 threads",
    }
    for case, bare1, bare2, runs in rows:
        print(
            f"| {case.name} | {case.images} | (a) bare forward, 1 thread | {bare1['images_per_s']:.3f} | 1.00 | "
            f"{bare1['cpu_s_per_image']:.2f} | 1.00 | | | |"
        )
        if bare2 is not None:
            print(
                f"| | | (a') bare forward, 2 threads | {bare2['images_per_s']:.3f} | "
                f"{bare2['images_per_s'] / bare1['images_per_s']:.2f} | {bare2['cpu_s_per_image']:.2f} | "
                f"{bare2['cpu_s_per_image'] / bare1['cpu_s_per_image']:.2f} | | | |"
            )
        for key, label in labels.items():
            run = runs[key]
            print(
                f"| | | {label} | {run['images_per_s']:.3f} | {run['images_per_s'] / bare1['images_per_s']:.2f} | "
                f"{run['cpu_s_per_image']:.2f} | {run['cpu_s_per_image'] / bare1['cpu_s_per_image']:.2f} | "
                f"{run['wall_s']:.1f} | {run['warm_s']:.1f} | {', '.join(map(str, run['peak_rss_gib']))} |"
            )
            if "steady_images_per_s" in run:
                print(
                    f"| | | (b) steady state: (N-1)/(t_N - t_1), 1-image job {run['one_wall_s']:.1f} s / "
                    f"{run['one_cpu_s']:.1f} CPU s | {run['steady_images_per_s']:.3f} | "
                    f"{run['steady_images_per_s'] / bare1['images_per_s']:.2f} | {run['steady_cpu_s_per_image']:.2f} | "
                    f"{run['steady_cpu_s_per_image'] / bare1['cpu_s_per_image']:.2f} | | | |"
                )


def print_summary(rows) -> None:
    """One line per VAE: pipeline overhead over the bare forward, and the 2-worker scaling (measured, projected)."""
    for case, bare1, _, runs in rows:
        one = runs[(1, 1)]
        wall_overhead = bare1["images_per_s"] / one["images_per_s"] - 1
        steady_overhead = bare1["images_per_s"] / one["steady_images_per_s"] - 1
        cpu_overhead = one["steady_cpu_s_per_image"] / bare1["cpu_s_per_image"] - 1
        scaling = runs[(2, 1)]["images_per_s"] / one["images_per_s"]
        cpu_ratio = runs[(2, 1)]["cpu_s_per_image"] / one["cpu_s_per_image"]
        print(
            f"- {case.name}: pipeline time per image over the bare forward (target <= +10%): whole job "
            f"{wall_overhead:+.1%}, steady state {steady_overhead:+.1%} (CPU {cpu_overhead:+.1%}). 2 workers / 1 "
            f"worker (target >= 1.8x): wall {scaling:.2f}x on these shared cores; CPU per image 2 workers / 1 worker "
            f"= {cpu_ratio:.2f}, so on two free cores 2 / {cpu_ratio:.2f} = {2 / cpu_ratio:.2f}x is expected "
            "(a projection, not a measurement)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Planning


def build_tree(root: Path, classes: int, per_class: int) -> float:
    """`classes` folders of `per_class` empty files (ImageNet's names and layout); returns seconds taken."""
    started = time.perf_counter()
    for label in range(classes):
        folder = root / f"n{label:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            os.mknod(folder / f"n{label:08d}_{index}.JPEG")  # one system call: a regular file without data
    return time.perf_counter() - started


def plan_child(code: Path, tree: Path, limit: int) -> None:
    """In a fresh process: plan an `images` job over `tree` with the pipeline found in `code`; print JSON."""
    import json
    import pickle

    sys.path.insert(0, str(code))
    import distributed  # noqa: F401  (imported by one version's planning, not the other's: outside the timing)

    import pipeline.encode.job as job

    baseline = _current_rss_bytes()
    out = Path(tempfile.gettempdir()) / f"bench-plan-out-{os.getpid()}" / "out"  # never created: planning only
    settings = dict(source=str(tree), out=str(out), kind="images", shard_size=1000, progress=False)
    config = job.EncodeOptions(**settings, limit=limit or None)
    started = time.perf_counter()
    if hasattr(job, "plan_job"):  # this version: the source is streamed into compact tasks
        plan = job.plan_job(config)
        tasks, items = plan.tasks, plan.items
    else:  # the version before: full scan, item lists in the tasks
        from pipeline.encode.sources import scan_source

        source = scan_source(tree)
        selected = source.items[:limit] if limit else source.items
        tasks = job._shard_tasks(config, source, selected, out, None, "topic", local=True)
        items = len(selected)
    elapsed = time.perf_counter() - started
    task_bytes = sum(len(pickle.dumps(task)) for task in tasks)
    result = dict(seconds=elapsed, items=items, tasks=len(tasks), task_bytes=task_bytes)
    print(json.dumps(result | dict(peak_rss=_peak_rss_bytes(), baseline_rss=baseline)))


def _current_rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _run_child(code: Path, tree: Path, limit: int) -> dict:
    import json
    import subprocess

    done = subprocess.run(
        [sys.executable, __file__, "--plan-child", str(code), str(tree), str(limit)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"planning child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def resume_check(tmp: Path, shards: int = 16, shard_bytes: int = 37 << 20) -> dict:
    """Seconds per finished shard to decide it can be kept: re-hash its tar (sha256 against the sidecar) or trust
    its sealed sidecar (stat calls). Shards of ImageNet-256 latents are about 37 MB; the files are just written,
    so the re-hash reads from the page cache (a lower bound: a cold disk or network file system is slower)."""
    from pipeline.core.atomic import write_json_atomic
    from pipeline.core.shards import ShardWriter, shard_problems
    from pipeline.core.storage import Location
    from pipeline.encode.plan import seal_sidecar, trusted_shard

    sidecars = []
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 256, shard_bytes, dtype=np.uint8).tobytes()
    for index in range(shards):
        with ShardWriter(tmp, index) as writer:
            writer.write({"__key__": f"k{index}", "bin": payload})
            sidecar = seal_sidecar(writer.commit({"fingerprint": "f", "items": 1, "failures": []}))
        write_json_atomic(tmp / f"shard-{index:06d}.json", sidecar)
        sidecars.append(sidecar)
    timings = {"rehash": 0.0, "trust": 0.0}
    for _ in range(2):  # interleaved
        started = time.perf_counter()
        assert all(not shard_problems(tmp, sidecar) for sidecar in sidecars)
        timings["rehash"] += time.perf_counter() - started
        started = time.perf_counter()
        stats = Location.of(tmp).stats()  # one directory listing per resume, as `trusted_shards` does
        assert all(trusted_shard(stats, sidecar, "f") for sidecar in sidecars)
        timings["trust"] += time.perf_counter() - started
    return {name: seconds / (2 * shards) for name, seconds in timings.items()}


def planning(args) -> None:
    """Build the tree, plan full and `--limit 64` jobs with each version (interleaved), print the tables."""
    import shutil

    tree = args.tree
    if not tree.exists():
        print(f"building {args.classes} x {args.per_class} files under {tree} ...", file=sys.stderr, flush=True)
        print(f"built in {build_tree(tree, args.classes, args.per_class):.0f} s", file=sys.stderr, flush=True)
    try:
        collections.deque(os.walk(tree), maxlen=0)  # warm the directory cache: the first measured run is not cold
        variants = [("after", REPO)] + ([("before", args.base)] if args.base else [])
        runs: dict[tuple[str, int], list[dict]] = {}
        for repeat in range(args.repeats):
            for limit in (0, 64):
                for name, code in variants if repeat % 2 == 0 else variants[::-1]:
                    runs.setdefault((name, limit), []).append(_run_child(code, tree, limit))
                    print(f"planned: {name} limit={limit} repeat={repeat}", file=sys.stderr, flush=True)
    finally:
        if not args.keep_tree:
            shutil.rmtree(tree)
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        resume = resume_check(Path(tmp))
    print_planning(runs, resume, args)


def print_planning(runs: dict, resume: dict, args) -> None:
    """Markdown tables: planning per version and job, and the resume check per shard."""
    files = args.classes * args.per_class
    print(
        f"\nplanning, {files:,} files ({args.classes} folders), shard size 1000, kind images, CPU "
        f"({os.cpu_count()} cores); median of {args.repeats} runs, each in a fresh process\n"
    )
    print("| version | job | items planned | wall s | peak RSS MiB (after imports) | tasks | task pickles MiB |")
    print("|---|---|---|---|---|---|---|")
    for (name, limit), results in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0] != "before")):
        seconds = float(np.median([r["seconds"] for r in results]))
        peak = float(np.median([r["peak_rss"] for r in results])) / 2**20
        base = float(np.median([r["baseline_rss"] for r in results])) / 2**20
        last = results[-1]
        print(
            f"| {name} | {'--limit 64' if limit else 'full'} | {last['items']:,} | {seconds:.2f} | "
            f"{peak:.0f} ({base:.0f}) | {last['tasks']} | {last['task_bytes'] / 2**20:.2f} |"
        )
    rehash, trust = resume["rehash"], resume["trust"]
    print("\n| resume check of a finished 37 MB shard | s per shard | projected for 1282 shards (ImageNet) |")
    print("|---|---|---|")
    print(f"| re-hash (before; now --verify), page cache | {rehash:.4f} | {rehash * 1282:.0f} s |")
    print(f"| sealed sidecar trusted (now) | {trust:.6f} | {trust * 1282:.2f} s |")


if __name__ == "__main__":
    main()
