"""The GPU check of issue 16: one script, at most ~8 minutes on one H100 / H200, one markdown table.

    python bench/device_check.py                         # on a GPU machine (CUDA)
    python bench/device_check.py --device cpu --quick    # CI smoke run: tiny sizes, well under a minute

Sections, one group of rows each (a section that fails prints its error in its row; the others still run):

1. tests      `pytest -m cuda` on the test files that hold CUDA-marked tests (all skipped without CUDA).
2. attention  The TMSA attention core at DiffiT-XL/2's shape (16 heads, 16x16 tokens, head dim 72), forward +
              backward with a trainable bias, variants timed interleaved: SDPA's memory-efficient kernel and
              SDPA's cuDNN kernel with the bias as a float mask, SDPA's default dispatch (diffit's "sdpa" backend),
              FlexAttention with the bias as a compiled score_mod (diffit's "flex" backend), and SDPA without bias
              (flash: the ceiling a DiT layer gets). On CPU: no CUDA kernels, FlexAttention forward only (eager).
3. train      Forward + backward of DiffiT-XL/2 and of a DiT-XL/2 built here (adaLN-Zero, same width, depth,
              heads and patch; bench/model_step.py), bf16 autocast and TF32, at the largest power-of-two batch
              both fit (doubling search), timed in alternating order; images/s, the speed ratio, MFU (3x the
              forward FLOPs `diffit.models.count_flops` counts, at 2 FLOPs per multiply-add, over the GPU's dense
              bf16 peak from its data sheet, or the measured matmul peak where the GPU is not listed) and peak
              memory per model.
4. vae        The SD-VAE architecture (random-init AutoencoderKL: block_out_channels (128, 256, 512, 512),
              layers_per_block 2, latent_channels 4) at 256 px, channels-last: encode images/s in fp16 and bf16
              (and how many outputs were not finite), decode images/s in bf16.
5. sampling   DDIM-50 with classifier-free guidance (scale 4, conditional and unconditional halves in one
              forward), bf16 autocast: images/s of DiffiT-XL/2 latents, and the projected time of the paper's
              evaluation (50k samples, DDPM-250 with guidance, plus bf16 VAE decode) on 8 such GPUs.
6. compiled   (CUDA, optional) the train section again with `torch.compile` of both models, in a subprocess
              bounded by what is left of --budget-s.

The GPU figures go into docs/benchmarks.md with the GPU name, date and command (the header line).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/model_step.py: the DiT and the matmul probe

from model_step import DiT, matmul_peak  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks (TFLOP/s) from NVIDIA's data sheets, most specific name first.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("A10G", 70.0),
    ("L4", 121.0),
)


@dataclass
class Row:
    """One line of the table."""

    section: str
    variant: str
    batch: str
    value: str
    unit: str
    notes: str = ""


@dataclass
class Settings:
    """Sizes for a full GPU run or a --quick smoke run."""

    device: str
    quick: bool
    dtype: torch.dtype
    budget_s: float
    started: float = field(default_factory=time.perf_counter)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_s(fn: Callable[[], object], device: str) -> float:
    """Wall seconds of fn(), the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(variants: dict[str, Callable[[], object]], rounds: int, device: str) -> dict[str, float]:
    """Median seconds per variant over `rounds` rounds, one call of each per round, order alternating per round
    (every variant sees the same drift of a shared or throttling machine). Each variant is warmed up twice."""
    for fn in variants.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            times[name].append(timed_s(variants[name], device))
    return {name: statistics.median(values) for name, values in times.items()}


def error_text(error: BaseException) -> str:
    """One line for a table cell."""
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return (text[:120] + "...") if len(text) > 120 else text


def autocast(settings: Settings):
    return torch.autocast(
        "cuda" if settings.cuda else "cpu", dtype=settings.dtype, enabled=settings.dtype != torch.float32
    )


# ---------------------------------------------------------------------------------------------------------------
# 1. CUDA-marked tests
# ---------------------------------------------------------------------------------------------------------------


