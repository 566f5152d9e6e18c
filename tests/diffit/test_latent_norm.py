"""`diffit.latent_norm.LatentNorm`: the closed forms on hand values, the round trip, and the refusals of `from_dict`
(every number an export or a pipeline folder declares is checked before it is used)."""

from __future__ import annotations

import math

import pytest
import torch

from diffit.config_check import InvalidModelFileError, check_model_config
from diffit.latent_norm import MAX_LATENT_CHANNELS, LatentNorm, export_latent_norm
from diffit.pipeline_check import check_pipeline_index


def test_scalar_with_shift_on_hand_values():
    norm = LatentNorm.scalar(0.5, 1.0)
    z = torch.tensor([3.0, 1.0, -1.0]).view(1, 3, 1, 1)
    assert norm.normalize(z).flatten().tolist() == [1.0, 0.0, -1.0]  # 0.5 * (z - 1)
    assert norm.denormalize(torch.tensor([1.0, 0.0, -1.0]).view(1, 3, 1, 1)).flatten().tolist() == [3.0, 1.0, -1.0]
    # diffusers' SD3 convention, bit for bit: (z - shift) * scale, and x / scale + shift to decode.
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    flux = LatentNorm.scalar(0.3611, 0.1159)
    assert torch.equal(flux.normalize(x), (x - 0.1159) * 0.3611)
    assert torch.equal(flux.denormalize(x), x / 0.3611 + 0.1159)
    # The SD VAE (no shift; its config's shift_factor is None): exactly the old `x / scaling_factor`.
    sd = LatentNorm.scalar(0.18215, None)
    assert sd.shift_factor == 0.0 and torch.equal(sd.denormalize(x), x / 0.18215)


def test_channel_on_hand_values_and_round_trip():
    norm = LatentNorm.channel([1.0, -2.0], [2.0, 0.5])
    z = torch.tensor([[[[5.0]], [[-1.0]]]])  # [1, 2, 1, 1]
    assert norm.normalize(z).flatten().tolist() == [2.0, 2.0]  # (5 - 1) / 2, (-1 + 2) / 0.5
    assert norm.denormalize(torch.tensor([[[[2.0]], [[2.0]]]])).flatten().tolist() == [5.0, -1.0]
    unbatched = torch.tensor([[[5.0, 3.0]], [[-1.0, -2.0]]])  # [2, 1, 2]: [C, h, w] works too
    assert norm.normalize(unbatched).tolist() == [[[2.0, 1.0]], [[2.0, 0.0]]]
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(norm.normalize(norm.denormalize(x)), x, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="statistics for 2 channels, the latents have 4"):
        norm.normalize(torch.zeros(1, 4, 2, 2))


@pytest.mark.parametrize(
    "norm", [LatentNorm.scalar(0.18215), LatentNorm.scalar(0.3611, -0.1159), LatentNorm.channel([0.1] * 16, [2.0] * 16)]
)
def test_to_dict_from_dict_round_trip(norm):
    assert LatentNorm.from_dict(norm.to_dict()) == norm
    assert LatentNorm.from_dict(norm.to_dict(), channels=norm.channels or 4) == norm


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"kind": "scalar", "scaling_factor": math.nan, "shift_factor": 0.0}, "scaling_factor must be a finite"),
        ({"kind": "scalar", "scaling_factor": math.inf, "shift_factor": 0.0}, "scaling_factor must be a finite"),
        ({"kind": "scalar", "scaling_factor": 0.0, "shift_factor": 0.0}, "scaling_factor must be positive"),
        ({"kind": "scalar", "scaling_factor": 0.5, "shift_factor": -math.inf}, "shift_factor must be a finite"),
        ({"kind": "scalar", "scaling_factor": True, "shift_factor": 0.0}, "scaling_factor must be a number"),
        ({"kind": "scalar", "scaling_factor": 0.5}, "lacks \\['shift_factor'\\]"),
        ({"kind": "scalar", "scaling_factor": 0.5, "shift_factor": 0, "mean": [1]}, "unknown keys \\['mean'\\]"),
        ({"kind": "channel", "mean": [0.0, math.nan], "std": [1.0, 1.0]}, "mean\\[1\\] must be a finite"),
        ({"kind": "channel", "mean": [0.0, 0.0], "std": [1.0, -1.0]}, "std\\[1\\] must be positive"),
        ({"kind": "channel", "mean": [0.0, 0.0], "std": [1.0, 0.0]}, "std\\[1\\] must be positive"),
        ({"kind": "channel", "mean": [0.0, 0.0], "std": [1.0, math.inf]}, "std\\[1\\] must be a finite"),
        ({"kind": "channel", "mean": [0.0, 0.0], "std": [1.0]}, "mean has 2 channels, std 1"),
        ({"kind": "channel", "mean": [], "std": []}, "must be a list of 1 to"),
        ({"kind": "channel", "mean": "0.1", "std": [1.0]}, "must be a list of 1 to"),
        (
            {"kind": "channel", "mean": [0.0] * (MAX_LATENT_CHANNELS + 1), "std": [1.0] * (MAX_LATENT_CHANNELS + 1)},
            f"must be a list of 1 to {MAX_LATENT_CHANNELS} numbers, got {MAX_LATENT_CHANNELS + 1} entries",
        ),
        ({"kind": "edm2"}, "kind must be one of"),
        ([1, 2], "must be an object"),
    ],
)
def test_from_dict_refuses_bad_entries(entry, problem):
    with pytest.raises(ValueError, match=problem):
        LatentNorm.from_dict(entry)


