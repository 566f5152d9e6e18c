"""`DiffiTPipeline` with diffusers' flow and EDM schedulers (diffit/pipeline_diffit.py, diffit/scheduling_loops.py):
`FlowMatchEulerDiscreteScheduler` on a flow export, `EDMEulerScheduler` / `EDMDPMSolverMultistepScheduler` on an EDM
export, pinned against hand-written loops, and the one-line refusals of every other model / scheduler pairing.

Tiny models (DiffiT-Tiny/2 on 8x8x4 latents with the random /2 VAE, DiffiT-UNet-Tiny on 16x16 RGB), a few steps,
offline.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
)

import diffit
from diffit.edm import EDMPrecond, edm_sigma_steps
from diffit.guidance import GuidanceConfig
from diffit.scheduling_diffit import scheduler_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIGMA_DATA = 0.6  # the conditional EDM export's: not diffusers' default 0.5


def _pipeline(model_dir, **kwargs):
    from diffit import DiffiTPipeline

    pipe = DiffiTPipeline.from_pretrained(model_dir, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _randomise_head(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith(("final_layer", "head")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def flow_model(tmp_path_factory, tiny_vae):
    """A 10-class DiffiT-Tiny/2 exported as a flow (velocity) model: no learned Sigma, diffusion type "flow"."""
    from tests.support.eval_fixtures import make_latent_model_dir

    folder = make_latent_model_dir(tmp_path_factory.mktemp("flow") / "model", tiny_vae, learn_sigma=False)
    config = json.loads((folder / "config.json").read_text())
    config["diffusion"] = {"type": "flow", "learn_sigma": False}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def edm_class_model(tmp_path_factory):
    """A 10-class DiffiT-UNet-Tiny (16x16 RGB) exported as an EDM model with sigma_data = SIGMA_DATA."""
    torch.manual_seed(1)
    model = diffit.create_model("DiffiT-UNet-Tiny", num_classes=10)
    _randomise_head(model, 1)
    folder = tmp_path_factory.mktemp("edm-class") / "model"
    diffit.save_pretrained(model, folder, {"diffusion": {"type": "edm", "sigma_data": SIGMA_DATA}})
    return folder


def _noise(seeds, shape) -> torch.Tensor:
    """The initial noise of the documented seeds: sample i from a CPU generator seeded with seeds[i]."""
    return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])


def _mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float, channels: int = 3) -> torch.Tensor:
    """DiT's guidance: uncond + scale (cond - uncond) on the first 3 channels, cond elsewhere."""
    guided = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Flow: FlowMatchEulerDiscreteScheduler
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_euler_is_an_euler_loop_over_its_own_sigmas_with_t_equal_to_sigma(flow_model, shift):
    pipe = _pipeline(flow_model)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    out = pipe([1, 2], 1.0, num_inference_steps=5, output_type="latent", seeds=[5, 6]).images

    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(5)
    sigmas = reference.sigmas.tolist()
    minimum = shift * 1e-3 / (1 + (shift - 1) * 1e-3)  # diffusers: linspace(1, sigma_min) with sigma_min shifted
    unshifted = torch.linspace(1.0, minimum, 5, dtype=torch.float64)
    expected_sigmas = shift * unshifted / (1 + (shift - 1) * unshifted)
    torch.testing.assert_close(torch.tensor(sigmas[:-1], dtype=torch.float64), expected_sigmas, rtol=1e-6, atol=1e-7)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and reference.timesteps[0] == 1000.0
    x = _noise([5, 6], (4, 8, 8))
    labels = torch.tensor([1, 2])
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        with torch.no_grad():  # the network's time is sigma in [0, 1], not the scheduler's timestep sigma * 1000
            v = pipe.transformer(x, torch.full((2,), sigma), class_labels=labels)
        x = x + (sigma_next - sigma) * v
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    assert x.abs().max() > 0.5


