"""Flow matching (`diffit.flow`, kind="flow" of `diffit.sampling.sample`): the math on hand cases and closed forms,
REPA's conventions (t = 1 is noise, float64 integration, no Heun correction on the last step, Euler-Maruyama's
grid and final mean), guidance intervals for every model kind, per-sample seeds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from diffit.flow import (
    interpolate,
    logit_normal_quantile,
    sample_times,
    shift_times,
    time_grid,
    velocity_loss,
)
from diffit.guidance import GuidanceConfig
from diffit.sampling import sample
from diffit.sampling_config import SamplingConfig


class LinearField(nn.Module):
    """v(x, t) = a x + b (one channel per input channel), recording each call's (t, batch size, labels)."""

    def __init__(self, a: float, b: float, num_classes: int = 4, conditional_shift: float = 0.0):
        super().__init__()
        self.a, self.b, self.shift = a, b, conditional_shift
        self.num_classes = num_classes
        self.null_class = num_classes
        self.calls: list[tuple[float, int]] = []
        self.weight = nn.Parameter(torch.zeros(()))  # a parameter: the sampler reads the network's dtype

    def forward(self, x, t, class_labels=None):
        self.calls.append((round(float(t[0]), 6), x.shape[0]))
        out = self.a * x + self.b
        if class_labels is not None:  # conditional rows are shifted, the null class is not: guidance shows
            out = out + self.shift * (class_labels != self.null_class).to(x.dtype).reshape(-1, 1, 1, 1)
        return out


def test_the_velocity_loss_of_a_hand_case():
    # x = (1, 2), noise = (3, 5), t = 0.25: x_t = 0.75 x + 0.25 noise = (1.5, 2.75); target v = noise - x = (2, 3).
    x = torch.tensor([[[[1.0]], [[2.0]]]])
    noise = torch.tensor([[[[3.0]], [[5.0]]]])
    t = torch.tensor([0.25])
    seen = {}

    def identity(x_t, times, class_labels=None):
        seen["x_t"], seen["t"], seen["labels"] = x_t, times, class_labels
        return x_t  # predicts v = x_t: errors (1.5 - 2, 2.75 - 3) = (-0.5, -0.25)

    loss = velocity_loss(identity, x, t, noise, class_labels=torch.tensor([3]))
    assert loss.shape == (1,) and loss.item() == pytest.approx((0.25 + 0.0625) / 2, abs=0)
    torch.testing.assert_close(seen["x_t"].flatten(), torch.tensor([1.5, 2.75]))
    assert torch.equal(seen["t"], t) and seen["labels"].tolist() == [3]
    zero = velocity_loss(lambda x_t, times, class_labels=None: torch.zeros_like(x_t), x, t, noise)
    assert zero.item() == (4 + 9) / 2
    # A learned-Sigma head (twice the channels): only the first channels are compared.
    doubled = velocity_loss(lambda x_t, times, class_labels=None: torch.cat([x_t, 100 + x_t], 1), x, t, noise)
    assert doubled.item() == loss.item()
    torch.testing.assert_close(interpolate(x, noise, torch.tensor([1.0])), noise)
    torch.testing.assert_close(interpolate(x, noise, torch.tensor([0.0])), x)


