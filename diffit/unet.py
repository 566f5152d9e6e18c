"""Image-space DiffiT: a U-shaped denoiser built from DiffiT ResBlocks (paper Sec. 3.2.2, Fig. 4, supp. H.1, I.1).

Layout (K stages, stage i at resolution img_resolution / 2^i with `channels[i]` feature maps):

    input conv 3x3 (in_channels -> channels[0])                       "tokenizer" of Table S.2
    encoder stage 0:   blocks_per_stage[0] x DiffiT ResBlock
    encoder stage i>0: stride-2 conv 3x3 (channels[i-1] -> channels[i]), blocks_per_stage[i] x ResBlock
    decoder stage i = K-2 .. 0:
        nearest x2 + conv 3x3 (channels[i+1] -> channels[i+1])          "upsampler" of Table S.3
        concat(skip of encoder stage i) -> conv 3x3 (-> channels[i])     matches the number of feature maps
        blocks_per_stage[i] x DiffiT ResBlock
    head: GroupNorm -> Swish -> conv 3x3 (channels[0] -> in_channels), zero-initialised

The decoder mirrors Table S.3: it starts with an upsampler, so the ResBlocks of the deepest encoder stage are
the bottleneck and every shallower resolution has a skip connection and its own decoder stage.

DiffiT ResBlock (Eq. 9-10): x_hat = Conv3x3(Swish(GN(x))); x = DiffiT-Block(x_hat, x_t) + x, where DiffiT-Block
(Eq. 7-8, `diffit.layers.DiffiTTransformerBlock`) runs TMSA on local non-overlapping windows ("Local Attention"
of Sec. 3.2.2). The time token x_t = MLP(sinusoidal(noise_labels)) (+ class embedding) reaches every block.

Block counts: supplementary Sec. H lists L = 4 ResBlocks per stage, but Sec. I.1 states the trained
configurations (CIFAR-10: 3 stages x 2 blocks, window 4; FFHQ-64: 4 stages with 1, 2, 2, 2 blocks, window 8;
channels 128 then a constant 256). Sec. I is the default in `diffit.models` (`DiffiT-CIFAR10`, `DiffiT-FFHQ64`);
pass `blocks_per_stage=[4, 4, 4]` for the Sec. H variant.

Noise labels follow EDM: the network is called inside `EDMPrecond` with c_noise = ln(sigma) / 4.

Variants for the paper's ablations (constructor arguments, saved in config.json): `time_conditioning` (every
ResBlock's transformer; see `diffit.layers.DiffiTTransformerBlock`: "tmsa", "adaln", "bias" = Table 6 F,
"mlp" = Table 6 G, "decoupled" = Table 7), `time_embedding` (Table 8), `window_size` (Fig. 8) and `time_dim`
(the time-token width of Table 3). With "adaln" only the transformer blocks change (DiT's adaLN-Zero block,
modulation zero-initialised); the U-Net keeps its own output head, DiT has no counterpart of it.

Table 4's encoder / decoder designs (configs A-E) are constructor arguments of this one class, so that C, D and E
differ by flags only (`diffit.unet_layout` holds the layouts, as data shared with `diffit.model_size` and
`diffit.config_check`):

    A  encoder="vit", decoder="setr-mla", time_conditioning="added-per-stage"     ViT encoder + SETR-MLA
    B  decoder="setr-mla", time_conditioning="added-per-stage"                    multi-resolution + SETR-MLA
    C  time_conditioning="added-per-stage"                                        multi-resolution U, both sides
    D  decoder_time_conditioning="added-per-stage"                                DiffiT (TMSA) encoder only
    E  the defaults                                                               DiffiT, unchanged

"added-per-stage" is our reading of the paper's "the projected temporal component is adaptively scaled and simply
added to the spatial component in each stage": the blocks attend without the time token (TMSA minus its time term;
the windows and the relative position bias stay, so C -> D changes only where the time enters), and at the start of
each stage -- after its downsampler, or the decoder's skip-fusion conv -- a FiLM (`StageTimeFiLM`):
(scale, shift) = Linear(x_t).chunk(2), h <- h * (1 + scale) + shift per channel, the Linear zero-initialised so
each stage starts as the identity. The defaults build exactly the model above (same state-dict keys, shapes and
initial values under one seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .hub import DiffiTModelHubMixin
from .layers import (
    TIME_CONDITIONINGS,
    DiffiTTransformerBlock,
    LabelEmbedder,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    window_partition,
    window_reverse,
)
from .unet_layout import Level, decoder_conditioning, encoder_levels, is_stage_conditioning, layout_problem


def group_count(channels: int, num_groups: int = 32, min_channels_per_group: int = 4) -> int:
    """Number of GroupNorm groups for `channels` feature maps: at most `num_groups`, at least
    `min_channels_per_group` channels per group (EDM's rule, so that tiny test models do not degrade to
    per-channel instance norm), and a divisor of `channels` (GroupNorm requires it)."""
    groups = max(1, min(num_groups, channels // min_channels_per_group))
    while channels % groups:
        groups -= 1
    return groups


def normalization(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with eps 1e-6 (DDPM / ADM)."""
    return nn.GroupNorm(group_count(channels, num_groups), channels, eps=1e-6)


