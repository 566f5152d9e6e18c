"""A reference set read straight from an image source that `encode` / `pack` read: the ImageNet train or
validation archive, Hugging Face parquet shards, WebDataset tars (local or at a URL), or a folder of images of any
size (`diffit-pipe reference SOURCE OUT.npz --resolution 256`).

Every image is decoded and center-cropped to `resolution` exactly as `pack` does it (`pipeline.encode.transforms.
prepare_image`, ADM's `center_crop_arr`), so the reference of an archive equals the reference of the raw shards
`pack` writes from it. The member index is the encode sources' own (one pass over the tar headers or parquet
footers, cached in the build's work directory so a resumed build does not walk the archive again); each image is
then one seek + read (a ranged GET for a URL) inside the DataLoader workers.

Accounting: members the index already found damaged (a truncated inner tar, an unreadable label, ...) are
failures, listed with their reasons in the reference's `info` and left out of the statistics. A member that cannot
be decoded when its turn comes stops the build with one error naming it (a reference is a measurement: its image
set is not changed silently); the finished statistics chunks are kept, and `pack` (which counts such a member as
failed and writes the rest) followed by `reference` on its shards is the way around it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from pipeline.evaluate.datasets import ReferenceInputError
from pipeline.evaluate.reference.cache import sha256_json
from pipeline.evaluate.reference.formats import Reference

INDEX_DIR = "source-index"
MAX_LISTED_FAILURES = 20


class SourceImageError(ReferenceInputError):
    """An image of a source reference could not be read or decoded."""


class SourceImageDataset(Dataset):
    """The images of source items, center-cropped to `resolution`, as uint8 CHW tensors."""

    def __init__(self, items: list, root: str, resolution: int, max_pixels: int):
        self.items, self.root, self.resolution, self.max_pixels = items, root, resolution, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        from pipeline.encode import ImageDecodeError, item_location, prepare_image, read_item_bytes

        item = self.items[index]
        try:
            pixels, _ = prepare_image(read_item_bytes(item, self.root), self.resolution, self.max_pixels)
        except (OSError, ImageDecodeError) as error:
            raise SourceImageError(
                f"{item_location(item, self.root)}: {error}; a reference needs every image: `diffit-pipe pack` the "
                "source (it counts this member as failed and writes the rest), then build the reference from its shards"
            ) from None
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()  # a read-only crop: copied


def original_message(error: Exception) -> str:
    """The message of an error raised in a DataLoader worker (torch re-raises it wrapped in a traceback text)."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    marker = f"{type(error).__name__}: "  # the traceback's last line: "module.path.ErrorName: message"
    lines = [line for line in text.splitlines() if marker in line and not line.startswith(" ")]
    return lines[-1].split(marker, 1)[1] if lines else text.splitlines()[-1]


def _item_identity(item) -> list[Any]:
    """What identifies an item's image independently of where the source lies on this machine."""
    shard = os.path.basename(item.shard_file) if item.shard_file else None
    return [*item.fingerprint_fields(), shard, item.member_offset, item.member_size]


def open_source_reference(
    source: str | os.PathLike,
    resolution: int,
    work_dir: Path,
    source_format: str = "auto",
    labels: str | None = None,
    max_pixels: int | None = None,
) -> tuple[Reference, SourceImageDataset]:
    """The reference and its dataset for an encode source (see the module docstring); the member index is cached
    under `work_dir`."""
    from pipeline.core.storage import Location
    from pipeline.encode import DEFAULT_MAX_PIXELS, TRANSFORM_NAME, IndexCache, item_location, open_source

    if resolution < 1:
        raise ReferenceInputError(f"--resolution must be >= 1, got {resolution}")
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    (work_dir / INDEX_DIR).mkdir(parents=True, exist_ok=True)
    scan = open_source(source, None, source_format, labels, index_cache=IndexCache(Location.of(work_dir / INDEX_DIR)))
    items, failed = [], []
    for item in scan.items:
        problem = (item.packed_meta or {}).get("index_problem")
        if problem:
            failed.append({"item": item_location(item, scan.root), "reason": str(problem)})
        else:
            items.append(item)
    if not items:
        raise ReferenceInputError(f"{source}: no readable image ({len(failed)} failed: {failed[:3]})")
    content_hash = sha256_json(
        {
            "kind": "source",
            "layout": scan.layout,
            "resolution": resolution,
            "transform": TRANSFORM_NAME,
            "max_pixels": max_pixels,
            "items": [_item_identity(item) for item in items],
        }
    )
    details = {
        "source_layout": scan.layout,
        "transform": f"{TRANSFORM_NAME} to {resolution} px (as `pack`)",
        "items": len(items) + len(failed),
        "failed": {"count": len(failed), "first": failed[:MAX_LISTED_FAILURES]},
        "num_classes": scan.num_classes,
    }
    reference = Reference(Path(os.fspath(source)), "source", (resolution, resolution), len(items), details)
    reference._content_hash = content_hash
    return reference, SourceImageDataset(items, scan.root, resolution, max_pixels)
