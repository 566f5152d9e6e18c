"""DiffiT's time-conditioning variants (paper Table 6 F/G/H, Table 7, Fig. 7b) as model configuration.

What is proven here: every variant's exact parameter count (pinned, and derived by hand for XL/2), that
`DiffiT-XL/2` with `time_conditioning="adaln"` is DiT-XL/2 (675,129,632 parameters; block and whole-model forward
equal to DiT's published code written out below, with adaLN-Zero init), that each variant's block computes the
formula its docstring states (explicit references), where the time token acts in each variant, windowing,
shapes, gradients, and that every variant saves, loads and samples like any model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffit
from diffit.config_check import InvalidModelFileError, check_model_config, implied_size
from diffit.layers import (
    TIME_CONDITIONINGS,
    DiffiTTransformerBlock,
    attention_with_bias,
    relative_position_index,
    set_attention_backend,
    timestep_embedding,
    window_partition,
)
from diffit.models import count_parameters, create_model

VARIANTS = ("tmsa", "adaln", "adaln-relpos", "bias", "mlp", "decoupled")  # where x_t enters a block
# Where x_t enters the U-Net's stages instead (Table 4; the latent model has none): tests/diffit/test_architectures.py
STAGE_VARIANTS = ("added-per-stage",)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_variants_are_the_papers_five_and_the_schema_lists_the_same():
    from diffit import config_check

    assert TIME_CONDITIONINGS == VARIANTS + STAGE_VARIANTS == config_check.TIME_CONDITIONINGS
    # the latent schema lists them all; its cross-field rule refuses the stage variants (test_architectures.py)
    assert config_check.LATENT_FIELDS["time_conditioning"][1:] == VARIANTS + STAGE_VARIANTS
    assert config_check.IMAGE_FIELDS["time_conditioning"][1:] == VARIANTS + STAGE_VARIANTS


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts (meta device: no memory)
# ---------------------------------------------------------------------------------------------------------------

PINNED_COUNTS = {
    "DiffiT-XL/2": {"tmsa": 561_330_144, "adaln": 675_129_632, "adaln-relpos": 675_560_160,
                    "bias": 946_155_424, "mlp": 486_947_808, "decoupled": 524_138_976},
    "DiffiT-Tiny/2": {"tmsa": 150_116, "adaln": 183_200, "adaln-relpos": 183_396,
                      "bias": 137_896, "mlp": 133_476, "decoupled": 141_796},
    "DiffiT-CIFAR10": {"tmsa": 16_836_011, "adaln": 19_985_923, "adaln-relpos": 19_987_883,
                       "bias": 14_689_619, "mlp": 14_734_763, "decoupled": 15_785_387},
    "DiffiT-FFHQ64": {"tmsa": 25_212_979, "adaln": 29_536_003, "adaln-relpos": 29_546_803,
                      "bias": 26_419_555, "mlp": 22_323_763, "decoupled": 23_768_371},
    "DiffiT-UNet-Tiny": {"tmsa": 286_057, "adaln": 335_299, "adaln-relpos": 335_593,
                         "bias": 274_447, "mlp": 253_033, "decoupled": 269_545},
}  # fmt: skip


def meta_model(name: str, **overrides) -> nn.Module:
    with torch.device("meta"):
        return create_model(name, **overrides)


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_has_its_pinned_parameter_count(name, variant):
    model = meta_model(name, time_conditioning=variant)
    assert count_parameters(model) == PINNED_COUNTS[name][variant]
    assert implied_size(name, {"time_conditioning": variant})[0] == PINNED_COUNTS[name][variant]


def test_adaln_relpos_is_adaln_plus_the_relative_position_bias_tables_by_hand():
    # The one difference between the two adaLN forms: each attention keeps its [(2w - 1)^2, heads] table.
    # XL/2: 28 global 16x16 blocks with 16 heads; Tiny/2: 1 block of 4 heads over the 4x4 grid of 8 / 2.
    assert PINNED_COUNTS["DiffiT-XL/2"]["adaln-relpos"] - PINNED_COUNTS["DiffiT-XL/2"]["adaln"] == 28 * 31**2 * 16
    tiny = meta_model("DiffiT-Tiny/2", time_conditioning="adaln-relpos")
    depth, heads, grid = len(tiny.blocks), tiny.blocks[0].attn.num_heads, tiny.grid_size
    extra = PINNED_COUNTS["DiffiT-Tiny/2"]["adaln-relpos"] - PINNED_COUNTS["DiffiT-Tiny/2"]["adaln"]
    assert extra == depth * (2 * grid - 1) ** 2 * heads == 196
    plain = meta_model("DiffiT-Tiny/2", time_conditioning="adaln").blocks[0].attn
    assert plain.relative_position_bias is None and tiny.blocks[0].attn.relative_position_bias is not None


def test_dit_xl2_is_675_129_632_parameters_by_dits_own_arithmetic():
    # DiT-XL/2 at 256 px (facebookresearch/DiT models.py), written out: patch embed conv, fixed pos embed (a
    # parameter), TimestepEmbedder 256 -> h -> h, LabelEmbedder 1001 rows, 28 DiTBlocks (qkv + proj, MLP x4,
    # adaLN 6h), FinalLayer (linear to 2*2*8, adaLN 2h).
    h = 1152
    block = (h * 3 * h + 3 * h) + (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h) + (h * 6 * h + 6 * h)
    final = (h * 2 * 2 * 8 + 2 * 2 * 8) + (h * 2 * h + 2 * h)
    dit = (4 * 2 * 2 * h + h) + 256 * h + (256 * h + h + h * h + h) + 1001 * h + 28 * block + final
    assert dit == 675_129_632
    model = meta_model("DiffiT-XL/2", time_conditioning="adaln")
    assert count_parameters(model) == dit
    # DiT has no relative position bias, hence no index buffer either.
    assert sum(b.numel() for b in model.buffers()) == 0
    assert [n for n, _ in model.blocks[0].named_parameters()] == [
        "attn.qkv_spatial.weight", "attn.qkv_spatial.bias", "attn.proj.weight", "attn.proj.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
        "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
    ]  # fmt: skip


def test_xl2_variant_counts_differ_from_tmsa_by_their_time_projection_only():
    # Per block, TMSA's time term is Linear(1152, 3*1152); each variant swaps it for its own projection.
    h, depth, table = 1152, 28, 31**2 * 16
    tmsa_time = h * 3 * h + 3 * h
    expected = {
        "mlp": h * h + h,  # x_t -> MLP input
        "decoupled": h * 2 * h + 2 * h,  # x_t -> [k_t | v_t]
        "bias": h * table + table,  # x_t -> a (2*16-1)^2 x 16 bias table
    }
    for variant, time_projection in expected.items():
        delta = depth * (time_projection - tmsa_time)
        assert PINNED_COUNTS["DiffiT-XL/2"][variant] == 561_330_144 + delta


@pytest.mark.parametrize("window", [2, 4, 8])
def test_window_size_and_time_dim_are_study_axes_with_exact_counts(window):
    # Fig. 8 (window 2/4/8) and Table 3 (time-token width 256/512) on CIFAR-10: only the bias tables and the time
    # projections change with them. 6 encoder + 4 decoder blocks: widths 128 (2 + 2 blocks) and 256 (6 blocks).
    for time_dim in (256, 512):
        model = meta_model("DiffiT-CIFAR10", window_size=window, time_dim=time_dim)
        base = meta_model("DiffiT-CIFAR10")
        windows = [min(window, 32 // 2**s) for s in range(3)]
        tables = [(2 * w - 1) ** 2 * 4 for w in windows]
        delta_tables = 4 * (tables[0] - 49 * 4) + 4 * (tables[1] - 196) + 2 * (tables[2] - 196)
        # time MLP (128 -> t -> t) and per block Linear(t, 3 * width)
        time_mlp = (128 * time_dim + time_dim + time_dim * time_dim + time_dim) - (128 * 512 + 512 + 512 * 512 + 512)
        delta_time = time_mlp + (time_dim - 512) * (4 * 3 * 128 + 6 * 3 * 256)
        assert count_parameters(model) == count_parameters(base) + delta_tables + delta_time
        assert implied_size("DiffiT-CIFAR10", {"window_size": window, "time_dim": time_dim})[0] == count_parameters(
            model
        )


def test_latent_time_token_width_is_configurable():
    model = create_model("DiffiT-Tiny/2", time_dim=48)
    assert model.time_embed.mlp[2].out_features == 48 and model.label_embed.table.weight.shape == (11, 48)
    assert model.blocks[0].attn.qkv_time.in_features == 48
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 900.0]), torch.tensor([0, 3])
    assert model(x, t, y).shape == (2, 8, 8, 8)


# ---------------------------------------------------------------------------------------------------------------
# adaLN = DiT: DiT's published block and model, written out as the reference
# ---------------------------------------------------------------------------------------------------------------


def dit_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTAttention(nn.Module):
    """timm's `Attention(dim, num_heads, qkv_bias=True)` as DiT uses it, the softmax written out."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1) * (c // self.num_heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class DiTBlock(nn.Module):
    """DiT's DiTBlock (facebookresearch/DiT models.py): adaLN-Zero."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = DiTAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden_size)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(dit_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(dit_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


# DiT parameter name -> ours (the Mlp of timm is fc1/act/fc2; here a Sequential 0/1/2).
BLOCK_NAMES = {
    "attn.qkv": "attn.qkv_spatial",
    "attn.proj": "attn.proj",
    "mlp.0": "mlp.fc1",
    "mlp.2": "mlp.fc2",
    "adaLN_modulation.1": "adaLN_modulation.1",
}


def copy_dit_block(dit: DiTBlock, ours: DiffiTTransformerBlock) -> None:
    state = {}
    for name, tensor in dit.state_dict().items():
        module, _, kind = name.rpartition(".")
        state[f"{BLOCK_NAMES[module]}.{kind}"] = tensor
    ours.load_state_dict(state, strict=True)


def randomise_(module: nn.Module, std: float = 0.05) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)


def test_adaln_block_at_xl_size_equals_dits_published_block():
    torch.manual_seed(0)
    h, heads, tokens = 1152, 16, 256
    dit = DiTBlock(h, heads)
    randomise_(dit, 0.02)  # non-zero adaLN: a zero one would make both blocks the identity
    ours = DiffiTTransformerBlock(h, heads, 16, time_dim=h, time_conditioning="adaln")
    # Same names and shapes as the blocks of the XL/2 model that counts 675,129,632.
    xl_block = meta_model("DiffiT-XL/2", time_conditioning="adaln").blocks[0]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in xl_block.state_dict().items()}
    copy_dit_block(dit, ours)
    x, c = torch.randn(2, tokens, h), torch.randn(2, h)
    with torch.no_grad():
        expected, got = dit(x, c), ours(x, c)
    assert (expected - x).abs().max() > 0.1  # the block does something
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_adaln_zero_init_makes_every_block_the_identity_and_the_output_zero():
    torch.manual_seed(0)
    model = create_model("DiffiT-Tiny/2", time_conditioning="adaln")
    for block in model.blocks:
        assert not block.adaLN_modulation[1].weight.any() and not block.adaLN_modulation[1].bias.any()
    assert not model.final_layer.adaLN_modulation[1].weight.any()
    x, t = torch.randn(2, 16, 64), torch.randn(2, 64)
    assert torch.equal(model.blocks[0](x, t), x)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([1, 2]))
    assert torch.equal(out, torch.zeros_like(out))
    image = create_model("DiffiT-UNet-Tiny", time_conditioning="adaln")
    block = image.encoder[0].blocks[0]
    h = torch.randn(2, 32, 16, 16)
    x_hat = block.conv(block.act(block.norm(h)))
    # gate 0: the transformer block is the identity, so the ResBlock is x + Conv(Swish(GN(x)))
    assert torch.equal(block(h, torch.randn(2, 128)), h + x_hat)


class DiT(nn.Module):
    """DiT's model (facebookresearch/DiT models.py) at a tiny size: the reference for the whole adaln model."""

    def __init__(self, input_size, patch, in_channels, hidden, depth, heads, num_classes):
        super().__init__()
        self.patch, self.out_channels, self.grid = patch, 2 * in_channels, input_size // patch
        self.x_embedder = nn.Conv2d(in_channels, hidden, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, hidden), requires_grad=False)
        self.t_mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_table = nn.Embedding(num_classes + 1, hidden)
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads) for _ in range(depth))
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * self.out_channels)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, t, y):
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_mlp(timestep_embedding(t, 256)) + self.y_table(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        x = self.linear(dit_modulate(self.norm_final(x), shift, scale))
        n, g, p, ch = x.shape[0], self.grid, self.patch, self.out_channels
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(n, g, g, p, p, ch))
        return x.reshape(n, ch, g * p, g * p)


