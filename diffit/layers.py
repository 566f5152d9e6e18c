"""Building blocks shared by the latent and the image-space DiffiT models.

* `TMSA`: time-dependent multi-head self-attention (paper Eq. 3-6) with a Swin-style learnable relative
  position bias, computed by `attention_with_bias` on one of `ATTENTION_BACKENDS` (`set_attention_backend`):
  "sdpa" (default) `F.scaled_dot_product_attention` with the bias as a float mask (on CUDA its
  memory-efficient kernel, which returns the bias gradient), "flex" FlexAttention with the bias as a
  `score_mod` (compiled; torch >= 2.5, no CPU backward), "math" the explicit formula (the reference).
* `window_partition` / `window_reverse`: non-overlapping local windows for the image-space model.
* `TimestepEmbedder`: sinusoidal (or Gaussian-Fourier, paper Table 8) features -> MLP with Swish, the
  "time token" x_t of the paper (Sec. 3.2).
* `LabelEmbedder`: class embedding with one extra "null" row used by classifier-free guidance.
* `get_2d_sincos_pos_embed`: the fixed 2-D sin-cos position embedding of MAE / DiT.
* `TIME_CONDITIONINGS`: where the time token enters a `DiffiTTransformerBlock` (TMSA, or the paper's ablations:
  DiT's adaLN-Zero, the relative position bias, the MLP, a separate attention token); see the block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .conditionings import ADALN_CONDITIONINGS, NO_POSITION_BIAS, TIME_CONDITIONINGS

# ---------------------------------------------------------------------------------------------------------------
# Position embeddings
# ---------------------------------------------------------------------------------------------------------------


def _sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim] as (sin | cos) with frequencies 1 / 10000^(2i/D), computed in float64."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, [grid_size**2, embed_dim] (row-major tokens).

    Half of the channels encode the column (w) coordinate and half the row (h) coordinate, in the order used
    by MAE / DiT / the released DiffiT, so weights trained with those embeddings load unchanged.
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # grid_w varies along columns
    emb_w = _sincos_1d(embed_dim // 2, grid_w.reshape(-1))
    emb_h = _sincos_1d(embed_dim // 2, grid_h.reshape(-1))
    return torch.cat([emb_w, emb_h], dim=1).float()


# ---------------------------------------------------------------------------------------------------------------
# Time and class embeddings
# ---------------------------------------------------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) noise labels, [N] -> [N, dim], ordered (cos | sin) as in
    ADM / DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().reshape(-1, 1) * freqs.reshape(1, -1)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class FourierFeatures(nn.Module):
    """Random Gaussian Fourier features [cos(2 pi B t), sin(2 pi B t)] (NCSN++ / EDM "fourier" embedding).

    B is drawn once at construction and stored as a buffer so that a saved model reproduces it exactly.
    """

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"Fourier features need an even dimension, got {dim}")
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = 2 * math.pi * t.float().reshape(-1, 1) * self.freqs.reshape(1, -1)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Noise label -> time token x_t: frequency features followed by Linear -> Swish -> Linear (paper Sec. 3.2).

    `embedding="positional"` uses the transformer sinusoids of DDPM/ADM (the default, used by the released
    latent DiffiT); `embedding="fourier"` uses random Fourier features, the alternative compared in Table 8.
    """

    def __init__(
        self, hidden_size: int, frequency_size: int = 256, embedding: str = "positional", fourier_scale: float = 16.0
    ):
        super().__init__()
        if embedding not in ("positional", "fourier"):
            raise ValueError(f"unknown time embedding {embedding!r}; use 'positional' or 'fourier'")
        self.frequency_size = frequency_size
        self.embedding = embedding
        self.fourier = FourierFeatures(frequency_size, fourier_scale) if embedding == "fourier" else None
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, noise_labels: torch.Tensor) -> torch.Tensor:
        if self.fourier is not None:
            features = self.fourier(noise_labels)
        else:
            features = timestep_embedding(noise_labels, self.frequency_size)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector. Row `num_classes` is the null class that classifier-free guidance uses for the
    unconditional branch; training replaces labels by it with probability `dropout_prob` (done by the
    trainer, which owns the randomness, not inside the forward pass)."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        return self.table(class_labels)