class DiffiTResBlock(nn.Module):
    """DiffiT residual cell (paper Eq. 9-10) with the transformer block on local windows.

    x_hat = Conv3x3(Swish(GN(x))); x = DiffiT-Block(x_hat, x_t) + x. The DiffiT-Block attends within
    non-overlapping `window_size` x `window_size` windows (`window_partition` / `window_reverse`); the caller
    passes the effective window (the whole map when the map is smaller than the configured window).
    `dropout` (default 0, i.e. exactly Eq. 10) drops elements of the residual branch before the addition.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        window_size: int,
        time_dim: int,
        mlp_ratio: float = 4.0,
        num_groups: int = 32,
        dropout: float = 0.0,
        time_conditioning: str = "tmsa",
    ):
        super().__init__()
        self.window_size = window_size
        self.norm = normalization(channels, num_groups)
        self.act = nn.SiLU()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.transformer = DiffiTTransformerBlock(
            channels, num_heads, window_size, time_dim, mlp_ratio, time_conditioning
        )
        self.dropout = nn.Dropout(dropout)

    def windowed_transformer(self, x_hat: torch.Tensor, time_token: torch.Tensor) -> torch.Tensor:
        """Apply the DiffiT transformer block to each window of `x_hat` [N, C, H, W] independently."""
        batch, channels, height, width = x_hat.shape
        windows = window_partition(x_hat.permute(0, 2, 3, 1), self.window_size)  # [N * nW, ws^2, C]
        windows = self.transformer(windows, time_token)  # TMSA repeats x_t over the nW windows of each image
        return window_reverse(windows, self.window_size, height, width).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, time_token: torch.Tensor) -> torch.Tensor:
        x_hat = self.conv(self.act(self.norm(x)))
        return x + self.dropout(self.windowed_transformer(x_hat, time_token))


class ViTBlock(nn.Module):
    """ViT encoder block (Table 4 A): the DiffiT transformer block over the whole token grid (global attention,
    one window), on a feature map [N, C, H, W] read as H * W tokens, so that the stage machinery (FiLM, levels,
    SETR-MLA, REPA's map taps) is the multi-resolution encoder's. No conv and no residual dropout: ViT's block is
    the transformer block alone."""

    def __init__(
        self, channels: int, num_heads: int, grid: int, time_dim: int, mlp_ratio: float, time_conditioning: str
    ):
        super().__init__()
        self.window_size = grid  # global attention: the window is the grid (as `DiffiTResBlock.window_size`)
        self.transformer = DiffiTTransformerBlock(channels, num_heads, grid, time_dim, mlp_ratio, time_conditioning)

    def forward(self, x: torch.Tensor, time_token: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.transformer(x.flatten(2).transpose(1, 2), time_token)
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


class StageTimeFiLM(nn.Module):
    """Time conditioning "added-per-stage": h <- h * (1 + scale) + shift per channel, (scale, shift) =
    Linear(x_t).chunk(2). Our reading of Table 4's "the projected temporal component is adaptively scaled and
    simply added to the spatial component in each stage" (the paper gives no formula): "projected" is the Linear,
    "adaptively scaled" the time-dependent scale, "added" the shift. Zero-initialised by the owning model, so a
    stage starts as the identity (as adaLN-Zero)."""

    def __init__(self, time_dim: int, channels: int):
        super().__init__()
        self.linear = nn.Linear(time_dim, 2 * channels)

    def forward(self, h: torch.Tensor, time_token: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(time_token).to(h.dtype)[:, :, None, None].chunk(2, dim=1)
        return h * (1 + scale) + shift


class Downsample(nn.Module):
    """Stride-2 3x3 convolution (DDPM / ADM "conv resample"); also changes the width to the next stage's."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution. Chosen over a transposed convolution because its
    kernel overlap is uniform, so it does not produce checkerboard artefacts (Odena et al. 2016; DDPM/ADM)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EncoderStage(nn.Module):
    """Optional downsampler, the stage's time FiLM ("added-per-stage" only), then blocks at one resolution."""

    def __init__(self, downsample: nn.Module | None, blocks: list[nn.Module], time_film: StageTimeFiLM | None = None):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)
        self.time_film = time_film


