"""Sampler overhead of `diffit.sampling.sample`: wall time of a full run minus the time inside network calls.

For DDPM-250, DDIM-50 and Heun-18 (kind="adm", through the ADM->EDM adapter), with and without classifier-free
guidance (power-cosine, scale 4.6, 3 channels), it reports the network calls (NFE) per sample, the forward rows
per sample (guidance doubles the batch, not the calls) and the overhead share; target <= 5%. Prints a markdown
table.

    .venv/bin/python bench/sampler_overhead.py                      # small conv net, 32x32x4 latents, CPU
    .venv/bin/python bench/sampler_overhead.py --model DiffiT-Tiny/2  # a registry model (diffit.models)

Overhead = per-sample noise generation (one CPU generator per sample), the diffusion arithmetic, the guidance
combine and the Python loop. Network time is measured around each network call (synchronised on CUDA).
"""

from __future__ import annotations

import argparse
import logging
import platform
import time

import torch
from torch import nn

from diffit.guidance import GuidanceConfig
from diffit.sampling import sample_with_stats
from diffit.sampling_config import SamplingConfig
from pipeline.core.logs import setup_logging

LOGGER = logging.getLogger("sampler_overhead")

SAMPLERS = [("DDPM-250", "ddpm", 250), ("DDIM-50", "ddim", 50), ("Heun-18", "edm-heun", 18)]


class SmallConvEpsNet(nn.Module):
    """A few 3x3 convolutions with time and class embeddings, following the latent model interface."""

    def __init__(self, in_channels: int = 4, width: int = 64, num_classes: int = 10):
        super().__init__()
        self.in_channels, self.num_classes, self.null_class = in_channels, num_classes, num_classes
        self.learn_sigma = True
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, 2 * in_channels, 3, padding=1)
        self.time_embed = nn.Linear(1, width)
        self.label_embed = nn.Embedding(num_classes + 1, width)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None):
        """eps and Sigma-interpolation channels, [N, 2C, H, W]."""
        condition = self.time_embed(noise_labels.reshape(-1, 1) / 1000.0)
        if class_labels is not None:
            condition = condition + self.label_embed(class_labels)
        hidden = nn.functional.silu(self.conv_in(x) + condition[:, :, None, None])
        hidden = nn.functional.silu(self.conv_mid(hidden))
        out = self.conv_out(hidden)
        return torch.cat([out[:, : self.in_channels], torch.tanh(out[:, self.in_channels :])], dim=1)


def build_model(name: str, latent_size: int) -> tuple[nn.Module, tuple[int, int, int]]:
    """The benchmark network and its per-sample shape."""
    if name == "conv":
        return SmallConvEpsNet(), (4, latent_size, latent_size)
    from diffit.models import create_model

    model = create_model(name)
    if not getattr(model, "learn_sigma", False) or not hasattr(model, "input_size"):
        raise SystemExit(f"{name} is not a latent (ADM) model; this benchmark samples kind='adm' models")
    return model, (model.in_channels, model.input_size, model.input_size)


def run_case(
    model: nn.Module, shape, batch: int, sampler: str, steps: int, guidance: GuidanceConfig | None, device: torch.device
) -> dict:
    """One full sampling run; returns its stats and the forward rows per sample."""
    rows = [0]
    hook = model.register_forward_pre_hook(lambda module, args: rows.__setitem__(0, rows[0] + args[0].shape[0]))
    try:
        labels = [i % model.num_classes for i in range(batch)]
        config = SamplingConfig(sampler=sampler, steps=steps, guidance=guidance, kind="adm")
        _, stats = sample_with_stats(model, shape, labels, list(range(batch)), config, device=device)
    finally:
        hook.remove()
    return {"stats": stats, "rows_per_sample": rows[0] / batch}


def main() -> None:
    """Parse arguments, run the grid, print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="conv", help="'conv' (built-in small net) or a diffit.models name")
    parser.add_argument("--batch", type=int, default=16, help="samples per run")
    parser.add_argument("--latent-size", type=int, default=32, help="latent resolution for --model conv")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: steadier timings on a shared machine; 0 = torch default)",
    )
    args = parser.parse_args()
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model, shape = build_model(args.model, args.latent_size)
    model = model.to(device).eval()
    guidance = GuidanceConfig(scale=4.6, schedule="power-cosine", power=4.0, channels=3)

    LOGGER.info("warm-up ...")
    run_case(model, shape, args.batch, "ddim", 3, guidance, device)
    results = []
    for label, sampler, steps in SAMPLERS:
        for guided in (False, True):
            start = time.perf_counter()
            result = run_case(model, shape, args.batch, sampler, steps, guidance if guided else None, device)
            LOGGER.info("%s %s: %.2f s", label, "CFG" if guided else "no CFG", time.perf_counter() - start)
            results.append((label, guided, result))

    cpu = platform.processor() or platform.machine()
    print(
        f"\nSampler overhead, model `{args.model}`, batch {args.batch} x {tuple(shape)}, device {device} "
        f"({cpu}, {torch.get_num_threads()} threads), torch {torch.__version__}\n"
    )
    print(
        "| sampler | guidance | NFE (calls) / sample | forward rows / sample | wall s | network s | overhead s "
        "| overhead ms / call | overhead % |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, guided, result in results:
        stats = result["stats"]
        print(
            f"| {label} | {'CFG 4.6 power-cos' if guided else 'none'} | {stats.network_calls} "
            f"| {result['rows_per_sample']:.0f} | {stats.total_time_s:.2f} | {stats.network_time_s:.2f} "
            f"| {stats.overhead_time_s:.3f} | {1000 * stats.overhead_time_s / stats.network_calls:.2f} "
            f"| {100 * stats.overhead_fraction:.1f} |"
        )


if __name__ == "__main__":
    main()
