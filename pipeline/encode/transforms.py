"""Image decoding and the ADM / DiT center crop used by `encode` and `pack`.

`prepare_image(data, resolution)` turns the bytes of one image into an RGB uint8 array of shape
[resolution, resolution, 3] plus a small record of what was done (original size, crop box, mode, ...).

Decoding is defensive: the EXIF orientation is applied, animated images keep their first frame, every PIL mode
that has a meaning as a picture is converted to RGB (transparent pixels are composited on white, 16-bit values
are scaled to 8 bit), and anything that cannot be decoded raises `ImageDecodeError` with a reason that ends up
in `failures.jsonl`. Images above a pixel limit (`--max-pixels`) are refused before their pixels are decoded
(decompression-bomb guard); that limit is the one that counts, also above Pillow's own (see `_open_image`).

The crop is the one of guided-diffusion (`image_datasets.center_crop_arr`) that DiT uses for ImageNet latents:
halve with a box filter while the short side is at least twice the target, resize with bicubic so that the
short side equals the target, then cut the centre square.
"""

from __future__ import annotations

import io
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.core.errors import InputError

TRANSFORM_NAME = "adm-center-crop"
# Pillow's own default limit (about 89.5 megapixels); images above it are refused, not decoded.
DEFAULT_MAX_PIXELS = 89_478_485
# Longest side / shortest side above which an image is refused instead of resized (see center_crop).
MAX_ASPECT_RATIO = 64

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_DIRECT_MODES = {"1", "L", "CMYK", "YCbCr", "HSV"}
# Serialises the decodes that raise Pillow's process-wide limit (only those with --max-pixels above its default).
_PILLOW_LIMIT_LOCK = threading.Lock()


class ImageDecodeError(InputError):
    """An image could not be decoded or converted; the message is the reason recorded for that item."""


@dataclass
class DecodedImage:
    """An RGB image as decoded from a file, with what is worth recording about the original."""

    image: Image.Image
    original_size: tuple[int, int]  # (width, height) after the EXIF orientation was applied
    mode: str
    format: str | None
    orientation: int
    frames: int


def transform_spec(resolution: int, max_pixels: int) -> dict[str, Any]:
    """The manifest entry that names the transform and its parameters."""
    return {
        "name": TRANSFORM_NAME,
        "resolution": resolution,
        "resize": "box-halving while short side >= 2*resolution, then bicubic to short side = resolution",
        "crop": "center",
        "exif_transpose": True,
        "alpha": "composited on white",
        "animated": "first frame",
        "max_pixels": max_pixels,
    }


def _too_many_pixels(size: str, max_pixels: int) -> ImageDecodeError:
    """The failure of an image over the pixel limit (the reason names the flag that raises the limit)."""
    return ImageDecodeError(
        f"too many pixels: image is {size}, over the limit of {max_pixels} "
        "(decompression-bomb guard; raise --max-pixels to accept it)"
    )


