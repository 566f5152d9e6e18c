"""Builders for the evaluate-stage tests: random Inception weights, tiny VAE and models, reference sets.

Also a small command-line entry used by tests that need real separate processes:

    python tests/support/eval_fixtures.py cli evaluate --model ...    # the evaluate/sample commands, as typer runs them
    python tests/support/eval_fixtures.py slow-sample STORE_ARGS_JSON  # sampling with a delay per network call
    python tests/support/eval_fixtures.py slow-reference SPEC_JSON     # `reference` with a delay per Inception batch
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------------
# Inception weights (plumbing only)


def make_random_inception_weights(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's Inception-v3 architecture with random weights, saved as a state dict (~95 MB).

    torch-fidelity loads its weights inside the constructor, so loading is patched out for construction.
    The default init makes features collapse (FID 0, IS 1); Kaiming-normal convs (fan_in, relu) keep them
    informative enough for plumbing tests. These weights are NOT the official ones.
    """
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with (
        mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None),
        mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: {}),
    ):
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu", generator=generator)
    torch.save(network.state_dict(), path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Models


def make_tiny_vae(path: Path, latent_channels: int = 4, seed: int = 0) -> Path:
    """A random diffusers AutoencoderKL with a /2 downsampling factor (two blocks), saved to `path`."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
    )
    vae.save_pretrained(str(path))
    return path


def _randomise_head(model, seed: int) -> None:
    """Give the zero-initialised output layer random weights so the untrained network predicts something."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith(("final_layer", "head")):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def make_latent_model_dir(
    path: Path,
    vae_path: Path | str | None,
    num_classes: int = 10,
    seed: int = 0,
    vae_entry: dict[str, Any] | None = None,
    **overrides,
) -> Path:
    """`DiffiT-Tiny/2` (8x8x4 latents -> 16x16 images with the tiny VAE), exported with an ADM diffusion entry."""
    import torch

    import diffit

    torch.manual_seed(seed)
    model = diffit.create_model("DiffiT-Tiny/2", num_classes=num_classes, **overrides)
    _randomise_head(model, seed)
    if vae_entry is None:
        from pipeline.core.vae import resolve_vae

        vae_entry = resolve_vae(str(vae_path)).manifest_entry("fp32")  # what `encode` writes into the manifest
    vae = vae_entry
    extra = {
        "diffusion": {"type": "adm", "noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True},
        "vae": vae,
    }
    diffit.save_pretrained(model, path, extra)
    return path


def make_image_model_dir(path: Path, seed: int = 0) -> Path:
    """`DiffiT-UNet-Tiny` (16x16 RGB, unconditional), exported with an EDM diffusion entry."""
    import torch

    import diffit

    torch.manual_seed(seed)
    model = diffit.create_model("DiffiT-UNet-Tiny")
    _randomise_head(model, seed)
    diffit.save_pretrained(model, path, {"diffusion": {"type": "edm", "sigma_data": 0.5}})
    return path


# ----------------------------------------------------------------------------------------------------------------
# Reference sets


def smooth_images(count: int, size: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 [count, size, size, 3] images of random colour gradients (structured, unlike white noise)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size)
    images = np.empty((count, size, size, 3), dtype=np.float64)
    for i in range(count):
        start, slope_y, slope_x = rng.uniform(0, 255, 3), rng.uniform(-120, 120, 3), rng.uniform(-120, 120, 3)
        images[i] = start + slope_y * ramp[:, None, None] + slope_x * ramp[None, :, None]
    return np.clip(images, 0, 255).astype(np.uint8)


def write_npz_reference(path: Path, images: np.ndarray) -> Path:
    """An ADM-style reference batch: `arr_0` uint8 [N, H, W, 3]."""
    np.savez(path, arr_0=images)
    return path


def write_folder_reference(path: Path, images: np.ndarray) -> Path:
    """One PNG per image in `path` (two sub-folders, to exercise the recursive listing)."""
    from PIL import Image

    for index, image in enumerate(images):
        folder = path / f"part{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:05d}.png")
    return path


