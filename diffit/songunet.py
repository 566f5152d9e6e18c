"""DDPM++ / NCSN++ (Song et al. 2021) as EDM builds them: the standard EDM baseline, and its TMSA form.

`SongUNet` is layer for layer the `SongUNet` of NVlabs/edm (`training/networks.py`, Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models"): the same modules under the same names, the
same parameter and buffer shapes, the same weight-initialisation draws in the same order, and the same forward
computation. So a state dict of EDM's network (e.g. `net.model.state_dict()` of a released EDM pickle) loads
into it by name, strictly, and gives EDM's outputs. The named configurations `DDPM++-CIFAR10` / `NCSN++-CIFAR10`
(`diffit.configs`) are EDM's `train.py --arch=ddpmpp` / `--arch=ncsnpp` presets at CIFAR-10 size.

    forward(x [N, C, H, W], noise_labels [N], class_labels [N, label_dim] (one-hot) | None,
            augment_labels [N, augment_dim] | None) -> [N, out_channels, H, W]

The network is the raw F of EDM's preconditioning: `noise_labels` are c_noise (EDM: ln(sigma) / 4, wrap it in
`diffit.edm.EDMPrecond`; VP: (M - 1) t; VE: ln(sigma / 2)). `augment_labels` are the second output of
`diffit.augment.AugmentPipe` (EDM's CIFAR-10 models have augment_dim 9).

Layout (EDM's; `enc` / `dec` are ModuleDicts keyed by resolution, e.g. `32x32_conv`, `16x16_block0`):

    mapping: map_noise (positional for DDPM++, Fourier for NCSN++; sin/cos swapped) + map_label(onehot * sqrt(L))
             + map_augment(augment_labels) -> SiLU(map_layer0) -> SiLU(map_layer1) = emb
    encoder: per resolution, a 3x3 conv (first) or a down-sampling UNetBlock, then `num_blocks` UNetBlocks
             (self-attention at `attn_resolutions`); NCSN++'s 'residual' encoder adds a down-sampled image path
    decoder: two UNetBlocks at the lowest resolution (the first with attention), else an up-sampling UNetBlock;
             then `num_blocks + 1` UNetBlocks on [x, skip] (attention in the last, at `attn_resolutions`);
             GroupNorm -> SiLU -> 3x3 conv to the output at full resolution
    UNetBlock: x = (skip(x) + conv1(dropout(SiLU(GN(conv0(SiLU(GN(x))) + affine(emb)))))) * sqrt(1/2), then,
             with attention, x = (proj(attention(qkv(GN(x)))) + x) * sqrt(1/2)

TMSA form (`tmsa=True`; DiffiT paper, Table 5: "using the DDPM++ model, we replace the original self-attention
layers with TMSA layers for both VE and VP settings ... we did not change the original hyper-parameters"): every
self-attention of the network becomes DiffiT's time-dependent multi-head self-attention (Eq. 3-6, as
`diffit.layers.TMSA`): q / k / v = x_s W_s + x_t W_t and softmax(Q K^T / sqrt(d) + B) V. Here

* x_s W_s is the block's own `qkv` (1x1 conv on GN(x), unchanged), x_t is the block's embedding `emb` (the
  noise level, plus class and augmentation labels: the time token of the image-space DiffiT, `diffit.unet`,
  also carries the class) and W_t is `qkv_time`, Linear(emb_channels, 3 * channels), its output laid out like
  `qkv`'s channels. The attention pattern itself, not only the residual path, then depends on the noise level.
* B is a learned relative position bias (`relative_position_bias`, [(2r - 1)^2, heads]) over the block's whole
  r x r feature map (SongUNet's attention is global, so the TMSA window is the map), gathered with
  `diffit.layers.relative_position_index`.
* Everything else, names included, is EDM's: the TMSA model's state dict is EDM's plus `qkv_time.*` and
  `relative_position_bias` in the attention blocks, so EDM weights warm-start it (`strict=False`).
* Initialisation: `qkv_time` as EDM initialises `qkv` (Xavier-uniform x sqrt(0.2), zero bias), so the time term
  starts on the scale of the spatial one; B truncated N(0, 0.02), as `diffit.layers.TMSA`. Their draws come after
  EDM's in each block, so the other parameters are not EDM's initial values under the same seed (they are with
  `tmsa=False`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .hub import DiffiTModelHubMixin
from .layers import relative_position_index

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


def weight_init(shape: list[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """EDM's initialisation draws (one `torch.rand` / `torch.randn` of `shape`)."""
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'Invalid init mode "{mode}"')


