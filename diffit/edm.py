"""EDM (Karras et al. 2022) preconditioning, loss and Heun sampler, used by the image-space DiffiT (paper Sec. 4.1).

* `EDMPrecond`, `VPPrecond`, `VEPrecond` wrap a raw network F into the denoiser
  D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with the coefficients of Karras et al. Table 1 (EDM: c_noise =
  ln(sigma) / 4; VP: Song et al.'s variance-preserving SDE, c_noise = (M - 1) t(sigma); VE: the variance-exploding
  SDE, c_noise = ln(sigma / 2)), as NVlabs/edm `training/networks.py`. `make_precond(name, net)` builds one by name.
* `EDMLoss`, `VPLoss`, `VELoss`: NVlabs/edm `training/loss.py` (EDM: sigma ~ logNormal(P_mean, P_std), weight
  (sigma^2 + sigma_d^2) / (sigma sigma_d)^2; VP: sigma = sigma(t), t ~ U(epsilon_t, 1); VE: sigma log-uniform in
  [sigma_min, sigma_max]; both weight 1 / sigma^2), with EDM's optional augmentation of the images (`augment_pipe`,
  `diffit.augment.AugmentPipe`) whose labels the network is given. `make_loss(name, ...)` builds one by name.
* `edm_sigma_steps` / `edm_heun_sampler`: Algorithm 2 (deterministic Heun; optional stochastic churn).
* `ADMDenoiser`: presents an ADM eps-network (discrete VP timesteps) as a VE denoiser D(x; sigma) so the same
  Heun sampler runs on latent DiffiT models (the idea of EDM's iDDPMPrecond, with ADM's own abar table).

A denoiser here is any callable `denoise_fn(x, sigma, class_labels) -> D` with sigma a float tensor [N]; the
preconditionings also take `augment_labels=` (training with augmentation; sampling gives none, as EDM's generate.py).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .diffusion import randn_per_sample
from .progress import progress_bar


def _sigma_as_batch(sigma, x: torch.Tensor) -> torch.Tensor:
    """A scalar or [N] sigma -> [N, 1, ..., 1] in the dtype/device of x."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.numel() != x.shape[0]:
        raise ValueError(f"sigma has {sigma.numel()} values for a batch of {x.shape[0]}")
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def preconditioning_coefficients(sigma: torch.Tensor, sigma_data: float = 0.5):
    """(c_skip, c_out, c_in, c_noise) of EDM (Karras et al. Table 1) for a tensor of sigmas."""
    sigma_sq, sigma_data_sq = sigma**2, sigma_data**2
    c_skip = sigma_data_sq / (sigma_sq + sigma_data_sq)
    c_out = sigma * sigma_data / torch.sqrt(sigma_sq + sigma_data_sq)
    c_in = 1.0 / torch.sqrt(sigma_data_sq + sigma_sq)
    c_noise = torch.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


# The preconditionings and losses by name (a training config's `diffusion.precond`, an export's "diffusion" entry).
PRECONDITIONINGS = ("edm", "vp", "ve")