def cuda_test_files() -> list[str]:
    """Test files that mark tests with `pytest.mark.cuda` (a text search: no test module is imported here)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py") if "mark.cuda" in p.read_text())


def run_cuda_tests(settings: Settings) -> list[Row]:
    files = cuda_test_files()
    command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
    try:
        result = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=max(60.0, settings.left_s() / 2.5)
        )
    except subprocess.TimeoutExpired:
        return [Row("tests", "pytest -m cuda", "", "timed out", "", f"{len(files)} files")]
    summary = [line for line in result.stdout.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    value = summary[-1].strip("= ") if summary else f"exit {result.returncode}"
    notes = f"{len(files)} files; exit {result.returncode}"
    if result.returncode not in (0, 5):  # 5: nothing collected
        failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        notes += "; " + "; ".join(failed[:3])
    return [Row("tests", "pytest -m cuda", "", value, "", notes)]


# ---------------------------------------------------------------------------------------------------------------
# 2. Attention variants
# ---------------------------------------------------------------------------------------------------------------


def sdpa_pinned(backend_name: str, q, k, v, mask):
    """SDPA restricted to one kernel (EFFICIENT_ATTENTION, CUDNN_ATTENTION, FLASH_ATTENTION)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, backend_name)]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_variants(settings: Settings, q, k, v, bias) -> dict[str, tuple[Callable[[], torch.Tensor], str]]:
    """name -> (forward, note). On CPU the CUDA kernels are left out and FlexAttention runs forward only."""
    from diffit.layers import attention_with_bias, flex_attention_with_bias

    mask = lambda: bias.to(q.dtype).unsqueeze(0)  # noqa: E731 - what attention_with_bias passes to SDPA
    variants = {
        "SDPA default dispatch, bias as float mask (backend sdpa)": (lambda: attention_with_bias(q, k, v, bias), "")
    }
    if settings.cuda:
        variants["SDPA memory-efficient kernel, bias as float mask"] = (
            lambda: sdpa_pinned("EFFICIENT_ATTENTION", q, k, v, mask()),
            "",
        )
        variants["SDPA cuDNN kernel, bias as float mask"] = (
            lambda: sdpa_pinned("CUDNN_ATTENTION", q, k, v, mask()),
            "",
        )
        variants["FlexAttention, bias as score_mod, compiled (backend flex)"] = (
            lambda: attention_with_bias(q, k, v, bias, backend="flex"),
            "",
        )
        variants["SDPA flash kernel, no bias (ceiling)"] = (lambda: sdpa_pinned("FLASH_ATTENTION", q, k, v, None), "")
    else:
        variants["FlexAttention, bias as score_mod, eager"] = (
            lambda: flex_attention_with_bias(q, k, v, bias, compiled=False),
            "forward only: no FlexAttention backward on CPU",
        )
        variants["SDPA, no bias (ceiling)"] = (lambda: F.scaled_dot_product_attention(q, k, v), "")
    return variants


def run_attention(settings: Settings) -> list[Row]:
    batch, heads, window, head_dim = (2, 2, 4, 32) if settings.quick else (64, 16, 16, 72)
    tokens = window**2
    dtype = settings.dtype if settings.cuda else torch.float32
    generator = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, tokens, head_dim, generator=generator).to(settings.device, dtype).requires_grad_()
        for _ in range(3)
    )
    bias = (0.1 * torch.randn(heads, tokens, tokens, generator=generator)).to(settings.device).requires_grad_()
    out_grad = torch.randn(q.shape, generator=generator).to(settings.device, dtype)
    steps, notes = {}, {}
    for name, (forward, note) in attention_variants(settings, q, k, v, bias).items():
        if note.startswith("forward only"):
            steps[name] = lambda forward=forward: _no_grad_call(forward)
        else:
            steps[name] = lambda forward=forward: forward().backward(out_grad)
        notes[name] = note
    rows, working = [], {}
    for name, step in steps.items():  # a kernel that cannot run this shape gets an error row, not a crash
        try:
            step()
            working[name] = step
        except Exception as error:  # noqa: BLE001 - report any kernel refusal in the table
            rows.append(Row("attention", name, str(batch), "n/a", "", error_text(error)))
    medians = interleaved_medians(working, rounds=5 if settings.quick else 20, device=settings.device)
    shape = f"{heads} heads, {tokens} tokens, head dim {head_dim}, {str(dtype).removeprefix('torch.')}"
    for name, seconds in medians.items():
        note = "; ".join(part for part in (notes[name] or "forward + backward", shape) if part)
        rows.append(Row("attention", name, str(batch), f"{seconds * 1e3:.3f}", "ms", note))
    return rows


def _no_grad_call(forward):
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return forward()


# ---------------------------------------------------------------------------------------------------------------
# 3. Training step: DiffiT-XL/2 vs DiT-XL/2
# ---------------------------------------------------------------------------------------------------------------


