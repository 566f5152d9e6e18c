"""Named DiffiT configurations (like DiT's `DiT_models`) and model accounting (parameters, FLOPs).

Latent models `DiffiT-{S,B,L,XL}/{2,4,8}` follow DiT's sizes (depth x hidden x heads); image-space models
`DiffiT-CIFAR10` and `DiffiT-FFHQ64` follow the paper's supplementary Sec. I. `DiffiT-Tiny/2` and
`DiffiT-UNet-Tiny` are small configurations for tests, demos and CPU smoke runs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

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


MODEL_CONFIGS: dict[str, dict[str, Any]] = {**_latent_configs(), **_image_configs()}

# Paper Table 9 (ImageNet-256): parameters and GFLOPs as published, shown beside ours by `diffit-pipe models`.
PAPER_TABLE9 = {
    "DiT-XL/2": {"params_m": 675, "gflops": 119},
    "DiffiT-XL/2": {"params_m": 561, "gflops": 114},
}


def model_family(name: str) -> str:
    """'latent' or 'image'."""
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


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a named configuration, e.g. `create_model("DiffiT-XL/2")` or
    `create_model("DiffiT-B/4", input_size=64, num_classes=10)` (ImageNet-512 latents are 64x64).

    The model carries `model_config = {"name", "kwargs"}` so that `save_pretrained` can rebuild it, and an empty
    `pretrained_extra` (the other config.json entries, filled by `from_pretrained`; see `diffit.hub`).
    """
    kwargs = resolve_model_kwargs(name, **overrides)
    if model_family(name) == "latent":
        from .latent import LatentDiffiT

        model = LatentDiffiT(**kwargs)
    else:
        from .unet import DiffiTUNet

        model = DiffiTUNet(**kwargs)
    model.model_config = {"name": name, "kwargs": kwargs}
    model.pretrained_extra = {}  # config.json entries besides "model" (see diffit.hub)
    return model


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not (the fixed position embedding included, as DiT and the paper count)."""
    return sum(p.numel() for p in model.parameters())


def example_inputs(model: nn.Module, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x, noise_labels, class_labels) of the right shapes for `model`."""
    size = model.input_size
    x = torch.randn(batch_size, model.in_channels, size, size)
    noise_labels = torch.full((batch_size,), 500.0)
    class_labels = torch.zeros(batch_size, dtype=torch.long) if model.num_classes > 0 else None
    return x, noise_labels, class_labels


def count_flops(model: nn.Module, batch_size: int = 1) -> dict[str, float]:
    """Forward FLOPs per image counted the way DiT and the paper count them: one multiply-add = one FLOP
    (torch's FlopCounterMode counts 2 per multiply-add, so its totals are halved).

    Returns {"total", "attention", "linear_conv"}: "attention" is the QK^T and AV products inside
    scaled-dot-product attention. Attention is forced onto the math backend so that it is counted at all
    (the fused CPU kernel is invisible to the counter). Works on models built on the meta device, which costs
    no memory: `with torch.device("meta"): model = create_model("DiffiT-XL/2")`.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    x, noise_labels, class_labels = (t.to(device) if t is not None else None for t in example_inputs(model, batch_size))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        model(x, noise_labels, class_labels)
    per_op = {str(op): count / 2 / batch_size for op, count in counter.get_flop_counts()["Global"].items()}
    # The math backend computes attention as two batched matmuls; every other bmm-free op is a linear/conv.
    attention = sum(v for op, v in per_op.items() if "bmm" in op or "baddbmm" in op)
    total = counter.get_total_flops() / 2 / batch_size
    return {"total": total, "attention": attention, "linear_conv": total - attention}


def model_stats(name: str, **overrides: Any) -> dict[str, Any]:
    """Parameters and forward GFLOPs of a named configuration, built on the meta device (fast, no memory)."""
    with torch.device("meta"):
        model = create_model(name, **overrides)
    flops = count_flops(model)
    params = count_parameters(model)
    return {
        "name": name,
        "family": model_family(name),
        "resolution": _lookup(name)["native_resolution"],
        "params": params,
        "params_m": params / 1e6,
        "gflops": flops["total"] / 1e9,
        "gflops_without_attention": flops["linear_conv"] / 1e9,
        "paper": PAPER_TABLE9.get(name),
    }
