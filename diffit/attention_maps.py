"""Attention maps of TMSA over the diffusion time (the paper's Figs. 2 / 5): where one query token looks, per block
and head, for a given network input. Pure torch, no I/O; `diffit-pipe attention-maps` renders them.

    x, label = noised_input("adm", noise, 999, {"diffusion_steps": 1000, "noise_schedule": "linear"})
    maps = attention_maps(model, x[None], label[None], torch.tensor([207]), blocks=[0, 3], heads=[0, 1])
    maps.maps[0]        # [1, 2, H, W]: block 0, heads 0 and 1, softmax(Q K^T / sqrt(d) + B) of the query row

How the capture stays the forward's: the models' forward is not changed. A forward hook on each chosen block's
`diffit.layers.TMSA` receives the layer's own inputs (tokens, time token) and output; `attention_probabilities`
takes q, k, v and the bias from `TMSA.queries_keys_values`, the very function the forward attends with (its time
term, time-dependent bias or separate time key, whichever the layer has), and every capture is still checked:
`attention_output(layer, probabilities, v)` (the probabilities' weighted sum of V through the layer's output
projection) must equal the output the layer itself returned, else `AttentionCaptureError` -- so an attention
backend that computed something else would fail loudly instead of drawing wrong maps.

Geometry (`attention_sites`): blocks are numbered in forward order. Latent DiffiT attends globally over its token
grid, so a map is the whole grid. The image U-Net attends within local windows (`window_partition`), so a map is the
window that holds the query, at that block's resolution. The query is given on the model's finest token grid (the
patch tokens of a latent model, the pixels of an image model) and follows the block's resolution: stage i of the
U-Net (feature maps 2^i times smaller) takes token (row // 2^i, col // 2^i); the ViT encoder of Table 4 A attends
over its whole patch grid (token (row // p, col // p)). Time-free attention ("added-per-stage") is drawn the same
way: its maps change over time only through the features. Default: the grid's centre token.

The network input (`noised_input`) follows the model's own time variable: the ADM timestep t (integer, 0 .. T-1)
for "adm" exports, EDM's sigma for "edm" exports (the network sees c_in x and c_noise of the export's
preconditioning, as the sampler builds it: EDM's c_noise = ln(sigma) / 4, or VP / VE), flow time t in [0, 1]
(1 = noise) for "flow" exports. With no data, x_t is the forward
process around an all-zero x_0 (the mean of normalised data): sqrt(1 - abar_t) eps, sigma eps, t eps.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layers import TMSA

__all__ = [
    "TIME_VARIABLES",
    "AttentionCaptureError",
    "AttentionMaps",
    "AttentionSite",
    "attention_maps",
    "attention_output",
    "attention_probabilities",
    "attention_sites",
    "check_time",
    "noised_input",
    "query_grid_size",
]

# The time variable of each export kind, as the samplers name it (`diffit.sampling`).
TIME_VARIABLES = {
    "adm": "ADM timestep t (an integer 0 .. diffusion_steps - 1; T - 1 is pure noise)",
    "edm": "EDM noise level sigma (> 0; the network sees it through the export's preconditioning)",
    "flow": "flow time t in [0, 1] (1 is pure noise, 0 the data)",
}

# Relative tolerance of the capture check (fp32; SDPA and the written-out softmax differ by ~1e-6).
CAPTURE_TOLERANCE = 1e-4


class AttentionCaptureError(RuntimeError):
    """The recomputed attention does not reproduce the layer's own output (its forward changed)."""


@dataclass(frozen=True)
class AttentionSite:
    """One attention layer of a model, in forward order.

    `feature_size`: side of the block's token grid; `window`: side of its attention window (= `feature_size` for
    global attention); `stride`: tokens of the model's query grid per token of this block (1, or 2^stage)."""

    index: int
    name: str
    module: TMSA
    feature_size: int
    window: int
    stride: int


def _family(model: nn.Module) -> str:
    family = getattr(model, "diffit_family", None)
    if family not in ("latent", "image"):
        raise ValueError(
            f"{type(model).__name__}: attention maps are drawn for DiffiT latent and image models "
            "(LatentDiffiT, DiffiTUNet)"
        )
    return family


def query_grid_size(model: nn.Module) -> int:
    """Side of the grid the query is given on: patch tokens (latent DiffiT) or pixels (image U-Net)."""
    return int(model.grid_size) if _family(model) == "latent" else int(model.img_resolution)


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """Every TMSA layer of a latent DiffiT or image U-Net with its token geometry, in forward order."""
    sites = []
    if _family(model) == "latent":
        for index, block in enumerate(model.blocks):
            grid = int(model.grid_size)
            sites.append(AttentionSite(index, f"blocks.{index}.attn", block.attn, grid, grid, 1))
        return sites
    for site in model.block_sites():  # every layout of Table 4: ResBlocks on windows, ViT blocks on the whole grid
        name = f"{site.name}.transformer.attn"
        sites.append(AttentionSite(len(sites), name, site.block.transformer.attn, site.side, site.window, site.stride))
    return sites