def train_models(settings: Settings) -> dict[str, Callable[[], torch.nn.Module]]:
    """name -> builder; the DiT comes last (the reference of the speed ratios). On CUDA DiffiT also runs with its
    FlexAttention backend. Quick: DiffiT-Tiny/2-sized models (depth 2, width 64, 2 heads, 8x8 latents)."""
    from diffit.layers import set_attention_backend
    from diffit.models import LATENT_SIZES, create_model

    if settings.quick:
        models = {"DiffiT-Tiny/2": lambda: create_model("DiffiT-Tiny/2")}
        if settings.cuda:
            models["DiffiT-Tiny/2 flex"] = lambda: set_attention_backend(create_model("DiffiT-Tiny/2"), "flex")
        return {**models, "DiT-Tiny/2": lambda: DiT(2, 64, 2, patch=2, input_size=8, num_classes=10)}
    depth, hidden, heads = LATENT_SIZES["XL"]
    models = {"DiffiT-XL/2": lambda: create_model("DiffiT-XL/2")}
    if settings.cuda:
        models["DiffiT-XL/2 flex"] = lambda: set_attention_backend(create_model("DiffiT-XL/2"), "flex")
    return {**models, "DiT-XL/2": lambda: DiT(depth, hidden, heads, patch=2)}


def train_inputs(model: torch.nn.Module, batch: int, device: str):
    generator = torch.Generator().manual_seed(batch)
    size, channels = model.input_size, model.in_channels
    x = torch.randn(batch, channels, size, size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator).float()
    y = torch.randint(0, model.num_classes, (batch,), generator=generator)
    return tuple(tensor.to(device, non_blocking=True) for tensor in (x, t, y))


def train_step(model: torch.nn.Module, inputs, settings: Settings) -> None:
    """One forward + backward (no optimizer), bf16 autocast on CUDA."""
    with autocast(settings):
        out = model(*inputs)
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def largest_batch(models: dict[str, torch.nn.Module], settings: Settings) -> int:
    """Largest power of two for which one step of every model fits (doubling until out of memory)."""
    batch, best, limit = (2, 0, 8) if settings.quick or not settings.cuda else (8, 0, 4096)
    while batch <= limit:
        try:
            for model in models.values():
                train_step(model, train_inputs(model, batch, settings.device), settings)
            synchronize(settings.device)
            best, batch = batch, batch * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            if settings.cuda:
                torch.cuda.empty_cache()
    if not best:
        raise RuntimeError(f"not even a batch of {2 if settings.quick else 8} fits")
    return best


def peak_flops(settings: Settings) -> tuple[float, str]:
    """(FLOP/s, where it comes from) the MFU is computed against."""
    if settings.cuda:
        name = torch.cuda.get_device_name()
        for key, tflops in BF16_PEAK_TFLOPS:
            if key in name:
                return tflops * 1e12, f"{name} dense bf16 peak {tflops:g} TFLOP/s (data sheet)"
    measured = matmul_peak(settings.dtype, settings.device, budget_s=2.0 if settings.quick else 10.0)
    return measured, f"measured {str(settings.dtype).removeprefix('torch.')} matmul peak {measured / 1e12:.3f} TFLOP/s"


def run_train(settings: Settings, compiled: bool = False, batch: int | None = None) -> list[Row]:
    """Rows of the train section; `batch` None: the largest power of two that fits (search)."""
    from diffit.layers import set_attention_backend
    from diffit.models import count_flops

    builders = train_models(settings)
    forward_flops = {}
    for name, build in builders.items():
        with torch.device("meta"):  # counted on SDPA's math path; count_flops counts multiply-adds, hence 2x
            forward_flops[name] = 2 * count_flops(set_attention_backend(build(), "sdpa"))["total"]
    torch.manual_seed(0)
    models = {name: build().to(settings.device).train() for name, build in builders.items()}
    if compiled:
        models = {name: torch.compile(model, dynamic=False) for name, model in models.items()}
    batch = batch or largest_batch(models, settings)
    inputs = {name: train_inputs(model, batch, settings.device) for name, model in models.items()}
    peaks: dict[str, float] = {}

    def step(name):
        if settings.cuda:
            torch.cuda.reset_peak_memory_stats()
        train_step(models[name], inputs[name], settings)
        if settings.cuda:
            peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)

    rounds = 3 if settings.quick else 8
    medians = interleaved_medians({name: lambda name=name: step(name) for name in models}, rounds, settings.device)
    peak, peak_source = peak_flops(settings)
    label = "train (compiled)" if compiled else "train"
    rows = []
    for name, seconds in medians.items():
        mfu = 3 * forward_flops[name] * batch / seconds / peak
        memory = f"peak {peaks[name]:.1f} GiB" if name in peaks else "peak memory: CUDA only"
        rows.append(
            Row(
                label,
                f"{name} fwd+bwd",
                str(batch),
                f"{batch / seconds:.1f}",
                "images/s",
                f"MFU {100 * mfu:.1f}%; {memory}",
            )
        )
    *diffit_names, dit = list(medians)
    for name in diffit_names:
        ratio = medians[dit] / medians[name]
        rows.append(Row(label, f"{name} / {dit} images/s", str(batch), f"{ratio:.3f}", "x", f"MFU vs {peak_source}"))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 4. SD-VAE encode / decode
