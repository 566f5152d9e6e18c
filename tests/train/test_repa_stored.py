"""REPA with stored targets (`repa.targets: stored`, `pipeline.train.repa`): the targets read from the shards
(`encode --encoder-targets`) follow the latent view each sample takes and equal the online targets of the same
samples, both views, to float16 precision; a short run trains the same as online without ever loading the
encoder; a damaged or crafted `repa.npy` is caught like a damaged latent, naming the shard; a manifest whose
encoder, weights or token grid are not the run's is refused in one line. One dataset encoded once (tiny VAE, tiny
random DINOv2, 16 images of 32 px: 4 x 4 latents, DiffiT-Tiny/2's 2 x 2 tokens), with both the crops and the targets
so that online and stored read the very same samples."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.core.manifest import load_manifest, shard_urls
from pipeline.train import TrainOptions, run_train
from pipeline.train.config import ConfigError, config_from_dict
from tests.support.encode_fixtures import damage_first_member, small_encode_options
from tests.support.encoder_fixtures import save_official, tiny_timm_dinov2
from tests.support.train_fixtures import (
    latent_stream_spec,
    read_metrics,
    tiny_latent_config,
    write_config,
    write_latent_dataset,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (2, 4, 32)  # [views, 2 x 2 tokens, the tiny DINOv2's 32 channels]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> SimpleNamespace:
    from pipeline.encode.job import run_encode
    from tests.support.encode_fixtures import make_image_tree, save_tiny_vae

    root = tmp_path_factory.mktemp("repa-stored")
    make_image_tree(root / "src", per_class=4)
    dinov2 = save_official(tiny_timm_dinov2(), root / "dinov2" / "tiny_dinov2.pth")
    options = small_encode_options(
        root / "src",
        str(save_tiny_vae(root / "vae")),
        root / "data",
        shard_size=8,
        batch_size=8,
        limit=16,
        keep_images=True,
        encoder_targets="dinov2-vitb14",
        encoder_weights=str(dinov2),
    )
    assert run_encode(options).ok
    return SimpleNamespace(root=root, data=root / "data", dinov2=dinov2)


def repa_config(weights: Path, targets: str = "stored", steps: int = 2, **repa) -> dict:
    section = {"weight": 0.5, "depth": 1, "projector_dim": 16, "encoder": "dinov2-vitb14"}
    return tiny_latent_config(
        model={"input_size": 4},
        train={"max_steps": steps},
        checkpoint={"every": steps},
        repa=section | {"encoder_weights": str(weights), "targets": targets} | repa,
    )


def first_batch(spec):
    from pipeline.train.data import make_loader

    return next(iter(make_loader(spec, 0)))


def test_stored_targets_follow_the_view_and_equal_the_online_targets_of_the_same_samples(encoded):
    """The same batch read twice (fixed order: the same posterior draws and views): with the crops (online) and
    with the stored targets. The stored row is the one of the view the sample took (both views occur), and the
    targets REPA aligns to are the online ones to float16 precision; the projectors are drawn alike."""
    from diffit.models import create_model
    from pipeline.core.shard_members import decode_sample
    from pipeline.core.shards import iter_samples
    from pipeline.train.repa import build_repa

    x, labels, images = first_batch(latent_stream_spec(encoded.data, images=True))
    x_stored, labels_stored, tokens = first_batch(latent_stream_spec(encoded.data, targets=SHAPE))
    assert torch.equal(x, x_stored) and torch.equal(labels, labels_stored)
    assert tokens.dtype == torch.float16 and tokens.shape == (8, 4, 32)
    raw = [decode_sample(s) for url in shard_urls(encoded.data, load_manifest(encoded.data)) for s in iter_samples(url)]
    views = []
    for image, token, sample in zip(images, tokens, raw[:8]):
        view = 0 if torch.equal(image, torch.from_numpy(np.array(sample["png"])).permute(2, 0, 1)) else 1
        views.append(view)
        assert torch.equal(token, torch.from_numpy(sample["repa.npy"][view]))
    assert set(views) == {0, 1}

    manifest = load_manifest(encoded.data)
    alignments = {}
    for mode in ("online", "stored"):
        config = config_from_dict(repa_config(encoded.dinov2, mode))
        model = create_model("DiffiT-Tiny/2", input_size=4, num_classes=manifest["num_classes"])
        torch.manual_seed(0)
        alignments[mode] = build_repa(config, model, manifest)
    online, stored = alignments["online"], alignments["stored"]
    assert stored.encoder is None and online.encoder is not None
    expected = online.targets(x, images)
    torch.testing.assert_close(stored.targets(x, tokens), expected, atol=2e-3, rtol=2e-3)
    # The training step runs inside mixed-precision autocast; the encoder does not (REPA's): the same float32 targets.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(online.targets(x, images), expected)
    for a, b in zip(online.projector.state_dict().values(), stored.projector.state_dict().values()):
        assert torch.equal(a, b)


def test_a_short_run_trains_the_same_stored_as_online_without_loading_the_encoder(encoded, tmp_path, monkeypatch):
    records = {}
    for mode in ("online", "stored"):
        if mode == "stored":

            def no_encoder(*args, **kwargs):
                raise AssertionError("the encoder was loaded with repa.targets: stored")

            monkeypatch.setattr("pipeline.train.repa.load_target_encoder", no_encoder)
        config = write_config(tmp_path / f"{mode}.yaml", repa_config(encoded.dinov2, mode))
        run_train(TrainOptions(run_dir=tmp_path / mode, config_path=config, data_dir=encoded.data))
        records[mode] = read_metrics(tmp_path / mode)
    assert [r["step"] for r in records["stored"]] == [1, 2]
    for online, stored in zip(records["online"], records["stored"]):
        assert stored["loss"] == pytest.approx(online["loss"], rel=1e-3)
        assert stored["repa_loss"] == pytest.approx(online["repa_loss"], rel=1e-3, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Damaged and crafted members
# ---------------------------------------------------------------------------------------------------------------


def read_all(spec) -> list:
    from pipeline.train.data import infinite, make_loader

    batches = []
    for batch in infinite(make_loader(spec, 0)):
        batches.append(batch)
        if len(batches) > 4:
            break
    return batches


def test_a_damaged_targets_member_is_caught_like_a_damaged_latent(encoded, tmp_path):
    """A byte of a `repa.npy` inverted on disk: the same CorruptShardError line as a latent overwritten in place,
    before any sample of the shard is used."""
    from pipeline.train.shard_reading import CorruptShardError
    from tests.train.test_integrity import overwrite_latents

    messages = {}
    for damage, name in (
        (lambda shard: damage_first_member(shard, "repa.npy"), "targets"),
        (overwrite_latents, "latent"),
    ):
        data = tmp_path / name
        shutil.copytree(encoded.data, data)
        damage(data / "shard-000001.tar")
        with pytest.raises(CorruptShardError) as caught:
            read_all(latent_stream_spec(data, batch_size=4, hflip=False, targets=SHAPE))
        messages[name] = re.sub(r"[0-9a-f]{64}", "HASH", str(caught.value).replace(str(data), "DATA"))
    assert messages["targets"] == messages["latent"]
    assert "DATA/shard-000001.tar: sha256 HASH does not match the manifest's HASH" in messages["targets"]


def npy_claiming(shape: tuple[int, ...], payload: bytes) -> bytes:
    """A .npy float16 header claiming `shape`, followed by `payload` (whatever its size)."""
    buffer = io.BytesIO()
    header = {"descr": np.dtype(np.float16).str, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + payload


def npy(array: np.ndarray) -> bytes:
    from pipeline.core.shard_members import npy_bytes

    return npy_bytes(array)


@pytest.mark.parametrize(
    "payload, message",
    [
        (npy_claiming((2, 10**12, 32), b"\0" * 512), "is not a valid .npy array"),  # ~128 TB declared
        (npy(np.zeros(SHAPE, np.float16))[:-10], "is not a valid .npy array"),  # truncated
        (npy(np.zeros(SHAPE, np.float32)), "'repa.npy' is float32 [2, 4, 32], the manifest's repa_targets say"),
        (npy(np.zeros((2, 9, 32), np.float16)), "'repa.npy' is float16 [2, 9, 32], the manifest's repa_targets"),
        (npy(np.zeros((2, 4, 32), np.int16).view(np.float16)[:1]), "is float16 [1, 4, 32]"),
    ],
)
def test_a_crafted_targets_member_is_refused_naming_the_shard(encoded, tmp_path, payload, message):
    """Members written that way (the manifest records their hash): the bounded read refuses a header claiming more
    than the member holds before allocating it, and every member must be the manifest's float16 [2, N, D]."""
    from pipeline.train.shard_reading import DataFormatError
    from tests.train.test_integrity import _record_size_and_hash, _rewrite_member

    data = tmp_path / "data"
    shutil.copytree(encoded.data, data)
    _rewrite_member(data / "shard-000001.tar", "repa.npy", payload)
    _record_size_and_hash(data, "shard-000001.tar")
    with pytest.raises(DataFormatError) as caught:
        read_all(latent_stream_spec(data, batch_size=4, hflip=False, targets=SHAPE))
    assert f"{data}/shard-000001.tar:" in str(caught.value) and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_manifest_bounds_every_declared_targets_field(encoded, tmp_path):
    from pipeline.core.manifest import ManifestError

    for field, value, problem in (
        ("shape", [2, 4, 10**9], "repa_targets.shape"),
        ("grid", [10**6, 10**6], "repa_targets.grid"),
        ("dtype", "float64", "repa_targets.dtype"),
        ("encoder", "clip", "repa_targets.encoder"),
        ("weights_sha256", "x", "repa_targets.weights_sha256"),
    ):
        manifest = json.loads((encoded.data / "manifest.json").read_text())
        manifest["repa_targets"][field] = value
        data = tmp_path / field
        data.mkdir()
        (data / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ManifestError, match=re.escape(problem)):
            load_manifest(data)


