"""The layouts of the image-space DiffiT U-Net's encoder and decoder (paper Table 4, configs A-E), as pure data and
arithmetic (no torch): `diffit.unet.DiffiTUNet` builds from them, `diffit.model_size` counts from them and
`diffit.config_check` refuses a bad file with them, so the three cannot disagree about what a configuration means.

Encoders:

* "multi-resolution" (default; DiffiT's): stage i at img_resolution / 2^i with `channels[i]` maps and
  `blocks_per_stage[i]` DiffiT ResBlocks on local windows, a stride-2 conv between stages.
* "vit": ViT's isotropic encoder (Dosovitskiy et al. 2021; Table 4 A): a p x p stride-p patch embedding
  (`patch_size`), a fixed 2-D sin-cos position embedding, then `blocks_per_stage[0]` transformer blocks of width
  `channels[0]` with global attention over the whole (img_resolution / p)^2 token grid. The blocks run in
  `VIT_LEVELS` groups of depth / 4, whose outputs are the levels SETR-MLA aggregates (SETR takes ViT's layers
  depth/4, depth/2, 3 depth/4, depth) and the "stages" at whose start "added-per-stage" adds the time.

Decoders:

* "multi-resolution" (default; DiffiT's): the U decoder, an upsampler and skip fusion per shallower resolution.
* "setr-mla": SETR's multi-level feature aggregation head (Zheng et al. 2021; Table 4 A, B) over the encoder's
  level outputs (`diffit.unet.SetrMlaDecoder`), with `mla_channels` M per stream (default `channels[0]`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .conditionings import STAGE_CONDITIONINGS, TIME_CONDITIONINGS

ENCODERS = ("multi-resolution", "vit")
DECODERS = ("multi-resolution", "setr-mla")
VIT_LEVELS = 4  # SETR-MLA reads ViT's outputs after every depth / 4 layers


@dataclass(frozen=True)
class Level:
    """One encoder stage: width, block count, feature-map side, attention window, pixels per map position."""

    width: int
    blocks: int
    side: int
    window: int
    stride: int


def encoder_levels(
    img_resolution: int,
    channels: list[int],
    blocks_per_stage: list[int],
    window_size: int,
    encoder: str = "multi-resolution",
    patch_size: int = 2,
) -> list[Level]:
    """The encoder's stages, full resolution first (assumes `layout_problem` found none)."""
    if encoder == "vit":
        side = img_resolution // patch_size
        group = blocks_per_stage[0] // VIT_LEVELS
        return [Level(channels[0], group, side, side, patch_size) for _ in range(VIT_LEVELS)]
    levels = []
    for stage, (width, blocks) in enumerate(zip(channels, blocks_per_stage)):
        side = img_resolution // 2**stage
        levels.append(Level(width, blocks, side, min(window_size, side), 2**stage))
    return levels


def decoder_conditioning(time_conditioning: str, decoder_time_conditioning: str | None) -> str:
    """The U decoder's conditioning: `decoder_time_conditioning`, or the encoder's when None."""
    return time_conditioning if decoder_time_conditioning is None else decoder_time_conditioning


def is_stage_conditioning(conditioning: str) -> bool:
    """Whether the time enters at the start of each stage (FiLM) instead of inside the blocks."""
    return conditioning in STAGE_CONDITIONINGS


def layout_problem(
    img_resolution: int,
    channels: list[int],
    blocks_per_stage: list[int],
    encoder: str = "multi-resolution",
    decoder: str = "multi-resolution",
    patch_size: int = 2,
    decoder_time_conditioning: str | None = None,
    mla_channels: int | None = None,
    max_attention_tokens: int | None = None,
) -> str | None:
    """Why the encoder / decoder choice does not fit the rest of the configuration (a sentence), or None."""
    if encoder not in ENCODERS:
        return f"unknown encoder {encoder!r}; expected one of {ENCODERS}"
    if decoder not in DECODERS:
        return f"unknown decoder {decoder!r}; expected one of {DECODERS}"
    if decoder_time_conditioning is not None and decoder_time_conditioning not in TIME_CONDITIONINGS:
        return f"unknown decoder_time_conditioning {decoder_time_conditioning!r}; expected one of {TIME_CONDITIONINGS}"
    if patch_size < 1:
        return f"patch_size must be >= 1, got {patch_size}"
    if mla_channels is not None and mla_channels < 2:
        return f"mla_channels must be >= 2 (SETR-MLA halves it; None: channels[0]), got {mla_channels}"
    if decoder == "setr-mla" and decoder_time_conditioning is not None:
        return (
            "decoder_time_conditioning applies to the U decoder's transformer blocks; decoder 'setr-mla' has none "
            "(leave it unset)"
        )
    if decoder != "setr-mla" and mla_channels is not None:
        return f"mla_channels sets SETR-MLA's stream width; decoder {decoder!r} has none (leave it unset)"
    if decoder == "setr-mla" and (mla_channels or channels[0]) % 2:
        return f"decoder 'setr-mla' halves its {mla_channels or channels[0]} stream channels (M): M must be even"
    if encoder != "vit":
        return None
    if decoder != "setr-mla":
        return "encoder 'vit' is isotropic (one resolution, no skips for a U decoder): it needs decoder 'setr-mla'"
    if len(channels) != 1:
        return f"encoder 'vit' has one width: channels must have one entry (the ViT width), got {channels}"
    if channels[0] % 4:
        return (
            f"encoder 'vit' width {channels[0]} must be a multiple of 4: its 2-D sin-cos position embedding gives a "
            "quarter of the channels to each of sin / cos of each axis"
        )
    depth = blocks_per_stage[0]
    if depth < VIT_LEVELS or depth % VIT_LEVELS:
        return (
            f"encoder 'vit' feeds SETR-MLA its outputs after every depth/{VIT_LEVELS} layers: "
            f"blocks_per_stage [{depth}] must be a positive multiple of {VIT_LEVELS}"
        )
    if img_resolution % patch_size:
        return f"img_resolution {img_resolution} is not divisible by patch_size {patch_size}"
    tokens = (img_resolution // patch_size) ** 2
    if max_attention_tokens is not None and tokens > max_attention_tokens:
        return (
            f"encoder 'vit' attends globally: img_resolution {img_resolution} / patch_size {patch_size} gives "
            f"{tokens} tokens in one attention window (at most {max_attention_tokens})"
        )
    return None
