"""Throughput and memory of the encode stage on CPU (a benchmark, not a test).

For two random-init AutoencoderKLs at 256 px — the real SD-VAE architecture (block_out_channels
(128, 256, 512, 512), layers_per_block 2; ~84M parameters) and a small one — it measures images/s of:

  (a) the bare batched VAE forward (`pipeline.core.vae.encode_pixels`, image + flip) on pre-cropped arrays, in this
      process with 1 and 2 torch threads;
  (b) the full Dask pipeline (`pipeline.encode.run_job`: read, decode, ADM crop, VAE, float16, tar, sha256,
      sidecars, manifest) with 1 worker x 1 torch thread, (c) 2 workers x 1 thread, (d) 1 worker x 2 threads.

Pipeline runs are timed on warm workers (VAE loaded and one batch run beforehand, reported as "warm-up"), so
the images/s compare like for like with (a), which also runs one warm-up batch. Peak memory is the peak RSS
(VmHWM, reset before each run) of each worker process during the run.
Targets: pipeline overhead over (a) <= 10 % (b vs a at 1 thread); 2 workers >= 1.8x one worker (c vs b).

Run:  .venv/bin/python bench/encode.py            (about 3 minutes on 2 idle cores)
      .venv/bin/python bench/encode.py --quick    (fewer images, for a smoke run)
"""

from __future__ import annotations

import argparse
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

    from pipeline.encode.job import LOCAL_CLUSTER_CONFIG

    # What `run_job` does for the clusters it starts: its settings, and distributed's INFO lines kept quiet
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
    from pipeline.encode.job import run_job

    workers_cpu = client.run(_cpu_seconds)
    began, driver_cpu = time.perf_counter(), time.process_time()
    result = run_job(config, client=client)
    elapsed, driver_cpu = time.perf_counter() - began, time.process_time() - driver_cpu
    workers_cpu = sum(after - workers_cpu[worker] for worker, after in client.run(_cpu_seconds).items())
    assert result.ok, (result.counts, result.failed_shards)
    return elapsed, workers_cpu + driver_cpu


def pipeline_run(client, vae_path: str, source: Path, out: Path, case: Case, threads: int, fixed_cost: bool) -> dict:
    """Warm the workers for this VAE, run the encode job, and report images/s and peak RSS per worker.

    With `fixed_cost`, a 1-image job runs first: its time is the per-job cost (scan, VAE hash, scheduling,
    manifest), and (N - 1) / (t_N - t_1) is the steady-state rate a long job approaches.
    """
    from pipeline.encode.job import JobConfig

    started = time.perf_counter()
    client.run(_warm_worker, vae_path, threads, case.batch_size if case.warm_up else 0)
    warm_s = time.perf_counter() - started

    def config(target: Path, limit=None) -> JobConfig:
        return JobConfig(
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
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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


if __name__ == "__main__":
    main()
