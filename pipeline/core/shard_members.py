"""The members of a dataset sample, encoded and decoded: their names (`MEAN_MEMBER`, `STD_MEMBER`, `IMAGE_MEMBER`,
`REPA_MEMBER`, `LABEL_MEMBER`, `META_MEMBER`), the member dicts of a latent or an image sample as writers store them
(`latent_sample`, `image_sample`: `.npy` and PNG bytes), and the bounded decoding readers use (`load_npy_bytes`
refuses a header claiming more data than the member holds, `decode_sample` images over Pillow's pixel limit). The
shard files that hold them are `pipeline.core.shards`.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np

from pipeline.core.shards import json_bytes

# The members of a sample (see docs/architecture.md, "Data formats"), by name everywhere they are read or written.
MEAN_MEMBER, STD_MEMBER, IMAGE_MEMBER, LABEL_MEMBER, META_MEMBER = "mean.npy", "std.npy", "png", "cls", "json"
LATENT_MEMBERS = (MEAN_MEMBER, STD_MEMBER, LABEL_MEMBER, META_MEMBER)  # plus IMAGE_MEMBER with `encode --keep-images`
# REPA's stored targets (`encode --encoder-targets`): float16 [2, N, D], the encoder's patch tokens of the crop and
# of its flip (`pipeline.core.stored_targets`).
REPA_MEMBER = "repa.npy"
IMAGE_MEMBERS = (IMAGE_MEMBER, LABEL_MEMBER, META_MEMBER)


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as `.npy` bytes (format 1.0, no pickle): what `np.load` reads back."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), version=(1, 0), allow_pickle=False)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    """Lossless PNG of an RGB uint8 [H, W, 3] array (no metadata, so equal pixels give equal bytes)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def latent_sample(
    key: str,
    mean: np.ndarray,
    std: np.ndarray,
    label: int,
    meta: dict[str, Any],
    pixels: np.ndarray | None = None,
    targets: np.ndarray | None = None,
) -> dict[str, Any]:
    """The members of one latent sample (mean / std float16 [2, C, h, w], unscaled); with `pixels` (`encode
    --keep-images`) also the crop the latents encode as a PNG member, unflipped (index 1 of mean / std is its
    horizontal flip), for REPA's targets; with `targets` (`encode --encoder-targets`) REPA's targets themselves,
    float16 [2, N, D] (index 1: of the flip)."""
    sample = {
        "__key__": key,
        MEAN_MEMBER: npy_bytes(mean.astype(np.float16)),
        STD_MEMBER: npy_bytes(std.astype(np.float16)),
        "cls": str(int(label)).encode("ascii"),
        "json": json_bytes(meta),
    }
    if pixels is not None:
        sample[IMAGE_MEMBER] = png_bytes(pixels)
    if targets is not None:
        sample[REPA_MEMBER] = npy_bytes(targets.astype(np.float16))
    return sample


def image_sample(key: str, pixels: np.ndarray, label: int, meta: dict[str, Any]) -> dict[str, Any]:
    """The members of one raw image sample (PNG of RGB uint8 [R, R, 3])."""
    return {
        "__key__": key,
        "png": png_bytes(pixels),
        "cls": str(int(label)).encode("ascii"),
        "json": json_bytes(meta),
    }


def load_npy_bytes(value: bytes, name: str = "array") -> np.ndarray:
    """An array from `.npy` bytes (no pickle), refusing a header that claims more data than the bytes hold (a
    crafted shape would otherwise make numpy allocate terabytes before it notices); ValueError naming `name`."""
    buffer = io.BytesIO(value)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(buffer)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(buffer)
        else:
            raise ValueError(f".npy format version {version} is not supported")
    except (ValueError, TypeError, SyntaxError) as error:
        raise ValueError(f"{name}: not a valid .npy array ({error})") from error
    needed = math.prod(shape) * dtype.itemsize
    if dtype.hasobject or needed != len(value) - buffer.tell():
        raise ValueError(
            f"{name}: .npy header says {list(shape)} {dtype}, which does not match the {len(value)} bytes stored"
        )
    return np.load(io.BytesIO(value), allow_pickle=False)


def _decode_png(value: bytes, name: str) -> np.ndarray:
    """RGB pixels of a PNG member; ValueError for images Pillow refuses as too large (decompression bombs)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(value)) as image:
            return np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError as error:
        raise ValueError(f"{name}: {error}") from error


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode the members of a raw sample: arrays for `mean.npy` / `std.npy` / `png`, int `cls`, dict `json`."""
    decoded: dict[str, Any] = {"__key__": sample["__key__"]}
    for name, value in sample.items():
        if name.endswith(".npy"):
            decoded[name] = load_npy_bytes(value, f"{sample['__key__']}.{name}")
        elif name == "png":
            decoded[name] = _decode_png(value, f"{sample['__key__']}.png")
        elif name == "cls":
            decoded[name] = int(value.decode("ascii"))
        elif name == "json":
            decoded[name] = json.loads(value)
    return decoded
