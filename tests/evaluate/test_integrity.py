"""Integrity of the evaluate stage (issue 19): a damaged sample store is never exported or scored silently.

- A chunk flagged done whose file was deleted, truncated or overwritten (or whose labels or done flag are
  damaged) is found when evaluate resumes and sampled again: the store and the `--export-npz` output are then
  those of an uninterrupted run (samples are seeded per index).
- Where no resampling is possible (`export_npz`, the metric dataset called directly) such a chunk is a clear
  error naming its file; zarr would otherwise read it as its fill value (black images, label -1).
- The done flag is the commit marker: written after the images and labels, so a failed write leaves the chunk
  missing.
- Precision and recall are not swapped: a mode-collapsed sample set gives precision 1 and recall 0.1.
- Damaged metadata, reference files and caches are one error line naming the file.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.core.shards import sha256_file
from pipeline.evaluate import datasets as ds
from pipeline.evaluate import inception as incep
from pipeline.evaluate import metrics as M
from pipeline.evaluate import options as opts
from pipeline.evaluate import run as ev
from pipeline.evaluate.npz_export import export_npz
from pipeline.evaluate.reference import cache as ref_cache
from pipeline.evaluate.reference import formats as refs
from pipeline.evaluate.sample_store import STORE_NAME, SampleStore, SampleStoreError, StoreLayout
from tests.support.eval_fixtures import smooth_images, write_npz_reference

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_SAMPLES, BATCH, STEPS = 8, 2, 4
DAMAGED = 2  # the chunk the resume tests damage (samples 4 and 5)
SETTINGS = {"model": {"weights_sha256": "abc"}, "sampling": {"seed": 0}, "num_classes": 10}


def _chunk_file(store: Path, name: str, chunk: int) -> Path:
    """zarr 3's default chunk file of chunk `chunk` along the sample axis (`samples` has three more axes)."""
    return store / name / "c" / str(chunk) / ("0/0/0" if name == "samples" else "")


def _options(model: Path, out: Path) -> opts.EvaluateOptions:
    return opts.EvaluateOptions(
        model_dir=model,
        out_dir=out,
        num_samples=NUM_SAMPLES,
        batch_size=BATCH,
        sampling={"steps": STEPS, "guidance_scale": 4.6, "guidance_schedule": "power-cosine"},
        metrics=(),
        export_npz=True,
        device="cpu",
    )


