"""The size a model configuration implies, computed arithmetically without building the model: per family
(`latent` DiffiT, `image` DiffiT U-Net, EDM's `songunet`), `FAMILY_SIZES[family](fields)` is the
(parameters, buffer bytes) of the model whose every schema field is `fields`. `diffit.config_check.implied_size`
resolves the fields of a named configuration and bounds the result; tests pin it against `count_parameters`.
Pure arithmetic: no torch, no model class.
"""

from __future__ import annotations

from typing import Any

from .conditionings import ADALN_CONDITIONINGS, NO_POSITION_BIAS
from .unet_layout import decoder_conditioning, encoder_levels, is_stage_conditioning


def _linear(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def _conv3x3(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out * 9 + fan_out


def _transformer_block(dim: int, heads: int, window: int, time_dim: int, mlp_ratio: float, conditioning: str) -> int:
    """`DiffiTTransformerBlock`: attention (spatial q/k/v, bias table unless adaLN, projection), the MLP (no LN
    affine), and the one time-token projection of `conditioning`."""
    hidden = int(dim * mlp_ratio)
    table = (2 * window - 1) ** 2 * heads
    attention = _linear(dim, 3 * dim) + _linear(dim, dim) + (0 if conditioning in NO_POSITION_BIAS else table)
    adaln = 6 * dim  # shift, scale, gate for attention and MLP
    time_outputs = {"tmsa": 3 * dim, "adaln": adaln, "adaln-relpos": adaln, "bias": table, "mlp": dim}
    time_outputs["decoupled"] = 2 * dim
    time_outputs["added-per-stage"] = 0  # time-free attention: the U-Net's stages take the time (`_unet_size`)
    return attention + _linear(time_dim, time_outputs[conditioning]) + _linear(dim, hidden) + _linear(hidden, dim)


def _index_bytes(window: int, conditioning: str) -> int:
    """The int64 relative-position index buffer of one TMSA layer: [window^2, window^2] (none under adaLN)."""
    return 0 if conditioning in NO_POSITION_BIAS else window**4 * 8


def _latent_size(k: dict[str, Any]) -> tuple[int, int]:
    h, p, c = k["hidden_size"], k["patch_size"], k["in_channels"]
    t, conditioning = k["time_dim"] or h, k["time_conditioning"]
    grid = k["input_size"] // p
    out = 2 * c if k["learn_sigma"] else c
    params = h * c * p * p + h  # patch embedding
    params += grid * grid * h  # fixed position embedding (a parameter, as in DiT)
    params += _linear(256, t) + _linear(t, t)  # time MLP on 256 sinusoidal features
    params += (k["num_classes"] + 1) * t if k["num_classes"] > 0 else 0  # label table with the null row
    params += k["depth"] * _transformer_block(h, k["num_heads"], grid, t, k["mlp_ratio"], conditioning)
    params += _linear(h, p * p * out)  # final layer
    params += _linear(t, 2 * h) if conditioning in ADALN_CONDITIONINGS else 0  # DiT's final adaLN (shift, scale)
    buffers = k["depth"] * _index_bytes(grid, conditioning) + (128 * 4 if k["time_embedding"] == "fourier" else 0)
    return params, buffers


def _unet_size(k: dict[str, Any]) -> tuple[int, int]:
    """`diffit.unet.DiffiTUNet`, every layout of `diffit.unet_layout` (Table 4 A-E)."""
    channels, blocks, cin = list(k["channels"]), list(k["blocks_per_stage"]), k["in_channels"]
    time_dim, conditioning = k.get("time_dim") or 4 * channels[0], k["time_conditioning"]
    encoder, decoder = k.get("encoder", "multi-resolution"), k.get("decoder", "multi-resolution")
    decoder_time = decoder_conditioning(conditioning, k.get("decoder_time_conditioning"))
    patch = k.get("patch_size", 2)
    levels = encoder_levels(k["img_resolution"], channels, blocks, k["window_size"], encoder, patch)

    def transformer(width: int, window: int, stage_conditioning: str) -> int:
        return _transformer_block(width, k["num_heads"], window, time_dim, k["mlp_ratio"], stage_conditioning)

    def res_block(width: int, window: int, stage_conditioning: str) -> int:
        return 2 * width + _conv3x3(width, width) + transformer(width, window, stage_conditioning)  # GN + conv

    def film(width: int, stage_conditioning: str) -> int:  # "added-per-stage": Linear(time_dim, 2 width)
        return _linear(time_dim, 2 * width) if is_stage_conditioning(stage_conditioning) else 0

    params = _linear(channels[0], time_dim) + _linear(time_dim, time_dim)  # time MLP on channels[0] features
    params += (k["num_classes"] + 1) * time_dim if k["num_classes"] > 0 else 0
    params += k.get("augment_dim", 0) * time_dim  # augmentation-label embedding (no bias)
    buffers = 0
    if encoder == "vit":
        params += cin * channels[0] * patch * patch + channels[0]  # patch embedding
        buffers += levels[0].side ** 2 * channels[0] * 4  # fixed float32 sin-cos position embedding
        for level in levels:
            params += film(level.width, conditioning)
            params += level.blocks * transformer(level.width, level.window, conditioning)
    else:
        params += _conv3x3(cin, channels[0])  # input conv
        for stage, level in enumerate(levels):
            params += _conv3x3(channels[stage - 1], level.width) if stage else 0  # downsample
            params += film(level.width, conditioning)
            params += level.blocks * res_block(level.width, level.window, conditioning)
    # One index buffer per block: the encoder's stages (and the U decoder's, all but the deepest, below).
    buffers += sum(level.blocks * _index_bytes(level.window, conditioning) for level in levels)
    if decoder == "setr-mla":
        mla = k.get("mla_channels") or channels[0]
        for level in levels:  # 1x1 reduction, two 3x3 convs with their GroupNorms
            params += _linear(level.width, mla) + _conv3x3(mla, mla) + 2 * mla + _conv3x3(mla, mla // 2) + mla
        params += _conv3x3(len(levels) * (mla // 2), cin)  # the head on the concatenated streams
    else:
        for level, deeper in zip(levels[:-1], levels[1:]):  # upsample conv, skip fusion conv, FiLM, ResBlocks
            params += _conv3x3(deeper.width, deeper.width) + _conv3x3(deeper.width + level.width, level.width)
            params += film(level.width, decoder_time)
            params += level.blocks * res_block(level.width, level.window, decoder_time)
            buffers += level.blocks * _index_bytes(level.window, decoder_time)
        params += 2 * channels[0] + _conv3x3(channels[0], cin)  # head: GroupNorm + conv
    fourier = channels[0] // 2 * 4 if k["time_embedding"] == "fourier" else 0
    return params, buffers + fourier


def _songunet_size(k: dict[str, Any]) -> tuple[int, int]:
    """`diffit.songunet.SongUNet`, walked as its constructor walks it."""
    mc, emb, cin0, cout0 = (
        k["model_channels"],
        k["model_channels"] * k["channel_mult_emb"],
        k["in_channels"],
        k["out_channels"],
    )
    noise = mc * k["channel_mult_noise"]
    filter_bytes = len(k["resample_filter"]) ** 2 * 4  # the float32 `resample_filter` buffer of a resampling conv
    params = _linear(noise, emb) + _linear(emb, emb)  # map_layer0, map_layer1
    params += _linear(k["label_dim"], noise) if k["label_dim"] else 0
    params += k["augment_dim"] * noise  # map_augment, no bias
    buffers = noise // 2 * 4 if k["embedding_type"] == "fourier" else 0  # FourierEmbedding.freqs

    def block(cin: int, cout: int, res: int, attention: bool = False, resample: bool = False) -> tuple[int, int]:
        size = 2 * cin + _conv3x3(cin, cout) + _linear(emb, cout) + 2 * cout + _conv3x3(cout, cout)
        size += cin * cout + cout if cout != cin or resample else 0  # 1x1 skip
        memory = 2 * filter_bytes if resample else 0  # conv0 and skip resample
        if attention:
            size += 2 * cout + _linear(cout, 3 * cout) + _linear(cout, cout)  # norm2, qkv, proj
            if k["tmsa"]:
                size += _linear(emb, 3 * cout) + (2 * res - 1) ** 2  # qkv_time, relative position bias (1 head)
                memory += res**4 * 8  # int64 relative-position index
        return size, memory

    def add(size_memory: tuple[int, int]) -> None:
        nonlocal params, buffers
        params, buffers = params + size_memory[0], buffers + size_memory[1]

    cout, caux, skips = cin0, cin0, []
    for level, mult in enumerate(k["channel_mult"]):
        res = k["img_resolution"] >> level
        if level == 0:
            cin, cout = cout, mc
            add((_conv3x3(cin, cout), 0))
        else:
            add(block(cout, cout, res, resample=True))
            if k["encoder_type"] == "skip":
                add((caux * cout + cout, filter_bytes))  # aux_down (resample only) + aux_skip (1x1)
            if k["encoder_type"] == "residual":
                add((_conv3x3(caux, cout), filter_bytes))
                caux = cout
        skips.append(cout)
        for _ in range(k["num_blocks"]):
            cin, cout = cout, mc * mult
            add(block(cin, cout, res, attention=res in k["attn_resolutions"]))
            skips.append(cout)
    levels = len(k["channel_mult"])
    for level, mult in reversed(list(enumerate(k["channel_mult"]))):
        res = k["img_resolution"] >> level
        if level == levels - 1:
            add(block(cout, cout, res, attention=True))
            add(block(cout, cout, res))
        else:
            add(block(cout, cout, res, resample=True))
        for idx in range(k["num_blocks"] + 1):
            cin, cout = cout + skips.pop(), mc * mult
            add(block(cin, cout, res, attention=idx == k["num_blocks"] and res in k["attn_resolutions"]))
        if k["decoder_type"] == "skip" or level == 0:
            if k["decoder_type"] == "skip" and level < levels - 1:
                add((0, filter_bytes))  # aux_up (resample only)
            add((2 * cout + _conv3x3(cout, cout0), 0))  # aux_norm, aux_conv
    return params, buffers


FAMILY_SIZES = {"latent": _latent_size, "image": _unet_size, "songunet": _songunet_size}
