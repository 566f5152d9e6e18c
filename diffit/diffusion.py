"""Discrete-time Gaussian diffusion of ADM / improved DDPM / DiT, used by the latent DiffiT (paper Sec. 4.1).

Training follows Nichol & Dhariwal (2021) as configured by DiT: 1000 linear-beta steps (1e-4 -> 0.02), the
network predicts eps and a learned-range variance (output = [eps | v], v in [-1, 1] interpolating
log beta_t and log beta~_t in log space), and the hybrid loss L = MSE(eps) + L_vlb where the VLB term sees
the predicted mean detached, so it only trains Sigma. Evaluation respaces the chain (`space_timesteps`,
`SpacedDiffusion`) and runs ancestral DDPM (`p_sample`) or DDIM (`ddim_sample`) steps; the step loops live
in `diffit.sampling`, which owns the per-sample random generators.

Model call convention: `model(x_t, t, **model_kwargs)` where `t` is the ORIGINAL ADM timestep as float [N]
in [0, diffusion_steps) -- respaced indices are mapped back before the call -- and `model_kwargs` is passed
through (e.g. `class_labels=`).

All schedule tables are float64 (as in ADM) and are cast to the dtype of the tensors they multiply.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

MODEL_VAR_TYPES = ("learned_range", "fixed_large", "fixed_small")


# ---------------------------------------------------------------------------------------------------------------
# Noise schedules
# ---------------------------------------------------------------------------------------------------------------


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Betas that discretise a continuous alpha_bar(t), t in [0, 1]; clipped at `max_beta` to avoid t=T singularity."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1.0 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """Beta schedule by name: "linear" (DDPM, rescaled so any step count spans the same noise range) or "cosine"."""
    if num_diffusion_timesteps < 1:
        raise ValueError(f"num_diffusion_timesteps must be >= 1, got {num_diffusion_timesteps}")
    if schedule_name == "linear":
        # Ho et al. use 1e-4 -> 0.02 for 1000 steps; scaling keeps the total noise the same for other counts.
        scale = 1000.0 / num_diffusion_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown beta schedule {schedule_name!r}; expected 'linear' or 'cosine'")


# ---------------------------------------------------------------------------------------------------------------
# Gaussian helpers (losses.py of ADM)
# ---------------------------------------------------------------------------------------------------------------


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats. Scalars broadcast."""
    tensor = next(obj for obj in (mean1, logvar1, mean2, logvar2) if isinstance(obj, torch.Tensor))
    logvar1, logvar2 = (torch.as_tensor(v, dtype=tensor.dtype, device=tensor.device) for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF (the one ADM trains with)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under a Gaussian, elementwise, in nats.

    The edge bins absorb the tails (-inf, -1 + 1/255] and [1 - 1/255, inf), so the probabilities of the 256
    bins sum to one.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}"
        )
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def randn_per_sample(
    generators: Sequence[torch.Generator] | None,
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[len(generators), *shape] standard normal noise, row i drawn from generators[i] (on the generator's device).

    Drawing each sample from its own generator makes a sample independent of the batch it is computed in.
    With `generators=None`, `shape` must include the batch dimension and the global RNG is used.
    """
    if generators is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    noise = torch.empty((len(generators), *shape), dtype=dtype, device=generators[0].device if generators else None)
    for row, gen in zip(noise, generators):
        torch.randn(tuple(shape), generator=gen, out=row)  # fills the batch row in place, no extra copy
    return noise.to(device)


def _extract(table: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[timesteps] as [N, 1, ..., 1] in the dtype/device of `like`, ready to broadcast."""
    values = table.to(timesteps.device)[timesteps].to(like.dtype)
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.device)


# ---------------------------------------------------------------------------------------------------------------
# Gaussian diffusion
# ---------------------------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with an eps-predicting reverse model (ADM conventions).

    `t` arguments are indices into this object's own chain (0 .. num_timesteps-1); for a `SpacedDiffusion`
    they are respaced indices, and `timestep_map` turns them into the original timesteps the network sees.
    """

    def __init__(self, betas: np.ndarray, model_var_type: str = "learned_range", original_num_steps: int | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        if model_var_type not in MODEL_VAR_TYPES:
            raise ValueError(f"unknown model_var_type {model_var_type!r}; expected one of {MODEL_VAR_TYPES}")
        self.model_var_type = model_var_type
        self.num_timesteps = len(betas)
        self.original_num_steps = original_num_steps or self.num_timesteps
        self.timestep_map = torch.arange(self.num_timesteps, dtype=torch.long)

        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        # Posterior q(x_{t-1} | x_t, x_0) (Ho et al. Eq. 6-7).
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta~_0 = 0: clip the log at t=0 to beta~_1 like ADM so the log stays finite.
        posterior_log_variance_clipped = (
            np.log(np.append(posterior_variance[1], posterior_variance[1:]))
            if self.num_timesteps > 1
            else np.log(np.maximum(posterior_variance, 1e-20))
        )
        posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)

        def as_tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(array, dtype=np.float64).copy())

        self.betas = as_tensor(betas)
        self.alphas_cumprod = as_tensor(alphas_cumprod)
        self.alphas_cumprod_prev = as_tensor(alphas_cumprod_prev)
        self.sqrt_alphas_cumprod = as_tensor(np.sqrt(alphas_cumprod))
        self.sqrt_one_minus_alphas_cumprod = as_tensor(np.sqrt(1.0 - alphas_cumprod))
        self.sqrt_recip_alphas_cumprod = as_tensor(np.sqrt(1.0 / alphas_cumprod))
        self.sqrt_recipm1_alphas_cumprod = as_tensor(np.sqrt(1.0 / alphas_cumprod - 1.0))
        self.posterior_variance = as_tensor(posterior_variance)
        self.posterior_log_variance_clipped = as_tensor(posterior_log_variance_clipped)
        self.posterior_mean_coef1 = as_tensor(posterior_mean_coef1)
        self.posterior_mean_coef2 = as_tensor(posterior_mean_coef2)
        # "fixed_large" uses beta_t but beta~_1 at t=0 (as ADM) so the decoder step is not too noisy.
        self.fixed_large_log_variance = as_tensor(np.log(np.append(posterior_variance[1:2], betas[1:])))
        self.log_betas = as_tensor(np.log(betas))

    @property
    def learn_sigma(self) -> bool:
        """True when the model outputs the Sigma-interpolation channels after eps."""
        return self.model_var_type == "learned_range"

    # -- forward process -------------------------------------------------------------------------------------

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = _extract(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = _extract(torch.log(1.0 - self.alphas_cumprod), t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        noise = torch.randn_like(x_start) if noise is None else noise
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}")
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0)."""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x_start + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        variance = _extract(self.posterior_variance, t, x_t)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    # -- reverse process -------------------------------------------------------------------------------------

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Chain indices -> the float timesteps the network is called with (original ADM timesteps)."""
        return self.timestep_map.to(t.device)[t].to(torch.float32)

    def call_model(
        self, model: Callable, x_t: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None = None
    ) -> torch.Tensor:
        """Run `model(x_t, original_t, **model_kwargs)` and check its channel count against the variance type."""
        output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if output.shape[0] != x_t.shape[0] or output.shape[1] != expected or output.shape[2:] != x_t.shape[2:]:
            raise ValueError(
                f"model output has shape {tuple(output.shape)}; expected [{x_t.shape[0]}, {expected}, "
                f"{', '.join(map(str, x_t.shape[2:]))}] for model_var_type={self.model_var_type!r} "
                f"(learned Sigma needs 2*C output channels: eps then v)"
            )
        return output.to(x_t.dtype)

    def _predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def output_to_distribution(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> dict[str, torch.Tensor]:
        """Network output -> p(x_{t-1} | x_t) as a dict: mean, log_variance, pred_xstart, eps."""
        channels = x_t.shape[1]
        eps = model_output[:, :channels]
        if self.model_var_type == "learned_range":
            # v in [-1, 1] interpolates between the two analytic bounds, in log space (improved DDPM Eq. 15).
            # frac = (v + 1) / 2; log_var = frac * max_log + (1 - frac) * min_log, written with fewer full-size ops.
            min_log = _extract(self.posterior_log_variance_clipped, t, x_t)
            half_range = 0.5 * (_extract(self.log_betas, t, x_t) - min_log)
            log_variance = torch.addcmul(min_log, model_output[:, channels:] + 1.0, half_range)
        else:
            log_table = (
                self.fixed_large_log_variance
                if self.model_var_type == "fixed_large"
                else self.posterior_log_variance_clipped
            )
            log_variance = _extract(log_table, t, x_t).expand_as(x_t)
        pred_xstart = self._predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    def p_mean_variance(
        self,
        model: Callable,
        x: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Call the model and return the reverse distribution p(x_{t-1} | x_t) (see `output_to_distribution`)."""
        return self.output_to_distribution(self.call_model(model, x, t, model_kwargs), x, t, clip_denoised)

    def p_sample(
        self,
        model: Callable,
        x: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """One ancestral DDPM step x_t -> x_{t-1} = mean + sigma * noise (no noise added at t = 0)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        nonzero_mask = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        sample = torch.addcmul(out["mean"], nonzero_mask * torch.exp(0.5 * out["log_variance"]), noise)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: Callable,
        x: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        eta: float = 0.0,
        clip_denoised: bool = False,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """One DDIM step (Song et al. Eq. 12) to the previous index of this chain; eta=0 is deterministic."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        # eps is re-derived from the (possibly clipped) x_0 prediction, as ADM does.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        sample = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
            + torch.sqrt((1 - alpha_bar_prev - sigma**2).clamp(min=0.0)) * eps
        )
        if eta > 0:
            if noise is None:
                raise ValueError("ddim_sample with eta > 0 needs a noise tensor")
            nonzero_mask = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
            sample = sample + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # -- training ----------------------------------------------------------------------------------------------

    def _vb_terms_bpd(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample VLB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.output_to_distribution(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model: Callable,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Hybrid loss of improved DDPM: dict(loss, mse, vb), each [N].

        mse = mean ||eps - eps_theta||^2. With a learned Sigma, vb is the VLB term computed from the output
        with eps DETACHED (the "frozen out" of ADM/DiT), so the VLB trains only the variance channels; it is
        scaled by num_timesteps / 1000 like ADM's rescaled loss (a factor of 1 for 1000 steps). Without a
        learned Sigma, vb is zero.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise)
        model_output = self.call_model(model, x_t, t, model_kwargs)
        channels = x_start.shape[1]
        eps = model_output[:, :channels]
        mse = mean_flat((noise - eps) ** 2)
        if self.learn_sigma:
            frozen_output = torch.cat([eps.detach(), model_output[:, channels:]], dim=1)
            vb = self._vb_terms_bpd(frozen_output, x_start, x_t, t) * (self.num_timesteps / 1000.0)
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


# ---------------------------------------------------------------------------------------------------------------
# Timestep respacing (respace.py of ADM)
# ---------------------------------------------------------------------------------------------------------------


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Timesteps of the original chain to keep.

    `section_counts` is "ddimN" (a fixed stride giving exactly N steps, starting at 0), or a count / comma
    list of counts ("250", "10,15,20"): the chain is cut into equal sections and each section keeps that many
    evenly spaced steps, first and last included (so "250" of 1000 keeps 0 and 999).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot take exactly {desired_count} steps with an integer stride from "
                f"{num_timesteps}; use a plain count like '{desired_count}' instead"
            )
        try:
            section_counts = [int(count) for count in section_counts.split(",")]
        except ValueError as err:
            raise ValueError(
                f"bad timestep_respacing {section_counts!r}: expected 'N', 'ddimN' or 'N1,N2,...'"
            ) from err
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx = 0
    kept: list[int] = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= section_count <= size:
            raise ValueError(f"cannot take {section_count} steps from a section of {size} timesteps")
        frac_stride = 1.0 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulate the fractional stride (rather than k * stride) so ties round exactly as ADM's respace.py.
        position = 0.0
        for _ in range(section_count):
            kept.append(start_idx + round(position))
            position += frac_stride
        start_idx += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that keeps only `use_timesteps` of a base chain, with betas recomputed so the kept steps
    have exactly the base abar_t; the network is still called with the original timesteps."""

    def __init__(
        self, use_timesteps: set[int] | Sequence[int], base_betas: np.ndarray, model_var_type: str = "learned_range"
    ):
        base = GaussianDiffusion(base_betas, model_var_type)
        use_timesteps = set(int(t) for t in use_timesteps)
        if not use_timesteps or min(use_timesteps) < 0 or max(use_timesteps) >= base.num_timesteps:
            raise ValueError(f"use_timesteps must be a non-empty subset of [0, {base.num_timesteps})")
        timestep_map, new_betas, last_alpha_cumprod = [], [], 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod.tolist()):
            if i in use_timesteps:
                new_betas.append(1.0 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                timestep_map.append(i)
        super().__init__(np.array(new_betas), model_var_type, original_num_steps=base.num_timesteps)
        self.timestep_map = torch.tensor(timestep_map, dtype=torch.long)


def create_diffusion(
    timestep_respacing: str | None = None,
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    diffusion_steps: int = 1000,
    sigma_small: bool = False,
) -> GaussianDiffusion:
    """The DiT/DiffiT diffusion: `diffusion_steps` steps of `noise_schedule`, optionally respaced.

    Without a learned Sigma the variance is fixed to beta_t ("fixed_large", DiT's default) or to beta~_t when
    `sigma_small`. `timestep_respacing` None or "" gives the full chain (training); "250" or "ddim50" respace it.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    model_var_type = "learned_range" if learn_sigma else ("fixed_small" if sigma_small else "fixed_large")
    if not timestep_respacing:
        return GaussianDiffusion(betas, model_var_type)
    return SpacedDiffusion(space_timesteps(diffusion_steps, timestep_respacing), betas, model_var_type)