def drop_labels(
    class_labels: torch.Tensor, null_class: int, dropout_prob: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by `null_class` with probability `dropout_prob` (classifier-free guidance training)."""
    if dropout_prob <= 0:
        return class_labels
    drop = torch.rand(class_labels.shape, generator=generator, device=class_labels.device) < dropout_prob
    return torch.where(drop, torch.full_like(class_labels, null_class), class_labels)


# ---------------------------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * (H/ws) * (W/ws), ws * ws, C], windows in row-major order."""
    batch, height, width, channels = x.shape
    if height % window_size or width % window_size:
        raise ValueError(f"feature map {height}x{width} is not divisible by window size {window_size}")
    x = x.reshape(batch, height // window_size, window_size, width // window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, channels)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`: [B * nW, ws * ws, C] -> [B, H, W, C]."""
    channels = windows.shape[-1]
    n_h, n_w = height // window_size, width // window_size
    x = windows.reshape(-1, n_h, n_w, window_size, window_size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def relative_position_index(window_size: int) -> torch.Tensor:
    """[ws*ws, ws*ws] index into a ((2ws-1)^2)-row bias table; entry (i, j) depends only on the offset of
    token i from token j (Swin Transformer)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
    coords = coords.flatten(1)  # [2, N]
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [N, N, 2], each in [-(ws-1), ws-1]
    offsets = offsets + (window_size - 1)
    return offsets[..., 0] * (2 * window_size - 1) + offsets[..., 1]


# ---------------------------------------------------------------------------------------------------------------
# Time-dependent multi-head self-attention
# ---------------------------------------------------------------------------------------------------------------


ATTENTION_BACKENDS = ("sdpa", "flex", "math")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) + bias) v written out (paper Eq. 6): the "math" backend and the reference
    the others are tested against. Scores and softmax in float32 whatever the input dtype; no bias: plain
    attention."""
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias.float()
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def flex_bias_score_mod(bias: torch.Tensor | None):
    """FlexAttention `score_mod` adding bias[head, query, key] (or bias[batch, head, query, key] for a 4-D bias)
    to each score (the bias is captured, so its gradient is returned by FlexAttention's backward); None for no
    bias."""
    if bias is None:
        return None
    if bias.ndim == 4:

        def add_batch_bias(score, batch, head, query, key):
            return score + bias[batch, head, query, key]

        return add_batch_bias

    def add_bias(score, batch, head, query, key):
        return score + bias[head, query, key]

    return add_bias


_COMPILED_FLEX_ATTENTION = None


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def flex_attention_with_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, compiled: bool = True
) -> torch.Tensor:
    """Eq. 6 with FlexAttention (torch >= 2.5): the bias enters as a `score_mod`, so no [B, heads, N, N] mask is
    materialised and the fused kernel stays usable. `compiled=False` runs FlexAttention's unfused reference
    (forward only on CPU: torch has no CPU backward for FlexAttention)."""
    global _COMPILED_FLEX_ATTENTION
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as error:  # torch < 2.5
        raise RuntimeError(f"attention backend 'flex' needs torch >= 2.5 (this is {torch.__version__})") from error
    if not torch.is_grad_enabled():  # no graph is recorded; FlexAttention on CPU refuses inputs that need grad
        q, k, v, bias = (t.detach() if t is not None else None for t in (q, k, v, bias))
    elif q.device.type == "cpu" and any(t is not None and t.requires_grad for t in (q, k, v, bias)):
        raise RuntimeError("attention backend 'flex' has no backward on CPU in torch; train on CPU with backend 'sdpa'")
    if compiled and _is_compiling():
        compiled = False  # inside an outer torch.compile, which compiles FlexAttention itself
    if compiled:
        if _COMPILED_FLEX_ATTENTION is None:
            _COMPILED_FLEX_ATTENTION = torch.compile(flex_attention, dynamic=False)
        return _COMPILED_FLEX_ATTENTION(q, k, v, score_mod=flex_bias_score_mod(bias))
    return flex_attention(q, k, v, score_mod=flex_bias_score_mod(bias))


def attention_with_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, backend: str = "sdpa"
) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) + bias) v for q [B, heads, N, head_dim], k and v [B, heads, M, head_dim]
    and a bias [heads, N, M] shared by the batch (paper Eq. 6), or [B, heads, N, M] per batch element (the
    time-dependent bias of `time_conditioning="bias"`), or None (plain attention, `"adaln"`), on `backend`:

    * "sdpa": PyTorch's SDPA with the bias as a float mask; its backward returns the bias gradient. A float mask
      rules out the flash kernel, so on CUDA this is the memory-efficient kernel (or cuDNN where PyTorch picks it).
    * "flex": FlexAttention with the bias as a `score_mod`, compiled (`flex_attention_with_bias`).
    * "math": `reference_attention`, the formula written out (float32 scores).
    """
    if backend == "sdpa":
        mask = None if bias is None else bias.to(q.dtype) if bias.ndim == 4 else bias.to(q.dtype).unsqueeze(0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "flex":
        return flex_attention_with_bias(q, k, v, bias)
    if backend == "math":
        return reference_attention(q, k, v, bias)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """Run every TMSA layer of `model` on `backend` (see `attention_with_bias`); returns `model`.

    A run-time choice like `torch.compile`, not part of the model: it is not saved with the weights."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
    for module in model.modules():
        if isinstance(module, TMSA):
            module.attention_backend = backend
    return model


