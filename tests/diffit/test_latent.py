"""Latent DiffiT: named sizes, shapes, gradients, determinism, export and the released-layout loader."""

import pytest
import torch

import diffit
from diffit.convert import (
    convert_nvlabs_state_dict,
    load_nvlabs_checkpoint,
    load_nvlabs_file,
    nvlabs_model_kwargs,
    to_nvlabs_state_dict,
)
from diffit.latent import LatentDiffiT
from diffit.models import MODEL_CONFIGS, count_parameters, create_model, model_stats

# Exact counts at 256 px (32x32 latents, 1000 classes + null row, learned sigma), fixed position embedding
# included as in DiT. XL/2 is the 561M of the paper's Table 9; XL/4 and XL/8 were worked out by hand from XL/2
# (window bias rows, position embedding, patch embedding and final layer differ).
EXPECTED_PARAMS = {
    "DiffiT-XL/2": 561_330_144,
    "DiffiT-XL/4": 560_945_216,
    "DiffiT-XL/8": 561_475_008,
}


def tiny(**overrides):
    return create_model("DiffiT-Tiny/2", **overrides)


def test_xl2_parameter_count_is_561m_and_flops_match_table9():
    stats = model_stats("DiffiT-XL/2")
    assert stats["params"] == 561_330_144
    # The paper's 114 GFLOPs equal our count without the attention products (one FMA = one FLOP).
    assert round(stats["gflops_without_attention"]) == 114
    assert stats["gflops"] > stats["gflops_without_attention"]


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_xl_parameter_counts_exact(name):
    assert model_stats(name)["params"] == EXPECTED_PARAMS[name]


def test_parameter_count_closed_form_for_every_latent_size():
    """params = embeddings + depth * block + final layer, from the layer shapes (independent of the code)."""
    for name, config in MODEL_CONFIGS.items():
        if config["family"] != "latent":
            continue
        kw = config["kwargs"]
        h, p, c, grid = kw["hidden_size"], kw["patch_size"], kw["in_channels"], kw["input_size"] // kw["patch_size"]
        out = 2 * c
        window_rows = (2 * grid - 1) ** 2
        block = (
            2 * (h * 3 * h + 3 * h)
            + (h * h + h)
            + window_rows * kw["num_heads"]
            + (h * 4 * h + 4 * h)
            + (4 * h * h + h)
        )
        embed = (c * p * p * h + h) + grid * grid * h + (256 * h + h) + (h * h + h) + (kw["num_classes"] + 1) * h
        final = h * p * p * out + p * p * out
        assert model_stats(name)["params"] == embed + kw["depth"] * block + final, name


@pytest.mark.parametrize("name", [n for n, c in MODEL_CONFIGS.items() if c["family"] == "latent"])
def test_every_latent_config_builds_and_keeps_its_shape_contract(name):
    with torch.device("meta"):
        model = create_model(name, input_size=16)
        x = torch.randn(2, 4, 16, 16)
        out = model(x, torch.tensor([1.0, 999.0]), torch.tensor([3, model.null_class]))
    assert out.shape == (2, 8, 16, 16)


@pytest.mark.parametrize("patch", [2, 4])
def test_small_forward_shapes_and_unpatchify(patch):
    torch.manual_seed(0)
    model = tiny(patch_size=patch, input_size=8)
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([0.0, 10.0, 999.0]), torch.tensor([0, 1, 10]))
    assert out.shape == (3, 8, 8, 8)
    unlearned = tiny(learn_sigma=False)
    assert unlearned(x, torch.zeros(3), torch.zeros(3, dtype=torch.long)).shape == (3, 4, 8, 8)


def test_zero_initialised_final_layer_and_output_depends_on_t_and_class():
    torch.manual_seed(0)
    model = tiny()
    x = torch.randn(2, 4, 8, 8)
    assert torch.count_nonzero(model(x, torch.tensor([5.0, 5.0]), torch.tensor([1, 2]))) == 0  # DiT init
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    base = model(x, torch.tensor([5.0, 5.0]), torch.tensor([1, 1]))
    assert not torch.allclose(base, model(x, torch.tensor([500.0, 500.0]), torch.tensor([1, 1])))
    assert not torch.allclose(base, model(x, torch.tensor([5.0, 5.0]), torch.tensor([2, 2])))


