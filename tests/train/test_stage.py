"""The train stage end to end on tiny models: data streams, overfitting, NaN stop, errors before any step,
export round trip, a real 2-process gloo run, and resume after a SIGKILL with bit-identical continuation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.core.manifest import shard_urls
from pipeline.train import NonFiniteLossError, TrainError, TrainOptions, run_train
from pipeline.train.checkpoint import list_checkpoints, read_train_state
from pipeline.train.config import ConfigError
from pipeline.train.data import StreamSpec, check_shard_split, make_loader
from pipeline.train.shard_reading import DataFormatError
from tests.support.encode_fixtures import make_image_tree, save_tiny_vae
from tests.support.train_fixtures import (
    REPO,
    read_metrics,
    read_safetensors,
    run_train_subprocess,
    subprocess_env,
    tiny_image_config,
    tiny_latent_config,
    train_command,
    write_config,
    write_image_dataset,
    write_latent_dataset,
)

SCALE = 0.18215


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_in_process(tmp_path: Path, config: dict, data: Path, name: str = "run", **kwargs) -> tuple[dict, Path]:
    run_dir = tmp_path / name
    summary = run_train(
        TrainOptions(
            run_dir=run_dir, config_path=write_config(tmp_path / f"{name}.yaml", config), data_dir=data, **kwargs
        )
    )
    return summary, run_dir


def take(loader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            return batches
    raise AssertionError("stream ended early")


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def latent_spec(data: Path, **overrides) -> StreamSpec:
    from pipeline.core.manifest import load_manifest

    urls = tuple(shard_urls(data, load_manifest(data)))
    base = dict(
        urls=urls,
        kind="latents",
        batch_size=2,
        resampled=False,
        hflip=False,
        scaling_factor=SCALE,
        conditional=True,
        num_classes=16,
    )
    return StreamSpec(**{**base, **overrides})


def test_latents_are_scaled_posterior_draws_of_either_view(tmp_path):
    data = write_latent_dataset(tmp_path / "data", num_samples=4, num_shards=1, num_classes=16, std=0.0)
    from pipeline.core.shard_members import decode_sample
    from pipeline.core.shards import iter_samples

    stored = {s["cls"]: s for s in map(decode_sample, iter_samples(data / "shard-000000.tar"))}
    x, labels = take(make_loader(latent_spec(data, batch_size=4), 0), 1)[0]
    for latent, label in zip(x, labels.tolist()):
        mean = torch.from_numpy(stored[label]["mean.npy"].astype(np.float32))
        assert torch.allclose(latent, SCALE * mean[0], atol=1e-6)  # std 0, no flip: exactly scaling x mean
    # With hflip the flipped view (index 1) is chosen for some samples; std > 0 adds noise of that size.
    noisy = write_latent_dataset(tmp_path / "noisy", num_samples=16, num_shards=1, num_classes=16, std=0.05)
    x, labels = take(make_loader(latent_spec(noisy, batch_size=16, hflip=True), 0), 1)[0]
    views = []
    for latent, label in zip(x, labels.tolist()):
        sample = next(s for s in map(decode_sample, iter_samples(noisy / "shard-000000.tar")) if s["cls"] == label)
        errors = [
            float((latent - SCALE * torch.from_numpy(sample["mean.npy"][v].astype(np.float32))).std()) for v in (0, 1)
        ]
        views.append(int(np.argmin(errors)))
        assert min(errors) == pytest.approx(0.05, rel=0.3)  # scaled std: 0.05 (unit-free in the fixture)
    assert 0 < sum(views) < len(views)


def test_processes_read_disjoint_shards_and_labels(tmp_path):
    data = write_latent_dataset(tmp_path / "data", num_samples=16, num_shards=4, num_classes=16)
    seen = []
    for rank in (0, 1):
        spec = latent_spec(data, rank=rank, world_size=2, batch_size=4)
        labels = torch.cat([b[1] for b in take(make_loader(spec, 0), 2)])  # one epoch of this rank
        seen.append(set(labels.tolist()))
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(16))


def test_deterministic_stream_skips_exactly_the_consumed_batches(tmp_path):
    data = write_latent_dataset(tmp_path / "data", num_samples=12, num_shards=4, num_classes=16, std=0.1)
    spec = latent_spec(data, hflip=True, batch_size=2)
    full = take(make_loader(spec, num_workers=2), 9)  # crosses an epoch boundary on each worker
    for skip in (1, 4):
        resumed = take(make_loader(replace(spec, skip_batches=skip), num_workers=2), 9 - skip)
        for (x0, y0), (x1, y1) in zip(full[skip:], resumed):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    # A second epoch draws new posterior noise for the same sample.
    x_epoch0 = full[0][0]
    later = [x for x, y in full[6:] if torch.equal(y, full[0][1])]
    assert later and not torch.equal(later[0], x_epoch0)


def test_resampled_stream_is_seeded_by_step(tmp_path):
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=2, num_classes=16)
    spec = latent_spec(data, resampled=True, shuffle_buffer=4, hflip=True)
    first = take(make_loader(spec, 0), 3)
    again = take(make_loader(spec, 0), 3)
    other = take(make_loader(replace(spec, start_step=100), 0), 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))


def test_sample_draws_do_not_depend_on_the_dataset_directory(tmp_path):
    from pipeline.core.manifest import load_manifest

    batches = []
    for where in ("a", "b/deeper"):
        data = write_image_dataset(tmp_path / where, num_samples=16, num_shards=2, resolution=16, num_classes=0)
        spec = StreamSpec(
            urls=tuple(shard_urls(data, load_manifest(data))),
            kind="images",
            batch_size=16,
            resampled=False,
            hflip=True,
            resolution=16,
            conditional=False,
        )
        batches.append(take(make_loader(spec, 0), 1)[0][0])
    assert torch.equal(batches[0], batches[1])


def test_images_are_decoded_to_unit_range_and_flipped(tmp_path):
    # The flips are a function of (seed, epoch, shard name, key) only, so this draw is the same on every machine.
    data = write_image_dataset(tmp_path / "data", num_samples=32, num_shards=1, resolution=16, num_classes=0)
    from pipeline.core.manifest import load_manifest

    spec = StreamSpec(
        urls=tuple(shard_urls(data, load_manifest(data))),
        kind="images",
        batch_size=32,
        resampled=False,
        hflip=True,
        resolution=16,
        conditional=False,
    )
    x, labels = take(make_loader(spec, 0), 1)[0]
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert labels.tolist() == [-1] * 32
    plain, _ = take(make_loader(replace(spec, hflip=False), 0), 1)[0]
    flipped = [not torch.equal(a, b) and torch.equal(a, b.flip(-1)) for a, b in zip(x, plain)]
    assert 0 < sum(flipped) < 32
    with pytest.raises(DataFormatError, match="image is 16x16, the manifest says 32x32"):
        take(make_loader(replace(spec, resolution=32), 0), 1)


def test_shard_split_needs_a_shard_per_process():
    with pytest.raises(DataFormatError, match="2 shard\\(s\\) for 4 processes"):
        check_shard_split(2, 4, 2)
    assert check_shard_split(4, 2, 4) == 2  # fewer shards per process than workers: fewer workers
    assert check_shard_split(8, 2, 0) == 0


# ---------------------------------------------------------------------------------------------------------------
# Training in this process
# ---------------------------------------------------------------------------------------------------------------


def window_mean(losses: list[float], start: int, length: int) -> float:
    return float(np.mean(losses[start : start + length]))


def test_latent_model_overfits_a_handful_of_latents(tmp_path):
    # DiffiT-Tiny/2, ADM hybrid loss with learned Sigma, 4 latents: the loss (about 1 at the zero-initialised
    # start) falls by more than 2x within 150 steps (measured: ~3x).
    data = write_latent_dataset(tmp_path / "data", num_samples=4, num_shards=1, num_classes=4)
    config = tiny_latent_config(
        train={"max_steps": 150, "global_batch_size": 8}, optim={"lr": 3e-3}, checkpoint={"every": 1000}
    )
    summary, run_dir = train_in_process(tmp_path, config, data)
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert summary["step"] == 150 and len(losses) == 150
    assert window_mean(losses, 0, 20) > 2.0 * window_mean(losses, 130, 20)


def test_image_model_overfits_a_handful_of_images(tmp_path):
    # DiffiT-UNet-Tiny (built for 8 px through model.input_size), EDM loss, 4 near-identical images. EDM's
    # low-sigma terms ask for the noise itself and fall slowly, so the stated factor is 1.3 within 200 steps
    # (measured: ~1.5).
    data = write_image_dataset(tmp_path / "data", num_samples=4, num_shards=1, resolution=8, spread=0.05)
    config = tiny_image_config(
        model={"input_size": 8}, train={"max_steps": 200, "global_batch_size": 8}, optim={"lr": 5e-3}
    )
    _, run_dir = train_in_process(tmp_path, config, data)
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert window_mean(losses, 0, 20) > 1.3 * window_mean(losses, 180, 20)


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    # Sample 6 holds a NaN: with batches of 2 in fixed order, step 4 is the first to see it.
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=1, num_classes=10, nan_at=6)
    config = tiny_latent_config(train={"max_steps": 10, "global_batch_size": 2}, checkpoint={"every": 2, "keep": 5})
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss at step 4: loss nan"):
        train_in_process(tmp_path, config, data)
    checkpoints = list_checkpoints(tmp_path / "run")
    assert [step for step, _ in checkpoints] == [2]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    assert read_train_state(checkpoints[0][1])["step"] == 2


def test_errors_come_before_any_training_step(tmp_path):
    latents = write_latent_dataset(tmp_path / "latents", num_samples=4, num_shards=1, num_classes=10)
    big = write_latent_dataset(tmp_path / "big", num_samples=4, num_shards=1, latent_size=16)
    unlabelled = write_latent_dataset(tmp_path / "unlabelled", num_samples=4, num_shards=1, num_classes=0)
    images = write_image_dataset(tmp_path / "images", num_samples=4, num_shards=1)
    wide = write_latent_dataset(tmp_path / "wide", num_samples=4, num_shards=1, channels=8)
    cases = [
        (tiny_latent_config(), wide, TrainError, "latents have 8 channels but DiffiT-Tiny/2 takes 4"),
        (tiny_image_config(model={"input_size": 8}), images, TrainError, "images are 16 px but.*built for 8 px"),
        (tiny_latent_config(), tmp_path / "missing", TrainError, "no such directory"),
        (tiny_latent_config(), tmp_path, TrainError, "no dataset manifest"),
        (tiny_latent_config(), images, TrainError, "kind 'images'.*trains on 'latents'"),
        (tiny_latent_config(), big, TrainError, "latents are 16x16.*built for 8x8.*model.input_size"),
        (tiny_latent_config(model={"num_classes": 10}), unlabelled, TrainError, "the dataset is unlabelled"),
        (tiny_latent_config(model={"num_classes": 5}), latents, TrainError, "has 10 classes but model.num_classes"),
        (tiny_image_config(), images.parent / "latents", TrainError, "kind 'latents'"),
        (
            tiny_latent_config(train={"global_batch_size": 6, "per_device_batch_size": 4}),
            latents,
            ConfigError,
            "not divisible",
        ),
        (tiny_latent_config(optim={"lr": "fast"}), latents, ConfigError, "optim.lr: expected a number"),
        (tiny_latent_config(optim={"momentum": 0.9}), latents, ConfigError, "unknown key 'momentum'"),
        (
            tiny_latent_config(model={"kwargs": {"heads": 3}}),
            latents,
            ConfigError,
            "DiffiT-Tiny/2 cannot be built with.*unexpected keyword argument 'heads'",
        ),
    ]
    for index, (config, data, error, message) in enumerate(cases):
        run_dir = tmp_path / f"run{index}"
        with pytest.raises(error, match=message):
            train_in_process(tmp_path, config, data, name=f"run{index}")
        assert not (run_dir / "metrics.jsonl").exists() and not list_checkpoints(run_dir)


def test_existing_checkpoints_need_resume_and_resume_checks_the_config(tmp_path):
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=1)
    config = tiny_latent_config(train={"max_steps": 3}, checkpoint={"every": 3})
    train_in_process(tmp_path, config, data)
    with pytest.raises(TrainError, match="already holds checkpoints: pass --resume auto"):
        train_in_process(tmp_path, config, data)
    changed = tiny_latent_config(train={"max_steps": 3}, checkpoint={"every": 3}, optim={"lr": 0.5})
    with pytest.raises(TrainError, match="optim.lr: 0.001 -> 0.5"):
        train_in_process(tmp_path, changed, data, resume="auto")
    # Continuing with more steps (train.* may change) works and starts at the checkpoint's step.
    summary, run_dir = train_in_process(
        tmp_path, tiny_latent_config(train={"max_steps": 5}, checkpoint={"every": 3}), data, resume="auto"
    )
    assert summary["step"] == 5
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    other = write_latent_dataset(tmp_path / "other", num_samples=8, num_shards=1, seed=1)
    with pytest.raises(TrainError, match="differs from the one this run was trained on"):
        train_in_process(
            tmp_path, tiny_latent_config(train={"max_steps": 9}, checkpoint={"every": 3}), other, resume="auto"
        )


def test_export_round_trip_and_sample_grid_through_the_vae(tmp_path):
    from PIL import Image

    import diffit
    from pipeline.train.checkpoint import EMA_WEIGHTS, load_ema
    from pipeline.train.export import export_checkpoint

    vae = save_tiny_vae(tmp_path / "vae")
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=2, vae_path=str(vae))
    config = tiny_latent_config(
        train={"max_steps": 4}, checkpoint={"every": 2}, sample={"every": 4, "count": 4, "steps": 2}
    )
    _, run_dir = train_in_process(tmp_path, config, data)
    grid = Image.open(run_dir / "samples" / "step-0000004.png")
    assert grid.size == (2 * 64, 2 * 64)  # 4 samples, decoded 8x8 latents -> 64 px images

    out = export_checkpoint(run_dir, tmp_path / "exported")
    model, exported = diffit.load_pretrained(out)
    assert exported["diffusion"] == {
        "type": "adm",
        "noise_schedule": "linear",
        "diffusion_steps": 1000,
        "learn_sigma": True,
    }
    assert exported["vae"]["path"] == str(vae) and exported["vae"]["scaling_factor"] == SCALE
    assert (
        exported["dataset"]["manifest_hash"]
        == json.loads((run_dir / "run.json").read_text())["dataset"]["manifest_hash"]
    )
    assert exported["dataset"]["num_classes"] == 10 and exported["train"]["step"] == 4
    # The dataset's class names travel with the model: DiffiTPipeline's id2label / get_label_ids read them.
    label_map = json.loads((data / "manifest.json").read_text())["label_map"]
    assert exported["dataset"]["label_map"] == label_map and sorted(label_map.values()) == list(range(10))
    from diffit.labels import export_id2label

    assert export_id2label(exported, 10, "config.json") == {index: name for name, index in label_map.items()}
    # The exported model is the EMA of the latest checkpoint: identical outputs.
    reference = diffit.create_model(exported["model"]["name"], **exported["model"]["kwargs"])
    load_ema(reference, run_dir / "checkpoints" / "step-0000004" / EMA_WEIGHTS)
    reference.eval()
    x, t, labels = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.0, 999.0]), torch.tensor([0, 3, 10])
    with torch.no_grad():
        assert torch.equal(model(x, t, labels), reference(x, t, labels))
    # The EMA moved away from the initial weights (it was updated every step).
    initial = diffit.create_model(exported["model"]["name"], **exported["model"]["kwargs"])
    assert not torch.equal(initial.final_layer.linear.weight, model.final_layer.linear.weight)


def test_trains_on_the_output_of_encode_and_pack(tmp_path):
    # The real encode / pack stages (Dask in this process, the tiny random SD-layout VAE) feed the trainer.
    from pipeline.encode.job import EncodeOptions, run_encode

    source, vae = tmp_path / "images", save_tiny_vae(tmp_path / "vae")
    make_image_tree(source, per_class=4)
    common = dict(source=str(source), shard_size=6, batch_size=6, workers=0, max_pixels=40_000, progress=False)
    run_encode(EncodeOptions(out=str(tmp_path / "latents"), kind="latents", resolution=64, vae=str(vae), **common))
    run_encode(EncodeOptions(out=str(tmp_path / "packed"), kind="images", resolution=16, **common))

    latent_config = tiny_latent_config(
        data={"resampled": True, "shuffle_buffer": 8},
        train={"max_steps": 3, "global_batch_size": 4},
        sample={"every": 3, "count": 4, "steps": 2},
    )
    summary, run_dir = train_in_process(tmp_path, latent_config, tmp_path / "latents", name="latent-run")
    assert summary["step"] == 3 and np.isfinite(summary["loss"])
    info = json.loads((run_dir / "run.json").read_text())["dataset"]
    assert (info["num_classes"], info["latent_size"], info["kind"]) == (3, 8, "latents")  # classes from the data
    from PIL import Image

    assert Image.open(run_dir / "samples" / "step-0000003.png").size == (128, 128)  # decoded by the dataset's VAE

    image_config = tiny_image_config(train={"max_steps": 2, "global_batch_size": 4})
    summary, _ = train_in_process(tmp_path, image_config, tmp_path / "packed", name="image-run")
    assert summary["step"] == 2 and np.isfinite(summary["loss"])
    # The packed data is labelled; model.num_classes 0 trains an unconditional model on it.
    unconditional = tiny_image_config(model={"num_classes": 0}, train={"max_steps": 1, "global_batch_size": 4})
    summary, run_dir = train_in_process(tmp_path, unconditional, tmp_path / "packed", name="uncond-run")
    assert json.loads((run_dir / "run.json").read_text())["dataset"]["num_classes"] == 0


def test_cli_train_export_and_errors(tmp_path):
    # The real app: errors become `error: ...` and their exit code in `cli.main`, not in the command.
    from cli.main import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["train", "--help"]).output
    assert "accelerate launch --multi_gpu --num_processes" in help_text and "--resume" in help_text
    data = write_image_dataset(tmp_path / "data", num_samples=8, num_shards=1, resolution=16)
    config = write_config(tmp_path / "c.yaml", tiny_image_config(train={"max_steps": 2}))
    result = runner.invoke(
        app, ["train", "--config", str(config), "--data", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "run")]
    )
    assert result.exit_code == 2 and "no such directory" in result.output
    result = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(config),
            "--data",
            str(data),
            "--run-dir",
            str(tmp_path / "run"),
            "--set",
            "train.max_steps=two",
        ],
    )
    assert result.exit_code == 2 and "train.max_steps: expected an integer" in result.output
    result = runner.invoke(
        app, ["train", "--config", str(config), "--data", str(data), "--run-dir", str(tmp_path / "run")]
    )
    assert result.exit_code == 0, result.output
    assert "trained to step 2" in result.output
    result = runner.invoke(app, ["export", str(tmp_path / "run"), str(tmp_path / "model")])
    assert result.exit_code == 0, result.output
    config_json = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config_json["diffusion"]["type"] == "edm" and config_json["diffusion"]["sigma_data"] == 0.5
    assert "vae" not in config_json and config_json["dataset"]["kind"] == "images"
    result = runner.invoke(app, ["export", str(tmp_path / "nothing"), str(tmp_path / "model2")])
    assert result.exit_code == 2 and "no such run or checkpoint directory" in result.output


# ---------------------------------------------------------------------------------------------------------------
# Real processes
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_gloo_run_launched_with_accelerate(tmp_path):
    """Two processes train by flow matching (the ADM objective's two-process runs: tests/train/test_preemption.py,
    test_faults.py): disjoint shards, checkpoints written once with both ranks' RNG states, the export."""
    import diffit

    data = write_latent_dataset(tmp_path / "data", num_samples=16, num_shards=4, num_classes=10)
    config = write_config(
        tmp_path / "c.yaml",
        tiny_latent_config(
            diffusion={"type": "flow", "learn_sigma": False, "time_sampling": "logit-normal"},
            data={"num_workers": 1},
            train={"max_steps": 4, "global_batch_size": 8, "per_device_batch_size": 2, "tracker": "tensorboard"},
            checkpoint={"every": 2, "keep": 5},
            sample={"every": 4, "count": 4, "steps": 2, "sampler": "heun"},
        ),
    )
    run_dir = tmp_path / "run"
    # Exactly the documented CPU launch line (`--cpu` would silently run one process).
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "cli.main",
        "train",
        "--config",
        str(config),
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
    ]
    result = run_train_subprocess(command, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    info = json.loads((run_dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["accumulation_steps"] == 2
    shards = [json.loads((run_dir / f"shards-rank{r}.json").read_text())["shards"] for r in (0, 1)]
    assert set(shards[0]).isdisjoint(shards[1]) and len(set(shards[0]) | set(shards[1])) == 4
    # Checkpoints written once each (by rank 0), with both ranks' RNG states, nothing left half-written.
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002", "step-0000004"]
    for step in ("step-0000002", "step-0000004"):
        assert {"random_states_0.pkl", "random_states_1.pkl", "ema.safetensors", "model.safetensors"} <= {
            p.name for p in (root / step).iterdir()
        }
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert list((run_dir / "logs").rglob("events.out.tfevents.*"))
    assert (run_dir / "samples" / "step-0000004.png").is_file()
    assert "sample grids show latent channels" in result.stderr  # no local VAE in this dataset: said once

    from pipeline.train.export import export_checkpoint

    model, exported = diffit.load_pretrained(export_checkpoint(run_dir, tmp_path / "exported"))
    assert exported["train"]["step"] == 4 and model.num_classes == 10 and exported["diffusion"]["type"] == "flow"


@pytest.mark.slow
def test_resume_after_sigkill_continues_exactly(tmp_path):
    # Fixed-order data over 4 shards read by 2 DataLoader workers; checkpoints every 3 steps. Gradient
    # accumulation 2 (micro-batches of 1): the resumed stream must skip step x accumulation batches, not step.
    data = write_latent_dataset(tmp_path / "data", num_samples=12, num_shards=4, num_classes=10, std=0.1)
    settings = dict(
        data={"num_workers": 2},
        train={"max_steps": 10, "global_batch_size": 2, "per_device_batch_size": 1},
        checkpoint={"every": 3, "keep": 10},
        optim={"lr": 1e-3},
    )
    config = write_config(tmp_path / "c.yaml", tiny_latent_config(**settings))

    reference_dir = tmp_path / "reference"
    result = run_train_subprocess(train_command(config, data, reference_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((reference_dir / "run.json").read_text())["accumulation_steps"] == 2

    # The interrupted run is told to go on for a long time and killed once its first checkpoint is complete.
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        train_command(config, data, run_dir, "--set", "train.max_steps=100000"),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    if _group_alive(process.pid):  # its DataLoader workers, if they have not noticed yet
        os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    resumed_from = read_train_state(list_checkpoints(run_dir)[-1][1])["step"]
    assert resumed_from % 3 == 0 and 3 <= resumed_from < 10, resumed_from

    result = run_train_subprocess(train_command(config, data, run_dir, "--resume", "auto"))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = run_dir / "checkpoints" / f"step-{resumed_from:07d}"
    assert f"resumed from {checkpoint} at step {resumed_from}" in result.stderr

    reference, resumed = read_metrics(reference_dir), read_metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, 11))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]  # bit-identical, before and after
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in reference]
    final, expected = run_dir / "checkpoints" / "step-0000010", reference_dir / "checkpoints" / "step-0000010"
    for name in ("ema.safetensors", "model.safetensors"):
        ours, theirs = read_safetensors(final / name), read_safetensors(expected / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ours = torch.load(final / "optimizer.bin", weights_only=True)
    theirs = torch.load(expected / "optimizer.bin", weights_only=True)
    assert ours["state"].keys() == theirs["state"].keys()
    for key in ours["state"]:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ours["state"][key][field], theirs["state"][key][field])
    assert read_train_state(final)["images_seen"] == 20


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