def attention_probabilities(
    layer: TMSA, x: torch.Tensor, time_token: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(Q K^T / sqrt(d) + B) [B*nW, heads, N, M], V [B*nW, heads, M, head_dim]) of `layer` on its inputs,
    in float32, from the q, k, v and B the layer's forward computes (`TMSA.queries_keys_values`). M = N, or N + 1 with a
    separate time token ("decoupled": its key is the last column)."""
    q, k, v, bias = layer.queries_keys_values(x, time_token)  # the forward's own q, k, v and B
    head_dim = q.shape[-1]
    scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(head_dim)
    if bias is not None:
        scores = scores + bias.float()
    return scores.softmax(dim=-1), v.float()


def attention_output(layer: TMSA, probabilities: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The layer's output from its attention: proj(concat over heads of probabilities @ V), [B*nW, N, dim]."""
    batch_windows, heads, tokens, _ = probabilities.shape
    out = (probabilities @ v).transpose(1, 2).reshape(batch_windows, tokens, heads * v.shape[-1])
    return layer.proj(out.to(layer.proj.weight.dtype))


@dataclass
class AttentionMaps:
    """What `attention_maps` captured, per chosen block (lists in the order of `blocks`).

    maps[i]: [N, len(heads), window, window] probabilities of the query token over the keys of its window (the whole
    token grid for latent DiffiT); time_key[i]: [N, len(heads)] probability on the separate time token of a
    "decoupled" layer, None for other layers (with it, each map sums to 1 - time_key); query[i]: the query's
    (row, col) inside its map; origin[i]: the map's top-left token in the block's feature map; feature_size[i]: the
    side of that feature map."""

    blocks: tuple[int, ...]
    heads: tuple[int, ...]
    maps: list[torch.Tensor]
    time_key: list[torch.Tensor | None]
    query: list[tuple[int, int]]
    origin: list[tuple[int, int]]
    feature_size: list[int]

    def stacked(self) -> torch.Tensor:
        """[N, len(blocks), len(heads), S, S] with S the largest window; a smaller window is padded with NaN."""
        size = max(m.shape[-1] for m in self.maps)
        out = torch.full((self.maps[0].shape[0], len(self.maps), len(self.heads), size, size), float("nan"))
        for i, block_maps in enumerate(self.maps):
            out[:, i, :, : block_maps.shape[-2], : block_maps.shape[-1]] = block_maps.cpu()
        return out


