"""`data.latent_norm` end to end: a 16-channel AutoencoderKL with a shift factor (SD3 / FLUX-like, tiny and random)
encodes, a model trains a couple of steps on its latents, is exported, and every decoder (the evaluate stage's and
`DiffiTPipeline.decode`) inverts exactly the norm it trained with; `channel` standardises with the manifest's
statistics; an export written before `latent_norm` existed decodes as before."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffit.latent_norm import LatentNorm
from pipeline.core.manifest import load_manifest, shard_urls
from pipeline.encode.job import EncodeOptions, run_encode
from pipeline.train import TrainError, TrainOptions, run_train
from pipeline.train.data import StreamSpec, make_loader
from pipeline.train.export import export_checkpoint
from tests.support.encode_fixtures import TEST_MAX_PIXELS, TINY_VAE_CONFIG, make_image_tree
from tests.support.eval_fixtures import make_latent_model_dir
from tests.support.train_fixtures import tiny_latent_config, write_config, write_latent_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALE, SHIFT, CHANNELS = 0.3611, 0.1159, 16  # FLUX's VAE constants, 16 latent channels


@pytest.fixture(scope="module")
def flux_like(tmp_path_factory):
    """A tiny random 16-channel AutoencoderKL with a shift factor, and a 3-class tree encoded with it (4x4 latents)."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("flux-like")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        **{**TINY_VAE_CONFIG, "latent_channels": CHANNELS, "scaling_factor": SCALE, "shift_factor": SHIFT}
    )
    vae.save_pretrained(root / "vae", safe_serialization=True)
    make_image_tree(root / "src", per_class=2)
    job = EncodeOptions(
        source=str(root / "src"),
        out=str(root / "latents"),
        resolution=32,
        vae=str(root / "vae"),
        shard_size=4,
        batch_size=4,
        workers=0,
        max_pixels=TEST_MAX_PIXELS,
        progress=False,
    )
    assert run_encode(job).ok
    return SimpleNamespace(root=root, vae=root / "vae", data=root / "latents", manifest=load_manifest(root / "latents"))


def _config(norm: str) -> dict:
    return tiny_latent_config(
        model={"name": "DiffiT-Tiny/2", "input_size": 4, "kwargs": {"in_channels": CHANNELS}},
        data={"latent_norm": norm},
        train={"max_steps": 2},
        checkpoint={"every": 2},
    )


def _train_and_export(tmp_path: Path, data: Path, norm: str) -> Path:
    run_dir = tmp_path / f"run-{norm}"
    run_train(
        TrainOptions(run_dir=run_dir, config_path=write_config(tmp_path / f"{norm}.yaml", _config(norm)), data_dir=data)
    )
    return export_checkpoint(run_dir, tmp_path / f"export-{norm}")


def _decoders(model_dir: Path, x: torch.Tensor):
    """(evaluate stage's decode, DiffiTPipeline.decode, their VAEs) of the same samples `x`."""
    from diffit import DiffiTPipeline
    from pipeline.evaluate.generation import decode
    from pipeline.evaluate.model_loading import load_model

    loaded = load_model(model_dir)
    pipe = DiffiTPipeline.from_pretrained(model_dir)
    with torch.no_grad():
        return decode(loaded, x), pipe.decode(x), loaded, pipe


def test_scalar_norm_with_shift_trains_exports_and_decodes_as_the_vae_expects(flux_like, tmp_path):
    vae_entry = flux_like.manifest["vae"]
    assert (vae_entry["scaling_factor"], vae_entry["shift_factor"], vae_entry["latent_channels"]) == (SCALE, SHIFT, 16)
    out = _train_and_export(tmp_path, flux_like.data, "scalar")
    exported = json.loads((out / "config.json").read_text())
    assert exported["latent_norm"] == {"kind": "scalar", "scaling_factor": SCALE, "shift_factor": SHIFT}

    x = torch.randn(2, CHANNELS, 4, 4, generator=torch.Generator().manual_seed(0))
    evaluated, piped, loaded, pipe = _decoders(out, x)
    with torch.no_grad():
        expected = loaded.vae.decode(x / SCALE + SHIFT).sample  # diffusers' SD3 / FLUX decode
        assert torch.equal(evaluated, expected)
        assert torch.equal(piped, pipe.vae.decode(x / SCALE + SHIFT).sample)
    assert torch.equal(evaluated, piped)  # the same VAE files, the same arithmetic
    assert loaded.identity["vae"]["latent_norm"] == exported["latent_norm"]
    # A saved pipeline keeps the norm (model_index.json) and decodes the same.
    from diffit import DiffiTPipeline

    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["latent_norm"] == exported["latent_norm"]
    with torch.no_grad():
        assert torch.equal(DiffiTPipeline.from_pretrained(tmp_path / "saved").decode(x), piped)