def test_logit_normal_quantiles_and_the_shift_formula():
    assert logit_normal_quantile(0.5) == pytest.approx(0.5, abs=1e-15)
    # Phi(1) = 0.8413447460685429: the quantile is sigmoid(1); with m = 1, s = 2 at Phi(-0.5): sigmoid(0)
    assert logit_normal_quantile(0.8413447460685429) == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-12)
    assert logit_normal_quantile(0.3085375387259869, mean=1.0, std=2.0) == pytest.approx(0.5, rel=1e-12)
    times = sample_times(200_000, "logit-normal", generator=torch.Generator().manual_seed(0)).double()
    for probability in (0.1, 0.5, 0.9):
        assert torch.quantile(times, probability).item() == pytest.approx(logit_normal_quantile(probability), abs=3e-3)
    # SD3: t' = s t / (1 + (s - 1) t); s = 3 at t = 0.5: 1.5 / 2 = 0.75; 0 and 1 stay.
    assert shift_times(torch.tensor([0.0, 0.5, 1.0]), 3.0).tolist() == [0.0, 0.75, 1.0]
    uniform = sample_times(5, generator=torch.Generator().manual_seed(1))
    shifted = sample_times(5, shift=3.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(shifted, 3 * uniform / (1 + 2 * uniform))
    with pytest.raises(ValueError, match="unknown time sampling 'lognormal'"):
        sample_times(2, "lognormal")


def test_the_time_grids_are_repas():
    assert time_grid("euler", 4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0] and time_grid("heun", 2).dtype == torch.float64
    grid = time_grid("euler-maruyama", 3)
    assert grid.tolist() == pytest.approx([1.0, 0.52, 0.04, 0.0]) and len(grid) == 4


def _noise(seeds, shape=(1, 1, 1)):
    return torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).double()


def test_one_euler_step_and_heun_on_a_linear_field_equal_the_closed_forms():
    a, b = 0.3, -0.7
    for sampler, steps in (("euler", 1), ("euler", 4), ("heun", 2), ("heun", 3)):
        field = LinearField(a, b)
        config = SamplingConfig(sampler=sampler, steps=steps, kind="flow")
        out = sample(field, (1, 1, 1), None, [11, 12], config)
        x = _noise([11, 12])
        h = -1.0 / steps
        for i in range(steps):
            v = a * x + b
            if sampler == "heun" and i < steps - 1:  # trapezoid, except on the last step
                x = x + h * 0.5 * (v + a * (x + h * v) + b)
            else:
                x = x + h * v
        torch.testing.assert_close(out.double(), x, rtol=1e-6, atol=1e-6)
        calls = 2 * steps - 1 if sampler == "heun" else steps
        assert len(field.calls) == calls and field.calls[0] == (1.0, 2)


def test_euler_maruyama_is_repas_sde_with_a_final_mean_and_per_sample_noise():
    a, b, steps, seeds = 0.2, 0.1, 4, [3, 4, 5]
    out = sample(
        LinearField(a, b), (1, 2, 2), None, seeds, SamplingConfig(sampler="euler-maruyama", steps=steps, kind="flow")
    )
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.stack([torch.randn(1, 2, 2, generator=g) for g in generators]).double()
    grid = [1.0, 1.0 - 0.32, 1.0 - 0.64, 0.04, 0.0]
    for i in range(steps):
        t, t_next = grid[i], grid[i + 1]
        v = a * x + b
        score = (-(1 - t) * v - x) / t  # the linear path's score from the velocity
        x = x + (t_next - t) * (v - 0.5 * (2 * t) * score)
        if i < steps - 1:
            noise = torch.stack([torch.randn(1, 2, 2, generator=g) for g in generators]).double()
            x = x + math.sqrt(2 * t) * math.sqrt(abs(t_next - t)) * noise
    torch.testing.assert_close(out.double(), x, rtol=1e-5, atol=1e-5)
    alone = sample(
        LinearField(a, b),
        (1, 2, 2),
        None,
        seeds[1:2],
        SamplingConfig(sampler="euler-maruyama", steps=steps, kind="flow"),
    )
    torch.testing.assert_close(alone[0], out[1])


