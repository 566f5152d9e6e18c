"""Throughput of the evaluate stage on this machine: sampling, VAE decode, Inception features, loop overhead.

For each latent model (a small one and DiffiT-XL/2, random weights, fp32) the evaluate sampling loop
(`pipeline.evaluate.sample_into_store`: per-sample seeds, guided DDPM, VAE decode, zarr writes) runs on a
temporary store, and the table reports

- network evaluations per second and images x evaluations per second inside the DiffiT forward passes
  (with classifier-free guidance every evaluation runs a doubled batch);
- VAE decode images/s (SD-VAE architecture, 4 blocks, random weights: the real decoder's cost);
- the share of wall time outside the network forward passes (DiffiT and VAE): seeds, schedule arithmetic,
  uint8 conversion, zarr writes. Target: <= 10 %.

Then Inception-v3 feature extraction images/s (torch-fidelity's extractor, 2048-d features + logits, random
weights of the real architecture). fp32 matmul GFLOP/s is measured first for context.

`--metrics` instead measures the ADM-protocol metric math on random 2048-d features, each case in a fresh
process (so its peak resident memory is its own): precision / recall (k = 3, `pipeline.evaluate.adm`) at
10k x 10k and 50k samples x 10k references under the default 2 GB distance-block bound, and the streamed
float64 reference statistics over 100k features (batches of 64 as Inception delivers them) beside `np.cov` of the
same features held in memory, the two interleaved when repeated.

    python bench/evaluate.py                          # Tiny/2 + S/2 + XL/2, about 3-4 min on 2 CPU cores
    python bench/evaluate.py --models DiffiT-B/2 --batch-size 8 --steps 10
    python bench/evaluate.py --device cuda            # on a GPU machine
    python bench/evaluate.py --metrics                # P&R 10k x 10k, 50k x 10k; statistics over 100k features
    python bench/evaluate.py --metrics --prc-cases 10000x10000 --stats-features 20000   # a quicker look
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluate import (
    generation,  # noqa: E402
    sampling_settings,  # noqa: E402
)
from pipeline.evaluate import model_loading as loading  # noqa: E402
from pipeline.evaluate.sample_store import STORE_NAME, SampleStore, StoreLayout  # noqa: E402


def matmul_gflops(device: str, size: int = 1024, repeats: int = 5) -> float:
    """fp32 matmul GFLOP/s (multiply-add = 2 FLOPs) of this device, for context."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def sd_vae(device: str):
    """The SD-VAE architecture (KL-f8: 4 blocks, 128-512 channels) with random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        sample_size=256,
    )
    return vae.to(device).eval()


def bench_sampling(name: str, vae, batch_size: int, num_samples: int, steps: int, device: str) -> dict:
    """Run the evaluate sampling loop for one model on a temporary store; returns the row of the table."""
    import diffit

    torch.manual_seed(0)
    model = diffit.create_model(name, num_classes=1000).to(device).eval()
    latent = model.input_size
    loaded = loading.LoadedModel(
        model_dir=Path(name),
        model=model,
        config={"diffusion": {"type": "adm"}},
        kind="adm",
        family="latent",
        sample_shape=(model.in_channels, latent, latent),
        resolution=(8 * latent, 8 * latent),
        vae=vae,
        scaling_factor=0.18215,
    )
    sampling, _ = sampling_settings.resolve_sampling(
        loaded, {"steps": steps, "guidance_scale": 4.6, "guidance_schedule": "power-cosine"}
    )
    # Warm-up (first-call allocations, kernel selection) outside the timed run.
    generation.generate(loaded, sampling, 0, np.arange(1), np.array([0]), 1, device)
    with tempfile.TemporaryDirectory() as directory:
        layout = StoreLayout(num_samples, *loaded.resolution, batch_size)
        store = SampleStore.create(Path(directory) / STORE_NAME, layout, {"bench": name})
        stats = generation.sample_into_store(store, loaded, sampling, 0, None, 0, 1, batch_size, device)
    network_images = stats.network_calls * 2 * min(batch_size, num_samples)  # CFG doubles each batch
    outside = stats.total_time_s - stats.network_time_s - stats.decode_time_s
    return {
        "model": name,
        "resolution": loaded.resolution[0],
        "batch": batch_size,
        "samples": stats.samples,
        "steps": steps,
        "evaluations": stats.network_calls,
        "eval_per_s": stats.network_calls / stats.network_time_s,
        "img_eval_per_s": network_images / stats.network_time_s,
        "decode_img_per_s": stats.samples / stats.decode_time_s,
        "total_s": stats.total_time_s,
        "outside_share": outside / stats.total_time_s,
        "sampler_overhead_share": (stats.sampler_time_s - stats.network_time_s) / stats.total_time_s,
        "write_share": stats.write_time_s / stats.total_time_s,
    }


def bench_features(device: str, images: int, batch_size: int) -> dict:
    """Inception-v3 (torch-fidelity) features of 256-px uint8 images: 2048-d pool features and IS logits."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with (
        mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None),
        mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: {}),
    ):
        extractor = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    extractor = extractor.to(device).eval()
    batch = torch.randint(0, 256, (batch_size, 3, 256, 256), dtype=torch.uint8, device=device)
    with torch.no_grad():
        extractor(batch[:1])
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        done = 0
        while done < images:
            extractor(batch)
            done += batch_size
        if device == "cuda":
            torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {"images": done, "batch": batch_size, "img_per_s": done / elapsed}


