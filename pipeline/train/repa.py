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
  differs is matched on the encoder side (`diffit.repa.match_token_grid`). The encoders are
  `pipeline.core.target_encoders`. `repa.targets` says where the targets come from:
  - `online` (default): latent runs read each sample's image from the shards (`diffit-pipe encode --keep-images`;
    flipped with the latent view the sample takes) and run the encoder on the batch; image runs use the batch
    itself.
  - `stored`: latent runs read the targets from the shards (`diffit-pipe encode --encoder-targets ENCODER
    --encoder-weights PATH`: the same encoder module run on each crop and its flip at encode time, float16), the
    view that matches the sample's latent view; the encoder is never loaded. At the start the manifest's encoder,
    weights sha256 and token grid must equal the run's (`check_stored_targets`). docs/benchmarks.md ("REPA's
    targets: stored or online") measured both and explains the default.

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
from typing import Any

import torch
from torch import nn

from diffit.repa import build_projector, match_token_grid, repa_loss
from pipeline.core.errors import InputError
from pipeline.core.target_encoders import (
    DEMO_CLASSIFIER,
    DINOV2_ENCODERS,
    ENCODERS,
    existing_weights,
    input_grid,
    load_target_encoder,
    weights_sha256,
)

logger = logging.getLogger(__name__)


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
    if family == "image":  # every layout of Table 4 (ViT encoder, SETR-MLA decoder): the model lists its blocks
        return [TapPoint(site.block, site.width, (site.side, site.side), "map") for site in model.block_sites()]
    raise _no_blocks(getattr(model, "model_config", {}).get("name", type(model).__name__), family)


def block_count(name: str, kwargs: dict[str, Any]) -> int:
    """How many blocks `tap_points` finds in model `name` built with `kwargs` (read off the keywords, nothing is
    built): the latent model's depth; the U-Net's encoder blocks plus those of every U decoder stage (SETR-MLA has
    none)."""
    from diffit.models import model_class, model_family, resolve_model_kwargs

    family = model_family(name)
    if family not in ("latent", "image"):
        raise _no_blocks(name, family)
    resolved = resolve_model_kwargs(name, **kwargs)
    defaults = {key: parameter.default for key, parameter in inspect.signature(model_class(name)).parameters.items()}
    if family == "latent":
        return int(resolved.get("depth", defaults["depth"]))
    per_stage = list(resolved.get("blocks_per_stage", defaults["blocks_per_stage"]))
    if resolved.get("decoder", defaults["decoder"]) == "setr-mla":  # no decoder blocks (ViT: depth in one entry)
        return sum(per_stage)
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
# The frozen encoder, or the targets stored with the data
# ---------------------------------------------------------------------------------------------------------------


def check_repa_inputs(config, info, model_kwargs: dict[str, Any] | None = None) -> None:
    """Before Accelerate starts: the encoder file is there; online, a latent dataset holds each sample's image;
    stored (`repa.targets: stored`), the dataset holds targets of this run's encoder, weights and token grid
    (`model_kwargs`: the run's `create_model` keywords, to read block k's grid off the meta device)."""
    from pipeline.core.shard_members import IMAGE_MEMBER

    repa = config.repa
    if repa.weight == 0:
        return
    existing_weights(repa.encoder, repa.encoder_weights)
    if repa.targets == "stored":
        check_stored_targets(config, info, model_kwargs or {})
        return
    if info.kind == "latents" and IMAGE_MEMBER not in (info.manifest.get("members") or []):
        raise RepaError(
            f"{info.manifest_path}: repa.weight {repa.weight} aligns the model to {repa.encoder} features of each "
            "sample's image, and these latent shards hold no images; encode the dataset again with the images "
            "kept (`diffit-pipe encode SOURCE NEW_OUT --keep-images` with the same other options) and train on "
            "NEW_OUT, or set repa.weight: 0"
        )


def check_stored_targets(config, info, model_kwargs: dict[str, Any]) -> None:
    """The dataset's stored targets are those this run would compute online: the same encoder, the same weights
    (sha256) and, for DINOv2, the input size of block k's token grid. One RepaError line naming the manifest and
    the setting otherwise."""
    from pipeline.core.shard_members import REPA_MEMBER
    from pipeline.core.stored_targets import REPA_TARGETS_KEY

    repa, where = config.repa, info.manifest_path
    entry = info.manifest.get(REPA_TARGETS_KEY)
    if info.kind != "latents" or entry is None or REPA_MEMBER not in (info.manifest.get("members") or []):
        raise RepaError(
            f"{where}: repa.targets is stored but this dataset holds no stored encoder targets; encode it again with "
            f"them (`diffit-pipe encode SOURCE NEW_OUT --encoder-targets {repa.encoder} --encoder-weights PATH` "
            "with the same other options), or set repa.targets: online"
        )
    if entry["encoder"] != repa.encoder:
        raise RepaError(
            f"{where}: the stored targets are {entry['encoder']}'s, repa.encoder is {repa.encoder}; set repa.encoder: "
            f"{entry['encoder']} (and its weights), or set repa.targets: online"
        )
    digest = weights_sha256(repa.encoder, repa.encoder_weights)
    if digest != entry["weights_sha256"]:
        raise RepaError(
            f"{where}: the stored targets were computed with other {repa.encoder} weights (sha256 "
            f"{entry['weights_sha256'][:12]}) than repa.encoder_weights {repa.encoder_weights} ({digest[:12]}); name "
            "the weights the dataset was encoded with, or set repa.targets: online"
        )
    wanted = input_grid(repa.encoder, model_token_grid(config, model_kwargs))
    recorded = tuple(entry["input_grid"]) if entry["input_grid"] is not None else None
    if recorded != wanted:
        raise RepaError(
            f"{where}: the stored targets were computed for a {_grid_text(recorded)} token grid, but block "
            f"{repa.depth} of {config.model.name} has {_grid_text(wanted)} tokens; encode with --token-grid "
            f"{wanted[0]} (latent size / the model's patch size), or set repa.targets: online"
        )


