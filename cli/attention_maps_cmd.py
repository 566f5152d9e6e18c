"""`diffit-pipe attention-maps`: TMSA attention of one query token over the diffusion time
(`pipeline.attention_maps`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.core.logs import setup_logging

ATTENTION_MAPS_HELP = """Draw where one query token attends, in chosen blocks and heads, at several diffusion times:
the paper's point that TMSA's attention changes with time (Figs. 2 / 5). Rows are block x head, columns are times;
each tile is softmax(Q K^T / sqrt(d) + B) of the query over the keys, the query outlined in red, one colour scale
per row (0 .. the row's largest probability) so the columns of a row compare directly.

\b
  diffit-pipe attention-maps models/in256-xl2 --class 207 --timesteps 999,500,100 --blocks 0,27 --out a.png
  diffit-pipe attention-maps models/cifar10 --timesteps 80,2,0.1 --blocks 0,3 --query 4,20 --out attn.png
\b
--timesteps is the model's own time variable: the ADM timestep t (integers 0..T-1, T-1 = pure noise) for latent
ADM exports, EDM's sigma for image-space EDM exports, flow time t in [0, 1] (1 = noise) for flow exports. For each
time the network runs once on x_t of the forward process around an all-zero x_0 (the mean of normalised data),
from one noise drawn from --seed: sqrt(1 - abar_t) eps (ADM), sigma eps through the export's preconditioning as the
sampler builds it (EDM), t eps (flow). No data and no VAE are read.
\b
Blocks are numbered in forward order (latent DiffiT: its transformer blocks; image U-Net: the encoder's ResBlocks,
then the decoder's). The query is a token of the model's finest grid (latent: patch tokens; image: pixels), the
grid's centre by default; a U-Net block at a coarser resolution takes the token that covers it, and its map is the
local attention window that holds the query (the latent model's attention is global: its map is the whole grid).
Writes OUT (a .png) and OUT with .npz beside it: the maps (blocks x heads x times x S x S) and their axes."""

MODEL_HELP = "Exported model directory (model.safetensors + config.json), as `diffit-pipe export` writes it."
CLASS_HELP = (
    "Class label for class-conditional models (0..K-1; K is the null class of guidance). Leave out for "
    "unconditional ones."
)
TIMESTEPS_HELP = (
    "Comma-separated times in the model's own variable: ADM timestep (integers; default T-1, T/2, T/10, e.g. "
    "999,500,100), EDM sigma (default 80,2,0.1), flow t in [0, 1] (default 1,0.5,0.1)."
)
BLOCKS_HELP = "Comma-separated attention block indices, in forward order (0 = the first)."
HEADS_HELP = "Comma-separated head indices, or 'all'."
QUERY_HELP = "'center' or ROW,COL on the model's finest token grid (latent: patch tokens; image models: pixels)."
OUT_HELP = "The picture (FILE.png); the raw maps are written beside it as FILE.npz."
SEED_HELP = "Seed of the noise eps that x_t is made from (the same for every time)."
DEVICE_HELP = "cpu or cuda; default: cuda when available. The network runs in float32."


def attention_maps(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help=MODEL_HELP)],
    out: Annotated[Path, typer.Option("--out", metavar="FILE.png", help=OUT_HELP)],
    class_label: Annotated[int | None, typer.Option("--class", metavar="C", help=CLASS_HELP)] = None,
    timesteps: Annotated[str | None, typer.Option("--timesteps", metavar="T,T,...", help=TIMESTEPS_HELP)] = None,
    blocks: Annotated[str, typer.Option("--blocks", metavar="B,B,...", help=BLOCKS_HELP)] = "0",
    heads: Annotated[str, typer.Option("--heads", metavar="H,H,...|all", help=HEADS_HELP)] = "all",
    query: Annotated[str, typer.Option("--query", metavar="center|ROW,COL", help=QUERY_HELP)] = "center",
    seed: Annotated[int, typer.Option("--seed", help=SEED_HELP)] = 0,
    device: Annotated[str | None, typer.Option("--device", help=DEVICE_HELP)] = None,
) -> None:
    setup_logging()
    from pipeline.attention_maps import AttentionMapsOptions, run_attention_maps

    options = AttentionMapsOptions.from_flags(model, out, class_label, timesteps, blocks, heads, query, seed, device)
    result = run_attention_maps(options)
    times = ",".join(f"{time:g}" for time in result.times)
    typer.echo(f"wrote {result.png} ({result.rows} rows block x head; columns {result.time_caption} = {times})")
    typer.echo(f"wrote {result.npz} (the maps and their axes)")


def register(app: typer.Typer) -> None:
    """Add `attention-maps` to the main app."""
    app.command("attention-maps", help=ATTENTION_MAPS_HELP)(attention_maps)
