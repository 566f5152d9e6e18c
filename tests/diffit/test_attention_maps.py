"""`diffit.attention_maps`: the captured attention is the one the forward computed (rows sum to 1, the weighted sum
of V through the layer's projection is the layer's own output), it follows TMSA's time dependence, and the query's
window is the one `window_partition` puts it in."""

from __future__ import annotations

import math

import pytest
import torch

import diffit
from diffit.attention_maps import (
    AttentionCaptureError,
    attention_maps,
    attention_output,
    attention_probabilities,
    attention_sites,
    check_time,
    noised_input,
    query_grid_size,
)
from diffit.conditionings import LATENT_TIME_CONDITIONINGS
from diffit.layers import TIME_CONDITIONINGS, set_attention_backend, window_partition

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def latent_model(time_conditioning: str = "tmsa", **overrides) -> torch.nn.Module:
    """DiffiT-Tiny/2 on 16x16 latents: an 8x8 token grid, 2 blocks, 2 heads, 10 classes."""
    torch.manual_seed(0)
    return diffit.create_model("DiffiT-Tiny/2", input_size=16, time_conditioning=time_conditioning, **overrides).eval()


def image_model(time_conditioning: str = "tmsa", window_size: int = 4) -> torch.nn.Module:
    """DiffiT-UNet-Tiny: 16 px, stages at 16 and 8 px, 3 attention blocks, 2 heads."""
    torch.manual_seed(0)
    return diffit.create_model("DiffiT-UNet-Tiny", time_conditioning=time_conditioning, window_size=window_size).eval()


