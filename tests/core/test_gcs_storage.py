"""Datasets on Google Cloud Storage (gs://) through gcsfs, against a real GCS emulator started here.

`gcp-storage-emulator` (PyPI) implements the GCS JSON API in Python; gcsfs reaches it through
`STORAGE_EMULATOR_HOST`. gcsfs's default file system first asks a gRPC endpoint for the bucket's type (hierarchical
namespace), which the emulator does not serve; `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` (read when gcsfs is
imported) selects the plain JSON-API file system. Everything else is the pipeline's ordinary path.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from pipeline.core.manifest import load_manifest
from pipeline.encode.job import EncodeOptions, run_encode
from tests.support.encode_fixtures import make_image_tree, save_tiny_vae
from tests.support.s3_server import free_port
from tests.support.train_fixtures import read_metrics, tiny_latent_config, write_config

pytest.importorskip("gcsfs", reason="gs:// tests need gcsfs (pip install -e '.[test]')")

BUCKET = "datasets"
SHARD_SIZE = 2
TEST_MAX_PIXELS = 4_000_000


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A running GCS emulator with one bucket, and the environment that points gcsfs at it."""
    emulator = Path(sys.executable).with_name("gcp-storage-emulator")
    if not emulator.is_file():
        pytest.fail("gcp-storage-emulator not found: pip install -e '.[test]' installs it")
    port = free_port()
    log = tmp_path_factory.mktemp("gcs") / "emulator.log"
    command = [str(emulator), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "-q"]
    server = subprocess.Popen([*command, "--default-bucket", BUCKET], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/storage/v1/b/{BUCKET}", timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"the GCS emulator did not start: {log.read_text(errors='replace')}")
            time.sleep(0.1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("STORAGE_EMULATOR_HOST", endpoint)
            patch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            yield SimpleNamespace(endpoint=endpoint, url=lambda name: f"gs://{BUCKET}/{name}")
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gcs-data")
    labels = make_image_tree(root / "src", per_class=4)
    return SimpleNamespace(src=root / "src", vae=str(save_tiny_vae(root / "vae")), items=len(labels), root=root)


def _job(data, out, kind="latents", **overrides) -> EncodeOptions:
    settings = dict(kind=kind, source=str(data.src), out=str(out), resolution=32, shard_size=SHARD_SIZE)
    settings |= dict(batch_size=2, workers=0, torch_threads=1, max_pixels=TEST_MAX_PIXELS, progress=False)
    if kind == "latents":
        settings["vae"] = data.vae
    return EncodeOptions(**{**settings, **overrides})


def _shard_files(location) -> dict[str, bytes]:
    from pipeline.core.storage import Location

    where = Location.of(location)
    return {name: where.read_bytes(name) for name in where.names() if name.startswith("shard-")}


def test_encode_to_gs_equals_local_resumes_from_sidecars_and_trains(data, gcs, tmp_path):
    from pipeline.train import TrainOptions, run_train

    local, url = tmp_path / "local", gcs.url("latents")
    threads = torch.get_num_threads()
    try:
        assert run_encode(_job(data, local)).ok
        first = run_encode(_job(data, url))
        rerun = run_encode(_job(data, url))
    finally:
        torch.set_num_threads(threads)
    assert first.ok and first.shards_written == first.shards_total == -(-data.items // SHARD_SIZE)
    assert _shard_files(url) == _shard_files(local)  # tars and sidecars, byte for byte
    assert _shard_files(url.replace("gs://", "gcs://", 1)) == _shard_files(local)  # gcsfs's other name
    assert rerun.ok and rerun.shards_skipped == rerun.shards_total  # trusted from sealed sidecars and GCS times
    manifest = load_manifest(url)
    assert {k: v for k, v in manifest.items() if k not in ("created", "command")} == {
        k: v for k, v in load_manifest(local).items() if k not in ("created", "command")
    }
    shown = CliRunner().invoke(app, ["inspect", url, "--verify"], catch_exceptions=False)
    assert shown.exit_code == 0 and f"verified   {first.shards_total} shard(s)" in shown.output, shown.output

    config = tiny_latent_config(
        model={"input_size": manifest["latent_size"]}, train={"max_steps": 2, "global_batch_size": 2}
    )
    losses = {}
    torch.set_num_threads(1)
    try:
        for name, where in (("local", local), ("gs", url)):
            run_dir = tmp_path / f"run-{name}"
            run_train(
                TrainOptions(
                    run_dir=run_dir, config_path=write_config(tmp_path / f"{name}.yaml", config), data_dir=where
                )
            )
            losses[name] = [record["loss"] for record in read_metrics(run_dir) if "loss" in record]
    finally:
        torch.set_num_threads(threads)
    assert len(losses["gs"]) == 2 and losses["gs"] == losses["local"]
