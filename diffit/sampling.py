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
  in the config's preconditioning (`make_precond(config.precond, model, sigma_data)`: EDM's, or VP / VE, whose
  sigma range clips the Heun grid as EDM's generate.py does). A `diffit.edm.Precond` instance (`EDMPrecond`,
  `VPPrecond`, `VEPrecond`) is also accepted and used as it is. Sampler: "edm-heun" only.
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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .diffusion import create_diffusion, randn_per_sample
from .edm import ADMDenoiser, Precond, edm_heun_sampler, make_precond
from .flow import flow_sample
from .guidance import (
    AutoGuidance,
    ClassifierFreeGuidance,
    GuidanceConfig,
    sigma_progress,
    timestep_progress,
)
from .progress import progress_bar
from .sampling_config import (
    FLOW_DEFAULT_STEPS,
    GUIDANCE_SETTINGS,
    KINDS,
    PIXEL_QUANTIZATIONS,
    SAMPLERS,
    SETTINGS,
    SamplingConfig,
    check_settings,
    network_evaluations,
    paper_sampling_config,
    to_uint8,
)

# The settings live in `diffit.sampling_config`; they are public here too (`diffit.sampling.SamplingConfig`), the
# module that runs them.
__all__ = [
    "FLOW_DEFAULT_STEPS",
    "GUIDANCE_SETTINGS",
    "KINDS",
    "PIXEL_QUANTIZATIONS",
    "SAMPLERS",
    "SETTINGS",
    "CountingModel",
    "SamplingConfig",
    "SamplingStats",
    "check_settings",
    "eval_mode",
    "network_evaluations",
    "paper_sampling_config",
    "sample",
    "sample_with_stats",
    "to_uint8",
]


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
    if config.kind == "edm" and not isinstance(model, Precond):
        network = make_precond(config.precond, model, sigma_data=config.sigma_data)
    counted = CountingModel(network, synchronize=device.type == "cuda")
    guide_counted = None
    if guide is not None:
        wrap = config.kind == "edm" and not isinstance(guide, Precond)  # preconditioned like the main network
        guide_network = make_precond(config.precond, guide, sigma_data=config.sigma_data) if wrap else guide
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
