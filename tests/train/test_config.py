"""Training configuration: presets (paper values), strict loading, overrides, batching, lr / EMA schedules."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from pipeline.train.checks import resolve_batching
from pipeline.train.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    validate,
)
from pipeline.train.objective import ema_decay, learning_rate, update_ema

REPO = Path(__file__).resolve().parents[2]
PRESETS = REPO / "manifests"


def write_yaml(path: Path, mapping: dict) -> Path:
    path.write_text(yaml.safe_dump(mapping))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["imagenet256_latent_xl2", "imagenet512_latent_xl2", "cifar10_image", "ffhq64_image", "demo"]
)
def test_every_preset_loads_and_round_trips(name, tmp_path):
    config = load_config(PRESETS / f"{name}.yaml")
    # The resolved config written into a run directory loads back to the same values.
    again = load_config(write_yaml(tmp_path / "resolved.yaml", yaml.safe_load(dump_config(config))))
    assert config_to_dict(again) == config_to_dict(config)


def test_imagenet_presets_follow_the_paper_supplementary_i2():
    c256 = load_config(PRESETS / "imagenet256_latent_xl2.yaml")
    c512 = load_config(PRESETS / "imagenet512_latent_xl2.yaml")
    for config in (c256, c512):
        assert config.model.name == "DiffiT-XL/2" and config.model.num_classes == 1000
        assert (config.optim.name, config.optim.weight_decay) == ("adamw", 0.0)  # as DiT
        assert config.ema.decay == 0.9999 and config.ema.halflife_kimg is None
        assert (
            config.diffusion.type,
            config.diffusion.noise_schedule,
            config.diffusion.diffusion_steps,
            config.diffusion.learn_sigma,
        ) == ("adm", "linear", 1000, True)  # ADM hyper-parameters
        assert config.data.label_dropout == 0.1
        assert config.train.mixed_precision == "bf16"
        # Checkpoints every 10k steps, 3 kept, and every 50k-step one kept for good (FID against steps).
        assert (config.checkpoint.every, config.checkpoint.keep, config.checkpoint.keep_every) == (10000, 3, 50000)
    assert (c256.optim.lr, c256.train.global_batch_size, c256.model.input_size) == (3e-4, 256, 32)
    assert (c512.optim.lr, c512.train.global_batch_size, c512.model.input_size) == (1e-4, 512, 64)


def test_image_space_presets_follow_the_paper_supplementary_i1_and_edm():
    cifar = load_config(PRESETS / "cifar10_image.yaml")
    ffhq = load_config(PRESETS / "ffhq64_image.yaml")
    for config in (cifar, ffhq):
        assert config.diffusion.type == "edm" and config.optim.name == "adam"
        assert config.train.max_steps == 200_000 and config.model.num_classes == 0  # unconditional
        assert (config.ema.halflife_kimg, config.ema.rampup_ratio, config.optim.warmup_kimg) == (500, 0.05, 10000)
        assert (config.diffusion.P_mean, config.diffusion.P_std, config.diffusion.sigma_data) == (-1.2, 1.2, 0.5)
        assert config.sample.sampler == "edm-heun"
    assert (cifar.model.name, cifar.optim.lr, cifar.train.global_batch_size, cifar.sample.steps) == (
        "DiffiT-CIFAR10",
        1e-3,
        512,
        18,
    )
    assert (ffhq.model.name, ffhq.optim.lr, ffhq.train.global_batch_size, ffhq.sample.steps) == (
        "DiffiT-FFHQ64",
        2e-4,
        256,
        40,
    )
    assert (cifar.model.kwargs["dropout"], ffhq.model.kwargs["dropout"]) == (0.13, 0.05)


def test_demo_preset_is_small_and_fp32():
    config = load_config(PRESETS / "demo.yaml")
    assert config.model.name == "DiffiT-Tiny/2" and config.train.mixed_precision == "no"
    assert config.train.max_steps <= 1000


# ---------------------------------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_key_is_an_error_naming_key_and_file(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"optim": {"lr": 1e-4, "learning_rate": 2}})
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim: unknown key 'learning_rate'"):
        load_config(path)
    path = write_yaml(tmp_path / "bad2.yaml", {"optimiser": {"lr": 1e-4}})
    with pytest.raises(ConfigError, match="unknown key 'optimiser'"):
        load_config(path)


def test_yaml_aliases_and_huge_files_are_refused_in_presets_and_overrides(tmp_path):
    """A 400-byte alias bomb (9^6 strings once expanded into an error message or a saved config.yaml) is refused
    at its first alias; so is a preset over 1 MiB, before it is read."""
    bomb = tmp_path / "bomb.yaml"
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 6)]
    bomb.write_text("\n".join(lines) + "\nmodel: {kwargs: {x: *a5}}\n")
    with pytest.raises(ConfigError, match=r"bomb\.yaml: not valid YAML \(aliases \(\*name\) are not accepted \(line 2"):
        load_config(bomb)
    preset = PRESETS / "demo.yaml"
    message = r"--set 'model.kwargs.x=\[&a 1, \*a\]': the value is not valid YAML \(aliases"
    with pytest.raises(ConfigError, match=message):
        load_config(preset, ["model.kwargs.x=[&a 1, *a]"])
    huge = tmp_path / "huge.yaml"
    huge.write_text(preset.read_text() + "#" * (1 << 20) + "\n")
    with pytest.raises(
        ConfigError, match=r"huge\.yaml: not valid YAML \(a YAML file of \d+ bytes, more than the 1048576"
    ):
        load_config(huge)


@pytest.mark.parametrize(
    "section,key,value,message",
    [
        ("train", "max_steps", "ten", "train.max_steps: expected an integer"),
        ("train", "max_steps", 1.5, "train.max_steps: expected an integer"),
        ("train", "mixed_precision", "fp8", "train.mixed_precision: 'fp8' is not one of"),
        ("model", "gradient_checkpointing", 1, "model.gradient_checkpointing: expected true/false"),
        ("optim", "lr", "fast", "optim.lr: expected a number"),
        ("optim", "betas", 0.9, "optim.betas: expected a list"),
        ("data", "label_dropout", 1.5, r"data.label_dropout must be in \[0, 1\)"),
        ("model", "name", "DiffiT-Huge/1", "model.name 'DiffiT-Huge/1' is not a known model"),
        ("train", "tracker", "tensorbored", "train.tracker: 'tensorbored' is not a tracker"),
        ("train", "tracker", ["wandb", "all"], "train.tracker: 'all' is not a tracker"),
        ("train", "tracker", ["none", "wandb"], "'none' cannot be combined"),
        ("train", "tracker", 3, "train.tracker: 3 fits none of"),
        ("checkpoint", "keep_every", -5, "checkpoint.keep_every must be >= 0"),
        ("optim", "fused", "yes", "optim.fused: expected true/false"),
    ],
)
def test_wrong_types_and_values_are_errors(tmp_path, section, key, value, message):
    path = write_yaml(tmp_path / "bad.yaml", {section: {key: value}})
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_tracker_takes_one_name_a_list_or_none(tmp_path):
    from pipeline.train.config import tracker_names

    for setting, names in [
        ("none", []),
        ([], []),
        ("wandb", ["wandb"]),
        (["wandb", "tensorboard", "wandb"], ["wandb", "tensorboard"]),
        (["mlflow", "aim"], ["mlflow", "aim"]),
    ]:
        config = load_config(write_yaml(tmp_path / "c.yaml", {"train": {"tracker": setting}}))
        assert tracker_names(config.train.tracker) == names
    # A list round-trips through the run directory's config.yaml.
    config = load_config(PRESETS / "demo.yaml", ["train.tracker=[tensorboard, wandb]"])
    assert yaml.safe_load(dump_config(config))["train"]["tracker"] == ["tensorboard", "wandb"]


def test_performance_settings_may_change_on_resume():
    from pipeline.train.config import FREE_ON_RESUME

    assert {"optim.fused", "model.channels_last", "model.compile"} <= set(FREE_ON_RESUME)
    config = Config()
    assert (config.optim.fused, config.model.channels_last, config.model.compile, config.train.tf32) == (
        None,
        False,
        False,
        True,
    )
    assert config.checkpoint.keep_every == 0


def test_yaml_exponent_without_dot_is_read_as_a_float(tmp_path):
    # YAML 1.1 reads 3e-4 as the string "3e-4"; a float field accepts it.
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-4\n")
    assert load_config(path).optim.lr == pytest.approx(3e-4)


def test_model_family_and_objective_must_agree():
    with pytest.raises(ConfigError, match="is an image-space model, trained with diffusion.type 'edm' or 'flow'"):
        config_from_dict({"model": {"name": "DiffiT-UNet-Tiny"}, "diffusion": {"type": "adm"}})
    with pytest.raises(ConfigError, match="sample.sampler 'ddim' does not sample diffusion.type 'edm' models"):
        config_from_dict(
            {
                "model": {"name": "DiffiT-UNet-Tiny"},
                "diffusion": {"type": "edm", "learn_sigma": False},
                "sample": {"sampler": "ddim"},
            }
        )
    with pytest.raises(ConfigError, match="diffusion.learn_sigma must be false for EDM"):
        config_from_dict({"model": {"name": "DiffiT-Tiny/2"}, "diffusion": {"type": "edm", "learn_sigma": True}})
    with pytest.raises(ConfigError, match="contradicts diffusion.learn_sigma"):
        config_from_dict(
            {
                "model": {"name": "DiffiT-Tiny/2", "kwargs": {"learn_sigma": True}},
                "diffusion": {"type": "edm", "learn_sigma": False},
                "sample": {"sampler": "edm-heun"},
            }
        )


def test_latent_models_may_train_with_edm_preconditioning():
    config = config_from_dict(
        {
            "model": {"name": "DiffiT-Tiny/2"},
            "diffusion": {"type": "edm", "learn_sigma": False},
            "sample": {"sampler": "edm-heun"},
        }
    )
    assert config.diffusion.type == "edm"


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------------------------------------
# --set overrides
# ---------------------------------------------------------------------------------------------------------------


def test_overrides_are_typed_and_nested():
    config = load_config(
        PRESETS / "demo.yaml",
        [
            "optim.lr=2e-4",
            "train.max_steps=7",
            "model.kwargs.mlp_ratio=2.0",
            "optim.grad_clip=null",
            "optim.betas=[0.5, 0.9]",
        ],
    )
    assert config.optim.lr == pytest.approx(2e-4)
    assert config.train.max_steps == 7
    assert config.model.kwargs == {"mlp_ratio": 2.0}
    assert config.optim.grad_clip is None
    assert config.optim.betas == [0.5, 0.9]


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.max_step=3", "unknown key 'train.max_step'"),
        ("trian.max_steps=3", "unknown key 'trian'"),
        ("train.max_steps=many", "train.max_steps: expected an integer"),
        ("train=3", "SECTION.FIELD"),
        ("train.max_steps", "expected KEY=VALUE"),
        ("optim.lr.value=3", "'optim.lr' is not a section"),
    ],
)
def test_bad_overrides_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PRESETS / "demo.yaml", [override])


# ---------------------------------------------------------------------------------------------------------------
# Batching, learning rate, EMA
# ---------------------------------------------------------------------------------------------------------------


def test_global_batch_is_per_device_times_processes_times_accumulation():
    config = Config()
    config.train.global_batch_size = 256
    assert resolve_batching(config, 8) == (32, 1)
    config.train.per_device_batch_size = 8
    assert resolve_batching(config, 8) == (8, 4)
    assert resolve_batching(config, 1) == (8, 32)
    config.train.per_device_batch_size = 24
    with pytest.raises(ConfigError, match="not divisible by per_device_batch_size 24 x 8 processes"):
        resolve_batching(config, 8)
    config.train.per_device_batch_size = None
    with pytest.raises(ConfigError, match="not divisible by 3 processes"):
        resolve_batching(config, 3)


def test_learning_rate_ramp_is_edm_linear_rampup():
    config = Config()
    config.optim.lr = 1e-3
    assert learning_rate(config, 0) == 1e-3  # no ramp by default (DiT)
    config.optim.warmup_kimg = 10_000
    assert learning_rate(config, 0) == 0.0
    assert learning_rate(config, 2_500_000) == pytest.approx(2.5e-4)
    assert learning_rate(config, 10_000_000) == pytest.approx(1e-3)
    assert learning_rate(config, 50_000_000) == pytest.approx(1e-3)


def test_learning_rate_decays_linearly_over_the_last_fraction():
    config = Config()
    config.optim.lr, config.optim.decay_fraction = 1e-3, 0.25
    config.train.max_steps, config.train.global_batch_size = 100, 10  # 1000 images, decay over the last 250
    lrs = [learning_rate(config, step * 10) for step in range(100)]
    assert lrs[:76] == [1e-3] * 76  # constant until 750 images
    assert lrs[80] == pytest.approx(1e-3 * 200 / 250)
    assert lrs[-1] == pytest.approx(1e-3 * 10 / 250)  # the last step still moves the weights
    assert all(a > b for a, b in zip(lrs[75:], lrs[76:]))
    config.optim.warmup_kimg = 0.5  # ramp and decay compose
    assert learning_rate(config, 250) == pytest.approx(0.5e-3)
    assert learning_rate(config, 900) == pytest.approx(1e-3 * 100 / 250)
    config.optim.decay_fraction = 1.5
    with pytest.raises(ConfigError, match="decay_fraction"):
        validate(config)


def test_ema_decay_fixed_and_halflife():
    config = Config()
    assert ema_decay(config, 12345, 256) == 0.9999
    config.ema.halflife_kimg = 500
    # After one half-life of images the old weights keep exactly half their weight.
    batch = 512
    steps = 500_000 // batch
    assert ema_decay(config, 10**9, batch) ** steps == pytest.approx(0.5 ** (steps * batch / 500_000))
    assert ema_decay(config, 10**9, batch) == pytest.approx(0.5 ** (512 / 500_000))
    config.ema.rampup_ratio = 0.05
    assert ema_decay(config, 0, batch) == 0.0  # the first update copies the weights (EDM)
    assert ema_decay(config, 100_000, batch) == pytest.approx(0.5 ** (512 / 5_000))


def test_update_ema_is_the_closed_form_lerp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    model[1].running_mean.fill_(0.25)
    update_ema(ema, model, decay=0.9)
    for name, param in model.named_parameters():
        expected = 0.9 * before[name] + 0.1 * param.detach()
        assert torch.allclose(ema.state_dict()[name], expected, atol=1e-7)
    # Buffers (running statistics) are copied, not averaged.
    assert torch.equal(ema[1].running_mean, torch.full((2,), 0.25))
    assert math.isclose(float(ema[1].num_batches_tracked), float(model[1].num_batches_tracked))


def songunet_config(**sections) -> dict:
    """A small DDPM++ (EDM's SongUNet) config for EDM training on 8 px images."""
    from tests.support.train_fixtures import tiny_image_config

    small = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4]}
    return tiny_image_config(model={"name": "DDPM++-CIFAR10", "input_size": 8, "kwargs": small}, **sections)


