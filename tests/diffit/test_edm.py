"""EDM preconditioning, loss, sigma grid, Heun sampler and the ADM->EDM adapter (diffit/edm.py)."""

import math

import numpy as np
import pytest
import torch

from diffit.edm import (
    ADMDenoiser,
    EDMLoss,
    EDMPrecond,
    VEPrecond,
    VPPrecond,
    edm_heun_sampler,
    edm_sigma_steps,
    make_loss,
    make_precond,
    preconditioning_coefficients,
    vp_sigma,
    vp_sigma_inv,
)


class ConstantNet(torch.nn.Module):
    """F = 1 everywhere; records the scaled input and c_noise it receives."""

    def __init__(self):
        super().__init__()
        self.inputs, self.noise_labels = [], []

    def forward(self, x, noise_labels, class_labels=None):
        self.inputs.append(x.clone())
        self.noise_labels.append(noise_labels.clone())
        return torch.ones_like(x)


# Hand-computed with sigma_data = 0.5:
#   sigma = 1:   c_skip = .25/1.25 = 0.2, c_out = .5/sqrt(1.25), c_in = 1/sqrt(1.25), c_noise = 0
#   sigma = 0.5: c_skip = 0.5, c_out = .25/sqrt(.5), c_in = 1/sqrt(.5), c_noise = ln(.5)/4
#   sigma = 2:   c_skip = .25/4.25, c_out = 1/sqrt(4.25), c_in = 1/sqrt(4.25), c_noise = ln(2)/4
HAND_COEFFICIENTS = {
    1.0: (0.2, 0.4472135955, 0.8944271910, 0.0),
    0.5: (0.5, 0.3535533906, 1.4142135624, -0.1732867951),
    2.0: (0.0588235294, 0.4850712501, 0.4850712501, 0.1732867951),
}


@pytest.mark.parametrize("sigma", sorted(HAND_COEFFICIENTS))
def test_preconditioning_coefficients_hand_values(sigma):
    c_skip, c_out, c_in, c_noise = (
        v.item() for v in preconditioning_coefficients(torch.tensor(sigma, dtype=torch.float64), sigma_data=0.5)
    )
    for got, want in zip((c_skip, c_out, c_in, c_noise), HAND_COEFFICIENTS[sigma]):
        assert got == pytest.approx(want, abs=1e-9)


def test_edm_precond_applies_coefficients_to_the_network():
    net = ConstantNet()
    precond = EDMPrecond(net, sigma_data=0.5)
    sigmas = sorted(HAND_COEFFICIENTS)
    x = torch.ones(len(sigmas), 3, 2, 2, dtype=torch.float64)
    denoised = precond(x, torch.tensor(sigmas, dtype=torch.float64))
    for i, sigma in enumerate(sigmas):
        c_skip, c_out, c_in, c_noise = HAND_COEFFICIENTS[sigma]
        # D = c_skip * 1 + c_out * F with F = 1; the network saw c_in * x and c_noise.
        torch.testing.assert_close(denoised[i], torch.full((3, 2, 2), c_skip + c_out, dtype=torch.float64))
        torch.testing.assert_close(net.inputs[0][i], torch.full((3, 2, 2), c_in, dtype=torch.float64))
        assert net.noise_labels[0][i].item() == pytest.approx(c_noise, abs=1e-9)
    assert net.noise_labels[0].shape == (len(sigmas),)
    # A scalar sigma is broadcast to the batch.
    assert precond(x, 1.0).shape == x.shape


def test_edm_precond_rejects_learned_sigma_output():
    precond = EDMPrecond(lambda x, c, y=None: torch.cat([x, x], 1))
    with pytest.raises(ValueError, match="must match its input"):
        precond(torch.zeros(1, 3, 2, 2), 1.0)


