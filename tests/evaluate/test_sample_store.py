"""The zarr sample store: per-sample seeds/labels, chunk ownership, resume, settings guard, ADM .npz export."""

import multiprocessing
import os
import shutil

import numpy as np
import pytest

from pipeline.evaluate.npz_export import export_npz
from pipeline.evaluate.sample_seeds import sample_class_labels, sample_noise_seeds
from pipeline.evaluate.sample_store import (
    SampleStore,
    SampleStoreError,
    SampleStoreMismatchError,
    StoreLayout,
    assign_chunks,
)

SETTINGS = {"model": {"weights_sha256": "abc"}, "sampling": {"sampler": "ddpm", "steps": 4, "seed": 0}}


def _fake_chunk(layout: StoreLayout, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose pixels encode their sample index, so misplaced writes are visible."""
    start, stop = layout.chunk_range(chunk)
    indices = np.arange(start, stop)
    images = np.broadcast_to(
        (indices % 251).astype(np.uint8)[:, None, None, None], (stop - start, layout.height, layout.width, 3)
    ).copy()
    return images, indices * 10


def test_seeds_and_labels_depend_only_on_seed_and_index():
    all_seeds = sample_noise_seeds(7, np.arange(100))
    assert sample_noise_seeds(7, [42, 3]) == [all_seeds[42], all_seeds[3]]
    assert len(set(all_seeds)) == 100 and all(0 <= s < 2**63 for s in all_seeds)
    assert sample_noise_seeds(8, [0]) != sample_noise_seeds(7, [0])

    labels = sample_class_labels(7, np.arange(2000), 10)
    np.testing.assert_array_equal(sample_class_labels(7, [5, 1999], 10), labels[[5, 1999]])
    counts = np.bincount(labels, minlength=10)
    assert labels.min() >= 0 and labels.max() <= 9 and counts.min() > 150  # roughly uniform over 10 classes
    # The label stream is not the noise-seed stream.
    assert not np.array_equal(labels, np.asarray(all_seeds[:100] * 20, dtype=np.uint64) % 10)


def test_cycled_and_unconditional_labels():
    np.testing.assert_array_equal(
        sample_class_labels(0, np.arange(7), 1000, classes=[88, 207, 360]), [88, 207, 360, 88, 207, 360, 88]
    )
    np.testing.assert_array_equal(sample_class_labels(0, np.arange(3), 0), [-1, -1, -1])
    with pytest.raises(ValueError, match="empty"):
        sample_class_labels(0, np.arange(3), 10, classes=[])


def test_assign_chunks_gives_each_chunk_one_writer():
    missing = [0, 2, 3, 5, 8, 9, 11]
    shares = [assign_chunks(missing, rank, 3) for rank in range(3)]
    assert sorted(c for share in shares for c in share) == missing
    assert shares[0] == [0, 5, 11]
    with pytest.raises(ValueError):
        assign_chunks(missing, 3, 3)


def test_store_roundtrip_resume_and_settings_guard(tmp_path):
    layout = StoreLayout(num_samples=10, height=4, width=5, chunk_size=4)
    store = SampleStore.open_or_create(tmp_path / "samples.zarr", layout, SETTINGS)
    assert store.layout.num_chunks == 3 and store.missing_chunks() == [0, 1, 2]
    images, labels = _fake_chunk(layout, 1)
    store.write_chunk(1, images, labels)

    # Re-opening with the same settings resumes: only chunks 0 and 2 are left; a different batch size does not
    # change the chunking of an existing store.
    reopened = SampleStore.open_or_create(tmp_path / "samples.zarr", StoreLayout(10, 4, 5, 3), SETTINGS)
    assert reopened.missing_chunks() == [0, 2] and reopened.layout.chunk_size == 4
    for chunk in reopened.missing_chunks():
        reopened.write_chunk(chunk, *_fake_chunk(layout, chunk))
    assert reopened.is_complete()
    np.testing.assert_array_equal(reopened.read_images(0, 10)[:, 0, 0, 0], np.arange(10))
    np.testing.assert_array_equal(reopened.read_labels(), np.arange(10) * 10)

    other = {**SETTINGS, "sampling": {**SETTINGS["sampling"], "seed": 1}}
    with pytest.raises(SampleStoreMismatchError, match="seed"):
        SampleStore.open(tmp_path / "samples.zarr", other)
    with pytest.raises(SampleStoreMismatchError, match="20 of 4x5"):
        SampleStore.open_or_create(tmp_path / "samples.zarr", StoreLayout(20, 4, 5, 4), SETTINGS)


def test_write_chunk_checks_shapes(tmp_path):
    layout = StoreLayout(num_samples=5, height=2, width=2, chunk_size=4)
    store = SampleStore.create(tmp_path / "s.zarr", layout, SETTINGS)
    with pytest.raises(ValueError, match="shape"):
        store.write_chunk(1, np.zeros((4, 2, 2, 3), np.uint8), np.zeros(4))  # last chunk holds 1 sample
    with pytest.raises(ValueError, match="uint8"):
        store.write_chunk(0, np.zeros((4, 2, 2, 3), np.float32), np.zeros(4))
    with pytest.raises(FileExistsError):
        SampleStore.create(tmp_path / "s.zarr", layout, SETTINGS)
    with pytest.raises(FileNotFoundError, match="not a sample store"):
        SampleStore.open(tmp_path / "nothing.zarr")


def _write_owned_chunks(path: str, rank: int, world_size: int) -> None:
    store = SampleStore.open(path, SETTINGS)
    for chunk in assign_chunks(list(range(store.layout.num_chunks)), rank, world_size):
        store.write_chunk(chunk, *_fake_chunk(store.layout, chunk))


def test_concurrent_processes_fill_disjoint_chunks(tmp_path):
    layout = StoreLayout(num_samples=23, height=3, width=3, chunk_size=2)
    path = tmp_path / "samples.zarr"
    SampleStore.create(path, layout, SETTINGS)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_owned_chunks, args=(str(path), rank, 3)) for rank in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    store = SampleStore.open(path, SETTINGS)
    assert store.is_complete()
    np.testing.assert_array_equal(store.read_images(0, 23)[:, 1, 1, 2], np.arange(23))


def test_export_npz_is_the_adm_layout(tmp_path):
    layout = StoreLayout(num_samples=7, height=4, width=4, chunk_size=3)
    store = SampleStore.create(tmp_path / "s.zarr", layout, SETTINGS)
    with pytest.raises(ValueError, match="missing"):
        export_npz(store, tmp_path / "early.npz")
    assert not (tmp_path / "early.npz").exists()
    for chunk in range(layout.num_chunks):
        store.write_chunk(chunk, *_fake_chunk(layout, chunk))
    path = export_npz(store, tmp_path / "samples.npz", batch=2)
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1", "pixel_quantization"]
        assert str(data["pixel_quantization"]) == "round"
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (7, 4, 4, 3)
        np.testing.assert_array_equal(data["arr_0"], store.read_images(0, 7))
        np.testing.assert_array_equal(data["arr_1"], np.arange(7) * 10)
    assert not list(tmp_path.glob("*.tmp-*"))  # no temporary file (or store folder) left behind
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # the usual mode, not a private temporary file's


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_damaged_store_is_one_clear_error(tmp_path):
    layout = StoreLayout(num_samples=4, height=2, width=2, chunk_size=2)
    path = tmp_path / "s.zarr"
    SampleStore.create(path, layout, SETTINGS)
    assert (path.stat().st_mode & 0o777) == 0o777 & ~_umask() and not list(tmp_path.glob("*.tmp-*"))
    shutil.rmtree(path / "done")
    with pytest.raises(SampleStoreError, match=f"{path}: damaged sample store .*done"):
        SampleStore.open(path, SETTINGS)
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(SampleStoreError, match=f"{path}: damaged sample store .*JSONDecodeError"):
        SampleStore.open(path, SETTINGS)