# ----------------------------------------------------------------------------------------------------------------
# ADM-protocol metric math: each case in its own process, for its own peak memory


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: kilobytes


def _rss_gb() -> float:
    """Current resident memory (Linux /proc), to subtract the interpreter's and torch's own share."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024**2
    return 0.0


def _device_peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 1024**3 if device == "cuda" else None


def _prc_case(samples: int, references: int, dim: int, memory_gb: float, device: str, threads: int | None) -> dict:
    from pipeline.evaluate.adm import describe_block_plan, precision_recall

    if threads:
        torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(references, dim, generator=generator)
    sample = torch.randn(samples, dim, generator=generator)
    features_gb = (reference.numel() + sample.numel()) * 4 / 1024**3
    before = _rss_gb()  # interpreter, torch and the features
    started = time.perf_counter()
    values = precision_recall(reference, sample, memory_bytes=int(memory_gb * 1024**3), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    return {
        "case": f"precision/recall {samples // 1000}k samples x {references // 1000}k references",
        "seconds": time.perf_counter() - started,
        "peak_rss_gb": _peak_rss_gb(),
        "above_start_gb": _peak_rss_gb() - before,
        "device_peak_gb": _device_peak_gb(device),
        "features_gb": features_gb,
        "plan": "largest phase (sample radii): "
        + describe_block_plan(max(samples, references), max(samples, references), int(memory_gb * 1024**3)),
        "result": f"P {values['precision']:.3f} R {values['recall']:.3f}",
    }


def _stats_case(count: int, dim: int, streamed: bool, device: str, threads: int | None) -> dict:
    """Mean / covariance of `count` random features arriving in batches of 64: streamed (float64 moments,
    pooled as `pipeline.evaluate.reference.batch` pools them) or all held, then `np.cov`."""
    from pipeline.evaluate.adm import RunningMoments
    from pipeline.evaluate.reference.batch import UPDATE_ROWS

    if threads:
        torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    before = _rss_gb()
    started = time.perf_counter()
    moments, pending, held = RunningMoments.empty(dim, device), [], []
    for start in range(0, count, 64):
        batch = torch.randn(min(64, count - start), dim, generator=generator).to(device)
        (pending if streamed else held).append(batch)
        if streamed and sum(len(b) for b in pending) >= UPDATE_ROWS:
            moments.update(torch.cat(pending))
            pending.clear()
    if streamed:
        if pending:
            moments.update(torch.cat(pending))
        mu, sigma = moments.statistics()
    else:
        features = torch.cat(held).cpu().numpy()
        mu, sigma = features.mean(axis=0, dtype=np.float64), np.cov(features, rowvar=False)
    return {
        "case": f"reference statistics of {count // 1000}k x {dim} features, "
        + ("streamed float64 moments" if streamed else "all features in memory + np.cov"),
        "seconds": time.perf_counter() - started,
        "peak_rss_gb": _peak_rss_gb(),
        "above_start_gb": _peak_rss_gb() - before,
        "device_peak_gb": _device_peak_gb(device),
        "features_gb": count * dim * 4 / 1024**3 if not streamed else UPDATE_ROWS * dim * 4 / 1024**3,
        "plan": f"batches of 64, float64 update every {UPDATE_ROWS} rows" if streamed else "np.cov",
        "result": f"trace(sigma) {np.trace(sigma):.1f}, |mu| {np.linalg.norm(mu):.3f}",
    }


def _in_child(function, *args) -> dict:
    """Run `function(*args)` in a fresh spawned process and return its result dict."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(function, args)