def test_guidance_mixes_velocities_and_an_interval_decides_per_step_including_heuns_correction():
    labels = [1, 2]
    guided = GuidanceConfig(scale=3.0, channels=None)
    field = LinearField(0.0, 0.0, conditional_shift=1.0)  # v_c = 1, v_u = 0: guided v = 3
    out = sample(
        field, (1, 1, 1), labels, [1, 2], SamplingConfig(sampler="euler", steps=2, kind="flow", guidance=guided)
    )
    torch.testing.assert_close(out.double(), _noise([1, 2]) - 3.0)  # two steps of -0.5 * 3
    # Interval [0.5, 0.5] on Heun with 2 steps (t = 1 -> 0.5 -> 0): step 1 starts at t = 1, outside, so both its
    # evaluations (at 1 and at 0.5) are unguided; step 2 starts at 0.5, inside (bounds included), guided.
    field = LinearField(0.0, 0.0, conditional_shift=1.0)
    config = SamplingConfig(
        sampler="heun", steps=2, kind="flow", guidance=GuidanceConfig(scale=3.0, channels=None, interval=(0.5, 0.5))
    )
    out = sample(field, (1, 1, 1), labels, [1, 2], config)
    assert field.calls == [(1.0, 2), (0.5, 2), (0.5, 4)]
    torch.testing.assert_close(out.double(), _noise([1, 2]) - 0.5 * 1.0 - 0.5 * 3.0)
    # An interval no step starts in: the unguided samples exactly.
    outside = GuidanceConfig(scale=3.0, interval=(0.3, 0.4))  # steps start at 1, 0.75, 0.5, 0.25
    plain = sample(
        LinearField(0.1, 0.0, conditional_shift=1.0),
        (1, 1, 1),
        labels,
        [1, 2],
        SamplingConfig(sampler="euler", steps=4, kind="flow"),
    )
    never = sample(
        LinearField(0.1, 0.0, conditional_shift=1.0),
        (1, 1, 1),
        labels,
        [1, 2],
        SamplingConfig(sampler="euler", steps=4, kind="flow", guidance=outside),
    )
    assert torch.equal(plain, never)


def test_interval_boundaries_follow_each_kinds_convention():
    config = GuidanceConfig(scale=2.0, interval=(0.1, 0.7))
    # Flow t: both ends included (REPA: t_cur <= high and t_cur >= low).
    assert [config.contains(t) for t in (0.0999, 0.1, 0.7, 0.7001)] == [False, True, True, False]
    # Sigma (EDM, ADM): (low, high] (EDM2 / Kynkäänniemi et al.).
    assert [config.contains(s, low_inclusive=False) for s in (0.1, 0.1001, 0.7, 0.7001)] == [False, True, True, False]
    sigmas = torch.tensor([0.1, 0.5, 0.7, 0.9], dtype=torch.float64)
    assert config.contains(sigmas, low_inclusive=False).tolist() == [False, True, True, False]
    assert GuidanceConfig(scale=2.0).contains(5.0) and GuidanceConfig(scale=2.0).contains(sigmas).all()
    with pytest.raises(ValueError, match="0 <= low <= high"):
        GuidanceConfig(scale=2.0, interval=(0.5, 0.1))
    restored = SamplingConfig.from_dict(SamplingConfig(kind="flow", sampler="heun", guidance=config).to_dict())
    assert restored.guidance.interval == (0.1, 0.7)


def test_an_edm_guidance_interval_guides_only_the_heun_steps_whose_sigma_lies_in_it():
    from diffit.edm import EDMPrecond

    class Recording(nn.Module):
        """EDM's raw network F; records the batch size of each call by its noise level."""

        def __init__(self):
            super().__init__()
            self.num_classes, self.null_class, self.calls = 4, 4, []
            self.weight = nn.Parameter(torch.zeros(()))

        def forward(self, x, c_noise, class_labels=None):
            self.calls.append((float(c_noise[0]), x.shape[0]))
            return torch.zeros_like(x) + (class_labels != 4).to(x.dtype).reshape(-1, 1, 1, 1)

    network = Recording()
    guidance = GuidanceConfig(scale=2.0, channels=None, interval=(0.5, 10.0))
    config = SamplingConfig(sampler="edm-heun", steps=4, kind="edm", sigma_data=0.5, guidance=guidance)
    sample(EDMPrecond(network, sigma_data=0.5), (1, 2, 2), [1], [0], config)
    for c_noise, batch in network.calls:
        sigma = math.exp(4 * c_noise)  # EDM: c_noise = ln(sigma) / 4
        assert batch == (2 if 0.5 < sigma <= 10.0 else 1), (sigma, batch)
    assert {batch for _, batch in network.calls} == {1, 2}


