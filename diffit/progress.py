"""The samplers' progress bars: `progress` is False (none), True (a bar) or a dict of tqdm settings (what
diffusers' `set_progress_bar_config(**kwargs)` holds: `desc`, `leave`, `position`, `ncols`, `disable`, ...)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable, desc: str, progress: bool | dict[str, Any]) -> Iterable:
    """`iterable` wrapped in a tqdm bar as `progress` asks (see the module docstring)."""
    if isinstance(progress, dict):
        return tqdm(iterable, **{"desc": desc, **progress})
    return tqdm(iterable, desc=desc, disable=not progress)
