"""Trackers: scalars and sample grids reach TensorBoard, W&B (offline), MLflow (file store), Comet (offline),
ClearML (offline) and Aim in each one's own form, read back from the files they write (each test is skipped where
its package is not installed); a tracker whose package is missing is an error before any step."""

from __future__ import annotations

import io
import json
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.train import TrainError, TrainOptions, run_train
from pipeline.train.checkpoint import list_checkpoints
from tests.support.train_fixtures import read_metrics, tiny_latent_config, write_config, write_latent_dataset

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
    run_train(TrainOptions(run_dir=run_dir, config_path=write_config(tmp_path / "c.yaml", config), data_dir=data))
    return run_dir


def png_pixels(source) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(source).convert("RGB"))


def test_tensorboard_event_file_holds_every_scalar_and_the_sample_grids(tmp_path):
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


def test_mlflow_file_store_run_holds_every_scalar_and_the_sample_grids(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    store = tmp_path / "mlruns"
    for name, value in {
        "MLFLOW_TRACKING_URI": store.as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 refuses the file store (no database, no server) without it
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }.items():
        monkeypatch.setenv(name, value)
    run_dir = train_with_tracker(tmp_path, "mlflow")
    records = read_metrics(run_dir)

    client = MlflowClient()
    (experiment,) = [e for e in client.search_experiments() if e.name == "train"]
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.run_name == "run" and mlflow_run.info.status == "FINISHED"
    assert set(mlflow_run.data.metrics) == SCALARS
    for key in SCALARS:
        history = sorted((m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, key))
        assert history == [(r["step"], r[key]) for r in records]  # exact: the file store keeps float64 as text
    assert mlflow_run.data.params["train.max_steps"] == "4"

    # `log_image(key=..., step=...)`: images/<key>+step+<step>+timestamp+<ms>+<uuid>.png and a smaller .webp copy.
    images = client.download_artifacts(mlflow_run.info.run_id, "images", str(tmp_path / "artifacts"))
    grids = sorted((int(path.name.split("+")[2]), path) for path in Path(images).glob("samples+step+*.png"))
    assert [step for step, _ in grids] == [2, 4] and len(list(Path(images).glob("*.webp"))) == 2
    for step, path in grids:
        assert np.array_equal(png_pixels(path), png_pixels(run_dir / "samples" / f"step-{step:07d}.png"))


def test_comet_offline_experiment_holds_every_scalar_and_the_sample_grids(tmp_path, monkeypatch):
    offline = tmp_path / "comet"
    for name, value in {
        "COMET_START_ONLINE": "false",  # comet_ml.start() (what Accelerate calls) makes an OfflineExperiment
        "COMET_OFFLINE_DIRECTORY": str(offline),
        "COMET_CONFIG": str(tmp_path / "no-comet.config"),  # not ~/.comet.config
        "COMET_DISABLE_AUTO_LOGGING": "1",  # read at import: no import hooks into torch/tensorboard/mlflow
        "COMET_ERROR_TRACKING_ENABLE": "false",
        "COMET_AUTO_LOG_GIT_METADATA": "false",
        "COMET_AUTO_LOG_GIT_PATCH": "false",
        "COMET_AUTO_LOG_ENV_DETAILS": "false",
    }.items():
        monkeypatch.setenv(name, value)
    pytest.importorskip("comet_ml")
    run_dir = train_with_tracker(tmp_path, "comet_ml")
    records = read_metrics(run_dir)

    # The offline experiment is one zip: experiment.json, messages.json (a JSON message a line) and the uploads.
    (archive,) = offline.glob("*.zip")
    with zipfile.ZipFile(archive) as zipped:
        assert json.loads(zipped.read("experiment.json"))["project_name"] == "train"
        messages = [json.loads(line) for line in zipped.read("messages.json").decode().splitlines()]
        metrics = [m["payload"]["metric"] for m in messages if m["type"] == "metric_msg"]
        assert {m["metricName"] for m in metrics} == SCALARS
        for key in SCALARS:
            logged = [(m["step"], m["metricValue"]) for m in metrics if m["metricName"] == key]
            assert logged == [(r["step"], r[key]) for r in records]  # exact, via JSON
        parameters = {
            m["payload"]["param"]["paramName"]: m["payload"]["param"]["paramValue"]
            for m in messages
            if m["type"] == "parameter_msg"
        }
        assert parameters["train.max_steps"] == 4
        uploads = [m["payload"] for m in messages if m["type"] == "file_upload"]
        images = [u for u in uploads if u["upload_type"] == "visualization"]
        assert [(u["additional_params"]["figName"], u["additional_params"]["step"]) for u in images] == [
            ("samples", 2),
            ("samples", 4),
        ]
        for upload in images:
            step = upload["additional_params"]["step"]
            pixels = png_pixels(io.BytesIO(zipped.read(upload["file_path"])))
            assert np.array_equal(pixels, png_pixels(run_dir / "samples" / f"step-{step:07d}.png"))


def test_clearml_offline_session_holds_every_scalar_and_the_sample_grids(tmp_path, monkeypatch):
    # Not ~/clearml.conf: lossless debug images (ClearML's default is JPEG, quality 87), and reports sent from this
    # process (a reporting subprocess makes `task.close()` wait about 6 s for it).
    config = tmp_path / "clearml.conf"
    config.write_text("sdk { metrics { images { format: PNG } }, development { report_use_subprocess: false } }\n")
    for name, value in {
        "CLEARML_OFFLINE_MODE": "1",  # read when clearml is imported
        "CLEARML_CACHE_DIR": str(tmp_path / "clearml"),  # the session: CLEARML_CACHE_DIR/offline/<task id>/
        "CLEARML_CONFIG_FILE": str(config),
    }.items():
        monkeypatch.setenv(name, value)
    pytest.importorskip("clearml")
    run_dir = train_with_tracker(tmp_path, "clearml")
    records = read_metrics(run_dir)

    (session,) = [p for p in (tmp_path / "clearml" / "offline").iterdir() if p.is_dir()]
    assert json.loads((session / "task.json").read_text())["name"] == "train"
    # metrics.jsonl: a JSON list of events a line; Accelerate reports scalar `key` as title `key`, series "train".
    events = [event for line in (session / "metrics.jsonl").read_text().splitlines() for event in json.loads(line)]
    scalars = [e for e in events if e["type"] == "training_stats_scalar"]
    assert {(e["metric"], e["variant"]) for e in scalars} == {(key, "train") for key in SCALARS}
    for key in SCALARS:
        logged = [(e["iter"], e["value"]) for e in scalars if (e["metric"], e["variant"]) == (key, "train")]
        assert logged == [(r["step"], r[key]) for r in records]  # exact, via JSON
    images = [e for e in events if e["type"] == "training_debug_image"]
    assert [(e["metric"], e["variant"], e["iter"]) for e in images] == [
        ("samples", "train", 2),
        ("samples", "train", 4),
    ]
    for event in images:
        step = event["iter"]
        assert event["url"].endswith(".png") and Path(event["url"]).is_relative_to(session)
        assert np.array_equal(png_pixels(event["url"]), png_pixels(run_dir / "samples" / f"step-{step:07d}.png"))


def test_aim_repository_holds_every_scalar_and_the_sample_grids(tmp_path):
    pytest.importorskip("aim")
    from aim import Repo
    from aim.sdk.index_manager import RepoIndexManager
    from aim.storage.context import Context

    run_dir = train_with_tracker(tmp_path, "aim")
    records = read_metrics(run_dir)

    repo = Repo(str(run_dir / "logs"))  # the Aim repository: RUN/logs/.aim
    (run_hash,) = repo.list_all_runs()
    # A finished run is read through the repository's index, which `aim up` updates in the background.
    RepoIndexManager.get_index_manager(repo).index(run_hash)
    aim_run = repo.get_run(run_hash)
    assert aim_run.name == "train" and aim_run.end_time is not None
    assert aim_run["hparams"]["train.max_steps"] == 4
    assert {m.name for m in aim_run.metrics() if not m.name.startswith("__system__")} == SCALARS
    for key in SCALARS:
        steps, (values,) = aim_run.get_metric(key, Context({})).data.view("val").items_list()
        assert list(zip(steps, values)) == [(r["step"], r[key]) for r in records]
    steps, (images,) = aim_run.get_image_sequence("samples", Context({})).data.view("val").items_list()
    assert steps == [2, 4] and [image.caption for image in images] == ["step 2", "step 4"]
    for step, image in zip(steps, images):
        pixels = np.asarray(image.to_pil_image().convert("RGB"))
        assert image.format == "png" and np.array_equal(
            pixels, png_pixels(run_dir / "samples" / f"step-{step:07d}.png")
        )


def test_a_tracker_that_is_not_installed_is_an_error_before_any_step(tmp_path):
    import importlib.util

    missing = next(name for name in ("aim", "dvclive", "trackio") if importlib.util.find_spec(name) is None)
    with pytest.raises(TrainError, match=f"train.tracker: '{missing}' needs the {missing} package"):
        train_with_tracker(tmp_path, ["tensorboard", missing])
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not list_checkpoints(tmp_path / "run")