def test_flow_kind_and_flow_samplers_go_together():
    with pytest.raises(ValueError, match="flow models"):
        SamplingConfig(kind="flow", sampler="ddpm").check()
    with pytest.raises(ValueError, match="sample only flow models"):
        SamplingConfig(kind="adm", sampler="heun").check()
    SamplingConfig(kind="flow", sampler="euler-maruyama", steps=1).check()


def test_an_adm_guidance_interval_uses_the_training_chains_sigma_of_each_timestep():
    from diffit.diffusion import create_diffusion

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_classes, self.null_class, self.learn_sigma, self.calls = 4, 4, False, []
            self.weight = nn.Parameter(torch.zeros(()))

        def forward(self, x, t, class_labels=None):
            self.calls.append((float(t[0]), x.shape[0]))
            return torch.zeros_like(x)

    network = Recording()
    guidance = GuidanceConfig(scale=2.0, interval=(0.5, 5.0))
    sample(network, (4, 2, 2), [1], [0], SamplingConfig(sampler="ddim", steps=10, guidance=guidance))
    alphas = torch.as_tensor(create_diffusion(None, "linear", learn_sigma=False).alphas_cumprod, dtype=torch.float64)
    sigmas = ((1 - alphas) / alphas).sqrt()
    for t, batch in network.calls:
        assert batch == (2 if 0.5 < sigmas[round(t)] <= 5.0 else 1), (t, float(sigmas[round(t)]), batch)
    assert {batch for _, batch in network.calls} == {1, 2}


def test_a_saved_pipelines_flow_sampling_and_interval_pass_the_folder_check_and_bad_ones_do_not():
    from diffit.pipeline_check import check_pipeline_sampling

    good = SamplingConfig(kind="flow", sampler="heun", steps=50, guidance=GuidanceConfig(scale=1.8, interval=(0, 0.7)))
    check_pipeline_sampling(json.loads(json.dumps(good.to_dict())))  # as model_index.json holds it
    for interval, message in (
        ([0.7, 0.1], "must be null or \\[low, high\\]"),
        ([0.1], "must be null"),
        ([-1, 1], "interval\\[0\\] must be in \\[0.0, "),
    ):
        with pytest.raises(ValueError, match=message):
            check_pipeline_sampling({"guidance": {"interval": interval}})
    with pytest.raises(ValueError, match="sampling.kind"):
        check_pipeline_sampling({"kind": "sde"})


# ---------------------------------------------------------------------------------------------------------------
# Flow matching as a training objective: config, loss, export, evaluate, DiffiTPipeline