def test_adaln_model_equals_dit_end_to_end():
    torch.manual_seed(0)
    ours = create_model("DiffiT-Tiny/2", time_conditioning="adaln")
    dit = DiT(input_size=8, patch=2, in_channels=4, hidden=64, depth=2, heads=2, num_classes=10)
    randomise_(dit)
    dit.pos_embed.data.copy_(ours.pos_embed.data)  # both the fixed sin-cos embedding
    state = {
        "patch_embed.proj.weight": dit.x_embedder.weight,
        "patch_embed.proj.bias": dit.x_embedder.bias,
        "pos_embed": dit.pos_embed,
        "time_embed.mlp.0.weight": dit.t_mlp[0].weight,
        "time_embed.mlp.0.bias": dit.t_mlp[0].bias,
        "time_embed.mlp.2.weight": dit.t_mlp[2].weight,
        "time_embed.mlp.2.bias": dit.t_mlp[2].bias,
        "label_embed.table.weight": dit.y_table.weight,
        "final_layer.linear.weight": dit.linear.weight,
        "final_layer.linear.bias": dit.linear.bias,
        "final_layer.adaLN_modulation.1.weight": dit.final_adaLN[1].weight,
        "final_layer.adaLN_modulation.1.bias": dit.final_adaLN[1].bias,
    }
    for i, block in enumerate(dit.blocks):
        for name, tensor in block.state_dict().items():
            module, _, kind = name.rpartition(".")
            state[f"blocks.{i}.{BLOCK_NAMES[module]}.{kind}"] = tensor
    ours.load_state_dict(state, strict=True)
    assert count_parameters(ours) == count_parameters(dit)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0.0, 250.0, 999.0]), torch.tensor([0, 7, 10])
    with torch.no_grad():
        expected = dit(x, t, y)
        torch.testing.assert_close(ours(x, t, y), expected, rtol=1e-5, atol=1e-5)
    assert expected.abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------------------
