"""Frozen DINOv2 encoders from local files (`pipeline.core.encoders`): tiny random ViTs of DINOv2's layout saved in
the official key format and as timm safetensors load through the same loader and give timm's features; the
position-embedding rules equal torch.hub DINOv2's (dgm-eval, EDM2) and timm's (REPA); the published sizes build the
same architecture as timm's `vit_*_patch14_dinov2`; a missing or unsafe file is one clear error."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.core import encoders as enc
from pipeline.core.errors import InputError
from tests.support.encoder_fixtures import PATCH, save_official, save_timm_safetensors, tiny_timm_dinov2

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRID = 4  # the tiny models' "pre-training" grid (56 px), as the published 37 (518 px)


def _images(size: int, count: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["mlp", "swiglu"])
def tiny(request):
    return tiny_timm_dinov2(embed_dim=64, depth=2, grid=GRID, swiglu=request.param == "swiglu", seed=3)


@pytest.mark.parametrize("file_format", ["official", "timm"])
def test_both_file_formats_load_to_timm_features(tiny, file_format, tmp_path):
    if file_format == "official":
        path = save_official(tiny, tmp_path / "dinov2_vits14_pretrain.pth")
    else:
        path = save_timm_safetensors(tiny, tmp_path / "model.safetensors")
    encoder = enc.load_dinov2(path, img_size=GRID * PATCH)
    assert encoder.spec.key_format == file_format and not encoder.spec.layer_scale_constant
    assert encoder.spec.swiglu == (tiny.blocks[0].mlp.fc2.in_features * 2 == tiny.blocks[0].mlp.fc1.out_features)
    x = _images(GRID * PATCH)
    with torch.no_grad():
        expected = tiny.forward_features(x)
        tokens = encoder.tokens(x)
    torch.testing.assert_close(tokens["cls"], expected[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(tokens["patches"], expected[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(encoder(x), tiny(x), rtol=0, atol=0)  # the hub model's output: the normed CLS
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.train().training


def test_timm_rule_equals_timm_dynamic_resampling(tmp_path):
    """REPA resamples the hub model's pos_embed once with timm's `resample_abs_pos_embed`; timm's dynamic-size
    model does the same per batch."""
    reference = tiny_timm_dinov2(embed_dim=64, depth=2, grid=GRID, seed=4, dynamic_img_size=True)
    path = save_official(reference, tmp_path / "w.pth")
    encoder = enc.load_dinov2(path, img_size=3 * PATCH, pos_embed_rule="timm")
    x = _images(3 * PATCH)
    with torch.no_grad():
        torch.testing.assert_close(encoder.patch_tokens(x), reference.forward_features(x)[:, 1:])


def _hub_interpolate_pos_encoding(pos_embed: torch.Tensor, w: int, h: int, patch: int) -> torch.Tensor:
    """facebookresearch/dinov2 `DinoVisionTransformer.interpolate_pos_encoding` (interpolate_offset 0.1,
    interpolate_antialias False, the hub backbones' settings), transcribed as the oracle of rule "hub"."""
    npatch_model = pos_embed.shape[1] - 1
    pos_embed = pos_embed.float()
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch, h // patch
    m = int(math.sqrt(npatch_model))
    if w0 * h0 == npatch_model and w == h:
        return pos_embed
    sx, sy = float(w0 + 0.1) / m, float(h0 + 0.1) / m
    patch_pos_embed = nn.functional.interpolate(
        patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=False,
        scale_factor=(sx, sy),
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def _hub_forward(model, x: torch.Tensor) -> torch.Tensor:
    """The hub model's forward (prepare_tokens_with_masks, blocks, norm) on the weights of a timm model."""
    _, _, w, h = x.shape
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)
    tokens = tokens + _hub_interpolate_pos_encoding(model.pos_embed, w, h, PATCH)
    for block in model.blocks:
        tokens = block(tokens)
    return model.norm(tokens)


@pytest.mark.parametrize("size", [2 * PATCH, 16 * PATCH])
def test_hub_rule_equals_torch_hub_dinov2_at_run_time(size, tmp_path):
    """dgm-eval and EDM2 run the hub model, which interpolates pos_embed on the fly for a 224-px input; the
    loader's one-time resampling gives the same tokens (shrinking and growing the tiny 4x4 grid)."""
    model = tiny_timm_dinov2(embed_dim=64, depth=1, grid=GRID, seed=5)
    encoder = enc.load_dinov2(save_official(model, tmp_path / "w.pth"), img_size=size)
    x = _images(size, count=2)
    with torch.no_grad():
        expected = _hub_forward(model, x)
        tokens = encoder.tokens(x)
    torch.testing.assert_close(tokens["cls"], expected[:, 0])
    torch.testing.assert_close(tokens["patches"], expected[:, 1:])
    # The two rules differ (antialiasing, sampling positions): which one is used matters.
    timm_rule = enc.resample_pos_embed(model.pos_embed.detach(), (size // PATCH,) * 2, "timm")
    assert not torch.allclose(timm_rule, encoder.vit.pos_embed)


@pytest.mark.parametrize("name", sorted(enc.DINOV2_MODELS))
def test_published_sizes_build_timm_dinov2_architecture(name):
    """For each published size, the architecture read off a state dict of that shape is timm's
    `vit_*_patch14_dinov2` (parameter names and shapes; built on the meta device, no memory)."""
    import timm

    timm_name, width, depth = enc.DINOV2_MODELS[name]
    with torch.device("meta"):
        reference = timm.create_model(timm_name, pretrained=False, img_size=224, num_classes=0)
        fc1 = reference.blocks[0].mlp.fc1.out_features
        spec = enc.DINOv2Spec(width, depth, width // 64, 14, 37, fc1, name == "dinov2_vitg14", "official", False)
        built = enc.build_dinov2(spec, 224)
    assert spec.name == name
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    assert built.blocks[0].attn.num_heads == reference.blocks[0].attn.num_heads


def test_missing_file_is_one_error_naming_the_file(tmp_path):
    with pytest.raises(enc.MissingEncoderWeightsError) as raised:
        enc.load_dinov2(tmp_path / "nowhere.pth", flag="--dinov2-weights")
    message = str(raised.value)
    assert "\n" not in message and isinstance(raised.value, InputError)
    assert (
        "dinov2_vitl14_pretrain.pth" in message and "--dinov2-weights" in message and "nothing is downloaded" in message
    )
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth" in message
    with pytest.raises(enc.MissingEncoderWeightsError, match="dinov2_vitb14_pretrain.pth"):
        enc.load_dinov2(None, name="dinov2_vitb14")


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    pickled = tmp_path / "pickled.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 8), "extra": object()}, pickled)
    with pytest.raises(enc.EncoderWeightsError, match="never loaded"):
        enc.load_dinov2(pickled)
    foreign = tmp_path / "foreign.pth"
    torch.save({"weight": torch.zeros(3)}, foreign)
    with pytest.raises(enc.EncoderWeightsError, match="not a DINOv2 ViT"):
        enc.load_dinov2(foreign)
    official_with_registers = save_official(tiny_timm_dinov2(depth=1), tmp_path / "reg.pth")
    state = torch.load(official_with_registers, weights_only=True)
    state["register_tokens"] = torch.zeros(1, 4, 32)
    torch.save(state, official_with_registers)
    with pytest.raises(enc.EncoderWeightsError, match="register tokens"):
        enc.load_dinov2(official_with_registers)


def test_fresh_initialisation_is_detected(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    fresh = VisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=1, num_heads=1, init_values=1e-5)
    state = {k: v for k, v in fresh.state_dict().items() if not k.startswith("head.")}
    assert enc.dinov2_spec(state).layer_scale_constant
    assert not enc.dinov2_spec(tiny_timm_dinov2(depth=1).state_dict()).layer_scale_constant
