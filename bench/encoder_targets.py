"""REPA's targets, stored or online: the two designs measured on one small dataset (a benchmark, not a test).

    python bench/encoder_targets.py            # about 3-4 minutes on 2 cores
    python bench/encoder_targets.py --quick    # fewer images and rounds, for a smoke run

(a) stored: `diffit-pipe encode --encoder-targets ENCODER` runs the frozen encoder on each crop and its flip and
    stores the patch tokens (float16 [2, N, D], `repa.npy`); the trainer reads them (`repa.targets: stored`).
(b) online: `diffit-pipe encode --keep-images` stores the crop (`png`); the trainer decodes it and runs the encoder
    on every batch (`repa.targets: online`, the default).

The dataset: 256 synthetic 64 px images (blocky random colours), latents 16 x 16 x 4 of a random tiny
AutoencoderKL (/4), encoded with the real encode job (`run_encode`, in-process Dask). Encoders: the DINOv2
ViT-B/14 architecture with random weights (loaded as `dinov2_vitb14` through the trainer's loader), at the input
size of a /2 model's token grid (8 x 8 tokens: 112 px here; REPA's 224 px for ImageNet-256's 16 x 16), and a
random demo classifier (the demo's default architecture, 32 px input, 4 x 4 x 64 tokens).

Measured: bytes per sample of the shards (plain latents, + PNG crop, + stored targets); the trainer's loader
(`pipeline.train.data.make_loader`, resampled mode, shuffle buffer 256, batch 32, in-process; every shard checked
against its sha256 as in training) in samples/s for each variant, interleaved round by round (median); the
encoder's forward per image (ms on this CPU, fp32, batch 8) and its GFLOPs (torch's FlopCounterMode, one
multiply-add = one FLOP as `diffit.models.count_flops` counts, attention forced onto the math backend so that it
is counted). Extrapolated to ImageNet (1,281,167 images at 256 px: 16 x 16 tokens, DINOv2-B/14 at 224 px): the
storage of (a), the encoder's share of a DiffiT-XL/2 training step for (b) (forward + backward = 3 x forward,
`diffit.models.model_stats`), and both on an H100 at an assumed sustained throughput (`--h100-tflops`).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/train_step.py: the loader timing

from train_step import time_loader  # noqa: E402

IMAGENET_TRAIN = 1_281_167
IMAGENET_GRID = 16  # ImageNet-256: 32 x 32 latents, a /2 model's 16 x 16 tokens; DINOv2 at 224 px
REPA_STEPS, REPA_BATCH = 400_000, 256  # REPA's SiT-XL/2 schedule (the repa_imagenet256 study)


# ---------------------------------------------------------------------------------------------------------------
# The dataset and the encoders
# ---------------------------------------------------------------------------------------------------------------


def write_images(root: Path, count: int, size: int = 64, classes: int = 4) -> None:
    """`count` blocky random RGB images (PNG) in `classes` class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / f"n{index % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        pixels = np.kron(coarse, np.ones((size // 8, size // 8, 1), dtype=np.uint8))
        pixels = np.clip(pixels + rng.integers(-8, 9, size=pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{index:05d}.png")


def save_tiny_vae(directory: Path) -> str:
    """A random AutoencoderKL with 3 blocks (/4: 64 px -> 16 x 16 x 4 latents)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    vae.save_pretrained(directory, safe_serialization=True)
    return str(directory)


def save_random_dinov2_vitb14(path: Path) -> Path:
    """DINOv2 ViT-B/14's architecture (768 wide, 12 blocks, 37 x 37 pre-training grid) with random weights, in the
    official key format, so the loader takes it for `dinov2_vitb14`."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=518, patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5, num_classes=0
    )
    state = {key: value.clone() for key, value in vit.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 768)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def save_random_classifier(directory: Path) -> Path:
    """The demo's classifier architecture (32 px, channels 32-64-64-64) with random weights."""
    import torch

    from pipeline.demo.classifier import ClassifierConfig, SmallCNN, save_classifier

    torch.manual_seed(0)
    return save_classifier(SmallCNN(ClassifierConfig(num_classes=4)), directory)


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


def encode(source: Path, out: Path, vae: str, **options) -> dict:
    """Run the encode job; (seconds, bytes per sample, the manifest)."""
    from pipeline.core.manifest import load_manifest
    from pipeline.encode import EncodeOptions, run_encode

    settings = dict(source=str(source), out=str(out), resolution=64, vae=vae, shard_size=64, batch_size=32)
    started = time.perf_counter()
    result = run_encode(EncodeOptions(**settings, workers=0, progress=False, torch_threads=2, **options))
    seconds = time.perf_counter() - started
    assert result.ok, result
    manifest = load_manifest(out)
    shard_bytes = sum(entry["bytes"] for entry in manifest["shards"])
    return {"seconds": seconds, "bytes": shard_bytes / manifest["counts"]["written"], "manifest": manifest}


def loader_spec(data: Path, **overrides):
    from pipeline.core.manifest import load_manifest, shard_urls
    from pipeline.train.data import StreamSpec

    manifest = load_manifest(data)
    base = StreamSpec(
        urls=tuple(shard_urls(data, manifest)),
        kind="latents",
        batch_size=32,
        resampled=True,
        shuffle_buffer=256,
        scaling_factor=manifest["vae"]["scaling_factor"],
        num_classes=manifest["num_classes"],
        resolution=manifest["resolution"],
        sha256=tuple(entry["sha256"] for entry in manifest["shards"]),
    )
    return replace(base, **overrides)


def encoder_cost(encoder: str, weights: Path, grid: int, batch: int, repeats: int) -> dict:
    """The trainer's target encoder for a `grid` x `grid` token grid: ms per image (median of `repeats` batches of
    uint8 images, fp32, no gradients) and forward GFLOPs per image (multiply-add = 1 FLOP)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.core.target_encoders import load_target_encoder

    module = load_target_encoder(encoder, str(weights), (grid, grid))
    pixels = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        module(pixels[:1])
    gflops = counter.get_total_flops() / 2 / 1e9
    seconds = []
    with torch.no_grad():
        module(pixels)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            module(pixels)
            seconds.append(time.perf_counter() - start)
    return {
        "input_px": input_px(module),
        "ms": statistics.median(seconds) / batch * 1e3,
        "gflops": gflops,
        "grid": tuple(module.grid),
        "dim": module.embed_dim,
    }


def input_px(module) -> int:
    """The side of the images the target encoder reads (DINOv2: grid x 14; the classifier: its resolution)."""
    inner = module.encoder
    return int(inner.img_size[0]) if hasattr(inner, "img_size") else int(inner.classifier.config.resolution)


def member_bytes(shape: list[int]) -> int:
    """Bytes of one float16 `.npy` member of `shape` in a shard: the .npy header (128 bytes for these shapes), the
    data, the tar header and the padding to 512-byte blocks."""
    payload = int(np.prod(shape)) * 2 + 128
    return 512 + -(-payload // 512) * 512


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 images, 2 loader rounds, 2 encoder repeats")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved loader rounds")
    parser.add_argument("--batches", type=int, default=24, help="batches of 32 per loader round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--h100-tflops",
        type=float,
        default=400.0,
        help="assumed sustained bf16 TFLOP/s of one H100 (real FLOPs, 2 per multiply-add; 400 = 40%% of the "
        "dense peak, the project's MFU target)",
    )
    args = parser.parse_args()
    if args.quick:
        args.images, args.rounds, args.batches = 64, 2, 4
    import torch

    from diffit.models import model_stats

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-targets-"))
    started = time.perf_counter()
    try:
        write_images(work / "src", args.images)
        vae = save_tiny_vae(work / "vae")
        dinov2 = save_random_dinov2_vitb14(work / "dinov2" / "dinov2_vitb14_pretrain.pth")
        classifier = save_random_classifier(work / "classifier")
        encode(work / "src", work / "warm-up", vae, limit=32)  # imports, the in-process cluster, the VAE: not timed
        datasets = {
            "latents only": encode(work / "src", work / "plain", vae),
            "(b) + crop (png)": encode(work / "src", work / "images", vae, keep_images=True),
            "(a) + DINOv2-B/14 targets": encode(
                work / "src", work / "dinov2-out", vae, encoder_targets="dinov2-vitb14", encoder_weights=str(dinov2)
            ),
            "(a) + demo-classifier targets": encode(
                work / "src",
                work / "classifier-out",
                vae,
                encoder_targets="demo-classifier",
                encoder_weights=str(classifier),
            ),
        }
        dinov2_shape = datasets["(a) + DINOv2-B/14 targets"]["manifest"]["repa_targets"]["shape"]
        classifier_shape = datasets["(a) + demo-classifier targets"]["manifest"]["repa_targets"]["shape"]
        specs = {
            "latents only": loader_spec(work / "plain"),
            "(b) + crop (png), decoded and flipped": loader_spec(work / "images", images=True),
            "(a) + DINOv2-B/14 targets of the view": loader_spec(work / "dinov2-out", targets=tuple(dinov2_shape)),
            "(a) + demo-classifier targets": loader_spec(work / "classifier-out", targets=tuple(classifier_shape)),
        }
        rates = {name: [] for name in specs}
        for index in range(args.rounds):
            order = list(specs) if index % 2 == 0 else list(reversed(specs))
            for name in order:
                rates[name].append(time_loader(replace(specs[name], start_step=index), 0, 4, args.batches))
        repeats = 2 if args.quick else 5
        costs = {
            "DINOv2-B/14, 8 x 8 tokens (this dataset)": encoder_cost("dinov2-vitb14", dinov2, 8, 8, repeats),
            "DINOv2-B/14, 16 x 16 tokens (ImageNet-256)": encoder_cost(
                "dinov2-vitb14", dinov2, IMAGENET_GRID, 8, repeats
            ),
            "demo classifier (its own 4 x 4)": encoder_cost("demo-classifier", classifier, 8, 8, repeats),
        }
        xl = model_stats("DiffiT-XL/2")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, datasets, rates, costs, xl, time.perf_counter() - started)


def report(args, datasets: dict, rates: dict, costs: dict, xl: dict, wall: float) -> None:
    import torch

    print("### REPA's targets: stored (a) or online (b)\n")
    print(
        f"`python bench/encoder_targets.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads; {args.images} images of 64 px, 16 x 16 x 4 latents; wall {wall:.0f} s)\n"
    )
    plain = datasets["latents only"]["bytes"]
    print("| shards | bytes per sample | vs latents only | encode s per image |")
    print("|---|---|---|---|")
    for name, entry in datasets.items():
        per_image = entry["seconds"] / entry["manifest"]["counts"]["written"]
        print(f"| {name} | {entry['bytes']:,.0f} | {entry['bytes'] / plain:.2f}x | {per_image * 1e3:.1f} ms |")
    base = statistics.median(rate for rate, _ in rates["latents only"])
    base_cpu = statistics.median(cpu for _, cpu in rates["latents only"])
    print(
        f"\n| trainer's loader, in-process ({args.rounds} interleaved rounds of {args.batches} x 32) | samples/s | "
        "vs latents | CPU us per sample | vs latents |"
    )
    print("|---|---|---|---|---|")
    for name, values in rates.items():
        rate, cpu = statistics.median(r for r, _ in values), statistics.median(c for _, c in values)
        print(f"| {name} | {rate:,.0f} | {rate / base - 1:+.0%} | {cpu:,.0f} | {cpu / base_cpu - 1:+.0%} |")
    print(
        "\n| encoder (fp32, batch 8, no grad) | input px | tokens x width | ms per image (this CPU) | GFLOPs "
        "(multiply-add = 1) |"
    )
    print("|---|---|---|---|---|")
    for name, cost in costs.items():
        grid = cost["grid"]
        print(
            f"| {name} | {cost['input_px']} | {grid[0] * grid[1]} x {cost['dim']} | {cost['ms']:.1f} | "
            f"{cost['gflops']:.2f} |"
        )
    imagenet = costs["DINOv2-B/14, 16 x 16 tokens (ImageNet-256)"]
    member = member_bytes([2, IMAGENET_GRID**2, imagenet["dim"]])
    # The latents of ImageNet-256 (mean + std [2, 4, 32, 32]) plus what else a sample holds here (cls, json).
    rest = plain - 2 * member_bytes([2, 4, 16, 16])
    latents = 2 * member_bytes([2, 4, 32, 32]) + rest
    step_gflops = 3 * xl["gflops"]
    share = imagenet["gflops"] / step_gflops
    # GFLOPs here count a multiply-add once (as the paper); the GPU's FLOP/s count it twice.
    throughput = args.h100_tflops * 1e12 / 2
    images_per_s = throughput / (step_gflops * 1e9)
    encode_hours = 2 * IMAGENET_TRAIN * imagenet["gflops"] * 1e9 / throughput / 3600
    online_hours = REPA_STEPS * REPA_BATCH * imagenet["gflops"] * 1e9 / throughput / 3600
    train_hours = REPA_STEPS * REPA_BATCH * step_gflops * 1e9 / throughput / 3600
    print(f"\nImageNet extrapolation ({IMAGENET_TRAIN:,} images, 256 px, DINOv2-B/14 at 224 px):\n")
    print("| figure | value |")
    print("|---|---|")
    print(f"| (a) `repa.npy` per sample (2 x 256 x 768 float16 + headers) | {member / 1e6:.3f} MB |")
    print(f"| for scale: a latent sample (mean + std 2 x 4 x 32 x 32, cls, json) | {latents / 1e3:.1f} KB |")
    print(f"| (a) stored targets for ImageNet | {member * IMAGENET_TRAIN / 1e12:.2f} TB |")
    print(f"| for scale: the latents (mean + std, 2 views) for ImageNet | {latents * IMAGENET_TRAIN / 1e9:.0f} GB |")
    print(f"| (b) encoder forward per image | {imagenet['gflops']:.1f} GFLOPs |")
    print(f"| DiffiT-XL/2 training step per image (3 x {xl['gflops']:.1f} GFLOPs forward) | {step_gflops:.0f} GFLOPs |")
    print(f"| (b) encoder share of a DiffiT-XL/2 step | {share:.1%} |")
    print(
        f"| H100 at an assumed {args.h100_tflops:.0f} TFLOP/s sustained: DiffiT-XL/2 training images/s | "
        f"{images_per_s:,.0f} |"
    )
    print(
        f"| (a) bytes the loader must read per H100 at that rate | {member * images_per_s / 1e9:.2f} GB/s "
        f"({8 * member * images_per_s / 1e9:.1f} GB/s per 8-GPU node) |"
    )
    print(f"| (a) encode-time encoder, both views of ImageNet once | {encode_hours:.2f} H100-hours |")
    print(
        f"| (b) online encoder over REPA's {REPA_STEPS:,} steps x {REPA_BATCH} | {online_hours:.0f} H100-hours "
        f"(of {train_hours:,.0f} for the whole training) |"
    )


if __name__ == "__main__":
    main()