def test_every_trainable_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = tiny()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)  # zero init would block upstream grads
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, model.null_class]))
    out.square().mean().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and torch.count_nonzero(param.grad) > 0, name
        else:
            assert name == "pos_embed" and param.grad is None


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 2]))
    model(*inputs).square().mean().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(*inputs).square().mean().backward()
    for name, grad in reference.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-6)


def test_determinism_under_seed():
    torch.manual_seed(7)
    a = tiny()
    torch.manual_seed(7)
    b = tiny()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_unconditional_model_and_label_errors():
    model = tiny(num_classes=0)
    assert model.label_embed is None
    assert model(torch.randn(1, 4, 8, 8), torch.tensor([1.0])).shape == (1, 8, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="pass class_labels"):
        tiny()(torch.randn(1, 4, 8, 8), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="expected input"):
        tiny()(torch.randn(1, 4, 16, 16), torch.tensor([1.0]), torch.tensor([0]))
    with pytest.raises(KeyError, match="unknown model"):
        create_model("DiT-XL/2")


def test_save_load_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = tiny(time_embedding="fourier")
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    diffit.save_pretrained(model, tmp_path / "export", {"diffusion": {"type": "adm"}})
    loaded, config = diffit.load_pretrained(tmp_path / "export")
    assert config["diffusion"] == {"type": "adm"} and config["model"]["name"] == "DiffiT-Tiny/2"
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 2]))
    model.eval()
    torch.testing.assert_close(loaded(*inputs), model(*inputs), rtol=0, atol=0)
    assert not list(tmp_path.joinpath("export").glob(".*tmp"))  # no temp files left behind
    with pytest.raises(FileNotFoundError, match="config.json"):
        diffit.load_pretrained(tmp_path)


