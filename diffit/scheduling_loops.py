"""The sampling loops that run a DiffiT model with a diffusers scheduler (any scheduler but `DiffiTScheduler`, whose
project sampler `diffit.sampling.sample` runs instead), one per model kind, and the check that a scheduler drives
the model's kind. `DiffiTPipeline.check_scheduler` and the pipeline's call use them. Per kind:

* a DDPM-family scheduler with `alphas_cumprod` (every scheduler `DiTPipeline` accepts: DDIM, DDPM,
  DPM-Solver(++), UniPC, Euler, Heun, PNDM, LMS, ...): DiT's loop, for ADM (eps) models only. The scheduler's
  noise schedule must be the model's training chain and its prediction_type "epsilon" (checked at the call);
  a learned-Sigma model's 2C output channels are cut to the C eps channels unless the scheduler's variance_type
  is "learned" / "learned_range" (then it gets all 2C), as in DiT. Guidance is the stored guidance (schedule,
  power, guided channels) with `guidance_scale`, on one doubled batch per step; the scheduler state stays in
  float32 whatever the model's dtype. Settings only the project's sampler has (sampler, eta, S_churn, ...) are
  refused per call. A `clip_sample=True` scheduler (DDIMScheduler()'s default) clamps latents to [-1, 1]: build
  it from `pipe.scheduler.config` (clip_sample=False). Flow and EDM models refuse them.
* `FlowMatchEulerDiscreteScheduler` (any fixed `shift`, `stochastic_sampling` too): flow (velocity) models only.
  The initial noise is x at sigma = 1; the network gets t = sigma in [0, 1] (not the scheduler's timestep,
  sigma * num_train_timesteps) and its velocity is the model_output, so a step is x + (sigma_next - sigma) v.
  Guidance is the project's flow guidance (`diffit.flow.GuidedVelocity`: progress 1 - t, interval [low, high] of t).
  `use_dynamic_shifting` (a resolution-dependent mu the pipeline does not compute) and `invert_sigmas` are refused.
* `EDMEulerScheduler`, `EDMDPMSolverMultistepScheduler`: image-space EDM models only. The raw network F runs
  inside, the scheduler's functions precondition it: `scale_model_input` = EDM's c_in x, timesteps = EDM's
  c_noise = ln(sigma) / 4, and with prediction_type "epsilon" its step's `precondition_outputs` is EDM's
  D = c_skip x + c_out F (so EDMEulerScheduler is EDM's Euler on `EDMPrecond`); "v_prediction" (c_out negated) and
  "sample" are refused, and so is a scheduler whose sigma_data differs from the export's (no conversion). One
  conversion: the initial noise is scaled by the first grid sigma (EDM's x = sigma_max n), not by diffusers'
  `init_noise_sigma` = sqrt(sigma_max^2 + 1). Guidance mixes F's halves (D is affine in F with the same
  coefficients, so this is guiding D), progress on the scheduler's Karras grid, interval (low, high] of sigma.

The functions:

- `check_scheduler(scheduler, config, model)`: ValueError (one line, naming the scheduler to build) unless an ADM
  model has a DDPM-family scheduler on its training chain with epsilon prediction, a flow model
  `FlowMatchEulerDiscreteScheduler` with a fixed shift, an EDM model an EDM scheduler with its sigma_data;
- `sample_with_scheduler(scheduler, model, labels, seeds, config, device, progress_bar)`: sample i's initial noise
  and every stochastic step drawn from a generator seeded with seeds[i], the stored guidance on one doubled batch,
  then DiT's loop (`_adm_steps`), the flow-matching Euler loop (`_flow_steps`) or the EDM loop (`_edm_steps`).
"""

from __future__ import annotations

import inspect
import math

import torch
from diffusers import SchedulerMixin
from torch import nn

from .diffusion import create_diffusion, randn_per_sample
from .flow import GuidedVelocity
from .guidance import ClassifierFreeGuidance, GuidanceConfig, sigma_progress, timestep_progress
from .pipeline_loading import float32_network
from .sampling import eval_mode
from .sampling_config import SamplingConfig
from .scheduling_diffit import chain_scheduler_config, scheduler_kind

LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


def check_scheduler(scheduler: SchedulerMixin, config: SamplingConfig, model: str) -> None:
    """Raise ValueError (one line, naming the scheduler to build) unless `scheduler` (a diffusers scheduler)
    drives the model named `model` sampled with `config`: an ADM model a DDPM-family scheduler on its training chain
    with epsilon prediction, a flow model `FlowMatchEulerDiscreteScheduler` (fixed shift, sigmas from 1 to 0), an
    EDM model `EDMEulerScheduler` / `EDMDPMSolverMultistepScheduler` with the export's sigma_data and epsilon
    prediction (the module docstring)."""
    name = type(scheduler).__name__
    family = scheduler_kind(scheduler)
    if config.kind == "flow":
        _check_flow_scheduler(scheduler, name, model, family)
    elif config.kind == "edm":
        _check_edm_scheduler(scheduler, config, name, model, family)
    else:
        _check_adm_scheduler(scheduler, config, name, model, family)


def _check_adm_scheduler(scheduler, config: SamplingConfig, name: str, model: str, family: str) -> None:
    """An ADM model: a DDPM-family scheduler on the training chain, epsilon prediction."""
    remedy = "DPMSolverMultistepScheduler.from_config(DiffiTScheduler.for_sampling(pipe.sampling_config).config)"
    if family != "adm":
        what = "flow (velocity)" if family == "flow" else "EDM-preconditioned"
        raise ValueError(
            f"pipe.scheduler is a {name}, which drives {what} models, but this {model} is an ADM (eps) model: use "
            f"a DDPM-family scheduler on its training chain, e.g. pipe.scheduler = {remedy}"
        )
    if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"pipe.scheduler ({name}) predicts {scheduler.config.prediction_type!r}; DiffiT predicts eps")
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        raise ValueError(f"pipe.scheduler ({name}) has no alphas_cumprod: not a DDPM-family (DiT) scheduler")
    chain = create_diffusion(None, config.noise_schedule, diffusion_steps=config.diffusion_steps).alphas_cumprod
    alphas = torch.as_tensor(alphas, dtype=torch.float64).cpu()
    # diffusers builds its betas in float32, ADM in float64: they agree to ~1e-7.
    if alphas.shape != chain.shape or not torch.allclose(alphas, chain, rtol=1e-4, atol=1e-6):
        expected = chain_scheduler_config(config)
        raise ValueError(
            f"pipe.scheduler ({name}) has another noise schedule than the model's training chain {expected}; "
            f"build it with {name}.from_config(DiffiTScheduler.for_sampling(pipe.sampling_config).config)"
        )


def _check_flow_scheduler(scheduler, name: str, model: str, family: str) -> None:
    """A flow model: FlowMatchEulerDiscreteScheduler with a fixed shift, time running from noise (1) to 0."""
    if family != "flow":
        raise ValueError(
            f"pipe.scheduler is a {name}, but this {model} is a flow (velocity) model: of diffusers' schedulers "
            "only FlowMatchEulerDiscreteScheduler drives it: pipe.scheduler = "
            "FlowMatchEulerDiscreteScheduler(shift=1.0) (shift > 1: more steps near the noise), or "
            "pipe.scheduler = DiffiTScheduler() for the project's Euler, Heun, Euler-Maruyama"
        )
    if scheduler.config.get("use_dynamic_shifting"):
        raise ValueError(
            f"pipe.scheduler ({name}) has use_dynamic_shifting=True, whose resolution-dependent mu DiffiTPipeline "
            "does not compute: use a fixed shift, FlowMatchEulerDiscreteScheduler(shift=3.0)"
        )
    if scheduler.config.get("invert_sigmas"):
        raise ValueError(
            f"pipe.scheduler ({name}) has invert_sigmas=True (t = 0 is noise), but this {model} has t = 1 as "
            "noise: build it with FlowMatchEulerDiscreteScheduler(invert_sigmas=False)"
        )


