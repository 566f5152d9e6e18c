"""EDM's DDPM++ / NCSN++ (diffit.songunet) in the trainer: EDM's three preconditionings (`diffusion.precond`) and its
augmentation (`data.augment`), end to end through `diffit-pipe train`, `export` and `evaluate` (and DiffiTPipeline),
and a resumed run that continues bit for bit.

A SongUNet of a few thousand parameters (8 channels, two levels, TMSA attention at 4x4) on 8 px images of two
classes; three training steps; three Heun steps for four samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipeline.train import TrainOptions, run_train
from tests.support.train_fixtures import (
    assert_same_weights,
    read_metrics,
    tiny_image_config,
    write_config,
    write_image_dataset,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL_SONGUNET = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4], "tmsa": True}
AUGMENT = 0.5  # EDM's CIFAR-10 setting is 0.12; more, so that three steps of four images surely augment some


def songunet_config(precond: str, **sections) -> dict:
    """DDPM++ (TMSA form) at 8 px, EDM training with `precond` and EDM's augmentation, CFG label dropout."""
    config = tiny_image_config(
        model={"name": "DDPM++-CIFAR10", "input_size": 8, "kwargs": SMALL_SONGUNET},
        diffusion={"type": "edm", "learn_sigma": False, "precond": precond},
        data={"resampled": False, "num_workers": 0, "augment": AUGMENT, "label_dropout": 0.5},
        train={"global_batch_size": 4, "max_steps": 3, "mixed_precision": "no", "log_every": 1, "tracker": "none"},
    )
    for section, values in sections.items():
        config[section].update(values)
    return config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_dataset(
        tmp_path_factory.mktemp("data"), num_samples=8, num_shards=1, resolution=8, num_classes=2
    )


def direct_samples(model_dir: Path, precond: str, labels, seeds) -> torch.Tensor:
    """What the export should sample: its network under `precond` (diffit.edm.make_precond), EDM-Heun on 3 steps
    with the grid clipped to the precond's sigma range, guidance 2 (the unconditional branch: the null class, the
    zero class vector)."""
    import diffit
    from diffit.edm import make_precond
    from diffit.guidance import GuidanceConfig
    from diffit.sampling import SamplingConfig, sample

    model, _ = diffit.load_pretrained(model_dir)
    settings = SamplingConfig(kind="edm", sampler="edm-heun", steps=3, guidance=GuidanceConfig(scale=2.0))
    return sample(make_precond(precond, model.eval()), (3, 8, 8), labels, seeds, settings)


