"""Named DiffiT configurations (like DiT's `DiT_models`) as data: sizes, constructor arguments, model families.

Latent models `DiffiT-{S,B,L,XL}/{2,4,8}` follow DiT's sizes (depth x hidden x heads); image-space models
`DiffiT-CIFAR10` and `DiffiT-FFHQ64` follow the paper's supplementary Sec. I. `DiffiT-Tiny/2` and
`DiffiT-UNet-Tiny` are small configurations for tests, demos and CPU smoke runs; `DDPM++-CIFAR10` and
`NCSN++-CIFAR10` are EDM's baselines (`diffit.songunet`). This module builds nothing (and
imports no model class), so that the loaders' checks (`diffit.config_check`) and the Hub mixin can read it;
`diffit.models.create_model` builds a configuration.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

# (depth, hidden_size, num_heads) of the latent sizes, as in DiT.
LATENT_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    # The supplementary (Sec. H.2) says depth 30; the released model and the 561M of Table 9 are depth 28.
    "XL": (28, 1152, 16),
}


def _latent_configs() -> dict[str, dict[str, Any]]:
    configs = {}
    for size, (depth, hidden, heads) in LATENT_SIZES.items():
        for patch in (2, 4, 8):
            configs[f"DiffiT-{size}/{patch}"] = {
                "family": "latent",
                "kwargs": {
                    "depth": depth,
                    "hidden_size": hidden,
                    "num_heads": heads,
                    "patch_size": patch,
                    "input_size": 32,
                    "in_channels": 4,
                    "num_classes": 1000,
                    "learn_sigma": True,
                },
                "native_resolution": 256,
            }
    configs["DiffiT-Tiny/2"] = {
        "family": "latent",
        "kwargs": {
            "depth": 2,
            "hidden_size": 64,
            "num_heads": 2,
            "patch_size": 2,
            "input_size": 8,
            "in_channels": 4,
            "num_classes": 10,
            "learn_sigma": True,
        },
        "native_resolution": 64,
    }
    return configs


def _image_configs() -> dict[str, dict[str, Any]]:
    # Supplementary Sec. I: channels 128 in the first stage and 256 after (kept constant to hold parameters and
    # latency), windows of 4 (CIFAR-10) / 8 (FFHQ-64), blocks per stage (2, 2, 2) / (1, 2, 2, 2). Sec. H lists
    # L = 4 blocks per stage instead; Sec. I is the trained configuration, so it is the default here and
    # `blocks_per_stage` overrides it. The paper follows EDM's training setup, hence EDM's residual dropout
    # (0.13 on CIFAR-10, 0.05 on FFHQ-64).
    return {
        "DiffiT-CIFAR10": {
            "family": "image",
            "kwargs": {
                "img_resolution": 32,
                "in_channels": 3,
                "channels": [128, 256, 256],
                "blocks_per_stage": [2, 2, 2],
                "window_size": 4,
                "num_heads": 4,
                "num_classes": 0,
                "dropout": 0.13,
            },
            "native_resolution": 32,
        },
        "DiffiT-FFHQ64": {
            "family": "image",
            "kwargs": {
                "img_resolution": 64,
                "in_channels": 3,
                "channels": [128, 256, 256, 256],
                "blocks_per_stage": [1, 2, 2, 2],
                "window_size": 8,
                "num_heads": 4,
                "num_classes": 0,
                "dropout": 0.05,
            },
            "native_resolution": 64,
        },
        "DiffiT-UNet-Tiny": {
            "family": "image",
            "kwargs": {
                "img_resolution": 16,
                "in_channels": 3,
                "channels": [32, 64],
                "blocks_per_stage": [1, 1],
                "window_size": 4,
                "num_heads": 2,
                "num_classes": 0,
            },
            "native_resolution": 16,
        },
    }


def _songunet_configs() -> dict[str, dict[str, Any]]:
    # EDM's baselines (`diffit.songunet.SongUNet`): train.py's --arch=ddpmpp / --arch=ncsnpp at CIFAR-10 size, with
    # its CIFAR-10 defaults: dropout 0.13, augment_dim 9 (--augment=0.12, `diffit.augment.AugmentPipe`), and
    # label_dim 0 (--cond=False; pass label_dim=10 for the class-conditional models). `tmsa=True` is the TMSA form
    # of the DiffiT paper's Table 5.
    common = {
        "img_resolution": 32,
        "in_channels": 3,
        "out_channels": 3,
        "label_dim": 0,
        "augment_dim": 9,
        "model_channels": 128,
        "channel_mult": [2, 2, 2],
        "channel_mult_emb": 4,
        "num_blocks": 4,
        "attn_resolutions": [16],
        "dropout": 0.13,
        "label_dropout": 0.0,
        "decoder_type": "standard",
        "tmsa": False,
    }
    ddpmpp = {"embedding_type": "positional", "encoder_type": "standard", "channel_mult_noise": 1}
    ncsnpp = {"embedding_type": "fourier", "encoder_type": "residual", "channel_mult_noise": 2}
    return {
        "DDPM++-CIFAR10": {
            "family": "songunet",
            "kwargs": {**common, **ddpmpp, "resample_filter": [1, 1]},
            "native_resolution": 32,
        },
        "NCSN++-CIFAR10": {
            "family": "songunet",
            "kwargs": {**common, **ncsnpp, "resample_filter": [1, 3, 3, 1]},
            "native_resolution": 32,
        },
    }


MODEL_CONFIGS: dict[str, dict[str, Any]] = {**_latent_configs(), **_image_configs(), **_songunet_configs()}

# Paper Table 9 (ImageNet-256): parameters and GFLOPs as published, shown beside ours by `diffit-pipe models`.
PAPER_TABLE9 = {
    "DiT-XL/2": {"params_m": 675, "gflops": 119},
    "DiffiT-XL/2": {"params_m": 561, "gflops": 114},
}


def model_family(name: str) -> str:
    """'latent' (LatentDiffiT), 'image' (DiffiTUNet) or 'songunet' (EDM's DDPM++ / NCSN++, `diffit.songunet`)."""
    return _lookup(name)["family"]


def _lookup(name: str) -> dict[str, Any]:
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[name]


def resolve_model_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """The named configuration's constructor arguments with `overrides` applied."""
    kwargs = copy.deepcopy(_lookup(name)["kwargs"])
    kwargs.update(overrides)
    return kwargs


# The class that builds each family, as an entry point ("module:Class", resolved on first use): the Hub mixin,
# which the classes derive from, finds the class a config.json names here without importing the classes'
# modules (they import it).
FAMILY_CLASSES = {
    "latent": "diffit.latent:LatentDiffiT",
    "image": "diffit.unet:DiffiTUNet",
    "songunet": "diffit.songunet:SongUNet",
}


def model_class(name: str) -> type:
    """The class that builds configuration `name`: `LatentDiffiT`, `DiffiTUNet` or `SongUNet`."""
    module, _, attribute = FAMILY_CLASSES[model_family(name)].partition(":")
    return getattr(importlib.import_module(module), attribute)