@pytest.mark.parametrize("precond", ["edm", "vp", "ve"])
def test_edms_songunet_trains_with_edm_and_each_precond_and_augment(precond):
    from pipeline.train.checks import configured_model_kwargs

    config = config_from_dict(songunet_config(diffusion={"precond": precond}, data={"augment": 0.12}))
    assert (config.diffusion.precond, config.data.augment) == (precond, 0.12)
    # EDM's augmentation gives the network its 9 augment labels; without it, none (EDM's train.py).
    assert configured_model_kwargs(config)["augment_dim"] == 9
    assert configured_model_kwargs(config)["img_resolution"] == 8
    assert configured_model_kwargs(config_from_dict(songunet_config()))["augment_dim"] == 0
    defaults = Config()
    assert (defaults.diffusion.precond, defaults.data.augment) == ("edm", 0.0)


@pytest.mark.parametrize(
    "sections, message",
    [
        (
            {"diffusion": {"type": "flow", "learn_sigma": False}, "sample": {"sampler": "heun"}},
            "model.name 'DDPM++-CIFAR10' is EDM's DDPM++ / NCSN++ network (diffit.songunet), trained with "
            "diffusion.type 'edm' (diffusion.precond edm | vp | ve); got diffusion.type 'flow'",
        ),
        ({"data": {"augment": 1.5}}, "data.augment must be in [0, 1] (EDM's --augment probability), got 1.5"),
        ({"data": {"augment": -0.1}}, "data.augment must be in [0, 1] (EDM's --augment probability), got -0.1"),
    ],
)
def test_songunet_settings_edm_does_not_have_are_refused_at_load(tmp_path, sections, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write_yaml(tmp_path / "c.yaml", songunet_config(**sections)))


