"""`run_attention_maps`: an exported model -> a PNG of TMSA attention maps over the diffusion time + the maps as
.npz beside it (`diffit-pipe attention-maps`).

Load the export (`diffit.load_pretrained`; no VAE: nothing is decoded), check the options against it
(`options.check_options`), draw one noise eps from the seed, and for each time run the network once on the forward
process at that time around x_0 = 0 (`diffit.attention_maps.noised_input`) with the class label, capturing the
query token's attention in the chosen blocks and heads (`diffit.attention_maps.attention_maps`); then write the maps
and the picture, each atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.attention_maps.options import AttentionMapsOptions, Request, check_options
from pipeline.attention_maps.render import Row, render
from pipeline.core.atomic import atomic_open
from pipeline.core.errors import InputError, one_line
from pipeline.core.grids import write_png

logger = logging.getLogger(__name__)

TIME_CAPTIONS = {"adm": "t", "edm": "sigma", "flow": "t"}


@dataclass(frozen=True)
class AttentionMapsResult:
    """What `run_attention_maps` wrote: the picture, the maps, and what their axes are."""

    png: Path
    npz: Path
    time_variable: str
    time_caption: str  # "t" or "sigma"
    times: tuple[float, ...]
    rows: int


def load_export(model_dir: Path) -> tuple[Any, dict[str, Any], str]:
    """(model in eval mode on the CPU, config.json, kind) of an export; InputError for anything else."""
    import diffit

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir}: not an exported model directory (no config.json; see `diffit-pipe export`)")
    try:
        model, config = diffit.load_pretrained(model_dir, device="cpu")
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        raise InputError(f"{model_dir}: cannot load the exported model ({one_line(error)})") from None
    diffusion = config.get("diffusion")
    if not isinstance(diffusion, dict) or diffusion.get("type") not in ("adm", "edm", "flow"):
        raise InputError(f"{model_dir / 'config.json'}: needs 'diffusion': {{'type': 'adm' | 'edm' | 'flow', ...}}")
    if getattr(model, "diffit_family", None) not in ("latent", "image"):
        raise InputError(
            f"{model_dir}: {config['model']['name']} has no DiffiT attention to draw (latent and image DiffiT only)"
        )
    return model, config, diffusion["type"]


def model_facts(model) -> dict[str, Any]:
    """What the options are checked against: attention blocks, heads, query grid, classes, family."""
    from diffit.attention_maps import attention_sites, query_grid_size

    sites = attention_sites(model)
    return {
        "blocks": len(sites),
        "heads": sites[0].module.num_heads if sites else 0,
        "grid": query_grid_size(model),
        "num_classes": int(getattr(model, "num_classes", 0)),
        "family": model.diffit_family,
    }


def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available here")
    return device


def run_attention_maps(options: AttentionMapsOptions) -> AttentionMapsResult:
    """Draw the attention maps `options` ask for; returns what was written (see the module docstring)."""
    import torch

    from diffit.attention_maps import TIME_VARIABLES, attention_maps, noised_input
    from diffit.diffusion import randn_per_sample

    model, config, kind = load_export(options.model_dir)
    diffusion = config["diffusion"]
    facts = model_facts(model)
    request = check_options(options, kind, diffusion, facts)
    device = _device(options.device)
    model = model.to(device=device, dtype=torch.float32)
    shape = (int(model.in_channels), int(model.input_size), int(model.input_size))
    noise = randn_per_sample([torch.Generator().manual_seed(int(options.seed))], shape)[0]
    labels = None if request.class_label is None else torch.tensor([request.class_label], device=device)
    logger.info(
        "%s: %d times of the %s, x_t from seed %d around x_0 = 0, query %s on the %dx%d grid",
        options.model_dir,
        len(request.times),
        TIME_VARIABLES[kind],
        options.seed,
        request.query,
        facts["grid"],
        facts["grid"],
    )
    per_time, noise_labels = [], []
    for time in request.times:
        x, label = noised_input(kind, noise, time, diffusion)
        captured = attention_maps(
            model, x[None].to(device), label[None].to(device), labels, request.blocks, request.heads, request.query
        )
        per_time.append(captured)
        noise_labels.append(float(label))
    write_npz(request, per_time, noise_labels, options, kind)
    rows = picture_rows(request, per_time)
    captions = [f"{TIME_CAPTIONS[kind]}={time:g}" for time in request.times]
    corner = "" if request.class_label is None else f"class {request.class_label}"
    write_png(request.png, render(rows, captions, corner))
    logger.info("wrote %s (%d rows x %d times) and %s", request.png, len(rows), len(captions), request.npz)
    return AttentionMapsResult(
        request.png, request.npz, TIME_VARIABLES[kind], TIME_CAPTIONS[kind], request.times, len(rows)
    )


def picture_rows(request: Request, per_time: list) -> list[Row]:
    """One `Row` per (block, head) in the order asked: its maps over the times."""
    rows = []
    for b, block in enumerate(request.blocks):
        for h, head in enumerate(request.heads):
            maps = np.stack([captured.maps[b][0, h].numpy() for captured in per_time])
            rows.append(Row(f"b{block} h{head}", maps, per_time[0].query[b]))
    return rows


def write_npz(request: Request, per_time: list, noise_labels: list[float], options, kind: str) -> Path:
    """The raw maps, atomically: `maps` [blocks, heads, times, S, S] (S the largest window; a smaller block's
    window is NaN-padded, its side in `map_size`), `time_key` [blocks, heads, times] (the separate time token's
    share in "decoupled" blocks, NaN elsewhere), `query` / `origin` [blocks, 2] (the query inside each map, the
    map's top-left in the block's feature map), `feature_size`, `blocks`, `heads`, `times`, `noise_labels`,
    `time_variable`, `kind`, `query_grid`, `class_label` (-1: none), `seed`, `model`."""
    first = per_time[0]
    size = max(m.shape[-1] for m in first.maps)
    shape = (len(request.blocks), len(request.heads), len(request.times))
    maps = np.full((*shape, size, size), np.nan, dtype=np.float32)
    time_key = np.full(shape, np.nan, dtype=np.float32)
    for t, captured in enumerate(per_time):
        for b, block_maps in enumerate(captured.maps):
            side = block_maps.shape[-1]
            maps[b, :, t, :side, :side] = block_maps[0].numpy()
            if captured.time_key[b] is not None:
                time_key[b, :, t] = captured.time_key[b][0].numpy()
    from diffit.attention_maps import TIME_VARIABLES

    arrays = {
        "maps": maps,
        "time_key": time_key,
        "map_size": np.array([m.shape[-1] for m in first.maps], dtype=np.int64),
        "query": np.array(first.query, dtype=np.int64).reshape(-1, 2),
        "origin": np.array(first.origin, dtype=np.int64).reshape(-1, 2),
        "feature_size": np.array(first.feature_size, dtype=np.int64),
        "blocks": np.array(request.blocks, dtype=np.int64),
        "heads": np.array(request.heads, dtype=np.int64),
        "times": np.array(request.times, dtype=np.float64),
        "noise_labels": np.array(noise_labels, dtype=np.float64),
        "time_variable": np.array(TIME_VARIABLES[kind]),
        "kind": np.array(kind),
        "query_grid": np.array(request.query, dtype=np.int64),
        "class_label": np.array(-1 if request.class_label is None else request.class_label, dtype=np.int64),
        "seed": np.array(options.seed, dtype=np.int64),
        "model": np.array(str(Path(options.model_dir).resolve())),
    }
    with atomic_open(request.npz, "wb") as handle:
        np.savez(handle, **arrays)
    return request.npz
