"""ImageNet as it is downloaded, in miniature: the train archive (a tar of per-class tars), the validation archive
(one flat tar) with devkit-style labels, WebDataset tars and Hugging Face style parquet shards, built from an image
tree so that every layout can be compared with encoding the extracted folder."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar (USTAR / PAX as Python writes it) of (name, data) members, in the given order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def class_members(class_dir: Path) -> list[tuple[str, bytes]]:
    """The files below one class folder as tar members (relative names), in reverse name order: the archive
    order must not matter."""
    files = sorted((p for p in class_dir.rglob("*") if p.is_file()), reverse=True)
    return [(p.relative_to(class_dir).as_posix(), p.read_bytes()) for p in files]


def make_train_archive(tree: Path, path: Path, edit=None) -> Path:
    """ILSVRC2012_img_train.tar from a class tree: one `SYNSET.tar` per class folder (outer members in reverse
    order). `edit(synset, inner tar bytes) -> bytes` may damage an inner tar."""
    inner = []
    for class_dir in sorted((p for p in tree.iterdir() if p.is_dir()), reverse=True):
        data = tar_bytes(class_members(class_dir))
        inner.append((f"{class_dir.name}.tar", edit(class_dir.name, data) if edit else data))
    path.write_bytes(tar_bytes(inner))
    return path


def inner_tar_size(members: list[tuple[str, bytes]]) -> int:
    return len(tar_bytes(members))