# ---------------------------------------------------------------------------------------------------------------


def sd_vae(settings: Settings):
    """Random-init AutoencoderKL with the SD VAE's architecture (quick: a two-block tiny one)."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting a random-init VAE with .to(dtype) is intended here
    torch.manual_seed(0)
    if settings.quick:
        config = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4)
    else:
        config = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
    blocks = len(config["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        norm_num_groups=32,
        **config,
    )
    return vae.eval().requires_grad_(False)


def time_encode(vae, images: torch.Tensor, dtype: torch.dtype, settings: Settings) -> Row:
    """Encode images/s of `vae` cast to `dtype` (channels-last), and how many posteriors were not finite (the SD
    VAE's known fp16 overflow shows up here)."""
    name, batch, size = str(dtype).removeprefix("torch."), images.shape[0], images.shape[-1]
    try:
        vae = vae.to(settings.device, dtype).to(memory_format=torch.channels_last)
        x = images.to(dtype)
        latents: list[torch.Tensor] = []

        def encode():
            with torch.inference_mode():
                posterior = vae.encode(x).latent_dist
                latents[:] = [posterior.mean, posterior.std]

        seconds = interleaved_medians({"encode": encode}, rounds=3, device=settings.device)["encode"]
    except Exception as error:  # noqa: BLE001 - e.g. a dtype the CPU build cannot convolve
        return Row("vae", f"SD-VAE encode {name}", str(batch), "n/a", "", error_text(error))
    bad = int(sum((~torch.isfinite(t)).any(dim=(1, 2, 3)).sum().item() for t in latents))
    note = f"{size} px, channels-last; {bad} of {batch} outputs not finite"
    return Row("vae", f"SD-VAE encode {name}", str(batch), f"{batch / seconds:.1f}", "images/s", note)


def run_vae(settings: Settings) -> list[Row]:
    batch, size = (4, 32) if settings.quick else (64, 256)
    vae = sd_vae(settings)
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 3, size, size, generator=generator) * 2 - 1).to(settings.device)
    images = images.contiguous(memory_format=torch.channels_last)
    rows = [time_encode(vae, images, dtype, settings) for dtype in (torch.float16, torch.bfloat16)]
    decoder = vae.to(settings.device, torch.bfloat16)
    latent_size = size // 2 ** (len(vae.config.block_out_channels) - 1)
    z = torch.randn(batch, 4, latent_size, latent_size, generator=generator).to(settings.device, torch.bfloat16)

    def decode():
        with torch.inference_mode():
            decoder.decode(z)

    seconds = interleaved_medians({"decode": decode}, rounds=3, device=settings.device)["decode"]
    rows.append(Row("vae", "SD-VAE decode bfloat16", str(batch), f"{batch / seconds:.1f}", "images/s", f"{size} px"))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 5. Sampling
# ---------------------------------------------------------------------------------------------------------------


def run_sampling(settings: Settings, decode_rate: float | None) -> list[Row]:
    from diffit.guidance import GuidanceConfig
    from diffit.models import create_model
    from diffit.sampling import sample_with_stats
    from diffit.sampling_config import SamplingConfig

    name, batch = ("DiffiT-Tiny/2", 4) if settings.quick else ("DiffiT-XL/2", 256)
    torch.manual_seed(0)
    model = create_model(name).to(settings.device).eval()
    shape = (model.in_channels, model.input_size, model.input_size)
    config = SamplingConfig(sampler="ddim", steps=50, guidance=GuidanceConfig(scale=4.0), generator_device=None)
    labels = [i % model.num_classes for i in range(batch)]
    with autocast(settings):
        sample_with_stats(model, shape, labels[:2], [0, 1], config, steps=2, device=settings.device)  # warm-up
        synchronize(settings.device)
        _, stats = sample_with_stats(model, shape, labels, list(range(batch)), config, device=settings.device)
    rate = batch / stats.total_time_s
    dtype = "bf16 autocast" if settings.dtype == torch.bfloat16 else str(settings.dtype).removeprefix("torch.")
    rows = [
        Row(
            "sampling",
            f"{name} DDIM-50, CFG 4.0 (one doubled batch per step)",
            str(batch),
            f"{rate:.2f}",
            "images/s",
            f"{dtype}; latents only; {stats.network_calls} network calls",
        )
    ]
    ddpm250_rate = rate * 50 / 250  # the same batched forward per step, 5x the steps
    per_image_s = 1 / ddpm250_rate + (1 / decode_rate if decode_rate else 0.0)
    hours = 50_000 * per_image_s / 8 / 3600
    note = "from the DDIM-50 rate x 50/250" + (" + bf16 VAE decode" if decode_rate else "; decode not measured")
    rows.append(Row("sampling", "50k samples DDPM-250 + CFG on 8 GPUs (projected)", "", f"{hours:.2f}", "hours", note))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 6. Compiled training step (subprocess, bounded by the budget)
