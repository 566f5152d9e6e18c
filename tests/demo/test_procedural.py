"""The procedural demo dataset: determinism, layout, class distinctness, resume, and the in-memory loader."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from pipeline.core.atomic import temp_path_for
from pipeline.demo.labelled_images import load_labelled_images
from pipeline.demo.procedural import (
    DATASET_JSON,
    MAX_CLASSES,
    ProceduralDatasetError,
    class_names,
    generate_dataset,
    render_class_examples,
)


def _files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file below `root`."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_runs_are_byte_identical(tmp_path):
    first = generate_dataset(
        tmp_path / "a", num_classes=3, per_class=4, resolution=24, seed=5, holdout_per_class=2, progress=False
    )
    generate_dataset(
        tmp_path / "b", num_classes=3, per_class=4, resolution=24, seed=5, holdout_per_class=2, progress=False
    )
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a == files_b
    assert len(files_a) == 3 * 4 + 3 * 2 + 1  # images + dataset.json
    assert first["written"] == 18 and first["skipped"] == 0
    # Another seed gives other pictures.
    generate_dataset(tmp_path / "c", num_classes=3, per_class=4, resolution=24, seed=6, progress=False)
    assert (
        _files(tmp_path / "c")["train/c00_red_circle/c00_red_circle_00000.png"]
        != files_a["train/c00_red_circle/c00_red_circle_00000.png"]
    )


def test_layout_counts_and_metadata(tmp_path):
    info = generate_dataset(
        tmp_path, num_classes=4, per_class=3, resolution=16, seed=0, holdout_per_class=2, progress=False
    )
    names = class_names(4)
    assert names == ["c00_red_circle", "c01_blue_square", "c02_green_triangle", "c03_yellow_ring"]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == names  # sorted folder order = class index
    for split, count in (("train", 3), ("holdout", 2)):
        for name in names:
            files = sorted(p.name for p in (tmp_path / split / name).iterdir())
            assert files == [f"{name}_{i:05d}.png" for i in range(count)]
            with Image.open(tmp_path / split / name / files[0]) as image:
                assert image.mode == "RGB" and image.size == (16, 16)
    stored = json.loads((tmp_path / DATASET_JSON).read_text())
    assert stored["complete"] is True
    assert stored["classes"] == names and stored["counts"] == {"train": 12, "holdout": 8}
    assert stored["seed"] == 0 and stored["resolution"] == 16
    assert info["counts"] == stored["counts"]


def test_images_depend_only_on_seed_class_and_index(tmp_path):
    generate_dataset(tmp_path, num_classes=2, per_class=3, resolution=20, seed=3, progress=False)
    in_memory = render_class_examples(1, 3, resolution=20, seed=3)
    for index in range(3):
        path = tmp_path / "train" / "c01_blue_square" / f"c01_blue_square_{index:05d}.png"
        with Image.open(path) as image:
            np.testing.assert_array_equal(np.asarray(image), in_memory[index])
    # Growing the dataset keeps the existing images (per-image generators, not one stream).
    generate_dataset(tmp_path, num_classes=2, per_class=5, resolution=20, seed=3, progress=False)
    with Image.open(tmp_path / "train" / "c01_blue_square" / "c01_blue_square_00002.png") as image:
        np.testing.assert_array_equal(np.asarray(image), in_memory[2])


def test_classes_are_distinct_in_colour_and_learnable_by_nearest_centroid():
    # Mean colour per class differs clearly between every pair of classes.
    images = {k: render_class_examples(k, 40, resolution=32, seed=0) for k in range(MAX_CLASSES)}
    means = np.stack([images[k].reshape(-1, 3).mean(0) for k in range(MAX_CLASSES)])
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(MAX_CLASSES, dtype=bool)].min() > 8.0

    # A nearest-centroid rule on colour statistics (mean + spread per channel) already separates the classes on
    # unseen images: what a tiny model can learn in minutes.
    def features(batch):
        flat = batch.reshape(len(batch), -1, 3).astype(np.float64)
        return np.concatenate([flat.mean(1), flat.std(1)], axis=1)

    centroids = np.stack([features(images[k][:30]).mean(0) for k in range(MAX_CLASSES)])
    correct = total = 0
    for k in range(MAX_CLASSES):
        test = features(images[k][30:])
        predicted = np.linalg.norm(test[:, None] - centroids[None], axis=-1).argmin(1)
        correct += int((predicted == k).sum())
        total += len(test)
    assert correct / total >= 0.9


def test_resume_skips_existing_and_restores_missing(tmp_path):
    generate_dataset(tmp_path, num_classes=2, per_class=3, resolution=16, seed=1, progress=False)
    reference = _files(tmp_path)
    missing = tmp_path / "train" / "c00_red_circle" / "c00_red_circle_00001.png"
    missing.unlink()
    leftovers = [
        temp_path_for(missing),  # a killed atomic write in a class folder
        temp_path_for(tmp_path / "dataset.json"),  # and at the top
        missing.with_name(".c00_red_circle_00001.png.tmp-123"),  # hidden, as older versions named them
    ]
    for leftover in leftovers:
        leftover.write_bytes(b"partial")
    info = generate_dataset(tmp_path, num_classes=2, per_class=3, resolution=16, seed=1, progress=False)
    assert info["written"] == 1 and info["skipped"] == 5
    assert not any(leftover.exists() for leftover in leftovers)
    assert _files(tmp_path) == reference


def test_other_settings_and_foreign_files_are_refused(tmp_path):
    generate_dataset(tmp_path, num_classes=2, per_class=3, resolution=16, seed=1, progress=False)
    with pytest.raises(ProceduralDatasetError, match="seed"):
        generate_dataset(tmp_path, num_classes=2, per_class=3, resolution=16, seed=2, progress=False)
    with pytest.raises(ProceduralDatasetError, match="larger per-class count"):
        generate_dataset(tmp_path, num_classes=2, per_class=2, resolution=16, seed=1, progress=False)
    with pytest.raises(ProceduralDatasetError, match="between 1 and"):
        generate_dataset(tmp_path / "x", num_classes=MAX_CLASSES + 1, per_class=1, progress=False)


def test_loader_reads_folders_and_procedural_roots(tmp_path):
    generate_dataset(tmp_path, num_classes=3, per_class=2, resolution=16, seed=0, holdout_per_class=1, progress=False)
    data = load_labelled_images(tmp_path, resolution=16)  # the root means its train split
    assert data.images.shape == (6, 16, 16, 3) and data.images.dtype == np.uint8
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.label_map == {name: k for k, name in enumerate(class_names(3))}
    np.testing.assert_array_equal(data.images[2:4], render_class_examples(1, 2, resolution=16, seed=0))
    held = load_labelled_images(tmp_path / "holdout", resolution=16)
    assert held.labels.tolist() == [0, 1, 2]
    subset = load_labelled_images(tmp_path / "train", resolution=8, max_images=3, seed=0)
    assert subset.images.shape == (3, 8, 8, 3)


def test_loader_reads_packed_shards(tmp_path):
    from pipeline.core.atomic import write_json_atomic
    from pipeline.core.manifest import FORMAT_VERSION
    from pipeline.core.shard_members import image_sample
    from pipeline.core.shards import ShardWriter

    generate_dataset(tmp_path / "synth", num_classes=2, per_class=2, resolution=16, seed=0, progress=False)
    folder = load_labelled_images(tmp_path / "synth", resolution=16)
    packed = tmp_path / "packed"
    packed.mkdir()
    with ShardWriter(packed, 0) as writer:
        for index, (pixels, label) in enumerate(zip(folder.images, folder.labels)):
            writer.write(image_sample(f"sample{index:03d}", pixels, int(label), {"source": folder.paths[index]}))
        sidecar = writer.commit({"failures": 0})
    write_json_atomic(
        packed / "manifest.json",
        {
            "format_version": FORMAT_VERSION,
            "kind": "images",
            "resolution": 16,
            "num_classes": 2,
            "label_map": folder.label_map,
            "counts": {"seen": 4, "written": 4, "failed": 0},
            "shards": [{k: sidecar[k] for k in ("name", "count", "sha256", "bytes")}],
        },
    )
    from_shards = load_labelled_images(packed, resolution=16)
    np.testing.assert_array_equal(from_shards.images, folder.images)
    assert from_shards.labels.tolist() == folder.labels.tolist()


def test_synth_command(tmp_path):
    runner = CliRunner()
    out = tmp_path / "synth"
    result = runner.invoke(
        app,
        [
            "synth",
            str(out),
            "--classes",
            "3",
            "--per-class",
            "2",
            "--holdout-per-class",
            "1",
            "--resolution",
            "16",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / DATASET_JSON).read_text())["counts"] == {"train": 6, "holdout": 3}
    refused = runner.invoke(app, ["synth", str(out), "--classes", "3", "--per-class", "2", "--seed", "9"])
    assert refused.exit_code == 2 and "other settings" in refused.output
    assert "procedural" in runner.invoke(app, ["synth", "--help"]).output
