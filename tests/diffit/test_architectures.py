"""Table 4's encoder / decoder designs (configs A-E) as flags of the one DiffiT U-Net (`diffit.unet`,
`diffit.unet_layout`).

What is proven here: A-E keep the shape contract and train every parameter; each one's exact parameter count and
buffer bytes equal the arithmetic of `diffit.model_size` (what config_check bounds); the defaults are today's model
(state-dict keys and shapes pinned by hash, outputs under one seed pinned from the code before these flags existed);
"added-per-stage" attention never sees the time token, which enters only through each stage's FiLM; SETR-MLA's
top-down aggregation against bilinear interpolation written out by hand; refusals of bad combinations by the
constructor and by config_check; REPA's taps and the attention maps on the new layouts.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffit
from diffit.config_check import MAX_ATTENTION_TOKENS, InvalidModelFileError, check_model_config, implied_size
from diffit.layers import DiffiTTransformerBlock
from diffit.models import count_parameters, create_model
from diffit.unet import SetrMlaDecoder, StageTimeFiLM

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = "DiffiT-UNet-Tiny"  # 16 px, channels (32, 64), one ResBlock per stage, window 4, 2 heads
# Table 4 at tiny width (the study files: manifests/studies/architecture_*.yaml).
ROWS = {
    "A": {
        "encoder": "vit",
        "decoder": "setr-mla",
        "time_conditioning": "added-per-stage",
        "channels": [32],
        "blocks_per_stage": [4],
        "patch_size": 2,
        "mla_channels": 16,
    },
    "B": {"decoder": "setr-mla", "time_conditioning": "added-per-stage", "mla_channels": 16},
    "C": {"time_conditioning": "added-per-stage"},
    "D": {"decoder_time_conditioning": "added-per-stage"},
    "E": {},
}


def build(row: str, seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(BASE, **{**ROWS[row], **extra})


def wake(model: nn.Module, seed: int = 1, std: float = 0.1) -> nn.Module:
    """Random values where the model starts at zero (output conv, stage FiLMs), so every path carries signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "time_film" in name or name.startswith("head.") or name.startswith("decoder.head"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def inputs(model: nn.Module, seed: int = 2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, model.img_resolution, model.img_resolution, generator=generator), torch.tensor([-0.5, 0.7])


@pytest.mark.parametrize("row", sorted(ROWS))
def test_each_row_keeps_the_shape_contract_and_trains_every_parameter(row):
    model = wake(build(row))
    x, noise_labels = inputs(model)
    out = model(x, noise_labels)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []
    with torch.no_grad():  # the time reaches the output in every row (TMSA or the stage FiLMs)
        assert (model(x, noise_labels) - model(x, noise_labels + 1.0)).abs().max() > 1e-4


EXTRA_LAYOUTS = [
    ("A", {"time_dim": 40, "time_embedding": "fourier", "mla_channels": None}),
    ("A", {"time_conditioning": "tmsa", "blocks_per_stage": [8], "patch_size": 4, "num_classes": 3}),
    ("B", {"time_conditioning": "adaln", "mla_channels": None, "augment_dim": 9}),
    ("D", {"time_conditioning": "added-per-stage", "decoder_time_conditioning": "bias"}),
    ("C", {"channels": [16, 32, 32], "blocks_per_stage": [0, 2, 1]}),
]


@pytest.mark.parametrize(
    ("row", "extra"), [(r, {}) for r in sorted(ROWS)] + EXTRA_LAYOUTS, ids=lambda v: v if isinstance(v, str) else ""
)
def test_parameters_and_buffers_equal_the_implied_size(row, extra):
    kwargs = {**ROWS[row], **extra}
    with torch.device("meta"):
        model = create_model(BASE, **kwargs)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    assert implied_size(BASE, kwargs) == (count_parameters(model), buffer_bytes)


def test_rows_differ_by_their_one_change_in_parameters():
    # C -> D and D -> E change only where the time enters: each stage's FiLM Linear(t, 2C) against the blocks'
    # TMSA time projections Linear(t, 3C). Tiny: t = 128, stages of 32 and 64 maps; encoder 1 + 1 blocks,
    # decoder 1 block at 32.
    counts = {row: count_parameters(build(row)) for row in "CDE"}
    film = {width: 128 * 2 * width + 2 * width for width in (32, 64)}
    tmsa = {width: 128 * 3 * width + 3 * width for width in (32, 64)}
    assert counts["E"] - counts["D"] == tmsa[32] - film[32]  # the decoder's one stage
    assert counts["D"] - counts["C"] == tmsa[32] + tmsa[64] - film[32] - film[64]  # the encoder's two stages


# ---------------------------------------------------------------------------------------------------------------
# The defaults are today's model
# ---------------------------------------------------------------------------------------------------------------

# sha256 of "key:shape" lines of the state dict, and outputs, from the code before Table 4's flags existed.
STATE_HASHES = {
    "DiffiT-UNet-Tiny": "8fdb00cbc905d85b6ce080ad597a0a6871fe13f3f5c26a4a46ca3d68a7e0f72d",
    "DiffiT-CIFAR10": "906800a67dfcae7b974e71bd51c303a9236f0576f54125371bbc571d86d4aaaf",
}


def state_hash(model: nn.Module) -> str:
    text = "\n".join(f"{key}:{tuple(value.shape)}" for key, value in model.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(STATE_HASHES))
def test_defaults_and_row_e_have_todays_state_dict(name):
    explicit_e = {"encoder": "multi-resolution", "decoder": "multi-resolution", "decoder_time_conditioning": "tmsa"}
    with torch.device("meta"):
        assert state_hash(create_model(name)) == STATE_HASHES[name]
        assert state_hash(create_model(name, **explicit_e)) == STATE_HASHES[name]


def test_defaults_give_todays_outputs_under_one_seed():
    torch.manual_seed(0)
    model = create_model(BASE).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        x = torch.randn(2, 3, 16, 16, generator=generator)
        out = model(x, torch.tensor([-0.5, 0.7]))
    assert out.double().sum().item() == pytest.approx(-247.55805756482005, rel=1e-5)
    assert out.abs().double().sum().item() == pytest.approx(618.1579902323865, rel=1e-5)
    expected = torch.tensor([0.33195069432258606, 0.025619246065616608, 0.3724707365036011, 0.60036700963974])
    torch.testing.assert_close(out[0, 0, 0, :4], expected, rtol=1e-4, atol=1e-5)


def test_a_default_export_does_not_gain_the_new_keys(tmp_path):
    diffit.save_pretrained(create_model(BASE), tmp_path / "m")
    kwargs = json.loads((tmp_path / "m" / "config.json").read_text())["model"]["kwargs"]
    assert not {"encoder", "decoder", "decoder_time_conditioning", "patch_size", "mla_channels"} & set(kwargs)


@pytest.mark.parametrize("row", ["A", "B", "D"])
def test_each_new_row_saves_checks_and_loads(tmp_path, row):
    model = wake(build(row)).eval()
    diffit.save_pretrained(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    check_model_config(config, tmp_path / "m" / "config.json")
    loaded, _ = diffit.load_pretrained(tmp_path / "m")
    x, noise_labels = inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(x, noise_labels), model(x, noise_labels))


# ---------------------------------------------------------------------------------------------------------------
# "added-per-stage": the time enters at each stage's start, never the attention
# ---------------------------------------------------------------------------------------------------------------


def test_added_per_stage_block_is_tmsa_without_its_time_term():
    torch.manual_seed(0)
    tmsa = DiffiTTransformerBlock(32, 4, 3, 24, mlp_ratio=2.0, time_conditioning="tmsa")
    free = DiffiTTransformerBlock(32, 4, 3, 24, mlp_ratio=2.0, time_conditioning="added-per-stage")
    with torch.no_grad():
        tmsa.attn.relative_position_bias.normal_()
    missing = free.load_state_dict(tmsa.state_dict(), strict=False)
    assert missing.missing_keys == [] and missing.unexpected_keys == ["attn.qkv_time.weight", "attn.qkv_time.bias"]
    assert not free.attn.time_dependent and free.attn.relative_position_bias is not None
    assert [n for n, m in free.named_modules() if isinstance(m, nn.Linear) and m.in_features == 24] == []
    x, t1, t2 = torch.randn(2, 9, 32), torch.randn(2, 24), torch.randn(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(free(x, t1), free(x, t2), rtol=0, atol=0)
        nn.init.zeros_(tmsa.attn.qkv_time.weight)
        nn.init.zeros_(tmsa.attn.qkv_time.bias)
        torch.testing.assert_close(free(x, t1), tmsa(x, t1), rtol=1e-6, atol=1e-6)


def test_stage_film_is_its_formula_and_starts_as_the_identity():
    torch.manual_seed(0)
    film = StageTimeFiLM(6, 4)
    h, t = torch.randn(2, 4, 3, 3), torch.randn(2, 6)
    with torch.no_grad():
        scale, shift = (t @ film.linear.weight.T + film.linear.bias).split(4, dim=1)
        expected = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        torch.testing.assert_close(film(h, t), expected)
    model = build("C")
    films = [m for m in model.modules() if isinstance(m, StageTimeFiLM)]
    assert len(films) == 3  # two encoder stages and the decoder's one
    assert all(not f.linear.weight.any() and not f.linear.bias.any() for f in films)


@pytest.mark.parametrize("row", ["A", "B", "C"])
def test_with_the_films_zeroed_added_per_stage_output_ignores_the_noise_label(row):
    model = wake(build(row)).eval()
    x, noise_labels = inputs(model)
    with torch.no_grad():
        assert (model(x, noise_labels) - model(x, noise_labels + 3.0)).abs().max() > 1e-4  # through the FiLMs
        for module in model.modules():
            if isinstance(module, StageTimeFiLM):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)
        torch.testing.assert_close(model(x, noise_labels), model(x, noise_labels + 3.0), rtol=0, atol=0)
        # the control: TMSA's attention reads the noise label (row E, same wake-up)
        tmsa = wake(build("E")).eval()
        assert (tmsa(x, noise_labels) - tmsa(x, noise_labels + 3.0)).abs().max() > 1e-4


def test_row_d_has_tmsa_in_the_encoder_and_films_in_the_decoder_only():
    model = build("D")
    assert [stage.time_film is None for stage in model.encoder] == [True, True]
    assert [stage.time_film is not None for stage in model.decoder] == [True]
    assert all(b.transformer.attn.time_dependent for s in model.encoder for b in s.blocks)
    assert not any(b.transformer.attn.time_dependent for s in model.decoder for b in s.blocks)


# ---------------------------------------------------------------------------------------------------------------
# SETR-MLA and the ViT encoder
# ---------------------------------------------------------------------------------------------------------------


def bilinear_matrix(source: int, target: int) -> torch.Tensor:
    """[target, source] weights of bilinear resizing with half-pixel centres (align_corners=False), by hand: output
    i samples the source at (i + 0.5) * source / target - 0.5, clamped to the edge pixels."""
    weights = torch.zeros(target, source)
    for i in range(target):
        position = min(max((i + 0.5) * source / target - 0.5, 0.0), source - 1)
        low = int(position)
        high = min(low + 1, source - 1)
        weights[i, low] += 1 - (position - low)
        weights[i, high] += position - low
    return weights


def upsample_by_hand(x: torch.Tensor, side: int) -> torch.Tensor:
    matrix = bilinear_matrix(x.shape[-1], side)
    return matrix @ x @ matrix.T


def test_setr_mla_aggregates_top_down_as_written_out():
    # Three levels at 8, 4, 2 px with M = 2; identity 1x1 reductions, so r_i = f_i and the aggregation is
    # a_2 = f_2, a_1 = f_1 + up(f_2), a_0 = f_0 + up(a_1).
    torch.manual_seed(0)
    decoder = SetrMlaDecoder([2, 2, 2], 2, 3, img_resolution=8, num_groups=32)
    with torch.no_grad():
        for conv in decoder.reduce:
            conv.weight.copy_(torch.eye(2)[:, :, None, None])
            conv.bias.zero_()
    levels = [torch.randn(1, 2, side, side) for side in (8, 4, 2)]
    a2 = levels[2]
    a1 = levels[1] + upsample_by_hand(a2, 4)
    a0 = levels[0] + upsample_by_hand(a1, 8)
    with torch.no_grad():
        aggregated = decoder.aggregate(levels)
        for got, expected in zip(aggregated, [a0, a1, a2]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        # the rest: each stream (M -> M/2), upsampled to the image, concatenated, the head conv
        streams = [upsample_by_hand(stream(a), 8) for stream, a in zip(decoder.streams, [a0, a1, a2])]
        expected = F.conv2d(torch.cat(streams, dim=1), decoder.head.weight, decoder.head.bias, padding=1)
        torch.testing.assert_close(decoder(levels), expected, rtol=1e-5, atol=1e-6)
    assert [s.conv1.out_channels for s in decoder.streams] == [2] * 3
    assert [s.conv2.out_channels for s in decoder.streams] == [1] * 3


def test_setr_mla_output_conv_starts_at_zero_and_b_has_no_decoder_blocks():
    model = build("B")
    assert not model.decoder.head.weight.any() and model.head is None
    assert [site.name for site in model.block_sites()] == ["encoder.0.blocks.0", "encoder.1.blocks.0"]
    out = model(*inputs(model))
    assert not out.any()


def test_vit_encoder_is_isotropic_with_global_attention_and_four_levels():
    model = build("A")
    assert model.patch_embed.kernel_size == (2, 2) and model.patch_embed.stride == (2, 2)
    assert not hasattr(model, "input_conv") and "pos_embed" not in model.state_dict()  # fixed, derived
    from diffit.layers import get_2d_sincos_pos_embed

    torch.testing.assert_close(model.pos_embed[0].flatten(1).T, get_2d_sincos_pos_embed(32, 8))
    assert len(model.encoder) == 4 and all(len(stage.blocks) == 1 for stage in model.encoder)
    assert all(stage.downsample is None and stage.time_film is not None for stage in model.encoder)
    for site in model.block_sites():
        assert (site.width, site.side, site.window, site.stride) == (32, 8, 8, 2)
        assert site.block.transformer.attn.window_size == 8  # one window: the whole 8x8 token grid
    levels = model.encode(*inputs(model)[:1], model.time_token(torch.tensor([0.1, 0.2]), None))
    assert [tuple(level.shape) for level in levels] == [(2, 32, 8, 8)] * 4


# ---------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------


def test_the_constructors_refuse_what_does_not_fit():
    with pytest.raises(ValueError, match="encoder 'vit' is isotropic.*needs decoder 'setr-mla'"):
        create_model(BASE, encoder="vit", channels=[32], blocks_per_stage=[4])
    with pytest.raises(ValueError, match="positive multiple of 4"):
        create_model(BASE, **{**ROWS["A"], "blocks_per_stage": [6]})
    with pytest.raises(ValueError, match="latent DiffiT has no stages"):
        create_model("DiffiT-Tiny/2", time_conditioning="added-per-stage")
    with pytest.raises(ValueError, match="setr-mla' has none"):
        create_model(BASE, decoder="setr-mla", decoder_time_conditioning="tmsa")
    # What the file schema refuses, the constructor refuses too (a trained model must load back from its export).
    with pytest.raises(ValueError, match="patch_size must be >= 1, got 0"):
        create_model(BASE, patch_size=0)
    with pytest.raises(ValueError, match="mla_channels must be >= 2"):
        create_model(BASE, decoder="setr-mla", mla_channels=0)
    with pytest.raises(ValueError, match="width 6 must be a multiple of 4"):
        create_model(BASE, **{**ROWS["A"], "channels": [6], "num_heads": 2})


def image_config(**kwargs) -> dict:
    return {"model": {"name": BASE, "kwargs": kwargs}}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (image_config(encoder="vit", channels=[32], blocks_per_stage=[4]), "needs decoder 'setr-mla'"),
        (image_config(**{**ROWS["A"], "blocks_per_stage": [6]}), r"blocks_per_stage \[6\] must be a positive multiple"),
        (image_config(**{**ROWS["A"], "patch_size": 3}), "img_resolution 16 is not divisible by patch_size 3"),
        (image_config(**{**ROWS["A"], "channels": [32, 64], "blocks_per_stage": [4, 4]}), "channels must have one"),
        (
            image_config(**{**ROWS["A"], "img_resolution": 256}),
            f"16384 tokens in one attention window \\(at most {MAX_ATTENTION_TOKENS}\\)",
        ),
        (image_config(decoder="setr-mla", decoder_time_conditioning="tmsa"), "decoder 'setr-mla' has none"),
        (image_config(mla_channels=16), "decoder 'multi-resolution' has none"),
        (image_config(decoder="setr-mla", mla_channels=15), "M must be even"),
        (image_config(**{**ROWS["A"], "channels": [6], "num_heads": 2}), "width 6 must be a multiple of 4"),
        (image_config(encoder="swin"), r"model.kwargs.encoder must be one of \['multi-resolution', 'vit'\]"),
        (image_config(decoder_time_conditioning="film"), "model.kwargs.decoder_time_conditioning must be one of"),
        (
            {"model": {"name": "DiffiT-Tiny/2", "kwargs": {"time_conditioning": "added-per-stage"}}},
            "latent DiffiT has no stages",
        ),
    ],
)
def test_config_check_refuses_bad_combinations_with_a_clear_message(config, message):
    with pytest.raises(InvalidModelFileError, match=message):
        check_model_config(config, "config.json")


