"""Classifier-free guidance (diffit/guidance.py) and the sampling entry point (diffit/sampling.py).

Samplers are checked with analytic ideal denoisers: for a dataset of a few points,
D(x; sigma) = softmax_i(-|x - y_i|^2 / 2 sigma^2)-weighted mean of the points; for Gaussian data N(0, s^2),
D(x; sigma) = x s^2 / (s^2 + sigma^2). ADM samplers see the eps-model built from the same D:
eps(x_t, t) = (x_t / sqrt(abar_t) - D(x_t / sqrt(abar_t); sigma_t)) / sigma_t, sigma_t = sqrt((1 - abar_t) / abar_t).
"""

import math

import numpy as np
import pytest
import torch

from diffit.edm import EDMPrecond, preconditioning_coefficients
from diffit.guidance import (
    ClassifierFreeGuidance,
    GuidanceConfig,
    guidance_scale,
    guidance_scale_at_timestep,
    guided_forward,
    sigma_progress,
    timestep_progress,
)
from diffit.sampling import sample, sample_with_stats

POINTS = torch.tensor([[0.8, -0.6, 0.4, -0.2], [-0.7, 0.5, -0.3, 0.9], [0.1, 0.9, 0.8, -0.8]], dtype=torch.float64)
ALPHAS_CUMPROD = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
LOG_SIGMAS = 0.5 * np.log((1.0 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD)


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors gain nothing from intra-op threads, and thread hand-offs dominate on a loaded machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def points_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Ideal denoiser of the uniform distribution on POINTS (flattened samples)."""
    flat = x.reshape(x.shape[0], -1).double()
    sq_dist = ((flat[:, None] - POINTS[None]) ** 2).sum(-1)
    weights = torch.softmax(-sq_dist / (2 * sigma.double().reshape(-1, 1) ** 2), dim=1)
    return (weights @ POINTS).reshape(x.shape)


def gaussian_denoiser(s: float):
    """Ideal denoiser of N(0, s^2 I)."""
    return lambda x, sigma: x.double() * s**2 / (s**2 + sigma.double().reshape(-1, *[1] * (x.ndim - 1)) ** 2)


class IdealEpsModel(torch.nn.Module):
    """ADM eps-model (with a learned-Sigma output fixed at v = -1, i.e. beta~_t) built from an ideal denoiser.

    Fractional timesteps (EDM Heun through the adapter) interpolate log sigma_t linearly.
    """

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.learn_sigma = True
        self.num_classes = 0

    def forward(self, x, t, class_labels=None):
        sigma = torch.from_numpy(np.exp(np.interp(t.double().numpy(), np.arange(1000), LOG_SIGMAS)))
        sigma_b = sigma.reshape(-1, 1, 1, 1)
        x_ve = x.double() * torch.sqrt(1 + sigma_b**2)  # x_t / sqrt(abar_t)
        eps = (x_ve - self.denoiser(x_ve, sigma)) / sigma_b
        return torch.cat([eps, -torch.ones_like(eps)], dim=1).to(x.dtype)


class IdealRawNet(torch.nn.Module):
    """Raw EDM network F whose EDMPrecond(F) is exactly the ideal denoiser: F = (D - c_skip x) / c_out."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.num_classes = 0

    def forward(self, scaled_x, c_noise, class_labels=None):
        sigma = torch.exp(4 * c_noise.double())
        c_skip, c_out, c_in, _ = preconditioning_coefficients(sigma.reshape(-1, 1, 1, 1), 0.5)
        x = scaled_x.double() / c_in
        return ((self.denoiser(x, sigma) - c_skip * x) / c_out).to(scaled_x.dtype)


class TinyConditionalNet(torch.nn.Module):
    """Small class-conditional net following the latent interface (learned Sigma, null class = num_classes)."""

    def __init__(self, channels=4, num_classes=5, learn_sigma=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.in_channels, self.num_classes, self.learn_sigma = channels, num_classes, learn_sigma
        self.null_class = num_classes
        out_channels = 2 * channels if learn_sigma else channels
        self.conv = torch.nn.Conv2d(channels, out_channels, 3, padding=1)
        self.label_embedding = torch.nn.Embedding(num_classes + 1, out_channels)
        self.seen_batches, self.seen_labels, self.seen_t = [], [], []

    def forward(self, x, t, class_labels=None):
        self.seen_batches.append(x.shape[0])
        self.seen_labels.append(None if class_labels is None else class_labels.clone())
        self.seen_t.append(t.clone())
        out = self.conv(x) + torch.cos(t / 300.0).reshape(-1, 1, 1, 1)
        if class_labels is not None:
            out = out + self.label_embedding(class_labels)[:, :, None, None]
        return torch.tanh(out)


def _nearest_point_distance(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    distances = torch.cdist(samples.reshape(samples.shape[0], -1).double(), POINTS)
    return distances.min(dim=1).values, distances.argmin(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------------------------


def test_power_cosine_schedule_start_middle_end():
    config = GuidanceConfig(scale=4.6, schedule="power-cosine", power=4.0)
    assert guidance_scale(config, 0.0) == 1.0  # start of sampling (t = T)
    assert guidance_scale(config, 1.0) == pytest.approx(4.6)  # end (t = 0)
    # Middle: 1 + 3.6 * 0.5 * (1 - cos(pi / 16)) = 1 + 1.8 * 0.01921472 = 1.0345865
    assert guidance_scale(config, 0.5) == pytest.approx(1.0345865, abs=1e-7)
    # In ADM timesteps (released DiffiT code): phase = (1 - t/1000)^4 pi.
    assert guidance_scale_at_timestep(config, 0) == pytest.approx(4.6)
    assert guidance_scale_at_timestep(config, 500) == pytest.approx(1.0345865, abs=1e-7)
    assert guidance_scale_at_timestep(config, 999) == pytest.approx(1.0, abs=1e-10)
    t = torch.tensor([999.0, 750.0, 500.0, 250.0, 0.0], dtype=torch.float64)
    expected = (4.6 - 1) * 0.5 * (1 - torch.cos(((1 - t / 1000) ** 4) * math.pi)) + 1
    torch.testing.assert_close(guidance_scale_at_timestep(config, t), expected)
    assert (guidance_scale_at_timestep(config, t)[1:] > guidance_scale_at_timestep(config, t)[:-1]).all()
    constant = GuidanceConfig(scale=1.49)
    assert guidance_scale(constant, 0.3) == 1.49


def test_guidance_config_validation():
    with pytest.raises(ValueError, match="unknown guidance schedule"):
        GuidanceConfig(scale=2.0, schedule="linear")
    with pytest.raises(ValueError, match="guided channels"):
        GuidanceConfig(scale=2.0, channels=0)
    assert not GuidanceConfig().enabled and GuidanceConfig(scale=1.5).enabled


def test_sigma_progress_on_the_karras_grid():
    from diffit.edm import edm_sigma_steps

    sigmas = edm_sigma_steps(18)[:-1]
    torch.testing.assert_close(sigma_progress(sigmas), torch.arange(18, dtype=torch.float64) / 17)
    assert timestep_progress(torch.tensor(0.0)).item() == 1.0


def _label_dependent_model(x, noise_labels, class_labels):
    """Output 2C channels; every channel depends on the label (null label -> 0), so cond != uncond everywhere."""
    value = (class_labels.to(x.dtype) + 1.0) * (class_labels != 7)
    channel_index = torch.arange(1, 9, dtype=x.dtype).reshape(1, 8, 1, 1)
    return x.repeat(1, 2, 1, 1) * 0.1 + value.reshape(-1, 1, 1, 1) * channel_index


def test_three_channel_guidance_changes_channels_0_to_2_only():
    x = torch.randn(2, 4, 3, 3)
    t = torch.tensor([10.0, 20.0])
    labels = torch.tensor([1, 2])
    cond = _label_dependent_model(x, t, labels)
    uncond = _label_dependent_model(x, t, torch.full_like(labels, 7))
    guided = guided_forward(_label_dependent_model, x, t, labels, scale=3.0, null_class=7, channels=3)
    assert torch.equal(guided[:, 3:], cond[:, 3:])  # 4th eps channel and all Sigma channels from the cond half
    torch.testing.assert_close(guided[:, :3], uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]))
    assert (guided[:, :3] - cond[:, :3]).abs().min() > 0.1
    all_eps = guided_forward(_label_dependent_model, x, t, labels, scale=3.0, null_class=7, channels=None)
    torch.testing.assert_close(all_eps[:, :4], uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4]))
    assert torch.equal(all_eps[:, 4:], cond[:, 4:])  # Sigma channels are never guided