# Each variant's block is the formula of its docstring (explicit references), and the time token acts where
# the variant says
# ---------------------------------------------------------------------------------------------------------------


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def explicit_attention(q, k, v, bias):
    """softmax(q k^T / sqrt(d) + bias) v, q/k/v [B, heads, N|M, d]."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return (scores + bias).softmax(-1) @ v


def explicit_bias_table(table, window):
    """[rows, heads] -> [heads, N, N] by explicit offsets (Swin): entry (i, j) reads row (dy + ws-1, dx + ws-1)."""
    n = window * window
    out = torch.empty(table.shape[1], n, n)
    for i in range(n):
        for j in range(n):
            dy, dx = i // window - j // window, i % window - j % window
            out[:, i, j] = table[(dy + window - 1) * (2 * window - 1) + dx + window - 1]
    return out


def block_reference(block: DiffiTTransformerBlock, x, time_token):
    """The block's forward written out per variant (no windows: one window per image)."""
    attn, heads, window = block.attn, block.attn.num_heads, block.attn.window_size
    variant = attn.time_conditioning
    b, n, dim = x.shape
    d = dim // heads

    def split(t):  # [B, N, dim] -> [B, heads, N, d]
        return t.reshape(b, -1, heads, d).transpose(1, 2)

    def attention(h):
        q, k, v = attn.qkv_spatial(h).chunk(3, dim=-1)
        if variant == "tmsa":
            tq, tk, tv = attn.qkv_time(time_token).chunk(3, dim=-1)  # Eq. 3-5: x_s W_s + x_t W_t
            q, k, v = q + tq[:, None], k + tk[:, None], v + tv[:, None]
        q, k, v = split(q), split(k), split(v)
        if variant == "adaln":
            bias = torch.zeros(heads, n, n)
        elif variant == "bias":
            tables = attn.relative_position_bias + attn.bias_time(time_token).reshape(b, -1, heads)
            bias = torch.stack([explicit_bias_table(tables[i], window) for i in range(b)])
        else:
            bias = explicit_bias_table(attn.relative_position_bias, window)
        if variant == "decoupled":
            k_t, v_t = attn.kv_time(time_token).chunk(2, dim=-1)
            k = torch.cat([k, split(k_t[:, None])], dim=2)
            v = torch.cat([v, split(v_t[:, None])], dim=2)
            bias = torch.cat([bias, torch.zeros(heads, n, 1)], dim=-1)
        out = explicit_attention(q, k, v, bias)
        return attn.proj(out.transpose(1, 2).reshape(b, n, dim))

    if variant in ("adaln", "adaln-relpos"):
        s1, c1, g1, s2, c2, g2 = block.adaLN_modulation(time_token).chunk(6, dim=-1)
        x = x + g1[:, None] * attention(layer_norm(x) * (1 + c1[:, None]) + s1[:, None])
        return x + g2[:, None] * block.mlp(layer_norm(x) * (1 + c2[:, None]) + s2[:, None])
    x = x + attention(layer_norm(x))
    mlp_input = layer_norm(x) + (block.mlp_time(time_token)[:, None] if variant == "mlp" else 0)
    return x + block.mlp(mlp_input)