def test_edm_loss_weighting_and_determinism():
    loss_fn = EDMLoss(P_mean=-1.2, P_std=1.2, sigma_data=0.5)
    # Hand values: lambda(1) = (1 + .25) / .25 = 5, lambda(.5) = (.25 + .25) / .0625 = 8.
    assert loss_fn.weight(torch.tensor(1.0)).item() == pytest.approx(5.0)
    assert loss_fn.weight(torch.tensor(0.5)).item() == pytest.approx(8.0)
    sigma = torch.logspace(-3, 2, 11, dtype=torch.float64)
    _, c_out, _, _ = preconditioning_coefficients(sigma, 0.5)
    torch.testing.assert_close(loss_fn.weight(sigma) * c_out**2, torch.ones_like(sigma))  # unit weight on F

    # D = 0 and y = 1 -> loss = lambda(sigma_i) exactly; sigma_i replayed from the same seed (drawn first).
    images = torch.ones(5, 2, 3, 3, dtype=torch.float64)
    zero_precond = lambda x, sigma, class_labels=None: torch.zeros_like(x)
    loss = loss_fn(zero_precond, images, generator=torch.Generator().manual_seed(3))
    assert loss.shape == images.shape
    replay = torch.randn(5, 1, 1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected_sigma = torch.exp(replay * 1.2 - 1.2)
    torch.testing.assert_close(loss, ((expected_sigma**2 + 0.25) / (expected_sigma * 0.5) ** 2).expand_as(loss))

    conv = torch.nn.Conv2d(2, 2, 1).double()
    precond = EDMPrecond(lambda x, noise_labels, class_labels=None: conv(x) * noise_labels.reshape(-1, 1, 1, 1))
    first = loss_fn(precond, images, generator=torch.Generator().manual_seed(11))
    second = loss_fn(precond, images, generator=torch.Generator().manual_seed(11))
    assert torch.equal(first, second)


def test_edm_loss_log_normal_sigma_distribution():
    loss_fn = EDMLoss()
    seen = []
    record = lambda x, sigma, class_labels=None: (seen.append(sigma), torch.zeros_like(x))[1]
    loss_fn(record, torch.zeros(20000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    log_sigma = seen[0].double().log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.05)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.05)


def test_edm_sigma_steps_hand_values():
    steps = edm_sigma_steps(2, 0.002, 80.0, 7.0)
    torch.testing.assert_close(steps, torch.tensor([80.0, 0.002, 0.0], dtype=torch.float64))
    steps = edm_sigma_steps(3, 0.002, 80.0, 7.0)
    # ((80^(1/7) + 0.002^(1/7)) / 2)^7 = ((1.870153 + 0.411549) / 2)^7 = 1.140851^7 = 2.51522
    assert steps[1].item() == pytest.approx(2.51522, abs=1e-5)
    steps18 = edm_sigma_steps(18)
    assert len(steps18) == 19 and steps18[0] == 80.0 and steps18[17].item() == pytest.approx(0.002)
    assert (steps18[1:] < steps18[:-1]).all()


class CountingDenoiser:
    """Wraps a denoiser function, counting calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, sigma, class_labels=None):
        self.calls += 1
        return self.fn(x, sigma)


@pytest.mark.parametrize("num_steps", [1, 2, 18, 40])
def test_heun_uses_2n_minus_1_evaluations(num_steps):
    denoiser = CountingDenoiser(lambda x, sigma: 0.5 * x)
    edm_heun_sampler(denoiser, torch.randn(2, 1, 2, 2), num_steps=num_steps)
    assert denoiser.calls == 2 * num_steps - 1


def _scalar_heun_on_gaussian(s: float, num_steps: int, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> float:
    """Independent scalar transcription of EDM Algorithm 2 for D(x; sigma) = x s^2 / (s^2 + sigma^2), x_0 = 1."""
    sigmas = [
        (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
        for i in range(num_steps)
    ] + [0.0]
    slope = lambda sigma: sigma / (s**2 + sigma**2)  # (x - D) / (sigma x)
    x = sigma_max
    for i in range(num_steps):
        d_cur = x * slope(sigmas[i])
        x_euler = x + (sigmas[i + 1] - sigmas[i]) * d_cur
        if i < num_steps - 1:
            x = x + (sigmas[i + 1] - sigmas[i]) * 0.5 * (d_cur + x_euler * slope(sigmas[i + 1]))
        else:
            x = x_euler
    return x


@pytest.mark.parametrize("num_steps", [18, 40])
def test_heun_on_gaussian_data_matches_hand_recursion_and_converges(num_steps):
    # Data N(0, s^2): D is linear, so the sampler output is latents * k with k from the scalar recursion.
    s = 0.5
    denoiser = lambda x, sigma, class_labels=None: x * s**2 / (s**2 + sigma.reshape(-1, 1, 1, 1) ** 2)
    latents = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = edm_heun_sampler(denoiser, latents, num_steps=num_steps)
    torch.testing.assert_close(out, latents * _scalar_heun_on_gaussian(s, num_steps), rtol=1e-6, atol=1e-6)


def test_heun_is_second_order_on_gaussian_data():
    # Exact probability-flow ODE solution: x(0) = x(sigma_max) s / sqrt(s^2 + sigma_max^2).
    s = 0.5
    exact = 80.0 * s / math.sqrt(s**2 + 80.0**2)
    errors = {n: abs(_scalar_heun_on_gaussian(s, n) - exact) / exact for n in (18, 40, 100, 400)}
    # Measured: 5.5% (18 steps), 0.98% (40), 0.15% (100), 0.008% (400).
    assert errors[18] < 0.06 and errors[40] < 0.011 and errors[400] < 1e-4
    assert errors[100] / errors[400] > 12  # ~(400/100)^2 = 16 for a 2nd-order method


def test_heun_churn_draws_from_per_sample_generators():
    denoiser = lambda x, sigma, class_labels=None: 0.5 * x
    latents = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    run = lambda seeds: edm_heun_sampler(
        denoiser,
        latents[: len(seeds)],
        num_steps=6,
        S_churn=40.0,
        generators=[torch.Generator().manual_seed(s) for s in seeds],
    )
    first, second = run([5, 6, 7]), run([5, 6, 7])
    assert torch.equal(first, second)
    deterministic = edm_heun_sampler(denoiser, latents, num_steps=6)
    assert not torch.allclose(first, deterministic)
    torch.testing.assert_close(run([5])[0], first[0])  # sample 0 does not depend on the rest of the batch


def _adm_alphas_cumprod():
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


def test_adm_denoiser_sigma_timestep_mapping():
    adapter = ADMDenoiser(lambda x, t, y=None: torch.zeros_like(x), _adm_alphas_cumprod())
    alphas_cumprod = _adm_alphas_cumprod()
    sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    assert adapter.sigma_min == pytest.approx(sigmas[0]) and adapter.sigma_min == pytest.approx(0.01, rel=1e-3)
    assert adapter.sigma_max == pytest.approx(sigmas[-1]) and adapter.sigma_max > 80
    t = adapter.sigma_to_t(torch.tensor(sigmas[[0, 17, 500, 999]]))
    torch.testing.assert_close(t, torch.tensor([0.0, 17.0, 500.0, 999.0], dtype=torch.float64))
    # Halfway in log sigma between two table entries -> halfway timestep.
    between = torch.tensor(np.sqrt(sigmas[300] * sigmas[301]))
    assert adapter.sigma_to_t(between).item() == pytest.approx(300.5, abs=1e-9)
    torch.testing.assert_close(adapter.t_to_sigma(torch.tensor([300.5])), between.reshape(1))
    # Out-of-range sigmas clamp to the table ends.
    assert adapter.sigma_to_t(torch.tensor([1e-5, 1e5])).tolist() == [0.0, 999.0]
    rounding = ADMDenoiser(lambda x, t, y=None: torch.zeros_like(x), alphas_cumprod, round_timesteps=True)
    assert rounding.sigma_to_t(between * 1.0001).item() == 301.0
    assert rounding.round_sigma(between * 1.0001).item() == pytest.approx(sigmas[301])


def test_adm_denoiser_scales_input_and_ignores_sigma_channels():
    alphas_cumprod = _adm_alphas_cumprod()
    seen = {}

    def eps_model(x, t, class_labels=None):
        seen["x"], seen["t"], seen["labels"] = x, t, class_labels
        return torch.cat([torch.full_like(x, 0.25), torch.full_like(x, 9.0)], dim=1)  # eps then Sigma

    adapter = ADMDenoiser(eps_model, alphas_cumprod)
    timestep = 250
    sigma = math.sqrt((1 - alphas_cumprod[timestep]) / alphas_cumprod[timestep])
    x = torch.full((2, 3, 1, 1), 2.0, dtype=torch.float64)
    labels = torch.tensor([1, 2])
    denoised = adapter(x, torch.full((2,), sigma, dtype=torch.float64), labels)
    # The network sees the VP state sqrt(abar) x at timestep t; D = x - sigma * eps.
    torch.testing.assert_close(seen["x"], x * math.sqrt(alphas_cumprod[timestep]))
    torch.testing.assert_close(seen["t"], torch.full((2,), float(timestep)))
    assert seen["labels"] is labels
    torch.testing.assert_close(denoised, x - sigma * 0.25)


def test_heun_stochastic_step_matches_hand_computation():
    # 3 steps, rho = 1: sigmas 4, 2.5, 1, then 0. S_churn = 0.6 -> gamma = min(0.6 / 3, sqrt(2) - 1) = 0.2, applied
    # only where S_min = 2 <= sigma <= S_max = 3, i.e. on step 1: t_hat = 2.5 * 1.2 = 3.0. Noise is drawn on every
    # step as in EDM's generate.py, so step 1 adds the SECOND float64 draw of the sample's generator, times S_noise.
    s, s_noise = 0.5, 1.5
    calls = []

    def denoiser(x, sigma, class_labels=None):
        calls.append((x.clone(), sigma.clone()))
        return x * s**2 / (s**2 + sigma.reshape(-1, 1, 1, 1) ** 2)

    latents = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    out = edm_heun_sampler(
        denoiser,
        latents,
        num_steps=3,
        sigma_min=1.0,
        sigma_max=4.0,
        rho=1.0,
        S_churn=0.6,
        S_min=2.0,
        S_max=3.0,
        S_noise=s_noise,
        generators=[torch.Generator().manual_seed(9)],
    )
    draws = torch.Generator().manual_seed(9)
    first_draw = torch.randn((1, 2, 2), generator=draws, dtype=torch.float64)
    second_draw = torch.randn((1, 2, 2), generator=draws, dtype=torch.float64)
    assert not torch.equal(first_draw, second_draw)

    D = lambda x, sigma: x * s**2 / (s**2 + sigma**2)  # noqa: E731 - the ideal denoiser of N(0, s^2)
    x0 = latents.double() * 4.0
    # Step 0: sigma 4 is above S_max, no churn (t_hat = 4); Euler to 2.5, then the Heun correction.
    d0 = (x0 - D(x0, 4.0)) / 4.0
    euler = x0 + (2.5 - 4.0) * d0
    x1 = x0 + (2.5 - 4.0) * (0.5 * d0 + 0.5 * (euler - D(euler, 2.5)) / 2.5)
    # Step 1: churned to t_hat = 3.0 with sqrt(3^2 - 2.5^2) * S_noise * (second draw).
    x_hat = x1 + math.sqrt(3.0**2 - 2.5**2) * s_noise * second_draw
    d1 = (x_hat - D(x_hat, 3.0)) / 3.0
    euler = x_hat + (1.0 - 3.0) * d1
    x2 = x_hat + (1.0 - 3.0) * (0.5 * d1 + 0.5 * (euler - D(euler, 1.0)) / 1.0)
    # Step 2: sigma 1 is below S_min, no churn; last step is plain Euler to 0.
    final = x2 + (0.0 - 1.0) * (x2 - D(x2, 1.0)) / 1.0

    assert [round(float(sigma[0]), 6) for _, sigma in calls] == [4.0, 2.5, 3.0, 1.0, 1.0]
    torch.testing.assert_close(calls[2][0].double(), x_hat, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.double(), final, rtol=1e-6, atol=1e-6)


def test_heun_churn_outside_s_min_s_max_is_deterministic():
    # With the [S_min, S_max] window above every sigma of the grid, S_churn changes nothing.
    denoiser = lambda x, sigma, class_labels=None: 0.5 * x  # noqa: E731
    latents = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    plain = edm_heun_sampler(denoiser, latents, num_steps=5)
    windowed = edm_heun_sampler(
        denoiser,
        latents,
        num_steps=5,
        S_churn=40.0,
        S_min=100.0,
        S_max=200.0,
        generators=[torch.Generator().manual_seed(s) for s in (1, 2)],
    )
    torch.testing.assert_close(windowed, plain, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# VP / VE preconditionings and the three losses (NVlabs/edm training/networks.py, training/loss.py)


class AugmentRecordingNet(torch.nn.Module):
    """F = 1; records the augment labels it was given (None when the keyword was not passed)."""

    def __init__(self):
        super().__init__()
        self.augment_labels = []

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.augment_labels.append(augment_labels)
        return torch.ones_like(x)


# Hand-computed, beta_d = 19.9, beta_min = 0.1:
#   sigma(1)   = sqrt(e^(9.95 + 0.1) - 1) = sqrt(23154.78) = 152.16697
#   sigma(0.5) = sqrt(e^(2.4875 + 0.05) - 1) = sqrt(11.6482) = 3.41292
#   sigma(1e-5) = sqrt(e^(9.95e-10 + 1e-6) - 1) = 1.0004976e-3
#   t(1) = (sqrt(0.01 + 39.8 ln 2) - 0.1) / 19.9 = (5.253316 - 0.1) / 19.9 = 0.2589603
def test_vp_sigma_and_its_inverse_hand_values():
    t = torch.tensor([1.0, 0.5, 1e-5], dtype=torch.float64)
    torch.testing.assert_close(
        vp_sigma(t), torch.tensor([152.16697028, 3.41291831, 1.00049763e-3], dtype=torch.float64), rtol=1e-8, atol=0
    )
    assert vp_sigma_inv(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(0.25896026243, abs=1e-10)
    assert vp_sigma_inv(torch.tensor(0.0, dtype=torch.float64)).item() == 0.0
    sigmas = torch.logspace(-3, 2, 13, dtype=torch.float64)
    torch.testing.assert_close(vp_sigma(vp_sigma_inv(sigmas)), sigmas, rtol=1e-9, atol=0)


def test_vp_precond_is_edms_vp_precond():
    net = ConstantNet()
    precond = VPPrecond(net)
    # EDM: sigma_min = sigma(epsilon_t), sigma_max = sigma(1).
    assert precond.sigma_min == pytest.approx(1.0004976266e-3, rel=1e-9)
    assert precond.sigma_max == pytest.approx(152.1669702839, rel=1e-12)
    sigma = torch.tensor([1.0, 3.41291830906912], dtype=torch.float64)
    x = torch.full((2, 3, 2, 2), 2.0, dtype=torch.float64)
    denoised = precond(x, sigma)
    # c_skip = 1, c_out = -sigma, F = 1: D = x - sigma.
    torch.testing.assert_close(denoised, x - sigma.reshape(-1, 1, 1, 1))
    # c_in = 1 / sqrt(sigma^2 + 1): 1 / sqrt(2) at sigma = 1; c_noise = (M - 1) t(sigma) = 999 * 0.2589603, 999 * 0.5.
    assert net.inputs[0][0].unique().item() == pytest.approx(2.0 / math.sqrt(2.0), abs=1e-12)
    torch.testing.assert_close(
        net.noise_labels[0], torch.tensor([258.70130217, 499.5], dtype=torch.float64), rtol=1e-9, atol=0
    )


def test_ve_precond_is_edms_ve_precond():
    net = ConstantNet()
    precond = VEPrecond(net)
    assert (precond.sigma_min, precond.sigma_max) == (0.02, 100.0)
    sigma = torch.tensor([2.0, 0.5], dtype=torch.float64)
    x = torch.full((2, 1, 2, 2), 3.0, dtype=torch.float64)
    # c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2): D = x + sigma, the network sees x itself.
    torch.testing.assert_close(precond(x, sigma), x + sigma.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(net.inputs[0], x)
    torch.testing.assert_close(net.noise_labels[0], torch.tensor([0.0, math.log(0.25)], dtype=torch.float64))


@pytest.mark.parametrize("name", ["edm", "vp", "ve"])
def test_every_precond_forwards_augment_labels_only_when_given(name):
    net = AugmentRecordingNet()
    precond = make_precond(name, net)
    x = torch.zeros(2, 1, 2, 2)
    labels = torch.arange(18.0).reshape(2, 9)
    precond(x, 1.0, None, augment_labels=labels)
    precond(x, 1.0)
    assert net.augment_labels[0] is labels and net.augment_labels[1] is None
    # A network without the keyword (every DiffiT network) still works when none is given.
    assert make_precond(name, lambda x, c, y=None: torch.zeros_like(x))(x, 1.0).shape == x.shape


def test_make_precond_and_make_loss_by_name():
    net = ConstantNet()
    edm_precond = make_precond("edm", net, sigma_data=0.6)
    assert type(edm_precond) is EDMPrecond and edm_precond.sigma_data == 0.6
    assert type(make_precond("vp", net)) is VPPrecond and type(make_precond("ve", net)) is VEPrecond
    edm = make_loss("edm", P_mean=-1.0, P_std=1.5, sigma_data=0.6)
    assert type(edm) is EDMLoss and (edm.P_mean, edm.P_std, edm.sigma_data) == (-1.0, 1.5, 0.6)
    vp, ve = make_loss("vp"), make_loss("ve")
    assert (vp.beta_d, vp.beta_min, vp.epsilon_t) == (19.9, 0.1, 1e-5) and (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)
    for make in (lambda: make_precond("vpsde", net), lambda: make_loss("vpsde")):
        with pytest.raises(ValueError, match="unknown preconditioning 'vpsde'; expected one of edm, vp, ve"):
            make()


def _tiny_network():
    """A deterministic raw network F: a seeded 1x1 convolution scaled by the noise label (float64)."""
    conv = torch.nn.Conv2d(2, 2, 1).double()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in (conv.weight, conv.bias):
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return lambda x, noise_labels, class_labels=None, augment_labels=None: conv(x) * noise_labels.reshape(-1, 1, 1, 1)


def _edm_loss_formula(name: str, precond, images: torch.Tensor, seed: int) -> torch.Tensor:
    """NVlabs/edm training/loss.py written out for one name, the random draws replayed from `seed` in its order
    (sigma's draw of [N, 1, 1, 1], then the noise)."""
    generator = torch.Generator().manual_seed(seed)
    shape = [images.shape[0], 1, 1, 1]
    if name == "vp":
        rnd_uniform = torch.rand(shape, generator=generator, dtype=torch.float64)
        t = 1 + rnd_uniform * (1e-5 - 1)
        sigma = ((0.5 * 19.9 * t**2 + 0.1 * t).exp() - 1).sqrt()
        weight = 1 / sigma**2
    elif name == "ve":
        rnd_uniform = torch.rand(shape, generator=generator, dtype=torch.float64)
        sigma = 0.02 * ((100 / 0.02) ** rnd_uniform)
        weight = 1 / sigma**2
    else:
        rnd_normal = torch.randn(shape, generator=generator, dtype=torch.float64)
        sigma = (rnd_normal * 1.2 - 1.2).exp()
        weight = (sigma**2 + 0.5**2) / (sigma * 0.5) ** 2
    n = torch.randn(images.shape, generator=generator, dtype=torch.float64) * sigma
    D_yn = precond(images + n, sigma.flatten(), None)
    return weight * ((D_yn - images) ** 2)


@pytest.mark.parametrize("name", ["edm", "vp", "ve"])
def test_losses_are_edms_formulas_on_a_tiny_network(name):
    images = torch.randn(6, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    precond = make_precond(name, _tiny_network())
    loss = make_loss(name)(precond, images, generator=torch.Generator().manual_seed(7))
    assert loss.shape == images.shape
    torch.testing.assert_close(loss, _edm_loss_formula(name, precond, images, 7), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_vp_and_ve_losses_draw_sigma_over_the_trained_range(name):
    seen = []
    record = lambda x, sigma, class_labels=None: (seen.append(sigma), torch.zeros_like(x))[1]
    loss = make_loss(name)(record, torch.ones(20000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    sigma = seen[0].double()
    # D = 0, y = 1: the loss is the weight 1 / sigma^2 itself.
    torch.testing.assert_close(loss.flatten().double(), 1 / sigma**2, rtol=1e-6, atol=0)
    precond = make_precond(name, ConstantNet())
    assert sigma.min() >= precond.sigma_min * (1 - 1e-6) and sigma.max() <= precond.sigma_max * (1 + 1e-6)
    if name == "ve":  # log-uniform: ln sigma uniform on [ln 0.02, ln 100], mean ln(0.02 * 100) / 2 = ln(2) / 2
        assert sigma.log().mean().item() == pytest.approx(math.log(2.0) / 2, abs=0.05)
    else:  # t = t(sigma) uniform on [1e-5, 1]: mean 0.5
        assert vp_sigma_inv(sigma).mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("name", ["edm", "vp", "ve"])
def test_losses_augment_between_the_sigma_and_noise_draws_and_pass_the_labels(name):
    """EDM's order under one global seed: sigma, `augment_pipe(images)` (its own draws), the noise of the augmented
    images; the target is the augmented image and the network gets the augment labels."""
    from diffit.augment import edm_augment_pipe

    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    pipe = edm_augment_pipe(0.5)
    calls = []

    def precond(x, sigma, class_labels=None, augment_labels=None):
        calls.append(augment_labels)
        return torch.zeros_like(x)

    torch.manual_seed(11)
    loss = make_loss(name)(precond, images, augment_pipe=pipe)
    after_loss = torch.randn(1)
    # EDM's loss.py line by line, under the same seed (D = 0, so the loss is weight * y^2).
    torch.manual_seed(11)
    if name == "edm":
        sigma = (torch.randn([4, 1, 1, 1]) * 1.2 - 1.2).exp()
        weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    elif name == "vp":
        sigma = vp_sigma(1 + torch.rand([4, 1, 1, 1]) * (1e-5 - 1))
        weight = 1 / sigma**2
    else:
        sigma = 0.02 * ((100 / 0.02) ** torch.rand([4, 1, 1, 1]))
        weight = 1 / sigma**2
    y, augment_labels = pipe(images)
    torch.randn_like(y)  # the noise n
    after_replay = torch.randn(1)
    assert not torch.equal(y, images) and augment_labels.shape == (4, 9)
    torch.testing.assert_close(loss, weight * y**2, rtol=0, atol=0)
    torch.testing.assert_close(calls[0], augment_labels, rtol=0, atol=0)
    assert torch.equal(after_loss, after_replay)  # the same draws, in the same order


def test_an_exports_precond_is_checked_against_the_preconditionings():
    from diffit.config_check import DIFFUSION_FIELDS, InvalidModelFileError, check_model_config
    from diffit.edm import PRECONDITIONINGS

    assert DIFFUSION_FIELDS["precond"] == ("choice", *PRECONDITIONINGS)  # config_check imports no torch: pinned here
    config = {"model": {"name": "DiffiT-UNet-Tiny"}, "diffusion": {"type": "edm", "precond": "ve", "augment": 0.12}}
    check_model_config(config)
    for bad, problem in (({"precond": "vpsde"}, "diffusion.precond must be one of"), ({"augment": 2.0}, "augment")):
        with pytest.raises(InvalidModelFileError, match=problem):
            check_model_config({**config, "diffusion": {**config["diffusion"], **bad}})