def _npz(out: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(out / ev.NPZ_FILE) as data:
        return data["arr_0"], data["arr_1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, latent_model):
    """One uninterrupted evaluation (with --export-npz) that the damaged-and-resumed runs must reproduce."""
    out = tmp_path_factory.mktemp("uninterrupted")
    ev.run_evaluate(_options(latent_model, out))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Resume redoes damaged chunks


def _delete(path: Path) -> None:
    path.unlink()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x28\xb5\x2f\xfd not zstd data " * 4)


def _labels_out_of_range(store: Path) -> None:
    import zarr

    zarr.open_array(str(store / "labels"), mode="r+")[DAMAGED * BATCH : (DAMAGED + 1) * BATCH] = 99


DAMAGES = {
    "samples chunk deleted": lambda store: _delete(_chunk_file(store, "samples", DAMAGED)),
    "samples chunk truncated": lambda store: _truncate(_chunk_file(store, "samples", DAMAGED)),
    "samples chunk garbage": lambda store: _garbage(_chunk_file(store, "samples", DAMAGED)),
    "labels chunk deleted": lambda store: _delete(_chunk_file(store, "labels", DAMAGED)),
    "labels out of range": _labels_out_of_range,
    "done flag garbage": lambda store: _garbage(_chunk_file(store, "done", DAMAGED)),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_redoes_exactly_the_damaged_chunk(uninterrupted, latent_model, tmp_path, caplog, damage):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    (out / ev.NPZ_FILE).unlink()
    store = out / STORE_NAME
    assert SampleStore.open(store, mode="r").done_mask().all()
    DAMAGES[damage](store)

    with caplog.at_level(logging.WARNING, logger="pipeline.evaluate.sample_store"):
        record = ev.run_evaluate(_options(latent_model, out))
    assert record["sample_store"]["chunks_sampled_this_run"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"chunk {DAMAGED} is not intact" in message for message in warnings), warnings

    resumed, expected = SampleStore.open(store, mode="r"), SampleStore.open(uninterrupted / STORE_NAME, mode="r")
    np.testing.assert_array_equal(resumed.read_images(0, NUM_SAMPLES), expected.read_images(0, NUM_SAMPLES))
    np.testing.assert_array_equal(resumed.read_labels(), expected.read_labels())
    images, labels = _npz(out)
    expected_images, expected_labels = _npz(uninterrupted)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)
    assert images[DAMAGED * BATCH : (DAMAGED + 1) * BATCH].std() > 1  # not the black fill value


# ----------------------------------------------------------------------------------------------------------------
# No fill value is ever exported or scored


def _filled_store(path: Path, num_samples: int = 7, chunk_size: int = 3) -> SampleStore:
    """A complete store of images whose pixels encode their index, labels index % 10."""
    layout = StoreLayout(num_samples=num_samples, height=4, width=4, chunk_size=chunk_size)
    store = SampleStore.create(path, layout, SETTINGS)
    for chunk in range(layout.num_chunks):
        start, stop = layout.chunk_range(chunk)
        indices = np.arange(start, stop)
        images = np.broadcast_to((indices + 1).astype(np.uint8)[:, None, None, None], (stop - start, 4, 4, 3))
        store.write_chunk(chunk, images.copy(), indices % 10)
    return store


STORE_DAMAGES = {
    "samples chunk deleted": ("samples", _delete, "file is missing"),
    "samples chunk truncated": ("samples", _truncate, "unreadable samples"),
    "labels chunk deleted": ("labels", _delete, "file is missing"),
    "labels chunk garbage": ("labels", _garbage, "unreadable labels"),
    "done flag garbage": ("done", _garbage, "unreadable done flag"),
}


@pytest.mark.parametrize("damage", list(STORE_DAMAGES))
def test_export_and_metric_dataset_refuse_a_damaged_chunk(tmp_path, damage):
    path = tmp_path / "s.zarr"
    _filled_store(path)
    name, apply, problem = STORE_DAMAGES[damage]
    damaged_file = _chunk_file(path, name, 1)
    apply(damaged_file)

    expected = re.escape(str(damaged_file)) + ".*" + problem
    with pytest.raises(SampleStoreError, match=expected) as error:
        export_npz(SampleStore.open(path, mode="r"), tmp_path / "samples.npz")
    assert error.value.exit_code == 2 and "\n" not in str(error.value)
    assert not (tmp_path / "samples.npz").exists() and not list(tmp_path.glob("*.tmp-*"))

    with pytest.raises(SampleStoreError, match=expected):
        dataset = ds.SampleStoreDataset(path)
        [dataset[index] for index in range(len(dataset))]


def test_labels_outside_the_class_range_are_never_exported(tmp_path):
    path = tmp_path / "s.zarr"
    _filled_store(path)
    import zarr

    zarr.open_array(str(path / "labels"), mode="r+")[3:5] = -1  # the fill value, invalid for a conditional model
    with pytest.raises(SampleStoreError, match=re.escape(str(_chunk_file(path, "labels", 1))) + ".*not in"):
        export_npz(SampleStore.open(path, mode="r"), tmp_path / "samples.npz")


def test_a_black_chunk_and_unconditional_labels_are_stored_and_verified(tmp_path):
    """Chunks equal to the fill value (black images, labels -1) are written too, so none looks missing."""
    settings = {**SETTINGS, "num_classes": 0}
    store = SampleStore.create(tmp_path / "s.zarr", StoreLayout(4, 2, 2, 2), settings)
    store.write_chunk(0, np.zeros((2, 2, 2, 3), np.uint8), np.full(2, -1))
    store.write_chunk(1, np.full((2, 2, 2, 3), 7, np.uint8), np.full(2, -1))
    assert _chunk_file(store.path, "samples", 0).is_file() and _chunk_file(store.path, "labels", 0).is_file()
    assert store.verify_done_chunks() == [] and store.missing_chunks() == []
    store.require_complete()


@pytest.mark.parametrize("num_classes", [0, 10])
def test_an_absent_labels_file_is_only_tolerated_for_an_unconditional_model(tmp_path, num_classes):
    """Stores made before every chunk was written hold no labels file where the labels equal the fill value -1:
    harmless for an unconditional model (its labels are -1 by definition), a missing chunk otherwise."""
    store = SampleStore.create(tmp_path / "s.zarr", StoreLayout(4, 2, 2, 2), {**SETTINGS, "num_classes": num_classes})
    labels = np.full(2, -1) if num_classes == 0 else np.arange(2)
    for chunk in (0, 1):
        store.write_chunk(chunk, np.full((2, 2, 2, 3), 9, np.uint8), labels)
    _chunk_file(store.path, "labels", 1).unlink()
    assert store.verify_done_chunks() == ([] if num_classes == 0 else [1])


# ----------------------------------------------------------------------------------------------------------------
# The done flag is written last


def _write_fake_chunk(store: SampleStore, chunk: int) -> None:
    start, stop = store.layout.chunk_range(chunk)
    images = np.full((stop - start, store.layout.height, store.layout.width, 3), chunk + 1, np.uint8)
    store.write_chunk(chunk, images, np.arange(start, stop) % 10)


def test_done_flag_stays_unset_when_the_image_write_fails(tmp_path):
    path = tmp_path / "s.zarr"
    store = SampleStore.create(path, StoreLayout(6, 2, 2, 2), SETTINGS)
    _write_fake_chunk(store, 0)
    # A non-empty directory where chunk 1's image file goes: zarr cannot rename its file onto it.
    obstacle = _chunk_file(path, "samples", 1)
    obstacle.mkdir(parents=True)
    (obstacle / "keep").touch()
    with pytest.raises(OSError):
        _write_fake_chunk(store, 1)
    assert not store.done_mask()[1] and store.missing_chunks() == [1, 2]
    assert not _chunk_file(path, "labels", 1).exists()

    # A resumed run sees chunk 1 missing and fills it.
    shutil.rmtree(_chunk_file(path, "samples", 1))
    resumed = SampleStore.open(path, SETTINGS)
    assert resumed.missing_chunks() == [1, 2]
    for chunk in resumed.missing_chunks():
        _write_fake_chunk(resumed, chunk)
    assert resumed.is_complete()
    np.testing.assert_array_equal(resumed.read_images(0, 6)[:, 0, 0, 0], [1, 1, 2, 2, 3, 3])


def test_done_flag_stays_unset_when_the_label_write_fails(tmp_path, monkeypatch):
    import zarr

    path = tmp_path / "s.zarr"
    store = SampleStore.create(path, StoreLayout(4, 2, 2, 2), SETTINGS)
    original = zarr.Array.__setitem__

    def failing_labels_write(self, selection, value):
        if self.path == "labels":
            raise OSError("disk full")
        return original(self, selection, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing_labels_write)
    with pytest.raises(OSError, match="disk full"):
        _write_fake_chunk(store, 0)
    monkeypatch.undo()
    assert SampleStore.open(path, SETTINGS).missing_chunks() == [0, 1]


# ----------------------------------------------------------------------------------------------------------------
# Precision and recall are not swapped


def _table_extractor(table: torch.Tensor):
    """A torch-fidelity feature extractor whose feature of an image is row `index` of `table`, where the image's
    first two pixel values encode `index` (so the test chooses the features of every sample exactly)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class TableExtractor(FeatureExtractorBase):
        def __init__(self):
            super().__init__("table", ["2048"])

        @staticmethod
        def get_provided_features_list():
            return ("2048",)

        def forward(self, images):
            index = images[:, 0, 0, 0].long() * 256 + images[:, 1, 0, 0].long()
            return (table[index],)

    return TableExtractor()


def _index_images(indices: np.ndarray) -> np.ndarray:
    images = np.zeros((len(indices), 16, 16, 3), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = indices // 256, indices % 256
    return images


def _knn_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. (2019), written out: a point's manifold ball has the radius of its k-th nearest
    neighbour in its own set; precision = share of fake points inside some real ball, recall = share of real
    points inside some fake ball."""

    def distances(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    real_radius = np.sort(distances(real, real), axis=1)[:, k]  # column 0 is the point itself
    fake_radius = np.sort(distances(fake, fake), axis=1)[:, k]
    precision = (distances(fake, real) <= real_radius[None, :]).any(axis=1).mean()
    recall = (distances(real, fake) <= fake_radius[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def test_mode_collapsed_samples_give_full_precision_and_low_recall(tmp_path):
    """200 reference features; the samples are copies of 20 of them (10 each): every sample lies on a reference
    point (precision 1), and only 20 of 200 reference points are covered (recall 0.1). Swapping the sample and
    reference arguments anywhere on the path gives precision 0.1 and recall 1."""
    rng = np.random.default_rng(0)
    # Integer-valued features: float32 distances are then exact, in torch's matmul cdist and in numpy alike.
    reference_features = np.round(rng.normal(0.0, 4.0, (200, 64))).astype(np.float32)
    sample_rows = np.repeat(np.arange(20), 10)
    table = torch.from_numpy(reference_features)

    reference = refs.open_reference(write_npz_reference(tmp_path / "ref.npz", _index_images(np.arange(200))))
    samples = ds.ArrayDataset(_index_images(sample_rows))
    config = incep.FeatureConfig(
        weights=incep.InceptionWeights(Path("table-features"), "0" * 64), layer_prc="2048", batch_size=64
    )
    result = M.compute_metrics(samples, reference, ["prc"], config, tmp_path / "cache", _table_extractor(table))
    values = result["values"]

    expected_precision, expected_recall = _knn_precision_recall(
        reference_features.astype(np.float64), reference_features[sample_rows].astype(np.float64), k=3
    )
    assert config.prc_neighborhood == 3
    assert (expected_precision, expected_recall) == (1.0, 0.1)
    assert values["precision"] == 1.0
    assert values["recall"] == pytest.approx(expected_recall, abs=1e-6) and values["recall"] < 0.3


# ----------------------------------------------------------------------------------------------------------------
# Damaged files: one clear line naming the file


def test_damaged_array_metadata_is_one_line_naming_the_file(uninterrupted, latent_model, tmp_path):
    from cli.main import app

    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    metadata = out / STORE_NAME / "samples" / "zarr.json"
    metadata.write_text("{not json")
    arguments = ["evaluate", "--model", str(latent_model), "--out", str(out), "--num-samples", str(NUM_SAMPLES)]
    arguments += ["--batch-size", str(BATCH), "--steps", str(STEPS), "--guidance-scale", "4.6"]
    arguments += ["--guidance-schedule", "power-cosine", "--metrics", "", "--device", "cpu"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"damaged sample store ({metadata}: JSONDecodeError" in result.output

    # Valid JSON with a shape that does not fit the layout: named too, instead of reading past the layout.
    shutil.rmtree(out / STORE_NAME)
    shutil.copytree(uninterrupted / STORE_NAME, out / STORE_NAME)
    document = json.loads(metadata.read_text())
    document["shape"][0] = NUM_SAMPLES - 2
    metadata.write_text(json.dumps(document))
    with pytest.raises(SampleStoreError, match=re.escape(str(metadata)) + ".*shape"):
        SampleStore.open(out / STORE_NAME, mode="r")


def test_damaged_content_hash_memo_is_rebuilt(tmp_path, caplog):
    reference = refs.open_reference(write_npz_reference(tmp_path / "ref.npz", smooth_images(4)))
    cache = tmp_path / "cache"
    cache.mkdir()
    expected = sha256_file(tmp_path / "ref.npz")
    for text in ("[1, 2]", '"text"', json.dumps({"x": 5}), "{not json"):
        (cache / "content-hashes.json").write_text(text)
        reference._content_hash = None
        with caplog.at_level(logging.WARNING, logger="pipeline.evaluate.reference.cache"):
            assert ref_cache.reference_content_hash(reference, cache) == expected
        assert expected in json.loads((cache / "content-hashes.json").read_text()).values()
    assert "content-hashes.json" in caplog.text


def _corrupt_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for index in range(len(data) // 3, len(data) // 3 + 64):
        data[index] ^= 0x55
    path.write_bytes(bytes(data))


def test_damaged_reference_npz_is_one_line_naming_the_file(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (16, 16, 16, 3), dtype=np.uint8)
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, arr_0=images)
    _corrupt_middle(compressed)
    with pytest.raises(ds.ReferenceInputError, match=re.escape(str(compressed))) as error:
        refs.open_reference(compressed)
    assert error.value.exit_code == 2

    # Statistics are checked when the reference is opened (before any sampling), not after sampling.
    statistics = tmp_path / "stats.npz"
    np.savez(statistics, mu=np.zeros(64), sigma=np.eye(64))
    _corrupt_middle(statistics)
    with pytest.raises(ds.ReferenceInputError, match=re.escape(str(statistics)) + ": cannot read mu / sigma"):
        refs.open_reference(statistics)
