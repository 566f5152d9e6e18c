"""A procedural, class-labelled image dataset for the offline demo (loading it: `pipeline.demo.labelled_images`).

`generate_dataset(out_dir, ...)` draws up to 12 classes of coloured shapes and patterns (a red disc, a blue
square, a green triangle, a yellow ring, magenta horizontal and cyan vertical stripes, an orange cross, a white
checkerboard, a purple diamond, a brown gradient with a light dot, a pink star, a lime hexagon; see `CLASSES`)
and writes them in the ImageNet layout that `pack` / `encode` read::

    out_dir/dataset.json                                     classes, counts, seed, resolution, complete flag
    out_dir/train/c00_red_circle/c00_red_circle_00000.png    one folder per class; sorted folder order = label
    out_dir/holdout/c00_red_circle/...                       optional held-out real images (classifier evaluation)

Every image varies in the class colour (brightness and per-channel jitter), the background (a dark tinted shade
with a gentle gradient; the gradient class has its own) and pixel noise. The shapes are large and bold, sit near
the centre (within +-5% of the image size, the star +-10%), and vary in size and by a small rotation (the star
and the hexagon in any orientation); stripes and the checkerboard cover the whole image with a random period,
phase and a small tilt. Each class differs from the others in shape *and* colour, so a tiny model learns it in
minutes on a CPU and a person recognises it at 16-64 px. Shapes are drawn from signed distance functions in
resolution-independent coordinates ([-1, 1] across the image) with analytic anti-aliasing, so the same seed
gives the same picture at every resolution (up to sampling) and drawing a 64x64 image takes well under a
millisecond.

Every image has its own random generator seeded from (generator version, seed, split, class, index): the dataset
is byte-identical on every run, independent of generation order, and growing `per_class` keeps the existing
images. Files are written atomically (`pipeline.core.atomic`), so an interrupted run is resumed by running the
same call again: complete files are kept and the temporary files of the killed run are removed.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.atomic import TEMP_MARK, remove_temporary_files, write_bytes_atomic, write_json_atomic
from pipeline.core.errors import InputError

logger = logging.getLogger(__name__)

DATASET_FORMAT = "diffit-pipe-procedural"
# Bump when the drawing changes: a dataset directory is only ever resumed by the same drawing code.
GENERATOR_VERSION = 2
DATASET_JSON = "dataset.json"
SPLITS = ("train", "holdout")
_SPLIT_STREAM = {"train": 0, "holdout": 1}


class ProceduralDatasetError(InputError):
    """A procedural dataset directory cannot be (re)used: other settings, foreign files, bad arguments."""


# ----------------------------------------------------------------------------------------------------------------
# Drawing primitives. Coordinates: x to the right, y downwards, both in [-1, 1] across the image; `pixel` is the
# width of one pixel in these units. Signed distances are negative inside a shape.


@dataclass
class Canvas:
    """Pixel-centre coordinates of a square image in [-1, 1] units."""

    x: np.ndarray  # [R, R] float32
    y: np.ndarray
    pixel: float

    @classmethod
    def create(cls, resolution: int) -> Canvas:
        centres = ((np.arange(resolution, dtype=np.float32) + 0.5) / resolution) * 2.0 - 1.0
        y, x = np.meshgrid(centres, centres, indexing="ij")
        return cls(x=x, y=y, pixel=2.0 / resolution)


def coverage(distance: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased fraction of each pixel inside a shape from its signed distance (a one-pixel linear ramp)."""
    return np.clip(0.5 - distance / pixel, 0.0, 1.0)


