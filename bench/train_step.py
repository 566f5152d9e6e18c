"""Benchmark of one training step (forward + backward + AdamW + EMA) on this machine's CPU.

    python bench/train_step.py                      # DiffiT-XL/2 (32x32 latents, batch 2) and DiffiT-S/2
    python bench/train_step.py --xl-steps 2 --small-steps 8 --threads 2   # more timed steps

What it measures, in one run:
1. the matmul peak of each dtype (fp32 always, bf16 too) with square matmuls, so that the dtype of the model
   rows is chosen by measurement: bf16 rows are added only when bf16 matmuls beat fp32 on this CPU (with
   AVX-512 BF16 they can; with AVX2 only they are ~100x slower);
2. images/s and peak resident memory of a full training step (the trainer's own `Objective` -- ADM hybrid
   loss with learned Sigma -- AdamW, gradient-norm, EMA update) for DiffiT-XL/2 and a small config, each in a
   fresh child process so that its peak RSS is its own;
3. for the small config, the share of step time spent waiting for data when batches stream from latent shards
   through the trainer's DataLoader (`pipeline.train.data`, resampled mode, 1 worker, every shard checked
   against its sha256 as the trainer does), the step time of streamed vs
   in-memory batches (alternating steps in one process, so both see the same background load), and the CPU
   cost of decoding one batch; the target is a loader overhead of at most 5%;
4. model FLOPs utilisation: training FLOPs = 3 x forward FLOPs (`diffit.models.count_flops`, one multiply-add
   = one FLOP as the paper counts, attention products included, doubled here to compare with the matmul peak
   in real FLOP/s) x images/s, divided by the measured matmul peak of the same dtype.

The output is a markdown table. The machine may be shared with other work: step times are medians (best also
shown), and every ratio (MFU, loader overhead) compares measurements taken in the same process at the same time.

    python bench/train_step.py --loader-hash        # cost of the per-shard sha256 check on the loader alone

    python bench/train_step.py --variants --device cuda --model DiffiT-XL/2 --batch 32   # the CUDA fast path

`--variants` times the trainer's own step (its `Objective`, gradient-norm, AdamW, `update_ema`, the loss kept on
the device and read once per round as the trainer reads it once per record) in three variants, interleaved
round by round in one process: eager with foreach AdamW, eager with fused AdamW, fused AdamW + `torch.compile`
of the model. On CUDA it runs in bf16 autocast with TF32 (the trainer's defaults there) and reports images/s,
MFU against the GPU's dense bf16 peak (`pipeline.train.performance`), peak memory per variant (every variant's
weights and optimizer state stay resident, so the peaks include the others'), and the number of host
synchronisations inside one step (`torch.cuda.set_sync_debug_mode`; the trainer aims at 0). On CPU (fp32) it
runs the same variants (compile needs a C++ compiler; `--no-compile` leaves that variant out). This is what
decides whether `model.compile` should default to on for CUDA.

`--loader-hash` measures only the loader (`make_loader`, resampled mode as in training, DiffiT-XL/2-sized
latent shards of ~17 MB): samples/s with and without the sha256 check of every shard read, the two variants
alternated round by round in one process (order swapped every round; medians per variant), because the machine
drifts by +-20% and may be shared. Two settings: 1 DataLoader worker (what the trainer runs; the next shard is
read and hashed in a background thread while the current one is decoded), and the loader in-process with its
CPU time (process time, all threads) per sample, the cost the hash adds where no core is idle.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------------------------
# Matmul peak
# ---------------------------------------------------------------------------------------------------------------


def matmul_peak(dtype_name: str, size: int, budget_s: float = 3.0) -> dict:
    """Best GFLOP/s of size x size matmuls in `dtype` (2 n^3 FLOPs each). A small probe first: a dtype with no
    fast kernels (bf16 without AVX-512 BF16) would otherwise take minutes."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    probe = 256
    a, b = torch.randn(probe, probe, dtype=dtype), torch.randn(probe, probe, dtype=dtype)
    start = time.perf_counter()
    a @ b
    probe_s = time.perf_counter() - start
    probe_gflops = 2 * probe**3 / probe_s / 1e9
    if probe_s > 0.05:  # < ~0.7 GFLOP/s: no usable kernel, do not try the large size
        return {"dtype": dtype_name, "size": probe, "gflops": probe_gflops, "note": "slow probe, large size skipped"}
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best, deadline = float("inf"), time.perf_counter() + budget_s
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return {"dtype": dtype_name, "size": size, "gflops": 2 * size**3 / best / 1e9, "note": ""}