def make_every_term_count(model: torch.nn.Module, seed: int = 1, scale: float = 0.5, time_scale: float = 0.1) -> None:
    """Random values in the parts an untrained model starts at zero or near it (the relative position bias, the
    time projections, adaLN modulation: std `scale`; the time embedding's MLP: std `time_scale`), so a
    recomputation that left one out would not match and the time token is large enough to act."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("relative_position_bias", "qkv_time", "bias_time", "kv_time", "adaLN")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
            elif name.startswith("time_embed."):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * time_scale)


def inputs(model: torch.nn.Module, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, model.in_channels, model.input_size, model.input_size, generator=generator)
    labels = torch.tensor([3]) if model.num_classes else None
    return x, labels


def record_layers(model: torch.nn.Module):
    """Forward hooks recording (inputs, output) of every TMSA layer; returns (records, handles)."""
    records = {}
    handles = []
    for site in attention_sites(model):

        def hook(module, args, output, name=site.name):
            records[name] = (args, output)

        handles.append(site.module.register_forward_hook(hook))
    return records, handles


@pytest.mark.parametrize("family", ["latent", "image"])
def test_maps_have_the_asked_shape_and_each_row_sums_to_one(family):
    for variant in LATENT_TIME_CONDITIONINGS if family == "latent" else TIME_CONDITIONINGS:
        model = latent_model(variant) if family == "latent" else image_model(variant)
        make_every_term_count(model)
        x, labels = inputs(model)
        sites = attention_sites(model)
        blocks = list(range(len(sites)))
        maps = attention_maps(model, x, torch.tensor([500.0]), labels, blocks, [1, 0])
        assert maps.blocks == tuple(blocks) and maps.heads == (1, 0)
        for index, block_maps in enumerate(maps.maps):
            window = sites[index].window
            assert block_maps.shape == (1, 2, window, window), (variant, index)
            total = block_maps.sum(dim=(-2, -1))
            if maps.time_key[index] is not None:  # "decoupled": the separate time token takes the rest
                assert variant == "decoupled"
                total = total + maps.time_key[index]
            assert (block_maps >= 0).all()
            torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
        stacked = maps.stacked()
        assert stacked.shape == (1, len(blocks), 2, max(s.window for s in sites), max(s.window for s in sites))


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("family", ["latent", "image"])
def test_the_capture_reproduces_each_layers_own_output(family, backend):
    """softmax(Q K^T / sqrt(d) + B) recomputed from the layer's weights, times V, through its projection, equals what
    the layer itself returned: the capture cannot drift from the forward (every variant, both backends)."""
    for variant in LATENT_TIME_CONDITIONINGS if family == "latent" else TIME_CONDITIONINGS:
        model = latent_model(variant) if family == "latent" else image_model(variant)
        make_every_term_count(model)
        set_attention_backend(model, backend)
        x, labels = inputs(model)
        records, handles = record_layers(model)
        with torch.no_grad():
            model(x, torch.tensor([250.0]), labels)
        for handle in handles:
            handle.remove()
        assert len(records) == len(attention_sites(model))
        for name, ((tokens, time_token), output) in records.items():
            with torch.no_grad():
                probabilities, v = attention_probabilities(model.get_submodule(name), tokens, time_token)
                recomputed = attention_output(model.get_submodule(name), probabilities, v)
            torch.testing.assert_close(recomputed, output, atol=2e-5, rtol=1e-5, msg=f"{variant} {name}")
            if model.get_submodule(name).relative_position_bias is not None:  # a control: the bias matters here
                layer = model.get_submodule(name)
                saved = layer.relative_position_bias.detach().clone()
                with torch.no_grad():
                    layer.relative_position_bias.zero_()
                    without_bias = attention_output(layer, *attention_probabilities(layer, tokens, time_token))
                    layer.relative_position_bias.copy_(saved)
                assert (without_bias - output).abs().max() > 1e-3, f"{variant} {name}"


def test_a_capture_that_drifts_from_the_forward_is_refused(monkeypatch):
    """attention_maps checks every capture against the layer's output: a recomputation that forgets the bias (as a
    changed TMSA.forward would leave it behind) raises instead of drawing wrong maps."""
    import diffit.attention_maps as module

    model = latent_model()
    make_every_term_count(model)
    x, labels = inputs(model)
    original = module.attention_probabilities

    def forgets_the_bias(layer, tokens, time_token):
        saved = layer.relative_position_bias
        layer.relative_position_bias = None
        try:
            return original(layer, tokens, time_token)
        finally:
            layer.relative_position_bias = saved

    monkeypatch.setattr(module, "attention_probabilities", forgets_the_bias)
    with pytest.raises(AttentionCaptureError, match="blocks.0.attn"):
        attention_maps(model, x, torch.tensor([10.0]), labels, [0], [0])


def maps_over_time(model, blocks, times, x=None, labels=None):
    """The maps of `blocks` (all heads) for the same network input `x` at each noise label of `times`."""
    if x is None:
        x, labels = inputs(model)
    heads = list(range(attention_sites(model)[0].module.num_heads))
    return [attention_maps(model, x, torch.tensor([float(t)]), labels, blocks, heads).stacked() for t in times]


def test_tmsa_maps_change_with_time_and_a_time_free_attention_does_not():
    """The same x_t at t = 999, 500, 10: TMSA's q/k carry the time token, so its maps move; "adaln"'s attention
    has no time term (q/k from the tokens alone), and with the adaLN-Zero modulation the model starts with (zero)
    its input does not depend on t either: identical maps in every block. "mlp" feeds time to the MLP only, so its
    first block (whose input no time-dependent layer has touched) attends identically at every t."""
    times = (999, 500, 10)
    tmsa_model = latent_model("tmsa")
    make_every_term_count(tmsa_model, scale=0.1)  # a time token that acts, maps not saturated
    tmsa = maps_over_time(tmsa_model, [0, 1], times)
    for other in tmsa[1:]:
        assert (tmsa[0] - other).abs().max() > 0.1 * tmsa[0].max()

    adaln = maps_over_time(latent_model("adaln"), [0, 1], times)
    for other in adaln[1:]:
        torch.testing.assert_close(other, adaln[0], atol=1e-7, rtol=0)

    mlp_model = latent_model("mlp")
    make_every_term_count(mlp_model)
    mlp = maps_over_time(mlp_model, [0, 1], times)
    torch.testing.assert_close(mlp[2][:, 0], mlp[0][:, 0], atol=1e-7, rtol=0)  # block 0: time-free
    assert (mlp[2][:, 1] - mlp[0][:, 1]).abs().max() > 1e-5  # block 1: its input went through a timed MLP

    # What the "adaln" statement rests on: once the modulation is not zero (a trained DiT block), the attention's
    # input is shifted and scaled by the time token and its maps move with t, though q/k hold no time term.
    modulated = latent_model("adaln")
    make_every_term_count(modulated)
    moved = maps_over_time(modulated, [0], times)
    assert (moved[0] - moved[2]).abs().max() > 1e-4


def test_the_map_is_the_window_that_holds_the_query():
    """For the windowed U-Net the map is the query's window at the block's resolution: checked against the
    probabilities of the whole layer, with the window found by `window_partition` of a grid of token indices."""
    model = image_model(window_size=4)
    make_every_term_count(model)
    x, _ = inputs(model)
    sites = attention_sites(model)
    assert [(s.feature_size, s.window, s.stride) for s in sites] == [(16, 4, 1), (8, 4, 2), (16, 4, 1)]
    query = (13, 6)
    records, handles = record_layers(model)
    maps = attention_maps(model, x, torch.tensor([0.1]), None, [0, 1, 2], [0, 1], query=query)
    for handle in handles:
        handle.remove()
    for index, site in enumerate(sites):
        (tokens, time_token), _ = records[site.name]
        probabilities, _ = attention_probabilities(site.module, tokens, time_token)
        size = site.feature_size
        grid = torch.arange(size * size, dtype=torch.float32).reshape(1, size, size, 1)
        windows = window_partition(grid, site.window)[..., 0]  # [nW, ws^2] token index at each window position
        target = (query[0] // site.stride) * size + query[1] // site.stride
        window, position = (windows == target).nonzero()[0].tolist()
        expected = probabilities[window, :, position].reshape(2, site.window, site.window)
        torch.testing.assert_close(maps.maps[index][0], expected, atol=1e-6, rtol=0)
        # the recorded geometry: the query inside its map, the map's corner in the feature map
        row, col = query[0] // site.stride, query[1] // site.stride
        assert maps.query[index] == (row % 4, col % 4)
        assert maps.origin[index] == (row - row % 4, col - col % 4)
        members = windows[window].long()
        assert int(members.min()) == maps.origin[index][0] * size + maps.origin[index][1]


def test_the_latent_map_is_the_whole_grid_and_the_default_query_its_centre():
    model = latent_model()
    x, labels = inputs(model)
    assert query_grid_size(model) == 8
    maps = attention_maps(model, x, torch.tensor([999.0]), labels, [1], [0])
    assert maps.maps[0].shape == (1, 1, 8, 8) and maps.query == [(4, 4)] and maps.origin == [(0, 0)]


def test_blocks_heads_and_queries_that_do_not_exist_are_refused():
    model = latent_model()
    x, labels = inputs(model)
    t = torch.tensor([1.0])
    with pytest.raises(ValueError, match="block 2 does not exist: the model has 2 attention blocks"):
        attention_maps(model, x, t, labels, [0, 2], [0])
    with pytest.raises(ValueError, match="head 2 does not exist"):
        attention_maps(model, x, t, labels, [0], [2])
    with pytest.raises(ValueError, match="outside the 8x8 token grid"):
        attention_maps(model, x, t, labels, [0], [0], query=(8, 0))


def test_noised_inputs_follow_each_kinds_time_variable():
    """ADM: sqrt(1 - abar_t) eps at timestep t; EDM: what the export's preconditioning (EDM's, VP, VE; Karras et al.
    Table 1) hands its network for x = sigma eps; flow: t eps at time t."""
    from diffit.diffusion import create_diffusion

    noise = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))
    chain = create_diffusion(None, "cosine", diffusion_steps=100)
    x, label = noised_input("adm", noise, 40, {"noise_schedule": "cosine", "diffusion_steps": 100})
    torch.testing.assert_close(x, noise * math.sqrt(1 - float(chain.alphas_cumprod[40])))
    assert float(label) == 40.0

    x, label = noised_input("edm", noise, 2.5, {"sigma_data": 0.25})  # EDM: c_in = 1 / sqrt(sigma^2 + sigma_d^2)
    torch.testing.assert_close(x, noise * 2.5 / math.sqrt(2.5**2 + 0.25**2))
    torch.testing.assert_close(label, torch.tensor(math.log(2.5) / 4))
    x, label = noised_input("edm", noise, 2.5, {"precond": "vp"})  # VP: c_in = 1 / sqrt(sigma^2 + 1), (M - 1) t
    torch.testing.assert_close(x, noise * 2.5 / math.sqrt(2.5**2 + 1))
    t = (math.sqrt(0.1**2 + 2 * 19.9 * math.log(1 + 2.5**2)) - 0.1) / 19.9
    torch.testing.assert_close(label, torch.tensor(999 * t))
    x, label = noised_input("edm", noise, 2.5, {"precond": "ve"})  # VE: c_in = 1, ln(sigma / 2)
    torch.testing.assert_close(x, noise * 2.5)
    torch.testing.assert_close(label, torch.tensor(math.log(1.25)))

    x, label = noised_input("flow", noise, 0.25)
    torch.testing.assert_close(x, 0.25 * noise)
    assert float(label) == 0.25

    assert check_time("adm", 999, {"diffusion_steps": 1000}) is None
    assert "integers 0..999" in check_time("adm", 1000, {"diffusion_steps": 1000})
    assert "integers" in check_time("adm", 10.5, {})
    assert check_time("edm", 0.0) and check_time("edm", 80.0) is None
    assert check_time("flow", 1.5) and check_time("flow", 0.0) is None
    assert check_time("flow", float("nan")) == "not a finite number"
    with pytest.raises(ValueError, match="time 1.5"):
        noised_input("flow", noise, 1.5)
