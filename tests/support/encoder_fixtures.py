"""Tiny random DINOv2-style ViTs (timm), saved in the official `dinov2_vit?14_pretrain.pth` key format or as timm's
safetensors, for the encoder loader and FD_DINOv2 tests (`pipeline.core.encoders`, `pipeline.evaluate.dinov2`)."""

from __future__ import annotations

from pathlib import Path

import torch

PATCH = 14


def tiny_timm_dinov2(
    embed_dim: int = 32,
    depth: int = 2,
    grid: int = 4,
    swiglu: bool = False,
    seed: int = 0,
    dynamic_img_size: bool = False,
):
    """timm's `VisionTransformer` of DINOv2's layout (LayerScale, patch 14, CLS token, final norm), pre-trained grid
    `grid` x `grid` (`grid * 14` px), every parameter drawn at random (LayerScale gammas included, so they are not
    all equal as after a fresh initialisation)."""
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    mlp = {"mlp_ratio": 6.0, "mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU} if swiglu else {"mlp_ratio": 4.0}
    model = VisionTransformer(
        img_size=grid * PATCH,
        patch_size=PATCH,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=max(1, embed_dim // 64),
        init_values=1e-5,
        num_classes=0,
        dynamic_img_size=dynamic_img_size,
        **mlp,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            scale = 0.5 if name.endswith("gamma") else 0.2
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


def official_state_dict(model) -> dict[str, torch.Tensor]:
    """`model`'s state dict in facebookresearch/dinov2's key format: a `mask_token`, and the giant's SwiGLU as
    `mlp.w12` / `mlp.w3` (timm's `fc1` / `fc2`); every other key is the same in both."""
    swiglu = _is_swiglu(model)
    state = {}
    for key, value in model.state_dict().items():
        if swiglu:
            key = key.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
        state[key] = value.clone()
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    return state


def _is_swiglu(model) -> bool:
    mlp = model.blocks[0].mlp
    return mlp.fc2.in_features * 2 == mlp.fc1.out_features


def save_official(model, path: Path) -> Path:
    """The official format: a plain tensor state dict written with `torch.save`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(official_state_dict(model), path)
    return path


def save_timm_safetensors(model, path: Path) -> Path:
    """timm's Hub format: `model.safetensors` with timm's keys."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