@pytest.mark.parametrize("precond", ["edm", "vp", "ve"])
def test_train_export_and_evaluate_with_each_precond_and_augmentation(tmp_path, data, precond):
    from cli.main import app
    from pipeline.evaluate import sample_class_labels, sample_noise_seeds
    from pipeline.evaluate.generation import to_uint8_images
    from pipeline.evaluate.sample_store import STORE_NAME, SampleStore

    runner = CliRunner()
    # A preview grid at the last step: the training previews sample through the run's precond too.
    config = write_config(tmp_path / "c.yaml", songunet_config(precond, sample={"every": 3, "count": 2, "steps": 2}))
    run, model_dir, out = tmp_path / "run", tmp_path / "model", tmp_path / "eval"
    result = runner.invoke(app, ["train", "--config", str(config), "--data", str(data), "--run-dir", str(run)])
    assert result.exit_code == 0, result.output
    assert all(np.isfinite(record["loss"]) for record in read_metrics(run)) and len(read_metrics(run)) == 3
    assert (run / "samples" / "step-0000003.png").is_file()
    from pipeline.train.config import load_config
    from pipeline.train.samples import sampling_config

    assert sampling_config(load_config(run / "config.yaml"), conditional=True).precond == precond
    result = runner.invoke(app, ["export", str(run), str(model_dir)])
    assert result.exit_code == 0, result.output

    # The export records what sampling rebuilds: the precond (and EDM's augmentation, with the training settings).
    exported = json.loads((model_dir / "config.json").read_text())
    assert exported["diffusion"] == {
        "type": "edm",
        "sigma_data": 0.5,
        "P_mean": -1.2,
        "P_std": 1.2,
        "precond": precond,
        "augment": AUGMENT,
    }
    kwargs = exported["model"]["kwargs"]
    assert (kwargs["label_dim"], kwargs["augment_dim"], kwargs["img_resolution"], kwargs["tmsa"]) == (2, 9, 8, True)

    arguments = ["--num-samples", "4", "--batch-size", "4", "--steps", "3", "--guidance-scale", "2", "--metrics", ""]
    result = runner.invoke(app, ["evaluate", "--model", str(model_dir), "--out", str(out), *arguments])
    assert result.exit_code == 0, result.output
    store = SampleStore.open(out / STORE_NAME, mode="r")
    labels, seeds = sample_class_labels(0, range(4), 2), sample_noise_seeds(0, range(4))
    np.testing.assert_array_equal(store.read_labels(), labels)
    expected = direct_samples(model_dir, precond, torch.as_tensor(labels), seeds)
    np.testing.assert_array_equal(store.read_images(0, 4), to_uint8_images(expected))
    if precond != "edm":  # the precond matters: EDM's on the same network gives other samples
        assert not torch.allclose(expected, direct_samples(model_dir, "edm", torch.as_tensor(labels), seeds))

    # DiffiTPipeline: the project's sampler gives the same samples; diffusers' EDM schedulers (EDM's c_in, c_noise)
    # are refused for VP / VE.
    from diffusers import EDMEulerScheduler

    from diffit import DiffiTPipeline

    pipe = DiffiTPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.sampling_config.precond == precond
    called = pipe(
        class_labels=labels.tolist(), seeds=seeds, num_inference_steps=3, guidance_scale=2.0, output_type="latent"
    )
    assert torch.equal(called.images, expected)
    if precond != "edm":
        pipe.scheduler = EDMEulerScheduler()
        with pytest.raises(ValueError, match=f"trained with EDM's {precond.upper()} preconditioning"):
            pipe(class_labels=[0], seeds=[0], num_inference_steps=3, output_type="latent")
        from diffit.scheduling_diffit import scheduler_for

        with pytest.raises(ValueError, match=f"no diffusers scheduler drives a {precond.upper()}-preconditioned"):
            scheduler_for(pipe.sampling_config)


def test_a_resumed_run_with_augmentation_continues_bit_for_bit(tmp_path, data):
    """4 steps in one go, or 2 then a resume to 4: the same weights, EMA and optimizer moments (the augmentation
    draws from the global RNG, restored from the checkpoint)."""

    def train(name: str, max_steps: int, resume: str | None = None) -> Path:
        config = songunet_config("vp", train={"max_steps": max_steps}, checkpoint={"every": 2, "keep": 3})
        path = write_config(tmp_path / f"{name}-{max_steps}.yaml", config)
        run_train(TrainOptions(run_dir=tmp_path / name, config_path=path, data_dir=data, resume=resume))
        return tmp_path / name / "checkpoints" / "step-0000004"

    whole = train("whole", 4)
    train("resumed", 2)
    resumed = train("resumed", 4, resume="auto")
    assert_same_weights(resumed, whole)
    optimizer = [torch.load(run / "optimizer.bin", weights_only=True)["state"] for run in (whole, resumed)]
    assert all(torch.equal(optimizer[0][k]["exp_avg"], optimizer[1][k]["exp_avg"]) for k in optimizer[0])
    losses = {name: [r["loss"] for r in read_metrics(tmp_path / name)] for name in ("whole", "resumed")}
    assert losses["whole"] == losses["resumed"] and len(losses["whole"]) == 4