def test_the_flow_objective_is_the_velocity_loss_on_its_own_draws():
    """`diffusion.type: flow`: times (uniform, or logit-normal and shifted), then noise, from the global RNG (as
    ADM draws its timesteps), and the batch mean of `velocity_loss`."""
    from pipeline.train.config import config_from_dict
    from pipeline.train.objective import Objective
    from tests.support.train_fixtures import tiny_latent_config

    network = LinearField(0.5, 0.25)
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(9))
    for diffusion in (
        {"type": "flow", "learn_sigma": False},
        {"type": "flow", "learn_sigma": False, "time_sampling": "logit-normal", "logit_mean": 0.5, "time_shift": 3.0},
    ):
        config = config_from_dict(tiny_latent_config(diffusion=diffusion, sample={"sampler": "heun"}))
        torch.manual_seed(4)
        loss = Objective(config, null_class=None)(network, x, None)
        torch.manual_seed(4)
        if diffusion.get("time_sampling") == "logit-normal":
            t = torch.sigmoid(0.5 + torch.randn(3))
            t = 3.0 * t / (1 + 2.0 * t)
        else:
            t = torch.rand(3)
        noise = torch.randn_like(x)
        x_t = (1 - t.reshape(-1, 1, 1, 1)) * x + t.reshape(-1, 1, 1, 1) * noise
        expected = ((0.5 * x_t + 0.25 - (noise - x)) ** 2).mean()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "diffusion, sample, message",
    [
        ({"type": "flow", "learn_sigma": False}, {"sampler": "ddim"}, "sample.sampler 'ddim' does not sample"),
        ({"type": "flow", "learn_sigma": True}, {"sampler": "heun"}, "learn_sigma must be false for flow training"),
        ({"type": "adm"}, {"sampler": "heun"}, "sample.sampler 'heun' does not sample diffusion.type 'adm'"),
        ({"type": "flow", "learn_sigma": False, "time_shift": 0}, {"sampler": "heun"}, "time_shift must be > 0"),
    ],
)
def test_flow_settings_that_do_not_fit_are_refused_at_load(tmp_path, diffusion, sample, message):
    from pipeline.train.config import ConfigError, load_config
    from tests.support.train_fixtures import tiny_latent_config, write_config

    path = write_config(tmp_path / "c.yaml", tiny_latent_config(diffusion=diffusion, sample=sample))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_flow_model_trains_exports_evaluates_and_loads_in_diffitpipeline(tmp_path, tiny_vae):
    """Latent DiffiT trained by flow matching (4 steps), exported with its `diffusion: flow` entry, evaluated with
    the flow default (Heun, 50 steps) or a given sampler, and sampled by DiffiTPipeline exactly as `sample`."""
    from diffit import DiffiTPipeline, load_pretrained
    from pipeline.evaluate import STORE_NAME, EvaluateOptions, SampleStore, run_evaluate
    from pipeline.train import TrainOptions, export_checkpoint, run_train
    from tests.support.train_fixtures import read_metrics, tiny_latent_config, write_config, write_latent_dataset

    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=1, vae_path=str(tiny_vae))
    diffusion = {"type": "flow", "learn_sigma": False, "time_sampling": "logit-normal"}
    config = tiny_latent_config(diffusion=diffusion, sample={"sampler": "heun", "steps": 4}, train={"max_steps": 4})
    run_train(
        TrainOptions(run_dir=tmp_path / "run", config_path=write_config(tmp_path / "c.yaml", config), data_dir=data)
    )
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) and v > 0 for v in losses)
    export_checkpoint(tmp_path / "run", tmp_path / "model")
    model, exported = load_pretrained(tmp_path / "model")
    assert exported["diffusion"] == {
        "type": "flow", "time_sampling": "logit-normal", "logit_mean": 0.0, "logit_std": 1.0, "time_shift": 1.0
    }  # fmt: skip
    assert model.learn_sigma is False and model.out_channels == 4
    record = run_evaluate(
        EvaluateOptions(
            tmp_path / "model", tmp_path / "eval", num_samples=2, batch_size=2, metrics=(), device="cpu", vae=tiny_vae
        )
    )
    assert (record["sampling"]["kind"], record["sampling"]["sampler"], record["sampling"]["steps"]) == (
        "flow",
        "heun",
        50,
    )
    images = SampleStore.open(tmp_path / "eval" / STORE_NAME, mode="r").read_images(0, 2)
    assert images.shape[0] == 2 and images.shape[-1] == 3 and images.std() > 0
    options = EvaluateOptions(
        tmp_path / "model", tmp_path / "ddim", num_samples=2, batch_size=2, metrics=(), device="cpu", vae=tiny_vae,
        sampling={"sampler": "ddim", "steps": 2},
    )  # fmt: skip
    with pytest.raises(Exception, match="a flow model samples with euler, heun, euler-maruyama, not ddim"):
        run_evaluate(options)
    pipe = DiffiTPipeline.from_pretrained(tmp_path / "model", vae=str(tiny_vae))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.sampling_config.kind == "flow" and pipe.sampling_config.sampler == "heun"
    latents = pipe([1, 2], 1.0, num_inference_steps=3, output_type="latent", seeds=[5, 6]).images
    config = SamplingConfig(sampler="heun", steps=3, kind="flow", guidance=GuidanceConfig())
    torch.testing.assert_close(latents, sample(pipe.transformer, (4, 8, 8), [1, 2], [5, 6], config))


# ---------------------------------------------------------------------------------------------------------------
# Autoguidance (Karras et al. 2024): a weaker guide replaces the unconditional branch


