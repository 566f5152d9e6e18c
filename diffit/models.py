"""Named DiffiT configurations (like DiT's `DiT_models`) and model accounting (parameters, FLOPs).

Latent models `DiffiT-{S,B,L,XL}/{2,4,8}` follow DiT's sizes (depth x hidden x heads); image-space models
`DiffiT-CIFAR10` and `DiffiT-FFHQ64` follow the paper's supplementary Sec. I. `DiffiT-Tiny/2` and
`DiffiT-UNet-Tiny` are small configurations for tests, demos and CPU smoke runs. `DDPM++-CIFAR10` and
`NCSN++-CIFAR10` are EDM's DDPM++ / NCSN++ baselines (`diffit.songunet`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .configs import LATENT_SIZES, MODEL_CONFIGS, PAPER_TABLE9, _lookup, model_class, model_family, resolve_model_kwargs

__all__ = [
    "LATENT_SIZES",
    "MODEL_CONFIGS",
    "PAPER_TABLE9",
    "count_flops",
    "count_parameters",
    "create_model",
    "model_class",
    "model_family",
    "model_stats",
    "resolve_model_kwargs",
]


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a named configuration, e.g. `create_model("DiffiT-XL/2")` or
    `create_model("DiffiT-B/4", input_size=64, num_classes=10)` (ImageNet-512 latents are 64x64).

    The model carries `model_config = {"name", "kwargs"}` so that `save_pretrained` can rebuild it, and an empty
    `pretrained_extra` (the other config.json entries, filled by `from_pretrained`; see `diffit.hub`).
    """
    kwargs = resolve_model_kwargs(name, **overrides)
    model = model_class(name)(**kwargs)
    model.model_config = {"name": name, "kwargs": kwargs}
    model.pretrained_extra = {}  # config.json entries besides "model" (see diffit.hub)
    return model


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not (the fixed position embedding included, as DiT and the paper count)."""
    return sum(p.numel() for p in model.parameters())


def example_inputs(model: nn.Module, batch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x, noise_labels, class_labels) of the right shapes for `model` (one-hot class vectors for a SongUNet)."""
    size = model.input_size
    x = torch.randn(batch_size, model.in_channels, size, size)
    noise_labels = torch.full((batch_size,), 500.0)
    label_dim = getattr(model, "label_dim", None)  # SongUNet (EDM): [N, label_dim] one-hot, or none
    if label_dim is not None:
        return x, noise_labels, torch.zeros(batch_size, label_dim) if label_dim else None
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