# ---------------------------------------------------------------------------------------------------------------
# Child: one model, one dtype, one data source
# ---------------------------------------------------------------------------------------------------------------


def write_latent_shards(
    out_dir: Path, num_samples: int, num_shards: int, latent_size: int, num_classes: int
) -> list[str]:
    """Synthetic latent shards in the encode format (float16 mean/std [2, 4, s, s], labels)."""
    import numpy as np

    from pipeline.core.shard_members import latent_sample
    from pipeline.core.shards import ShardWriter

    rng = np.random.default_rng(0)
    urls = []
    per_shard = num_samples // num_shards
    for index in range(num_shards):
        with ShardWriter(out_dir, index) as writer:
            for i in range(per_shard):
                mean = rng.standard_normal((2, 4, latent_size, latent_size)).astype(np.float16) * 5
                std = np.full_like(mean, 0.1)
                writer.write(latent_sample(f"{index:04d}{i:06d}", mean, std, int(rng.integers(num_classes)), {}))
            writer.commit({"failures": 0})
        urls.append(str(out_dir / f"shard-{index:06d}.tar"))
    return urls


def child(spec: dict) -> dict:
    """Time training steps of one model in one dtype; report step times per data source, data wait, the matmul
    peak measured in this process just before (same machine load), the loader's decode cost, and peak RSS.

    With `compare_loader`, steps alternate between an in-memory batch and a batch streamed from shards, so that
    both see the same background load; otherwise every step uses in-memory batches.
    """
    import statistics

    import torch

    torch.set_num_threads(spec["threads"])
    from diffit.models import count_flops, create_model
    from pipeline.core.shards import sha256_file
    from pipeline.train.config import Config
    from pipeline.train.data import StreamSpec, infinite, make_loader
    from pipeline.train.objective import Objective, update_ema

    torch.manual_seed(0)
    model = create_model(spec["model"])
    # Forward multiply-adds per image, attention products included (the hardware does them too).
    flops = count_flops(model)["total"]
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0)
    objective = Objective(Config(), model.null_class)
    batch, size = spec["batch"], model.input_size

    fixed = [(torch.randn(batch, 4, size, size), torch.randint(0, model.num_classes, (batch,))) for _ in range(4)]
    sources = {"memory": (fixed[i % 4] for i in range(10**9))}
    decode_s = None
    if spec["compare_loader"]:
        data_dir = Path(tempfile.mkdtemp(prefix="bench-shards-"))
        urls = write_latent_shards(
            data_dir, num_samples=64 * batch, num_shards=4, latent_size=size, num_classes=model.num_classes
        )
        stream = StreamSpec(
            urls=tuple(urls),
            kind="latents",
            batch_size=batch,
            resampled=True,
            shuffle_buffer=64,
            scaling_factor=0.18215,
            conditional=True,
            num_classes=model.num_classes,
            sha256=tuple(sha256_file(url) for url in urls),  # as the trainer reads them: every shard verified
        )
        # CPU cost of reading + decoding one batch (no worker process): an upper bound on what the loader takes
        # from the training threads when it runs beside them.
        inline = infinite(make_loader(stream, num_workers=0))
        next(inline)
        start = time.perf_counter()
        for _ in range(10):
            next(inline)
        decode_s = (time.perf_counter() - start) / 10
        sources["shards"] = infinite(make_loader(stream, num_workers=1))

    peak = matmul_peak(spec["dtype"], spec["matmul_size"], budget_s=1.5)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if spec["dtype"] == "bf16" else torch.autocast("cpu", enabled=False)
    )
    order = list(sources) * (spec["warmup"] + spec["steps"])
    times = {name: [] for name in sources}
    waits = {name: [] for name in sources}
    model.train()
    for index, name in enumerate(order):
        start = time.perf_counter()
        x, labels = next(sources[name])
        waited = time.perf_counter() - start
        with autocast:
            loss = objective(model, x, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.9999)
        elapsed = time.perf_counter() - start
        if index >= spec["warmup"] * len(sources):
            times[name].append(elapsed)
            waits[name].append(waited)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    results = {
        name: {
            "best_step_s": min(times[name]),
            "median_step_s": statistics.median(times[name]),
            "wait_fraction": sum(waits[name]) / sum(times[name]),
        }
        for name in sources
    }
    return {
        **spec,
        "forward_gmacs": flops / 1e9,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "matmul_gflops": peak["gflops"],
        "decode_s": decode_s,
        "sources": results,
        "peak_rss_gib": peak_gib,
    }


