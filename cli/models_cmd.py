"""`diffit-pipe models`: the named model configurations with their sizes."""

from __future__ import annotations

import json

import typer


def models(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    name: list[str] = typer.Option(None, "--name", help="Only these configurations (repeatable)."),
) -> None:
    """List every named DiffiT configuration with its exact parameter count and forward GFLOPs at its native
    resolution (one multiply-add = one FLOP, as DiT and the paper count), beside the paper's Table 9.

    GFLOPs are given with and without the attention products QK^T and AV: the paper's 114G for DiffiT-XL/2
    matches the count without them (114.3G); counted with them it is 118.5G (DiT's 118.6G for DiT-XL/2
    includes them). Models are built on the meta device, so this is fast and needs no memory.
    """
    from diffit.models import MODEL_CONFIGS, PAPER_TABLE9, model_stats
    from pipeline.core.logs import setup_logging

    setup_logging()
    names = name or list(MODEL_CONFIGS)
    unknown = [n for n in names if n not in MODEL_CONFIGS]
    if unknown:
        raise typer.BadParameter(f"unknown model(s) {unknown}; known: {', '.join(MODEL_CONFIGS)}")
    rows = [model_stats(n) for n in names]
    if as_json:
        typer.echo(json.dumps({"models": rows, "paper_table9": PAPER_TABLE9}, indent=2))
        return
    header = f"{'model':<18} {'family':<8} {'res':>4} {'parameters':>13} {'M':>8} {'GFLOPs':>8} {'w/o attn':>8}  paper"
    typer.echo(header)
    typer.echo("-" * len(header))
    for row in rows:
        paper = row["paper"]
        paper_text = f"{paper['params_m']}M / {paper['gflops']}G" if paper else ""
        typer.echo(
            f"{row['name']:<18} {row['family']:<8} {row['resolution']:>4} {row['params']:>13,} "
            f"{row['params_m']:>8.2f} {row['gflops']:>8.2f} {row['gflops_without_attention']:>8.2f}  "
            f"{paper_text}"
        )
    typer.echo(
        f"paper Table 9, DiT-XL/2: {PAPER_TABLE9['DiT-XL/2']['params_m']}M / {PAPER_TABLE9['DiT-XL/2']['gflops']}G"
    )


def register(app: typer.Typer) -> None:
    app.command("models")(models)
