"""Flow matching (SiT / REPA / SD3's linear interpolant): the path, the velocity loss, time sampling, the samplers.

Convention (REPA's `loss.py` and diffusers' `FlowMatchEulerDiscreteScheduler`, not SiT's, whose t runs the other
way): t = 1 is noise, t = 0 is data,

    x_t = (1 - t) x + t eps,        v = dx_t/dt = eps - x,

and the network, called `model(x_t, t, class_labels=...)` with t a float tensor [B] in [0, 1] (passed as it is to
the time embedding, as SiT and REPA pass it to DiT's), predicts v. The loss is the per-sample mean squared error
of the velocity (`velocity_loss`).

Training times: "uniform" t ~ U(0, 1), or "logit-normal" t = sigmoid(m + s n), n ~ N(0, 1) (REPA's "lognormal",
sigma = exp(N(0, 1)), t = sigma / (1 + sigma), is logit-normal(0, 1)); then optionally SD3's shift
t' = shift t / (1 + (shift - 1) t) (more time near the noise for shift > 1).

Samplers, from t = 1 to t = 0 in float64 (the network runs in its own dtype), as REPA's `samplers.py`:
- "euler": x <- x + (t_next - t) v(x, t) on `linspace(1, 0, steps + 1)`;
- "heun": Euler's predictor, then the trapezoid x + (t_next - t) (v(x, t) + v(x', t_next)) / 2, except on the last
  step (t_next = 0, where the network is not evaluated): 2 steps - 1 network calls;
- "euler-maruyama": the SDE with diffusion g(t)^2 = 2t whose marginals are the path's: drift
  v - t score = (2 - t) v + x (the linear path's score from the velocity, (-(1 - t) v - x) / t), on
  `linspace(1, 0.04, steps)` then a last deterministic step to 0 (the mean); fresh noise per step from each
  sample's own generator.
Guidance (`diffit.guidance.GuidanceConfig`): v = v_u + w (v_c - v_u) from one doubled batch (labels, then the null
class), with the schedule's progress 1 - t; with `interval=(low, high)` only where low <= t <= high, and both Heun
evaluations of a step follow the step's starting t (REPA's `euler_sampler`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .diffusion import randn_per_sample
from .guidance import GuidanceConfig, combine_guidance, guidance_scale
from .progress import progress_bar

FLOW_SAMPLERS = ("euler", "heun", "euler-maruyama")
TIME_SAMPLINGS = ("uniform", "logit-normal")
EULER_MARUYAMA_LAST_T = 0.04  # REPA: the stochastic steps end here, one deterministic step to 0 follows


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x + t noise, t [B] broadcast over the other dimensions."""
    t = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return (1 - t) * x + t * noise