def test_guidance_is_one_batched_call_with_null_labels():
    calls = []

    def model(x, noise_labels, class_labels):
        calls.append((x.shape[0], class_labels.clone(), noise_labels.clone()))
        return _label_dependent_model(x, noise_labels, class_labels)

    guided_forward(
        model,
        torch.zeros(3, 4, 2, 2),
        torch.tensor([5.0, 6.0, 7.0]),
        torch.tensor([0, 1, 2]),
        scale=2.0,
        null_class=9,
        channels=3,
    )
    assert len(calls) == 1
    batch, labels, noise_labels = calls[0]
    assert batch == 6 and labels.tolist() == [0, 1, 2, 9, 9, 9]
    assert noise_labels.tolist() == [5.0, 6.0, 7.0, 5.0, 6.0, 7.0]


def test_scale_one_is_exactly_the_conditional_model():
    x, t, labels = torch.randn(2, 4, 3, 3), torch.tensor([1.0, 2.0]), torch.tensor([3, 4])
    direct = _label_dependent_model(x, t, labels)
    assert torch.equal(guided_forward(_label_dependent_model, x, t, labels, scale=1.0, null_class=7), direct)
    wrapper = ClassifierFreeGuidance(
        _label_dependent_model,
        GuidanceConfig(scale=1.0, schedule="power-cosine"),
        null_class=7,
        progress_fn=timestep_progress,
    )
    assert torch.equal(wrapper(x, t, labels), direct)


