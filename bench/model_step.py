"""Forward+backward throughput of latent DiffiT against a plain adaLN DiT of the same width and depth.

For each model: images/s of one training forward+backward (no optimizer) on 256-px latents (32x32x4), peak
resident memory (each model runs in its own subprocess so the peak is its own), and the achieved FLOP/s as a
fraction of the matmul peak of the same dtype measured at the start of the same run (training FLOPs = 3x the
forward FLOPs counted by `diffit.models.count_flops`, attention included).

bf16 autocast is measured only where this CPU's bf16 matmul beats fp32 (on some machines it is ~300x slower).

    python bench/model_step.py                       # DiffiT-XL/2 and DiffiT-B/2 vs DiT, batch 2
    python bench/model_step.py --models DiffiT-B/2 --batch-size 4 --steps 3
    python bench/model_step.py --device cuda         # on a GPU machine
    python bench/model_step.py --models DiT-XL/2 DiffiT-XL/2 --interleave 6   # drift-robust A/B comparison
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------------------
# A plain DiT (adaLN-Zero) of given width/depth, for comparison: what DiffiT replaces with TMSA.
# ---------------------------------------------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """DiT block: adaLN-Zero modulation (shift, scale, gate for attention and MLP) from the conditioning c; the
    modulation layer starts at zero (the "-Zero": every block is the identity at initialisation)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        b, n, d = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate1 * self.proj(h)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class DiT(nn.Module):
    """Minimal DiT with the same patch embedding, embeddings and final layer sizes as LatentDiffiT."""

    def __init__(
        self,
        depth: int,
        hidden: int,
        heads: int,
        patch: int = 2,
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 1000,
    ):
        super().__init__()
        self.patch, self.grid, self.out = patch, input_size // patch, 2 * in_channels
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.embed = nn.Conv2d(in_channels, hidden, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, self.grid**2, hidden), requires_grad=False)
        self.t_mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_table = nn.Embedding(num_classes + 1, hidden)
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads) for _ in range(depth))
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final = nn.Linear(hidden, patch * patch * self.out)
        for layer in (self.final_ada[1], self.final):  # DiT's zero-initialised final modulation and projection
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y):
        from diffit.layers import timestep_embedding

        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        c = self.t_mlp(timestep_embedding(t, 256)) + self.y_table(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_ada(c).unsqueeze(1).chunk(2, dim=-1)
        tokens = self.final(self.final_norm(tokens) * (1 + scale) + shift)
        n, g, p = x.shape[0], self.grid, self.patch
        out = tokens.reshape(n, g, g, p, p, self.out).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(n, self.out, g * p, g * p)


def build(name: str) -> nn.Module:
    from diffit.models import LATENT_SIZES, create_model

    if name.startswith("DiT-"):
        size, patch = name.removeprefix("DiT-").split("/")
        depth, hidden, heads = LATENT_SIZES[size]
        return DiT(depth, hidden, heads, patch=int(patch))
    return create_model(name)


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: str, size: int = 2048, budget_s: float = 20.0) -> float | None:
    """Achieved FLOP/s (one FMA = 2 FLOPs here, converted below) of a square matmul; None if too slow to matter.

    A small probe first: where bf16 is emulated (hundreds of times slower than fp32) a 2048^2 product would take a
    minute, so the size is cut down to fit the time budget."""
    a = torch.randn(256, 256, device=device, dtype=dtype)
    synchronize(device)
    start = time.perf_counter()
    a @ a
    synchronize(device)
    probe = time.perf_counter() - start
    estimated = probe * (size / 256) ** 3
    if estimated > budget_s:
        size = max(256, int(256 * (budget_s / max(probe, 1e-9)) ** (1 / 3)) // 64 * 64)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    repeats = 0
    start = time.perf_counter()
    while repeats < 3 or time.perf_counter() - start < 1.0:
        a @ b
        repeats += 1
        if time.perf_counter() - start > budget_s:
            break
    synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    return 2 * size**3 / seconds


def step_once(model, inputs, dtype, device):
    autocast = torch.autocast(
        device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype, enabled=dtype != torch.float32
    )
    with autocast:
        out = model(*inputs)
    out.float().square().mean().backward()


def run_single(name: str, batch_size: int, steps: int, dtype_name: str, device: str) -> dict:
    """One model, one dtype, in this process: warm-up, then `steps` timed forward+backward passes."""
    from diffit.models import count_flops

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    with torch.device("meta"):
        meta_model = build(name)
    forward_flops = count_flops(meta_model)["total"]  # per image, FMA = 1
    del meta_model
    model = build(name).to(device).train()
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(batch_size, 4, 32, 32, device=device)
    inputs = (
        x,
        torch.randint(0, 1000, (batch_size,), device=device).float(),
        torch.randint(0, 1000, (batch_size,), device=device),
    )
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    step_once(model, inputs, dtype, device)  # warm-up
    model.zero_grad(set_to_none=True)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step_once(model, inputs, dtype, device)
        model.zero_grad(set_to_none=True)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    if device.startswith("cuda"):
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    train_flops = 3 * forward_flops * batch_size * 2  # x2: FMA -> FLOPs, to compare with the matmul peak
    return {
        "model": name,
        "dtype": dtype_name,
        "batch": batch_size,
        "params_m": params / 1e6,
        "step_s": seconds,
        "images_per_s": batch_size / seconds,
        "peak_gib": peak_gib,
        "achieved_tflops": train_flops / seconds / 1e12,
    }


def run_interleaved(names: list[str], batch_size: int, rounds: int, dtype_name: str, device: str) -> dict:
    """All models in this process, one timed step each per round, in alternating order.

    On a shared or throttling machine, back-to-back runs of one model and then the other can differ by 30%
    from drift alone; alternating steps exposes every model to the same drift, and the per-round ratio
    against the first model cancels most of it."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    models = {name: build(name).to(device).train() for name in names}
    x = torch.randn(batch_size, 4, 32, 32, device=device)
    inputs = (
        x,
        torch.randint(0, 1000, (batch_size,), device=device).float(),
        torch.randint(0, 1000, (batch_size,), device=device),
    )
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for model in models.values():  # warm-up
        step_once(model, inputs, dtype, device)
        model.zero_grad(set_to_none=True)
    for round_index in range(rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            step_once(models[name], inputs, dtype, device)
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
            models[name].zero_grad(set_to_none=True)
    first = names[0]
    result = {}
    for name in names:
        ratios = sorted(seconds[first][i] / seconds[name][i] for i in range(rounds))
        ordered = sorted(seconds[name])
        result[name] = {
            "median_step_s": ordered[rounds // 2],
            "min_step_s": ordered[0],
            "images_per_s": batch_size / ordered[rounds // 2],
            f"speed_vs_{first}": ratios[rounds // 2],
            "steps_s": seconds[name],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["DiffiT-XL/2", "DiT-XL/2", "DiffiT-B/2", "DiT-B/2"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--interleave",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead of one subprocess per model: all models in one process, ROUNDS alternating "
        "timed steps each, median images/s and the median per-round speed ratio to the "
        "first model (robust to machine drift; no per-model peak memory)",
    )
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single:
        print(json.dumps(run_single(args.single, args.batch_size, args.steps, args.dtype, args.device)))
        return

    peaks = {"fp32": matmul_peak(torch.float32, args.device)}
    bf16_peak = matmul_peak(torch.bfloat16, args.device)
    peaks["bf16"] = bf16_peak
    dtypes = ["fp32"] + (["bf16"] if bf16_peak and bf16_peak > peaks["fp32"] else [])
    print(
        f"# model_step  {time.strftime('%Y-%m-%d')}  {platform.processor() or platform.machine()}  "
        f"device={args.device}  threads={torch.get_num_threads()}  torch {torch.__version__}"
    )
    for name, peak in peaks.items():
        print(f"matmul peak {name}: {peak / 1e12:.3f} TFLOP/s" if peak else f"matmul peak {name}: n/a")
    if "bf16" not in dtypes:
        print("bf16 skipped: its measured matmul peak is not above fp32 on this machine")
    print()
    if args.interleave:
        print(f"interleaved: {args.interleave} alternating rounds per dtype, batch {args.batch_size}")
        print()
        print(
            f"| model | dtype | median step (s) | min step (s) | images/s | speed vs {args.models[0]} (median of "
            f"per-round ratios) |"
        )
        print("|---|---|---|---|---|---|")
        for dtype_name in dtypes:
            result = run_interleaved(args.models, args.batch_size, args.interleave, dtype_name, args.device)
            for name, row in result.items():
                ratio = row[f"speed_vs_{args.models[0]}"]
                print(
                    f"| {name} | {dtype_name} | {row['median_step_s']:.2f} | {row['min_step_s']:.2f} | "
                    f"{row['images_per_s']:.3f} | {ratio:.3f} |",
                    flush=True,
                )
        return
    print("| model | dtype | batch | params (M) | step (s) | images/s | peak mem (GiB) | TFLOP/s | % of matmul peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype_name in dtypes:
        for name in args.models:
            command = [
                sys.executable,
                __file__,
                "--single",
                name,
                "--batch-size",
                str(args.batch_size),
                "--steps",
                str(args.steps),
                "--device",
                args.device,
                "--dtype",
                dtype_name,
            ]
            result = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
            if result.returncode:
                print(f"| {name} | {dtype_name} | failed: {result.stderr.strip().splitlines()[-1]} |")
                continue
            row = json.loads(result.stdout.strip().splitlines()[-1])
            fraction = row["achieved_tflops"] * 1e12 / peaks[dtype_name]
            print(
                f"| {name} | {dtype_name} | {row['batch']} | {row['params_m']:.1f} | {row['step_s']:.2f} | "
                f"{row['images_per_s']:.3f} | {row['peak_gib']:.2f} | {row['achieved_tflops']:.3f} | "
                f"{100 * fraction:.0f}% |"
            )


if __name__ == "__main__":
    main()
