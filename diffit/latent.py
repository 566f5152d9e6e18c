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
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from .hub import DiffiTModelHubMixin
from .layers import DiffiTTransformerBlock, LabelEmbedder, TimestepEmbedder, get_2d_sincos_pos_embed


class PatchEmbed(nn.Module):
    """[N, C, H, W] -> [N, (H/p)*(W/p), hidden] with a stride-p convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FinalLayer(nn.Module):
    """LayerNorm -> SiLU -> Linear to p*p*out_channels values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.act = nn.SiLU()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.act(self.norm(x)))


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

        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        # A parameter (not a buffer) so that checkpoints and parameter counts match DiT / the released DiffiT;
        # it is fixed (requires_grad=False), so optimizers and DDP never see it.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, hidden_size), requires_grad=False)
        self.time_embed = TimestepEmbedder(hidden_size, embedding=time_embedding)
        self.label_embed = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        # The relative position bias spans the whole token grid: attention is global in the latent model.
        self.blocks = nn.ModuleList(
            DiffiTTransformerBlock(hidden_size, num_heads, self.grid_size, time_dim=hidden_size, mlp_ratio=mlp_ratio)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
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
        that the untrained model predicts epsilon = 0 and Sigma at the midpoint of its learned range."""

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
            nn.init.trunc_normal_(block.attn.relative_position_bias, std=0.02)
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
        return self.unpatchify(self.final_layer(tokens))