def test_flow_match_euler_on_a_linear_velocity_field_is_the_closed_form_product(flow_model, monkeypatch):
    # v(x, t) = a x: each Euler step multiplies x by 1 + (sigma_next - sigma) a.
    pipe = _pipeline(flow_model)
    a = -0.7
    monkeypatch.setattr(pipe.transformer, "forward", lambda x, t, class_labels=None: a * x)
    for shift, steps in ((1.0, 4), (3.0, 6)):
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
        out = pipe([1, 2], 1.0, num_inference_steps=steps, output_type="latent", seeds=[3, 4]).images
        sigmas = pipe.scheduler.sigmas.to(torch.float64)
        factor = torch.prod(1 + (sigmas[1:] - sigmas[:-1]) * a).item()
        torch.testing.assert_close(out, _noise([3, 4], (4, 8, 8)) * factor, rtol=1e-5, atol=1e-6)
        assert abs(factor - 1) > 0.3


def test_flow_guidance_matches_a_hand_cfg_loop_and_its_interval_of_t(flow_model):
    pipe = _pipeline(flow_model)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=2.0)
    plain = pipe([1, 2], 1.0, num_inference_steps=4, output_type="latent", seeds=[5, 6]).images
    guided = pipe([1, 2], 20.0, num_inference_steps=4, output_type="latent", seeds=[5, 6]).images
    window = GuidanceConfig(scale=20.0, interval=(0.0, 0.5))
    windowed = pipe([1, 2], None, num_inference_steps=4, output_type="latent", seeds=[5, 6], guidance=window).images
    sigmas = pipe.scheduler.sigmas.tolist()
    assert any(s > 0.5 for s in sigmas[:-1]) and any(s <= 0.5 for s in sigmas[:-1])

    def hand(inside) -> torch.Tensor:  # guidance on 3 of the 4 channels from one doubled batch, null class 10
        x = _noise([5, 6], (4, 8, 8))
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            with torch.no_grad():
                both = pipe.transformer(
                    torch.cat([x, x]), torch.full((4,), sigma), class_labels=torch.tensor([1, 2, 10, 10])
                )
            cond, uncond = both.chunk(2)
            v = _mix(cond, uncond, 20.0) if inside(sigma) else cond
            x = x + (sigma_next - sigma) * v
        return x

    torch.testing.assert_close(guided, hand(lambda sigma: True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(windowed, hand(lambda sigma: sigma <= 0.5), rtol=1e-5, atol=1e-5)
    for a, b in ((plain, guided), (guided, windowed), (plain, windowed)):
        assert (a - b).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# EDM: EDMEulerScheduler, EDMDPMSolverMultistepScheduler
# ---------------------------------------------------------------------------------------------------------------


def _edm_euler(pipe, sigma_data, labels, seeds, steps, scale=1.0) -> torch.Tensor:
    """EDM's Euler on the export's `EDMPrecond` denoiser: x = sigma_max n, x <- x + (s' - s) (x - D(x, s)) / s on
    EDM's Karras grid (guidance: D_u + w (D_c - D_u), one doubled batch, null class 10)."""
    denoiser = EDMPrecond(pipe.transformer, sigma_data=sigma_data)
    sigmas = edm_sigma_steps(steps).tolist()
    x = _noise(seeds, (3, 16, 16)) * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        with torch.no_grad():
            if scale == 1.0:
                denoised = denoiser(x, torch.full((len(seeds),), sigma), labels)
            else:
                pair = torch.cat([labels, torch.full_like(labels, 10)])
                cond, uncond = denoiser(torch.cat([x, x]), torch.full((2 * len(seeds),), sigma), pair).chunk(2)
                denoised = _mix(cond, uncond, scale)
        x = x + (sigma_next - sigma) * (x - denoised) / sigma
    return x


def test_edm_euler_scheduler_is_edms_euler_on_the_exports_preconditioned_denoiser(image_model, edm_class_model):
    # diffusers' EDM preconditioning (prediction_type "epsilon") is EDM's: c_in, c_noise = ln(sigma) / 4, c_skip,
    # c_out; its Karras grid is EDM's; only the initial noise scale differs (sigma_max, not sqrt(sigma_max^2 + 1)).
    pipe = _pipeline(image_model)
    pipe.scheduler = EDMEulerScheduler()
    out = pipe(batch_size=2, num_inference_steps=6, output_type="latent", seeds=[3, 4]).images
    torch.testing.assert_close(pipe.scheduler.sigmas.to(torch.float64), edm_sigma_steps(6), rtol=1e-6, atol=0)
    expected = _edm_euler(pipe, 0.5, None, [3, 4], 6)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert pipe.scheduler.init_noise_sigma > 80.0  # not what the loop uses

    conditional = _pipeline(edm_class_model)
    conditional.scheduler = EDMEulerScheduler(sigma_data=SIGMA_DATA)
    labels = torch.tensor([1, 2])
    for scale in (1.0, 2.5):
        out = conditional([1, 2], scale, num_inference_steps=5, output_type="latent", seeds=[7, 8]).images
        expected = _edm_euler(conditional, SIGMA_DATA, labels, [7, 8], 5, scale)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    unguided = _edm_euler(conditional, SIGMA_DATA, labels, [7, 8], 5)
    assert (out - unguided).abs().max() > 1e-3


@pytest.mark.parametrize("sigma_data", [0.5, SIGMA_DATA])
def test_edm_euler_on_a_zero_network_is_the_closed_form_of_edms_skip_connection(
    image_model, edm_class_model, sigma_data, monkeypatch
):
    # F = 0: D(x, s) = c_skip(s) x, so each step multiplies x by 1 + (s' - s)(1 - c_skip(s)) / s, and x starts at
    # sigma_max n: this pins the initial noise scale (80, not diffusers' sqrt(80^2 + 1)) and c_skip's sigma_data.
    pipe = _pipeline(image_model if sigma_data == 0.5 else edm_class_model)
    monkeypatch.setattr(pipe.transformer, "forward", lambda x, c_noise, class_labels=None: torch.zeros_like(x))
    pipe.scheduler = EDMEulerScheduler(sigma_data=sigma_data)
    call = dict(batch_size=2) if sigma_data == 0.5 else dict(class_labels=[1, 2])
    out = pipe(**call, num_inference_steps=5, output_type="latent", seeds=[3, 4]).images
    sigmas = edm_sigma_steps(5)
    c_skip = sigma_data**2 / (sigmas[:-1] ** 2 + sigma_data**2)
    factor = 80.0 * torch.prod(1 + (sigmas[1:] - sigmas[:-1]) * (1 - c_skip) / sigmas[:-1]).item()
    torch.testing.assert_close(out, _noise([3, 4], (3, 16, 16)) * factor, rtol=1e-5, atol=0)


def test_edm_dpm_solver_is_deterministic_under_seeds_and_differs_from_euler(image_model):
    pipe = _pipeline(image_model)
    pipe.scheduler = EDMDPMSolverMultistepScheduler()
    first = pipe(batch_size=2, num_inference_steps=6, output_type="latent", seeds=[7, 8]).images
    torch.manual_seed(1)  # the global generator plays no part
    again = pipe(batch_size=2, num_inference_steps=6, output_type="latent", seeds=[7, 8]).images
    other = pipe(batch_size=2, num_inference_steps=6, output_type="latent", seeds=[7, 9]).images
    assert torch.equal(first, again)
    assert torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])
    euler = _edm_euler(pipe, 0.5, None, [7, 8], 6)
    assert (first - euler).abs().max() > 1e-2 and first.abs().max() < 10


