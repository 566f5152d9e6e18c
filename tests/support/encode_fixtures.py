"""Test data of the encode / pack stage: a tiny random AutoencoderKL, a small class-folder image tree, and a corpus
of awkward inputs (each with the outcome the pipeline must produce)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Small enough for fast tests, and shaped like the SD VAE where it matters: 4 blocks (downsampling /8),
# 4 latent channels, group norm.
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
    scaling_factor=0.18215,
)

CLASS_NAMES = ("n01440764", "n01443537", "n01484850")
# The pixel limit the tests pass as --max-pixels: every good image is far below it, `huge.png` is above it.
TEST_MAX_PIXELS = 40_000


def save_tiny_vae(directory: Path, seed: int = 0) -> Path:
    """Build the tiny AutoencoderKL with seeded random weights and save_pretrained it (safetensors) to `directory`."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    vae.save_pretrained(directory, safe_serialization=True)
    return directory


def small_encode_options(source: Path, vae: str, out: Path, **overrides):
    """`EncodeOptions` of a small in-process latent encode of the image tree `source` (32 px, shards of 6, the first
    14 images), with `overrides`."""
    from pipeline.encode.job import EncodeOptions

    settings = dict(
        source=str(source),
        out=str(out),
        resolution=32,
        vae=vae,
        shard_size=6,
        batch_size=4,
        workers=0,
        max_pixels=TEST_MAX_PIXELS,
        progress=False,
        limit=14,
    )
    return EncodeOptions(**{**settings, **overrides})


def samples_of(out: Path) -> dict[str, dict]:
    """Every sample of the dataset `out`, decoded, by key."""
    from pipeline.core import shards
    from pipeline.core.manifest import load_manifest, shard_urls
    from pipeline.core.shard_members import decode_sample

    return {
        sample["__key__"]: sample
        for url in shard_urls(out, load_manifest(out))
        for sample in map(decode_sample, shards.iter_samples(url))
    }


