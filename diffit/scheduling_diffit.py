"""The scheduler component of `DiffiTPipeline` (diffusers keeps schedulers in their own modules): `DiffiTScheduler`,
the marker for the project's own sampler (`diffit.sampling.sample` runs while it is set), whose config is the
model's ADM training chain in diffusers' names (`chain_scheduler_config`), `load_scheduler`, which rebuilds the
scheduler a saved pipeline's model_index.json names (a diffusers class, or this one), `scheduler_kind` (which model
kind a diffusers scheduler drives) and `scheduler_for` (a diffusers scheduler that drives a model of a given kind):

* kind "adm" (latent eps / learned-Sigma models): the DDPM-family schedulers (`alphas_cumprod`: DDIM, DDPM,
  DPM-Solver(++), UniPC, Euler, Heun, ...) on the model's training chain, epsilon prediction;
* kind "flow" (velocity models): `FlowMatchEulerDiscreteScheduler` (any fixed `shift`; not `use_dynamic_shifting`,
  not `invert_sigmas`);
* kind "edm" (image-space EDM-preconditioned models): `EDMEulerScheduler` and `EDMDPMSolverMultistepScheduler` with
  the export's `sigma_data` and `prediction_type="epsilon"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import diffusers
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers import KarrasDiffusionSchedulers

from .sampling_config import SamplingConfig

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")

# Where `DiffiTScheduler` lived before this module: saved pipelines' model_index.json may name it there.
FORMER_MODULES = ("diffit.pipeline_diffit",)


def chain_scheduler_config(config: SamplingConfig) -> dict[str, Any]:
    """The ADM training chain of `config` in diffusers' scheduler names (DiT's scheduler_config.json keys)."""
    if config.noise_schedule == "linear":
        scale = 1000.0 / config.diffusion_steps  # ADM rescales the linear betas for other chain lengths
        betas = {"beta_start": scale * 1e-4, "beta_end": scale * 0.02, "beta_schedule": "linear"}
    elif config.noise_schedule == "cosine":
        betas = {"beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "squaredcos_cap_v2"}
    else:
        raise ValueError(f"no diffusers beta schedule for noise_schedule {config.noise_schedule!r}")
    return {"num_train_timesteps": int(config.diffusion_steps), **betas}


class DiffiTScheduler(SchedulerMixin, ConfigMixin):
    """The project's own sampler as the pipeline's `scheduler` component (module docstring): while it is set,
    `DiffiTPipeline` runs `diffit.sampling.sample` with its stored `sampling` settings.

    It runs no steps itself. Its config is the model's ADM training chain in diffusers' names, so
    `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` builds a diffusers scheduler for that chain.
    """

    config_name = "scheduler_config.json"
    _compatibles = [entry.name for entry in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        clip_sample: bool = False,
        prediction_type: str = "epsilon",
    ):
        self.init_noise_sigma = 1.0

    @classmethod
    def for_sampling(cls, config: SamplingConfig) -> DiffiTScheduler:
        """The marker for a pipeline whose stored settings are `config` (its chain in the config; EDM models have
        no chain, so they get DiT's). Every value is passed explicitly: `from_config` of another class skips the
        values a config marks as defaults (`_use_default_values`), e.g. it would keep DDIM's clip_sample=True."""
        chain = chain_scheduler_config(config) if config.kind == "adm" else {}
        defaults = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
        return cls(**{**defaults, **chain}, clip_sample=False, prediction_type="epsilon")

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError(
            "DiffiTScheduler marks the project's sampler (diffit.sampling.sample) in a DiffiTPipeline and runs no "
            "steps itself; build a stepping scheduler with e.g. DDIMScheduler.from_config(scheduler.config)"
        )

    set_timesteps = step = scale_model_input = add_noise = _refuse


def scheduler_kind(scheduler: SchedulerMixin) -> str:
    """The model kind a diffusers scheduler drives in `DiffiTPipeline`: "flow" (FLOW_SCHEDULERS), "edm"
    (EDM_SCHEDULERS) or "adm" (any other; `DiffiTPipeline.check_scheduler` says whether it fits)."""
    name = type(scheduler).__name__
    for kind, names in (("flow", FLOW_SCHEDULERS), ("edm", EDM_SCHEDULERS)):
        if name in names and isinstance(scheduler, getattr(diffusers, name)):
            return kind
    return "adm"


def scheduler_for(config: SamplingConfig, scheduler_class: type | None = None, **overrides: Any) -> SchedulerMixin:
    """A diffusers scheduler that drives a model sampled with `config` in `DiffiTPipeline` (module docstring).

    kind "adm": `scheduler_class` (default `DPMSolverMultistepScheduler`) on the model's training chain; "flow":
    `FlowMatchEulerDiscreteScheduler` (shift 1 unless `shift=` is given); "edm": `EDMEulerScheduler` (or
    `scheduler_class=EDMDPMSolverMultistepScheduler`) with the config's sigma_data and EDM's sigma_min, sigma_max
    and rho (a VP / VE-preconditioned model: ValueError, no diffusers scheduler computes those). `overrides` are
    further constructor arguments (e.g. `shift=3.0`, `solver_order=3`).
    """
    if config.kind == "adm":
        scheduler_class = scheduler_class or diffusers.DPMSolverMultistepScheduler
        return scheduler_class.from_config(DiffiTScheduler.for_sampling(config).config, **overrides)
    if config.kind == "flow":
        scheduler_class = scheduler_class or diffusers.FlowMatchEulerDiscreteScheduler
        return scheduler_class(**overrides)
    if config.precond != "edm":
        raise ValueError(f"no diffusers scheduler drives a {config.precond.upper()}-preconditioned model")
    scheduler_class = scheduler_class or diffusers.EDMEulerScheduler
    edm = {"sigma_data": config.sigma_data, "sigma_min": config.sigma_min, "sigma_max": config.sigma_max}
    return scheduler_class(**{**edm, "rho": config.rho, **overrides})


def load_scheduler(entry: Sequence[str | None] | None, folder: Path) -> SchedulerMixin | None:
    """The scheduler a saved pipeline's model_index.json names: diffusers' classes or `DiffiTScheduler`."""
    if not entry or entry[0] is None:
        return None
    library, class_name = entry
    if library == "diffusers" and isinstance(getattr(diffusers, str(class_name), None), type):
        scheduler_class = getattr(diffusers, class_name)
    elif class_name == DiffiTScheduler.__name__ and library in (DiffiTScheduler.__module__, *FORMER_MODULES):
        scheduler_class = DiffiTScheduler
    else:
        raise ValueError(f"{folder / 'model_index.json'}: unknown scheduler {library}.{class_name}")
    return scheduler_class.from_pretrained(folder, subfolder="scheduler")
