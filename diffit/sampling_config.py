"""Sampling settings: each setting's one name (`SETTINGS`, `GUIDANCE_SETTINGS`) and its check where it enters
(`check_settings`), the samplers and model kinds, `SamplingConfig` (every setting of a run, with `settings()` /
`with_settings()` / `to_dict()` / `from_dict()`), the paper's defaults for an exported model
(`paper_sampling_config`), network evaluations per sampler (`network_evaluations`) and pixel quantisation
(`PIXEL_QUANTIZATIONS`, `to_uint8`). `diffit.sampling` runs a `SamplingConfig` (`sample`) and exposes these names
too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .edm import PRECONDITIONINGS
from .flow import FLOW_SAMPLERS
from .guidance import SCHEDULES, GuidanceConfig, guidance_channels

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
    "edm" (image-space network, wrapped in a preconditioning). eta: DDIM noise. diffusion_steps / noise_schedule:
    the ADM training chain. learn_sigma: None = the model's attribute. clip_denoised: clamp x_0 predictions to
    [-1, 1] (image space; keep False for latents). sigma_min / sigma_max / rho: EDM Heun's grid. S_churn / S_min /
    S_max / S_noise: EDM's stochastic sampler (churn strength, the sigma range it applies to, noise inflation).
    sigma_data: EDM preconditioning. precond: the preconditioning of a kind="edm" network ("edm" | "vp" | "ve",
    `diffit.edm.make_precond`; the Heun grid is clipped to its sigma range). generator_device: "cpu" (seeds
    reproducible on any device) or None (the sampling device). pixels: how samples become uint8 images ("round" |
    "truncate", see `to_uint8`).
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
    precond: str = "edm"
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
        if self.precond not in PRECONDITIONINGS:
            raise ValueError(f"unknown preconditioning {self.precond!r}; expected one of {PRECONDITIONINGS}")
        if self.precond != "edm" and self.kind != "edm":
            raise ValueError(f"precond={self.precond!r} preconditions kind='edm' networks only, got kind={self.kind!r}")
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
    {"type": "edm", "sigma_data", "precond"}, an export without "precond" meaning "edm"; None = ADM's linear
    1000-step chain). ADM models: DDPM with 250 steps; guidance 4.6 with the power-cosine schedule for
    class-conditional models at 256 px, 1.49 constant at 512 px, none otherwise. EDM models: EDM-Heun with 18
    steps up to 32 px, 40 above, unguided. Flow models (beyond the paper): Heun with `FLOW_DEFAULT_STEPS` steps,
    unguided.
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
            precond=str(diffusion.get("precond", "edm")),
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
