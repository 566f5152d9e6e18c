"""Tests of the image-space DiffiT U-Net (`diffit/unet.py`): architecture against supplementary Tables S.2/S.3,
parameter count against a closed form, windowed attention against a per-window computation, conditioning,
gradients reaching every parameter, determinism."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from diffit.config_check import implied_size
from diffit.models import count_parameters, create_model, resolve_model_kwargs
from diffit.unet import DiffiTResBlock, DiffiTUNet, group_count

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Registry configurations shrunk in width only (stages, blocks, windows and resolution stay as configured).
NARROW = {
    "DiffiT-CIFAR10": {"channels": [16, 32, 32], "num_heads": 2},
    "DiffiT-FFHQ64": {"channels": [16, 32, 32, 32], "num_heads": 2},
    "DiffiT-UNet-Tiny": {},
}


def randomize_head(model: DiffiTUNet) -> DiffiTUNet:
    """Give the zero-initialised output head random weights, so that the output depends on the inputs."""
    with torch.no_grad():
        nn.init.normal_(model.head.conv.weight, std=0.05)
        nn.init.normal_(model.head.conv.bias, std=0.05)
    return model


def tiny(**overrides) -> DiffiTUNet:
    return create_model("DiffiT-UNet-Tiny", **overrides).eval()


def expected_parameter_count(kwargs: dict) -> int:
    """Parameters of the DiffiT U-Net counted by hand from the layer list of the module docstring."""
    c, blocks, heads = kwargs["channels"], kwargs["blocks_per_stage"], kwargs["num_heads"]
    res, ws, in_ch, ncls = kwargs["img_resolution"], kwargs["window_size"], kwargs["in_channels"], kwargs["num_classes"]
    t = 4 * c[0]
    mlp = 4.0

    def conv(cin, cout, k=3):
        return cin * cout * k * k + cout

    def linear(cin, cout):
        return cin * cout + cout

    def resblock(ch, window):
        transformer = (
            linear(ch, 3 * ch)
            + linear(t, 3 * ch)
            + (2 * window - 1) ** 2 * heads
            + linear(ch, ch)
            + linear(ch, int(mlp * ch))
            + linear(int(mlp * ch), ch)
        )
        return 2 * ch + conv(ch, ch) + transformer

    windows = [min(ws, res // 2**i) for i in range(len(c))]
    total = linear(c[0], t) + linear(t, t)  # time MLP on c[0] sinusoids
    total += (ncls + 1) * t if ncls else 0
    total += conv(in_ch, c[0])
    for i in range(len(c)):
        total += conv(c[i - 1], c[i]) if i else 0
        total += blocks[i] * resblock(c[i], windows[i])
    for i in range(len(c) - 1):
        total += conv(c[i + 1], c[i + 1]) + conv(c[i + 1] + c[i], c[i]) + blocks[i] * resblock(c[i], windows[i])
    total += 2 * c[0] + conv(c[0], in_ch)
    return total


@pytest.mark.parametrize("name", list(NARROW))
def test_stage_shapes_follow_tables_s2_s3(name):
    """Every ResBlock runs at the resolution / width of its stage: encoder stages 0..K-1, then decoder
    stages K-2..0 (Table S.3 starts the decoder with an upsampler), and the output has the input's shape."""
    model = create_model(name, **NARROW[name]).eval()
    kwargs = resolve_model_kwargs(name, **NARROW[name])
    channels, blocks, res = kwargs["channels"], kwargs["blocks_per_stage"], kwargs["img_resolution"]
    seen = []
    for module in model.modules():
        if isinstance(module, DiffiTResBlock):
            module.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape[1:])))
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        out = model(x, torch.tensor([-0.3, 0.7]))
    stage = lambda i: [(channels[i], res // 2**i, res // 2**i)] * blocks[i]  # noqa: E731
    expected = sum((stage(i) for i in range(len(channels))), []) + sum(
        (stage(i) for i in reversed(range(len(channels) - 1))), []
    )
    assert seen == expected
    assert out.shape == x.shape


@pytest.mark.parametrize("name", ["DiffiT-CIFAR10", "DiffiT-FFHQ64", "DiffiT-UNet-Tiny"])
def test_parameter_count_matches_closed_form(name):
    with torch.device("meta"):
        model = create_model(name)
    assert count_parameters(model) == expected_parameter_count(resolve_model_kwargs(name))


def test_conditional_parameter_count_includes_null_class_row():
    model = tiny(num_classes=5)
    assert count_parameters(model) == expected_parameter_count(resolve_model_kwargs("DiffiT-UNet-Tiny", num_classes=5))
    assert model.label_embed.table.num_embeddings == 6


def test_real_cifar10_config_forward_is_zero_at_init():
    """The full DiffiT-CIFAR10 network runs at batch 1 and, with its zero head, outputs F = 0 (so that the
    EDM-preconditioned denoiser starts as D(x) = c_skip * x)."""
    torch.manual_seed(0)
    model = create_model("DiffiT-CIFAR10").eval()
    assert (model.in_channels, model.input_size, model.img_resolution) == (3, 32, 32)
    assert model.stage_windows == [4, 4, 4]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), torch.tensor([0.1]))
    assert out.shape == (1, 3, 32, 32)
    assert torch.count_nonzero(out) == 0


