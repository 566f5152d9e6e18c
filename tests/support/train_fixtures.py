"""Small datasets and configs for the train-stage tests, written in the documented shard format.

Shards go through `pipeline.core.shards.ShardWriter` and `pipeline.core.shard_members`' `latent_sample` /
`image_sample` -- the writer the encode and pack stages use -- so the bytes are the same format; only the VAE
encoding is skipped (the latents are drawn here), which keeps a dataset to milliseconds instead of loading a VAE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from pipeline.core.atomic import write_json_atomic
from pipeline.core.manifest import FORMAT_VERSION
from pipeline.core.shard_members import image_sample, latent_sample
from pipeline.core.shards import ShardWriter

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def _split(count: int, num_shards: int) -> list[range]:
    """Contiguous index ranges of `count` samples over `num_shards` shards."""
    bounds = np.linspace(0, count, num_shards + 1).round().astype(int)
    return [range(bounds[i], bounds[i + 1]) for i in range(num_shards)]


def _write_dataset(out_dir: Path, samples: list[dict[str, Any]], num_shards: int, manifest: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, indices in enumerate(_split(len(samples), num_shards)):
        with ShardWriter(out_dir, index) as writer:
            for i in indices:
                writer.write(samples[i])
            sidecar = writer.commit({"failures": 0})
        entries.append({k: sidecar[k] for k in ("name", "count", "sha256", "bytes")})
    (out_dir / "failures.jsonl").write_text("")
    manifest = {
        "format_version": FORMAT_VERSION,
        "counts": {"seen": len(samples), "written": len(samples), "failed": 0},
        "shards": entries,
        "command": ["tests/support/train_fixtures.py"],
        "package_version": "test",
        "created": "2026-01-01T00:00:00Z",
        **manifest,
    }
    write_json_atomic(out_dir / "manifest.json", manifest)
    return out_dir


def write_latent_dataset(
    out_dir: Path,
    num_samples: int = 8,
    num_shards: int = 2,
    latent_size: int = 8,
    channels: int = 4,
    num_classes: int = 10,
    seed: int = 0,
    std: float = 0.05,
    scaling_factor: float = 0.18215,
    nan_at: int | None = None,
    vae_path: str | None = None,
    images: bool = False,
) -> Path:
    """A latent dataset: `num_samples` posteriors (mean ~ N(0, 1/scaling^2), so scaled latents are ~unit),
    labels i % num_classes (or -1 when num_classes is 0). `nan_at` puts a NaN into that sample's mean. `images`:
    each sample also holds a random RGB image of the manifest's resolution as its `png` member (`encode
    --keep-images`; index 1 of its latents is a flip, as for a real crop)."""
    rng = np.random.default_rng(seed)
    image_rng = np.random.default_rng(seed + 1)  # its own stream: the latents do not depend on `images`
    resolution = latent_size * 8
    samples = []
    for i in range(num_samples):
        base = rng.standard_normal((channels, latent_size, latent_size)) / scaling_factor
        mean = np.stack([base, base[:, :, ::-1]])
        if nan_at == i:
            mean = mean.copy()
            mean[0, 0, 0, 0] = np.nan
            mean[1, 0, 0, 0] = np.nan
        sample_std = np.full_like(mean, std / scaling_factor)
        label = i % num_classes if num_classes > 0 else -1
        pixels = image_rng.integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8) if images else None
        samples.append(latent_sample(f"{i:08d}", mean, sample_std, label, {"path": f"image-{i}.png"}, pixels))
    label_map = {f"n{c:08d}": c for c in range(num_classes)}
    manifest = {
        "kind": "latents",
        "resolution": resolution,
        "num_classes": num_classes,
        "label_map": label_map,
        "latent_channels": channels,
        "latent_size": latent_size,
        "vae": {
            "id": vae_path or "test/random-vae",
            "source": "local" if vae_path else "hub",
            "revision": None,
            "path": vae_path,
            "path_hash": "0" * 64,
            "scaling_factor": scaling_factor,
            "latent_channels": channels,
            "downsample_factor": 8,
            "dtype": "fp32",
            "convention": "unscaled",
        },
        "transform": {"crop": "center"},
    }
    if images:  # as `encode --keep-images` lists them (other fixture manifests keep their bytes, and hashes)
        manifest["members"] = ["mean.npy", "std.npy", "cls", "json", "png"]
    return _write_dataset(Path(out_dir), samples, num_shards, manifest)


def write_image_dataset(
    out_dir: Path,
    num_samples: int = 8,
    num_shards: int = 2,
    resolution: int = 16,
    num_classes: int = 0,
    seed: int = 0,
    spread: float = 1.0,
) -> Path:
    """An image dataset of blocky random RGB images (4x4 blocks of colour, so a tiny U-Net can fit them):
    each image is (1 - spread) x a shared pattern + spread x its own pattern."""
    rng = np.random.default_rng(seed)
    shared = rng.uniform(0, 255, size=(4, 4, 3))
    samples = []
    for i in range(num_samples):
        coarse = (1 - spread) * shared + spread * rng.uniform(0, 255, size=(4, 4, 3))
        pixels = np.kron(coarse, np.ones((resolution // 4, resolution // 4, 1))).round().astype(np.uint8)
        label = i % num_classes if num_classes > 0 else -1
        samples.append(image_sample(f"{i:08d}", pixels, label, {"path": f"image-{i}.png"}))
    manifest = {
        "kind": "images",
        "resolution": resolution,
        "num_classes": num_classes,
        "label_map": {f"c{c}": c for c in range(num_classes)},
        "transform": {"crop": "center"},
    }
    return _write_dataset(Path(out_dir), samples, num_shards, manifest)


def tiny_latent_config(**sections: dict[str, Any]) -> dict[str, Any]:
    """A DiffiT-Tiny/2 config: fp32, deterministic data order, no tracker, no sample grids."""
    config = {
        "model": {"name": "DiffiT-Tiny/2"},
        "diffusion": {"type": "adm"},
        "data": {"resampled": False, "num_workers": 0, "label_dropout": 0.1},
        "optim": {"name": "adamw", "lr": 1e-3},
        "ema": {"decay": 0.99},
        "train": {
            "global_batch_size": 4,
            "max_steps": 6,
            "mixed_precision": "no",
            "log_every": 1,
            "tracker": "none",
            "seed": 0,
        },
        "checkpoint": {"every": 3, "keep": 2},
        "sample": {"every": 0},
    }
    return _merge(config, sections)


def tiny_image_config(**sections: dict[str, Any]) -> dict[str, Any]:
    """A DiffiT-UNet-Tiny EDM config on 16 px images."""
    config = {
        "model": {"name": "DiffiT-UNet-Tiny"},
        "diffusion": {"type": "edm", "learn_sigma": False},
        "data": {"resampled": False, "num_workers": 0},
        "optim": {"name": "adam", "lr": 2e-3},
        "ema": {"decay": 0.99},
        "train": {"global_batch_size": 4, "max_steps": 6, "mixed_precision": "no", "log_every": 1, "tracker": "none"},
        "checkpoint": {"every": 100, "keep": 1},
        "sample": {"every": 0, "sampler": "edm-heun"},
    }
    return _merge(config, sections)


def _merge(base: dict, updates: dict) -> dict:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in updates.items():
        merged.setdefault(section, {}).update(values)
    return merged


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """Write a config mapping as YAML."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of RUN/metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def subprocess_env(threads: int = 1) -> dict[str, str]:
    """Environment for trainer subprocesses: offline, few threads, the repo importable."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        TOKENIZERS_PARALLELISM="false",
    )
    # A child must not inherit a parent's process-group variables.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def train_command(config: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    """`python -m cli.main train ...` for a subprocess."""
    return [
        PYTHON,
        "-m",
        "cli.main",
        "train",
        "--config",
        str(config),
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
        *extra,
    ]


def run_train_subprocess(args: list[str], timeout: float = 180, threads: int = 1) -> subprocess.CompletedProcess:
    """Run a trainer command to completion, capturing its output."""
    return subprocess.run(args, cwd=REPO, env=subprocess_env(threads), capture_output=True, text=True, timeout=timeout)


# Processes and weights of the train-stage subprocess tests (preemption, faults, resume)


def kill_tree(root) -> None:
    """SIGKILL a process left running by a failed test and all its descendants (ranks, DataLoader workers)."""
    import psutil

    if root is None:
        return
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue  # it ended between the listing and the kill: nothing left to stop


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_weights(ours: Path, theirs: Path) -> None:
    import torch

    for name in ("ema.safetensors", "model.safetensors"):
        a, b = read_safetensors(ours / name), read_safetensors(theirs / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def latent_stream_spec(data: Path, **overrides):
    """The trainer's `StreamSpec` over every non-empty shard of the latent dataset `data` in order (not resampled,
    batches of 8, flips on; scaling factor and classes from its manifest), with `overrides`."""
    from pipeline.core.manifest import load_manifest, shard_urls
    from pipeline.train.data import StreamSpec

    manifest = load_manifest(data)
    base = dict(
        urls=tuple(shard_urls(data, manifest)),
        kind="latents",
        batch_size=8,
        resampled=False,
        hflip=True,
        scaling_factor=manifest["vae"]["scaling_factor"],
        num_classes=manifest["num_classes"],
        resolution=manifest["resolution"],
        sha256=tuple(entry["sha256"] for entry in manifest["shards"] if entry["count"] > 0),
    )
    return StreamSpec(**{**base, **overrides})


__all__ = [
    "assert_same_weights",
    "kill_tree",
    "latent_stream_spec",
    "read_safetensors",
    "read_metrics",
    "run_train_subprocess",
    "subprocess_env",
    "tiny_image_config",
    "tiny_latent_config",
    "train_command",
    "write_config",
    "write_image_dataset",
    "write_latent_dataset",
]
