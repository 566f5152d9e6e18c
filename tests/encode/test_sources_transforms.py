"""Unit tests of the encode stage's building blocks: source scanning and keys, decoding and the ADM crop, shard
writing / reading / verification, and VAE resolution and encoding (no Dask here)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.core import shards as shards
from pipeline.core.dataset_verify import verify_dataset
from pipeline.core.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    ManifestError,
    load_manifest,
    manifest_hash,
    shard_urls,
)
from pipeline.core.shard_members import decode_sample, image_sample, latent_sample
from pipeline.encode.source_items import SourceError, sample_key, unique_keys
from pipeline.encode.sources import scan_folder, scan_source
from pipeline.encode.transforms import (
    ImageDecodeError,
    center_crop,
    compose_crop_box,
    decode_image,
    prepare_image,
    to_rgb,
)
from tests.support.encode_fixtures import CLASS_NAMES, make_image_tree, save_tiny_vae


def _png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def _adm_reference_crop(image: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's `center_crop_arr`, transcribed independently as the reference for our crop."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    crop_y = (arr.shape[0] - size) // 2
    crop_x = (arr.shape[1] - size) // 2
    return arr[crop_y : crop_y + size, crop_x : crop_x + size]


# ---------------------------------------------------------------------------------------------------------------
# Sources and keys


def test_sample_key_is_webdataset_safe():
    assert sample_key("n01440764/n01440764_10026.JPEG") == "n01440764/n01440764_10026"
    assert sample_key("flat.png") == "flat"
    dotted = sample_key("cls/name.with.dots.jpg")
    assert dotted.startswith("cls/name_with_dots-") and "." not in dotted
    unicode_key = sample_key("cls/ñandú 画.png")
    assert unicode_key.startswith("cls/nandu__-") and unicode_key.isascii()
    parent = sample_key("../etc/passwd.png")
    assert not parent.startswith("/") and ".." not in parent
    long_key = sample_key("c/" + "x" * 300 + ".png")
    assert len(long_key) <= 80
    # Different paths that sanitise to the same text still get different keys (the hash is of the full path).
    assert sample_key("c/a b.png") != sample_key("c/a_b .png")


def test_plain_paths_take_a_shortcut_to_the_same_keys(monkeypatch):
    """`sample_key` answers plain paths (safe names, one extension) without the general rule: the same keys, on
    every path of a random alphabet that includes dots, slashes, accents and spaces."""
    import random
    import re

    from pipeline.encode import source_items as sources

    paths = ["n01440764/n01440764_10026.JPEG", "a" * 76 + ".jpg", "a" * 77 + ".jpg", "x.tar.gz", "_a/-b.c"]
    rng = random.Random(0)
    paths += ["".join(rng.choice("ab_-.Z9/é ") for _ in range(rng.randint(1, 12))) for _ in range(20_000)]

    def keys() -> list[str]:
        out = []
        for path in paths:
            try:
                out.append(sources.sample_key(path))
            except sources.SourceError as error:
                out.append(f"error: {error}")
        return out

    fast = keys()
    assert fast[:5] == ["n01440764/n01440764_10026", "a" * 76, "a" * 77, "x_tar-92b6fce3", "_a/-b"]
    assert sum(sources._PLAIN_PATH.fullmatch(path) is not None for path in paths) > 300  # the shortcut is taken
    monkeypatch.setattr(sources, "_PLAIN_PATH", re.compile(r"(?!)"))  # never: the general rule for every path
    assert keys() == fast


def test_unique_keys_separates_same_stem_files():
    keys = unique_keys(["c/dup.jpg", "c/dup.png", "c/other.png"])
    assert len(set(keys)) == 3
    assert keys[2] == "c/other"
    assert all(k.startswith("c/dup-") for k in keys[:2])


def test_scan_class_folders(tmp_path):
    labels = make_image_tree(tmp_path / "src", per_class=3)
    source = scan_source(tmp_path / "src")
    assert source.layout == "class-folders"
    assert source.label_map == {name: i for i, name in enumerate(sorted(CLASS_NAMES))}
    assert [item.path for item in source.items] == sorted(labels)  # sorted relative paths, hidden file left out
    assert {item.path: item.label for item in source.items} == labels
    assert [item.index for item in source.items] == list(range(len(labels)))
    assert len({item.key for item in source.items}) == len(labels)
    assert any(name.endswith(".DS_Store") for name in source.ignored)
    nested = next(item for item in source.items if item.path.endswith("nested/deeper.png"))
    assert nested.label == 2 and nested.key == f"{CLASS_NAMES[2]}/nested/deeper"
    # The same tree scanned again gives the same items (order and keys are not timing dependent).
    assert scan_source(tmp_path / "src").items == source.items


def test_scan_flat_folder_is_unlabelled(tmp_path):
    for name in ("b.png", "a.png", "c.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    source = scan_folder(tmp_path)
    assert source.layout == "flat" and source.num_classes == 0 and source.label_map == {}
    assert [item.path for item in source.items] == ["a.png", "b.png", "c.jpg"]
    assert all(item.label == -1 for item in source.items)


def test_scan_class_folders_ignores_loose_files(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "x.png")
    (tmp_path / "README.txt").write_text("synset list")
    source = scan_folder(tmp_path)
    assert [item.path for item in source.items] == ["cat/x.png"]
    assert "README.txt" in source.ignored
    assert source.describe()["ignored"]["count"] == 1


def test_scan_errors_name_the_problem(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        scan_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no image files"):
        scan_source(tmp_path / "empty")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(SourceError, match="not a directory"):
        scan_source(tmp_path / "file.png")


# ---------------------------------------------------------------------------------------------------------------
# Decoding and cropping


def test_center_crop_hand_computed_box():
    # 100x50, target 32: no halving (50 < 64); bicubic to 64x32; crop x = (64 - 32) // 2 = 16 → original 25..75.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 100, 3), dtype=np.uint8))
    pixels, box = center_crop(image, 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert box == [25.0, 0.0, 75.0, 50.0]
    # 300x200, target 64: one box halving (200 >= 128) to 150x100, bicubic to 96x64, crop x = 16 → 50..250.
    _, box = center_crop(Image.new("RGB", (300, 200)), 64)
    assert box == [50.0, 0.0, 250.0, 200.0]


@pytest.mark.parametrize("size", [(37, 91), (256, 256), (300, 129), (7, 5), (513, 1025)])
def test_center_crop_matches_guided_diffusion(size):
    rng = np.random.default_rng(size[0])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pixels, _ = center_crop(image, 32)
    np.testing.assert_array_equal(pixels, _adm_reference_crop(image, 32))


def test_center_crop_keeps_the_centre():
    # Left third red, middle green, right third blue: a 96x32 image cropped to 32 shows only green.
    stripes = np.zeros((32, 96, 3), dtype=np.uint8)
    stripes[:, :32, 0] = 255
    stripes[:, 32:64, 1] = 255
    stripes[:, 64:, 2] = 255
    pixels, box = center_crop(Image.fromarray(stripes), 32)
    assert box == [32.0, 0.0, 64.0, 32.0]
    assert pixels[:, 4:-4, 1].min() == 255 and pixels[:, 4:-4, [0, 2]].max() < 40


def test_modes_convert_to_rgb():
    grey = Image.fromarray(np.full((2, 2), 77, np.uint8))
    assert np.asarray(to_rgb(grey)).tolist() == [[[77] * 3] * 2] * 2
    transparent_grey = Image.merge("LA", [grey, Image.fromarray(np.array([[0, 255], [255, 255]], np.uint8))])
    assert np.asarray(to_rgb(transparent_grey))[0, 0].tolist() == [255, 255, 255]  # transparent → white
    assert np.asarray(to_rgb(transparent_grey))[0, 1].tolist() == [77, 77, 77]
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [10, 20, 30, 255]]], np.uint8))
    assert np.asarray(to_rgb(rgba)).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    cyan = Image.new("CMYK", (1, 1), (255, 0, 0, 0))
    assert np.asarray(to_rgb(cyan))[0, 0].tolist() == [0, 255, 255]
    bilevel = Image.fromarray(np.array([[True, False]]))
    assert np.asarray(to_rgb(bilevel))[0].tolist() == [[255] * 3, [0] * 3]
    with pytest.raises(ImageDecodeError, match="unsupported image mode 'F'"):
        to_rgb(Image.fromarray(np.zeros((2, 2), np.float32)))


def test_palette_transparency_and_sixteen_bit_through_decoding():
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([10, 20, 30] + [200, 100, 50] * 255)
    palette.putpixel((1, 0), 1)
    decoded = decode_image(_png(palette, transparency=0))
    assert decoded.mode == "P"
    assert np.asarray(decoded.image).tolist() == [[[255, 255, 255], [200, 100, 50]]]

    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 16-bit grey: k * 257 is 8-bit k
    decoded = decode_image(_png(Image.fromarray(values)))
    assert decoded.mode == "I;16"
    assert np.asarray(decoded.image)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_exif_orientation_is_applied():
    # A 40x20 image with a red dot at the top-left; orientation 6 means "rotate 90° clockwise to display".
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:4, :4] = [255, 0, 0]
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(_png(Image.fromarray(pixels), exif=exif.tobytes()))
    assert decoded.orientation == 6 and decoded.original_size == (20, 40)
    shown = np.asarray(decoded.image)
    assert shown[1, -2].tolist() == [255, 0, 0]  # top-left went to the top-right corner
    assert shown[1, 1].tolist() == [0, 0, 0]


def test_animated_image_keeps_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=10)
    decoded = decode_image(buffer.getvalue())
    assert decoded.frames == 2
    assert np.asarray(decoded.image)[0, 0].tolist() == [255, 0, 0]


def test_bad_bytes_give_reasons():
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(good, format="JPEG")
    cases = {
        b"": "empty file",
        b"hello, not an image": "not an image file",
        good.getvalue()[: len(good.getvalue()) // 2]: "truncated",
    }
    for data, reason in cases.items():
        with pytest.raises(ImageDecodeError, match=reason):
            prepare_image(data, 32)
    with pytest.raises(ImageDecodeError, match="over the limit of 1000"):
        prepare_image(_png(Image.new("RGB", (40, 40))), 32, max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="extreme aspect ratio"):
        prepare_image(_png(Image.new("RGB", (3000, 2))), 32)


def test_tiny_image_is_upsampled():
    pixels, record = prepare_image(_png(Image.new("RGB", (3, 2), (9, 99, 199))), 32)
    assert pixels.shape == (32, 32, 3)
    assert record["original_size"] == [3, 2]
    np.testing.assert_allclose(pixels.reshape(-1, 3).mean(0), [9, 99, 199], atol=1)


def test_compose_crop_box_maps_back_to_original():
    # A 64x64 packed image came from (100, 0)-(300, 200) of the original; its centre 32x32 is (150, 50)-(250, 150).
    assert compose_crop_box([100, 0, 300, 200], [16, 16, 48, 48], (64, 64)) == [150.0, 50.0, 250.0, 150.0]


# ---------------------------------------------------------------------------------------------------------------
# Shards


def _write_demo_shard(out_dir, index=0):
    rng = np.random.default_rng(0)
    with shards.ShardWriter(out_dir, index) as writer:
        for i in range(3):
            mean = rng.normal(size=(2, 4, 2, 2)).astype(np.float16)
            writer.write(latent_sample(f"cls/item{i}", mean, np.abs(mean), i, {"source": f"cls/item{i}.png"}))
        return writer.commit({"failures": [], "items": 3})


def test_shard_writer_is_reproducible_and_readable(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _write_demo_shard(tmp_path / "a")
    second = _write_demo_shard(tmp_path / "b")
    assert first["sha256"] == second["sha256"] and first["count"] == 3
    data_a = (tmp_path / "a" / "shard-000000.tar").read_bytes()
    assert data_a == (tmp_path / "b" / "shard-000000.tar").read_bytes()
    assert first["bytes"] == len(data_a) and first["sha256"] == shards.sha256_file(tmp_path / "a" / "shard-000000.tar")
    assert json.loads((tmp_path / "a" / "shard-000000.json").read_text())["sha256"] == first["sha256"]
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:4]] == [
        "cls/item0.cls",
        "cls/item0.json",
        "cls/item0.mean.npy",
        "cls/item0.std.npy",
    ]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "diffit", 0o444)}
    samples = [decode_sample(s) for s in shards.iter_samples(tmp_path / "a" / "shard-000000.tar")]
    assert [s["__key__"] for s in samples] == ["cls/item0", "cls/item1", "cls/item2"]
    assert [s["cls"] for s in samples] == [0, 1, 2]
    assert samples[0]["mean.npy"].dtype == np.float16 and samples[0]["mean.npy"].shape == (2, 4, 2, 2)
    assert samples[2]["json"] == {"source": "cls/item2.png"}
    assert list(tmp_path.glob("*/*.tmp-*")) == []


def test_shard_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(tmp_path, 5) as writer:
            writer.write(image_sample("k", np.zeros((4, 4, 3), np.uint8), 0, {}))
            raise RuntimeError("worker crashed")
    assert list(tmp_path.iterdir()) == []


def _demo_dataset(directory):
    directory.mkdir()
    sidecar = _write_demo_shard(directory)
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "latents",
        "resolution": 16,
        "num_classes": 3,
        "label_map": {"a": 0, "b": 1, "c": 2},
        "counts": {"seen": 3, "written": 3, "failed": 0},
        "shards": [{k: sidecar[k] for k in ("name", "count", "sha256", "bytes")}],
    }
    shards.write_json_to(directory, MANIFEST_NAME, manifest)
    return manifest


def test_manifest_readers_and_verify(tmp_path):
    manifest = _demo_dataset(tmp_path / "ds")
    loaded = load_manifest(tmp_path / "ds")
    assert loaded == manifest
    assert shard_urls(tmp_path / "ds", loaded) == [str(tmp_path / "ds" / "shard-000000.tar")]
    assert manifest_hash(tmp_path / "ds") == shards.sha256_file(tmp_path / "ds" / "manifest.json")
    assert verify_dataset(tmp_path / "ds").ok

    shard_path = tmp_path / "ds" / "shard-000000.tar"
    data = bytearray(shard_path.read_bytes())
    data[700] ^= 0x01
    shard_path.write_bytes(bytes(data))
    report = verify_dataset(tmp_path / "ds")
    assert not report.ok and "shard-000000.tar: sha256" in report.problems[0]


def test_load_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(ManifestError, match=str(tmp_path / "manifest.json")):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read .*manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1, "kind": "latents"}))
    with pytest.raises(ManifestError, match="lacks the key"):
        load_manifest(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# VAE


def test_resolve_local_vae_and_encode_matches_direct_call(tmp_path):
    import torch

    from pipeline.core import vae as vae_module

    save_tiny_vae(tmp_path / "vae")
    spec = vae_module.resolve_vae(str(tmp_path / "vae"))
    assert spec.source == "local" and spec.revision is None and len(spec.path_hash) == 64
    assert (spec.scaling_factor, spec.latent_channels, spec.downsample_factor) == (0.18215, 4, 8)
    entry = spec.manifest_entry("fp32")
    assert entry["convention"] == "unscaled" and entry["dtype"] == "fp32"

    model = vae_module.load_vae(spec.local_path)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    mean, std = vae_module.encode_pixels(model, pixels)
    assert mean.shape == std.shape == (3, 2, 4, 4, 4)
    with torch.no_grad():
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        direct = model.encode(x).latent_dist
        direct_flip = model.encode(torch.flip(x, dims=[3])).latent_dist
    np.testing.assert_allclose(mean[:, 0], direct.mean.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(std[:, 0], direct.std.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mean[:, 1], direct_flip.mean.numpy(), rtol=1e-4, atol=1e-5)
    decoded = vae_module.decode_latents(model, mean[:, 0])
    assert decoded.shape == (3, 32, 32, 3) and decoded.dtype == np.uint8

    # A full pipeline directory (with a vae/ folder) is accepted too.
    (tmp_path / "full").mkdir()
    os.rename(tmp_path / "vae", tmp_path / "full" / "vae")
    assert vae_module.resolve_vae(str(tmp_path / "full")).local_path == str((tmp_path / "full" / "vae").resolve())


def test_missing_vae_path_is_never_sent_to_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    from pipeline.core.vae import VAEError, resolve_vae

    def no_hub(*args, **kwargs):
        raise AssertionError("a path-looking --vae must not be looked up on the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    for spec in (str(tmp_path / "nope"), "./nope", "models/vae", "a/b/c", "~/no-such-vae-dir"):
        with pytest.raises(VAEError, match="no such directory. Pass an existing local directory"):
            resolve_vae(spec)


def test_hub_vae_offline_explains_local_path(tmp_path, monkeypatch):
    from pipeline.core.vae import VAEError, resolve_vae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"), raising=False)
    with pytest.raises(VAEError, match=r"offline .* pass\s+--vae DIR \(a local path\)"):
        resolve_vae("stabilityai/sd-vae-ft-ema")


def test_local_vae_problems_are_explained(tmp_path):
    from pipeline.core.vae import VAEError, resolve_vae

    (tmp_path / "empty").mkdir()
    with pytest.raises(VAEError, match="has no config.json"):
        resolve_vae(str(tmp_path / "empty"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(VAEError, match="not an AutoencoderKL"):
        resolve_vae(str(tmp_path / "unet"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / "noweights" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(VAEError, match="must be stored as safetensors"):
        resolve_vae(str(tmp_path / "noweights"))
    (tmp_path / "noweights" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(VAEError, match="not a readable safetensors file"):
        resolve_vae(str(tmp_path / "noweights"))
