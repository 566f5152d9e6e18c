"""Latent DiffiT: a vision transformer that denoises Stable-Diffusion VAE latents (paper Sec. 3.2.1, Fig. 3).

Patch embedding + fixed 2-D sin-cos position embedding, a stack of DiffiT transformer blocks whose attention
is TMSA (time token = timestep embedding + class embedding), and a final LayerNorm -> SiLU -> Linear that is
unpatchified to 2*C channels (epsilon and the learned-range Sigma interpolation of improved DDPM / ADM).

Unlike DiT there is no adaLN modulation: the time token enters only through the q/k/v projections of TMSA,
which is where DiffiT saves its parameters (XL/2: 561M vs DiT-XL/2's 675M).

What the paper leaves open is settled by the released NVlabs/DiffiT model: attention is global (the relative
position bias spans the whole token grid), LayerNorms have no affine parameters, the time MLP has a 256-dim
sinusoidal input, the label table has a null row for classifier-free guidance, and XL/2 has depth 28 (the
supplementary text says 30; 28 is what gives the 561M of Table 9).

Variants (constructor arguments, saved in config.json like any other): `time_conditioning` (see
`diffit.layers.DiffiTTransformerBlock`: "tmsa" default, "adaln", "bias", "mlp", "decoupled"), `time_embedding`
("positional" / "fourier", Table 8) and `time_dim` (width of the time token, Table 3; default hidden_size).
With `time_conditioning="adaln"` the blocks are DiT's adaLN-Zero blocks and the final layer is DiT's (LN ->
adaLN shift/scale from the time token -> Linear, zero-initialised): DiT's block and final layer in this model's
shell, whose patch embedding, fixed sin-cos position embedding, 256 -> hidden -> hidden time MLP and 1001-row
label table are already DiT's. `create_model("DiffiT-XL/2", time_conditioning="adaln")` is therefore DiT-XL/2,
675,129,632 parameters at 256 px, exactly the public DiT-XL/2's.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from .conditionings import STAGE_CONDITIONINGS
from .hub import DiffiTModelHubMixin
from .layers import (
    ADALN_CONDITIONINGS,
    TIME_CONDITIONINGS,
    DiffiTTransformerBlock,
    LabelEmbedder,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    modulate,
)


class PatchEmbed(nn.Module):
    """[N, C, H, W] -> [N, (H/p)*(W/p), hidden] with a stride-p convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FinalLayer(nn.Module):
    """LayerNorm -> SiLU -> Linear to p*p*out_channels values per token (the released DiffiT).

    With `adaln_time_dim` it is DiT's final layer instead: LayerNorm -> modulate(shift, scale) with
    (shift, scale) = Linear(SiLU(x_t)) -> Linear, no SiLU on the tokens."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaln_time_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.act = nn.SiLU()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        adaln = adaln_time_dim is not None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_time_dim, 2 * hidden_size)) if adaln else None

    def forward(self, x: torch.Tensor, time_token: torch.Tensor | None = None) -> torch.Tensor:
        if self.adaLN_modulation is None:
            return self.linear(self.act(self.norm(x)))
        shift, scale = self.adaLN_modulation(time_token).to(x.dtype).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class LatentDiffiT(nn.Module, DiffiTModelHubMixin):
    """Class-conditional (or unconditional, `num_classes=0`) latent DiffiT.

    forward(x [N, C, H, W], noise_labels [N] (ADM timestep t), class_labels [N] | None) -> [N, 2C or C, H, W].
    Class label `num_classes` is the null class used for the unconditional branch of classifier-free guidance.
    `save_pretrained` / `from_pretrained` / `push_to_hub`: see `diffit.hub`.
    """

    diffit_family = "latent"

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        time_embedding: str = "positional",
        time_conditioning: str = "tmsa",
        time_dim: int | None = None,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes = num_classes
        self.grid_size = input_size // patch_size
        if time_conditioning not in TIME_CONDITIONINGS:  # also where no block would check it (no blocks)
            raise ValueError(f"unknown time_conditioning {time_conditioning!r}; expected one of {TIME_CONDITIONINGS}")
        if time_conditioning in STAGE_CONDITIONINGS:
            raise ValueError(
                f"time_conditioning {time_conditioning!r} adds the time at the start of each stage of the DiffiT "
                "U-Net; the latent DiffiT has no stages (use 'tmsa' or another block conditioning)"
            )
        self.time_conditioning = time_conditioning
        time_dim = hidden_size if time_dim is None else time_dim

        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        # A parameter (not a buffer) so that checkpoints and parameter counts match DiT / the released DiffiT;
        # it is fixed (requires_grad=False), so optimizers and DDP never see it.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, hidden_size), requires_grad=False)
        self.time_embed = TimestepEmbedder(time_dim, embedding=time_embedding)
        self.label_embed = LabelEmbedder(num_classes, time_dim) if num_classes > 0 else None
        # The relative position bias spans the whole token grid: attention is global in the latent model.
        self.blocks = nn.ModuleList(
            DiffiTTransformerBlock(hidden_size, num_heads, self.grid_size, time_dim, mlp_ratio, time_conditioning)
            for _ in range(depth)
        )
        adaln_time_dim = time_dim if time_conditioning in ADALN_CONDITIONINGS else None
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaln_time_dim)
        # Recompute block activations in the backward pass (trades ~30% compute for memory; XL/2 at large
        # per-GPU batches). Set by the trainer.
        self.gradient_checkpointing = False
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears with zero bias (stable start for deep pre-norm stacks),
        N(0, 0.02) embeddings, the patch projection initialised like a linear layer, and a zero final layer so
        that the untrained model predicts epsilon = 0 and Sigma at the midpoint of its learned range. With
        `time_conditioning="adaln"` / `"adaln-relpos"`, DiT's adaLN-Zero: every adaLN modulation (blocks and final
        layer) is zero, so each block starts as the identity."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size).unsqueeze(0))
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.table.weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        # Re-draw the relative position bias after the blanket init above (it is not a Linear, so untouched).
        for block in self.blocks:
            if block.attn.relative_position_bias is not None:
                nn.init.trunc_normal_(block.attn.relative_position_bias, std=0.02)
        for modulation in [b.adaLN_modulation for b in self.blocks] + [self.final_layer.adaLN_modulation]:
            if modulation is not None:
                nn.init.zeros_(modulation[-1].weight)
                nn.init.zeros_(modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, T, p*p*C] -> [N, C, H, W]."""
        n, p, c, g = tokens.shape[0], self.patch_size, self.out_channels, self.grid_size
        x = tokens.reshape(n, g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, c, g * p, g * p)

    def time_token(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        """x_t of the paper: timestep embedding plus (for conditional models) the class embedding."""
        token = self.time_embed(noise_labels)
        if self.label_embed is not None:
            if class_labels is None:
                raise ValueError("class-conditional model: pass class_labels (use null_class for unconditional)")
            token = token + self.label_embed(class_labels)
        elif class_labels is not None:
            raise ValueError("this model is unconditional (num_classes=0) but class_labels were given")
        return token

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size) or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input [N, {self.in_channels}, {self.input_size}, {self.input_size}], got {list(x.shape)}"
            )
        noise_labels = noise_labels.reshape(-1).expand(x.shape[0]) if noise_labels.numel() == 1 else noise_labels
        tokens = self.patch_embed(x) + self.pos_embed.to(x.dtype)
        time_token = self.time_token(noise_labels, class_labels)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, time_token, use_reentrant=False)
            else:
                tokens = block(tokens, time_token)
        return self.unpatchify(self.final_layer(tokens, time_token))