def write_shard_reference(path: Path, images: np.ndarray, per_shard: int = 8) -> Path:
    """Raw image shards in the `pack` format (tar + sidecar per shard, manifest.json last)."""
    from pipeline.core import shards as shards
    from pipeline.core.manifest import FORMAT_VERSION, MANIFEST_NAME
    from pipeline.core.shard_members import image_sample

    path.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, start in enumerate(range(0, len(images), per_shard)):
        with shards.ShardWriter(path, index) as writer:
            for offset, image in enumerate(images[start : start + per_shard]):
                writer.write(image_sample(f"{start + offset:08d}", image, 0, {"source": "synthetic"}))
            sidecar = writer.commit({"failures": 0})
        entries.append({key: sidecar[key] for key in ("name", "count", "sha256", "bytes")})
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "images",
        "resolution": int(images.shape[1]),
        "num_classes": 1,
        "label_map": {"synthetic": 0},
        "counts": {"seen": len(images), "written": len(images), "failed": 0},
        "shards": entries,
    }
    shards.write_json_to(path, MANIFEST_NAME, manifest)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Slow workers killed mid-job (the resume tests of evaluate and reference)


def kill_slow_worker(command: str, spec: Path, ready: Callable[[], bool], timeout: float = 120) -> str | None:
    """Start `python tests/support/eval_fixtures.py COMMAND SPEC` (`slow-sample` or `slow-reference`, below) in its
    own process and SIGKILL it as soon as `ready()` holds (or `timeout` s have passed). Returns None when it was
    killed while still running, else its output: it ended before it could be killed."""
    worker = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), command, str(spec)],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and worker.poll() is None:
            if ready():
                break
            time.sleep(0.05)
        if worker.poll() is not None:
            return worker.communicate()[0]
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
    finally:
        if worker.poll() is None:
            worker.kill()
    return None


# ----------------------------------------------------------------------------------------------------------------
# Entry points for subprocess tests


def _run_cli(arguments: list[str]) -> None:
    """Run the evaluate-stage commands exactly as `diffit-pipe` does (its typer app)."""
    from cli.main import app

    app(arguments, prog_name="diffit-pipe")


def _slow_sample(spec_path: str) -> None:
    """Sample into a store like `evaluate` does, sleeping after each network call (so a test can kill it)."""
    import time

    import torch

    from pipeline.evaluate import generation, sample_store, sampling_settings
    from pipeline.evaluate import model_loading as loading
    from pipeline.evaluate.sample_store import STORE_NAME, SampleStore

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    loaded = loading.load_model(Path(spec["model"]))
    forward = loaded.model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(spec["delay_s"])
        return forward(*args, **kwargs)

    loaded.model.forward = slow_forward
    sampling, _ = sampling_settings.resolve_sampling(loaded, spec["sampling"])
    record = sampling_settings.sampling_record(sampling, None, 0)
    settings = sampling_settings.store_settings(loaded, record, spec["num_samples"])
    layout = sample_store.StoreLayout(spec["num_samples"], *loaded.resolution, spec["batch_size"])
    store = SampleStore.open_or_create(Path(spec["out"]) / STORE_NAME, layout, settings)
    print("started", flush=True)
    generation.sample_into_store(store, loaded, sampling, 0, None, 0, 1, spec["batch_size"], "cpu")


def _slow_reference(spec_path: str) -> None:
    """Build a reference batch like `diffit-pipe reference` does, sleeping before each Inception batch."""
    import time

    import torch

    import pipeline.evaluate.features as features
    from pipeline.evaluate.reference.batch import ReferenceOptions, build_reference

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    run_extractor = features.run_extractor

    def slow_run_extractor(extractor, images):
        time.sleep(spec["delay_s"])
        return run_extractor(extractor, images)

    features.run_extractor = slow_run_extractor
    options = ReferenceOptions(
        Path(spec["source"]),
        Path(spec["out"]),
        Path(spec["weights"]),
        subset_size=spec["subset"],
        chunk_size=spec["chunk_size"],
        batch_size=spec["batch_size"],
        workers=0,
        device="cpu",
        progress=False,
    )
    print("started", flush=True)
    build_reference(options)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "cli":
        _run_cli(rest)
    elif command == "slow-sample":
        _slow_sample(rest[0])
    elif command == "slow-reference":
        _slow_reference(rest[0])
    else:
        raise SystemExit(f"unknown command {command!r}; expected cli, slow-sample or slow-reference")