def test_attributes():
    model = tiny()
    assert model.in_channels == 3 and model.input_size == 16 and model.img_resolution == 16
    assert model.num_classes == 0 and model.null_class == 0 and model.learn_sigma is False
    conditional = tiny(num_classes=10)
    assert conditional.num_classes == 10 and conditional.null_class == 10


def test_output_changes_with_noise_labels():
    torch.manual_seed(0)
    model = randomize_head(tiny())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        low = model(x, torch.full((2,), -1.0))
        high = model(x, torch.full((2,), 1.0))
        scalar = model(x, torch.tensor(1.0))
    assert (low - high).abs().max() > 1e-6
    torch.testing.assert_close(scalar, high)


def test_batch_elements_are_independent():
    """Windows of different images never mix and each image gets its own time token: a batch equals the
    images run one at a time (this checks the window order against TMSA's repeat of x_t)."""
    torch.manual_seed(0)
    model = randomize_head(tiny(num_classes=3))
    x = torch.randn(3, 3, 16, 16)
    noise_labels = torch.tensor([-1.2, 0.0, 0.9])
    class_labels = torch.tensor([0, 3, 2])
    with torch.no_grad():
        batched = model(x, noise_labels, class_labels)
        single = torch.cat([model(x[i : i + 1], noise_labels[i : i + 1], class_labels[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_classes", [0, 4])
def test_every_parameter_receives_a_gradient(num_classes):
    """DDP rejects parameters that get no gradient. At the default init (zero head) every parameter must
    still get a gradient tensor; with a non-zero head every gradient must also be non-zero."""
    torch.manual_seed(0)
    model = tiny(num_classes=num_classes).train()
    x = torch.randn(2, 3, 16, 16)
    noise_labels = torch.tensor([-0.5, 0.5])
    class_labels = torch.tensor([1, num_classes]) if num_classes else None  # a real and the null class

    def backward():
        model.zero_grad(set_to_none=True)
        ((model(x, noise_labels, class_labels) - torch.randn_like(x)) ** 2).mean().backward()

    backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    randomize_head(model)
    backward()
    zero = [n for n, p in model.named_parameters() if p.requires_grad and not torch.any(p.grad != 0)]
    assert not zero, f"parameters with an all-zero gradient: {zero}"


def test_same_seed_same_model_and_output():
    def build(seed):
        torch.manual_seed(seed)
        return randomize_head(tiny(num_classes=2))

    a, b, c = build(7), build(7), build(8)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    x = torch.randn(2, 3, 16, 16)
    args = (x, torch.tensor([0.2, -0.4]), torch.tensor([0, 1]))
    with torch.no_grad():
        assert torch.equal(a(*args), b(*args))


def test_windowed_transformer_equals_per_window_computation():
    """On a non-square 8x12 map with 4x4 windows, the ResBlock's transformer equals the DiffiT block applied
    to each window's 16 row-major tokens separately, and the ResBlock is x + that(Conv(Swish(GN(x))))."""
    torch.manual_seed(0)
    block = DiffiTResBlock(channels=16, num_heads=2, window_size=4, time_dim=24).eval()
    x = torch.randn(2, 16, 8, 12)
    time_token = torch.randn(2, 24)
    with torch.no_grad():
        x_hat = block.conv(block.act(block.norm(x)))
        windowed = block.windowed_transformer(x_hat, time_token)
        for i in range(2):
            for j in range(3):
                patch = x_hat[:, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
                tokens = patch.flatten(2).transpose(1, 2)  # [N, 16, C], row-major in the window
                expected = block.transformer(tokens, time_token).transpose(1, 2).reshape(2, 16, 4, 4)
                torch.testing.assert_close(windowed[:, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4], expected)
        torch.testing.assert_close(block(x, time_token), x + windowed)


def test_attention_is_local_to_windows():
    """Changing the input of one window changes the transformer output of that window only."""
    torch.manual_seed(0)
    block = DiffiTResBlock(channels=16, num_heads=2, window_size=4, time_dim=24).eval()
    x_hat = torch.randn(1, 16, 8, 8)
    time_token = torch.randn(1, 24)
    perturbed = x_hat.clone()
    perturbed[:, :, 4:, :4] += 1.0  # window (1, 0)
    with torch.no_grad():
        changed = (
            block.windowed_transformer(perturbed, time_token) - block.windowed_transformer(x_hat, time_token)
        ).abs().amax(dim=(0, 1)) > 0
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[4:, :4] = True
    assert changed[inside].all() and not changed[~inside].any()


def test_map_smaller_than_window_is_one_window():
    model = DiffiTUNet(img_resolution=16, channels=[16, 16, 16], blocks_per_stage=[1, 1, 1], window_size=8, num_heads=2)
    assert model.stage_windows == [8, 8, 4]
    assert [b.transformer.attn.window_size for b in model.encoder[2].blocks] == [4]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16), torch.zeros(1)).shape == (1, 3, 16, 16)


def test_class_conditioning():
    torch.manual_seed(0)
    model = randomize_head(tiny(num_classes=4))
    x = torch.randn(2, 3, 16, 16)
    noise_labels = torch.zeros(2)
    with torch.no_grad():
        out_a = model(x, noise_labels, torch.tensor([0, 0]))
        out_b = model(x, noise_labels, torch.tensor([2, 2]))
        out_null = model(x, noise_labels, torch.full((2,), model.null_class))
    assert (out_a - out_b).abs().max() > 1e-6
    assert (out_a - out_null).abs().max() > 1e-6
    with pytest.raises(ValueError, match="class_labels"):
        model(x, noise_labels)
    with pytest.raises(ValueError, match="class_labels must have shape"):
        model(x, noise_labels, torch.tensor([1]))
    with pytest.raises(ValueError, match="unconditional"):
        tiny()(x, noise_labels, torch.tensor([0, 1]))


def test_fourier_time_embedding_and_custom_time_dim():
    model = tiny(time_embedding="fourier", time_dim=48)
    assert model.time_embed.fourier is not None and model.time_dim == 48
    with torch.no_grad():
        assert model(torch.randn(1, 3, 16, 16), torch.zeros(1)).shape == (1, 3, 16, 16)


def test_gradient_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = randomize_head(tiny()).train()
    x, noise_labels = torch.randn(2, 3, 16, 16), torch.tensor([0.3, -0.3])

    def gradients():
        model.zero_grad(set_to_none=True)
        model(x, noise_labels).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    reference = gradients()
    model.gradient_checkpointing = True
    for got, want in zip(gradients(), reference):
        torch.testing.assert_close(got, want)


def test_group_count():
    assert group_count(256) == 32 and group_count(128) == 32
    assert group_count(32) == 8 and group_count(12) == 3 and group_count(3) == 1
    assert group_count(96, num_groups=40) == 24  # largest divisor of 96 not above min(40, 96 // 4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"img_resolution": 18, "channels": [16, 16, 16], "blocks_per_stage": [1, 1, 1]}, "cannot be halved"),
        ({"img_resolution": 24, "window_size": 16}, "not divisible by the attention window"),
        ({"num_heads": 3}, "not divisible by num_heads"),
        ({"blocks_per_stage": [1]}, "same length"),
        ({"num_classes": -1}, "num_classes"),
    ],
)
def test_bad_configurations_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_bad_inputs_are_rejected():
    model = tiny()
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="noise_labels"):
        model(torch.randn(2, 3, 16, 16), torch.zeros(3))