class DecoderStage(nn.Module):
    """Upsampler, skip concatenation + 3x3 conv to this stage's width, then ResBlocks at one resolution.

    The skip is concatenated rather than added: the upsampled path has channels[i+1] maps and the skip
    channels[i] (256 vs 128 at full resolution), so addition would need a projection anyway, and the fusion
    conv -- the paper's "convolutional layer at the beginning of each path to match the number of feature
    maps" -- learns how to weigh the two instead of fixing their sum."""

    def __init__(
        self, upsample: Upsample, fuse: nn.Conv2d, blocks: list[DiffiTResBlock], time_film: StageTimeFiLM | None = None
    ):
        super().__init__()
        self.upsample = upsample
        self.fuse = fuse
        self.blocks = nn.ModuleList(blocks)
        self.time_film = time_film  # "added-per-stage": after the fusion conv


class OutputHead(nn.Module):
    """GroupNorm -> Swish -> Conv3x3 back to image channels."""

    def __init__(self, channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.norm = normalization(channels, num_groups)
        self.act = nn.SiLU()
        self.conv = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.norm(x)))


def resize(x: torch.Tensor, side: int) -> torch.Tensor:
    """Bilinear resize of a feature map to side x side (no-op at that size already)."""
    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)


class MlaStream(nn.Module):
    """One SETR-MLA stream: two 3x3 convs (M -> M, M -> M/2), each followed by GroupNorm + Swish (SETR's
    conv-BN-ReLU `ConvModule`s, with this model's norm and activation)."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.norm1 = normalization(channels, num_groups)
        self.conv2 = nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1)
        self.norm2 = normalization(channels // 2, num_groups)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm2(self.conv2(self.act(self.norm1(self.conv1(x))))))


class SetrMlaDecoder(nn.Module):
    """SETR's Multi-Level feature Aggregation decoder (Zheng et al. 2021, Fig. 1c; Table 4 A, B).

    From the encoder's K level outputs f_0 .. f_{K-1} (full resolution first): r_i = Conv1x1(f_i) to M channels;
    top-down aggregation from the deepest level, a_{K-1} = r_{K-1}, a_i = r_i + resize(a_{i+1}) to level i's size
    (bilinear; SETR's ViT levels all have one size, the multi-resolution encoder's halve); each a_i through its
    `MlaStream` (M -> M/2), bilinearly upsampled to the image resolution; the K streams concatenated and a 3x3 conv
    to the image channels (`head`, zero-initialised by the model like the U decoder's output conv). No skip
    connections and no transformer blocks: the time enters the encoder only.
    """

    def __init__(
        self, level_channels: list[int], mla_channels: int, out_channels: int, img_resolution: int, num_groups: int
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.reduce = nn.ModuleList(nn.Conv2d(width, mla_channels, kernel_size=1) for width in level_channels)
        self.streams = nn.ModuleList(MlaStream(mla_channels, num_groups) for _ in level_channels)
        self.head = nn.Conv2d(len(level_channels) * (mla_channels // 2), out_channels, kernel_size=3, padding=1)

    def aggregate(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """[a_0, .., a_{K-1}]: the 1x1-reduced levels summed top-down (from the deepest)."""
        reduced = [conv(level) for conv, level in zip(self.reduce, levels)]
        aggregated = [reduced[-1]]
        for r in reversed(reduced[:-1]):
            aggregated.insert(0, r + resize(aggregated[0], r.shape[-1]))
        return aggregated

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        streams = [resize(stream(a), self.img_resolution) for stream, a in zip(self.streams, self.aggregate(levels))]
        return self.head(torch.cat(streams, dim=1))


@dataclass(frozen=True)
class BlockSite:
    """A block of the U-Net in forward order: its module path and module, its width, the side of its feature map,
    its attention window and how many pixels one position of its map covers (`DiffiTUNet.block_sites`)."""

    name: str
    block: nn.Module
    width: int
    side: int
    window: int
    stride: int


class DiffiTUNet(nn.Module, DiffiTModelHubMixin):
    """Image-space DiffiT U-Net (unconditional when `num_classes == 0`); Hub methods: see `diffit.hub`.

    forward(x [N, C, H, W], noise_labels [N] (EDM c_noise = ln(sigma)/4), class_labels [N] long | None)
    -> [N, C, H, W]. For conditional models the class embedding is added to the time token; label
    `num_classes` (= `null_class`) is the null class of classifier-free guidance (label dropout is done by the
    trainer).

    Arguments: `channels[i]` / `blocks_per_stage[i]` are the width / ResBlock count of stage i (resolution
    halves between stages); `window_size` is the TMSA window at every stage, or the whole feature map where the
    map is smaller than the window; `time_dim` is the width of the time token (default 4 * channels[0], the
    DDPM / DDPM++ convention); `time_embedding` is "positional" (paper Sec. 3.2) or "fourier" (Table 8);
    `num_groups` caps the GroupNorm groups (see `group_count`); `dropout` is residual-branch dropout;
    `time_conditioning` is where the time token enters each transformer block ("tmsa", the paper's; the
    ablations "adaln", "bias", "mlp", "decoupled", and "added-per-stage": see `diffit.layers.DiffiTTransformerBlock`
    and `StageTimeFiLM`).

    Table 4's designs (module docstring; `diffit.unet_layout`): `decoder_time_conditioning` is the U decoder's
    (None: `time_conditioning`); `encoder` "multi-resolution" | "vit" (then `channels=[width]`,
    `blocks_per_stage=[depth]`, `patch_size`, global attention; `window_size` is unused); `decoder`
    "multi-resolution" | "setr-mla" (`SetrMlaDecoder`, `mla_channels` M per stream, default `channels[0]`).
    """

    diffit_family = "image"

    def __init__(
        self,
        img_resolution: int = 32,
        in_channels: int = 3,
        channels: list[int] | tuple[int, ...] = (128, 256, 256),
        blocks_per_stage: list[int] | tuple[int, ...] = (2, 2, 2),
        window_size: int = 4,
        num_heads: int = 4,
        num_classes: int = 0,
        mlp_ratio: float = 4.0,
        time_embedding: str = "positional",
        time_dim: int | None = None,
        num_groups: int = 32,
        dropout: float = 0.0,
        time_conditioning: str = "tmsa",
        augment_dim: int = 0,
        decoder_time_conditioning: str | None = None,
        encoder: str = "multi-resolution",
        decoder: str = "multi-resolution",
        patch_size: int = 2,
        mla_channels: int | None = None,
    ):
        super().__init__()
        channels, blocks_per_stage = list(channels), list(blocks_per_stage)
        self._check_config(img_resolution, channels, blocks_per_stage, window_size, num_heads, num_classes, encoder)
        problem = layout_problem(
            img_resolution,
            channels,
            blocks_per_stage,
            encoder=encoder,
            decoder=decoder,
            patch_size=patch_size,
            decoder_time_conditioning=decoder_time_conditioning,
            mla_channels=mla_channels,
        )
        if problem:
            raise ValueError(problem)
        self.levels: list[Level] = encoder_levels(
            img_resolution, channels, blocks_per_stage, window_size, encoder, patch_size
        )
        self.img_resolution = img_resolution
        self.input_size = img_resolution
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.learn_sigma = False
        self.channels = channels
        self.stage_windows = [level.window for level in self.levels]
        self.time_dim = time_dim if time_dim is not None else 4 * channels[0]
        if time_conditioning not in TIME_CONDITIONINGS:  # also where no block would check it (no blocks)
            raise ValueError(f"unknown time_conditioning {time_conditioning!r}; expected one of {TIME_CONDITIONINGS}")
        self.time_conditioning = time_conditioning
        self.decoder_time_conditioning = decoder_conditioning(time_conditioning, decoder_time_conditioning)
        self.encoder_type, self.decoder_type = encoder, decoder

        # Sinusoid width = channels[0] and token width = 4 * channels[0], as DDPM++ in EDM (noise_channels =
        # model_channels, emb_channels = 4 * model_channels).
        self.time_embed = TimestepEmbedder(self.time_dim, frequency_size=channels[0], embedding=time_embedding)
        self.label_embed = LabelEmbedder(num_classes, self.time_dim) if num_classes > 0 else None
        # EDM's non-leaky augmentation (`diffit.augment.AugmentPipe`, the paper's "data augmentation strategies of
        # EDM"): the network is told which augmentation it sees, so that sampling (no labels) draws clean images.
        # As EDM's SongUNet `map_augment` (Linear without bias), added where this model adds its class embedding.
        if augment_dim < 0:
            raise ValueError(f"augment_dim must be >= 0 (0 = no augmentation labels), got {augment_dim}")
        self.augment_dim = augment_dim
        self.augment_embed = nn.Linear(augment_dim, self.time_dim, bias=False) if augment_dim else None
        # What every transformer-carrying block shares (read by the builders below).
        self.num_heads, self.mlp_ratio, self.num_groups, self.dropout = num_heads, mlp_ratio, num_groups, dropout
        if encoder == "vit":
            self._build_vit_encoder(in_channels, patch_size)
        else:
            self._build_multi_resolution_encoder(in_channels)
        if decoder == "setr-mla":
            widths = [level.width for level in self.levels]
            self.decoder = SetrMlaDecoder(widths, mla_channels or channels[0], in_channels, img_resolution, num_groups)
            self.head = None  # the decoder's own `head` conv is the output layer
        else:
            self._build_u_decoder()
            self.head = OutputHead(channels[0], in_channels, num_groups)
        # Recompute ResBlock activations in the backward pass to save memory; set by the trainer.
        self.gradient_checkpointing = False
        self.initialize_weights()

    # -- construction ------------------------------------------------------------------------------------------

    def _time_film(self, conditioning: str, width: int) -> StageTimeFiLM | None:
        return StageTimeFiLM(self.time_dim, width) if is_stage_conditioning(conditioning) else None

    def _res_blocks(self, level: Level, conditioning: str) -> list[DiffiTResBlock]:
        return [
            DiffiTResBlock(
                level.width,
                self.num_heads,
                level.window,
                self.time_dim,
                self.mlp_ratio,
                self.num_groups,
                self.dropout,
                conditioning,
            )
            for _ in range(level.blocks)
        ]

    def _vit_blocks(self, level: Level) -> list[ViTBlock]:
        return [
            ViTBlock(level.width, self.num_heads, level.side, self.time_dim, self.mlp_ratio, self.time_conditioning)
            for _ in range(level.blocks)
        ]

    def _build_multi_resolution_encoder(self, in_channels: int) -> None:
        """DiffiT's encoder: input conv, then per stage a stride-2 conv (not at stage 0) and ResBlocks."""
        channels, conditioning = self.channels, self.time_conditioning
        self.input_conv = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1)
        self.encoder = nn.ModuleList(
            EncoderStage(
                Downsample(channels[i - 1], channels[i]) if i > 0 else None,
                self._res_blocks(level, conditioning),
                self._time_film(conditioning, level.width),
            )
            for i, level in enumerate(self.levels)
        )

    def _build_vit_encoder(self, in_channels: int, patch_size: int) -> None:
        """ViT's encoder: p x p patch embedding + fixed sin-cos position embedding, then the transformer blocks in
        `VIT_LEVELS` groups of depth / 4 ("stages" without downsampling; each group's output is one SETR level)."""
        width, grid = self.channels[0], self.levels[0].side
        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        # Fixed, derived from the configuration: a non-persistent buffer (not in checkpoints), [1, C, grid, grid].
        pos_embed = get_2d_sincos_pos_embed(width, grid).t().reshape(1, width, grid, grid)
        self.register_buffer("pos_embed", pos_embed, persistent=False)
        self.encoder = nn.ModuleList(
            EncoderStage(None, self._vit_blocks(level), self._time_film(self.time_conditioning, width))
            for level in self.levels
        )

    def _build_u_decoder(self) -> None:
        """Decoder stages from the deepest skip resolution up to full resolution: upsampler, skip fusion conv, the
        stage's FiLM ("added-per-stage"), ResBlocks."""
        channels, conditioning = self.channels, self.decoder_time_conditioning
        self.decoder = nn.ModuleList(
            DecoderStage(
                Upsample(channels[i + 1]),
                nn.Conv2d(channels[i + 1] + channels[i], channels[i], kernel_size=3, padding=1),
                self._res_blocks(self.levels[i], conditioning),
                self._time_film(conditioning, channels[i]),
            )
            for i in reversed(range(len(channels) - 1))
        )

    @staticmethod
    def _check_config(
        img_resolution: int,
        channels: list[int],
        blocks_per_stage: list[int],
        window_size: int,
        num_heads: int,
        num_classes: int,
        encoder: str = "multi-resolution",
    ) -> None:
        """Validate the stage lists, window and widths (`diffit.unet_layout.layout_problem` checks the encoder /
        decoder choice)."""
        if not channels or len(channels) != len(blocks_per_stage):
            raise ValueError(
                f"channels {channels} and blocks_per_stage {blocks_per_stage} must be non-empty lists "
                "of the same length (one entry per stage)"
            )
        if any(b < 0 for b in blocks_per_stage):
            raise ValueError(f"blocks_per_stage must be >= 0, got {blocks_per_stage}")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        for width in channels:
            if width % num_heads:
                raise ValueError(f"stage width {width} is not divisible by num_heads {num_heads}")
        if encoder == "vit":
            return  # one resolution, global attention: `layout_problem` checks the patch grid
        if img_resolution % 2 ** (len(channels) - 1):
            raise ValueError(
                f"img_resolution {img_resolution} cannot be halved {len(channels) - 1} times for {len(channels)} stages"
            )
        for stage in range(len(channels)):
            resolution = img_resolution // 2**stage
            window = min(window_size, resolution)  # a map smaller than the window is one window
            if resolution % window:
                raise ValueError(
                    f"stage {stage} feature map {resolution}x{resolution} is not divisible by the "
                    f"attention window {window}"
                )

    def block_sites(self) -> list[BlockSite]:
        """Every transformer-carrying block in the order the forward pass runs them (encoder stages, then the U
        decoder's stages from the deepest skip resolution up; SETR-MLA has no blocks), with its geometry: what
        REPA's taps (`pipeline.train.repa.tap_points`) and attention maps (`diffit.attention_maps`) read."""
        sites = []

        def add(prefix: str, stage: nn.Module, level: Level) -> None:
            for position, block in enumerate(stage.blocks):
                name = f"{prefix}.blocks.{position}"
                sites.append(BlockSite(name, block, level.width, level.side, level.window, level.stride))

        for index, stage in enumerate(self.encoder):
            add(f"encoder.{index}", stage, self.levels[index])
        if self.decoder_type == "multi-resolution":
            for position, (stage, level) in enumerate(zip(self.decoder, reversed(self.levels[:-1]))):
                add(f"decoder.{position}", stage, level)
        return sites

    @property
    def null_class(self) -> int:
        return self.num_classes

    def initialize_weights(self) -> None:
        """Initialise the weights; each choice and why:

        * Convolutions and linear layers: Xavier-uniform weights, zero biases (as EDM's DDPM++ and DiT). Xavier
          keeps activation and gradient variance roughly constant through each layer, and the pre-norm
          residual cells (GN / LN at the start of each branch) keep the trunk from drifting.
        * Time MLP and class table: N(0, 0.02) as in DiT and the latent DiffiT here, so the time/class
          contribution to q, k, v starts as a small perturbation and grows as it is learned.
        * Relative position bias: truncated N(0, 0.02) (Swin), drawn by `TMSA` itself.
        * GroupNorm: unit scale, zero shift (PyTorch default).
        * Output head conv: zero. Then F(x) = 0 and the EDM-preconditioned denoiser starts as
          D(x; sigma) = c_skip(sigma) * x, which is already right in both limits (D ~ 0, the data mean, at
          large sigma; D ~ x at small sigma), and the initial EDM loss is E[F_target^2], about 1 per element
          when the data's std equals sigma_data (the preconditioning scales F's target to unit variance).
          Every parameter still gets a gradient tensor (DDP needs that); the gradients are non-zero from
          the second update on, once the head weights are.
        * adaLN modulation (`time_conditioning="adaln"`): zero, DiT's adaLN-Zero (each transformer branch
          starts as zero, so each ResBlock as the identity).
        * Stage FiLM (`time_conditioning="added-per-stage"`): zero, so each stage starts as the identity; the
          SETR-MLA decoder's output conv is zero like the U decoder's head, for the same reason.
        * ViT position embedding: fixed sin-cos (a buffer, not learned), as DiT.
        """

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.table.weight, std=0.02)
        for module in self.modules():
            if isinstance(module, DiffiTTransformerBlock) and module.adaLN_modulation is not None:
                nn.init.zeros_(module.adaLN_modulation[-1].weight)
                nn.init.zeros_(module.adaLN_modulation[-1].bias)
        for module in self.modules():  # "added-per-stage": each stage starts as the identity
            if isinstance(module, StageTimeFiLM):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)
        output = self.decoder.head if self.head is None else self.head.conv
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)

    def time_token(
        self,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_t of the paper: embedding of the noise label, plus the class embedding for conditional models, plus the
        augmentation embedding when the model has one and augment labels are given (training; none at sampling,
        as EDM)."""
        token = self.time_embed(noise_labels)
        if augment_labels is not None:
            if self.augment_embed is None:
                raise ValueError("augment_labels given to a model built with augment_dim=0")
            if augment_labels.shape != (noise_labels.shape[0], self.augment_dim):
                raise ValueError(
                    f"augment_labels must have shape [{noise_labels.shape[0]}, {self.augment_dim}], "
                    f"got {list(augment_labels.shape)}"
                )
            token = token + self.augment_embed(augment_labels.to(token.dtype))
        if self.label_embed is not None:
            if class_labels is None:
                raise ValueError(
                    f"class-conditional model (num_classes={self.num_classes}): pass class_labels "
                    f"(use null_class={self.null_class} for the unconditional branch)"
                )
            if class_labels.shape != noise_labels.shape:
                raise ValueError(
                    f"class_labels must have shape {list(noise_labels.shape)}, got {list(class_labels.shape)}"
                )
            token = token + self.label_embed(class_labels)
        elif class_labels is not None:
            raise ValueError("this model is unconditional (num_classes=0) but class_labels were given")
        return token

    def _run_blocks(self, blocks: nn.ModuleList, h: torch.Tensor, time_token: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(block, h, time_token, use_reentrant=False)
            else:
                h = block(h, time_token)
        return h

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        expected = (self.in_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input [N, {', '.join(map(str, expected))}], got {list(x.shape)}")
        if noise_labels.numel() == 1:
            noise_labels = noise_labels.reshape(1).expand(x.shape[0])
        if noise_labels.shape != (x.shape[0],):
            raise ValueError(
                f"noise_labels must have shape [{x.shape[0]}] (or be a scalar), got {list(noise_labels.shape)}"
            )
        time_token = self.time_token(noise_labels, class_labels, augment_labels)
        levels = self.encode(x, time_token)
        if self.decoder_type == "setr-mla":
            return self.decoder(levels)
        return self.decode_u(levels, time_token)

    def _enter_stage(self, stage: nn.Module, h: torch.Tensor, time_token: torch.Tensor) -> torch.Tensor:
        """Where a stage with "added-per-stage" takes the time (its FiLM); the identity otherwise."""
        return h if stage.time_film is None else stage.time_film(h, time_token)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The image as the first stage's feature map: the input conv, or ViT's patches plus position embedding."""
        if self.encoder_type == "vit":
            return self.patch_embed(x) + self.pos_embed.to(x.dtype)
        return self.input_conv(x)

    def encode(self, x: torch.Tensor, time_token: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's level outputs, one per stage (full resolution first; ViT: one per group of depth/4)."""
        h = self.embed(x)
        levels = []
        for stage in self.encoder:
            if stage.downsample is not None:
                h = stage.downsample(h)
            h = self._enter_stage(stage, h, time_token)
            h = self._run_blocks(stage.blocks, h, time_token)
            levels.append(h)
        return levels

    def decode_u(self, levels: list[torch.Tensor], time_token: torch.Tensor) -> torch.Tensor:
        """The U decoder: from the deepest level up, upsample, fuse the skip (the level of that resolution), blocks;
        then the output head."""
        h, skips = levels[-1], levels[:-1]  # the deepest stage's output is the decoder's input, not a skip
        for stage in self.decoder:
            h = stage.upsample(h)
            h = stage.fuse(torch.cat([h, skips.pop()], dim=1))
            h = self._enter_stage(stage, h, time_token)
            h = self._run_blocks(stage.blocks, h, time_token)
        return self.head(h)
