"""Trackers: scalars and sample grids reach TensorBoard and W&B (offline) in each one's own form, read back from
the files they write; a tracker whose package is missing is an error before any step."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from train_fixtures import read_metrics, tiny_latent_config, write_config, write_latent_dataset

from pipeline.train import TrainArgs, TrainError, run
from pipeline.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")

# What every record holds on CPU (the trackers get all of it but the step, which is their step).
SCALARS = {"loss", "lr", "grad_norm", "images_per_s", "sec_per_kimg", "data_wait_fraction", "images_seen"}


def train_with_tracker(tmp_path: Path, tracker) -> Path:
    """Four steps of DiffiT-Tiny/2, a record every step, a 4-sample grid at steps 2 and 4."""
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=1, num_classes=10)
    config = tiny_latent_config(
        train={"max_steps": 4, "tracker": tracker},
        sample={"every": 2, "count": 4, "steps": 2},
        checkpoint={"every": 100},
    )
    run_dir = tmp_path / "run"
    run(TrainArgs(run_dir=run_dir, config_path=write_config(tmp_path / "c.yaml", config), data_dir=data))
    return run_dir


def png_pixels(source) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(source).convert("RGB"))


def test_tensorboard_event_file_holds_every_scalar_and_the_sample_grids(tmp_path):
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train_with_tracker(tmp_path, "tensorboard")
    records = read_metrics(run_dir)
    # accelerate writes the scalars and images into one event file (hparams go to a sub-directory of their own).
    events = [EventAccumulator(str(p), size_guidance={"images": 0, "scalars": 0}) for p in _event_files(run_dir)]
    for accumulator in events:
        accumulator.Reload()
    (scalars,) = [a for a in events if "loss" in a.Tags()["scalars"]]
    assert set(scalars.Tags()["scalars"]) == SCALARS
    for key in SCALARS:
        logged = [(e.step, e.value) for e in scalars.Scalars(key)]
        # TensorBoard stores float32.
        assert logged == [(r["step"], pytest.approx(np.float32(r[key]), rel=1e-6)) for r in records]
    images = scalars.Images("samples")
    assert [e.step for e in images] == [2, 4]
    for event in images:
        decoded = png_pixels(io.BytesIO(event.encoded_image_string))
        assert np.array_equal(decoded, png_pixels(run_dir / "samples" / f"step-{event.step:07d}.png"))


def _event_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "logs").rglob("events.out.tfevents.*"))


def test_wandb_offline_run_holds_every_scalar_and_the_sample_grids(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    root = tmp_path / "wandb-home"
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root),
        "WANDB_CONFIG_DIR": str(root / "config"),
        "WANDB_CACHE_DIR": str(root / "cache"),
        "WANDB_DATA_DIR": str(root / "data"),
        "WANDB_CONSOLE": "off",
        "WANDB_SILENT": "true",
    }.items():
        monkeypatch.setenv(name, value)
    run_dir = train_with_tracker(tmp_path, ["wandb", "tensorboard"])  # a list: both get everything
    records = read_metrics(run_dir)
    assert _event_files(run_dir)

    (offline_run,) = (root / "wandb").glob("offline-run-*")
    (log,) = offline_run.glob("run-*.wandb")
    history = [row for kind, row in finished_wandb_log(log) if kind == "history" and "loss" in row]
    assert [row["_step"] for row in history] == [r["step"] for r in records]
    for row, record in zip(history, records):
        assert {key: row[key] for key in SCALARS} == {key: record[key] for key in SCALARS}  # exact, via JSON
    grids = {row["_step"]: row["samples/filenames"] for row in history if "samples/filenames" in row}
    assert sorted(grids) == [2, 4]
    for step, (name,) in grids.items():
        assert np.array_equal(
            png_pixels(offline_run / "files" / name), png_pixels(run_dir / "samples" / f"step-{step:07d}.png")
        )
    assert json.loads((run_dir / "run.json").read_text())["dataset"]["num_classes"] == 10


def finished_wandb_log(path: Path, timeout: float = 60) -> list[tuple[str, dict]]:
    """The records of a W&B run log once its writer (the wandb-core service, which goes on writing after
    `run.finish()` returns in offline mode) has written the final "exit" record."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path)
        if any(kind == "exit" for kind, _ in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def wandb_records(path: Path) -> list[tuple[str, dict]]:
    """(kind, history row or {}) of each record of a W&B run log (`run-*.wandb`): a LevelDB-style log of `Record`
    protobufs, in blocks of 32 KiB after a 7-byte file header; each chunk has a 7-byte header (crc32, length,
    type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    if data[:4] != b":W&B":
        return []
    rows, position, pending = [], 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            kind = record.WhichOneof("record_type")
            items = record.history.item if kind == "history" else []
            rows.append((kind, {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}))
    return rows


def test_a_tracker_that_is_not_installed_is_an_error_before_any_step(tmp_path):
    import importlib.util

    missing = next(name for name in ("aim", "dvclive", "trackio") if importlib.util.find_spec(name) is None)
    with pytest.raises(TrainError, match=f"train.tracker: '{missing}' needs the {missing} package"):
        train_with_tracker(tmp_path, ["tensorboard", missing])
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not list_checkpoints(tmp_path / "run")
