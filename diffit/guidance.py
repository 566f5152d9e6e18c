"""Classifier-free guidance as DiffiT uses it on ImageNet (paper Sec. 4.1, released `forward_with_cfg`).

out = uncond + s (cond - uncond) on the first `channels` output channels only (3 of the 4 latent eps
channels, the DiT/DiffiT convention); every other channel (4th eps channel, Sigma channels) is taken from the
conditional half. The scale s is constant (ImageNet-512, 1.49) or follows MDT's power-cosine schedule
(ImageNet-256, 4.6): with progress p in [0, 1] (0 at the start of sampling, t = T; 1 at the end, t = 0)

    s(p) = (scale - 1) * 0.5 * (1 - cos(pi * p^power)) + 1,     p = 1 - t / diffusion_steps for ADM.

Conditional and unconditional predictions come from ONE forward pass on a doubled batch (labels then the null
class), so guidance doubles the batch, not the number of network calls. A scale of exactly 1 skips the
unconditional half and returns the conditional model's output unchanged.

Guidance interval (Kynkäänniemi et al. 2024; REPA's guidance_low / guidance_high): `interval=(low, high)` guides
only where the model's own time variable lies in it -- t for flow models (low <= t <= high, REPA's test), sigma for
EDM and ADM models (low < sigma <= high, the EDM2 convention); elsewhere the output is the conditional one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

SCHEDULES = ("constant", "power-cosine")


@dataclass(frozen=True)
class GuidanceConfig:
    """Classifier-free guidance settings: final scale, schedule, schedule power, number of guided channels."""

    scale: float = 1.0
    schedule: str = "constant"
    power: float = 4.0
    channels: int | None = 3  # None: guide all eps channels
    interval: tuple[float, float] | None = None  # (low, high) of t (flow) or sigma (EDM / ADM); None: everywhere

    def __post_init__(self):
        if self.interval is not None:
            low, high = (float(v) for v in self.interval)
            if not (low >= 0 and high >= low and not math.isnan(high)):
                raise ValueError(f"guidance interval must be (low, high) with 0 <= low <= high, got {self.interval}")
            object.__setattr__(self, "interval", (low, high))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown guidance schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"guidance scale must be a finite number >= 0, got {self.scale}")
        if self.power <= 0:
            raise ValueError(f"power-cosine power must be > 0, got {self.power}")
        if self.channels is not None and self.channels < 1:
            raise ValueError(f"guided channels must be >= 1 or None (all), got {self.channels}")

    @property
    def enabled(self) -> bool:
        """False when the scale is exactly 1, i.e. guidance is the conditional model itself."""
        return self.scale != 1.0

    def contains(self, value, low_inclusive: bool = True):
        """Whether `value` (a float or a tensor) lies in the interval: [low, high] for a flow model's t, (low, high]
        (`low_inclusive=False`) for a sigma. Always true without an interval."""
        if self.interval is None:
            return value == value if isinstance(value, torch.Tensor) else True  # an all-true tensor, or True
        low, high = self.interval
        above = value >= low if low_inclusive else value > low
        return above & (value <= high) if isinstance(value, torch.Tensor) else bool(above and value <= high)


def guidance_channels(value) -> int | None:
    """The guided channels as a setting is written (3 or "3": the first three, as DiffiT; "all" or None: every
    channel; any positive integer) -> `GuidanceConfig.channels`. ValueError for anything else."""
    if value is None or value == "all":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"guidance_channels must be a positive integer or 'all', got {value!r}")
    return value


def power_cosine_weight(progress, power: float = 4.0):
    """0.5 (1 - cos(pi p^power)): 0 at p = 0 (start of sampling), 1 at p = 1 (end)."""
    if isinstance(progress, torch.Tensor):
        return 0.5 * (1.0 - torch.cos(math.pi * progress.clamp(0.0, 1.0) ** power))
    return 0.5 * (1.0 - math.cos(math.pi * min(max(float(progress), 0.0), 1.0) ** power))


def guidance_scale(config: GuidanceConfig, progress):
    """Guidance scale at sampling progress p (float or tensor in [0, 1]; 0 = t=T, 1 = t=0)."""
    if config.schedule == "constant":
        if isinstance(progress, torch.Tensor):
            return torch.full_like(progress, config.scale, dtype=torch.float64)
        return config.scale
    return (config.scale - 1.0) * power_cosine_weight(progress, config.power) + 1.0


def timestep_progress(t, diffusion_steps: int = 1000):
    """Sampling progress of an ADM timestep: 1 - t / diffusion_steps (t = T-1 -> ~0, t = 0 -> 1)."""
    return 1.0 - t / diffusion_steps


def guidance_scale_at_timestep(config: GuidanceConfig, t, diffusion_steps: int = 1000):
    """Scale at ADM timestep t, exactly the released DiffiT formula with phase = (1 - t/T)^power * pi."""
    return guidance_scale(config, timestep_progress(t, diffusion_steps))


def sigma_progress(sigma, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
    """Sampling progress of an EDM noise level: its position on the Karras grid (sigma^(1/rho) linear), so the
    i-th of N Heun steps has progress i / (N - 1)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((top - sigma ** (1 / rho)) / (top - bottom)).clamp(0.0, 1.0)


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale, guided_channels: int) -> torch.Tensor:
    """uncond + scale (cond - uncond) on the first `guided_channels` channels, `cond` elsewhere.

    `scale` is a float or a per-sample tensor [N].
    """
    if isinstance(scale, torch.Tensor):
        scale = scale.to(device=cond.device, dtype=cond.dtype).reshape(-1, *([1] * (cond.ndim - 1)))
    guided = uncond[:, :guided_channels] + scale * (cond[:, :guided_channels] - uncond[:, :guided_channels])
    return torch.cat([guided, cond[:, guided_channels:]], dim=1)