@pytest.mark.parametrize(
    "build",
    [
        lambda: EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"),
        lambda: FlowMatchEulerDiscreteScheduler(stochastic_sampling=True),
    ],
    ids=["sde-dpm-solver-edm", "stochastic-flow-match"],
)
def test_stochastic_flow_and_edm_steps_draw_each_samples_noise_from_its_seed(image_model, flow_model, build):
    scheduler = build()
    flow = isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    pipe = _pipeline(flow_model if flow else image_model)
    pipe.scheduler = scheduler
    call = dict(class_labels=[3, 3]) if flow else dict(batch_size=2)
    torch.manual_seed(0)
    first = pipe(**call, num_inference_steps=4, output_type="latent", seeds=[7, 8]).images
    torch.manual_seed(1)
    again = pipe(**call, num_inference_steps=4, output_type="latent", seeds=[7, 8]).images
    other = pipe(**call, num_inference_steps=4, output_type="latent", seeds=[7, 9]).images
    swapped = pipe(**call, num_inference_steps=4, output_type="latent", seeds=[8, 7]).images
    assert torch.equal(first, again)
    assert torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])
    assert torch.equal(first[0], swapped[1]) and torch.equal(first[1], swapped[0])


# ---------------------------------------------------------------------------------------------------------------
# Which scheduler drives which kind
# ---------------------------------------------------------------------------------------------------------------