def _open_image(data: bytes, max_pixels: int) -> Image.Image:
    """`Image.open` (header only) with Pillow's own decompression-bomb limit no lower than `max_pixels`.

    Pillow refuses, inside `open`, any image over 2 x `Image.MAX_IMAGE_PIXELS` (178,956,970 pixels by default),
    before our own check can see the size; so for a `max_pixels` above Pillow's default its limit is raised to
    `max_pixels` while the header is read (our check, right after, then decides). That limit is a process-wide
    global: the change is made under a lock and undone at once; a decode in another thread that reads the raised
    value meanwhile still applies its own, lower `max_pixels` right after.
    """
    if max_pixels <= DEFAULT_MAX_PIXELS:  # Pillow's default limit already lets through everything ours does
        return Image.open(io.BytesIO(data))
    with _PILLOW_LIMIT_LOCK:
        previous = Image.MAX_IMAGE_PIXELS
        if previous is not None:
            Image.MAX_IMAGE_PIXELS = max(previous, max_pixels)
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode image bytes to an RGB PIL image (EXIF orientation applied, first frame, alpha on white)."""
    if len(data) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        image = _open_image(data, max_pixels)
    except Image.DecompressionBombError as error:
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        raise _too_many_pixels(f"{claimed.group(1)} pixels" if claimed else "too large", max_pixels) from error
    except UnidentifiedImageError as error:
        raise ImageDecodeError("not an image file (PIL cannot identify the format)") from error
    except Exception as error:  # PIL raises many types on corrupt headers; each is a bad item, not a crash
        raise ImageDecodeError(f"unreadable image header ({type(error).__name__}: {error})") from error

    width, height = image.size
    if width * height > max_pixels:
        raise _too_many_pixels(f"{width}x{height} = {width * height} pixels", max_pixels)
    if width == 0 or height == 0:
        raise ImageDecodeError(f"image has an empty size {width}x{height}")

    frames = int(getattr(image, "n_frames", 1) or 1)
    image_format = image.format
    try:
        if frames > 1:
            image.seek(0)
        image.load()
        orientation = int(image.getexif().get(0x0112, 1) or 1)
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # truncated data, bad EXIF, broken frames: all reported per item
        raise ImageDecodeError(f"corrupt or truncated image data ({type(error).__name__}: {error})") from error
    mode = image.mode
    return DecodedImage(
        image=to_rgb(image),
        original_size=image.size,
        mode=mode,
        format=image_format,
        orientation=orientation,
        frames=frames,
    )


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten an image with transparency onto a white background (transparent pixels become white)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any picture mode to 8-bit RGB.

    16-bit grey (I;16*, and I as decoded from 16-bit files) is scaled by 255/65535 rather than clipped, so a
    16-bit white stays white; palette and grey images with a transparent colour, and modes with alpha, are
    composited on white; 1, L, CMYK, YCbCr, HSV use PIL's conversion. Float images (F) have no standard range
    and are refused.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        grey = np.clip(np.rint(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in _ALPHA_MODES or (mode in {"P", "L", "RGB"} and "transparency" in image.info):
        return _composite_on_white(image)
    if mode == "RGB":
        return image
    if mode == "P" or mode in _DIRECT_MODES:
        return image.convert("RGB")
    raise ImageDecodeError(
        f"unsupported image mode {mode!r} (expected an 8/16-bit grey, palette, RGB(A) or CMYK image)"
    )


def center_crop(image: Image.Image, resolution: int) -> tuple[np.ndarray, list[float]]:
    """ADM center crop of an RGB image: returns uint8 [resolution, resolution, 3] and the crop box.

    The crop box (left, top, right, bottom) is in the pixel coordinates of `image`, so it says which part of
    the original picture the sample shows.
    """
    width, height = image.size
    # Box-filter halving first: a single big bicubic step would alias (guided-diffusion's choice, kept by DiT).
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    target = tuple(round(x * scale) for x in image.size)
    if max(target) > MAX_ASPECT_RATIO * resolution:
        # A 1x100000 strip would be resized to a huge image only to keep its centre square.
        raise ImageDecodeError(
            f"extreme aspect ratio {width}x{height} (over {MAX_ASPECT_RATIO}:1): "
            f"resizing to {target[0]}x{target[1]} refused"
        )
    image = image.resize(target, resample=Image.BICUBIC)
    pixels = np.asarray(image)
    top = (pixels.shape[0] - resolution) // 2
    left = (pixels.shape[1] - resolution) // 2
    crop = np.ascontiguousarray(pixels[top : top + resolution, left : left + resolution])
    scale_x, scale_y = width / image.size[0], height / image.size[1]
    box = [left * scale_x, top * scale_y, (left + resolution) * scale_x, (top + resolution) * scale_y]
    return crop, [round(v, 3) for v in box]


def prepare_image(
    data: bytes, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode and center-crop one image: (uint8 [R, R, 3], record for the sample's json)."""
    decoded = decode_image(data, max_pixels)
    try:
        pixels, box = center_crop(decoded.image, resolution)
    except ImageDecodeError:
        raise
    except Exception as error:  # e.g. memory errors inside the resize of a pathological image
        raise ImageDecodeError(f"resize failed ({type(error).__name__}: {error})") from error
    record = {
        "original_size": list(decoded.original_size),
        "crop_box": box,
        "mode": decoded.mode,
        "format": decoded.format,
        "orientation": decoded.orientation,
        "frames": decoded.frames,
    }
    return pixels, record


def compose_crop_box(outer_box: list[float], inner_box: list[float], inner_size: tuple[int, int]) -> list[float]:
    """Map a crop box taken inside an already cropped image back to the coordinates of the original.

    `outer_box` is where the cropped image (of size `inner_size`) came from in the original; `inner_box` is a
    box in the cropped image. Used when encoding from packed shards, so the crop box still refers to the
    original file.
    """
    left, top, right, bottom = outer_box
    scale_x = (right - left) / inner_size[0]
    scale_y = (bottom - top) / inner_size[1]
    return [
        round(left + inner_box[0] * scale_x, 3),
        round(top + inner_box[1] * scale_y, 3),
        round(left + inner_box[2] * scale_x, 3),
        round(top + inner_box[3] * scale_y, 3),
    ]