def test_augment_labels_enter_the_time_token_through_a_bias_free_linear_and_only_when_given():
    """EDM's augmentation conditioning on the DiffiT U-Net (`augment_dim`): x_t + W_a a, as SongUNet's map_augment
    (no bias, so zero labels = no augmentation); without labels (sampling) the output is the plain model's."""
    torch.manual_seed(0)
    model = create_model("DiffiT-UNet-Tiny", augment_dim=9).eval()
    plain = create_model("DiffiT-UNet-Tiny").eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("augment_embed")})
    torch.nn.init.normal_(model.head.conv.weight, std=0.1)
    plain.head.conv.weight.data.copy_(model.head.conv.weight.data)
    assert count_parameters(model) - count_parameters(plain) == 9 * model.time_dim
    assert implied_size("DiffiT-UNet-Tiny", {"augment_dim": 9})[0] == count_parameters(model)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.1, -0.4])
    labels = torch.randn(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), plain(x, t), rtol=0, atol=0)
        torch.testing.assert_close(model(x, t, augment_labels=torch.zeros(2, 9)), plain(x, t), rtol=0, atol=0)
        token = model.time_token(t, None, labels)
        torch.testing.assert_close(token, plain.time_token(t, None) + labels @ model.augment_embed.weight.T)
        assert not torch.allclose(model(x, t, augment_labels=labels), plain(x, t))
    with pytest.raises(ValueError, match=r"augment_labels must have shape \[2, 9\]"):
        model(x, t, augment_labels=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="augment_dim=0"):
        plain(x, t, augment_labels=labels)