def rotate(canvas: Canvas, centre: tuple[float, float], angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Canvas coordinates in the frame of a shape at `centre` rotated by `angle` radians."""
    dx, dy = canvas.x - centre[0], canvas.y - centre[1]
    cos, sin = np.cos(angle), np.sin(angle)
    return cos * dx + sin * dy, -sin * dx + cos * dy


def box_distance(u: np.ndarray, v: np.ndarray, half_u: float, half_v: float) -> np.ndarray:
    """Signed distance to an axis-aligned box (exact along the edges, which is where anti-aliasing needs it)."""
    return np.maximum(np.abs(u) - half_u, np.abs(v) - half_v)


def polygon_distance(u: np.ndarray, v: np.ndarray, sides: int, inradius: float) -> np.ndarray:
    """Signed distance to a regular polygon (intersection of half-planes) with a vertex pointing up."""
    angles = -np.pi / 2 + np.pi / sides + 2 * np.pi * np.arange(sides) / sides
    distance = np.full(u.shape, -np.inf, dtype=np.float32)
    for angle in angles:  # edge normals
        distance = np.maximum(distance, np.cos(angle) * u + np.sin(angle) * v - inradius)
    return distance


def stripe_distance(t: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Signed distance to stripes of half a period width along coordinate `t` (duty cycle 50%)."""
    position = np.mod(t / period + phase, 1.0)
    return (np.abs(position - 0.5) - 0.25) * period


def square_wave(t: np.ndarray, period: float, phase: float, pixel: float) -> np.ndarray:
    """Anti-aliased 0/1 square wave of `t` (used for the two factors of a checkerboard)."""
    return coverage(stripe_distance(t, period, phase), pixel)


# ----------------------------------------------------------------------------------------------------------------
# Per-image variation.


def jitter_colour(rng: np.random.Generator, base: tuple[int, int, int], amount: float = 18.0) -> np.ndarray:
    """The class colour with a random brightness scale and a small per-channel shift."""
    colour = np.asarray(base, dtype=np.float32) * rng.uniform(0.85, 1.08) + rng.uniform(-amount, amount, 3)
    return np.clip(colour, 0, 255).astype(np.float32)


def background(rng: np.random.Generator, canvas: Canvas) -> np.ndarray:
    """A dark, slightly tinted background with a gentle random gradient: [R, R, 3] float32 in 0..255."""
    level = rng.uniform(15, 70)
    tint = rng.uniform(-10, 10, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * canvas.x + np.sin(angle) * canvas.y) * rng.uniform(0, 12)
    return (level + tint)[None, None, :] + ramp[:, :, None]


def paint(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Composite a flat colour with per-pixel coverage `alpha` over `image`."""
    return image * (1.0 - alpha[:, :, None]) + colour[None, None, :] * alpha[:, :, None]


def random_centre(rng: np.random.Generator, spread: float = 0.1) -> tuple[float, float]:
    """Where an object sits: within +-`spread` (in [-1, 1] units; 0.1 = 5% of the image size) of the middle.

    Object-centric like ImageNet. Near-centred, large and bold shapes are what the demo's tiny models, trained
    for a few minutes on a CPU, learn to draw as crosses, rings, squares and diamonds; objects spread over the
    image and drawn smaller come out as blobs of the right colour.
    """
    return float(rng.uniform(-spread, spread)), float(rng.uniform(-spread, spread))


# ----------------------------------------------------------------------------------------------------------------
# The classes. Each draw function takes (rng, canvas, colour) and returns an RGB float image before noise.


def draw_circle(rng, canvas, colour):
    """A filled disc."""
    image = background(rng, canvas)
    cx, cy = random_centre(rng)
    radius = rng.uniform(0.35, 0.6)
    distance = np.hypot(canvas.x - cx, canvas.y - cy) - radius
    return paint(image, coverage(distance, canvas.pixel), colour)


def draw_square(rng, canvas, colour):
    """A filled square, rotated by at most 10 degrees (so it never looks like the diamond)."""
    image = background(rng, canvas)
    u, v = rotate(canvas, random_centre(rng), rng.uniform(-np.pi / 18, np.pi / 18))
    half = rng.uniform(0.36, 0.52)
    return paint(image, coverage(box_distance(u, v, half, half), canvas.pixel), colour)


def draw_triangle(rng, canvas, colour):
    """A filled equilateral triangle, rotated by at most 12 degrees from pointing up."""
    image = background(rng, canvas)
    u, v = rotate(canvas, random_centre(rng), rng.uniform(-0.2, 0.2))
    inradius = rng.uniform(0.3, 0.4)
    return paint(image, coverage(polygon_distance(u, v, 3, inradius), canvas.pixel), colour)


def draw_ring(rng, canvas, colour):
    """An annulus (a thick ring with the background showing in its middle)."""
    image = background(rng, canvas)
    cx, cy = random_centre(rng)
    radius = rng.uniform(0.42, 0.58)
    width = rng.uniform(0.13, 0.18)
    distance = np.abs(np.hypot(canvas.x - cx, canvas.y - cy) - radius) - width
    return paint(image, coverage(distance, canvas.pixel), colour)


def _stripes(rng, canvas, colour, horizontal: bool):
    """Stripes across the whole image (about 3-4.5 periods, so they survive 16 px), tilted by at most 8 degrees."""
    image = background(rng, canvas)
    u, v = rotate(canvas, (0.0, 0.0), rng.uniform(-0.14, 0.14))
    distance = stripe_distance(v if horizontal else u, rng.uniform(0.45, 0.7), rng.uniform(0, 1))
    return paint(image, coverage(distance, canvas.pixel), colour)


def draw_horizontal_stripes(rng, canvas, colour):
    """Horizontal stripes."""
    return _stripes(rng, canvas, colour, horizontal=True)


def draw_vertical_stripes(rng, canvas, colour):
    """Vertical stripes."""
    return _stripes(rng, canvas, colour, horizontal=False)


def draw_cross(rng, canvas, colour):
    """A plus sign (two crossing bars), rotated by at most 10 degrees."""
    image = background(rng, canvas)
    u, v = rotate(canvas, random_centre(rng), rng.uniform(-0.17, 0.17))
    length, width = rng.uniform(0.55, 0.72), rng.uniform(0.16, 0.22)
    distance = np.minimum(box_distance(u, v, length, width), box_distance(u, v, width, length))
    return paint(image, coverage(distance, canvas.pixel), colour)


def draw_checkerboard(rng, canvas, colour):
    """A checkerboard of the class colour and the background over the whole image, tilted by at most 7 degrees."""
    image = background(rng, canvas)
    u, v = rotate(canvas, (0.0, 0.0), rng.uniform(-0.12, 0.12))
    period = 2 * rng.uniform(0.3, 0.45)  # two cells per period: 4-7 cells across the image
    a = square_wave(u, period, rng.uniform(0, 1), canvas.pixel)
    b = square_wave(v, period, rng.uniform(0, 1), canvas.pixel)
    return paint(image, a * (1 - b) + b * (1 - a), colour)  # soft XOR: anti-aliased cell edges


def draw_diamond(rng, canvas, colour):
    """A tall rhombus (diamond) standing on a vertex, tilted by at most 8 degrees."""
    image = background(rng, canvas)
    u, v = rotate(canvas, random_centre(rng), rng.uniform(-0.14, 0.14))
    half_width = rng.uniform(0.36, 0.46)
    half_height = half_width * rng.uniform(1.4, 1.6)
    # |u|/a + |v|/b = 1 is the outline; scaling by ab/sqrt(a^2+b^2) makes it a distance along the edge normals.
    distance = (np.abs(u) / half_width + np.abs(v) / half_height - 1.0) * (
        half_width * half_height / np.hypot(half_width, half_height)
    )
    return paint(image, coverage(distance, canvas.pixel), colour)


def draw_gradient_dot(rng, canvas, colour):
    """A strong brown-to-light gradient over the whole image with a small bright dot."""
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.clip(0.5 + 0.5 * (np.cos(angle) * canvas.x + np.sin(angle) * canvas.y), 0, 1)
    dark = colour * rng.uniform(0.35, 0.5)
    light = np.clip(colour * rng.uniform(1.4, 1.6), 0, 255)
    image = dark[None, None, :] * (1 - ramp[:, :, None]) + light[None, None, :] * ramp[:, :, None]
    cx, cy = random_centre(rng, 0.45)
    distance = np.hypot(canvas.x - cx, canvas.y - cy) - rng.uniform(0.18, 0.25)
    return paint(image, coverage(distance, canvas.pixel), np.array([245.0, 245.0, 235.0], dtype=np.float32))


def draw_star(rng, canvas, colour):
    """A five-pointed star (radius modulated by the angle), freely rotated."""
    image = background(rng, canvas)
    u, v = rotate(canvas, random_centre(rng, 0.2), rng.uniform(0, 2 * np.pi))
    outer = rng.uniform(0.45, 0.62)
    theta = np.arctan2(v, u)
    # Triangle-wave profile between the inner (0.45 * outer) and outer radius: straight-ish star arms.
    fold = np.abs(np.mod(theta * 5 / (2 * np.pi), 1.0) - 0.5) * 2  # 1 at the tips, 0 between them
    radius = outer * (0.45 + 0.55 * fold)
    distance = (np.hypot(u, v) - radius) * 0.6  # the radial gap overestimates the distance near the arms
    return paint(image, coverage(distance, canvas.pixel), colour)


def draw_hexagon(rng, canvas, colour):
    """A filled regular hexagon."""
    image = background(rng, canvas)
    u, v = rotate(canvas, random_centre(rng), rng.uniform(0, np.pi / 3))
    inradius = rng.uniform(0.32, 0.5)
    return paint(image, coverage(polygon_distance(u, v, 6, inradius), canvas.pixel), colour)


@dataclass(frozen=True)
class ShapeClass:
    """One class of the procedural dataset: its folder name, base colour and drawing function."""

    name: str
    colour: tuple[int, int, int]
    draw: Callable[[np.random.Generator, Canvas, np.ndarray], np.ndarray]


# Order matters: class k of a dataset with n classes is CLASSES[k] for k < n. The `c<k>_` prefix makes the sorted
# folder order equal to this order (ImageNet-style labels), also beyond 10 classes thanks to the zero padding.
CLASSES: tuple[ShapeClass, ...] = (
    ShapeClass("red_circle", (225, 40, 40), draw_circle),
    ShapeClass("blue_square", (45, 85, 235), draw_square),
    ShapeClass("green_triangle", (40, 195, 60), draw_triangle),
    ShapeClass("yellow_ring", (240, 215, 40), draw_ring),
    ShapeClass("magenta_hstripes", (225, 50, 205), draw_horizontal_stripes),
    ShapeClass("cyan_vstripes", (40, 215, 225), draw_vertical_stripes),
    ShapeClass("orange_cross", (250, 140, 25), draw_cross),
    ShapeClass("white_checkerboard", (240, 240, 240), draw_checkerboard),
    ShapeClass("purple_diamond", (140, 60, 215), draw_diamond),
    ShapeClass("brown_gradient_dot", (150, 95, 50), draw_gradient_dot),
    ShapeClass("pink_star", (255, 135, 175), draw_star),
    ShapeClass("lime_hexagon", (170, 245, 60), draw_hexagon),
)
MAX_CLASSES = len(CLASSES)


def class_names(num_classes: int) -> list[str]:
    """Folder names of the first `num_classes` classes: `c00_red_circle`, `c01_blue_square`, ..."""
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ProceduralDatasetError(f"num_classes must be between 1 and {MAX_CLASSES}, got {num_classes}")
    return [f"c{index:02d}_{shape.name}" for index, shape in enumerate(CLASSES[:num_classes])]


def image_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    """The random generator of one image: a function of (seed, split, class, index) only."""
    return np.random.default_rng([GENERATOR_VERSION, seed, _SPLIT_STREAM[split], class_index, index])


def render_image(class_index: int, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one image of class `class_index`: uint8 [resolution, resolution, 3]."""
    if not 0 <= class_index < MAX_CLASSES:
        raise ProceduralDatasetError(f"class index {class_index} out of range 0..{MAX_CLASSES - 1}")
    if resolution < 8:
        raise ProceduralDatasetError(f"resolution must be at least 8 pixels, got {resolution}")
    shape = CLASSES[class_index]
    canvas = Canvas.create(resolution)
    colour = jitter_colour(rng, shape.colour)
    image = shape.draw(rng, canvas, colour)
    # Sensor-like noise, so that the data is not piecewise constant (a VAE then has texture to model).
    image = image + rng.normal(0.0, rng.uniform(2.0, 6.0), image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_class_examples(
    class_index: int, count: int, resolution: int = 64, seed: int = 0, split: str = "train"
) -> np.ndarray:
    """`count` images of one class exactly as `generate_dataset` writes them: uint8 [count, R, R, 3]."""
    return np.stack(
        [render_image(class_index, resolution, image_rng(seed, split, class_index, index)) for index in range(count)]
    )


# ----------------------------------------------------------------------------------------------------------------
# Writing the dataset.


def png_bytes(pixels: np.ndarray) -> bytes:
    """A PNG of an RGB uint8 array without metadata: equal pixels always give equal bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def remove_temporary_files_below(directory: Path) -> int:
    """Delete the leftovers of an interrupted run (`*.tmp-*` files) in `directory` and all its sub-folders (the
    class folders); returns how many were removed."""
    folders = [directory, *(path for path in directory.rglob("*") if path.is_dir())]
    return sum(len(remove_temporary_files(folder)) for folder in folders)


def _settings(num_classes: int, resolution: int, seed: int) -> dict[str, Any]:
    """What determines the pixels of every image (a directory is only resumed under the same settings)."""
    return {
        "format": DATASET_FORMAT,
        "generator_version": GENERATOR_VERSION,
        "classes": class_names(num_classes),
        "resolution": resolution,
        "seed": seed,
    }


def _check_existing(out_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to add images to a directory that holds a procedural dataset made with other settings."""
    path = out_dir / DATASET_JSON
    if not path.is_file():
        return
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ProceduralDatasetError(f"cannot read {path}: {error}; remove the directory or choose another") from error
    differences = [key for key in settings if existing.get(key) != settings[key]]
    if differences:
        details = ", ".join(f"{key}: {existing.get(key)!r} -> {settings[key]!r}" for key in differences)
        raise ProceduralDatasetError(
            f"{out_dir} holds a procedural dataset made with other settings ({details}); "
            "use another output directory or delete this one"
        )


def _is_ours_to_ignore(name: str) -> bool:
    """Hidden files and the temporary files of an interrupted run (removed before writing) are not foreign."""
    return name.startswith(".") or TEMP_MARK in name


def _check_no_foreign_files(split_dir: Path, names: list[str], count: int) -> None:
    """Every file in a split must be one this call would write (no images of a larger earlier run, no strays)."""
    if not split_dir.is_dir():
        return
    expected_dirs = set(names)
    for entry in split_dir.iterdir():
        if _is_ours_to_ignore(entry.name):
            continue
        if entry.name not in expected_dirs:
            raise ProceduralDatasetError(f"{entry} is not a class folder of this dataset; remove it")
        expected = {f"{entry.name}_{i:05d}.png" for i in range(count)}
        foreign = sorted(p.name for p in entry.iterdir() if not _is_ours_to_ignore(p.name) and p.name not in expected)
        if foreign:
            raise ProceduralDatasetError(
                f"{entry} holds {len(foreign)} file(s) this dataset would not contain (first: {foreign[0]}); "
                f"was it made with a larger per-class count? Use that count or another directory"
            )


def _check_arguments(per_class: int, holdout_per_class: int, resolution: int) -> None:
    if per_class < 1:
        raise ProceduralDatasetError(f"per_class must be at least 1, got {per_class}")
    if holdout_per_class < 0:
        raise ProceduralDatasetError(f"holdout_per_class must be >= 0, got {holdout_per_class}")
    if resolution < 8:
        raise ProceduralDatasetError(f"resolution must be at least 8 pixels, got {resolution}")


def _prepare_directory(out: Path, settings: dict[str, Any], counts: dict[str, int]) -> None:
    """Refuse a directory this call must not write into; clean up after a killed run; mark it incomplete."""
    if out.exists() and not out.is_dir():
        raise ProceduralDatasetError(f"{out} exists and is not a directory")
    _check_existing(out, settings)
    for split in SPLITS:
        _check_no_foreign_files(out / split, settings["classes"], counts[split])
    out.mkdir(parents=True, exist_ok=True)
    removed = remove_temporary_files_below(out)
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run in %s", removed, out)
    # Marked incomplete first: a killed run leaves a directory that says it is unfinished.
    write_json_atomic(out / DATASET_JSON, {**settings, "per_class": counts, "complete": False})


def _write_images(out: Path, settings: dict[str, Any], counts: dict[str, int], progress: bool) -> tuple[int, int]:
    """Draw and write every image that is not there yet: (written, already present)."""
    names, resolution, seed = settings["classes"], settings["resolution"], settings["seed"]
    jobs = [(split, k, i) for split in SPLITS for k in range(len(names)) for i in range(counts[split])]
    if progress:
        from tqdm import tqdm

        jobs = tqdm(jobs, desc="synth", unit="img", mininterval=1.0)
    written = skipped = 0
    for split, class_index, index in jobs:
        path = out / split / names[class_index] / f"{names[class_index]}_{index:05d}.png"
        if path.is_file():
            skipped += 1
            continue
        pixels = render_image(class_index, resolution, image_rng(seed, split, class_index, index))
        write_bytes_atomic(path, png_bytes(pixels))  # creates the class folder
        written += 1
    return written, skipped


def generate_dataset(
    out_dir: str | os.PathLike,
    num_classes: int = 10,
    per_class: int = 300,
    resolution: int = 64,
    seed: int = 0,
    holdout_per_class: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the procedural dataset (see the module docstring) and return the contents of its `dataset.json`.

    Resumable: files that already exist are kept (they were renamed into place only when complete), so running
    the same call again after an interruption finishes the job; a directory made with other settings is refused.
    """
    _check_arguments(per_class, holdout_per_class, resolution)
    out = Path(out_dir).expanduser()
    settings = _settings(num_classes, resolution, seed)
    counts = {"train": per_class, "holdout": holdout_per_class}
    _prepare_directory(out, settings, counts)
    written, skipped = _write_images(out, settings, counts, progress)
    info = {
        **settings,
        "num_classes": num_classes,
        "per_class": counts,
        "counts": {split: counts[split] * num_classes for split in SPLITS},
        "splits": {split: split for split in SPLITS if counts[split] > 0},
        "complete": True,
    }
    write_json_atomic(out / DATASET_JSON, info)
    logger.info("procedural dataset in %s: %d image(s) written, %d already present", out, written, skipped)
    return {**info, "written": written, "skipped": skipped}