def shard_bytes(out: Path) -> dict[str, bytes]:
    """The bytes of every shard of `out`, by file name."""
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def damage_first_member(shard: Path, suffix: str) -> None:
    """One byte in the middle of the shard's first member named `*suffix` inverted, in place: same size, a valid
    tar (a damaged latent, image or targets member)."""
    import tarfile

    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
    raw = bytearray(shard.read_bytes())
    raw[member.offset_data + member.size // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))


def _picture(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth colour gradient plus noise: compresses like a photo, different for every call."""
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, size=3)
    slope = rng.uniform(-3, 3, size=(2, 3))
    pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1] + rng.normal(0, 12, size=(height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _save(pixels: np.ndarray, path: Path, image_format: str, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=image_format, **kwargs)


def make_image_tree(root: Path, per_class: int = 12, seed: int = 0) -> dict[str, int]:
    """An ImageNet-style tree `root/<synset>/*.JPEG|png` of small images; returns {relative path: label}.

    Besides plain names it holds a unicode name, a name with several dots, a name with a space and two files
    that differ only by extension (their keys would collide), and one image in a nested folder.
    """
    rng = np.random.default_rng(seed)
    labels: dict[str, int] = {}
    for label, synset in enumerate(CLASS_NAMES):
        for i in range(per_class):
            width, height = int(rng.integers(24, 100)), int(rng.integers(24, 100))
            rel = f"{synset}/{synset}_{i:04d}.JPEG" if i % 3 else f"{synset}/{synset}_{i:04d}.png"
            _save(
                _picture(rng, width, height),
                root / rel,
                "JPEG" if rel.endswith("JPEG") else "PNG",
                **({"quality": 90} if rel.endswith("JPEG") else {}),
            )
            labels[rel] = label
    extras = {
        f"{CLASS_NAMES[0]}/ünïcödé 画像.png": 0,
        f"{CLASS_NAMES[1]}/name.with.dots.jpg": 1,
        f"{CLASS_NAMES[1]}/with space.png": 1,
        f"{CLASS_NAMES[2]}/dup.jpg": 2,
        f"{CLASS_NAMES[2]}/dup.png": 2,
        f"{CLASS_NAMES[2]}/nested/deeper.png": 2,
    }
    for rel, label in extras.items():
        _save(_picture(rng, 40, 30), root / rel, "JPEG" if rel.endswith("jpg") else "PNG")
        labels[rel] = label
    (root / CLASS_NAMES[0] / ".DS_Store").write_bytes(b"\0\1hidden")  # hidden: not an item
    return labels


def _png_with_huge_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels but carries almost no data (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def _exif_rotated_jpeg(rng: np.random.Generator) -> bytes:
    """A 48x24 JPEG (wide) with EXIF orientation 6: viewers show it 24x48 (tall)."""
    image = Image.fromarray(_picture(rng, 48, 24))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def make_bad_corpus(root: Path, seed: int = 1) -> dict[str, str]:
    """A flat folder of awkward inputs; returns {file name: "ok" | "fail"} (what the pipeline must do).

    "ok" files must be converted and written; "fail" files must be recorded in failures.jsonl with a reason.
    The unreadable file is "ok" when the tests run as root (root reads mode-000 files), see `unreadable_case`.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rgb = _picture(rng, 40, 32)
    outcome: dict[str, str] = {}

    def put(name: str, data: bytes, expected: str) -> None:
        (root / name).write_bytes(data)
        outcome[name] = expected

    def encoded(image: Image.Image, image_format: str, **kwargs) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=image_format, **kwargs)
        return buffer.getvalue()

    put("grey_L.png", encoded(Image.fromarray(rgb[..., 0]), "PNG"), "ok")
    grey_alpha = Image.merge("LA", [Image.fromarray(rgb[..., 0]), Image.fromarray(rgb[..., 1])])
    put("grey_alpha_LA.png", encoded(grey_alpha, "PNG"), "ok")
    put("palette_P.png", encoded(Image.fromarray(rgb).convert("P"), "PNG"), "ok")
    palette = Image.fromarray(rgb).convert("P")
    put("palette_transparent.png", encoded(palette, "PNG", transparency=0), "ok")
    put(
        "rgba.png",
        encoded(Image.fromarray(np.dstack([rgb, rng.integers(0, 256, rgb.shape[:2], dtype=np.uint8)])), "PNG"),
        "ok",
    )
    put("cmyk.jpg", encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG"), "ok")
    put("grey16_I16.png", encoded(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"), "ok")
    put("bilevel_1.png", encoded(Image.fromarray(rgb[..., 0] > 128), "PNG"), "ok")
    put("tiny_5x3.png", encoded(Image.fromarray(_picture(rng, 5, 3)), "PNG"), "ok")
    frames = [Image.fromarray(_picture(rng, 30, 30)) for _ in range(3)]
    put("animated.gif", encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0), "ok")
    put("exif_rotated.jpg", _exif_rotated_jpeg(rng), "ok")
    put("ñandú — ü 画.png", encoded(Image.fromarray(rgb), "PNG"), "ok")
    put("dots..in..name.png", encoded(Image.fromarray(rgb), "PNG"), "ok")

    good_jpeg = encoded(Image.fromarray(_picture(rng, 64, 64)), "JPEG", quality=95)
    put("truncated.jpg", good_jpeg[: len(good_jpeg) // 2], "fail")
    put("corrupt.jpg", bytes(rng.integers(0, 256, 2000, dtype=np.uint8)), "fail")
    put("zero_bytes.png", b"", "fail")
    put("notes.txt", b"this is not an image\n", "fail")
    put("bomb.png", _png_with_huge_header(30_000, 30_000), "fail")
    put("huge.png", encoded(Image.fromarray(_picture(rng, 250, 250)), "PNG"), "fail")  # over TEST_MAX_PIXELS

    unreadable = root / "unreadable.png"
    unreadable.write_bytes(encoded(Image.fromarray(rgb), "PNG"))
    os.chmod(unreadable, 0)
    outcome["unreadable.png"] = "fail" if not unreadable_case_is_readable(unreadable) else "ok"
    return outcome


def unreadable_case_is_readable(path: Path) -> bool:
    """True when a mode-000 file can still be read (running as root): that sub-case cannot be tested then."""
    try:
        with open(path, "rb") as handle:
            handle.read(1)
        return True
    except PermissionError:
        return False


def png_with_huge_header(width: int, height: int) -> bytes:
    """A small PNG file whose header claims `width` x `height` pixels (its data is truncated)."""
    return _png_with_huge_header(width, height)


def write_small_dataset(directory: Path, kind: str = "latents", num_shards: int = 5, per_shard: int = 2) -> dict:
    """A hand-built dataset in the encode / pack format (tars, sidecars by index, manifest with every field a
    job writes: counts, label map, shapes, VAE entry for latents); returns the manifest."""
    from pipeline.core import shards
    from pipeline.core.manifest import FORMAT_VERSION, MANIFEST_NAME
    from pipeline.core.shard_members import image_sample, latent_sample

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for index in range(num_shards):
        with shards.ShardWriter(directory, index) as writer:
            for i in range(per_shard):
                key, label, meta = f"c{i % 2}/item{index:03d}_{i}", i % 2, {"source": f"item{index}_{i}.png"}
                if kind == "latents":
                    mean = rng.normal(size=(2, 4, 4, 4)).astype(np.float16)
                    writer.write(latent_sample(key, mean, np.abs(mean) + 0.1, label, meta))
                else:
                    writer.write(image_sample(key, _picture(rng, 32, 32), label, meta))
            sidecar = writer.commit({"failures": [], "items": per_shard})
        entries.append({k: sidecar[k] for k in ("name", "count", "sha256", "bytes")} | {"failures": 0})
    total = num_shards * per_shard
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "resolution": 32,
        "num_classes": 2,
        "label_map": {"c0": 0, "c1": 1},
        "counts": {"seen": total, "written": total, "failed": 0},
        "shards": entries,
        "source": {"root": "/nowhere", "layout": "class-folders", "items": total},
    }
    if kind == "latents":
        manifest |= {"latent_channels": 4, "latent_size": 4, "latent_shape": [2, 4, 4, 4]}
        manifest["vae"] = {"id": "test", "path_hash": "0" * 64, "scaling_factor": 0.18215, "downsample_factor": 8}
        manifest["vae"] |= {"dtype": "fp32", "convention": "unscaled", "source": "local", "path": "/nowhere/vae"}
    else:
        manifest["image_shape"] = [32, 32, 3]
    (directory / "failures.jsonl").write_text("")
    shards.write_json_to(directory, MANIFEST_NAME, manifest)
    return manifest


def kill_job_midway(command: list[str], cwd: Path, env: dict[str, str], watched: Path, shards: int = 2) -> str:
    """Start an encode / pack command in its own process group, SIGKILL the whole group (CLI, Dask scheduler,
    nanny, worker) once `watched` holds `shards` sidecars (or the command ended, or 180 s passed), wait for the
    orphaned workers to go, and return the command's output."""
    import os
    import signal
    import subprocess
    import time

    process = subprocess.Popen(
        command, cwd=cwd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 180
    while len(list(watched.glob("shard-*.json"))) < shards and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    log = process.communicate()[0].decode(errors="replace")
    for _ in range(200):  # orphaned workers notice their parent is gone and exit
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    return log