def test_power_cosine_wrapper_uses_per_sample_timestep_scale():
    config = GuidanceConfig(scale=4.6, schedule="power-cosine", channels=3)
    wrapper = ClassifierFreeGuidance(
        _label_dependent_model, config, null_class=7, progress_fn=lambda t: timestep_progress(t.double(), 1000)
    )
    x = torch.zeros(3, 4, 1, 1)
    t = torch.tensor([999.0, 500.0, 0.0])
    labels = torch.tensor([0, 0, 0])  # cond channel c = (0 + 1) * (c + 1), uncond = 0 -> guided = scale * (c + 1)
    out = wrapper(x, t, labels)
    scales = guidance_scale_at_timestep(config, t.double()).float()
    torch.testing.assert_close(out[:, 0, 0, 0], scales)
    torch.testing.assert_close(out[:, 2, 0, 0], 3 * scales)
    torch.testing.assert_close(out[:, 3, 0, 0], torch.full((3,), 4.0))


# ---------------------------------------------------------------------------------------------------------------
# Samplers with ideal denoisers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler,steps,kind", [("ddpm", 250, "adm"), ("ddim", 50, "adm"), ("edm-heun", 18, "adm"), ("edm-heun", 18, "edm")]
)
def test_samplers_land_on_data_points(sampler, steps, kind):
    model = IdealEpsModel(points_denoiser) if kind == "adm" else IdealRawNet(points_denoiser)
    samples = sample(model, (4, 1, 1), None, list(range(32)), sampler=sampler, steps=steps, kind=kind)
    distance, which = _nearest_point_distance(samples)
    # Measured < 2e-7 for all four; the ideal denoiser collapses onto a point well before the last step.
    assert distance.max().item() < 1e-4
    assert set(which.tolist()) == {0, 1, 2}, "every data point should be reached from 32 seeds"


def _ddim_scale_on_gaussian(s: float, steps: int) -> float:
    """Independent scalar DDIM(eta=0) recursion for N(0, s^2): DDIM is Euler in sigma on the VE ODE."""
    kept = sorted({round(k * 999 / (steps - 1)) for k in range(steps)})
    sigmas = [math.sqrt((1 - ALPHAS_CUMPROD[t]) / ALPHAS_CUMPROD[t]) for t in reversed(kept)] + [0.0]
    x = math.sqrt(1 + sigmas[0] ** 2)  # VP noise 1 -> VE state
    for sigma, sigma_prev in zip(sigmas[:-1], sigmas[1:]):
        denoised = x * s**2 / (s**2 + sigma**2)
        x = denoised + sigma_prev * (x - denoised) / sigma
    return x


def _seed_noise(seeds, shape):
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])