REFUSALS = [
    ("flow", lambda: DDIMScheduler(), r"is a flow \(velocity\) model: .*FlowMatchEulerDiscreteScheduler\(shift=1.0\)"),
    ("flow", lambda: EDMEulerScheduler(), r"EDMEulerScheduler, but this DiffiT-Tiny/2 is a flow \(velocity\) model"),
    ("flow", lambda: FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), r"use_dynamic_shifting=True.*shift="),
    ("flow", lambda: FlowMatchEulerDiscreteScheduler(invert_sigmas=True), r"invert_sigmas=True \(t = 0 is noise\)"),
    ("adm", lambda: FlowMatchEulerDiscreteScheduler(), r"drives flow \(velocity\) models, but this .* is an ADM"),
    ("adm", lambda: EDMDPMSolverMultistepScheduler(), r"drives EDM-preconditioned models, but this .* is an ADM"),
    ("edm", lambda: DDPMScheduler(), r"image-space EDM model: .*EDMEulerScheduler\(sigma_data=0.5\)"),
    ("edm", lambda: FlowMatchEulerDiscreteScheduler(), r"image-space EDM model: .*EDMDPMSolverMultistepScheduler\("),
    ("edm", lambda: EDMEulerScheduler(sigma_data=0.25), r"sigma_data=0.25, .*EDMEulerScheduler\(sigma_data=0.5\)"),
    ("edm", lambda: EDMEulerScheduler(prediction_type="v_prediction"), r"prediction_type='v_prediction', whose"),
    ("edm", lambda: EDMDPMSolverMultistepScheduler(prediction_type="sample"), r"prediction_type='sample', whose"),
]


@pytest.mark.parametrize("kind, build, message", REFUSALS)
def test_schedulers_that_do_not_drive_the_models_kind_are_refused_in_one_line(
    kind, build, message, latent_model, flow_model, image_model
):
    pipe = _pipeline({"adm": latent_model, "flow": flow_model, "edm": image_model}[kind])
    pipe.scheduler = build()
    call = dict(batch_size=1) if kind == "edm" else dict(class_labels=[1])
    with pytest.raises(ValueError, match=message) as error:
        pipe(**call, num_inference_steps=2, output_type="latent")
    assert "\n" not in str(error.value)


def test_scheduler_for_builds_a_fitting_scheduler_for_every_kind(latent_model, flow_model, edm_class_model):
    from diffusers import DPMSolverMultistepScheduler

    for folder, expected in (
        (latent_model, DPMSolverMultistepScheduler),
        (flow_model, FlowMatchEulerDiscreteScheduler),
        (edm_class_model, EDMEulerScheduler),
    ):
        pipe = _pipeline(folder)
        pipe.scheduler = scheduler_for(pipe.sampling_config)
        assert type(pipe.scheduler) is expected
        pipe.check_scheduler()
    assert pipe.scheduler.config.sigma_data == SIGMA_DATA
    pipe.scheduler = scheduler_for(pipe.sampling_config, EDMDPMSolverMultistepScheduler, solver_order=3)
    pipe.check_scheduler()
    assert pipe.scheduler.config.solver_order == 3 and pipe.scheduler.config.sigma_data == SIGMA_DATA


def test_a_saved_flow_pipeline_keeps_its_shifted_flow_match_scheduler(tmp_path, flow_model):
    pipe = _pipeline(flow_model)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    out = pipe([1, 2], 2.0, num_inference_steps=3, output_type="latent", seeds=[1, 2]).images
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = _pipeline(tmp_path / "pipe")
    assert type(loaded.scheduler) is FlowMatchEulerDiscreteScheduler and loaded.scheduler.config.shift == 3.0
    assert torch.equal(loaded([1, 2], 2.0, num_inference_steps=3, output_type="latent", seeds=[1, 2]).images, out)