class Linear(nn.Module):
    """Fully-connected layer; weight [out, in] scaled by `init_weight`, bias by `init_bias` (the bias is drawn
    even when `init_bias` is 0, as in EDM, so that the random stream stays EDM's)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1,
        init_bias: float = 0,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        init = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **init) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **init) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x


class Conv2d(nn.Module):
    """Convolution with optional 2x up/down-sampling by the FIR filter `resample_filter` (outer product of the
    1-D taps, normalised; a `resample_filter` buffer where up or down). `kernel=0` resamples only.
    `fused_resample` convolves and resamples in one strided / transposed call (NCSN++'s residual encoder)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: list[int] | tuple[int, ...] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1,
        init_bias: float = 0,
    ):
        if up and down:
            raise ValueError("a Conv2d resamples up or down, not both")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        init = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(weight_init(shape, **init) * init_weight) if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **init) * init_bias) if kernel and bias else None
        taps = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        taps = taps.ger(taps).unsqueeze(0).unsqueeze(1) / taps.sum().square()
        self.register_buffer("resample_filter", taps if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            up = f.mul(4).tile([self.in_channels, 1, 1, 1])
            x = F.conv_transpose2d(x, up, groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                up = f.mul(4).tile([self.in_channels, 1, 1, 1])
                x = F.conv_transpose2d(x, up, groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """GroupNorm with min(num_groups, channels / min_channels_per_group) groups (EDM's rule)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention_weights(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q^T k / sqrt(c) (+ bias)) over keys, in float32 (EDM's AttentionOp), for q, k [n, c, tokens];
    returns [n, queries, keys] in q's dtype. `bias` [heads, queries, keys] is TMSA's B (n = batch * heads)."""
    scores = torch.einsum("ncq,nck->nqk", q.to(torch.float32), (k / np.sqrt(k.shape[1])).to(torch.float32))
    if bias is not None:
        scores = (scores.unflatten(0, (-1, bias.shape[0])) + bias.to(torch.float32)).flatten(0, 1)
    return scores.softmax(dim=2).to(q.dtype)


class UNetBlock(nn.Module):
    """EDM's U-Net block (DDPM++ / NCSN++ settings): residual 3x3 convs with the embedding added between them,
    optional 2x up/down-sampling, optional self-attention (`attention`), in TMSA form with `tmsa` (module doc)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0,
        skip_scale: float = 1,
        eps: float = 1e-5,
        resample_filter: list[int] | tuple[int, ...] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: dict | None = None,
        init_zero: dict | None = None,
        init_attn: dict | None = None,
        tmsa: bool = False,
        resolution: int | None = None,
    ):
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.num_heads = heads if attention else 0
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        self.tmsa = bool(tmsa and self.num_heads)

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(
            in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init
        )
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(
                in_channels, out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init
            )

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(
                out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init)
            )
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)
        if self.tmsa:
            if resolution is None:
                raise ValueError("a TMSA block needs the resolution of its feature map (its attention window)")
            self.resolution = resolution
            time_init = {**(init_attn if init_attn is not None else init), "init_bias": 0}
            self.qkv_time = Linear(emb_channels, out_channels * 3, **time_init)  # W_t of Eq. 3-5
            self.relative_position_bias = nn.Parameter(torch.zeros((2 * resolution - 1) ** 2, self.num_heads))
            nn.init.trunc_normal_(self.relative_position_bias, std=0.02)
            self.register_buffer("relative_position_index", relative_position_index(resolution), persistent=False)

    def attention_bias(self) -> torch.Tensor:
        """B of Eq. 6 as [heads, tokens, tokens] (TMSA form)."""
        tokens = self.resolution**2
        bias = torch.index_select(self.relative_position_bias.t(), 1, self.relative_position_index.reshape(-1))
        return bias.reshape(self.num_heads, tokens, tokens)

    def attention(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The block's self-attention residual (before the skip scaling): proj(attention(q, k, v)) with q / k / v
        from the 1x1 conv `qkv` of GN(x), plus W_t emb in TMSA form. The attention weights are `attention_map`."""
        return self.proj(self._attend(x, emb)[0])

    def attention_map(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The softmax attention weights [N * heads, queries, keys] this block computes for input x (after the
        residual convs, i.e. what `attention` receives)."""
        return self._attend(x, emb)[1]

    def _attend(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qkv = self.qkv(self.norm2(x))
        bias = None
        if self.tmsa:
            if x.shape[-2:] != (self.resolution, self.resolution):
                raise ValueError(f"TMSA block built for {self.resolution}x{self.resolution} got {list(x.shape)}")
            qkv = qkv + self.qkv_time(emb).to(qkv.dtype)[:, :, None, None]  # q/k/v = x_s W_s + x_t W_t
            bias = self.attention_bias()
        q, k, v = qkv.reshape(x.shape[0] * self.num_heads, x.shape[1] // self.num_heads, 3, -1).unbind(2)
        w = attention_weights(q, k, bias)
        a = torch.einsum("nqk,nck->ncq", w, v)
        return a.reshape(*x.shape), w

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            x = self.attention(x, emb) + x
            x = x * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of the noise label (DDPM++): [cos(x f_i), sin(x f_i)], f_i = (1/10000)^(i/(n/2-1))
    with `endpoint` (EDM's DDPM++ setting)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(start=0, end=self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise label (NCSN++): [cos(2 pi f x), sin(2 pi f x)], f ~ N(0, scale^2)
    drawn once (the `freqs` buffer, saved with the weights)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.ger((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class SongUNet(nn.Module, DiffiTModelHubMixin):
    """DDPM++ / NCSN++ U-Net, EDM's `SongUNet` (module doc); `tmsa=True` gives the TMSA form of DiffiT's Table 5.

    Arguments are EDM's (same names, same defaults) plus `tmsa`. `label_dim` 0 = unconditional (class labels
    ignored), else `class_labels` are [N, label_dim] one-hot (zeros for the unconditional branch of guidance), or
    [N] label indices as the other networks here take them (`num_classes` = label_dim, the null class label_dim
    -> the zero vector, `class_vectors`); `label_dropout` zeroes the class vector of a random fraction of the batch
    in training mode.
    """

    diffit_family = "songunet"

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: list[int] | tuple[int, ...] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: list[int] | tuple[int, ...] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: list[int] | tuple[int, ...] = (1, 1),
        tmsa: bool = False,
    ):
        for value, allowed, what in (
            (embedding_type, EMBEDDING_TYPES, "embedding_type"),
            (encoder_type, ENCODER_TYPES, "encoder_type"),
            (decoder_type, DECODER_TYPES, "decoder_type"),
        ):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {list(allowed)}, got {value!r}")
        if img_resolution % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"img_resolution {img_resolution} cannot be halved {len(channel_mult) - 1} times")
        super().__init__()
        channel_mult, attn_resolutions = list(channel_mult), list(attn_resolutions)
        self.img_resolution = img_resolution
        self.input_size = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        self.tmsa = tmsa
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=np.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
            tmsa=tmsa,
        )

        # Mapping.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, resolution=res, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, kernel=0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=attn, resolution=res, **block_kwargs
                )
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, resolution=res, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, resolution=res, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, resolution=res, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=attn, resolution=res, **block_kwargs
                )
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model (label_dim; 0 = unconditional), as samplers and the trainer read it."""
        return self.label_dim

    @property
    def null_class(self) -> int | None:
        """The label index of the unconditional branch (label_dim, whose class vector is all zeros, as EDM's
        label dropout makes it); None for an unconditional model."""
        return self.label_dim if self.label_dim else None

    def class_vectors(self, class_labels: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """[N] label indices -> [N, label_dim] one-hot vectors in `dtype` (the null class label_dim -> zeros), so
        that classifier-free guidance and the trainer's label dropout reach EDM's network as EDM presents them;
        one-hot vectors (floating point) and None pass unchanged."""
        if class_labels is None or class_labels.is_floating_point() or self.map_label is None:
            return class_labels
        return F.one_hot(class_labels.long(), self.label_dim + 1)[:, : self.label_dim].to(dtype)

    def embedding(
        self,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """emb [N, emb_channels]: the noise embedding (sin / cos swapped, as EDM) plus the class and augmentation
        embeddings, through the two-layer mapping MLP. Every UNetBlock reads it (and, in TMSA form, attends with
        it: it is DiffiT's time token x_t)."""
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # swap sin/cos
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([noise_labels.shape[0], 1], device=noise_labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.map_label is not None and class_labels is None:
            raise ValueError(
                f"class-conditional model (label_dim={self.label_dim}): pass class_labels [N, {self.label_dim}] "
                "(one-hot; zeros for the unconditional branch)"
            )
        emb = self.embedding(noise_labels, self.class_vectors(class_labels, x.dtype), augment_labels)

        # Encoder.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux
