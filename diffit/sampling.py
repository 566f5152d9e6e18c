"""The one sampling entry point used by training previews and evaluation: `sample(...)`.

    config = SamplingConfig(sampler="ddpm", steps=250, guidance=GuidanceConfig(scale=4.6, schedule="power-cosine"))
    images = sample(model, (4, 32, 32), class_labels, seeds, config)     # or sample(..., sampler="ddim", steps=50)

Model kinds
* kind="adm": `model` is the raw latent eps/Sigma network, `model(x, t, class_labels)` with t the ADM timestep
  as float [N]. Samplers: "ddpm" (ancestral, ADM/DiT p_sample with the learned Sigma), "ddim" (eta
  configurable) -- both on `steps` evenly respaced timesteps of the `diffusion_steps`-step chain, as DiT's and
  DiffiT's sample.py (`timestep_respacing=str(steps)`, first and last timestep kept) -- and "edm-heun" (EDM's
  Heun solver through `ADMDenoiser`, sigma range clipped to the chain's [sigma_1..sigma_T] and EDM's
  [0.002, 80]).
* kind="edm": `model` is the raw image-space network `model(c_in x, c_noise, class_labels)`; `sample` wraps it
  in `EDMPrecond(model, sigma_data)`. An `EDMPrecond` instance is also accepted and used as it is. Sampler:
  "edm-heun" only.
* kind="flow": `model` predicts the velocity of the linear path `model(x_t, t, class_labels=...)`, t in [0, 1]
  with t = 1 the noise (`diffit.flow`). Samplers: "euler", "heun" (on linspace(1, 0, steps + 1), no correction on
  the last step) and "euler-maruyama" (REPA's SDE sampler), integrated in float64.

EDM-Heun is EDM's whole stochastic sampler (NVlabs/edm `generate.py`): deterministic with `S_churn = 0`; with
`S_churn > 0`, each step whose sigma lies in [S_min, S_max] is first raised by gamma = min(S_churn / steps,
sqrt(2) - 1) with fresh noise scaled by `S_noise` (EDM's ImageNet-64 setting: S_churn=40, S_min=0.05, S_max=50,
S_noise=1.003).

Determinism: sample i draws ALL its randomness (initial noise, every DDPM / DDIM(eta>0) / churn noise) from a
`torch.Generator` seeded with `seeds[i]`, so it does not depend on batch composition or order. By default the
generators live on the CPU, so a seed gives the same noise whatever device the network runs on (up to
floating-point differences of the network itself); `generator_device=None` puts them on the sampling device
instead (saves the CPU normal draws -- ~7 ns per element per step on the 2-core dev CPU -- on GPU runs; seeds are
then reproducible only on the same device type).

Guidance: `GuidanceConfig` (see `diffit.guidance`); the conditional and unconditional halves run in one
batched call, so guidance doubles the batch, never the number of network calls. For ADM models the schedule's
progress is 1 - t/diffusion_steps (exactly the released DiffiT code); for EDM models it is the position on the
Karras sigma grid. The model is put in eval mode for the run (label dropout off) and restored afterwards.

`sample_with_stats` returns the same tensor plus `SamplingStats` (network calls, time inside the network,
wall time), used by `bench/sampler_overhead.py`; for kind="edm" the counted call is the preconditioned
denoiser, whose few elementwise ops are counted as network time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .diffusion import create_diffusion, randn_per_sample
from .edm import ADMDenoiser, EDMPrecond, edm_heun_sampler
from .flow import FLOW_SAMPLERS, flow_sample
from .guidance import (
    SCHEDULES,
    AutoGuidance,
    ClassifierFreeGuidance,
    GuidanceConfig,
    guidance_channels,
    sigma_progress,
    timestep_progress,
)
from .progress import progress_bar

SAMPLERS = ("ddpm", "ddim", "edm-heun", *FLOW_SAMPLERS)
# Each sampling setting by its one name, as the CLI (--guidance-scale), training YAML (sample:, eval:), studies
# (evaluate:), config.json / model_index.json ("sampling") and metrics.json spell it (diffusers' names where they
# exist). Guidance settings are `GuidanceConfig` fields, flat as guidance_<field>.
GUIDANCE_SETTINGS = {
    "guidance_scale": "scale",
    "guidance_schedule": "schedule",
    "guidance_power": "power",
    "guidance_channels": "channels",
    "guidance_interval": "interval",
}
SETTINGS = ("sampler", "steps", *GUIDANCE_SETTINGS, "eta", "pixels")
KINDS = ("adm", "edm", "flow")
FLOW_DEFAULT_STEPS = 50
# How [-1, 1] samples become uint8 pixels (what the Inception network of FID sees):
#   "round":    clamp(127.5 x + 128, 0, 255) -> uint8, i.e. floor(127.5 x + 128): DiT's sample_ddp.py and EDM's
#               generate.py (nearest grey level, half-way values rounding up); the default for models trained here.
#   "truncate": clamp((x + 1) * 127.5, 0, 255) -> uint8, i.e. floor(127.5 x + 127.5): guided-diffusion's
#               image_sample.py and NVlabs/DiffiT's sample.py, the code behind the paper's FID 1.73.
# They differ by one grey level wherever frac(127.5 x + 127.5) >= 0.5 (x = 0: 128 vs 127).
PIXEL_QUANTIZATIONS = ("round", "truncate")


def to_uint8(images: torch.Tensor, quantization: str = "round") -> torch.Tensor:
    """[-1, 1] float images -> uint8 of the same shape, by `quantization` (one of PIXEL_QUANTIZATIONS)."""
    if quantization == "round":
        return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    if quantization == "truncate":
        return ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    raise ValueError(f"unknown pixel quantization {quantization!r}; expected one of {PIXEL_QUANTIZATIONS}")


@dataclass
class SamplingStats:
    """Counters of one sampling run: network calls (one per batched forward), time in them, wall time."""

    num_samples: int
    network_calls: int
    network_time_s: float
    total_time_s: float

    @property
    def overhead_time_s(self) -> float:
        """Wall time not spent inside network evaluations."""
        return self.total_time_s - self.network_time_s

    @property
    def overhead_fraction(self) -> float:
        """Overhead as a fraction of the total wall time."""
        return self.overhead_time_s / self.total_time_s if self.total_time_s > 0 else 0.0


class CountingModel(nn.Module):
    """Counts forward calls of the wrapped callable and the wall time spent in them.

    With `synchronize` (CUDA), the device is synchronised around each call so the time is the real compute time.
    """

    def __init__(self, model: Callable, synchronize: bool = False):
        super().__init__()
        self.model = model
        self.synchronize = synchronize
        self.calls = 0
        self.time_s = 0.0

    def forward(self, *args, **kwargs):
        """Call the wrapped model, counting the call and its duration."""
        if self.synchronize:
            torch.cuda.synchronize()
        start = time.perf_counter()
        output = self.model(*args, **kwargs)
        if self.synchronize:
            torch.cuda.synchronize()
        self.time_s += time.perf_counter() - start
        self.calls += 1
        return output


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Temporarily switch a module to eval mode (e.g. label dropout off), restoring its mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _resolve_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _prepare_labels(class_labels, num_samples: int, device: torch.device) -> torch.Tensor | None:
    if class_labels is None:
        return None
    labels = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
    if labels.numel() != num_samples:
        raise ValueError(f"got {labels.numel()} class labels for {num_samples} seeds; pass one label per seed")
    return labels


def _null_class(model: nn.Module) -> int:
    null_class = getattr(model, "null_class", None)
    if null_class is None:
        num_classes = getattr(model, "num_classes", 0)
        if not num_classes:
            raise ValueError(
                "guidance needs a class-conditional model (num_classes > 0 / a null_class "
                f"attribute); {type(model).__name__} has neither"
            )
        null_class = num_classes
    return int(null_class)


def network_evaluations(sampler: str, steps: int) -> int:
    """Network evaluations per sample of a sampler on `steps` steps: one per step for DDPM, DDIM, Euler and
    Euler-Maruyama; 2 * steps - 1 for Heun (EDM's and the flow one: no correction on the last step). Guidance
    runs both halves in one batched call, so it adds no evaluation."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    return 2 * int(steps) - 1 if sampler in ("edm-heun", "heun") else int(steps)


MAX_SETTING_STEPS = 100_000  # a request's steps (the ADM chain itself is bounded alike by config_check)


def check_settings(settings) -> None:
    """Sampling settings by name (`SETTINGS`, any subset; None: not given), each checked for type and range where
    it enters (the CLI, a study file, training YAML): ValueError "name: expected ..., got value" otherwise."""

    def need(ok: bool, name: str, value, expected: str) -> None:
        if not ok:
            text = repr(value)
            raise ValueError(f"{name}: {expected}, got {text if len(text) <= 60 else text[:57] + '...'}")

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    need(isinstance(settings, dict), "sampling", settings, "expected a mapping of sampling settings")
    for name in settings:
        need(name in SETTINGS, "sampling", name, f"expected settings among {', '.join(SETTINGS)}")
    given = {name: value for name, value in settings.items() if value is not None}
    if "sampler" in given:
        need(given["sampler"] in SAMPLERS, "sampler", given["sampler"], f"expected one of {', '.join(SAMPLERS)}")
    if "steps" in given:
        steps = given["steps"]
        ok = isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= MAX_SETTING_STEPS
        need(ok, "steps", steps, f"expected an integer in [1, {MAX_SETTING_STEPS}]")
    for name, low in (("guidance_scale", 0.0), ("guidance_power", 1e-6), ("eta", 0.0)):
        if name in given:
            need(number(given[name]), name, given[name], "expected a finite number")
            need(given[name] >= low, name, given[name], f"expected a number >= {low:g}")
    if "guidance_schedule" in given:
        schedule = given["guidance_schedule"]
        need(schedule in SCHEDULES, "guidance_schedule", schedule, f"expected one of {', '.join(SCHEDULES)}")
    if "guidance_channels" in given:
        try:
            guidance_channels(given["guidance_channels"])
        except ValueError:
            need(False, "guidance_channels", given["guidance_channels"], "expected 3 (DiffiT's), a count or 'all'")
    if "guidance_interval" in given:
        interval = given["guidance_interval"]
        pair = isinstance(interval, (list, tuple)) and len(interval) == 2
        need(pair, "guidance_interval", interval, "expected LOW,HIGH")
        for bound in interval:
            need(number(bound) and bound >= 0, "guidance_interval", interval, "expected finite numbers >= 0")
        need(interval[0] <= interval[1], "guidance_interval", interval, "expected LOW <= HIGH")
    if "pixels" in given:
        pixels = given["pixels"]
        need(pixels in PIXEL_QUANTIZATIONS, "pixels", pixels, f"expected one of {', '.join(PIXEL_QUANTIZATIONS)}")


@dataclass(frozen=True)
class SamplingConfig:
    """Every sampling setting in one place (the defaults are DiT's / DiffiT's ImageNet evaluation).

    sampler: "ddpm" | "ddim" | "edm-heun". steps: respaced chain length (ddpm / ddim) or Heun steps.
    guidance: classifier-free guidance (`GuidanceConfig`; None = off). kind: "adm" (latent eps/Sigma network) or
    "edm" (image-space network, wrapped in `EDMPrecond`). eta: DDIM noise. diffusion_steps / noise_schedule:
    the ADM training chain. learn_sigma: None = the model's attribute. clip_denoised: clamp x_0 predictions to
    [-1, 1] (image space; keep False for latents). sigma_min / sigma_max / rho: EDM Heun's grid. S_churn / S_min /
    S_max / S_noise: EDM's stochastic sampler (churn strength, the sigma range it applies to, noise inflation).
    sigma_data: EDM preconditioning. generator_device: "cpu" (seeds reproducible on any device) or None (the
    sampling device). pixels: how samples become uint8 images ("round" | "truncate", see `to_uint8`).
    """

    sampler: str = "ddpm"
    steps: int = 250
    guidance: GuidanceConfig | None = None
    kind: str = "adm"
    eta: float = 0.0
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    learn_sigma: bool | None = None
    clip_denoised: bool = False
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0
    sigma_data: float = 0.5
    generator_device: str | None = "cpu"
    pixels: str = "round"

    def check(self) -> None:
        """Raise ValueError for a combination no sampler accepts."""
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {SAMPLERS}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; expected one of {KINDS}")
        if self.kind == "edm" and self.sampler != "edm-heun":
            raise ValueError(f"kind='edm' models are sampled with sampler='edm-heun', got {self.sampler!r}")
        if (self.kind == "flow") != (self.sampler in FLOW_SAMPLERS):
            raise ValueError(
                f"flow models (kind='flow') are sampled with {', '.join(FLOW_SAMPLERS)} and those samplers sample "
                f"only flow models; got kind={self.kind!r}, sampler={self.sampler!r}"
            )
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.sampler in ("ddpm", "ddim") and self.steps < 2:
            raise ValueError(
                f"{self.sampler} needs steps >= 2: respacing to one step keeps only t=0, not a denoising chain"
            )
        if self.pixels not in PIXEL_QUANTIZATIONS:
            raise ValueError(f"unknown pixel quantization {self.pixels!r}; expected one of {PIXEL_QUANTIZATIONS}")
        for name in ("S_churn", "S_min", "S_max"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 (as in EDM's generate.py), got {getattr(self, name)}")

    def settings(self) -> dict:
        """The user-facing settings (`SETTINGS`, guidance flat as guidance_<field>) as JSON-ready values: what
        metrics.json, a sample store and a study record. Without guidance, `GuidanceConfig()`'s (scale 1: off)."""
        guidance = self.guidance or GuidanceConfig()
        values = {"sampler": self.sampler, "steps": self.steps}
        for name, field in GUIDANCE_SETTINGS.items():
            values[name] = getattr(guidance, field)
        if values["guidance_interval"] is not None:
            values["guidance_interval"] = list(values["guidance_interval"])
        return {**values, "eta": self.eta, "pixels": self.pixels}

    def with_settings(self, **settings) -> SamplingConfig:
        """A copy with settings replaced by their one name each (`SETTINGS`: `guidance_scale=4.6`,
        `guidance_channels="all"`, `steps=50`); guidance fields not named keep their values. ValueError names an
        unknown setting."""
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ValueError(f"unknown sampling settings {unknown}; expected some of {', '.join(SETTINGS)}")
        guided = {GUIDANCE_SETTINGS[name]: settings.pop(name) for name in list(settings) if name in GUIDANCE_SETTINGS}
        if "channels" in guided:
            guided["channels"] = guidance_channels(guided["channels"])
        if guided.get("interval") is not None:
            guided["interval"] = tuple(guided["interval"])
        guidance = dataclasses.replace(self.guidance or GuidanceConfig(), **guided) if guided else self.guidance
        return dataclasses.replace(self, guidance=guidance, **settings)

    def to_dict(self) -> dict:
        """JSON-ready dict of every field, guidance flat by its setting names (absent when guidance is None), an
        infinite S_max as "inf"; `from_dict` reads it back (model_index.json's "sampling")."""
        values = {item.name: getattr(self, item.name) for item in dataclasses.fields(self) if item.name != "guidance"}
        if math.isinf(values["S_max"]):
            values["S_max"] = "inf"
        if self.guidance is not None:
            values.update({name: self.settings()[name] for name in GUIDANCE_SETTINGS})
        return values

    @classmethod
    def from_dict(cls, values: dict) -> SamplingConfig:
        """Inverse of `to_dict`; unknown keys are an error (a typo must not be ignored silently). The nested form
        saved before one name per setting ({"guidance": {"scale": ...}}) is read as well."""
        values = dict(values)
        nested = values.pop("guidance", None)
        if isinstance(nested, dict):  # model_index.json written before the flat names
            values.update({f"guidance_{field}": value for field, value in nested.items()})
        fields = {item.name for item in dataclasses.fields(cls)} - {"guidance"}
        unknown = set(values) - fields - set(GUIDANCE_SETTINGS)
        if unknown:
            raise ValueError(f"unknown sampling settings {sorted(unknown)}")
        if "S_max" in values:
            values["S_max"] = float(values["S_max"])
        guided = {name: values.pop(name) for name in list(values) if name in GUIDANCE_SETTINGS}
        config = cls(**values)
        return config.with_settings(**guided) if guided else config


def paper_sampling_config(diffusion: dict | None, resolution: int, num_classes: int) -> SamplingConfig:
    """The paper's sampling settings for an exported model (the defaults `diffit-pipe evaluate` resolves).

    `diffusion` is the export's "diffusion" entry ({"type": "adm", "diffusion_steps", "noise_schedule"} or
    {"type": "edm", "sigma_data"}; None = ADM's linear 1000-step chain). ADM models: DDPM with 250 steps; guidance
    4.6 with the power-cosine schedule for class-conditional models at 256 px, 1.49 constant at 512 px, none
    otherwise. EDM models: EDM-Heun with 18 steps up to 32 px, 40 above, unguided. Flow models (beyond the
    paper): Heun with `FLOW_DEFAULT_STEPS` steps, unguided.
    """
    diffusion = diffusion or {"type": "adm"}
    if diffusion.get("type") == "flow":  # no paper setting: Heun on 50 steps (99 network calls), unguided
        return SamplingConfig(sampler="heun", steps=FLOW_DEFAULT_STEPS, kind="flow")
    if diffusion.get("type", "adm") == "edm":
        return SamplingConfig(
            sampler="edm-heun",
            steps=18 if resolution <= 32 else 40,
            kind="edm",
            sigma_data=float(diffusion.get("sigma_data", 0.5)),
        )
    guidance = GuidanceConfig()
    if num_classes and resolution == 256:
        guidance = GuidanceConfig(scale=4.6, schedule="power-cosine")
    elif num_classes and resolution == 512:
        guidance = GuidanceConfig(scale=1.49)
    return SamplingConfig(
        sampler="ddpm",
        steps=250,
        guidance=guidance,
        kind="adm",
        diffusion_steps=int(diffusion.get("diffusion_steps", 1000)),
        noise_schedule=str(diffusion.get("noise_schedule", "linear")),
    )


def sample(
    model: nn.Module,
    shape: Sequence[int],
    class_labels,
    seeds: Sequence[int],
    config: SamplingConfig | None = None,
    *,
    device=None,
    progress: bool | dict = False,
    guide: nn.Module | None = None,
    **overrides,
) -> torch.Tensor:
    """Generate len(seeds) samples of per-sample `shape` (C, H, W); returns float32 [N, C, H, W] on `device`.

    `class_labels`: [N] ints or None (unconditional). `seeds`: one int per sample. `config`: a
    `SamplingConfig`; keyword `overrides` replace its fields (`sample(..., sampler="ddim", steps=50)`).
    `guide`: autoguidance (`diffit.guidance.AutoGuidance`): a weaker network of the same kind and conditioning
    replaces the unconditional branch of the guidance. See the module docstring.
    """
    samples, _ = sample_with_stats(
        model, shape, class_labels, seeds, config, device=device, progress=progress, guide=guide, **overrides
    )
    return samples


def sample_with_stats(
    model: nn.Module,
    shape: Sequence[int],
    class_labels,
    seeds: Sequence[int],
    config: SamplingConfig | None = None,
    *,
    device=None,
    progress: bool | dict = False,
    guide: nn.Module | None = None,
    **overrides,
) -> tuple[torch.Tensor, SamplingStats]:
    """`sample(...)` that also returns `SamplingStats` (network calls and time, wall time; the guide's counted)."""
    config = dataclasses.replace(config or SamplingConfig(), **overrides)
    config.check()
    if len(seeds) == 0:
        raise ValueError("seeds is empty: pass one seed per sample")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"shape is per sample (C, H, W), got {shape}")

    start = time.perf_counter()
    device = _resolve_device(model, device)
    generator_device = device if config.generator_device is None else torch.device(config.generator_device)
    generators = [torch.Generator(device=generator_device).manual_seed(int(seed)) for seed in seeds]
    labels = _prepare_labels(class_labels, len(seeds), device)
    guidance = config.guidance or GuidanceConfig()
    if guidance.enabled and labels is None and guide is None:
        raise ValueError("guidance scale != 1 needs class_labels")
    initial_noise = randn_per_sample(generators, shape, device=device)
    network = model
    if config.kind == "edm" and not isinstance(model, EDMPrecond):
        network = EDMPrecond(model, sigma_data=config.sigma_data)
    counted = CountingModel(network, synchronize=device.type == "cuda")
    guide_counted = None
    if guide is not None:
        wrap = config.kind == "edm" and not isinstance(guide, EDMPrecond)  # preconditioned like the main network
        guide_network = EDMPrecond(guide, sigma_data=config.sigma_data) if wrap else guide
        guide_counted = CountingModel(guide_network, synchronize=device.type == "cuda")

    guide_mode = eval_mode(guide) if guide is not None else contextlib.nullcontext()
    with eval_mode(model), guide_mode, torch.no_grad():
        run = {"edm": _run_edm, "adm": _run_adm, "flow": _run_flow}[config.kind]
        samples = run(
            model, network, counted, initial_noise, labels, generators, config, guidance, progress, guide_counted
        )
    guide_calls, guide_time = (guide_counted.calls, guide_counted.time_s) if guide_counted else (0, 0.0)
    stats = SamplingStats(
        num_samples=len(seeds),
        network_calls=counted.calls + guide_calls,
        network_time_s=counted.time_s + guide_time,
        total_time_s=time.perf_counter() - start,
    )
    return samples.float(), stats


def _heun(denoiser, round_sigma, initial_noise, labels, generators, config, sigma_range, progress):
    """`edm_heun_sampler` with the config's grid and stochastic settings on the given sigma range."""
    return edm_heun_sampler(
        denoiser,
        initial_noise,
        labels,
        num_steps=config.steps,
        sigma_min=sigma_range[0],
        sigma_max=sigma_range[1],
        rho=config.rho,
        S_churn=config.S_churn,
        S_min=config.S_min,
        S_max=config.S_max,
        S_noise=config.S_noise,
        generators=generators,
        round_sigma=round_sigma,
        progress=progress,
    )


def _run_flow(model, network, counted, initial_noise, labels, generators, config, guidance, progress, guide=None):
    """A velocity network integrated from t = 1 to 0 (`diffit.flow.flow_sample`); guidance decided per step."""
    null_class = _null_class(model) if guidance.enabled and guide is None else None
    return flow_sample(
        counted,
        initial_noise,
        labels,
        generators,
        sampler=config.sampler,
        steps=config.steps,
        guidance=guidance,
        null_class=null_class,
        progress=progress,
        guide=guide,
    )


def _run_edm(model, denoiser, counted, initial_noise, labels, generators, config, guidance, progress, guide=None):
    """EDM Heun on the preconditioned image-space network; guidance progress is the position on the sigma grid."""
    sigma_min = max(config.sigma_min, denoiser.sigma_min)
    sigma_max = min(config.sigma_max, denoiser.sigma_max)
    progress_fn = lambda sigma: sigma_progress(sigma, sigma_min, sigma_max, config.rho)  # noqa: E731
    guided = _guided(counted, guidance, denoiser, progress_fn, sigma_fn=lambda sigma: sigma, guide=guide)
    sigma_range = (sigma_min, sigma_max)
    return _heun(guided, denoiser.round_sigma, initial_noise, labels, generators, config, sigma_range, progress)


def _run_adm(model, network, counted, initial_noise, labels, generators, config, guidance, progress, guide=None):
    """An ADM eps/Sigma network: DDPM / DDIM on the respaced chain, or EDM Heun through `ADMDenoiser`; guidance
    progress is 1 - t / diffusion_steps (the released DiffiT code)."""
    chain = create_diffusion(None, config.noise_schedule, learn_sigma=True, diffusion_steps=config.diffusion_steps)
    alphas = torch.as_tensor(chain.alphas_cumprod, dtype=torch.float64)
    sigmas = ((1.0 - alphas) / alphas).sqrt()

    def sigma_of_timestep(t: torch.Tensor) -> torch.Tensor:  # the training chain's sigma_t, for the interval
        index = t.detach().to(torch.float64).round().clamp(0, len(sigmas) - 1).long().cpu()
        return sigmas[index].to(t.device)

    progress_fn = lambda t: timestep_progress(t.to(torch.float64), config.diffusion_steps)  # noqa: E731
    guided = _guided(counted, guidance, model, progress_fn, sigma_fn=sigma_of_timestep, guide=guide)
    if config.sampler == "edm-heun":
        denoiser = ADMDenoiser(guided, chain.alphas_cumprod)
        sigma_range = (max(config.sigma_min, denoiser.sigma_min), min(config.sigma_max, denoiser.sigma_max))
        return _heun(denoiser, denoiser.round_sigma, initial_noise, labels, generators, config, sigma_range, progress)
    return _sample_adm_chain(
        guided,
        initial_noise,
        labels,
        generators,
        sampler=config.sampler,
        steps=config.steps,
        eta=config.eta,
        diffusion_steps=config.diffusion_steps,
        noise_schedule=config.noise_schedule,
        learn_sigma=_learn_sigma(model, config.learn_sigma),
        clip_denoised=config.clip_denoised,
        progress=progress,
    )


def _learn_sigma(model: nn.Module, learn_sigma: bool | None) -> bool:
    if learn_sigma is not None:
        return learn_sigma
    if not hasattr(model, "learn_sigma"):
        raise ValueError(f"{type(model).__name__} has no learn_sigma attribute: pass learn_sigma=True/False")
    return bool(model.learn_sigma)


def _guided(
    counted: CountingModel,
    guidance: GuidanceConfig,
    labelled_model: nn.Module,
    progress_fn: Callable,
    sigma_fn: Callable | None = None,
    guide: Callable | None = None,
) -> Callable:
    """The counted network, wrapped in classifier-free guidance when the scale is not 1, or in autoguidance with
    `guide` (`sigma_fn`: the noise level of a call, for the guidance interval)."""
    if not guidance.enabled:
        return counted
    if guide is not None:
        return AutoGuidance(counted, guide, guidance, progress_fn, sigma_fn)
    return ClassifierFreeGuidance(counted, guidance, _null_class(labelled_model), progress_fn, sigma_fn)


def _sample_adm_chain(
    model: Callable,
    initial_noise: torch.Tensor,
    labels: torch.Tensor | None,
    generators: Sequence[torch.Generator],
    *,
    sampler: str,
    steps: int,
    eta: float,
    diffusion_steps: int,
    noise_schedule: str,
    learn_sigma: bool,
    clip_denoised: bool,
    progress: bool | dict,
) -> torch.Tensor:
    """DDPM / DDIM loop over `steps` respaced timesteps, noise for sample i from generators[i]."""
    diffusion = create_diffusion(str(steps), noise_schedule, learn_sigma=learn_sigma, diffusion_steps=diffusion_steps)
    model_kwargs = {"class_labels": labels}
    x = initial_noise
    per_sample_shape = initial_noise.shape[1:]
    batch = initial_noise.shape[0]
    for index in progress_bar(range(diffusion.num_timesteps - 1, -1, -1), sampler, progress):
        t = torch.full((batch,), index, dtype=torch.long, device=x.device)
        if sampler == "ddpm":
            # Drawn at t=0 too (and masked there) so every sample consumes its generator identically.
            noise = randn_per_sample(generators, per_sample_shape, device=x.device)
            out = diffusion.p_sample(model, x, t, noise, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        else:
            noise = randn_per_sample(generators, per_sample_shape, device=x.device) if eta > 0 else None
            out = diffusion.ddim_sample(
                model, x, t, noise, eta=eta, clip_denoised=clip_denoised, model_kwargs=model_kwargs
            )
        x = out["sample"]
    return x