def released_layout_state_dict(model: LatentDiffiT) -> dict:
    """A random state dict with the key names and shapes of the released NVlabs/DiffiT checkpoints."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    h = model.pos_embed.shape[-1]
    p, c, out = model.patch_size, model.in_channels, model.out_channels
    window_rows = (2 * model.grid_size - 1) ** 2
    heads = model.blocks[0].attn.num_heads
    sd = {
        "x_embedder.proj.weight": rand(h, c, p, p),
        "x_embedder.proj.bias": rand(h),
        "pos_embed": model.pos_embed.detach().clone(),
        "t_embedder.mlp.0.weight": rand(h, 256),
        "t_embedder.mlp.0.bias": rand(h),
        "t_embedder.mlp.2.weight": rand(h, h),
        "t_embedder.mlp.2.bias": rand(h),
        "y_embedder.embedding_table.weight": rand(model.num_classes + 1, h),
        "final_layer.linear.weight": rand(p * p * out, h),
        "final_layer.linear.bias": rand(p * p * out),
    }
    for i in range(len(model.blocks)):
        b = f"blocks.{i}."
        sd |= {
            b + "attn.qkv_temb.weight": rand(3 * h, h),
            b + "attn.qkv_temb.bias": rand(3 * h),
            b + "attn.relative_position_bias_table": rand(window_rows, heads),
            b + "attn.relative_position_index": model.blocks[i].attn.relative_position_index.clone(),
            b + "attn.qkv.weight": rand(3 * h, h),
            b + "attn.qkv.bias": rand(3 * h),
            b + "attn.proj.weight": rand(h, h),
            b + "attn.proj.bias": rand(h),
            b + "mlp.fc1.weight": rand(4 * h, h),
            b + "mlp.fc1.bias": rand(4 * h),
            b + "mlp.fc2.weight": rand(h, 4 * h),
            b + "mlp.fc2.bias": rand(h),
        }
    return sd


def test_released_checkpoint_layout_loads_strictly(tmp_path):
    model = tiny()
    released = released_layout_state_dict(model)
    path = tmp_path / "diffit_released.pt"
    torch.save({"ema": released}, path)
    load_nvlabs_checkpoint(model, str(path))
    ours = model.state_dict()
    torch.testing.assert_close(ours["blocks.1.attn.qkv_time.weight"], released["blocks.1.attn.qkv_temb.weight"])
    torch.testing.assert_close(
        ours["blocks.0.attn.relative_position_bias"], released["blocks.0.attn.relative_position_bias_table"]
    )
    torch.testing.assert_close(ours["label_embed.table.weight"], released["y_embedder.embedding_table.weight"])
    # Every released tensor (except the derived index buffers) landed somewhere.
    assert len(ours) == len([k for k in released if not k.endswith("relative_position_index")])


def test_released_layout_errors_are_specific():
    model = tiny()
    released = released_layout_state_dict(model)
    with pytest.raises(KeyError, match="no counterpart"):
        convert_nvlabs_state_dict({**released, "blocks.0.attn.extra": torch.zeros(1)}, model)
    with pytest.raises(KeyError, match="lacks 1 weights"):
        convert_nvlabs_state_dict({k: v for k, v in released.items() if k != "pos_embed"}, model)
    with pytest.raises(ValueError, match="shape"):
        convert_nvlabs_state_dict(released, tiny(hidden_size=32))
    bad = dict(released)
    bad["blocks.0.attn.relative_position_index"] = released["blocks.0.attn.relative_position_index"].flip(0)
    with pytest.raises(ValueError, match="relative position index"):
        convert_nvlabs_state_dict(bad, model)


# ----------------------------------------------------------------------------------------------------------------
# The released files: safetensors, architecture read off the shapes, XL/2 at 256 and 512 px


def test_to_nvlabs_state_dict_is_the_released_layout():
    model = tiny()
    ours = to_nvlabs_state_dict(model)
    released = released_layout_state_dict(model)  # the layout written out by hand, above
    assert set(ours) == set(released)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in released.items()}
    torch.testing.assert_close(
        ours["blocks.1.attn.relative_position_index"], released["blocks.1.attn.relative_position_index"]
    )
    back = tiny()
    back.load_state_dict(convert_nvlabs_state_dict(ours, back), strict=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)


def test_released_safetensors_load_without_unpickling(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    model = tiny()
    released = released_layout_state_dict(model)
    path = tmp_path / "diffit_256.safetensors"
    save_file({k: v.contiguous() for k, v in released.items()}, str(path))

    def no_pickle(*args, **kwargs):
        raise AssertionError("a released safetensors file must not go through torch.load")

    monkeypatch.setattr(torch, "load", no_pickle)
    load_nvlabs_checkpoint(model, path)
    torch.testing.assert_close(model.state_dict()["patch_embed.proj.weight"], released["x_embedder.proj.weight"])
    # A file saved by a training wrapper (every key under "ema.") reads the same.
    save_file({f"ema.{k}": v.contiguous() for k, v in released.items()}, str(tmp_path / "wrapped.safetensors"))
    assert set(load_nvlabs_file(tmp_path / "wrapped.safetensors")) == set(released)


def test_architecture_is_read_off_the_released_shapes():
    kwargs = nvlabs_model_kwargs(released_layout_state_dict(tiny()))
    expected = {k: v for k, v in MODEL_CONFIGS["DiffiT-Tiny/2"]["kwargs"].items()}
    assert kwargs == {**expected, "mlp_ratio": 4.0}


@pytest.mark.parametrize("latent_size", [32, 64])  # ImageNet-256 and ImageNet-512
def test_full_xl2_release_converts_strictly_at_both_resolutions(latent_size):
    """The whole XL/2 conversion (every key, shape and index buffer), on the meta device: no 2 GB of weights."""
    with torch.device("meta"):
        released_model = create_model("DiffiT-XL/2", input_size=latent_size)
        released = to_nvlabs_state_dict(released_model)
        kwargs = nvlabs_model_kwargs(released)
        model = create_model("DiffiT-XL/2", **kwargs)
    assert kwargs == {**MODEL_CONFIGS["DiffiT-XL/2"]["kwargs"], "input_size": latent_size, "mlp_ratio": 4.0}
    assert kwargs["num_classes"] == 1000 and released["y_embedder.embedding_table.weight"].shape[0] == 1001
    assert released["blocks.27.attn.relative_position_bias_table"].shape == ((2 * latent_size // 2 - 1) ** 2, 16)
    # The index buffers are real tensors (computed, as the released model registers them) and checked.
    assert not released["blocks.0.attn.relative_position_index"].is_meta
    converted = convert_nvlabs_state_dict(released, model)
    assert set(converted) == set(model.state_dict())
    assert sum(v.numel() for v in converted.values()) == count_parameters(model)
