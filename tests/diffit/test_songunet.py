"""EDM's DDPM++ / NCSN++ (diffit/songunet.py) against NVlabs/edm's own outputs, and its TMSA form.

The reference (tests/support/edm_reference/songunet.safetensors, made by EDM's code: see the README there) holds,
for three small SongUNets (DDPM++ flavour, NCSN++ flavour, 'skip' encoder/decoder): the state dict (weights
redrawn at a trained scale, so the outputs are not EDM's near-zero initial ones), inputs, outputs in eval mode,
with and without augment labels, and in training mode under a seed (label dropout and dropout draws); checksums
of the initial weights under the init seed; the state-dict keys and shapes of the full-size presets; their
parameter counts; EDM's constructor signature.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import diffit
from diffit.config_check import check_model_kwargs, implied_size
from diffit.models import count_parameters, model_stats
from diffit.songunet import SongUNet, UNetBlock

REFERENCE = Path(__file__).resolve().parents[1] / "support" / "edm_reference" / "songunet.safetensors"
SMALL = ("ddpmpp", "ncsnpp", "skip")
# fp32: the same operations as EDM in the same order (bitwise equal to EDM run in one process); a stored output
# differs from a recomputation by a few ulp where the CPU convolution kernels differ between processes.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)

# EDM's train.py presets at CIFAR-10 size, counted with EDM's own code (the reference) and pinned here.
PRESET_PARAMETERS = {
    ("DDPM++-CIFAR10", 0, 0): 55_732_739,
    ("DDPM++-CIFAR10", 0, 9): 55_733_891,
    ("DDPM++-CIFAR10", 10, 0): 55_734_147,
    ("DDPM++-CIFAR10", 10, 9): 55_735_299,
    ("NCSN++-CIFAR10", 0, 0): 56_395_523,
    ("NCSN++-CIFAR10", 0, 9): 56_397_827,
    ("NCSN++-CIFAR10", 10, 0): 56_398_339,
    ("NCSN++-CIFAR10", 10, 9): 56_400_643,
}
EDM_ARCH = {"DDPM++-CIFAR10": "ddpmpp", "NCSN++-CIFAR10": "ncsnpp"}


@pytest.fixture(scope="module")
def reference():
    with safe_open(str(REFERENCE), "pt") as handle:
        meta = json.loads(handle.metadata()["reference"])
    return meta, load_file(str(REFERENCE))


def reference_case(reference, name):
    meta, tensors = reference
    prefix = f"{name}/state/"
    state = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
    inputs = tuple(tensors.get(f"{name}/{key}") for key in ("x", "noise_labels", "class_labels", "augment_labels"))
    return meta[name], state, inputs, {key: tensors[f"{name}/{key}"] for key in ("out_eval", "out_train_seed")}


def keys_and_shapes(module):
    return [[key, list(value.shape)] for key, value in module.state_dict().items()]


# ----------------------------------------------------------------------------------------------------------------
# Equal to EDM


@pytest.mark.parametrize("name", SMALL)
def test_edm_state_dict_loads_by_name_and_the_forward_is_edms(reference, name):
    meta, state, inputs, outputs = reference_case(reference, name)
    model = SongUNet(**meta["kwargs"])
    assert keys_and_shapes(model) == meta["keys"]  # names, shapes and order of EDM's state dict
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), outputs["out_eval"], **TOLERANCE)
        without = reference[1][f"{name}/out_eval_no_augment_labels"]
        torch.testing.assert_close(model(*inputs[:3], None), without, **TOLERANCE)
        # Training mode: label dropout and dropout draw from the generator in EDM's order.
        model.train()
        torch.manual_seed(meta["train_seed"])
        torch.testing.assert_close(model(*inputs), outputs["out_train_seed"], **TOLERANCE)


@pytest.mark.parametrize("name", SMALL)
def test_initial_weights_are_edms_draws_under_the_same_seed(reference, name):
    meta = reference[0][name]
    torch.manual_seed(meta["init_seed"])
    model = SongUNet(**meta["kwargs"])
    for key, value in model.state_dict().items():
        expected = meta["init_checksums"][key]
        got = [float(value.double().sum()), float(value.double().square().sum())]
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12), key


def test_constructor_takes_edms_arguments_with_edms_defaults(reference):
    ours = list(inspect.signature(SongUNet.__init__).parameters.values())[1:]
    ours = [[p.name, None if p.default is p.empty else p.default] for p in ours]
    ours = [[name, list(default) if isinstance(default, tuple) else default] for name, default in ours]
    assert ours == reference[0]["signature"] + [["tmsa", False]]


@pytest.mark.parametrize("name", sorted(EDM_ARCH))
def test_named_preset_is_edms_train_py_preset(reference, name):
    with torch.device("meta"):
        model = diffit.create_model(name, label_dim=10, augment_dim=9)
    assert keys_and_shapes(model) == reference[0][f"preset_{EDM_ARCH[name]}_keys"]
    kwargs = model.model_config["kwargs"]
    assert kwargs["model_channels"] == 128 and kwargs["channel_mult"] == [2, 2, 2] and kwargs["dropout"] == 0.13


@pytest.mark.parametrize(("name", "label_dim", "augment_dim"), sorted(PRESET_PARAMETERS))
def test_preset_parameter_counts_are_edms(reference, name, label_dim, augment_dim):
    expected = PRESET_PARAMETERS[(name, label_dim, augment_dim)]
    key = f"{EDM_ARCH[name]}/label_dim={label_dim}/augment_dim={augment_dim}"
    assert reference[0]["preset_parameter_counts"][key] == expected
    with torch.device("meta"):
        model = diffit.create_model(name, label_dim=label_dim, augment_dim=augment_dim)
    assert count_parameters(model) == expected
    assert implied_size(name, {"label_dim": label_dim, "augment_dim": augment_dim})[0] == expected


def test_model_stats_lists_the_presets():
    stats = model_stats("DDPM++-CIFAR10")
    assert (stats["family"], stats["resolution"], stats["params"]) == ("songunet", 32, 55_733_891)
    assert stats["gflops"] > stats["gflops_without_attention"] > 0


# ----------------------------------------------------------------------------------------------------------------
# TMSA form (DiffiT Table 5)


def small_kwargs(reference, name="ddpmpp", **overrides):
    return {**reference[0][name]["kwargs"], **overrides}


def attention_blocks(model):
    return {name: block for name, block in model.named_modules() if isinstance(block, UNetBlock) and block.num_heads}


@pytest.mark.parametrize("name", SMALL)
def test_tmsa_adds_parameters_only_in_the_attention_blocks(reference, name):
    plain = SongUNet(**small_kwargs(reference, name))
    tmsa = SongUNet(**small_kwargs(reference, name, tmsa=True))
    plain_shapes, tmsa_shapes = dict(keys_and_shapes(plain)), dict(keys_and_shapes(tmsa))
    assert {key: tmsa_shapes[key] for key in plain_shapes} == plain_shapes
    extra = set(tmsa_shapes) - set(plain_shapes)
    blocks = attention_blocks(tmsa)
    assert blocks and all(b.tmsa for b in blocks.values())
    expected = {f"{b}.{p}" for b in blocks for p in ("qkv_time.weight", "qkv_time.bias", "relative_position_bias")}
    assert extra == expected
    for block_name, block in blocks.items():
        res = block.resolution
        assert tmsa_shapes[f"{block_name}.qkv_time.weight"] == [3 * block.out_channels, block.emb_channels]
        assert tmsa_shapes[f"{block_name}.relative_position_bias"] == [(2 * res - 1) ** 2, 1]
    assert implied_size("DDPM++-CIFAR10", {**small_kwargs(reference, name), "tmsa": True}) == (
        count_parameters(tmsa),
        sum(b.numel() * b.element_size() for b in tmsa.buffers()),
    )


@pytest.mark.parametrize("name", ("ddpmpp", "ncsnpp"))
def test_tmsa_with_a_zero_time_projection_and_bias_is_edms_network(reference, name):
    """The TMSA form extends EDM's network: EDM's weights load into it (only the TMSA terms missing), and with
    W_t = 0 and B = 0 it computes EDM's outputs."""
    meta, state, inputs, outputs = reference_case(reference, name)
    model = SongUNet(**meta["kwargs"], tmsa=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and missing and all("qkv_time" in k or "relative_position_bias" in k for k in missing)
    with torch.no_grad():
        for block in attention_blocks(model).values():
            block.qkv_time.weight.zero_()
            block.qkv_time.bias.zero_()
            block.relative_position_bias.zero_()
        torch.testing.assert_close(model.eval()(*inputs), outputs["out_eval"], **TOLERANCE)


def test_tmsa_attention_weights_follow_the_noise_level(reference):
    """For the same features entering a block, the attention map of the TMSA block changes with the noise label
    (q / k / v carry W_t x_t); the plain block's map does not (its noise dependence is only the residual path)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    labels = torch.eye(4)[:2]
    for tmsa in (True, False):
        torch.manual_seed(1)
        model = SongUNet(**small_kwargs(reference, tmsa=tmsa)).eval()
        block = model.dec["4x4_in0"]  # the bottleneck attention
        features = torch.randn(2, block.out_channels, 4, 4)
        with torch.no_grad():
            maps = [
                block.attention_map(features, model.embedding(torch.full((2,), sigma).log() / 4, labels))
                for sigma in (0.01, 80.0)
            ]
            assert maps[0].shape == (2, 16, 16) and torch.allclose(maps[0].sum(-1), torch.ones(2, 16))
            if tmsa:
                assert (maps[0] - maps[1]).abs().max() > 1e-3
            else:
                assert torch.equal(maps[0], maps[1])
            out = model(x, torch.tensor([0.1, -0.5]), labels, torch.zeros(2, 9))
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_tmsa_trains_every_parameter(reference):
    torch.manual_seed(0)
    model = SongUNet(**small_kwargs(reference, tmsa=True, dropout=0.0))
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([0.3, -1.0]), torch.eye(4)[:2], torch.randn(2, 9))
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Registry, export and config checks


@pytest.mark.parametrize("tmsa", [False, True])
def test_export_round_trip(reference, tmp_path, tmsa):
    overrides = {k: v for k, v in small_kwargs(reference, "ncsnpp", tmsa=tmsa).items()}
    torch.manual_seed(0)
    model = diffit.create_model("NCSN++-CIFAR10", **overrides).eval()
    diffit.save_pretrained(model, tmp_path / "m")
    loaded, config = diffit.load_pretrained(tmp_path / "m")
    assert type(loaded) is SongUNet and config["model"]["name"] == "NCSN++-CIFAR10"
    inputs = (torch.randn(2, 3, 16, 16), torch.tensor([0.2, 1.0]), torch.eye(4)[:2], torch.randn(2, 9))
    model.save_pretrained(tmp_path / "hub")  # the Hub mixin's spelling of the same export
    from_hub = SongUNet.from_pretrained(tmp_path / "hub")
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), model(*inputs))
        assert torch.equal(from_hub(*inputs), model(*inputs))


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"encoder_type": "fancy"}, "model.kwargs.encoder_type must be one of ['standard', 'skip', 'residual']"),
        ({"channel_mult": []}, "model.kwargs.channel_mult must be a list of 1 to 12 integers"),
        ({"img_resolution": 30}, "img_resolution 30 cannot be halved 2 times"),
        ({"img_resolution": 256, "tmsa": True, "attn_resolutions": [128]}, "tmsa: an attention block at 128^2"),
        ({"model_channels": 4096}, "over the bound"),
        ({"window_size": 4}, "model.kwargs has unknown keys ['window_size']"),
    ],
)
def test_config_check_refuses_bad_songunet_kwargs(overrides, problem):
    with pytest.raises(ValueError, match=None) as caught:
        check_model_kwargs("DDPM++-CIFAR10", overrides)
    assert problem in str(caught.value)


def test_config_check_accepts_no_attention_resolutions():
    assert check_model_kwargs("NCSN++-CIFAR10", {"attn_resolutions": []})["attn_resolutions"] == []


def test_a_conditional_model_needs_class_labels(reference):
    model = SongUNet(**small_kwargs(reference))
    with pytest.raises(ValueError, match="class-conditional model"):
        model(torch.randn(1, 3, 16, 16), torch.zeros(1), None)


# ----------------------------------------------------------------------------------------------------------------
# Label indices (the convention of the samplers and the trainer) -> EDM's one-hot class vectors


@pytest.mark.parametrize("name", ["ddpmpp", "ncsnpp"])
def test_label_indices_give_edms_outputs_of_their_one_hot_vectors(reference, name):
    meta, state, (x, noise_labels, one_hot, augment_labels), outputs = reference_case(reference, name)
    model = SongUNet(**meta["kwargs"])
    model.load_state_dict(state, strict=True)
    model.eval()
    indices = one_hot.argmax(dim=1)
    assert indices.tolist() == [0, 3, 1] and model.num_classes == 4 and model.null_class == 4
    run = lambda labels: model(x, noise_labels, labels, augment_labels)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(run(indices), outputs["out_eval"], **TOLERANCE)
        assert torch.equal(run(indices), run(one_hot))
        # The null class (index label_dim, what guidance and the trainer's label dropout use) is the zero vector.
        assert torch.equal(run(torch.tensor([4, 3, 4])), run(one_hot * torch.tensor([[0.0], [1.0], [0.0]])))
    expected = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(model.class_vectors(torch.tensor([2, 4]), torch.float32), expected)


def test_an_unconditional_model_has_no_classes(reference):
    model = SongUNet(**small_kwargs(reference, "skip"))
    assert model.num_classes == 0 and model.null_class is None
