"""Class names of a model: `id2label` (class index -> "comma, separated, names", diffusers' DiT convention) and
the name -> index lookup `DiffiTPipeline.labels` / `get_label_ids` build from it.

ImageNet's 1000 classes ship as data (`diffit/data/imagenet_classes.json`: [wnid, names] in the standard 0-999
order, i.e. sorted WordNet ids, with the names of diffusers' DiT `id2label`). An export's `id2label` comes from:

* its config.json's `dataset.label_map` ({class folder name: index}, what `diffit-pipe encode` records in the
  dataset manifest): an ImageNet synset id becomes its English names, any other folder name stays as it is;
* a released NVlabs checkpoint (config.json's `released` entry, 1000 classes): ImageNet's names;
* otherwise none (`get_label_ids` then says so; pass `id2label=` to `DiffiTPipeline.from_pretrained`).
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

IMAGENET_CLASSES_FILE = "data/imagenet_classes.json"


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """The 1000 ImageNet classes as (wnid, "comma, separated, names"), index = position (sorted wnids)."""
    text = resources.files("diffit").joinpath(IMAGENET_CLASSES_FILE).read_text(encoding="utf-8")
    classes = tuple((str(wnid), str(names)) for wnid, names in json.loads(text)["classes"])
    wnids = [wnid for wnid, _ in classes]
    if len(classes) != 1000 or wnids != sorted(set(wnids)):
        raise ValueError(f"diffit/{IMAGENET_CLASSES_FILE}: expected 1000 sorted, unique synset ids")
    return classes


def imagenet_id2label() -> dict[int, str]:
    """ImageNet class index -> its English names (diffusers' DiT `id2label`)."""
    return {index: names for index, (_, names) in enumerate(imagenet_classes())}


def id2label_from_label_map(label_map: Mapping[str, Any], num_classes: int, where: str) -> dict[int, str]:
    """{folder name: index} -> {index: names}: ImageNet synset ids become their English names. The map must hold
    exactly the indices 0 .. num_classes - 1 (`where` names the file for the error)."""
    names = dict(imagenet_classes())
    indices = sorted(int(index) for index in label_map.values())
    if indices != list(range(num_classes)):
        raise ValueError(
            f"{where}: dataset.label_map must hold exactly the class indices 0..{num_classes - 1} of the model "
            f"({num_classes} classes), got {len(indices)} entries"
        )
    return {int(index): names.get(str(folder), str(folder)) for folder, index in label_map.items()}


def export_id2label(extra: Mapping[str, Any], num_classes: int, where: str) -> dict[int, str] | None:
    """The `id2label` an export's config.json entries stand for (module docstring), None when it records none."""
    if not num_classes:
        return None
    label_map = (extra.get("dataset") or {}).get("label_map")
    if label_map is not None:
        return id2label_from_label_map(label_map, num_classes, where)
    if extra.get("released") is not None and num_classes == 1000:
        return imagenet_id2label()
    return None


def checked_id2label(id2label: Mapping[Any, str] | None, num_classes: int) -> dict[int, str] | None:
    """`id2label` with int keys, each in [0, num_classes) (JSON gives string keys)."""
    if id2label is None:
        return None
    checked = {int(index): str(names) for index, names in id2label.items()}
    outside = sorted(index for index in checked if not 0 <= index < num_classes)
    if outside:
        raise ValueError(f"id2label has class indices {outside[:5]} outside [0, {num_classes}) of the model")
    return dict(sorted(checked.items()))


def label_lookup(id2label: Mapping[int, str] | None) -> tuple[dict[str, int], dict[str, list[int]]]:
    """(name -> index for every comma-separated name of one class only, sorted; name -> indices for the names
    several classes share, e.g. ImageNet's "crane" (134, the bird; 517, the machine))."""
    owners: dict[str, list[int]] = {}
    for index, names in (id2label or {}).items():
        for name in names.split(","):
            name = name.strip()
            if name and index not in owners.setdefault(name, []):
                owners[name].append(index)
    unique = {name: indices[0] for name, indices in sorted(owners.items()) if len(indices) == 1}
    shared = {name: sorted(indices) for name, indices in sorted(owners.items()) if len(indices) > 1}
    return unique, shared


def label_ids(names: str | list[str], labels: Mapping[str, int], shared: Mapping[str, list[int]]) -> list[int]:
    """Class indices of `names` (one name or a list); a clear ValueError for a name that is unknown (with the
    closest known names) or that several classes share (with their indices)."""
    if not labels and not shared:
        raise ValueError(
            "this pipeline has no class names (its export records no dataset.label_map): pass class ids, or load "
            "it with DiffiTPipeline.from_pretrained(..., id2label={0: 'name', ...})"
        )
    ids = []
    for name in [names] if isinstance(names, str) else list(names):
        if name in labels:
            ids.append(labels[name])
        elif name in shared:
            raise ValueError(f"{name!r} names several classes {shared[name]}: pass one of these class ids")
        else:
            close = difflib.get_close_matches(name, list(labels) + list(shared), n=5, cutoff=0.6)
            hint = f"closest names: {close}" if close else "see pipe.labels for every name"
            raise ValueError(f"{name!r} is not a class name of this model ({hint})")
    return ids
