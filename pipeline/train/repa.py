"""REPA in the trainer (Yu et al. 2024, "Representation Alignment for Generation", `sihyun-yu/REPA`).

With `repa.weight` λ > 0 every micro-batch's loss is

    the objective's loss (ADM / EDM / flow, unchanged) + λ * repa_loss(target, projector(h_k))

- h_k: the tokens after block k = `repa.depth` (1-based, REPA's `encoder_depth`) of the training network, captured
  by a forward hook (`BlockTap`) while the objective runs the network, so every objective and every time
  conditioning trains with it unchanged. Latent DiffiT: the output of `model.blocks[k - 1]`, [B, N, hidden]. DiffiT
  U-Net: the k-th DiffiT ResBlock in the order the forward pass runs them (encoder stages from full resolution
  down, then decoder stages back up), its feature map [B, C, H, W] read as H * W tokens of width C (row-major).
  EDM's DDPM++ / NCSN++ have no DiffiT block and are refused.
- projector: REPA's MLP (`diffit.repa.build_projector`, `repa.projector_dim` wide), trained with the model (the
  same optimizer and gradient clipping, as REPA's projectors are part of its SiT), saved in checkpoints (Accelerate's
  `model_1.safetensors`, its EMA in `ema_repa_projector.safetensors`) and restored on resume. REPA's EMA is a deep copy
  of the whole SiT, projectors included, updated with the same decay (`train.py`: `update_ema(ema, model)`), so the
  projector has an EMA here too; the export never holds it: `ema.safetensors` keeps exactly the keys of a run
  without REPA.
- target: the frozen encoder's per-patch features of the batch's images, computed on the fly without gradients
  (the encoder in eval mode): DINOv2 ViT-S/B/L/G-14 from `repa.encoder_weights` (`pipeline.core.encoders`, REPA's
  preprocessing `diffit.repa.encoder_input`, input size = token grid x 14 px so that its patch grid equals the
  model's, REPA's 224 px for 16 x 16 tokens; position embeddings resampled once by timm's rule, as REPA's
  `load_encoders`), or the demo's classifier (`pipeline.core.small_cnn.ClassifierPatchEncoder`). A grid that still
  differs is matched on the encoder side (`diffit.repa.match_token_grid`). Latent runs read each sample's image from
  the shards (`diffit-pipe encode --keep-images`; flipped with the latent view the sample takes); image runs use
  the batch itself.

The RNG: the projector is drawn right after the model (so the model's initial weights are those of a run without
REPA), the encoder is loaded without drawing from the global streams, and neither the encoder nor the loss draws
anything: the objective's noise and times are those of a run without REPA.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffit.repa import build_projector, encoder_input, match_token_grid, repa_loss
from pipeline.core.errors import InputError

logger = logging.getLogger(__name__)

# `repa.encoder` -> the published DINOv2 backbone (`pipeline.core.encoders.DINOV2_MODELS`).
DINOV2_ENCODERS = {
    "dinov2-vits14": "dinov2_vits14",
    "dinov2-vitb14": "dinov2_vitb14",
    "dinov2-vitl14": "dinov2_vitl14",
    "dinov2-vitg14": "dinov2_vitg14",
}
DEMO_CLASSIFIER = "demo-classifier"
ENCODERS = (*DINOV2_ENCODERS, DEMO_CLASSIFIER)


class RepaError(InputError):
    """REPA cannot run: a model without DiffiT blocks, a block number beyond them, no images, no encoder file."""


# ---------------------------------------------------------------------------------------------------------------
# Block k of a model
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TapPoint:
    """A block whose output REPA can align: the module, the width and grid of its tokens, and their layout
    ("tokens": [B, N, C]; "map": [B, C, H, W], read as H * W tokens)."""

    block: nn.Module
    hidden_size: int
    grid: tuple[int, int]
    layout: str

    def tokens(self, output: torch.Tensor) -> torch.Tensor:
        """The block's output as [B, N, C] tokens (row-major over the grid)."""
        return output if self.layout == "tokens" else output.flatten(2).transpose(1, 2)


def _no_blocks(name: str, family: Any) -> RepaError:
    return RepaError(
        f"repa: {name} ({family} model) has no DiffiT transformer blocks whose tokens REPA could align; REPA trains "
        "latent DiffiT models and the DiffiT U-Net (set repa.weight: 0 for this model)"
    )