class Precond(nn.Module, abc.ABC):
    """D(x; sigma) = c_skip x + c_out net(c_in x, c_noise, class_labels[, augment_labels]) around a raw network:
    the common form of NVlabs/edm's VPPrecond / VEPrecond / EDMPrecond, whose `coefficients` differ.

    `sigma_min` / `sigma_max` bound the noise levels the network was trained on (the Heun sampler clips its grid to
    them, as EDM's generate.py). The raw network's attributes used by sampling (`num_classes`, `null_class`,
    `in_channels`) are exposed.
    """

    def __init__(self, net: nn.Module, sigma_min: float, sigma_max: float):
        super().__init__()
        self.net = net
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    @property
    def num_classes(self) -> int:
        """Number of classes of the wrapped network (0 = unconditional)."""
        return int(getattr(self.net, "num_classes", 0))

    @property
    def null_class(self) -> int | None:
        """Label index of the unconditional ("null") class, None for unconditional networks."""
        return getattr(self.net, "null_class", self.num_classes if self.num_classes else None)

    @abc.abstractmethod
    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) for sigma [N, 1, ..., 1] (EDM / VP / VE: each preconditioning's own)."""

    def forward(
        self,
        x: torch.Tensor,
        sigma,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoised estimate D(x; sigma), same shape and dtype as x. `augment_labels` (training with EDM's
        augmentation) go to the network only when given: DiffiT's networks take no such argument."""
        sigma = _sigma_as_batch(sigma, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        net_out = self.net(c_in * x, c_noise.flatten(), class_labels, **extra)
        if net_out.shape != x.shape:
            raise ValueError(
                f"EDM network output {tuple(net_out.shape)} must match its input {tuple(x.shape)} "
                "(a learned-Sigma latent model needs kind='adm')"
            )
        return c_skip * x + c_out * net_out.to(x.dtype)

    def round_sigma(self, sigma):
        """Continuous-sigma model: no rounding."""
        return torch.as_tensor(sigma)


class EDMPrecond(Precond):
    """EDM's own preconditioning (Karras et al. Table 1, `preconditioning_coefficients`): the network's input and
    target have unit variance for data of std `sigma_data`; c_noise = ln(sigma) / 4."""

    def __init__(
        self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.0, sigma_max: float = float("inf")
    ):
        super().__init__(net, sigma_min, sigma_max)
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return preconditioning_coefficients(sigma, self.sigma_data)


def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1): the VP SDE's noise level at time t (EDM Table 1)."""
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * (t**2) + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """t(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d, the inverse of `vp_sigma`."""
    sigma = torch.as_tensor(sigma)
    return ((beta_min**2 + 2 * beta_d * (1 + sigma**2).log()).sqrt() - beta_min) / beta_d


class VPPrecond(Precond):
    """The variance-preserving SDE of Song et al. 2021 (DDPM++) in EDM's form (NVlabs/edm `VPPrecond`): c_skip = 1,
    c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1), c_noise = (M - 1) t(sigma); trained on sigma(t) for
    t in [epsilon_t, 1]."""

    def __init__(
        self, net: nn.Module, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5
    ):
        # sigma(epsilon_t), sigma(1) in float64: EDM's float32 evaluation of sigma(1e-5) = sqrt(exp(1e-6) - 1) gives
        # 0.000977 for 0.0010005 (below the sampler's default sigma_min 0.002 either way).
        t_range = torch.tensor([epsilon_t, 1.0], dtype=torch.float64)
        sigma_min, sigma_max = vp_sigma(t_range, beta_d, beta_min).tolist()
        super().__init__(net, sigma_min, sigma_max)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)

    def sigma(self, t) -> torch.Tensor:
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma) -> torch.Tensor:
        return vp_sigma_inv(sigma, self.beta_d, self.beta_min)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


class VEPrecond(Precond):
    """The variance-exploding SDE of Song et al. 2021 (NCSN++) in EDM's form (NVlabs/edm `VEPrecond`): c_skip = 1,
    c_out = sigma, c_in = 1, c_noise = ln(sigma / 2); trained on sigma in [sigma_min, sigma_max]."""

    def __init__(self, net: nn.Module, sigma_min: float = 0.02, sigma_max: float = 100.0):
        super().__init__(net, sigma_min, sigma_max)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


def make_precond(name: str, net: nn.Module, sigma_data: float = 0.5) -> Precond:
    """The preconditioning `name` ("edm" | "vp" | "ve", `PRECONDITIONINGS`) around `net`, with EDM's defaults
    (`sigma_data` is EDM's only; VP and VE do not scale by the data's std)."""
    if name == "edm":
        return EDMPrecond(net, sigma_data=sigma_data)
    if name == "vp":
        return VPPrecond(net)
    if name == "ve":
        return VEPrecond(net)
    raise ValueError(f"unknown preconditioning {name!r}; expected one of {', '.join(PRECONDITIONINGS)}")