def test_autoguidance_with_the_main_model_as_its_own_guide_is_the_unguided_model_for_every_kind():
    """D = D_guide + w (D - D_guide) is D itself when the guide is the main model: the samples of every kind equal
    the unguided ones exactly (and guidance with the null class differs)."""
    import diffit

    torch.manual_seed(0)
    latent = diffit.create_model("DiffiT-Tiny/2", input_size=8, num_classes=10, learn_sigma=False).eval()
    for parameter in latent.parameters():
        if not parameter.any():
            torch.nn.init.normal_(parameter, std=0.1)
    cases = [
        (latent, (4, 8, 8), SamplingConfig(sampler="ddim", steps=3, learn_sigma=False)),
        (latent, (4, 8, 8), SamplingConfig(sampler="heun", steps=3, kind="flow")),
        (latent, (4, 8, 8), SamplingConfig(sampler="edm-heun", steps=3, kind="edm", sigma_data=1.0)),
    ]
    for model, shape, config in cases:
        plain = sample(model, shape, [1, 2], [3, 4], config)
        guided = dataclasses_replace(config, guidance=GuidanceConfig(scale=3.0, channels=None))
        assert torch.equal(sample(model, shape, [1, 2], [3, 4], guided, guide=model), plain), config.kind
        assert not torch.allclose(sample(model, shape, [1, 2], [3, 4], guided), plain), config.kind


def test_autoguidance_mixes_the_guide_and_the_main_velocity_in_closed_form():
    main, guide = LinearField(0.0, 2.0), LinearField(0.0, 0.5)  # v = 2 and v = 0.5 everywhere
    config = SamplingConfig(sampler="euler", steps=2, kind="flow", guidance=GuidanceConfig(scale=3.0, channels=None))
    out = sample(main, (1, 1, 1), [1, 2], [1, 2], config, guide=guide)
    # v = 0.5 + 3 (2 - 0.5) = 5 for both steps of -0.5: x_0 = x_1 - 5
    torch.testing.assert_close(out.double(), _noise([1, 2]) - 5.0)
    assert main.calls == [(1.0, 2), (0.5, 2)] and guide.calls == [(1.0, 2), (0.5, 2)]  # no doubled batch


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


@pytest.mark.slow
def test_flow_training_in_bf16_draws_the_fp32_runs_times_and_noise_and_resumes(tmp_path):
    """`train.mixed_precision: bf16` with the flow objective (a fresh process: one Accelerate precision per
    process): the same time and noise draws as the fp32 run, so each step's loss equals the fp32 loss up to bf16's
    rounding of the network (~1%, far below the spread of losses between steps); resumed from its checkpoint to
    step 3 it continues."""
    import subprocess
    import sys

    from pipeline.train import TrainOptions, run_train
    from tests.support.train_fixtures import read_metrics, tiny_latent_config, write_config, write_latent_dataset

    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=1)
    diffusion = {"type": "flow", "learn_sigma": False, "time_sampling": "logit-normal"}
    losses = {}
    for precision in ("no", "bf16"):
        config = tiny_latent_config(
            diffusion=diffusion,
            sample={"sampler": "heun", "every": 0},
            train={"max_steps": 2, "mixed_precision": precision},
            checkpoint={"every": 2, "keep": 1},
        )
        path = write_config(tmp_path / f"{precision}.yaml", config)
        run_dir = tmp_path / precision
        if precision == "no":
            run_train(TrainOptions(run_dir=run_dir, config_path=path, data_dir=data))
        else:
            train = [sys.executable, "-m", "cli.main", "train", "--config", str(path), "--data", str(data)]
            train += ["--run-dir", str(run_dir)]
            assert subprocess.run(train, capture_output=True, text=True).returncode == 0
            resume = [*train, "--resume", "auto", "--set", "train.max_steps=3"]
            done = subprocess.run(resume, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-2000:]
        losses[precision] = [record["loss"] for record in read_metrics(run_dir) if "loss" in record]
    assert len(losses["no"]) == 2 and len(losses["bf16"]) == 3
    assert abs(losses["no"][1] - losses["no"][0]) > 0.02
    for fp32, bf16 in zip(losses["no"], losses["bf16"]):
        assert bf16 == pytest.approx(fp32, rel=0.01)