def run_child(spec: dict) -> dict:
    """Run `child(spec)` in a fresh interpreter (own peak RSS); return its JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env, cwd=REPO
    )
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# Loader: with and without the per-shard sha256 check
# ---------------------------------------------------------------------------------------------------------------


def time_loader(spec, workers: int, warmup: int, batches: int) -> tuple[float, float]:
    """(samples/s, CPU microseconds of this process per sample) over `batches` batches after `warmup`."""
    from pipeline.train.data import infinite, make_loader

    stream = infinite(make_loader(spec, workers))
    for _ in range(warmup):
        next(stream)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(stream)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    stream.close()
    samples = batches * spec.batch_size
    return samples / seconds, cpu / samples * 1e6


class _NeverVerified(set):
    """A verification cache that remembers nothing: every read of a shard is hashed."""

    def add(self, item) -> None:
        pass


def loader_hash_benchmark(rounds: int, batches: int, shards: int, per_shard: int) -> None:
    """Loader throughput without hashing, hashing every shard as it is first read, and after every shard was
    verified once (later epochs), interleaved; prints a markdown table."""
    import hashlib
    import statistics
    from dataclasses import replace

    from pipeline.core.shards import sha256_file
    from pipeline.train import shard_reading
    from pipeline.train.data import StreamSpec

    data_dir = Path(tempfile.mkdtemp(prefix="bench-hash-"))
    urls = write_latent_shards(data_dir, shards * per_shard, shards, latent_size=32, num_classes=1000)
    shard_mb = Path(urls[0]).stat().st_size / 1e6
    base = StreamSpec(
        urls=tuple(urls), kind="latents", batch_size=32, resampled=True, shuffle_buffer=256, num_classes=1000
    )
    hashed = replace(base, sha256=tuple(sha256_file(u) for u in urls))
    # (spec, cache state before the run): DataLoader workers fork from this process and inherit its cache.
    # "every read" disables the cache (what the check would cost without it: every read of a shard hashed).
    variants = {
        "none": (base, "cold"),
        "every read": (hashed, "off"),
        "first read": (hashed, "cold"),
        "verified": (hashed, "warm"),
    }
    rates = {(name, w): [] for name in variants for w in (1, 0)}
    cpu = {name: [] for name in variants}
    for index in range(rounds):
        order = list(variants) if index % 2 == 0 else list(reversed(variants))
        for workers in (1, 0):
            for name in order:
                spec, cache = variants[name]
                shard_reading._VERIFIED = _NeverVerified() if cache == "off" else set()
                if cache == "warm":
                    for url, expected in zip(spec.urls, spec.sha256):
                        shard_reading.read_shard(url, expected)
                rate, cpu_us = time_loader(replace(spec, start_step=index), workers, 12, batches)
                rates[(name, workers)].append(rate)
                if workers == 0:
                    cpu[name].append(cpu_us)
    block = os.urandom(int(shard_mb * 1e6))
    start = time.perf_counter()
    hashlib.sha256(block).hexdigest()
    hash_mb_s = shard_mb / (time.perf_counter() - start)
    print(
        f"\n### Loader with / without the per-shard sha256 check ({shards} shards of {per_shard} XL/2 latents, "
        f"{shard_mb:.1f} MB each; batch 32, shuffle buffer 256; {rounds} interleaved rounds of {batches} batches; "
        f"sha256 {hash_mb_s:.0f} MB/s on this CPU)\n"
    )
    print("| loader | no check | every read hashed | first read of each shard hashed (shipped) | verified before |")
    print("|---|---|---|---|---|")
    rows = [
        (f"{label}, samples/s", {n: statistics.median(rates[(n, w)]) for n in variants})
        for w, label in ((1, "1 DataLoader worker (trainer)"), (0, "in-process"))
    ]
    rows.append(("CPU us per sample, in-process", {n: statistics.median(cpu[n]) for n in variants}))
    for label, values in rows:
        none = values["none"]
        cells = [f"{values[n]:.0f} ({values[n] / none - 1:+.1%})" for n in ("every read", "first read", "verified")]
        print(f"| {label} | {none:.0f} | " + " | ".join(cells) + " |")
    shutil.rmtree(data_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# The trainer's step in its fast-path variants (CUDA; CPU too)
# ---------------------------------------------------------------------------------------------------------------

VARIANTS = {
    "eager, foreach AdamW": {"fused": False, "compile": False},
    "eager, fused AdamW": {"fused": True, "compile": False},
    "compiled, fused AdamW": {"fused": True, "compile": True},
}


def build_variant(name: str, model_name: str, device, settings: dict) -> dict:
    """Model (seed 0, so every variant starts from the same weights), EMA, AdamW and the network the step calls."""
    import torch

    from diffit.models import create_model
    from pipeline.train.config import Config
    from pipeline.train.objective import Objective

    torch.manual_seed(0)
    model = create_model(model_name).to(device)
    ema = copy.deepcopy(model).float().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=settings["fused"])
    network = torch.compile(model) if settings["compile"] else model
    objective = Objective(Config(), model.null_class, device)
    return {
        "name": name,
        "model": model,
        "ema": ema,
        "optimizer": optimizer,
        "network": network,
        "objective": objective,
    }


def train_step(variant: dict, x, labels, window) -> None:
    """One step as the trainer takes it (one process, no accumulation): loss and norm stay on the device."""
    import torch

    from pipeline.train.objective import update_ema

    model = variant["model"]
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        loss = variant["objective"](variant["network"], x, labels)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    window.add(loss, norm)
    variant["optimizer"].step()
    variant["optimizer"].zero_grad(set_to_none=True)
    update_ema(variant["ema"], model, 0.9999)


def host_syncs_in_a_step(variant: dict, x, labels) -> int | None:
    """Host synchronisations torch reports during one step (CUDA only)."""
    import warnings

    import torch

    from pipeline.train.progress import LogWindow

    if x.device.type != "cuda":
        return None
    window = LogWindow(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(variant, x, labels, window)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def variant_benchmark(options: argparse.Namespace) -> None:
    """Time the variants round-robin; print one markdown table."""
    import statistics

    import torch

    from pipeline.train.performance import configure_cuda, peak_bf16_tflops, training_flops_per_image
    from pipeline.train.progress import LogWindow

    device = torch.device(
        options.device if options.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    configure_cuda(True)
    names = [n for n in VARIANTS if not (options.no_compile and VARIANTS[n]["compile"])]
    variants = [build_variant(n, options.model, device, VARIANTS[n]) for n in names]
    model = variants[0]["model"]
    x = torch.randn(options.batch, model.in_channels, model.input_size, model.input_size, device=device)
    labels = torch.randint(0, max(model.num_classes, 1), (options.batch,), device=device)
    for variant in variants:  # warm-up (compilation happens here)
        for _ in range(options.warmup):
            train_step(variant, x, labels, LogWindow(0))
    seconds = {v["name"]: [] for v in variants}
    peaks = {v["name"]: 0.0 for v in variants}
    for index in range(options.rounds):
        for variant in variants if index % 2 == 0 else variants[::-1]:
            window = LogWindow(0)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(options.steps):
                train_step(variant, x, labels, window)
            window.values()  # the trainer's one read per record (waits for the device)
            seconds[variant["name"]].append((time.perf_counter() - start) / options.steps)
            if device.type == "cuda":
                peaks[variant["name"]] = max(peaks[variant["name"]], torch.cuda.max_memory_allocated() / 2**30)
    flops = training_flops_per_image(options.model, {})
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"\n### Training step variants: {options.model}, batch {options.batch}, {where}, "
        f"{'bf16 autocast + TF32' if device.type == 'cuda' else 'fp32'}, torch {torch.__version__}; "
        f"{options.rounds} interleaved rounds of {options.steps} steps (median)\n"
    )
    print("| variant | step s | images/s | vs eager | MFU | peak GiB | host syncs in a step |")
    print("|---|---|---|---|---|---|---|")
    base = statistics.median(seconds[names[0]])
    for variant in variants:
        step = statistics.median(seconds[variant["name"]])
        rate = options.batch / step
        mfu = f"{rate * flops / (peak * 1e12):.1%}" if peak else "n/a"
        memory = f"{peaks[variant['name']]:.1f}" if device.type == "cuda" else "n/a"
        syncs = host_syncs_in_a_step(variant, x, labels)
        print(
            f"| {variant['name']} | {step:.4f} | {rate:.1f} | {base / step:.2f}x | {mfu} | {memory} | "
            f"{'n/a' if syncs is None else syncs} |"
        )


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def parse_options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--xl-batch", type=int, default=2)
    parser.add_argument("--xl-steps", type=int, default=1, help="timed XL/2 steps after one warm-up step")
    parser.add_argument("--small-model", default="DiffiT-S/2")
    parser.add_argument("--small-batch", type=int, default=8)
    parser.add_argument("--small-steps", type=int, default=4, help="timed steps per data source")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--loader-hash", action="store_true", help="only the loader's sha256 cost (see above)")
    parser.add_argument("--rounds", type=int, default=10, help="--loader-hash, --variants: interleaved rounds")
    parser.add_argument("--batches", type=int, default=96, help="--loader-hash: timed batches of 32 per round")
    parser.add_argument("--variants", action="store_true", help="the trainer's step: eager / fused / compiled")
    parser.add_argument("--device", default="auto", help="--variants: auto (cuda when present), cuda or cpu")
    parser.add_argument("--model", default="DiffiT-S/2", help="--variants: the model")
    parser.add_argument("--batch", type=int, default=8, help="--variants: batch size")
    parser.add_argument("--warmup", type=int, default=3, help="--variants: warm-up steps per variant")
    parser.add_argument("--steps", type=int, default=5, help="--variants: timed steps per variant and round")
    parser.add_argument("--no-compile", action="store_true", help="--variants: leave out the compiled variant")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    options = parse_options()
    if options.child:
        print(json.dumps(child(json.loads(options.child))))
        return
    if options.loader_hash:
        loader_hash_benchmark(options.rounds, options.batches, shards=4, per_shard=512)
        return
    if options.variants:
        import torch

        torch.set_num_threads(options.threads)
        variant_benchmark(options)
        return

    import torch

    torch.set_num_threads(options.threads)
    started = time.perf_counter()
    peaks = {name: matmul_peak(name, options.matmul_size) for name in ("fp32", "bf16")}
    dtypes = ["fp32"] + (["bf16"] if peaks["bf16"]["gflops"] > peaks["fp32"]["gflops"] else [])

    results = []
    for dtype in dtypes:
        base = {"threads": options.threads, "dtype": dtype, "matmul_size": options.matmul_size}
        results.append(
            run_child(
                {
                    **base,
                    "model": "DiffiT-XL/2",
                    "batch": options.xl_batch,
                    "warmup": 1,
                    "steps": options.xl_steps,
                    "compare_loader": False,
                }
            )
        )
        results.append(
            run_child(
                {
                    **base,
                    "model": options.small_model,
                    "batch": options.small_batch,
                    "warmup": 2,
                    "steps": options.small_steps,
                    "compare_loader": True,
                }
            )
        )
    print_report(options, peaks, dtypes, results)
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")


def print_report(options: argparse.Namespace, peaks: dict, dtypes: list[str], results: list[dict]) -> None:
    """The markdown tables of the training-step benchmark."""
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    print(
        f"\n### Training step on CPU ({cpu}, {options.threads} threads, torch {torch.__version__}; "
        f"machine shared with other work)\n"
    )
    print("| dtype | matmul peak GFLOP/s (n), first probe |")
    print("|---|---|")
    for name, peak in peaks.items():
        note = f" -- {peak['note']}" if peak["note"] else ""
        print(f"| {name} | {peak['gflops']:.1f} ({peak['size']}){note} |")
    print(f"\nmodel rows use: {', '.join(dtypes)} (bf16 only where its matmul peak beats fp32)\n")
    print(
        "| model | params (M) | batch | dtype | data | step s (best / median) | images/s | data wait | "
        "peak RSS GiB | fwd GFLOPs/img | train GFLOP/s | matmul peak GFLOP/s (same process) | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        for source, timing in row["sources"].items():
            images_per_s = row["batch"] / timing["median_step_s"]
            # Training = 3 x forward; x2 turns multiply-adds into FLOPs to compare with the matmul peak.
            train_flops = 3 * 2 * row["forward_gmacs"] * 1e9 * images_per_s
            mfu = train_flops / (row["matmul_gflops"] * 1e9)
            print(
                f"| {row['model']} | {row['params_m']:.1f} | {row['batch']} | {row['dtype']} | {source} | "
                f"{timing['best_step_s']:.3f} / {timing['median_step_s']:.3f} | {images_per_s:.2f} | "
                f"{timing['wait_fraction']:.1%} | {row['peak_rss_gib']:.2f} | {row['forward_gmacs']:.2f} | "
                f"{train_flops / 1e9:.1f} | {row['matmul_gflops']:.1f} | {mfu:.1%} |"
            )
    print()
    for row in results:
        if "shards" not in row["sources"]:
            continue
        memory, shards = row["sources"]["memory"], row["sources"]["shards"]
        overhead = shards["median_step_s"] / memory["median_step_s"] - 1
        decode_share = row["decode_s"] / memory["median_step_s"]
        verdict = "meets" if max(overhead, shards["wait_fraction"]) <= 0.05 else "misses"
        print(
            f"loader ({row['model']}, {row['dtype']}, batch {row['batch']}): waiting for data "
            f"{shards['wait_fraction']:.1%} of step time; streamed vs in-memory median step "
            f"{shards['median_step_s']:.3f} / {memory['median_step_s']:.3f} s ({overhead:+.1%}, steps alternated); "
            f"decoding a batch costs {row['decode_s'] * 1000:.1f} ms of CPU = {decode_share:.1%} of a step "
            f"-> {verdict} the <= 5% target"
        )


if __name__ == "__main__":
    main()