# ---------------------------------------------------------------------------------------------------------------
# Who reads the layout: REPA's taps, attention maps
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", sorted(ROWS))
def test_repa_taps_every_block_in_forward_order(row):
    from pipeline.train.repa import block_count, tap_points

    model = build(row)
    points = tap_points(model)
    assert len(points) == block_count(BASE, ROWS[row])
    expected = {
        "A": [(32, (8, 8))] * 4,
        "B": [(32, (16, 16)), (64, (8, 8))],
        "C": [(32, (16, 16)), (64, (8, 8)), (32, (16, 16))],
    }
    expected["D"] = expected["E"] = expected["C"]
    assert [(p.hidden_size, p.grid) for p in points] == expected[row]
    order = []
    handles = [p.block.register_forward_hook(lambda m, a, o, i=i: order.append(i)) for i, p in enumerate(points)]
    model(*inputs(model))
    for handle in handles:
        handle.remove()
    assert order == list(range(len(points)))


@pytest.mark.parametrize("row", ["A", "C"])
def test_attention_maps_draw_the_new_layouts(row):
    from diffit.attention_maps import attention_maps, attention_sites

    model = wake(build(row))
    sites = attention_sites(model)
    maps = attention_maps(model, inputs(model)[0][:1], torch.tensor([0.3]), None, range(len(sites)), [0, 1])
    for site, block_maps in zip(sites, maps.maps):
        assert block_maps.shape == (1, 2, site.window, site.window)
        torch.testing.assert_close(block_maps.sum(dim=(-2, -1)), torch.ones(1, 2), atol=1e-5, rtol=0)
    if row == "A":
        assert [s.window for s in sites] == [8] * 4 and maps.query == [(4, 4)] * 4  # pixel (8, 8) -> token (4, 4)