# TIME_CONDITIONINGS (where the time token enters a block) is defined in `diffit.conditionings` (no torch there).


def per_window(values: torch.Tensor, batch_windows: int) -> torch.Tensor:
    """[B, ...] per-image values -> [B * nW, ...]: each image's row repeated over its nW consecutive windows
    (the order of `window_partition`)."""
    return values.repeat_interleave(batch_windows // values.shape[0], dim=0)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT's adaLN: x * (1 + scale) + shift with one (shift, scale) per image, x [B, N, D], shift/scale [B, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TMSA(nn.Module):
    """Time-dependent multi-head self-attention (paper Eq. 3-6).

    q = x_s W_qs + x_t W_qt (likewise k, v): the spatial tokens and the time token are projected into the same
    space and summed, so the attention pattern itself changes with the noise level. Attention is
    softmax(Q K^T / sqrt(d) + B) V with B a learnable relative position bias over a `window_size` x
    `window_size` token grid (the whole latent grid for latent DiffiT, a local window for the image model).

    Input tokens: [B * nW, window_size**2, dim]; time token: [B, time_dim] (repeated over the nW windows of
    each image), or None for an attention without time dependence.

    `time_conditioning` (see `DiffiTTransformerBlock`) decides what the time token does here: "tmsa" the q/k/v
    term above; "bias" a time-dependent bias table (`bias_time`) added to B; "decoupled" a separate key/value
    token (`kv_time`); "mlp" nothing (the block uses it); "adaln" nothing, and no B either (DiT's plain
    self-attention); "adaln-relpos" and "added-per-stage" nothing, B kept.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        time_dim: int | None = None,
        qkv_bias: bool = True,
        time_conditioning: str = "tmsa",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if time_conditioning not in TIME_CONDITIONINGS:
            raise ValueError(f"unknown time_conditioning {time_conditioning!r}; expected one of {TIME_CONDITIONINGS}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.time_conditioning = time_conditioning
        rows = (2 * window_size - 1) ** 2

        def time_linear(variant: str, width: int) -> nn.Linear | None:
            return nn.Linear(time_dim, width) if time_dim is not None and time_conditioning == variant else None

        self.qkv_spatial = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # [W_qs | W_ks | W_vs]
        self.qkv_time = time_linear("tmsa", 3 * dim)  # [W_qt | W_kt | W_vt]
        self.bias_time = time_linear("bias", rows * num_heads)  # x_t -> a [(2ws-1)^2, heads] table added to B
        self.kv_time = time_linear("decoupled", 2 * dim)  # x_t -> [k_t | v_t] of the separate time token
        if time_conditioning in NO_POSITION_BIAS:  # DiT's attention has no position bias (its tokens carry one)
            self.relative_position_bias = None
        else:
            self.relative_position_bias = nn.Parameter(torch.zeros(rows, num_heads))
            nn.init.trunc_normal_(self.relative_position_bias, std=0.02)
            # Derived from window_size; not saved so that checkpoints hold only learned values.
            self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        self.proj = nn.Linear(dim, dim)
        self.attention_backend = "sdpa"  # see `set_attention_backend`

    @property
    def time_dependent(self) -> bool:
        """Whether the forward pass reads the time token."""
        return any(m is not None for m in (self.qkv_time, self.bias_time, self.kv_time))

    def attention_bias(self) -> torch.Tensor:
        """B of Eq. 6 as [heads, N, N]."""
        n = self.window_size**2
        # Gathered along the table's last dimension so that the result is contiguous [heads, N*N]: the backward
        # (an index_add of the incoming [heads, N, N] gradient) is then ~8x faster on CPU than for the
        # [N, N, heads] gather permuted to [heads, N, N].
        bias = torch.index_select(self.relative_position_bias.t(), 1, self.relative_position_index.reshape(-1))
        return bias.reshape(self.num_heads, n, n)

    def time_dependent_bias(self, time_token: torch.Tensor) -> torch.Tensor:
        """B + B(x_t) as [B, heads, N, N] ("bias" conditioning): the learned table plus one table per image
        projected from its time token, gathered by the same relative-position index."""
        n, rows = self.window_size**2, self.relative_position_bias.shape[0]
        tables = self.relative_position_bias + self.bias_time(time_token).reshape(-1, rows, self.num_heads)
        bias = torch.index_select(tables.transpose(1, 2), 2, self.relative_position_index.reshape(-1))
        return bias.reshape(-1, self.num_heads, n, n)

    def forward(self, x: torch.Tensor, time_token: torch.Tensor | None) -> torch.Tensor:
        batch_windows, tokens, dim = x.shape
        q, k, v, bias = self.queries_keys_values(x, time_token)
        out = attention_with_bias(q, k, v, bias, self.attention_backend)
        out = out.transpose(1, 2).reshape(batch_windows, tokens, dim)
        return self.proj(out)

    def queries_keys_values(self, x: torch.Tensor, time_token: torch.Tensor | None):
        """(q, k, v, B) of Eq. 3-6 for tokens x [B*nW, N, dim]: q [B*nW, heads, N, head_dim], k and v
        [B*nW, heads, M, head_dim] (M = N, or N + 1 with the separate time token of "decoupled"), B broadcastable
        to [B*nW, heads, N, M] or None. The forward's own computation (`diffit.attention_maps` reads attention
        probabilities from it)."""
        batch_windows, tokens, dim = x.shape
        if tokens != self.window_size**2:
            raise ValueError(f"TMSA built for {self.window_size}x{self.window_size} windows got {tokens} tokens")
        if self.time_dependent and time_token is None:
            raise ValueError("this TMSA layer is time-dependent: pass the time token")
        qkv = self.qkv_spatial(x)
        if self.qkv_time is not None:
            qkv_t = self.qkv_time(time_token).to(qkv.dtype)  # [B, 3*dim]
            qkv_t = qkv_t.repeat_interleave(batch_windows // qkv_t.shape[0], dim=0)
            qkv = qkv + qkv_t[:, None, :]
        head_dim = dim // self.num_heads
        qkv = qkv.reshape(batch_windows, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B*nW, heads, N, head_dim]
        if self.relative_position_bias is None:
            bias = None
        elif self.bias_time is not None:
            bias = per_window(self.time_dependent_bias(time_token).to(q.dtype), batch_windows)
        else:
            bias = self.attention_bias()
        if self.kv_time is not None:
            # The time token as one more key/value (no position: zero bias); it is no query, since x_t reaches
            # every block unchanged, so its own attention output would be discarded.
            kv_t = per_window(self.kv_time(time_token).to(q.dtype), batch_windows)
            kv_t = kv_t.reshape(batch_windows, 2, self.num_heads, 1, head_dim)
            k, v = torch.cat([k, kv_t[:, 0]], dim=2), torch.cat([v, kv_t[:, 1]], dim=2)
            bias = F.pad(bias, (0, 1))
        return q, k, v, bias


class Mlp(nn.Module):
    """Transformer feed-forward: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiffiTTransformerBlock(nn.Module):
    """x = x + TMSA(LN(x), x_t); x = x + MLP(LN(x))  (paper Eq. 7-8). LayerNorms carry no affine parameters,
    as in the released model: the time token conditions the block only through TMSA.

    `time_conditioning` moves the time token x_t [B, time_dim] elsewhere, for the paper's ablations (one switch
    here, not parallel blocks; every variant keeps the block's input/output contract):

    * "tmsa" (default; Table 6 H): q/k/v = x_s W_s + x_t W_t (`TMSA.qkv_time`). Unchanged weights and outputs.
    * "adaln" (Fig. 7b, "DiT modulation"): DiT's adaLN-Zero block. `adaLN_modulation` = SiLU -> Linear(time_dim,
      6 dim) gives shift/scale/gate for attention and MLP, x = x + gate * attn(modulate(LN(x), shift, scale))
      (same for the MLP), and the attention is DiT's plain self-attention: no time term and no relative
      position bias (DiT has none; the latent model's tokens carry the sin-cos position embedding, the U-Net's
      the convolutions' position information). The owning model zero-initialises `adaLN_modulation` (adaLN-Zero).
    * "adaln-relpos": the same adaLN-Zero block with DiffiT's relative position bias B kept in the attention, so
      that against "tmsa" one thing changes (where the time token enters), where "adaln" changes two.
    * "bias" (Table 6 F, "relative position bias"): the time token only changes B of Eq. 6, as B + B(x_t) with
      B(x_t) = reshape(W_b x_t) a full [(2ws-1)^2, heads] table per image (`TMSA.bias_time`). The paper gives no
      formula; this reading is the one under which the time token can act at all: a per-head constant added to
      every logit cancels in the softmax, so the time term must vary with the query-key offset. Its cost is
      time_dim * (2ws-1)^2 * heads per block (CIFAR-10, window 4: 100K; latent XL/2, global 16x16: 17.7M).
    * "mlp" (Table 6 G): the time token only enters the MLP's input, x = x + MLP(LN(x) + W_m x_t) (`mlp_time`,
      Linear(time_dim, dim)); TMSA keeps its (time-free) relative position bias. The paper says "add temporal
      tokens to the MLP layer": added at the MLP's input, like TMSA adds it at the attention's input.
    * "decoupled" (Table 7, "Separate" vs "Mixed"): x_t is a separate token in self-attention: spatial q/k/v
      from x_s alone, plus one key/value [k_t | v_t] = W_kv x_t (`TMSA.kv_time`, Linear(time_dim, 2 dim), its
      own projection since time_dim may differ from dim) that every spatial query attends to with zero
      position bias. The time token is no query: x_t reaches every block unchanged (Sec. 3.2), so its own
      output would be discarded.
    * "added-per-stage" (Table 4 A-D): the block ignores the time token -- TMSA without its time term, windows and
      relative position bias kept, so that against "tmsa" only where the time enters changes; the DiffiT U-Net
      adds it once per stage (`diffit.unet.StageTimeFiLM`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        time_dim: int,
        mlp_ratio: float = 4.0,
        time_conditioning: str = "tmsa",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = TMSA(dim, num_heads, window_size, time_dim=time_dim, time_conditioning=time_conditioning)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.mlp_time = nn.Linear(time_dim, dim) if time_conditioning == "mlp" else None
        adaln = time_conditioning in ADALN_CONDITIONINGS
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 6 * dim)) if adaln else None

    def forward(self, x: torch.Tensor, time_token: torch.Tensor) -> torch.Tensor:
        if self.adaLN_modulation is not None:
            modulation = per_window(self.adaLN_modulation(time_token).to(x.dtype), x.shape[0])
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
            x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), None)
            return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        x = x + self.attn(self.norm1(x), time_token)
        if self.mlp_time is not None:
            time_term = per_window(self.mlp_time(time_token).to(x.dtype), x.shape[0])
            return x + self.mlp(self.norm2(x) + time_term[:, None, :])
        return x + self.mlp(self.norm2(x))