def _check_edm_scheduler(scheduler, config: SamplingConfig, name: str, model: str, family: str) -> None:
    """An EDM model: EDMEulerScheduler / EDMDPMSolverMultistepScheduler preconditioning as the export's
    EDMPrecond (epsilon prediction, the export's sigma_data); a VP / VE-preconditioned model has other c_in and
    c_noise than these schedulers give, so none of them drives it."""
    sigma_data = float(config.sigma_data)
    if family == "edm" and config.precond != "edm":
        raise ValueError(
            f"pipe.scheduler is a {name}, but this {model} is trained with EDM's {config.precond.upper()} "
            "preconditioning, which diffusers' EDM schedulers do not compute (their c_in and c_noise are EDM's): "
            "pipe.scheduler = DiffiTScheduler() for the project's EDM-Heun"
        )
    if family != "edm":
        raise ValueError(
            f"pipe.scheduler is a {name}, but this {model} is an image-space EDM model: of diffusers' schedulers "
            f"only the EDM ones drive it: pipe.scheduler = EDMEulerScheduler(sigma_data={sigma_data}) or "
            f"EDMDPMSolverMultistepScheduler(sigma_data={sigma_data}), or pipe.scheduler = DiffiTScheduler() "
            "for the project's EDM-Heun"
        )
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(
            f"pipe.scheduler ({name}) has prediction_type={prediction!r}, whose output preconditioning is not "
            f"EDM's D = c_skip x + c_out F: build it with {name}(sigma_data={sigma_data}) (prediction_type "
            "'epsilon', which is EDM's)"
        )
    if not math.isclose(float(scheduler.config.sigma_data), sigma_data, rel_tol=1e-6):
        raise ValueError(
            f"pipe.scheduler ({name}) has sigma_data={scheduler.config.sigma_data}, but this {model} is "
            f"preconditioned with sigma_data={sigma_data}: build it with {name}(sigma_data={sigma_data})"
        )


def sample_with_scheduler(
    scheduler: SchedulerMixin, model: nn.Module, labels, seeds, config: SamplingConfig, device, progress_bar
) -> torch.Tensor:
    """`scheduler`'s loop for `model`'s kind (module docstring), its steps wrapped in `progress_bar` (the
    pipeline's): sample i's initial noise and every stochastic step draw from a generator seeded with seeds[i]; the
    stored guidance on one doubled batch."""
    check_scheduler(scheduler, config, model.model_config["name"])
    shape = (int(model.in_channels), int(model.input_size), int(model.input_size))
    generator_device = device if config.generator_device is None else torch.device(config.generator_device)
    generators = [torch.Generator(device=generator_device).manual_seed(int(seed)) for seed in seeds]
    noise = randn_per_sample(generators, shape, device=device)
    class_labels = None if labels is None else torch.tensor(labels, dtype=torch.long, device=device)
    guidance = config.guidance or GuidanceConfig()
    if guidance.enabled and class_labels is None:
        raise ValueError("classifier-free guidance needs class labels: this model is unconditional")
    # stochastic steps (DDPM, ancestral, SDE-DPM-Solver, flow's stochastic_sampling) draw sample i's noise from
    # generators[i]: diffusers' randn_tensor takes one generator per batch row.
    step = scheduler.step
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(step).parameters else {}
    scheduler.set_timesteps(config.steps, device=device)
    run = {"adm": _adm_steps, "flow": _flow_steps, "edm": _edm_steps}[config.kind]
    with eval_mode(model):
        latents = run(scheduler, model, noise, class_labels, guidance, config, step_kwargs, progress_bar)
    return latents.float()


def _adm_steps(
    scheduler, model, noise, class_labels, guidance: GuidanceConfig, config: SamplingConfig, step_kwargs, progress_bar
):
    """DiT's loop: a DDPM-family scheduler on eps (learned Sigma cut to the C eps channels as in DiT, unless
    the scheduler's variance_type is learned); guidance progress 1 - t / diffusion_steps."""
    channels, device = int(model.in_channels), noise.device
    latents = noise * scheduler.init_noise_sigma
    network = float32_network(model)
    if guidance.enabled:
        progress = lambda t: timestep_progress(t.to(torch.float64), config.diffusion_steps)  # noqa: E731
        network = ClassifierFreeGuidance(network, guidance, int(model.null_class), progress)
    learned_variance = scheduler.config.get("variance_type") in LEARNED_VARIANCE_TYPES
    for t in progress_bar(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, t)
        timesteps = torch.as_tensor(t, device=device).to(torch.float32).expand(len(noise))
        output = network(model_input, timesteps, class_labels).float()
        if output.shape[1] == 2 * channels and not learned_variance:
            output = output[:, :channels]  # eps only, as DiT: the scheduler has its own variance
        latents = scheduler.step(output, t, latents, **step_kwargs).prev_sample
    return latents


def _flow_steps(
    scheduler, model, noise, class_labels, guidance: GuidanceConfig, config: SamplingConfig, step_kwargs, progress_bar
):
    """FlowMatchEulerDiscreteScheduler on the network's velocity: the noise is x at sigma = 1, the network
    gets t = sigma (in [0, 1], not the scheduler's timestep sigma * num_train_timesteps), and the step is
    x + (sigma_next - sigma) v. Guidance as the project's flow samplers (`diffit.flow.GuidedVelocity`):
    progress 1 - t, the interval [low, high] of t."""
    null_class = int(model.null_class) if guidance.enabled else None
    velocity = GuidedVelocity(float32_network(model), class_labels, guidance, null_class, int(model.in_channels))
    scheduler.set_begin_index(0)  # step i uses sigmas[i], whatever the timesteps' values
    latents = noise
    for i, t in enumerate(progress_bar(scheduler.timesteps)):
        sigma = float(scheduler.sigmas[i])
        v = velocity(latents, sigma, velocity.guided_at(sigma)).float()
        latents = scheduler.step(v, t, latents, **step_kwargs).prev_sample
    return latents


def _edm_steps(
    scheduler, model, noise, class_labels, guidance: GuidanceConfig, config: SamplingConfig, step_kwargs, progress_bar
):
    """An EDM scheduler around the raw network F: its `scale_model_input` is EDM's c_in x, its timesteps
    EDM's c_noise = ln(sigma) / 4 (what F gets), its step turns F into EDM's D = c_skip x + c_out F
    (prediction_type "epsilon"). The noise starts at sigma_0 (EDM's x = sigma_max n), not diffusers'
    init_noise_sigma = sqrt(sigma_max^2 + 1). Guidance mixes F (D is affine in F with the same coefficients
    for both halves, so this is guiding D); progress is the position on the scheduler's Karras grid, the
    interval (low, high] of sigma."""
    scheduler.set_begin_index(0)
    timesteps = scheduler.timesteps.detach().to(torch.float64).cpu()
    sigmas = scheduler.sigmas.detach().to(torch.float64).cpu()

    def sigma_of(noise_labels: torch.Tensor) -> torch.Tensor:  # the grid sigma of a call's c_noise, exactly
        index = (noise_labels.detach().to(torch.float64).cpu()[:, None] - timesteps[None]).abs().argmin(dim=1)
        return sigmas[index].to(noise_labels.device)

    network = float32_network(model)
    if guidance.enabled:
        edm = scheduler.config
        progress = lambda c: sigma_progress(sigma_of(c), edm.sigma_min, edm.sigma_max, edm.rho)  # noqa: E731
        network = ClassifierFreeGuidance(network, guidance, int(model.null_class), progress, sigma_of)
    latents = noise * sigmas[0].item()
    for t in progress_bar(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, t)  # c_in x
        c_noise = torch.as_tensor(t, device=noise.device).to(torch.float32).reshape(-1).expand(len(noise))
        output = network(model_input, c_noise, class_labels).float()
        latents = scheduler.step(output, t, latents, **step_kwargs).prev_sample
    return latents