def test_from_dict_checks_the_channel_count():
    entry = LatentNorm.channel([0.0] * 4, [1.0] * 4).to_dict()
    with pytest.raises(ValueError, match="statistics for 4 channels, the latents have 16"):
        LatentNorm.from_dict(entry, channels=16)
    assert LatentNorm.from_dict(LatentNorm.scalar(0.5).to_dict(), channels=16).kind == "scalar"


def test_an_export_without_latent_norm_means_scalar_without_shift():
    old = {"model": {"name": "DiffiT-Tiny/2"}, "vae": {"id": "x", "scaling_factor": 0.18215, "shift_factor": 0.5}}
    assert export_latent_norm(old) == LatentNorm.scalar(0.18215, 0.0)  # written before the entry: no shift
    recorded = {**old, "latent_norm": LatentNorm.scalar(0.3611, 0.1159).to_dict()}
    assert export_latent_norm(recorded) == LatentNorm.scalar(0.3611, 0.1159)
    assert export_latent_norm({"model": {"name": "DiffiT-UNet-Tiny"}}) is None  # image space
    with pytest.raises(ValueError, match="'vae' lacks 'scaling_factor'"):
        export_latent_norm({"vae": {"id": "x"}})
    with pytest.raises(ValueError, match="vae.scaling_factor must be positive"):
        export_latent_norm({"vae": {"scaling_factor": -1}})


def test_exports_and_pipeline_folders_with_a_bad_latent_norm_are_refused(tmp_path):
    model = {"name": "DiffiT-Tiny/2", "kwargs": {}}
    bad = {"kind": "channel", "mean": [0.0] * 4, "std": [1.0, 1.0, 1.0, math.nan]}
    with pytest.raises(InvalidModelFileError, match="config.json: latent_norm.std\\[3\\] must be a finite"):
        check_model_config({"model": model, "latent_norm": bad}, tmp_path / "config.json")
    with pytest.raises(InvalidModelFileError, match="latent_norm must be an object"):
        check_model_config({"model": model, "latent_norm": [1]}, tmp_path / "config.json")
    good = {"model": model, "latent_norm": LatentNorm.channel([0.0] * 4, [1.0] * 4).to_dict()}
    check_model_config(good, tmp_path / "config.json")
    with pytest.raises(InvalidModelFileError, match="model_index.json: latent_norm.std\\[3\\] must be a finite"):
        check_pipeline_index({"latent_norm": bad}, tmp_path / "model_index.json")
    assert check_pipeline_index({"latent_norm": LatentNorm.scalar(0.5, 0.1).to_dict(), "scaling_factor": 0.5})


def test_channel_bound_is_the_vae_config_bound():
    from diffit.pipeline_check import VAE_CONFIG_BOUNDS
    from pipeline.core.latent_stats import MAX_LATENT_CHANNELS as MANIFEST_BOUND

    assert MAX_LATENT_CHANNELS == VAE_CONFIG_BOUNDS["latent_channels"] == MANIFEST_BOUND