def test_precond_and_augment_belong_to_edm_training():
    from tests.support.train_fixtures import tiny_image_config, tiny_latent_config

    refusals = [
        (
            tiny_latent_config(diffusion={"precond": "vp"}),
            "diffusion.precond 'vp' is a preconditioning of EDM training (diffusion.type 'edm'), not of "
            "diffusion.type 'adm'",
        ),
        (
            tiny_latent_config(
                diffusion={"type": "edm", "learn_sigma": False}, data={"augment": 0.12}, sample={"sampler": "edm-heun"}
            ),
            "data.augment 0.12: EDM's augmentation augments images for a network that takes its augment labels "
            "(the DiffiT U-Net, EDM's DDPM++ / NCSN++); model.name 'DiffiT-Tiny/2' is a DiffiT latent model",
        ),
        (
            tiny_image_config(diffusion={"type": "flow"}, data={"augment": 0.12}, sample={"sampler": "heun"}),
            "data.augment 0.12: EDM's augmentation is part of EDM training (diffusion.type 'edm'), not of "
            "diffusion.type 'flow'",
        ),
        (
            tiny_image_config(diffusion={"precond": "vpsde"}),
            "diffusion.precond: 'vpsde' is not one of 'edm', 'vp', 've'",
        ),
    ]
    for mapping, message in refusals:
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from_dict(mapping)
    # DiffiT's own image and latent models may use VP / VE with EDM training (the network just sees other c_noise).
    assert config_from_dict(tiny_image_config(diffusion={"precond": "ve"})).diffusion.precond == "ve"
    # The DiffiT U-Net takes EDM's augment labels (the paper's image models trained with EDM's augmentation).
    assert config_from_dict(tiny_image_config(data={"augment": 0.12})).data.augment == 0.12


def test_an_augment_dim_that_contradicts_data_augment_is_refused():
    from pipeline.train.checks import configured_model_kwargs

    config = config_from_dict(songunet_config(data={"augment": 0.12}))
    config.model.kwargs["augment_dim"] = 0
    message = "model.kwargs.augment_dim 0 contradicts data.augment 0.12 (which gives augment_dim 9): leave"
    with pytest.raises(ConfigError, match=re.escape(message)):
        configured_model_kwargs(config)
    config.model.kwargs["augment_dim"] = 9  # agreeing is fine
    assert configured_model_kwargs(config)["augment_dim"] == 9