def _draw(kind: str, shape: list[int], like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """torch.randn / torch.rand of `shape` in the dtype and on the device of `like`, from `generator` when given
    (drawn on the generator's device, then moved)."""
    draw = torch.randn if kind == "normal" else torch.rand
    if generator is None:
        return draw(shape, device=like.device, dtype=like.dtype)
    return draw(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


class DenoisingLoss(abc.ABC):
    """NVlabs/edm's training-loss structure (`training/loss.py`): per image a noise level sigma, then EDM's
    augmentation of the images (when `augment_pipe` is given), then the noise; the per-element loss
    weight(sigma) ||D(y + n; sigma) - y||^2 with y the (augmented) images and n ~ N(0, sigma^2). Subclasses give
    `sample_sigma` and `weight`.

    Random draws in EDM's order: sigma, the augmentation (global RNG, `AugmentPipe`), the noise; sigma and the
    noise come from `generator` when given.
    """

    @abc.abstractmethod
    def sample_sigma(self, shape: list[int], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The training noise levels of one batch (EDM: log-normal; VP: sigma(t), t ~ U(eps_t, 1); VE: log-uniform)."""

    @abc.abstractmethod
    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """The loss weight lambda(sigma) of each noise level."""

    def __call__(
        self,
        precond: Callable,
        images: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        augment_pipe: Callable | None = None,
    ) -> torch.Tensor:
        """Per-element weighted loss, shape of `images`."""
        sigma = self.sample_sigma([images.shape[0]] + [1] * (images.ndim - 1), images, generator)
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        noise = _draw("normal", list(y.shape), y, generator) * sigma
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        denoised = precond(y + noise, sigma.flatten(), class_labels, **extra)
        return self.weight(sigma) * (denoised - y) ** 2


class EDMLoss(DenoisingLoss):
    """EDM training loss: per-element lambda(sigma) ||D(y + n; sigma) - y||^2 with ln sigma ~ N(P_mean, P_std^2)."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.sigma_data = float(sigma_data)

    def sample_sigma(self, shape: list[int], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """sigma = exp(P_mean + P_std n), n ~ N(0, 1)."""
        return (_draw("normal", shape, like, generator) * self.P_std + self.P_mean).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 = 1 / c_out^2: unit effective weight on F."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class VPLoss(DenoisingLoss):
    """VP training loss (NVlabs/edm `VPLoss`): sigma = sigma(t) with t ~ U(epsilon_t, 1), weight 1 / sigma^2."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.beta_d = float(beta_d)
        self.beta_min = float(beta_min)
        self.epsilon_t = float(epsilon_t)

    def sample_sigma(self, shape: list[int], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """sigma(1 + u (epsilon_t - 1)), u ~ U(0, 1): t uniform in (epsilon_t, 1]."""
        return vp_sigma(1 + _draw("uniform", shape, like, generator) * (self.epsilon_t - 1), self.beta_d, self.beta_min)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """1 / sigma^2 = 1 / c_out^2 of VPPrecond."""
        return 1 / sigma**2


class VELoss(DenoisingLoss):
    """VE training loss (NVlabs/edm `VELoss`): sigma = sigma_min (sigma_max / sigma_min)^u, u ~ U(0, 1),
    weight 1 / sigma^2."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def sample_sigma(self, shape: list[int], like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """sigma log-uniform in [sigma_min, sigma_max)."""
        return self.sigma_min * ((self.sigma_max / self.sigma_min) ** _draw("uniform", shape, like, generator))

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """1 / sigma^2 = 1 / c_out^2 of VEPrecond."""
        return 1 / sigma**2


def make_loss(name: str, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5) -> DenoisingLoss:
    """The training loss of preconditioning `name` ("edm" | "vp" | "ve"), with EDM's defaults (P_mean, P_std and
    sigma_data are EDM's only)."""
    if name == "edm":
        return EDMLoss(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)
    if name == "vp":
        return VPLoss()
    if name == "ve":
        return VELoss()
    raise ValueError(f"unknown preconditioning {name!r}; expected one of {', '.join(PRECONDITIONINGS)}")


def edm_sigma_steps(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    round_sigma: Callable | None = None,
) -> torch.Tensor:
    """Karras time steps: num_steps sigmas from sigma_max to sigma_min (uniform in sigma^(1/rho)), then a final 0.

    Returns a float64 tensor of length num_steps + 1.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    denominator = max(num_steps - 1, 1)
    t_steps = (
        sigma_max ** (1 / rho) + step_indices / denominator * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    if round_sigma is not None:
        t_steps = torch.as_tensor(round_sigma(t_steps), dtype=torch.float64)
    return torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)])


def edm_heun_sampler(
    denoise_fn: Callable,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = float("inf"),
    S_noise: float = 1.0,
    generators: Sequence[torch.Generator] | None = None,
    round_sigma: Callable | None = None,
    progress: bool | dict = False,
) -> torch.Tensor:
    """EDM Algorithm 2: Heun's 2nd-order ODE solver with optional churn; 2*num_steps - 1 denoiser calls.

    Line for line NVlabs/edm `generate.py`'s `edm_sampler`: `latents` is standard normal noise [N, ...] (scaled by
    sigma_max here); on each step with S_min <= sigma <= S_max, gamma = min(S_churn / num_steps, sqrt(2) - 1)
    raises sigma to t_hat = sigma (1 + gamma) with fresh noise scaled by S_noise. With S_churn = 0 (default) the
    sampler is deterministic and draws no further noise; otherwise churn noise for sample i comes from
    `generators[i]`, one draw per step. The state is kept in float64 as in EDM; the denoiser sees float32
    (latents' dtype).
    """
    round_sigma = round_sigma or (lambda sigma: torch.as_tensor(sigma))
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, round_sigma)
    batch = latents.shape[0]
    work_dtype = latents.dtype

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma_batch = torch.full((batch,), float(sigma), dtype=work_dtype, device=latents.device)
        return denoise_fn(x.to(work_dtype), sigma_batch, class_labels).to(torch.float64)

    x_next = latents.to(torch.float64) * t_steps[0]
    steps = list(zip(t_steps[:-1], t_steps[1:]))
    for i, (t_cur, t_next) in enumerate(progress_bar(steps, "edm-heun", progress)):
        x_cur = x_next
        # Churn: temporarily raise the noise level to t_hat by adding fresh noise, on steps with
        # S_min <= t_cur <= S_max (gamma = 0 elsewhere).
        gamma = min(S_churn / num_steps, math.sqrt(2.0) - 1.0) if S_min <= float(t_cur) <= S_max else 0.0
        t_hat = torch.as_tensor(round_sigma(t_cur + gamma * t_cur), dtype=torch.float64)
        x_hat = x_cur
        if S_churn > 0:
            # Drawn on every step, churned or not, like EDM's generate.py (`randn_like` each step): a sample's
            # generator is consumed the same way as there, so the same seeds give EDM's samples.
            noise = _churn_noise(generators, latents)
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * noise
        # Euler step on dx/dsigma = (x - D(x; sigma)) / sigma.
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # Heun correction, skipped on the last step where sigma_next = 0.
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(work_dtype)


def _churn_noise(generators: Sequence[torch.Generator] | None, latents: torch.Tensor) -> torch.Tensor:
    """float64 standard normal noise of the latents' shape, sample i from generators[i] (global RNG if None)."""
    shape = latents.shape[1:] if generators is not None else latents.shape
    return randn_per_sample(generators, shape, device=latents.device, dtype=torch.float64)


class ADMDenoiser(nn.Module):
    """VE denoiser view D(x; sigma) of an ADM eps-network trained on discrete VP timesteps.

    VP x_t = sqrt(abar_t) (x_0 + sigma_t n) with sigma_t = sqrt((1 - abar_t) / abar_t), so the VE state x is
    fed to the network as x / sqrt(1 + sigma^2), at the timestep t whose sigma_t matches: log sigma_t is
    interpolated linearly between the integer timesteps (or rounded to the nearest one with
    `round_timesteps`, then `round_sigma` snaps the sampler's sigmas to the table as EDM's iDDPMPrecond
    does). D = x - sigma eps; learned-Sigma channels of the output are ignored.
    """

    def __init__(self, eps_model: Callable, alphas_cumprod, round_timesteps: bool = False):
        super().__init__()
        self.eps_model = eps_model
        alphas_cumprod = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        sigmas = torch.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)
        if not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.register_buffer("log_sigmas", torch.log(sigmas), persistent=False)
        self.round_timesteps = round_timesteps
        self.sigma_min = float(sigmas[0])
        self.sigma_max = float(sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous ADM timestep whose sigma_t equals sigma (log-linear interpolation, clamped to the table)."""
        log_sigmas = self.log_sigmas.to(torch.float64)
        log_sigma = torch.log(torch.as_tensor(sigma, dtype=torch.float64).cpu()).clamp(
            float(log_sigmas[0]), float(log_sigmas[-1])
        )
        upper = torch.searchsorted(log_sigmas.cpu(), log_sigma).clamp(1, len(log_sigmas) - 1)
        lower = upper - 1
        frac = (log_sigma - log_sigmas.cpu()[lower]) / (log_sigmas.cpu()[upper] - log_sigmas.cpu()[lower])
        t = lower.to(torch.float64) + frac.clamp(0.0, 1.0)
        return t.round() if self.round_timesteps else t

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at a (possibly fractional) timestep, interpolating log sigma linearly."""
        t = torch.as_tensor(t, dtype=torch.float64).cpu()
        log_sigmas = self.log_sigmas.to(torch.float64).cpu()
        lower = t.floor().long().clamp(0, len(log_sigmas) - 1)
        upper = (lower + 1).clamp(max=len(log_sigmas) - 1)
        frac = t - lower.to(torch.float64)
        return torch.exp(log_sigmas[lower] * (1 - frac) + log_sigmas[upper] * frac)

    def round_sigma(self, sigma):
        """Snap sigma to the discrete table when `round_timesteps`, else leave it unchanged."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return self.t_to_sigma(self.sigma_to_t(sigma)).to(sigma.device) if self.round_timesteps else sigma

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """D(x; sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma))."""
        sigma_b = _sigma_as_batch(sigma, x)
        t = self.sigma_to_t(sigma_b.flatten()).to(device=x.device, dtype=torch.float32)
        output = self.eps_model(x / torch.sqrt(1.0 + sigma_b**2), t, class_labels)
        channels = x.shape[1]
        if output.shape[1] not in (channels, 2 * channels):
            raise ValueError(f"eps-model output has {output.shape[1]} channels for a {channels}-channel input")
        return x - sigma_b * output[:, :channels].to(x.dtype)