def make_block(variant: str, seed: int = 0, dim: int = 32, time_dim: int = 24) -> DiffiTTransformerBlock:
    torch.manual_seed(seed)
    block = DiffiTTransformerBlock(dim, 4, 3, time_dim, mlp_ratio=2.0, time_conditioning=variant)
    randomise_(block, 0.2)
    return block


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_block_is_its_documented_formula(variant):
    block = make_block(variant)
    x, t = torch.randn(3, 9, 32), torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(block(x, t), block_reference(block, x, t), rtol=1e-5, atol=1e-5)


# The module through which each variant reads the time token (zeroing it makes the block time-independent).
TIME_MODULE = {
    "tmsa": "attn.qkv_time",
    "adaln": "adaLN_modulation.1",
    "adaln-relpos": "adaLN_modulation.1",
    "bias": "attn.bias_time",
    "mlp": "mlp_time",
    "decoupled": "attn.kv_time",
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_time_token_acts_only_through_the_variants_own_projection(variant):
    block = make_block(variant)
    x, t1, t2 = torch.randn(2, 9, 32), torch.randn(2, 24), torch.randn(2, 24)
    with torch.no_grad():
        # bias / mlp (Table 6 F, G) and tmsa (through q/k/v) all change the output when only x_t changes
        assert (block(x, t1) - block(x, t2)).abs().max() > 1e-2
        # the time token reaches nothing else: with the variant's projection zeroed, x_t no longer matters
        nn.init.zeros_(block.get_submodule(TIME_MODULE[variant]).weight)
        torch.testing.assert_close(block(x, t1), block(x, t2), rtol=0, atol=0)
    # and no other module of the block reads it
    others = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and m.in_features == 24]
    assert others == [TIME_MODULE[variant]]