# ---------------------------------------------------------------------------------------------------------------
# The run's settings against the manifest
# ---------------------------------------------------------------------------------------------------------------


def check(tmp_path: Path, config: dict, data: Path):
    from pipeline.train.checks import check_run

    path = write_config(tmp_path / "check.yaml", config)
    return check_run(TrainOptions(run_dir=tmp_path / "run", config_path=path, data_dir=data))


def test_a_manifest_whose_targets_are_not_the_runs_is_refused_in_one_line(encoded, tmp_path):
    from pipeline.train.repa import RepaError

    assert check(tmp_path, repa_config(encoded.dinov2), encoded.data).info.kind == "latents"
    other = save_official(tiny_timm_dinov2(seed=1), tmp_path / "other" / "tiny_dinov2.pth")
    regridded = tmp_path / "regridded"
    shutil.copytree(encoded.data, regridded)
    manifest = json.loads((regridded / "manifest.json").read_text())
    manifest["repa_targets"]["input_grid"] = [1, 1]
    (regridded / "manifest.json").write_text(json.dumps(manifest))
    plain = write_latent_dataset(tmp_path / "plain", num_samples=8, latent_size=4, images=True)
    cases = [
        (repa_config(other), encoded.data, "computed with other dinov2-vitb14 weights"),
        (repa_config(encoded.dinov2, encoder="dinov2-vits14"), encoded.data, "the stored targets are dinov2-vitb14's"),
        (repa_config(encoded.dinov2), regridded, "computed for a 1 x 1 token grid, but block 1 of DiffiT-Tiny/2 has"),
        (repa_config(encoded.dinov2), plain, "this dataset holds no stored encoder targets"),
    ]
    for config, data, message in cases:
        with pytest.raises(RepaError) as caught:
            check(tmp_path, config, data)
        assert message in str(caught.value) and "\n" not in str(caught.value)
        assert "repa.targets: online" in str(caught.value)


def test_the_mismatch_is_one_error_line_from_the_cli_and_image_models_cannot_store(encoded, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app
    from tests.support.train_fixtures import tiny_image_config

    other = save_official(tiny_timm_dinov2(seed=1), tmp_path / "other" / "tiny_dinov2.pth")
    config = write_config(tmp_path / "c.yaml", repa_config(other))
    args = ["train", "--config", config, "--data", encoded.data, "--run-dir", tmp_path / "run"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output[-2000:]
    assert "other dinov2-vitb14 weights" in lines[0] and not (tmp_path / "run" / "checkpoints").exists()
    assert config_from_dict(tiny_latent_config()).repa.targets == "online"  # the default docs/benchmarks.md chose
    repa = {"weight": 0.5, "depth": 1, "encoder_weights": str(other), "targets": "stored"}
    with pytest.raises(ConfigError, match="repa.targets stored: targets are stored in latent shards"):
        config_from_dict(tiny_image_config(repa=repa))