def test_the_objective_augments_before_the_noise_and_gives_the_network_the_labels(data):
    """One micro-batch's loss, replayed line by line as EDM's training loop and VELoss compute it under the same
    seed: CFG label dropout to the null class, sigma, EDM's augmentation, the noise, VEPrecond around the network
    with the augment labels, EDM's reduction (sum over pixels, mean over the batch)."""
    import diffit
    from diffit.augment import edm_augment_pipe
    from diffit.edm import VEPrecond
    from diffit.layers import drop_labels
    from pipeline.train.config import config_from_dict
    from pipeline.train.objective import Objective

    config = config_from_dict(songunet_config("ve"))
    torch.manual_seed(0)
    network = diffit.create_model("DDPM++-CIFAR10", img_resolution=8, label_dim=2, augment_dim=9, **SMALL_SONGUNET)
    network.eval()  # no dropout draws: the replay below draws what the loss draws
    seen = []
    network.register_forward_hook(lambda module, args, kwargs, output: seen.append(kwargs), with_kwargs=True)
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    labels = torch.tensor([0, 1, 1, 0])
    torch.manual_seed(3)
    with torch.no_grad():
        loss = Objective(config, null_class=network.null_class)(network, images, labels)
    torch.manual_seed(3)
    dropped = drop_labels(labels, 2, 0.5)
    sigma = 0.02 * ((100 / 0.02) ** torch.rand([4, 1, 1, 1]))
    y, augment_labels = edm_augment_pipe(AUGMENT)(images)
    n = torch.randn_like(y) * sigma
    with torch.no_grad():
        D_yn = VEPrecond(network)(y + n, sigma.flatten(), dropped, augment_labels=augment_labels)
    expected = (1 / sigma**2 * (D_yn - y) ** 2).sum() / 4
    assert torch.equal(loss, expected)
    torch.testing.assert_close(seen[0]["augment_labels"], augment_labels, rtol=0, atol=0)
    assert augment_labels.shape == (4, 9) and not torch.equal(y, images)  # some images flipped or transformed


def test_the_diffit_unet_trains_with_edms_augmentation_and_samples_without_it(tmp_path, data):
    """The paper "strictly followed ... the data augmentation strategies of EDM" for its image models: the DiffiT
    U-Net trains on EDM-augmented batches, built with augment_dim 9 and given the labels of what was applied (hook),
    and the export samples with none (evaluate = the network under EDM's precond without augment labels)."""
    from pipeline.train.config import config_from_dict
    from pipeline.train.objective import Objective

    config = tiny_image_config(
        diffusion={"type": "edm", "learn_sigma": False},
        data={"resampled": False, "num_workers": 0, "augment": AUGMENT},
        train={"global_batch_size": 4, "max_steps": 2, "mixed_precision": "no", "log_every": 1, "tracker": "none"},
    )
    config["model"]["input_size"] = 8
    config["model"]["kwargs"] = {"channels": [8, 8], "blocks_per_stage": [1, 1], "num_heads": 2, "num_groups": 4}
    path = write_config(tmp_path / "c.yaml", config)
    run_train(TrainOptions(run_dir=tmp_path / "run", config_path=path, data_dir=data))
    from pipeline.train import export_checkpoint

    export_checkpoint(tmp_path / "run", tmp_path / "model")
    exported = json.loads((tmp_path / "model" / "config.json").read_text())
    assert exported["model"]["kwargs"]["augment_dim"] == 9 and exported["diffusion"]["augment"] == AUGMENT

    import diffit

    model, _ = diffit.load_pretrained(tmp_path / "model")
    assert model.augment_embed.weight.shape == (model.time_dim, 9)
    seen = []
    model.register_forward_hook(lambda module, args, kwargs, output: seen.append(kwargs), with_kwargs=True)
    objective = Objective(config_from_dict(config), null_class=model.null_class)
    torch.manual_seed(0)
    objective(model.train(), torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([0, 1, 0, 1]))
    assert seen[-1]["augment_labels"].shape == (4, 9)
    from diffit.edm import make_precond
    from diffit.sampling import SamplingConfig, sample

    count = len(seen)
    settings = SamplingConfig(kind="edm", sampler="edm-heun", steps=2)
    samples = sample(make_precond("edm", model.eval()), (3, 8, 8), torch.tensor([0, 1]), [0, 1], settings)
    assert samples.shape == (2, 3, 8, 8) and torch.isfinite(samples).all() and len(seen) > count
    assert all(kwargs.get("augment_labels") is None for kwargs in seen[count:])  # sampling: nothing augmented