def tap_points(model: nn.Module) -> list[TapPoint]:
    """The blocks of `model` REPA can align, in the order the forward pass runs them (`repa.depth` k picks the
    k-th); works on the meta device. RepaError for a model without DiffiT blocks."""
    family = getattr(model, "diffit_family", None)
    if family == "latent":
        grid = (model.grid_size, model.grid_size)
        return [TapPoint(block, model.pos_embed.shape[-1], grid, "tokens") for block in model.blocks]
    if family == "image":
        points = []
        for stage_index, stage in enumerate(model.encoder):
            side = model.img_resolution // 2**stage_index
            width = model.channels[stage_index]
            points += [TapPoint(block, width, (side, side), "map") for block in stage.blocks]
        decoder_stages = reversed(range(len(model.channels) - 1))  # as DiffiTUNet builds its decoder
        for stage_index, stage in zip(decoder_stages, model.decoder):
            side = model.img_resolution // 2**stage_index
            width = model.channels[stage_index]
            points += [TapPoint(block, width, (side, side), "map") for block in stage.blocks]
        return points
    raise _no_blocks(getattr(model, "model_config", {}).get("name", type(model).__name__), family)


def block_count(name: str, kwargs: dict[str, Any]) -> int:
    """How many blocks `tap_points` finds in model `name` built with `kwargs` (read off the keywords, nothing is
    built): the latent model's depth; the U-Net's encoder ResBlocks plus those of every decoder stage."""
    from diffit.models import model_class, model_family, resolve_model_kwargs

    family = model_family(name)
    if family not in ("latent", "image"):
        raise _no_blocks(name, family)
    resolved = resolve_model_kwargs(name, **kwargs)
    defaults = {key: parameter.default for key, parameter in inspect.signature(model_class(name)).parameters.items()}
    if family == "latent":
        return int(resolved.get("depth", defaults["depth"]))
    per_stage = list(resolved.get("blocks_per_stage", defaults["blocks_per_stage"]))
    return sum(per_stage) + sum(per_stage[:-1])


class BlockTap:
    """A forward hook on block k that keeps its output while armed (`capture`): the objective's one network call.
    Disarmed it ignores the block, so the recomputation of gradient checkpointing (in the backward pass) and any
    other call leave nothing behind."""

    def __init__(self, point: TapPoint):
        self.point = point
        self.armed = False
        self.output: torch.Tensor | None = None
        self.handle = point.block.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if not self.armed:
            return
        if self.output is not None:
            raise RuntimeError("repa: block k ran twice in one loss evaluation; the alignment target is ambiguous")
        self.output = output

    @contextlib.contextmanager
    def capture(self):
        """Keep block k's output during the `with` body (an error in it drops what was kept)."""
        self.output, self.armed = None, True
        try:
            yield self
        except BaseException:
            self.output = None
            raise
        finally:
            self.armed = False

    def tokens(self) -> torch.Tensor:
        """The captured output as [B, N, C] tokens (released: the next capture starts empty)."""
        output, self.output = self.output, None
        if output is None:
            raise RuntimeError("repa: block k did not run while the objective evaluated the network")
        return self.point.tokens(output)

    def remove(self) -> None:
        self.handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# The frozen encoders
# ---------------------------------------------------------------------------------------------------------------


class DINOv2Targets(nn.Module):
    """DINOv2's normed patch tokens of [B, 3, H, W] images with values in [0, 255], preprocessed as REPA does."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.grid = encoder.grid
        self.embed_dim = encoder.embed_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.patch_tokens(encoder_input(pixels, self.encoder.img_size))


class ClassifierTargets(nn.Module):
    """The demo classifier's last feature map as tokens, of [B, 3, H, W] images with values in [0, 255]."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.grid = encoder.grid
        self.embed_dim = encoder.embed_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.patch_tokens(pixels.float() / 127.5 - 1.0)


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


def load_target_encoder(encoder: str, weights: str | None, grid: tuple[int, int]) -> nn.Module:
    """The frozen target encoder `repa.encoder` of the file / directory `weights`, for a model token grid `grid`
    (DINOv2 is built for the input size whose patch grid is `grid`). One RepaError / EncoderWeightsError line
    naming the file when it is missing or unusable. Draws nothing from the global RNG streams."""
    with torch.random.fork_rng(devices=[]):  # timm initialises the ViT at random before the weights are loaded
        if encoder == DEMO_CLASSIFIER:
            from pipeline.core.small_cnn import ClassifierError, ClassifierPatchEncoder, load_classifier

            try:
                classifier = load_classifier(_existing(encoder, weights))
            except ClassifierError as error:
                raise RepaError(f"repa.encoder_weights: {error}") from None
            return _frozen(ClassifierTargets(ClassifierPatchEncoder(classifier)))
        from pipeline.core.encoders import dinov2_from_state_dict, dinov2_spec, read_state_dict

        path = _existing(encoder, weights)
        state = read_state_dict(path)
        spec = dinov2_spec(state, path)
        wanted = DINOV2_ENCODERS[encoder]
        if spec.name is not None and spec.name != wanted:
            raise RepaError(f"repa.encoder is {encoder} but {path} holds {spec.name}; name the encoder it holds")
        if spec.name is None:
            logger.warning("repa: %s is not a published DINOv2 backbone (%s)", path, spec.describe())
        size = (grid[0] * spec.patch_size, grid[1] * spec.patch_size)
        # REPA's `load_encoders` resamples the hub model's position embeddings once with timm's rule.
        return _frozen(DINOv2Targets(dinov2_from_state_dict(state, size, "timm", path)))


