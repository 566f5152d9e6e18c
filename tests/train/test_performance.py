"""The training step's device-dependent choices, on CPU: MFU arithmetic and the GPU peak table, fused AdamW
and channels-last behind their flags (same training within rounding), seconds per kimg in every record, and
nothing CUDA-only (peak memory, MFU) reported off CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.train import TrainOptions, run_train
from pipeline.train.performance import (
    DeviceStats,
    model_flops_utilisation,
    peak_bf16_tflops,
    training_flops_per_image,
    use_fused,
)
from tests.support.train_fixtures import (
    read_metrics,
    tiny_image_config,
    tiny_latent_config,
    write_config,
    write_image_dataset,
    write_latent_dataset,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "name,tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA GeForce RTX 4090", None),  # not in the table: MFU not reported
    ],
)
def test_gpu_peak_table(name, tflops):
    assert peak_bf16_tflops(name) == tflops


def test_mfu_counts_three_forwards_of_two_flops_per_multiply_add():
    # DiffiT-XL/2 at 256 px: 118.5 G multiply-adds per forward (DiT's counting; DiT-XL/2: 118.6), so a training
    # image is 6 x 118.5 G = 711 GFLOP.
    flops = training_flops_per_image("DiffiT-XL/2", {})
    assert flops == pytest.approx(711e9, rel=0.002)
    # 100 images/s on 8 H100s: 71.1 TFLOP/s of 8 x 989.
    assert model_flops_utilisation(100.0, 711e9, 8 * 989e12) == pytest.approx(71.1 / 7912)
    assert DeviceStats(torch.device("cpu"), flops, world_size=1).record(100.0) == {}  # CUDA only


def test_fused_optimizer_only_where_every_parameter_is_on_cuda():
    cpu = [torch.nn.Parameter(torch.zeros(2))]
    assert use_fused(None, cpu) is False and use_fused(None, []) is False
    assert use_fused(True, cpu) is True and use_fused(False, cpu) is False


def train_losses(tmp_path: Path, name: str, config: dict, data: Path) -> list[float]:
    run_dir = tmp_path / name
    run_train(TrainOptions(run_dir=run_dir, config_path=write_config(tmp_path / f"{name}.yaml", config), data_dir=data))
    return [r["loss"] for r in read_metrics(run_dir)]


def test_fused_adamw_on_request_trains_the_same_within_rounding(tmp_path):
    from pipeline.train.setup import set_up

    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=1, num_classes=10)
    settings = dict(train={"max_steps": 6}, checkpoint={"every": 100})
    fused = tiny_latent_config(optim={"lr": 1e-3, "fused": True}, **settings)
    probe = TrainOptions(
        run_dir=tmp_path / "probe", config_path=write_config(tmp_path / "p.yaml", fused), data_dir=data
    )
    training = set_up(probe)
    assert training.optimizer.optimizer.defaults["fused"] is True
    reference = train_losses(tmp_path, "foreach", tiny_latent_config(**settings), data)
    assert np.allclose(train_losses(tmp_path, "fused", fused, data), reference, rtol=1e-4, atol=0)
    # A performance setting: a run may continue with another value (another machine).
    longer = tiny_latent_config(optim={"lr": 1e-3, "fused": True}, train={"max_steps": 8}, checkpoint={"every": 100})
    run_dir = tmp_path / "foreach"
    run_train(
        TrainOptions(
            run_dir=run_dir, config_path=write_config(tmp_path / "l.yaml", longer), data_dir=data, resume="auto"
        )
    )
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))


def test_channels_last_feeds_channels_last_batches_and_trains_the_same(tmp_path):
    from pipeline.train.setup import prepare_loop, set_up

    data = write_image_dataset(tmp_path / "data", num_samples=8, num_shards=1, resolution=16)
    settings = dict(train={"max_steps": 4}, checkpoint={"every": 100})
    channels_last = tiny_image_config(model={"channels_last": True}, **settings)
    args = TrainOptions(
        run_dir=tmp_path / "probe", config_path=write_config(tmp_path / "p.yaml", channels_last), data_dir=data
    )
    training = set_up(args)
    prepare_loop(training)
    x, _, _, _ = next(training.batches)
    assert x.shape == (4, 3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    conv = next(m for m in training.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    reference = train_losses(tmp_path, "default", tiny_image_config(**settings), data)
    assert np.allclose(train_losses(tmp_path, "channels-last", channels_last, data), reference, rtol=1e-4, atol=0)


def records_of_a_four_step_run(tmp_path: Path) -> list[dict]:
    """The metrics records of 4 steps of DiffiT-Tiny/2 at batch 4, one record every 2 steps."""
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=1, num_classes=10)
    config = tiny_latent_config(train={"max_steps": 4, "log_every": 2, "global_batch_size": 4})
    run_dir = tmp_path / "run"
    run_train(TrainOptions(run_dir=run_dir, config_path=write_config(tmp_path / "c.yaml", config), data_dir=data))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [2, 4]
    return records


def test_every_record_has_seconds_per_kimg_and_no_gpu_figures_on_cpu(tmp_path):
    for record in records_of_a_four_step_run(tmp_path):
        # 2 steps x 4 images per record: seconds per 1000 images and images per second describe the same window.
        assert record["sec_per_kimg"] == pytest.approx(1000 / record["images_per_s"], rel=1e-9)
        assert "peak_gpu_mem_gib" not in record and "mfu" not in record


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_every_record_has_peak_memory_seconds_per_kimg_and_mfu_where_the_gpu_is_listed(tmp_path):
    # Run by bench/device_check.py (`pytest -m cuda`) on a lent GPU: the CUDA-only log fields of issue 17.
    listed = peak_bf16_tflops(torch.cuda.get_device_name()) is not None
    for record in records_of_a_four_step_run(tmp_path):
        assert record["sec_per_kimg"] == pytest.approx(1000 / record["images_per_s"], rel=1e-9)
        assert 0 < record["peak_gpu_mem_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
        assert ("mfu" in record) == listed and (not listed or 0 < record["mfu"] < 1)