def test_channel_norm_standardises_with_the_manifest_statistics_and_decoders_invert_it(flux_like, tmp_path):
    stats = flux_like.manifest["latent_stats"]
    out = _train_and_export(tmp_path, flux_like.data, "channel")
    exported = json.loads((out / "config.json").read_text())
    assert exported["latent_norm"] == {"kind": "channel", "mean": stats["mean"], "std": stats["std"]}

    x = torch.randn(2, CHANNELS, 4, 4, generator=torch.Generator().manual_seed(1))
    mean = torch.tensor(stats["mean"], dtype=torch.float32).view(1, CHANNELS, 1, 1)
    std = torch.tensor(stats["std"], dtype=torch.float32).view(1, CHANNELS, 1, 1)
    evaluated, piped, loaded, pipe = _decoders(out, x)
    with torch.no_grad():
        assert torch.equal(evaluated, loaded.vae.decode(x * std + mean).sample)
        assert torch.equal(piped, pipe.vae.decode(x * std + mean).sample)

    # What the trainer reads: (z - mean_c) / std_c of the stored posterior (std 0 here: the mean itself).
    data = write_latent_dataset(tmp_path / "data", num_samples=4, num_shards=1, num_classes=16, std=0.0)
    norm = LatentNorm.channel([0.5, -1.0, 2.0, 0.0], [2.0, 0.5, 1.0, 4.0])
    spec = StreamSpec(
        urls=tuple(shard_urls(data, load_manifest(data))),
        kind="latents",
        batch_size=4,
        resampled=False,
        hflip=False,
        num_classes=16,
        latent_norm=norm,
    )
    from pipeline.core.shard_members import decode_sample
    from pipeline.core.shards import iter_samples

    stored = {s["cls"]: s["mean.npy"][0].astype(np.float32) for s in map(decode_sample, iter_samples(spec.urls[0]))}
    x, labels = next(iter(make_loader(spec, 0)))
    hand_mean = torch.tensor([0.5, -1.0, 2.0, 0.0]).view(4, 1, 1)
    hand_std = torch.tensor([2.0, 0.5, 1.0, 4.0]).view(4, 1, 1)
    for latent, label in zip(x, labels.tolist()):
        assert torch.allclose(latent, (torch.from_numpy(stored[label]) - hand_mean) / hand_std, atol=1e-6)


def test_channel_norm_on_a_manifest_without_statistics_is_one_error_naming_it(tmp_path):
    data = write_latent_dataset(tmp_path / "data", num_samples=4, num_shards=2)  # written without latent_stats
    config = tiny_latent_config(data={"latent_norm": "channel"}, train={"max_steps": 1})
    with pytest.raises(TrainError, match=rf"{tmp_path / 'data' / 'manifest.json'}: data.latent_norm is 'channel'"):
        run_train(
            TrainOptions(run_dir=tmp_path / "run", config_path=write_config(tmp_path / "c.yaml", config), data_dir=data)
        )


def test_an_export_written_before_latent_norm_decodes_as_before(tiny_vae, tmp_path):
    model_dir = make_latent_model_dir(tmp_path / "old", tiny_vae)  # config.json: a "vae" entry, no "latent_norm"
    config = json.loads((model_dir / "config.json").read_text())
    assert "latent_norm" not in config and config["vae"]["scaling_factor"] == 0.18215
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    evaluated, piped, loaded, pipe = _decoders(model_dir, x)
    assert loaded.latent_norm == LatentNorm.scalar(0.18215, 0.0) and pipe.latent_norm == loaded.latent_norm
    with torch.no_grad():
        assert torch.equal(evaluated, loaded.vae.decode(x / 0.18215).sample)  # the old `samples / scaling_factor`
        assert torch.equal(piped, pipe.vae.decode(x / 0.18215).sample)
    # A pipeline folder saved before the entry existed: model_index.json with scaling_factor only.
    pipe.save_pretrained(tmp_path / "saved")
    index_path = tmp_path / "saved" / "model_index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({k: v for k, v in index.items() if k != "latent_norm"}))
    from diffit import DiffiTPipeline

    with torch.no_grad():
        assert torch.equal(DiffiTPipeline.from_pretrained(tmp_path / "saved").decode(x), piped)