# ---------------------------------------------------------------------------------------------------------------


def run_compiled_train(settings: Settings, batch: int) -> list[Row]:
    """The train section with both models compiled, at the eager section's batch, in a subprocess that is
    stopped when the budget runs out (compilation time is not known in advance)."""
    left = settings.left_s() - 20
    if left < 60:
        return [Row("train (compiled)", "torch.compile of both models", "", "skipped", "", "time budget spent")]
    command = [sys.executable, __file__, "--device", settings.device, "--only-compiled-train", str(batch)]
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        return [Row("train (compiled)", "torch.compile of both models", "", "timed out", "", f"after {left:.0f} s")]
    if result.returncode:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return [Row("train (compiled)", "torch.compile of both models", "", "failed", "", tail[:120])]
    return [Row(**row) for row in json.loads(result.stdout.strip().splitlines()[-1])]


# ---------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------


def guarded(section: str, run: Callable[[], list[Row]]) -> list[Row]:
    """A section's rows, or one row with its error (the other sections still run)."""
    started = time.perf_counter()
    try:
        rows = run()
    except Exception as error:  # noqa: BLE001 - the table reports every failure
        rows = [Row(section, "failed", "", "n/a", "", error_text(error))]
    print(f"[device_check] {section}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return rows


def header(settings: Settings, argv: list[str]) -> str:
    if settings.cuda:
        machine = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    else:
        machine = (
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads={torch.get_num_threads()}"
        )
    command = "python bench/device_check.py " + " ".join(argv)
    line = f"# device_check  {time.strftime('%Y-%m-%d')}  {machine}  torch {torch.__version__}  `{command.strip()}`"
    return line + ("\n\n--quick: tiny sizes, a plumbing check; its figures mean nothing" if settings.quick else "")


def markdown(rows: list[Row]) -> str:
    lines = ["| section | variant | batch | value | unit | notes |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.section} | {r.variant} | {r.batch} | {r.value} | {r.unit} | {r.notes} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget; optional parts stop at it")
    parser.add_argument(
        "--skip", nargs="*", default=[], help="sections to leave out (tests attention train vae sampling compiled)"
    )
    parser.add_argument("--only-compiled-train", type=int, metavar="BATCH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    settings = Settings(args.device, args.quick, torch.bfloat16 if cuda else torch.float32, args.budget_s)
    if args.only_compiled_train:
        rows = run_train(settings, compiled=True, batch=args.only_compiled_train)
        print(json.dumps([row.__dict__ for row in rows]))
        return
    rows: list[Row] = []
    sections = {
        "tests": lambda: run_cuda_tests(settings),
        "attention": lambda: run_attention(settings),
        "train": lambda: run_train(settings),
        "vae": lambda: run_vae(settings),
    }
    for name, run in sections.items():
        if name not in args.skip:
            rows += guarded(name, run)
    decode = [r for r in rows if r.variant == "SD-VAE decode bfloat16" and r.value != "n/a"]
    decode_rate = float(decode[0].value) if decode else None
    if "sampling" not in args.skip:
        rows += guarded("sampling", lambda: run_sampling(settings, decode_rate))
    train_batches = [int(r.batch) for r in rows if r.section == "train" and r.batch]
    if cuda and not args.quick and "compiled" not in args.skip and train_batches:
        rows += guarded("compiled", lambda: run_compiled_train(settings, train_batches[0]))
    print(header(settings, sys.argv[1:]))
    print()
    print(markdown(rows))
    if not math.isfinite(settings.left_s()) or settings.left_s() < 0:
        print(f"\n(over the {settings.budget_s:.0f} s budget by {-settings.left_s():.0f} s)")


if __name__ == "__main__":
    main()