def _check_request(
    sites: list[AttentionSite], grid: int, heads_count: int, blocks, heads, query
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, int]]:
    blocks, heads = tuple(int(b) for b in blocks), tuple(int(h) for h in heads)
    if not blocks or not heads:
        raise ValueError("choose at least one block and one head")
    bad = [b for b in blocks if not 0 <= b < len(sites)]
    if bad:
        raise ValueError(
            f"block {bad[0]} does not exist: the model has {len(sites)} attention blocks (0..{len(sites) - 1})"
        )
    bad = [h for h in heads if not 0 <= h < heads_count]
    if bad:
        raise ValueError(f"head {bad[0]} does not exist: the attention has {heads_count} heads (0..{heads_count - 1})")
    query = (grid // 2, grid // 2) if query is None else (int(query[0]), int(query[1]))
    if not (0 <= query[0] < grid and 0 <= query[1] < grid):
        raise ValueError(f"query {query} is outside the {grid}x{grid} token grid")
    return blocks, heads, query


def attention_maps(
    model: nn.Module,
    x: torch.Tensor,
    noise_labels: torch.Tensor,
    class_labels: torch.Tensor | None,
    blocks: Sequence[int],
    heads: Sequence[int],
    query: tuple[int, int] | None = None,
) -> AttentionMaps:
    """Run `model(x, noise_labels, class_labels)` once (no grad) and return the attention of the `query` token
    (row, col on `query_grid_size(model)`'s grid; default its centre) in each of `blocks` (indices into
    `attention_sites(model)`) and `heads`. `x` and `noise_labels` are what the network itself is called with
    (`noised_input` makes them from a model time). Raises ValueError for a block, head or query that does not
    exist and `AttentionCaptureError` when a recomputed attention does not reproduce its layer's output."""
    sites = attention_sites(model)
    heads_count = sites[0].module.num_heads if sites else 0
    blocks, heads, query = _check_request(sites, query_grid_size(model), heads_count, blocks, heads, query)
    batch = x.shape[0]
    captured: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    handles = []

    def capture(site: AttentionSite):
        signature = inspect.signature(site.module.forward)

        def hook(module, args, kwargs, output):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            probabilities, v = attention_probabilities(module, bound.arguments["x"], bound.arguments["time_token"])
            recomputed = attention_output(module, probabilities, v)
            scale = max(1.0, float(output.detach().abs().max()))
            error = float((recomputed.float() - output.float()).abs().max())
            if not error <= CAPTURE_TOLERANCE * scale:
                raise AttentionCaptureError(
                    f"{site.name}: the recomputed attention gives the layer's output only to {error:.3g} (allowed "
                    f"{CAPTURE_TOLERANCE * scale:.3g}); TMSA.forward changed and diffit.attention_maps must follow it"
                )
            row, col = query[0] // site.stride, query[1] // site.stride
            per_row = site.feature_size // site.window
            window = (row // site.window) * per_row + col // site.window
            windows = torch.arange(batch, device=probabilities.device) * per_row**2 + window
            in_window = (row % site.window) * site.window + col % site.window
            rows = probabilities[windows][:, list(heads), in_window]  # [N, heads, M]
            spatial = site.window**2
            maps = rows[..., :spatial].reshape(batch, len(heads), site.window, site.window)
            time_key = rows[..., spatial] if rows.shape[-1] > spatial else None
            captured[site.index] = (maps.cpu(), None if time_key is None else time_key.cpu())

        return hook

    for index in dict.fromkeys(blocks):
        handles.append(sites[index].module.register_forward_hook(capture(sites[index]), with_kwargs=True))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x, noise_labels, class_labels)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    result = AttentionMaps(blocks, heads, [], [], [], [], [])
    for index in blocks:
        site = sites[index]
        row, col = query[0] // site.stride, query[1] // site.stride
        result.maps.append(captured[index][0])
        result.time_key.append(captured[index][1])
        result.query.append((row % site.window, col % site.window))
        result.origin.append((row - row % site.window, col - col % site.window))
        result.feature_size.append(site.feature_size)
    return result


def check_time(kind: str, value: float, diffusion: dict | None = None) -> str | None:
    """Why `value` is not a time of a `kind` model (a phrase), or None when it is one."""
    diffusion = diffusion or {}
    if not math.isfinite(value):
        return "not a finite number"
    if kind == "adm":
        steps = int(diffusion.get("diffusion_steps", 1000))
        if value != int(value) or not 0 <= value < steps:
            return f"ADM timesteps are integers 0..{steps - 1} (this model's chain has {steps} steps)"
    elif kind == "edm":
        if not value > 0:
            return "an EDM sigma must be > 0"
    elif kind == "flow":
        if not 0 <= value <= 1:
            return "flow time lies in [0, 1] (1 = noise)"
    else:
        return f"unknown model kind {kind!r}; expected one of {', '.join(TIME_VARIABLES)}"
    return None


def noised_input(
    kind: str, noise: torch.Tensor, time: float, diffusion: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(network input x [C, H, W], noise label []) of a `kind` model at its own `time` (`TIME_VARIABLES`) for the
    forward process around x_0 = 0 with the given `noise` eps: ADM sqrt(1 - abar_t) eps with label t; EDM x = sigma
    eps through the export's preconditioning as the sampler builds it (`diffit.edm.make_precond` of
    `diffusion["precond"]`, default EDM's: c_in sigma eps, label ln(sigma) / 4); flow t eps with label t."""
    diffusion = diffusion or {}
    problem = check_time(kind, float(time), diffusion)
    if problem:
        raise ValueError(f"time {time!r}: {problem}")
    noise = noise.float()
    if kind == "adm":
        from .diffusion import create_diffusion

        chain = create_diffusion(
            None,
            str(diffusion.get("noise_schedule", "linear")),
            diffusion_steps=int(diffusion.get("diffusion_steps", 1000)),
        )
        t = torch.tensor([int(time)])
        x = chain.q_sample(torch.zeros_like(noise)[None], t, noise[None])[0].float()
        return x, t.float()[0]
    if kind == "edm":
        from .edm import make_precond

        seen = {}

        def network(x_in, c_noise, class_labels=None, **_):  # records what the preconditioning hands the network
            seen["x"], seen["label"] = x_in, c_noise
            return torch.zeros_like(x_in)

        sigma = torch.tensor([float(time)], dtype=torch.float64)
        precond = make_precond(str(diffusion.get("precond", "edm")), network, float(diffusion.get("sigma_data", 0.5)))
        precond(sigma * noise.double()[None], sigma)
        return seen["x"][0].float(), seen["label"].reshape(-1)[0].float()
    t = torch.tensor(float(time))
    return t * noise, t