def velocity_loss(
    model: Callable, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, class_labels=None
) -> torch.Tensor:
    """Per-sample loss [B]: mean over the non-batch dimensions of (model(x_t, t) - (noise - x))^2. A network with
    more output channels than `x` (a learned-Sigma head) has only its first channels compared."""
    prediction = model(interpolate(x, noise, t), t, class_labels=class_labels)[:, : x.shape[1]]
    return ((prediction - (noise - x)) ** 2).mean(dim=tuple(range(1, x.ndim)))


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift t' = shift t / (1 + (shift - 1) t) (identity for shift 1; keeps 0 and 1)."""
    if shift <= 0:
        raise ValueError(f"the time shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def sample_times(
    count: int,
    kind: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """`count` training times in (0, 1): "uniform" or "logit-normal"(mean, std), then SD3's shift."""
    if kind == "uniform":
        t = torch.rand(count, generator=generator, device=device)
    elif kind == "logit-normal":
        t = torch.sigmoid(mean + std * torch.randn(count, generator=generator, device=device))
    else:
        raise ValueError(f"unknown time sampling {kind!r}; expected one of {TIME_SAMPLINGS}")
    return shift_times(t, shift) if shift != 1.0 else t


def logit_normal_quantile(probability: float, mean: float = 0.0, std: float = 1.0) -> float:
    """The `probability` quantile of logit-normal(mean, std): sigmoid(mean + std Phi^-1(probability))."""
    normal = math.sqrt(2.0) * torch.erfinv(torch.tensor(2.0 * probability - 1.0, dtype=torch.float64)).item()
    return 1.0 / (1.0 + math.exp(-(mean + std * normal)))


def time_grid(sampler: str, steps: int) -> torch.Tensor:
    """The float64 times a sampler visits: linspace(1, 0, steps + 1), or Euler-Maruyama's linspace(1, 0.04,
    steps) followed by 0."""
    if sampler == "euler-maruyama":
        grid = torch.linspace(1.0, EULER_MARUYAMA_LAST_T, steps, dtype=torch.float64)
        return torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


class GuidedVelocity:
    """v(x, t) of a flow network in float64, with classifier-free guidance decided by a step's starting time."""

    def __init__(
        self, model: Callable, labels, guidance: GuidanceConfig, null_class: int | None, channels: int, guide=None
    ):
        self.model, self.labels, self.guidance = model, labels, guidance
        self.null_class, self.channels, self.guide = null_class, channels, guide

    def guided_at(self, t: float) -> bool:
        """Whether a step starting at time t is guided (scale != 1, inside the interval if one is set)."""
        return self.guidance.enabled and self.guidance.contains(t)

    def __call__(self, x: torch.Tensor, t: float, guided: bool) -> torch.Tensor:
        batch = x.shape[0]
        dtype = _network_dtype(self.model)
        if guided and self.guide is not None:  # autoguidance: the guide's conditional velocity, not the null class
            times = torch.full((batch,), t, dtype=torch.float64, device=x.device)
            main = self.model(x.to(dtype), times.to(dtype), class_labels=self.labels)[:, : self.channels]
            guide_dtype = _network_dtype(self.guide)
            weak = self.guide(x.to(guide_dtype), times.to(guide_dtype), class_labels=self.labels)[:, : self.channels]
            scale = float(guidance_scale(self.guidance, 1.0 - t))
            guided_channels = min(self.guidance.channels or self.channels, self.channels)
            return combine_guidance(main.to(torch.float64), weak.to(torch.float64), scale, guided_channels)
        if guided:
            inputs = torch.cat([x, x]).to(dtype)
            labels = torch.cat([self.labels, torch.full_like(self.labels, self.null_class)])
        else:
            inputs, labels = x.to(dtype), self.labels
        times = torch.full((inputs.shape[0],), t, dtype=torch.float64, device=x.device).to(dtype)
        output = self.model(inputs, times, class_labels=labels)[:, : self.channels].to(torch.float64)
        if not guided:
            return output
        scale = float(guidance_scale(self.guidance, 1.0 - t))  # the schedule's progress: 0 at t = 1, 1 at t = 0
        guided_channels = min(self.guidance.channels or self.channels, self.channels)
        return combine_guidance(output[:batch], output[batch:], scale, guided_channels)


def _network_dtype(model) -> torch.dtype:
    parameter = next(iter(getattr(model, "parameters", lambda: iter(()))()), None)
    return parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32


def flow_sample(
    model: Callable,
    initial_noise: torch.Tensor,
    labels: torch.Tensor | None,
    generators: Sequence[torch.Generator],
    *,
    sampler: str,
    steps: int,
    guidance: GuidanceConfig,
    null_class: int | None,
    progress: bool | dict = False,
    guide: Callable | None = None,
) -> torch.Tensor:
    """Integrate from `initial_noise` (t = 1) to t = 0 with `sampler` (see the module docstring); float64 result.
    `guide`: autoguidance, its conditional velocity in place of the null class's."""
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"unknown flow sampler {sampler!r}; expected one of {FLOW_SAMPLERS}")
    velocity = GuidedVelocity(model, labels, guidance, null_class, initial_noise.shape[1], guide)
    grid = time_grid(sampler, steps).tolist()
    x = initial_noise.to(torch.float64)
    last = len(grid) - 2
    for i in progress_bar(range(len(grid) - 1), sampler, progress):
        t, t_next = grid[i], grid[i + 1]
        guided = velocity.guided_at(t)
        v = velocity(x, t, guided)
        if sampler == "euler-maruyama":
            drift = (2.0 - t) * v + x  # v - t score: the linear path's score from the velocity
            x = x + (t_next - t) * drift
            if i < last:  # the last step is the mean
                noise = randn_per_sample(generators, x.shape[1:], device=x.device).to(torch.float64)
                x = x + math.sqrt(2.0 * t) * math.sqrt(abs(t_next - t)) * noise
            continue
        x_euler = x + (t_next - t) * v
        if sampler == "heun" and i < last:
            v_next = velocity(x_euler, t_next, guided)  # guided as the step's start decided
            x = x + (t_next - t) * 0.5 * (v + v_next)
        else:
            x = x_euler
    return x