def _existing(encoder: str, weights: str | None) -> str:
    """`repa.encoder_weights`, or one RepaError naming the file (or directory) to place there."""
    if encoder == DEMO_CLASSIFIER:
        if weights is None or not Path(weights).expanduser().is_dir():
            where = f"{weights} does not exist" if weights is not None else "not set"
            raise RepaError(
                f"repa.encoder_weights: {where}; demo-classifier needs the directory of a classifier saved by "
                "`diffit-pipe demo` (config.json + model.safetensors)"
            )
        return str(Path(weights).expanduser())
    if weights is None or not Path(weights).expanduser().is_file():
        from pipeline.core.encoders import missing_weights_message

        raise RepaError(f"repa.encoder_weights: {missing_weights_message(weights, DINOV2_ENCODERS[encoder])}")
    return str(Path(weights).expanduser())


def check_repa_inputs(config, info) -> None:
    """Before Accelerate starts: the encoder file is there, and a latent dataset holds each sample's image."""
    from pipeline.core.shard_members import IMAGE_MEMBER

    repa = config.repa
    if repa.weight == 0:
        return
    _existing(repa.encoder, repa.encoder_weights)
    if info.kind == "latents" and IMAGE_MEMBER not in (info.manifest.get("members") or []):
        raise RepaError(
            f"{info.manifest_path}: repa.weight {repa.weight} aligns the model to {repa.encoder} features of each "
            "sample's image, and these latent shards hold no images; encode the dataset again with the images "
            "kept (`diffit-pipe encode SOURCE NEW_OUT --keep-images` with the same other options) and train on "
            "NEW_OUT, or set repa.weight: 0"
        )


# ---------------------------------------------------------------------------------------------------------------
# The alignment term of a training step
# ---------------------------------------------------------------------------------------------------------------


class RepaAlignment:
    """The encoder, the projector (and its EMA) and the hook on block k of one run; `__call__` evaluates the
    objective and the alignment loss of one micro-batch."""

    def __init__(self, weight: float, point: TapPoint, projector: nn.Module, encoder: nn.Module):
        self.weight = weight
        self.point = point
        self.projector = projector  # replaced by the prepared (possibly DDP-wrapped) one in `build_model`
        self.ema_projector = _frozen(copy.deepcopy(projector).float())
        self.encoder = encoder
        self.tap: BlockTap | None = None

    def attach(self) -> None:
        """Hook block k (after the EMA copy of the model was made: the EMA must not carry the hook)."""
        if self.tap is None:
            self.tap = BlockTap(self.point)

    def pixels(self, x: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """The batch's images with values in [0, 255]: the stream's (latent runs), or the batch itself (image runs:
        x = pixels / 127.5 - 1)."""
        if images is not None:
            return images
        return (x.float() + 1.0) * 127.5

    def targets(self, x: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """The encoder's tokens of the batch's images on the model's token grid, without gradients."""
        with torch.no_grad():
            tokens = self.encoder(self.pixels(x, images))
        return match_token_grid(tokens, self.point.grid, self.encoder.grid)

    def __call__(self, objective, network, x, labels, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(the objective's loss, repa_loss) of one micro-batch; the step trains loss + weight * repa_loss."""
        target = self.targets(x, images)
        with self.tap.capture():
            loss = objective(network, x, labels)
        projected = self.projector(self.tap.tokens())
        return loss, repa_loss(target, projected)


def build_repa(config, model: nn.Module) -> RepaAlignment | None:
    """The run's REPA parts for `model` (fresh, unwrapped) when `repa.weight` > 0, else None. Call it right after the
    model is built: the encoder is loaded without drawing from the global RNG, then the projector is drawn from it
    (the same on every rank)."""
    repa = config.repa
    if repa.weight == 0:
        return None
    point = tap_points(model)[repa.depth - 1]
    encoder = load_target_encoder(repa.encoder, repa.encoder_weights, point.grid)
    projector = build_projector(point.hidden_size, repa.projector_dim, encoder.embed_dim)
    return RepaAlignment(repa.weight, point, projector, encoder)


__all__ = [
    "DEMO_CLASSIFIER",
    "DINOV2_ENCODERS",
    "ENCODERS",
    "BlockTap",
    "RepaAlignment",
    "RepaError",
    "TapPoint",
    "block_count",
    "build_repa",
    "check_repa_inputs",
    "load_target_encoder",
    "tap_points",
]