def test_bias_variant_changes_only_the_attention_bias():
    # Table 6 F: q, k, v are time-free; the attention output equals Eq. 6 with B + B(x_t).
    block = make_block("bias")
    attn = block.attn
    x, t = torch.randn(2, 9, 32), torch.randn(2, 24)
    with torch.no_grad():
        q, k, v = attn.qkv_spatial(x).reshape(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
        tables = attn.relative_position_bias + attn.bias_time(t).reshape(2, 25, 4)
        index = relative_position_index(3)
        bias = tables[:, index].permute(0, 3, 1, 2)  # [B, heads, N, N]
        expected = attn.proj(explicit_attention(q, k, v, bias).transpose(1, 2).reshape(2, 9, 32))
        torch.testing.assert_close(attn(x, t), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_repeat_the_time_token_over_each_images_windows(variant):
    # Two images of 2x2 windows: the windowed block equals the block run on each image's windows alone.
    block = make_block(variant)
    feature_map = torch.randn(2, 6, 6, 32)
    windows = window_partition(feature_map, 3)  # [2 * 4, 9, 32]
    t = torch.randn(2, 24)
    with torch.no_grad():
        together = block(windows, t)
        apart = torch.cat([block(windows[4 * i : 4 * i + 4], t[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[:4], together[4:8], atol=1e-3)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("variant", ["adaln", "bias", "decoupled"])
def test_new_attention_shapes_run_on_every_cpu_backend(variant):
    # No bias (adaln), a per-image bias (bias), one extra key (decoupled): sdpa and math give the same output,
    # and FlexAttention's unfused forward (CPU) too.
    from diffit.layers import flex_attention_with_bias

    block = make_block(variant)
    x, t = torch.randn(2, 9, 32), torch.randn(2, 24)
    with torch.no_grad():
        outputs = {}
        for backend in ("sdpa", "math"):
            set_attention_backend(block, backend)
            outputs[backend] = block(x, t)
        torch.testing.assert_close(outputs["sdpa"], outputs["math"], rtol=1e-5, atol=1e-5)
        keys = 10 if variant == "decoupled" else 9
        q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 4, keys, 8), torch.randn(2, 4, keys, 8)
        biases = {"adaln": None, "bias": torch.randn(2, 4, 9, 9), "decoupled": torch.randn(4, 9, 10)}
        bias = biases[variant]
        flex = flex_attention_with_bias(q, k, v, bias, compiled=False)
        torch.testing.assert_close(flex, attention_with_bias(q, k, v, bias, "math"), rtol=1e-5, atol=1e-5)


def test_a_time_dependent_variant_refuses_a_missing_time_token():
    for variant in ("tmsa", "bias", "decoupled"):
        with pytest.raises(ValueError, match="pass the time token"):
            make_block(variant).attn(torch.randn(1, 9, 32), None)
    with pytest.raises(ValueError, match="unknown time_conditioning 'film'"):
        DiffiTTransformerBlock(32, 4, 3, 24, time_conditioning="film")
    for name, overrides in [("DiffiT-Tiny/2", {}), ("DiffiT-UNet-Tiny", {"blocks_per_stage": [0, 0]})]:
        with pytest.raises(ValueError, match="unknown time_conditioning 'FiLM'"):
            create_model(name, time_conditioning="FiLM", **overrides)


# ---------------------------------------------------------------------------------------------------------------
# Every variant in both model families: shapes, gradients, save / load, the pipeline
# ---------------------------------------------------------------------------------------------------------------


def tiny(family: str, variant: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if family == "latent":
        model = create_model("DiffiT-Tiny/2", time_conditioning=variant)
        nn.init.normal_(model.final_layer.linear.weight, std=0.1)  # zero init would block upstream gradients
    else:
        model = create_model("DiffiT-UNet-Tiny", num_classes=3, time_conditioning=variant)
        nn.init.normal_(model.head.conv.weight, std=0.1)
    for module in model.modules():  # adaLN-Zero likewise (gates 0 -> no gradient to the attention / MLP)
        if getattr(module, "adaLN_modulation", None) is not None:
            nn.init.normal_(module.adaLN_modulation[1].weight, std=0.1)
    return model


def inputs(model):
    torch.manual_seed(1)
    x = torch.randn(2, model.in_channels, model.input_size, model.input_size)
    return x, torch.tensor([0.3, 2.0]), torch.tensor([1, model.null_class])


@pytest.mark.parametrize("family", ["latent", "image"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_keeps_the_shape_contract_and_trains_every_parameter(family, variant):
    model = tiny(family, variant)
    x, t, y = inputs(model)
    out = model(x, t, y)
    channels = 2 * model.in_channels if family == "latent" else model.in_channels
    assert out.shape == (2, channels, model.input_size, model.input_size)
    out.square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None or not p.grad.any()] == []
    # The output depends on the noise label (through the variant's time path).
    with torch.no_grad():
        assert (model(x, t, y) - model(x, t + 1.0, y)).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["latent", "image"])
@pytest.mark.parametrize("variant", ["adaln", "adaln-relpos", "bias", "mlp", "decoupled"])
def test_every_variant_saves_and_loads_like_any_model(tmp_path, family, variant):
    model = tiny(family, variant).eval()
    diffit.save_pretrained(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model"]["kwargs"]["time_conditioning"] == variant
    check_model_config(config, tmp_path / "m" / "config.json")
    loaded, _ = diffit.load_pretrained(tmp_path / "m")
    assert loaded.time_conditioning == variant
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and all(torch.equal(state[k], loaded_state[k]) for k in state)
    x, t, y = inputs(model)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_default_exports_do_not_gain_the_new_keys(tmp_path):
    # Existing exports stay byte-for-byte what they were: the defaults are not written into config.json.
    diffit.save_pretrained(create_model("DiffiT-Tiny/2"), tmp_path / "m")
    kwargs = json.loads((tmp_path / "m" / "config.json").read_text())["model"]["kwargs"]
    assert "time_conditioning" not in kwargs and "time_dim" not in kwargs


def test_an_image_variant_export_loads_and_samples_in_diffit_pipeline(tmp_path):
    from diffit import DiffiTPipeline

    torch.manual_seed(0)
    model = create_model("DiffiT-UNet-Tiny", time_conditioning="bias")
    nn.init.normal_(model.head.conv.weight, std=0.1)
    diffit.save_pretrained(model, tmp_path / "m", {"diffusion": {"type": "edm", "sigma_data": 0.5}})
    pipe = DiffiTPipeline.from_pretrained(tmp_path / "m")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.time_conditioning == "bias"
    images = pipe(batch_size=2, num_inference_steps=2, seeds=[5, 6], output_type="latent").images
    expected = diffit.sampling.sample(pipe.transformer, (3, 16, 16), None, [5, 6], pipe.sampling_config, steps=2)
    assert torch.equal(images, expected)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        (
            {"time_conditioning": "film"},
            "model.kwargs.time_conditioning must be one of ['tmsa', 'adaln', 'adaln-relpos', 'bias'",
        ),
        ({"time_conditioning": None}, "model.kwargs.time_conditioning must be one of"),
        ({"time_dim": 0}, "model.kwargs.time_dim must be in [1, 65536], got 0"),
        ({"time_dim": 8.0}, "model.kwargs.time_dim must be an integer, got 8.0"),
    ],
)
def test_schema_refuses_bad_variant_values(kwargs, problem):
    for name in ("DiffiT-Tiny/2", "DiffiT-UNet-Tiny"):
        with pytest.raises(InvalidModelFileError) as caught:
            check_model_config({"model": {"name": name, "kwargs": kwargs}}, "m/config.json")
        assert problem in str(caught.value)
