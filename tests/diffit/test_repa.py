"""REPA's alignment math (`diffit.repa`): the projection loss on hand cases and against REPA's own formula, the
projector's layers and shapes for every transformer size, the encoder input and the matching of token grids."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffit import repa
from diffit.configs import MODEL_CONFIGS

DINOV2_WIDTHS = (384, 768, 1024, 1536)  # ViT-S/B/L/G-14: the targets' z_dim


def _unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def test_repa_loss_hand_cases():
    a = torch.tensor([[[1.0, 2.0, -3.0]]])
    assert repa.repa_loss(a, a).item() == pytest.approx(-1.0)  # identical
    assert repa.repa_loss(a, 5 * a).item() == pytest.approx(-1.0)  # the scale does not matter
    assert repa.repa_loss(a, -a).item() == pytest.approx(1.0)  # opposite
    orthogonal = torch.tensor([[[2.0, -1.0, 0.0]]])
    assert repa.repa_loss(a, orthogonal).item() == pytest.approx(0.0, abs=1e-7)
    # B = 2, N = 2: cosines 1, 0, -1, cos(60 deg) = 0.5; the loss is minus their mean, -(0.5) / 4.
    target = torch.tensor([[_unit(0), _unit(0)], [_unit(0), _unit(0)]])
    projected = torch.tensor([[_unit(0), _unit(math.pi / 2)], [_unit(math.pi), _unit(math.pi / 3)]])
    projected = projected * torch.tensor([[[3.0], [0.5]], [[2.0], [7.0]]])  # token norms are irrelevant
    assert repa.repa_loss(target, projected).item() == pytest.approx(-(1 + 0 - 1 + 0.5) / 4)


def test_repa_loss_equals_repa_formula():
    """REPA's `SILoss`: per sample, mean_flat of -(normalised dot), summed and divided by the batch size."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 8, generator=generator)
    z_tilde = torch.randn(3, 5, 8, generator=generator)
    expected = 0.0
    for z_j, z_tilde_j in zip(z, z_tilde):
        z_j, z_tilde_j = nn.functional.normalize(z_j, dim=-1), nn.functional.normalize(z_tilde_j, dim=-1)
        expected += (-(z_j * z_tilde_j).sum(dim=-1)).mean()
    expected /= z.shape[0]
    torch.testing.assert_close(repa.repa_loss(z, z_tilde), expected)


def test_repa_loss_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        repa.repa_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        repa.repa_loss(torch.zeros(2, 4), torch.zeros(2, 4))


def _token_models() -> dict[str, tuple[int, int]]:
    """(hidden size, tokens) of every registered transformer configuration."""
    models = {}
    for name, config in MODEL_CONFIGS.items():
        kwargs = config["kwargs"]
        if "hidden_size" in kwargs:
            side = kwargs["input_size"] // kwargs["patch_size"]
            models[name] = (kwargs["hidden_size"], side * side)
    return models


def test_projector_layers_and_shapes_for_every_model_size():
    models = _token_models()
    assert {"DiffiT-S/2", "DiffiT-B/2", "DiffiT-L/2", "DiffiT-XL/2"} <= set(models)
    projectors = {}
    for name, (hidden, tokens) in sorted(models.items()):
        for z_dim in DINOV2_WIDTHS:
            if (hidden, z_dim) not in projectors:
                projectors[hidden, z_dim] = repa.build_projector(hidden, repa.REPA_PROJECTOR_DIM, z_dim)
            projector = projectors[hidden, z_dim]
            with torch.no_grad():
                out = projector(torch.zeros(2, tokens, hidden))
            assert out.shape == (2, tokens, z_dim), name
    projector = projectors[1152, 768]  # DiT-XL/2 width, DINOv2-B target: REPA's main configuration
    assert [type(m) for m in projector] == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    shapes = [(m.in_features, m.out_features) for m in projector if isinstance(m, nn.Linear)]
    assert shapes == [(1152, 2048), (2048, 2048), (2048, 768)]
    with pytest.raises(ValueError, match="hidden_size"):
        repa.build_projector(0, 2048, 768)


def test_encoder_input_follows_repa_order():
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    x = images.float() / 255
    mean = torch.tensor(repa.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(repa.IMAGENET_STD).view(1, 3, 1, 1)
    expected = nn.functional.interpolate((x - mean) / std, size=(28, 28), mode="bicubic")
    torch.testing.assert_close(repa.encoder_input(images, 28), expected)
    assert repa.encoder_input_size(16) == 224 and repa.encoder_input_size(32) == 448
    torch.testing.assert_close(repa.encoder_input(images, 32), (x - mean) / std)


def test_match_token_grid_resizes_the_target_map():
    batch, dim = 2, 3
    target = torch.randn(batch, 16, dim)
    assert repa.match_token_grid(target, (4, 4)) is target  # same grid: untouched
    # Token (i, j) of a 4x4 grid holds the value i (rows): the [B, N, D] <-> [B, D, h, w] layout is row-major.
    rows = torch.arange(4.0).repeat_interleave(4).view(1, 16, 1).expand(batch, 16, dim)
    grown = repa.match_token_grid(rows, (8, 8))
    assert grown.shape == (batch, 64, dim)
    grid = grown[0, :, 0].view(8, 8)
    assert torch.all(grid[:, 1:] == grid[:, :1])  # constant along the row: no column mixing
    assert torch.all(grid[1:, 0] >= grid[:-1, 0]) and grid[0, 0] == 0 and grid[-1, 0] == 3
    # Shrinking averages (antialiased): a constant map stays constant, the mean is kept.
    constant = torch.full((batch, 64, dim), 2.5)
    torch.testing.assert_close(repa.match_token_grid(constant, (4, 4)), torch.full((batch, 16, dim), 2.5))
    shrunk = repa.match_token_grid(torch.randn(batch, 64, dim), (2, 2))
    assert shrunk.shape == (batch, 4, dim)
    # A non-square source grid is given explicitly.
    wide = repa.match_token_grid(torch.randn(batch, 8, dim), (4, 4), source_grid=(2, 4))
    assert wide.shape == (batch, 16, dim)
    with pytest.raises(ValueError, match="square"):
        repa.match_token_grid(torch.randn(batch, 8, dim), (4, 4))
