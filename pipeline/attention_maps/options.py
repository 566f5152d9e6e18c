"""What `diffit-pipe attention-maps` is asked, parsed from its flags and checked against the model once, before
the network runs: every refusal is one `InputError` line naming the flag."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError, brief

# Bounds on the picture: rows = blocks x heads, columns = times.
MAX_ROWS = 256
MAX_TIMES = 32
# The times drawn when --timesteps is not given, per kind (ADM: fractions of the chain, see `default_times`).
DEFAULT_TIMES = {"edm": (80.0, 2.0, 0.1), "flow": (1.0, 0.5, 0.1)}


@dataclass
class AttentionMapsOptions:
    """One attention-maps picture: `blocks` x `heads` rows, one column per time of `times` (the model's own time
    variable; None: `default_times`), the query token `query` (row, col on the model's token grid; None: its
    centre), class `class_label` (None: unconditional models only), noise from `seed`. Writes `out` (a .png) and
    the maps beside it (`out` with .npz). `heads` None: every head."""

    model_dir: Path
    out: Path
    class_label: int | None = None
    times: tuple[float, ...] | None = None
    blocks: tuple[int, ...] = (0,)
    heads: tuple[int, ...] | None = None
    query: tuple[int, int] | None = None
    seed: int = 0
    device: str | None = None

    @classmethod
    def from_flags(
        cls,
        model_dir: Path,
        out: Path,
        class_label: int | None = None,
        timesteps: str | None = None,
        blocks: str = "0",
        heads: str = "all",
        query: str = "center",
        seed: int = 0,
        device: str | None = None,
    ) -> AttentionMapsOptions:
        """The options from the command's text flags (`--blocks 0,3`, `--heads all`, `--query center|ROW,COL`,
        `--timesteps 999,500,100`); a malformed value is one InputError naming its flag."""
        query_value = None if query.strip().lower() in ("center", "centre") else _numbers(query, "--query", int)
        if query_value is not None and len(query_value) != 2:
            raise InputError(f"--query {brief(query)}: expected 'center' or ROW,COL (two integers)")
        return cls(
            model_dir=Path(model_dir),
            out=Path(out),
            class_label=class_label,
            times=None if timesteps is None else _numbers(timesteps, "--timesteps", float),
            blocks=_numbers(blocks, "--blocks", int),
            heads=None if heads.strip().lower() == "all" else _numbers(heads, "--heads", int),
            query=None if query_value is None else (query_value[0], query_value[1]),
            seed=seed,
            device=device,
        )


def _numbers(text: str, flag: str, kind: type) -> tuple:
    """'0,3' -> (0, 3) (or floats); InputError naming `flag` otherwise."""
    items = [item.strip() for item in str(text).split(",")]
    try:
        values = tuple(kind(item) for item in items)
    except ValueError:
        expected = "integers" if kind is int else "numbers"
        raise InputError(f"{flag} {brief(text)}: expected comma-separated {expected}, e.g. 0,3") from None
    return values


def default_times(kind: str, diffusion: dict[str, Any]) -> tuple[float, ...]:
    """ADM: T - 1, T / 2, T / 10 of the model's chain (999, 500, 100 for 1000 steps); EDM: sigma 80, 2, 0.1;
    flow: t 1, 0.5, 0.1."""
    if kind == "adm":
        steps = int(diffusion.get("diffusion_steps", 1000))
        return tuple(dict.fromkeys(float(t) for t in (steps - 1, steps // 2, steps // 10)))
    return DEFAULT_TIMES[kind]


@dataclass(frozen=True)
class Request:
    """The options resolved against the model: what `run_attention_maps` draws."""

    kind: str
    times: tuple[float, ...]
    blocks: tuple[int, ...]
    heads: tuple[int, ...]
    query: tuple[int, int]
    class_label: int | None
    png: Path
    npz: Path


def check_options(
    options: AttentionMapsOptions, kind: str, diffusion: dict[str, Any], model_facts: dict[str, Any]
) -> Request:
    """Check every option against the model (`model_facts`: blocks, heads, grid, num_classes); one InputError
    line naming the flag for the first problem."""
    from diffit.attention_maps import check_time

    out = Path(options.out)
    if out.suffix.lower() != ".png":
        raise InputError(f"--out {out}: the grid is a PNG; name it FILE.png (the maps go beside it as FILE.npz)")
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory; name a FILE.png")
    blocks_count, heads_count, grid = model_facts["blocks"], model_facts["heads"], model_facts["grid"]
    if blocks_count == 0:
        raise InputError(f"{options.model_dir}: the model has no attention blocks to draw")
    if not options.blocks:
        raise InputError("--blocks: choose at least one block")
    for block in options.blocks:
        if not 0 <= block < blocks_count:
            raise InputError(
                f"--blocks {block}: no such attention block; {options.model_dir} has {blocks_count} "
                f"(0..{blocks_count - 1}, in forward order)"
            )
    heads = tuple(range(heads_count)) if options.heads is None else tuple(options.heads)
    for head in heads:
        if not 0 <= head < heads_count:
            raise InputError(f"--heads {head}: no such head; the attention has {heads_count} (0..{heads_count - 1})")
    if len(options.blocks) * len(heads) > MAX_ROWS:
        raise InputError(
            f"--blocks x --heads: {len(options.blocks) * len(heads)} rows; at most {MAX_ROWS} in one picture"
        )
    times = default_times(kind, diffusion) if options.times is None else tuple(options.times)
    if not times or len(times) > MAX_TIMES:
        raise InputError(f"--timesteps: give 1..{MAX_TIMES} times, got {len(times)}")
    for time in times:
        problem = check_time(kind, time, diffusion)
        if problem:
            shown = int(time) if math.isfinite(time) and time == int(time) else time
            raise InputError(f"--timesteps {shown}: {problem} ({options.model_dir} is a {kind} model)")
    query = (grid // 2, grid // 2) if options.query is None else tuple(options.query)
    if not (0 <= query[0] < grid and 0 <= query[1] < grid):
        unit = "pixels" if model_facts["family"] == "image" else "tokens"
        raise InputError(
            f"--query {query[0]},{query[1]}: outside the model's {grid}x{grid} grid ({unit}, 0..{grid - 1})"
        )
    classes = model_facts["num_classes"]
    if classes == 0 and options.class_label is not None:
        raise InputError(f"--class {options.class_label}: {options.model_dir} is unconditional; leave --class out")
    if classes > 0:
        if options.class_label is None:
            raise InputError(
                f"--class: {options.model_dir} is class-conditional; pass --class C (0..{classes - 1}, or {classes} "
                "for the null class of classifier-free guidance)"
            )
        if not 0 <= options.class_label <= classes:
            raise InputError(f"--class {options.class_label}: expected 0..{classes - 1} (or {classes}, the null class)")
    if not 0 <= options.seed < 2**63:
        raise InputError(f"--seed {options.seed}: expected an integer in [0, 2^63)")
    return Request(
        kind,
        times,
        tuple(options.blocks),
        heads,
        (int(query[0]), int(query[1])),
        options.class_label,
        out,
        out.with_suffix(".npz"),
    )