# (sampler, steps, kind, tolerance on |var / s^2 - 1|). Measured: DDIM-50 -10.0%, DDIM-250 -1.2%,
# Heun-18 (adm adapter) +10.8%, Heun-18 (edm) +12.6%, Heun-40 (edm) +3.1%: the discretisation error of these
# step counts on a single-scale Gaussian at s = 0.5, plus ~1.1% sampling error of the variance estimate.
GAUSSIAN_CASES = [
    ("ddim", 50, "adm", 0.13),
    ("ddim", 250, "adm", 0.03),
    ("edm-heun", 18, "adm", 0.14),
    ("edm-heun", 18, "edm", 0.16),
    ("edm-heun", 40, "edm", 0.05),
]


@pytest.mark.parametrize("sampler,steps,kind,tolerance", GAUSSIAN_CASES)
def test_deterministic_samplers_recover_gaussian_variance(sampler, steps, kind, tolerance):
    s, shape, seeds = 0.5, (4, 4, 4), list(range(256))
    model = IdealEpsModel(gaussian_denoiser(s)) if kind == "adm" else IdealRawNet(gaussian_denoiser(s))
    samples = sample(model, shape, None, seeds, sampler=sampler, steps=steps, kind=kind).double()
    assert abs(samples.var().item() / s**2 - 1) < tolerance
    # The map noise -> sample is linear for Gaussian data: samples = k * initial noise (regenerated from the seeds).
    noise = _seed_noise(seeds, shape).double()
    k = ((samples * noise).sum() / (noise * noise).sum()).item()
    assert (samples - k * noise).abs().max().item() < 1e-5
    if sampler == "ddim":
        assert k == pytest.approx(_ddim_scale_on_gaussian(s, steps), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# sample(): determinism, call counts, timesteps, errors
# ---------------------------------------------------------------------------------------------------------------

DETERMINISM_CASES = [
    dict(sampler="ddpm", steps=20, kind="adm"),
    dict(sampler="ddim", steps=10, kind="adm", eta=0.5),
    dict(sampler="edm-heun", steps=6, kind="adm", S_churn=30.0),
    dict(sampler="ddpm", steps=20, kind="adm", guidance=GuidanceConfig(scale=4.6, schedule="power-cosine")),
    dict(sampler="edm-heun", steps=6, kind="edm", S_churn=30.0, guidance=GuidanceConfig(scale=2.0, channels=None)),
]


@pytest.mark.parametrize("options", DETERMINISM_CASES, ids=lambda o: f"{o['sampler']}-{o['kind']}")
def test_sample_is_independent_of_batch_composition(options):
    if options["kind"] == "adm":
        model = TinyConditionalNet()
        shape = (4, 4, 4)
    else:
        model = TinyConditionalNet(channels=3, learn_sigma=False)
        shape = (3, 4, 4)
    seeds, labels = [11, 12, 13, 14], [0, 1, 2, 3]
    full = sample(model, shape, labels, seeds, **options)
    halves = torch.cat(
        [sample(model, shape, labels[:2], seeds[:2], **options), sample(model, shape, labels[2:], seeds[2:], **options)]
    )
    order = [3, 1, 0, 2]
    reordered = sample(model, shape, [labels[i] for i in order], [seeds[i] for i in order], **options)
    # Same noise bit for bit; measured bitwise-equal here, the tolerance allows batch-size-dependent kernels.
    torch.testing.assert_close(halves, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reordered, full[order], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(full).all() and full.shape == (4, *shape)
    assert not torch.allclose(full[0], full[1])
    again = sample(model, shape, labels, seeds, **options)
    assert torch.equal(again, full)


@pytest.mark.parametrize("sampler,steps,expected_calls", [("ddpm", 25, 25), ("ddim", 10, 10), ("edm-heun", 6, 11)])
def test_network_calls_per_sample_with_and_without_guidance(sampler, steps, expected_calls):
    model = TinyConditionalNet()
    _, plain = sample_with_stats(model, (4, 4, 4), [0, 1, 2], [0, 1, 2], sampler=sampler, steps=steps)
    assert plain.network_calls == expected_calls and set(model.seen_batches) == {3}
    model.seen_batches.clear()
    guidance = GuidanceConfig(scale=4.6, schedule="power-cosine")
    _, guided = sample_with_stats(
        model, (4, 4, 4), [0, 1, 2], [0, 1, 2], sampler=sampler, steps=steps, guidance=guidance
    )
    assert guided.network_calls == expected_calls, "batched CFG must not add network calls"
    assert set(model.seen_batches) == {6}
    assert model.seen_labels[-1].tolist() == [0, 1, 2, 5, 5, 5]
    assert 0 < guided.network_time_s <= guided.total_time_s


def test_guidance_scale_one_reproduces_the_conditional_sampler_exactly():
    model = TinyConditionalNet()
    plain = sample(model, (4, 4, 4), [1, 2], [5, 6], sampler="ddpm", steps=15)
    model.seen_labels.clear()
    model.seen_batches.clear()
    unit = sample(
        model,
        (4, 4, 4),
        [1, 2],
        [5, 6],
        sampler="ddpm",
        steps=15,
        guidance=GuidanceConfig(scale=1.0, schedule="power-cosine"),
    )
    assert torch.equal(plain, unit)
    assert set(model.seen_batches) == {2} and all(5 not in labels for labels in model.seen_labels)
    guided = sample(model, (4, 4, 4), [1, 2], [5, 6], sampler="ddpm", steps=15, guidance=GuidanceConfig(scale=3.0))
    assert not torch.allclose(guided, plain)


def test_ddpm_network_sees_original_timesteps_in_descending_order():
    model = TinyConditionalNet()
    sample(model, (4, 4, 4), [0], [0], sampler="ddpm", steps=10)
    seen = [t[0].item() for t in model.seen_t]
    assert seen == [999.0, 888.0, 777.0, 666.0, 555.0, 444.0, 333.0, 222.0, 111.0, 0.0]


def test_sample_restores_training_mode_and_validates_inputs():
    model = TinyConditionalNet()
    model.train()
    sample(model, (4, 4, 4), [0], [0], sampler="ddim", steps=3)
    assert model.training
    with pytest.raises(ValueError, match="one label per seed"):
        sample(model, (4, 4, 4), [0, 1], [0], sampler="ddim", steps=3)
    with pytest.raises(ValueError, match="edm-heun"):
        sample(model, (4, 4, 4), [0], [0], sampler="ddpm", kind="edm")
    with pytest.raises(ValueError, match="steps >= 2"):
        sample(model, (4, 4, 4), [0], [0], sampler="ddpm", steps=1)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(model, (4, 4, 4), [0], [0], sampler="lms")
    with pytest.raises(ValueError, match="sample only flow models; got kind='adm', sampler='euler'"):
        sample(model, (4, 4, 4), [0], [0], sampler="euler")  # a flow sampler on an eps model
    with pytest.raises(ValueError, match="needs class_labels"):
        sample(model, (4, 4, 4), None, [0], sampler="ddim", steps=3, guidance=GuidanceConfig(scale=2.0))
    unconditional = IdealEpsModel(points_denoiser)
    with pytest.raises(ValueError, match="class-conditional"):
        sample(unconditional, (4, 1, 1), [0], [0], sampler="ddim", steps=3, guidance=GuidanceConfig(scale=2.0))


def test_edm_kind_accepts_a_raw_net_or_an_edm_precond():
    net = IdealRawNet(points_denoiser)
    from_raw = sample(net, (4, 1, 1), None, [1, 2], sampler="edm-heun", steps=8, kind="edm")
    from_precond = sample(EDMPrecond(net), (4, 1, 1), None, [1, 2], sampler="edm-heun", steps=8, kind="edm")
    assert torch.equal(from_raw, from_precond)


def test_generator_device_option_and_seed_noise_convention():
    model = TinyConditionalNet()
    on_cpu = sample(model, (4, 4, 4), [0, 1], [3, 4], sampler="ddpm", steps=5)
    on_sampling_device = sample(model, (4, 4, 4), [0, 1], [3, 4], sampler="ddpm", steps=5, generator_device=None)
    assert torch.equal(on_cpu, on_sampling_device)  # the sampling device is the CPU here
    # The first draw of each sample's generator is its initial noise: with eps = 0, DDIM(eta=0) on the
    # timesteps {999, 0} returns x_0 = x_T / sqrt(abar_999), so the seed's noise is recovered exactly.
    zero_eps = IdealEpsModel(lambda x, sigma: x)
    samples = sample(zero_eps, (4, 1, 1), None, [3, 4], sampler="ddim", steps=2)
    expected = _seed_noise([3, 4], (4, 1, 1)) / math.sqrt(ALPHAS_CUMPROD[999])
    torch.testing.assert_close(samples, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# EDM's whole stochastic sampler (S_churn, S_min, S_max, S_noise) through sample()
# ---------------------------------------------------------------------------------------------------------------


def _nvlabs_edm_sampler(
    net,
    latents,
    class_labels=None,
    randn_like=torch.randn_like,
    num_steps=18,
    sigma_min=0.002,
    sigma_max=80,
    rho=7,
    S_churn=0,
    S_min=0,
    S_max=float("inf"),
    S_noise=1,
):
    """NVlabs/edm generate.py `edm_sampler`, verbatim (only reformatted)."""
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t_steps = (
        sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


class _StackedRandomGenerator:
    """NVlabs/edm generate.py: one torch.Generator per sample."""

    def __init__(self, seeds):
        self.generators = [torch.Generator().manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)


class _NVlabsNet:
    """EDM's EDMPrecond call convention around our EDMPrecond: float32 inside, sigma broadcast over the batch."""

    sigma_min, sigma_max = 0.0, float("inf")

    def __init__(self, precond):
        self.precond = precond

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma).to(torch.float32).expand(x.shape[0])
        return self.precond(x.to(torch.float32), sigma, class_labels)


@pytest.mark.parametrize(
    "stochastic",
    [
        dict(S_churn=0.0),
        dict(S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003),  # EDM's ImageNet-64 setting
        dict(S_churn=5.0, S_min=0.5, S_max=5.0, S_noise=0.9),  # churn on the middle steps only
    ],
    ids=["deterministic", "imagenet64", "middle-window"],
)
def test_edm_heun_through_sample_is_nvlabs_edm_sampler_bit_for_bit(stochastic):
    net = IdealRawNet(points_denoiser)
    seeds = [7, 8, 9]
    ours = sample(net, (4, 1, 1), None, seeds, sampler="edm-heun", steps=10, kind="edm", **stochastic)
    rnd = _StackedRandomGenerator(seeds)
    latents = rnd.randn([len(seeds), 4, 1, 1])
    reference = _nvlabs_edm_sampler(
        _NVlabsNet(EDMPrecond(net)), latents, randn_like=rnd.randn_like, num_steps=10, **stochastic
    )
    assert torch.equal(ours, reference.to(torch.float32))
    if stochastic["S_churn"]:
        deterministic = sample(net, (4, 1, 1), None, seeds, sampler="edm-heun", steps=10, kind="edm")
        assert not torch.equal(ours, deterministic)


def test_sampling_config_stochastic_fields_round_trip_and_validation():
    from diffit.sampling_config import SamplingConfig

    config = SamplingConfig(
        sampler="edm-heun",
        steps=40,
        kind="edm",
        S_churn=40.0,
        S_min=0.05,
        S_max=50.0,
        S_noise=1.003,
        guidance=GuidanceConfig(scale=4.6, schedule="power-cosine"),
    )
    assert SamplingConfig.from_dict(config.to_dict()) == config
    default = SamplingConfig()
    assert (default.S_churn, default.S_min, default.S_max, default.S_noise) == (0.0, 0.0, float("inf"), 1.0)
    assert default.to_dict()["S_max"] == "inf" and SamplingConfig.from_dict(default.to_dict()) == default
    with pytest.raises(ValueError, match="unknown sampling settings"):
        SamplingConfig.from_dict({"S_chrun": 1.0})
    for field in ("S_churn", "S_min", "S_max"):
        with pytest.raises(ValueError, match=f"{field} must be >= 0"):
            SamplingConfig(**{field: -1.0}).check()


def test_the_sampling_settings_stay_public_in_diffit_sampling():
    """The settings live in `diffit.sampling_config`; `diffit.sampling.SamplingConfig` and its companions, which
    users import, are the same objects."""
    import diffit.sampling
    import diffit.sampling_config

    names = ("SamplingConfig", "SETTINGS", "check_settings", "paper_sampling_config", "to_uint8", "network_evaluations")
    for name in (*names, "SAMPLERS", "GUIDANCE_SETTINGS", "PIXEL_QUANTIZATIONS", "FLOW_DEFAULT_STEPS", "KINDS"):
        assert getattr(diffit.sampling, name) is getattr(diffit.sampling_config, name)
        assert name in diffit.sampling.__all__


def test_paper_sampling_config_per_model_kind():
    from diffit.sampling_config import paper_sampling_config

    imagenet256 = paper_sampling_config({"type": "adm", "diffusion_steps": 1000, "noise_schedule": "linear"}, 256, 1000)
    assert (imagenet256.sampler, imagenet256.steps, imagenet256.kind) == ("ddpm", 250, "adm")
    assert imagenet256.guidance == GuidanceConfig(scale=4.6, schedule="power-cosine", power=4.0, channels=3)
    assert paper_sampling_config({"type": "adm"}, 512, 1000).guidance == GuidanceConfig(scale=1.49)
    assert paper_sampling_config({"type": "adm"}, 256, 0).guidance == GuidanceConfig()
    cifar = paper_sampling_config({"type": "edm", "sigma_data": 0.5}, 32, 0)
    ffhq = paper_sampling_config({"type": "edm", "sigma_data": 0.5}, 64, 0)
    assert (cifar.sampler, cifar.steps, cifar.kind, ffhq.steps) == ("edm-heun", 18, "edm", 40)


# ---------------------------------------------------------------------------------------------------------------
# VP / VE-preconditioned networks (diffit.edm.VPPrecond / VEPrecond): the config's precond, EDM's sigma clipping


class ZeroNet(torch.nn.Module):
    """Raw network F = 0."""

    def forward(self, x, noise_labels, class_labels=None):
        return torch.zeros_like(x)


class ScaledConv(torch.nn.Module):
    """A seeded 1x1 convolution scaled by tanh(c_noise / 500): a raw network whose output depends on c_noise."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(2, 2, 1)

    def forward(self, x, noise_labels, class_labels=None):
        return self.conv(x) * torch.tanh(noise_labels / 500).reshape(-1, 1, 1, 1)


@pytest.mark.parametrize(
    "precond, config_range, clipped",
    [
        # EDM's generate.py: sigma_min = max(config, net.sigma_min), sigma_max = min(config, net.sigma_max).
        ("ve", (0.002, 80.0), (0.02, 80.0)),  # VE's [0.02, 100]
        ("vp", (5e-4, 200.0), (1.0004976266e-3, 152.1669702839)),  # VP's [sigma(1e-5), sigma(1)]
        ("edm", (0.002, 80.0), (0.002, 80.0)),  # no bounds of its own
    ],
)
def test_heun_grid_is_clipped_to_the_preconds_sigma_range(precond, config_range, clipped):
    from diffit.edm import make_precond

    denoiser, seen = make_precond(precond, ZeroNet()), []
    forward = denoiser.forward
    denoiser.forward = lambda x, sigma, *args: (seen.append(sigma[0].item()), forward(x, sigma, *args))[1]
    sigma_min, sigma_max = config_range
    sample(denoiser, (1, 2, 2), None, [0], kind="edm", sampler="edm-heun", steps=4,
           sigma_min=sigma_min, sigma_max=sigma_max)  # fmt: skip
    # 4 Heun steps: 7 calls, the first at the grid's top, the last Euler step at its bottom.
    assert len(seen) == 7
    assert seen[0] == pytest.approx(clipped[1], rel=1e-6) and seen[-1] == pytest.approx(clipped[0], rel=1e-6)


def test_sampling_config_precond_is_checked_and_read_from_the_export_entry():
    from diffit.sampling_config import SamplingConfig, paper_sampling_config

    assert paper_sampling_config({"type": "edm", "sigma_data": 0.5}, 32, 0).precond == "edm"  # older exports
    assert paper_sampling_config({"type": "edm", "sigma_data": 0.5, "precond": "ve"}, 32, 0).precond == "ve"
    with pytest.raises(ValueError, match="unknown preconditioning 'vpsde'"):
        SamplingConfig(kind="edm", sampler="edm-heun", precond="vpsde").check()
    with pytest.raises(ValueError, match="precond='vp' preconditions kind='edm' networks only, got kind='adm'"):
        SamplingConfig(kind="adm", precond="vp").check()
    assert SamplingConfig.from_dict(SamplingConfig(kind="edm", precond="vp").to_dict()).precond == "vp"


@pytest.mark.parametrize("precond", ["vp", "ve"])
def test_a_raw_network_is_sampled_through_the_configs_precond(precond):
    from diffit.edm import make_precond

    net = ScaledConv()
    settings = dict(kind="edm", sampler="edm-heun", steps=5)
    with torch.no_grad():
        by_name = sample(net, (2, 3, 3), None, [1, 2], precond=precond, **settings)
        wrapped = sample(make_precond(precond, net), (2, 3, 3), None, [1, 2], **settings)
        edm = sample(net, (2, 3, 3), None, [1, 2], **settings)
    assert torch.equal(by_name, wrapped) and not torch.allclose(by_name, edm)