def bench_metrics(args) -> None:
    print(
        f"# ADM-protocol metric math: {platform.processor() or platform.machine()}, device {args.device}, "
        f"{args.threads or torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    rows = []
    for case in args.prc_cases:
        samples, references = (int(n) for n in case.lower().split("x"))
        rows.append(_in_child(_prc_case, samples, references, 2048, args.prc_memory_gb, args.device, args.threads))
        print(f"done {case}", file=sys.stderr, flush=True)
    for _ in range(args.repeats):  # interleaved: streamed, in memory, streamed, ...
        for streamed in (True, False):
            rows.append(_in_child(_stats_case, args.stats_features, 2048, streamed, args.device, args.threads))
            print(f"done statistics (streamed={streamed})", file=sys.stderr, flush=True)
    print(
        "| case | wall s | peak RSS GB (process) | peak above start GB | features held GB | device peak GB "
        "| blocks | result |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        device_peak = f"{r['device_peak_gb']:.2f}" if r["device_peak_gb"] is not None else "-"
        print(
            f"| {r['case']} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | {r['above_start_gb']:.2f} "
            f"| {r['features_gb']:.2f} | {device_peak} | {r['plan']} | {r['result']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["DiffiT-Tiny/2", "DiffiT-S/2", "DiffiT-XL/2"])
    parser.add_argument("--batch-size", type=int, default=4, help="batch of the small models")
    parser.add_argument("--xl-batch-size", type=int, default=1, help="batch of XL models")
    parser.add_argument("--samples", type=int, default=4, help="samples per small model")
    parser.add_argument("--steps", type=int, default=10, help="DDPM steps (network evaluations per sample)")
    parser.add_argument("--xl-steps", type=int, default=2)
    parser.add_argument("--feature-images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--metrics", action="store_true", help="benchmark the metric math instead (see above)")
    parser.add_argument("--prc-cases", nargs="+", default=["10000x10000", "50000x10000"], help="SAMPLESxREFERENCES")
    parser.add_argument("--prc-memory-gb", type=float, default=2.0, help="distance-block bound (evaluate's default)")
    parser.add_argument("--stats-features", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=1, help="repeats of the interleaved statistics variants")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.metrics:
        bench_metrics(args)
        return

    print(
        f"# evaluate-stage benchmark: {platform.processor() or platform.machine()}, device {args.device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"fp32 matmul: {matmul_gflops(args.device):.0f} GFLOP/s\n")
    vae = sd_vae(args.device)
    rows = []
    for name in args.models:
        xl = "XL" in name
        batch = args.xl_batch_size if xl else args.batch_size
        samples = batch if xl else args.samples
        steps = args.xl_steps if xl else args.steps
        rows.append(bench_sampling(name, vae, batch, samples, steps, args.device))
        print(f"done {name}", file=sys.stderr, flush=True)

    print(
        "| model | image px | batch | samples | network evals | evals/s | images x evals/s (CFG 2x batch) "
        "| VAE decode img/s | wall s | outside network+VAE | of which sampler math | zarr writes |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['resolution']} | {r['batch']} | {r['samples']} | {r['evaluations']} | "
            f"{r['eval_per_s']:.2f} | {r['img_eval_per_s']:.1f} | {r['decode_img_per_s']:.2f} | "
            f"{r['total_s']:.1f} | {100 * r['outside_share']:.1f} % | {100 * r['sampler_overhead_share']:.1f} % | "
            f"{100 * r['write_share']:.1f} % |"
        )
    features = bench_features(args.device, args.feature_images, min(8, args.feature_images))
    print(
        f"\nInception-v3 features (2048 + logits, 256 px uint8 -> 299 px): {features['img_per_s']:.2f} images/s "
        f"(batch {features['batch']}, {features['images']} images)"
    )


if __name__ == "__main__":
    main()