def _grid_text(grid: tuple[int, int] | None) -> str:
    return "any" if grid is None else f"{grid[0]} x {grid[1]}"


def model_token_grid(config, model_kwargs: dict[str, Any]) -> tuple[int, int]:
    """The token grid of block `repa.depth` of the run's model, read off a model built on the meta device."""
    from diffit.models import create_model

    with torch.device("meta"):
        model = create_model(config.model.name, **model_kwargs)
    return tap_points(model)[config.repa.depth - 1].grid


# ---------------------------------------------------------------------------------------------------------------
# The alignment term of a training step
# ---------------------------------------------------------------------------------------------------------------


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


class RepaAlignment:
    """The encoder (None with stored targets), the projector (and its EMA) and the hook on block k of one run;
    `__call__` evaluates the objective and the alignment loss of one micro-batch."""

    def __init__(
        self,
        weight: float,
        point: TapPoint,
        projector: nn.Module,
        encoder: nn.Module | None,
        stored_grid: tuple[int, int] | None = None,
    ):
        self.weight = weight
        self.point = point
        self.projector = projector  # replaced by the prepared (possibly DDP-wrapped) one in `build_model`
        self.ema_projector = _frozen(copy.deepcopy(projector).float())
        self.encoder = encoder  # None: the batches carry the targets (`repa.targets: stored`)
        self.stored_grid = stored_grid  # the grid of the stored tokens (the manifest's `repa_targets.grid`)
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

    def targets(self, x: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
        """The encoder's tokens of the batch's images on the model's token grid, without gradients. `source`: the
        stream's images (online; None for image runs), or the stored tokens of the views the batch took (stored:
        float16 [B, N, D], converted to float32 as the encoder's output is)."""
        if self.encoder is None:
            return match_token_grid(source.float(), self.point.grid, self.stored_grid)
        # In float32 even inside the step's mixed-precision autocast: REPA runs its encoders outside it, and the
        # stored targets (encode, float32 then float16) then equal these to float16 precision under bf16 too.
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            tokens = self.encoder(self.pixels(x, source))
        return match_token_grid(tokens, self.point.grid, self.encoder.grid)

    def __call__(self, objective, network, x, labels, source) -> tuple[torch.Tensor, torch.Tensor]:
        """(the objective's loss, repa_loss) of one micro-batch; the step trains loss + weight * repa_loss."""
        target = self.targets(x, source)
        with self.tap.capture():
            loss = objective(network, x, labels)
        projected = self.projector(self.tap.tokens())
        return loss, repa_loss(target, projected)


def stored_targets_shape(alignment: RepaAlignment | None, manifest: dict[str, Any]) -> tuple[int, int, int] | None:
    """The [2, N, D] shape of each sample's stored targets when the run reads them (`repa.targets: stored`), else
    None: what the data stream checks every member against."""
    from pipeline.core.stored_targets import REPA_TARGETS_KEY, targets_shape

    if alignment is None or alignment.encoder is not None:
        return None
    return targets_shape(manifest[REPA_TARGETS_KEY])


def build_repa(config, model: nn.Module, manifest: dict[str, Any] | None = None) -> RepaAlignment | None:
    """The run's REPA parts for `model` (fresh, unwrapped) when `repa.weight` > 0, else None. Call it right after the
    model is built: the encoder is loaded without drawing from the global RNG (with `repa.targets: stored` it is
    not loaded at all: the width and grid of the targets are the dataset `manifest`'s), then the projector is drawn
    from it (the same on every rank, and the same online and stored)."""
    from pipeline.core.stored_targets import REPA_TARGETS_KEY

    repa = config.repa
    if repa.weight == 0:
        return None
    point = tap_points(model)[repa.depth - 1]
    if repa.targets == "stored":
        entry = (manifest or {}).get(REPA_TARGETS_KEY)
        if entry is None:
            raise RepaError("repa.targets is stored but the dataset's manifest records no stored targets")
        projector = build_projector(point.hidden_size, repa.projector_dim, int(entry["shape"][2]))
        return RepaAlignment(repa.weight, point, projector, None, tuple(entry["grid"]))
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
    "check_stored_targets",
    "load_target_encoder",
    "model_token_grid",
    "stored_targets_shape",
    "tap_points",
]