def guided_forward(
    model: Callable,
    x: torch.Tensor,
    noise_labels: torch.Tensor,
    class_labels: torch.Tensor,
    *,
    scale,
    null_class: int,
    channels: int | None = 3,
) -> torch.Tensor:
    """Classifier-free guided output of `model(x, noise_labels, class_labels)` in one doubled-batch call.

    `channels` counts guided channels from the start of the output (None: all x.shape[1] eps channels; the
    extra learned-Sigma channels are never guided). A python scale of exactly 1 calls the model once on the
    plain batch, so it returns the conditional output bit for bit.
    """
    if class_labels is None:
        raise ValueError("classifier-free guidance needs class_labels (the model must be class-conditional)")
    if not isinstance(scale, torch.Tensor) and scale == 1.0:
        return model(x, noise_labels, class_labels)
    guided_channels = x.shape[1] if channels is None else min(channels, x.shape[1])
    null_labels = torch.full_like(class_labels, null_class)
    output = model(torch.cat([x, x]), torch.cat([noise_labels, noise_labels]), torch.cat([class_labels, null_labels]))
    cond, uncond = output.chunk(2)
    return combine_guidance(cond, uncond, scale, guided_channels)


def call_scale(config: GuidanceConfig, noise_labels: torch.Tensor, progress_fn: Callable, sigma_fn: Callable | None):
    """The guidance scale of one network call: the config's scale or its schedule at the call's progress, per
    sample 1 outside the interval (sigma in (low, high]); None when no sample of the call lies in the interval."""
    scale = config.scale if config.schedule == "constant" else guidance_scale(config, progress_fn(noise_labels))
    if config.interval is None:
        return scale
    inside = config.contains(sigma_fn(noise_labels).to(torch.float64), low_inclusive=False)
    if not bool(inside.any()):
        return None
    if bool(inside.all()):
        return scale
    scale = torch.as_tensor(scale, dtype=torch.float64, device=inside.device).expand(inside.shape)
    return torch.where(inside, scale, torch.ones_like(scale))


class AutoGuidance(nn.Module):
    """Autoguidance (Karras et al. 2024, EDM2's `guide(x).lerp(main(x), w)`): the unconditional branch replaced by
    a weaker `guide` network of the same conditioning, out = guide + w (main - guide) on the guided channels (the
    main output elsewhere), both called with the same labels. The schedule and interval of `config` apply as for
    classifier-free guidance; where the interval excludes a call only `main` runs."""

    def __init__(
        self,
        main: Callable,
        guide: Callable,
        config: GuidanceConfig,
        progress_fn: Callable[[torch.Tensor], torch.Tensor],
        sigma_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        if config.interval is not None and sigma_fn is None:
            raise ValueError("a guidance interval needs the noise level of each call (sigma_fn)")
        self.main, self.guide, self.config = main, guide, config
        self.progress_fn, self.sigma_fn = progress_fn, sigma_fn

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None):
        output = self.main(x, noise_labels, class_labels)
        scale = call_scale(self.config, noise_labels, self.progress_fn, self.sigma_fn)
        if scale is None:  # outside the interval: the main model alone
            return output
        channels = x.shape[1] if self.config.channels is None else min(self.config.channels, x.shape[1])
        return combine_guidance(output, self.guide(x, noise_labels, class_labels), scale, channels)


class ClassifierFreeGuidance(nn.Module):
    """Wraps `model(x, noise_labels, class_labels)` into its guided version (same call signature).

    `progress_fn(noise_labels) -> [N] progress in [0, 1]` feeds the scale schedule: `timestep_progress` for
    ADM timesteps, `sigma_progress` for EDM sigmas. `sigma_fn(noise_labels) -> [N] sigma` places a sample in the
    config's interval (needed when it has one): the identity for EDM, the training chain's sigma_t for ADM.
    """

    def __init__(
        self,
        model: Callable,
        config: GuidanceConfig,
        null_class: int,
        progress_fn: Callable[[torch.Tensor], torch.Tensor],
        sigma_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        if config.interval is not None and sigma_fn is None:
            raise ValueError("a guidance interval needs the noise level of each call (sigma_fn)")
        self.model = model
        self.config = config
        self.null_class = int(null_class)
        self.progress_fn = progress_fn
        self.sigma_fn = sigma_fn

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Guided output; the plain conditional output when the configured scale is 1."""
        scale = call_scale(self.config, noise_labels, self.progress_fn, self.sigma_fn) if self.config.enabled else None
        if scale is None:  # scale 1, or outside the interval: the conditional output
            return self.model(x, noise_labels, class_labels)
        return guided_forward(
            self.model,
            x,
            noise_labels,
            class_labels,
            scale=scale,
            null_class=self.null_class,
            channels=self.config.channels,
        )
