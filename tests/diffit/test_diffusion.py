"""ADM Gaussian diffusion (diffit/diffusion.py) against closed forms and hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from diffit.diffusion import (
    GaussianDiffusion,
    SpacedDiffusion,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    get_named_beta_schedule,
    normal_kl,
    randn_per_sample,
    space_timesteps,
)


def _linear_alphas_cumprod(steps: int = 1000) -> np.ndarray:
    """Independent reference: DDPM linear schedule 1e-4 -> 0.02 and its cumulative product."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, steps))


class RecordingModel(torch.nn.Module):
    """eps = 0, v = 0; records the timesteps and kwargs it is called with."""

    def __init__(self, learn_sigma: bool = True):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.seen_t: list[torch.Tensor] = []
        self.seen_kwargs: list[dict] = []

    def forward(self, x, t, **kwargs):
        self.seen_t.append(t.clone())
        self.seen_kwargs.append(kwargs)
        channels = 2 * x.shape[1] if self.learn_sigma else x.shape[1]
        return torch.zeros(x.shape[0], channels, *x.shape[2:], dtype=x.dtype)


class ParamModel(torch.nn.Module):
    """Output is a learnable tensor (broadcast over the batch), so gradients per channel can be inspected."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        self.learn_sigma = True
        self.out = torch.nn.Parameter(
            torch.linspace(-0.5, 0.5, 2 * channels * size * size).reshape(1, 2 * channels, size, size)
        )

    def forward(self, x, t, **kwargs):
        return self.out.expand(x.shape[0], -1, -1, -1)


def test_linear_schedule_endpoints_and_cosine_alpha_bar():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    # The cosine schedule reproduces alpha_bar(t) = f(t)/f(0), f(t) = cos^2((t/T + s)/(1+s) pi/2), where unclipped.
    cosine = get_named_beta_schedule("cosine", 100)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    alphas_cumprod = np.cumprod(1.0 - cosine)
    for i in (0, 10, 50, 90):
        assert alphas_cumprod[i] == pytest.approx(f((i + 1) / 100) / f(0.0), rel=1e-10)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        get_named_beta_schedule("quadratic", 10)


def test_q_sample_moments():
    diffusion = create_diffusion()
    num_draws, x0_value = 200_000, 0.7
    x_start = torch.full((num_draws, 1, 1, 1), x0_value, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    for timestep in (0, 100, 500, 999):
        t = torch.full((num_draws,), timestep, dtype=torch.long)
        noise = torch.randn(x_start.shape, generator=generator, dtype=torch.float64)
        x_t = diffusion.q_sample(x_start, t, noise)
        alpha_bar = _linear_alphas_cumprod()[timestep]
        std = math.sqrt(1 - alpha_bar)
        # 5 standard errors of the mean; variance within 2% (its relative standard error is 0.3%).
        assert x_t.mean().item() == pytest.approx(math.sqrt(alpha_bar) * x0_value, abs=5 * std / math.sqrt(num_draws))
        assert x_t.var().item() == pytest.approx(1 - alpha_bar, rel=0.02)


@pytest.mark.parametrize("timestep", [1, 10, 500, 999])
def test_posterior_matches_bayes_closed_form(timestep):
    diffusion = create_diffusion()
    alphas_cumprod = _linear_alphas_cumprod()
    beta = 1 - alphas_cumprod[timestep] / alphas_cumprod[timestep - 1]
    prev = alphas_cumprod[timestep - 1]
    # Product of q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) and q(x_t | x_{t-1}) = N(sqrt(1-b) x, b).
    precision = 1 / (1 - prev) + (1 - beta) / beta
    x0, xt = (
        torch.tensor([[[[0.3]]], [[[-1.2]]]], dtype=torch.float64),
        torch.tensor([[[[0.9]]], [[[0.1]]]], dtype=torch.float64),
    )
    expected_mean = (math.sqrt(prev) * x0 / (1 - prev) + math.sqrt(1 - beta) * xt / beta) / precision
    t = torch.full((2,), timestep, dtype=torch.long)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-9, atol=1e-12)
    assert variance.flatten()[0].item() == pytest.approx(1 / precision, rel=1e-9)
    assert log_variance.flatten()[0].item() == pytest.approx(math.log(1 / precision), rel=1e-9)


def test_posterior_at_t0_is_x0_and_log_variance_is_clipped():
    diffusion = create_diffusion()
    x0, xt = torch.randn(3, 2, 2, 2, dtype=torch.float64), torch.randn(3, 2, 2, 2, dtype=torch.float64)
    t = torch.zeros(3, dtype=torch.long)
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x0, xt, t)
    torch.testing.assert_close(mean, x0)
    assert variance.abs().max().item() == 0.0
    # log beta~_0 = -inf is replaced by log beta~_1 (ADM), so the VLB stays finite.
    assert torch.isfinite(log_variance).all()
    assert log_variance.flatten()[0].item() == pytest.approx(math.log(diffusion.posterior_variance[1].item()))


def test_normal_kl_hand_cases():
    mean = torch.tensor([0.3, -2.0])
    logvar = torch.tensor([0.1, -1.0])
    assert normal_kl(mean, logvar, mean, logvar).abs().max().item() == 0.0
    # KL(N(0,1) || N(1,1)) = 1/2; KL(N(0,1) || N(0,4)) = (-1 + ln 4 + 1/4) / 2.
    zero = torch.zeros(1)
    assert normal_kl(zero, zero, zero + 1, zero).item() == pytest.approx(0.5)
    expected = 0.5 * (-0.75 + math.log(4))
    assert normal_kl(zero, zero, zero, zero + math.log(4)).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "mean,log_scale", [(0.0, math.log(0.1)), (0.93, math.log(0.02)), (-0.4, math.log(3.0)), (1.5, math.log(0.5))]
)
def test_discretized_gaussian_likelihood_sums_to_one(mean, log_scale):
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)  # bin centres of 8-bit data scaled to [-1, 1]
    log_probs = discretized_gaussian_log_likelihood(
        bins, means=torch.full_like(bins, mean), log_scales=torch.full_like(bins, log_scale)
    )
    assert log_probs.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (log_probs <= 0).all()


def test_space_timesteps_sections_and_ddim():
    kept = sorted(space_timesteps(1000, "250"))
    assert len(kept) == 250 and kept[0] == 0 and kept[-1] == 999
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    # Sections: 300 steps in 3 sections of 100, keeping 10, 15, 20 (ADM's docstring example).
    sections = sorted(space_timesteps(300, "10,15,20"))
    assert len(sections) == 45
    assert sum(t < 100 for t in sections) == 10 and sum(100 <= t < 200 for t in sections) == 15
    assert sections[:3] == [0, 11, 22] and sections[-1] == 299
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(10, "11")


def test_respaced_alphas_cumprod_equal_originals_at_kept_steps():
    base = create_diffusion()
    for respacing in ("250", "ddim50", "10"):
        spaced = create_diffusion(respacing)
        assert isinstance(spaced, SpacedDiffusion)
        kept = sorted(space_timesteps(1000, respacing))
        assert spaced.timestep_map.tolist() == kept
        torch.testing.assert_close(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)
        assert spaced.original_num_steps == 1000


def test_spaced_model_sees_original_timesteps_and_kwargs():
    spaced = create_diffusion("10")
    model = RecordingModel()
    x = torch.zeros(2, 4, 2, 2)
    labels = torch.tensor([3, 5])
    out = spaced.p_sample(model, x, torch.tensor([9, 1]), torch.zeros_like(x), model_kwargs={"class_labels": labels})
    assert out["sample"].shape == x.shape
    assert model.seen_t[0].dtype == torch.float32
    assert model.seen_t[0].tolist() == [999.0, float(spaced.timestep_map[1])]
    assert model.seen_kwargs[0]["class_labels"] is labels


def test_learned_range_interpolates_log_beta_and_log_posterior_variance():
    diffusion = create_diffusion()
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([400, 400])
    for v, table in ((1.0, diffusion.log_betas), (-1.0, diffusion.posterior_log_variance_clipped)):
        output = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)
        log_variance = diffusion.output_to_distribution(output, x, t)["log_variance"]
        torch.testing.assert_close(log_variance, torch.full_like(x, table[400].item()))
    middle = diffusion.output_to_distribution(torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1), x, t)
    expected = 0.5 * (diffusion.log_betas[400] + diffusion.posterior_log_variance_clipped[400])
    torch.testing.assert_close(middle["log_variance"], torch.full_like(x, expected.item()))
    # Fixed variances: beta_t ("fixed_large", beta~_1 at t = 0 as ADM) and beta~_t ("fixed_small").
    eps_only = torch.zeros_like(x)
    large = create_diffusion(learn_sigma=False).output_to_distribution(eps_only, x, t)["log_variance"]
    torch.testing.assert_close(large, torch.full_like(x, math.log(diffusion.betas[400].item())))
    small = create_diffusion(learn_sigma=False, sigma_small=True)
    torch.testing.assert_close(
        small.output_to_distribution(eps_only, x, torch.tensor([0, 0]))["log_variance"],
        torch.full_like(x, math.log(diffusion.posterior_variance[1].item())),
    )


def test_wrong_model_output_channels_is_a_clear_error():
    diffusion = create_diffusion()
    model = RecordingModel(learn_sigma=False)  # C channels where the learned-Sigma diffusion expects 2C
    with pytest.raises(ValueError, match="2\\*C output channels"):
        diffusion.training_losses(model, torch.zeros(2, 4, 2, 2), torch.tensor([1, 2]))


def test_training_losses_finite_and_vb_does_not_reach_the_mean():
    torch.manual_seed(0)
    diffusion = create_diffusion()
    model = ParamModel(channels=2, size=2)
    x_start = torch.rand(6, 2, 2, 2) * 2 - 1
    t = torch.tensor([0, 1, 10, 300, 700, 999])
    losses = diffusion.training_losses(model, x_start, t, model_kwargs={}, noise=torch.randn_like(x_start))
    assert set(losses) == {"loss", "mse", "vb"}
    for value in losses.values():
        assert value.shape == (6,) and torch.isfinite(value).all()
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    assert (losses["vb"] > 0).all()

    losses["vb"].sum().backward()
    grad = model.out.grad
    assert grad[:, :2].abs().max().item() == 0.0, "vb term must not backprop into the eps (mean) channels"
    assert grad[:, 2:].abs().max().item() > 0.0, "vb term must train the Sigma channels"

    model.out.grad = None
    losses = diffusion.training_losses(model, x_start, t, noise=torch.randn_like(x_start))
    losses["mse"].sum().backward()
    assert model.out.grad[:, 2:].abs().max().item() == 0.0 and model.out.grad[:, :2].abs().max().item() > 0.0


def test_training_losses_mse_is_eps_error_and_fixed_sigma_has_zero_vb():
    diffusion = create_diffusion(learn_sigma=False)
    model = RecordingModel(learn_sigma=False)  # predicts eps = 0, so mse = mean(noise^2)
    x_start = torch.zeros(3, 1, 2, 2)
    noise = torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
    losses = diffusion.training_losses(model, x_start, torch.tensor([5, 6, 7]), noise=noise)
    torch.testing.assert_close(losses["mse"], torch.tensor([1.0, 4.0, 9.0]))
    assert losses["vb"].abs().max().item() == 0.0


def test_vb_scaled_by_num_timesteps_over_1000():
    base = GaussianDiffusion(get_named_beta_schedule("linear", 1000))
    x_start = torch.rand(2, 1, 2, 2) * 2 - 1
    output = torch.cat([torch.randn_like(x_start), torch.rand_like(x_start) * 2 - 1], dim=1)
    t = torch.tensor([3, 400])
    model = lambda x, timesteps, **kwargs: output
    unscaled = base._vb_terms_bpd(output, x_start, base.q_sample(x_start, t, torch.zeros_like(x_start)), t)
    losses = base.training_losses(model, x_start, t, noise=torch.zeros_like(x_start))
    torch.testing.assert_close(losses["vb"], unscaled)  # factor 1000 / 1000
    spaced = create_diffusion("250")
    spaced_losses = spaced.training_losses(model, x_start, torch.tensor([1, 100]), noise=torch.zeros_like(x_start))
    x_t = spaced.q_sample(x_start, torch.tensor([1, 100]), torch.zeros_like(x_start))
    expected = spaced._vb_terms_bpd(output, x_start, x_t, torch.tensor([1, 100])) * 0.25
    torch.testing.assert_close(spaced_losses["vb"], expected)


def test_p_sample_adds_no_noise_at_t0_and_ddim_eta0_ignores_noise():
    diffusion = create_diffusion("10")
    model = RecordingModel()
    x = torch.randn(2, 4, 2, 2)
    noise = torch.randn_like(x)
    t0 = torch.zeros(2, dtype=torch.long)
    mean = diffusion.p_mean_variance(model, x, t0)["mean"]
    torch.testing.assert_close(diffusion.p_sample(model, x, t0, noise)["sample"], mean)
    t = torch.full((2,), 5, dtype=torch.long)
    first = diffusion.ddim_sample(model, x, t, noise=None, eta=0.0)["sample"]
    second = diffusion.ddim_sample(model, x, t, noise=noise, eta=0.0)["sample"]
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="needs a noise tensor"):
        diffusion.ddim_sample(model, x, t, noise=None, eta=1.0)


def test_ddim_eta1_variance_equals_ddpm_posterior_variance():
    # With eta = 1, DDIM's sigma_t^2 is beta~_t of the (respaced) chain (Song et al. Sec. 4.1).
    diffusion = create_diffusion("50", learn_sigma=False, sigma_small=True)
    x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    model = lambda x_t, timesteps, **kwargs: torch.zeros_like(x_t)
    t = torch.tensor([20])
    unit_noise = diffusion.ddim_sample(model, x, t, noise=torch.ones_like(x), eta=1.0)["sample"]
    no_noise = diffusion.ddim_sample(model, x, t, noise=torch.zeros_like(x), eta=1.0)["sample"]
    sigma = (unit_noise - no_noise).item()
    assert sigma**2 == pytest.approx(diffusion.posterior_variance[20].item(), rel=1e-9)


def test_randn_per_sample_rows_follow_their_generators():
    generators = [torch.Generator().manual_seed(seed) for seed in (7, 8)]
    noise = randn_per_sample(generators, (2, 3))
    assert noise.shape == (2, 2, 3)
    torch.testing.assert_close(noise[1], torch.randn(2, 3, generator=torch.Generator().manual_seed(8)))
