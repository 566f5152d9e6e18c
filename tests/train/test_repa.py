"""REPA in the trainer (`pipeline.train.repa`): the `repa` config section and its checks, block k of every model
(meta device), the step's loss replayed by hand, every objective and time conditioning, targets that follow the
flipped latent view, a damaged image member, resume bit for bit, an export without the projector, end-to-end CLI
runs with the demo classifier (latents encoded with `--keep-images`) and with a tiny random DINOv2 (the image
U-Net), and two processes."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from pipeline.core.manifest import load_manifest, shard_urls
from pipeline.train import TrainOptions, run_train
from pipeline.train.config import ConfigError, config_from_dict, load_config
from tests.support.encode_fixtures import damage_first_member
from tests.support.encoder_fixtures import save_official, tiny_timm_dinov2
from tests.support.train_fixtures import (
    assert_same_weights,
    latent_stream_spec,
    read_metrics,
    read_safetensors,
    run_train_subprocess,
    tiny_image_config,
    tiny_latent_config,
    write_config,
    write_image_dataset,
    write_latent_dataset,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCALE = 0.18215
DINOV2_WIDTHS = {"dinov2-vits14": 384, "dinov2-vitb14": 768, "dinov2-vitl14": 1024, "dinov2-vitg14": 1536}


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory) -> Path:
    """A tiny random DINOv2-style ViT (32 wide, 2 blocks) in the official key format."""
    return save_official(tiny_timm_dinov2(), tmp_path_factory.mktemp("dinov2") / "tiny_dinov2.pth")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    """A random demo classifier (16 px, two stages: an 8 x 8 feature map of 16 channels)."""
    from pipeline.demo.classifier import ClassifierConfig, SmallCNN, save_classifier

    torch.manual_seed(0)
    model = SmallCNN(ClassifierConfig(num_classes=3, resolution=16, channels=(8, 16), groups=4))
    return save_classifier(model, tmp_path_factory.mktemp("classifier") / "classifier")


@pytest.fixture(scope="module")
def latent_data(tmp_path_factory) -> Path:
    """8 latent samples in 2 shards, each with its 64 px image (`encode --keep-images`)."""
    return write_latent_dataset(tmp_path_factory.mktemp("latents") / "data", num_samples=8, num_shards=2, images=True)


def repa_section(weights: Path, encoder: str = "dinov2-vits14", **settings) -> dict:
    return {
        "weight": 0.5,
        "depth": 1,
        "projector_dim": 16,
        "encoder": encoder,
        "encoder_weights": str(weights),
    } | settings


def cli(*args) -> object:
    from cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------------------------------------------------------
# The config section and block k
# ---------------------------------------------------------------------------------------------------------------


def test_the_repa_section_defaults_to_off_and_is_checked_where_the_config_loads(tmp_path, dinov2_file):
    defaults = config_from_dict(tiny_latent_config()).repa
    assert (defaults.weight, defaults.depth, defaults.projector_dim) == (0.0, 8, 2048)  # off; REPA's XL values
    assert (defaults.encoder, defaults.encoder_weights) == ("dinov2-vitb14", None)
    # Off, nothing else is checked: depth 8 is fine for DiffiT-Tiny/2's 2 blocks.
    assert config_from_dict(tiny_latent_config()).repa.depth == 8
    on = config_from_dict(tiny_latent_config(repa=repa_section(dinov2_file, depth=2)))
    assert (on.repa.weight, on.repa.depth, on.repa.encoder) == (0.5, 2, "dinov2-vits14")
    refusals = [
        (
            tiny_latent_config(repa=repa_section(dinov2_file, weight=-0.1)),
            "repa.weight must be >= 0 (0 = off), got -0.1",
        ),
        (
            tiny_latent_config(repa=repa_section(dinov2_file, depth=0)),
            "repa.depth must be >= 1 (1-based block number, REPA's encoder_depth), got 0",
        ),
        (
            tiny_latent_config(repa=repa_section(dinov2_file, depth=3)),
            "repa.depth 3 is beyond the 2 blocks of DiffiT-Tiny/2; choose 1..2",
        ),
        (
            tiny_latent_config(model={"kwargs": {"depth": 4}}, repa=repa_section(dinov2_file, depth=5)),
            "repa.depth 5 is beyond the 4 blocks of DiffiT-Tiny/2; choose 1..4",
        ),
        # DiffiT-UNet-Tiny: one ResBlock per stage, two stages: 2 encoder blocks + 1 decoder block.
        (
            tiny_image_config(repa=repa_section(dinov2_file, depth=4)),
            "repa.depth 4 is beyond the 3 blocks of DiffiT-UNet-Tiny; choose 1..3",
        ),
        (tiny_latent_config(repa=repa_section(dinov2_file, projector_dim=0)), "repa.projector_dim must be >= 1, got 0"),
        (
            tiny_latent_config(repa=repa_section(dinov2_file, encoder_weights=None)),
            "repa.encoder_weights: repa.weight 0.5 needs the dinov2-vits14 weights file (nothing is downloaded); "
            "set repa.encoder_weights: PATH",
        ),
        (
            tiny_latent_config(repa=repa_section(dinov2_file, encoder="dinov2-vitx14")),
            "repa.encoder: 'dinov2-vitx14' is not one of",
        ),
        (
            tiny_image_config(
                model={"name": "DDPM++-CIFAR10", "input_size": 8, "kwargs": {"model_channels": 8}},
                repa=repa_section(dinov2_file),
            ),
            "repa: DDPM++-CIFAR10 (songunet model) has no DiffiT transformer blocks whose tokens REPA could align",
        ),
    ]
    for mapping, message in refusals:
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from_dict(mapping)
    with pytest.raises(ConfigError, match=re.escape("data.augment 0.12 with repa.weight 0.5: the network would see")):
        config_from_dict(tiny_image_config(data={"augment": 0.12}, repa=repa_section(dinov2_file)))
    # A `--set` override reaches the section; the section is frozen on resume but for the file's path.
    path = write_config(tmp_path / "c.yaml", tiny_latent_config(repa=repa_section(dinov2_file)))
    assert load_config(path, ["repa.weight=0.25"]).repa.weight == 0.25
    from pipeline.train.config import FREE_ON_RESUME, FROZEN_ON_RESUME

    assert "repa" in FROZEN_ON_RESUME and "repa.encoder_weights" in FREE_ON_RESUME


def test_block_k_of_every_model_on_the_meta_device():
    """`block_count` (read off the keywords, where the config loads) equals the blocks `tap_points` finds in the
    built model, for every registered DiffiT configuration; EDM's SongUNets have none."""
    from diffit.configs import MODEL_CONFIGS
    from diffit.models import create_model, model_family
    from pipeline.train.repa import RepaError, block_count, tap_points

    for name, entry in MODEL_CONFIGS.items():
        family = model_family(name)
        with torch.device("meta"):
            model = create_model(name)
        if family == "songunet":
            with pytest.raises(RepaError, match="has no DiffiT transformer blocks"):
                tap_points(model)
            with pytest.raises(RepaError, match="has no DiffiT transformer blocks"):
                block_count(name, {})
            continue
        points = tap_points(model)
        assert len(points) == block_count(name, {}), name
        kwargs = entry["kwargs"]
        if family == "latent":
            side = kwargs["input_size"] // kwargs["patch_size"]
            assert len(points) == kwargs["depth"] and points[0].block is model.blocks[0]
            assert {(p.hidden_size, p.grid, p.layout) for p in points} == {
                (kwargs["hidden_size"], (side, side), "tokens")
            }
        else:
            # Forward order: encoder stages from full resolution down, then the decoder back up.
            expected = []
            for stage, width in enumerate(model.channels):
                side = model.img_resolution // 2**stage
                expected += [(width, (side, side))] * len(model.encoder[stage].blocks)
            for stage in reversed(range(len(model.channels) - 1)):
                side = model.img_resolution // 2**stage
                expected += [(model.channels[stage], (side, side))] * len(model.encoder[stage].blocks)
            assert [(p.hidden_size, p.grid) for p in points] == expected, name
            assert points[-1].block is model.decoder[-1].blocks[-1]


def test_projector_shapes_for_every_latent_size_and_dinov2_width_allocate_nothing(dinov2_file):
    """DiffiT-S/B/L/XL (/2) with the projector REPA gives each DINOv2 size, built on the meta device: REPA's MLP from
    the width of block k to 2048 to the encoder's width, one projected token per model token."""
    from diffit.models import create_model
    from diffit.repa import REPA_PROJECTOR_DIM, build_projector
    from pipeline.train.repa import tap_points

    widths = {"DiffiT-S/2": 384, "DiffiT-B/2": 768, "DiffiT-L/2": 1024, "DiffiT-XL/2": 1152}
    for name, hidden in widths.items():
        with torch.device("meta"):
            model = create_model(name)
        point = tap_points(model)[min(8, len(model.blocks)) - 1]  # REPA's depth 8 (XL); a smaller model's own
        assert point.hidden_size == hidden and point.grid == (16, 16)  # 32 x 32 latents, /2 patches
        for encoder, z_dim in DINOV2_WIDTHS.items():
            with torch.device("meta"):
                projector = build_projector(point.hidden_size, REPA_PROJECTOR_DIM, z_dim)
                out = projector(torch.empty(2, 16 * 16, hidden))
            assert all(p.is_meta for p in projector.parameters()), (name, encoder)
            shapes = [tuple(m.weight.shape) for m in projector if isinstance(m, torch.nn.Linear)]
            assert shapes == [(2048, hidden), (2048, 2048), (z_dim, 2048)], (name, encoder)
            assert tuple(out.shape) == (2, 256, z_dim)


# ---------------------------------------------------------------------------------------------------------------
# The loss of a step
# ---------------------------------------------------------------------------------------------------------------


def flow_config(dinov2_file: Path, **repa) -> object:
    return config_from_dict(
        tiny_latent_config(
            model={"num_classes": 0},
            diffusion={"type": "flow", "learn_sigma": False, "time_sampling": "logit-normal"},
            sample={"sampler": "euler"},
            repa=repa_section(dinov2_file, **repa),
        )
    )


def test_the_step_trains_the_objective_plus_weight_times_repa_loss_replayed_by_hand(dinov2_file):
    """`forward_backward` on a tiny unconditional flow model under a seed; then by hand: the logit-normal times
    and the noise in the objective's order, the velocity loss, the tokens after block 1 run block by block, the
    DINOv2 patch tokens of the images at 56 px (a 4 x 4 grid: the model's), minus the mean cosine similarity of the
    projected tokens. The returned losses and every gradient (model and projector) equal the replay's."""
    from accelerate import Accelerator

    from diffit.models import create_model
    from diffit.repa import encoder_input
    from pipeline.core.encoders import load_dinov2
    from pipeline.train.loop import forward_backward
    from pipeline.train.objective import Objective
    from pipeline.train.repa import build_repa

    config = flow_config(dinov2_file, weight=0.7)
    torch.manual_seed(0)
    model = create_model("DiffiT-Tiny/2", num_classes=0, learn_sigma=False)
    repa = build_repa(config, model)
    repa.attach()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=generator)
    labels = torch.full((3,), -1)
    training = SimpleNamespace(
        accelerator=Accelerator(cpu=True),
        layout=SimpleNamespace(accumulation=1),
        batches=iter([(x, labels, 0.0, images)]),
        objective=Objective(config, None),
        network=model,
        model=model,
        repa=repa,
    )
    torch.manual_seed(7)
    loss, _, alignment = forward_backward(training)
    trained = [*model.parameters(), *repa.projector.parameters()]
    grads = [p.grad.clone() if p.grad is not None else None for p in trained]
    for p in trained:
        p.grad = None

    torch.manual_seed(7)
    t = torch.sigmoid(torch.randn(3))  # logit-normal(0, 1)
    noise = torch.randn_like(x)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * noise
    objective = ((model(x_t, t) - (noise - x)) ** 2).mean(dim=(1, 2, 3)).mean()
    h_1 = model.blocks[0](model.patch_embed(x_t) + model.pos_embed, model.time_token(t, None))
    encoder = load_dinov2(dinov2_file, img_size=56, pos_embed_rule="timm")
    with torch.no_grad():
        target = encoder.patch_tokens(encoder_input(images, 56))
    assert target.shape == (3, 16, 32)
    by_hand = -F.cosine_similarity(repa.projector(h_1), target, dim=-1).mean()
    (objective + 0.7 * by_hand).backward()

    torch.testing.assert_close(loss, objective.detach())
    torch.testing.assert_close(alignment, by_hand.detach())
    assert -1 < by_hand.item() < 1 and by_hand.item() != 0
    for parameter, grad in zip(trained, grads):
        assert (grad is None) == (parameter.grad is None)
        if grad is not None:
            torch.testing.assert_close(grad, parameter.grad, rtol=1e-5, atol=1e-7)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[-6:])  # the projector is trained
    # The encoder is frozen, in eval mode, and got no gradient.
    assert not repa.encoder.training and all(p.grad is None and not p.requires_grad for p in repa.encoder.parameters())


@pytest.mark.parametrize("kind", ["adm", "edm", "flow", "image-edm", "image-flow"])
def test_block_k_is_aligned_under_every_objective_and_time_conditioning(kind, classifier_dir):
    """For each objective and each time conditioning: the objective's loss is the one it has without REPA (same
    seed), and REPA's loss reaches exactly the blocks up to k and the projector -- not the blocks after k, not the
    output layer. The image U-Net's block k is its k-th ResBlock, a feature map read as tokens."""
    from diffit.conditionings import LATENT_TIME_CONDITIONINGS
    from diffit.layers import TIME_CONDITIONINGS
    from diffit.models import create_model
    from pipeline.train.checks import configured_model_kwargs
    from pipeline.train.objective import Objective
    from pipeline.train.repa import build_repa

    image = kind.startswith("image")
    diffusion = kind.removeprefix("image-")
    sampler = {"adm": "ddim", "edm": "edm-heun", "flow": "euler"}[diffusion]
    sections = dict(
        diffusion={"type": diffusion, "learn_sigma": diffusion == "adm"},
        sample={"sampler": sampler},
        repa=repa_section(classifier_dir, encoder="demo-classifier", depth=2),
    )
    for conditioning in TIME_CONDITIONINGS if image else LATENT_TIME_CONDITIONINGS:  # the latent has no stages
        if image:
            mapping = tiny_image_config(model={"kwargs": {"time_conditioning": conditioning}}, **sections)
        else:
            mapping = tiny_latent_config(model={"kwargs": {"depth": 3, "time_conditioning": conditioning}}, **sections)
        config = config_from_dict(mapping)
        torch.manual_seed(0)
        classes = 0 if image else 10
        model = create_model(config.model.name, **configured_model_kwargs(config), num_classes=classes)
        repa = build_repa(config, model)
        repa.attach()
        objective = Objective(config, model.null_class if classes else None)
        x = torch.randn(2, *((3, 16, 16) if image else (4, 8, 8)))
        labels = torch.tensor([1, 3]) if classes else torch.full((2,), -1)
        images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        torch.manual_seed(1)
        plain = objective(model, x, labels)
        torch.manual_seed(1)
        loss, alignment = repa(objective, model, x, labels, None if image else images)
        assert torch.equal(loss, plain), conditioning
        alignment.backward()

        def reached(module) -> bool:
            return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

        if image:
            assert (repa.point.hidden_size, repa.point.grid) == (64, (8, 8))  # stage 1 of (32, 64) at 16 px
            before, after = [model.encoder[0].blocks[0], model.encoder[1].blocks[0]], [model.decoder[0], model.head]
        else:
            assert (repa.point.hidden_size, repa.point.grid) == (64, (4, 4))
            before, after = list(model.blocks[:2]), [model.blocks[2], model.final_layer]
        assert all(reached(block) for block in before), conditioning
        assert not any(reached(module) for module in after), conditioning
        assert reached(repa.projector)
        repa.tap.remove()


def test_gradient_checkpointing_and_torch_compile_align_the_same_tokens(classifier_dir):
    """Gradient checkpointing runs block k again in the backward pass (the disarmed hook ignores it) and
    torch.compile traces the hook (aot_eager here: no compiler on the test machines): the same losses and gradients
    as the plain model."""
    from diffit.models import create_model
    from pipeline.train.checks import configured_model_kwargs
    from pipeline.train.objective import Objective
    from pipeline.train.repa import build_repa

    config = config_from_dict(
        tiny_latent_config(
            model={"kwargs": {"depth": 3}},
            repa=repa_section(classifier_dir, encoder="demo-classifier", depth=2),
        )
    )
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 3])
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    results = {}
    for variant in ("plain", "checkpointing", "compiled"):
        torch.manual_seed(0)
        model = create_model(config.model.name, **configured_model_kwargs(config), num_classes=10).train()
        repa = build_repa(config, model)
        repa.attach()
        model.gradient_checkpointing = variant == "checkpointing"
        network = torch.compile(model, backend="aot_eager") if variant == "compiled" else model
        torch.manual_seed(1)
        loss, alignment = repa(Objective(config, model.null_class), network, x, labels, images)
        (loss + 0.5 * alignment).backward()
        grads = [p.grad for p in [*model.parameters(), *repa.projector.parameters()] if p.requires_grad]
        results[variant] = (loss.detach(), alignment.detach(), grads)
        assert repa.tap.output is None
    for variant in ("checkpointing", "compiled"):
        torch.testing.assert_close(results[variant][0], results["plain"][0])
        torch.testing.assert_close(results[variant][1], results["plain"][1])
        for ours, theirs in zip(results[variant][2], results["plain"][2]):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_a_block_that_runs_twice_or_not_at_all_is_an_error(classifier_dir):
    from diffit.models import create_model
    from pipeline.train.repa import build_repa

    config = config_from_dict(tiny_latent_config(repa=repa_section(classifier_dir, encoder="demo-classifier")))
    torch.manual_seed(0)
    model = create_model("DiffiT-Tiny/2")
    repa = build_repa(config, model)
    repa.attach()
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.tensor([0])
    with pytest.raises(RuntimeError, match="did not run"), repa.tap.capture():
        repa.tap.tokens()
    with pytest.raises(RuntimeError, match="ran twice"), repa.tap.capture():
        model(x, t, y)
        model(x, t, y)
    model(x, t, y)  # disarmed: ignored (the EMA, samplers, gradient checkpointing's recomputation)
    assert repa.tap.output is None


def test_a_non_finite_repa_loss_stops_the_step_like_a_non_finite_loss():
    from pipeline.train.progress import LogWindow

    window = LogWindow(10)
    window.add(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(-0.5))
    window.add(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(float("nan")))
    step, loss, norm = window.first_non_finite(check_grad_norm=True)
    assert step == 12 and np.isnan(loss) and norm == 2.0
    window = LogWindow(0)
    window.add(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(-0.5))
    window.add(torch.tensor(3.0), torch.tensor(4.0), torch.tensor(-0.25))
    window.seconds = 1.0
    record = window.record(2, 1e-4, 8, 4)
    assert record["loss"] == 2.0 and record["repa_loss"] == -0.375 and record["grad_norm"] == 3.0
    plain = LogWindow(0)
    plain.add(torch.tensor(1.0), torch.tensor(2.0))
    plain.seconds = 1.0
    assert "repa_loss" not in plain.record(1, 1e-4, 4, 4)


def test_a_repa_run_starts_from_the_weights_of_the_same_run_without_it(tmp_path, latent_data, dinov2_file):
    """The encoder is loaded without drawing from the RNG and the projector is drawn after the model: the model's
    initial weights, its EMA and the per-rank training seed are those of the run without REPA; the projector is in
    the optimizer, after the model's parameters."""
    from pipeline.train.setup import set_up

    runs = {}
    for name, sections in (("plain", {}), ("repa", {"repa": repa_section(dinov2_file)})):
        path = write_config(tmp_path / f"{name}.yaml", tiny_latent_config(**sections))
        runs[name] = set_up(TrainOptions(run_dir=tmp_path / name, config_path=path, data_dir=latent_data))
        runs[name].seed_draw = torch.rand(3)
    plain, repa = runs["plain"], runs["repa"]
    for a, b in ((plain.model, repa.model), (plain.ema, repa.ema)):
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert torch.equal(plain.seed_draw, repa.seed_draw) and plain.repa is None
    model_params = [p for p in repa.model.parameters() if p.requires_grad]
    optimized = repa.optimizer.param_groups[0]["params"]
    assert optimized == model_params + list(repa.repa.projector.parameters())


# ---------------------------------------------------------------------------------------------------------------
# The images of latent samples
# ---------------------------------------------------------------------------------------------------------------


def stored_samples(data: Path) -> list[dict]:
    from pipeline.core.shard_members import decode_sample
    from pipeline.core.shards import iter_samples

    manifest = load_manifest(data)
    return [decode_sample(raw) for url in shard_urls(data, manifest) for raw in iter_samples(url)]


def test_targets_follow_the_flipped_latent_view(tmp_path, dinov2_file):
    """A batch of 8 with `data.hflip`: each sample's image is its stored crop, flipped exactly when its latent is the
    stored flipped view; a flipped sample's target equals the encoder's tokens of the flipped image."""
    from diffit.models import create_model
    from diffit.repa import encoder_input
    from pipeline.core.encoders import load_dinov2
    from pipeline.train.data import make_loader
    from pipeline.train.repa import build_repa

    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=1, std=1e-4, images=True)
    x, labels, images = next(iter(make_loader(latent_stream_spec(data, images=True), 0)))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 64, 64) and x.shape == (8, 4, 8, 8)
    samples = stored_samples(data)
    views = []
    for latent, sample in zip(x, samples):
        distances = [
            float((latent - SCALE * torch.from_numpy(v.astype(np.float32))).abs().max()) for v in sample["mean.npy"]
        ]
        views.append(int(np.argmin(distances)))
        assert min(distances) < 1e-2 < max(distances)
    assert set(views) == {0, 1}  # this seed takes both views
    for image, sample, view in zip(images, samples, views):
        expected = sample["png"] if view == 0 else sample["png"][:, ::-1]
        assert torch.equal(image, torch.from_numpy(np.array(expected)).permute(2, 0, 1))

    config = flow_config(dinov2_file)
    torch.manual_seed(0)
    repa = build_repa(config, create_model("DiffiT-Tiny/2", num_classes=0, learn_sigma=False))
    targets = repa.targets(x, images)
    encoder = load_dinov2(dinov2_file, img_size=56, pos_embed_rule="timm")
    for index, (sample, view) in enumerate(zip(samples, views)):
        flipped = torch.from_numpy(np.ascontiguousarray(sample["png"][:, ::-1])).permute(2, 0, 1)[None]
        original = torch.from_numpy(np.array(sample["png"])).permute(2, 0, 1)[None]
        with torch.no_grad():
            of_flipped = encoder.patch_tokens(encoder_input(flipped, 56))[0]
            of_original = encoder.patch_tokens(encoder_input(original, 56))[0]
        torch.testing.assert_close(targets[index], of_flipped if view else of_original)
        assert not torch.allclose(of_flipped, of_original, atol=1e-3)


def test_a_damaged_image_member_is_caught_like_a_damaged_latent(tmp_path):
    """The shard's sha256 no longer matches the manifest's: the same CorruptShardError line as for a latent
    overwritten in place, before any of the shard's samples is used."""
    from pipeline.train.data import infinite, make_loader
    from pipeline.train.shard_reading import CorruptShardError
    from tests.train.test_integrity import overwrite_latents

    messages = {}
    for damage, name in ((lambda shard: damage_first_member(shard, ".png"), "image"), (overwrite_latents, "latent")):
        data = write_latent_dataset(tmp_path / name, num_samples=8, num_shards=2, images=True)
        damage(data / "shard-000001.tar")
        batches = []
        with pytest.raises(CorruptShardError) as caught:
            for batch in infinite(make_loader(latent_stream_spec(data, images=True, batch_size=2, hflip=False), 0)):
                batches.append(batch)
        assert len(batches) == 2  # shard 0's two batches; nothing of shard 1
        messages[name] = re.sub(r"[0-9a-f]{64}", "HASH", str(caught.value).replace(str(data), "DATA"))
    assert messages["image"] == messages["latent"]
    assert "DATA/shard-000001.tar: sha256 HASH does not match the manifest's HASH" in messages["image"]


def test_training_refuses_latents_without_images_and_a_missing_encoder_file_in_one_line(tmp_path, dinov2_file):
    plain = write_latent_dataset(tmp_path / "plain", num_samples=8, num_shards=2)
    config = write_config(tmp_path / "c.yaml", tiny_latent_config(repa=repa_section(dinov2_file)))
    result = cli("train", "--config", config, "--data", plain, "--run-dir", tmp_path / "run")
    lines = error_lines(result.output)
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output[-2000:]
    assert "these latent shards hold no images" in lines[0] and "--keep-images" in lines[0]
    assert str(plain / "manifest.json") in lines[0]

    with_images = write_latent_dataset(tmp_path / "images", num_samples=8, num_shards=2, images=True)
    missing = tmp_path / "models" / "dinov2_vitb14_pretrain.pth"
    config = write_config(tmp_path / "m.yaml", tiny_latent_config(repa=repa_section(missing, encoder="dinov2-vitb14")))
    result = cli("train", "--config", config, "--data", with_images, "--run-dir", tmp_path / "run2")
    lines = error_lines(result.output)
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output[-2000:]
    assert f"repa.encoder_weights: {missing} does not exist: copy dinov2_vitb14_pretrain.pth" in lines[0]
    assert "nothing is downloaded" in lines[0]
    assert not (tmp_path / "run2" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, resume, export
# ---------------------------------------------------------------------------------------------------------------


def train(tmp_path: Path, name: str, config: dict, data: Path, resume: str | None = None) -> Path:
    path = write_config(tmp_path / f"{name}-{config['train']['max_steps']}.yaml", config)
    run_train(TrainOptions(run_dir=tmp_path / name, config_path=path, data_dir=data, resume=resume))
    return tmp_path / name


def test_a_resumed_repa_run_continues_bit_for_bit_and_exports_without_the_projector(tmp_path, latent_data, dinov2_file):
    """4 steps in one go, or 2 then a resume to 4: the same model, EMA, projector, projector EMA, optimizer moments,
    losses and REPA losses. The export of the run has exactly the keys of a run without REPA (strict loading)."""
    import diffit
    from pipeline.train.export import export_checkpoint

    def config(steps: int, **sections) -> dict:
        return tiny_latent_config(
            train={"max_steps": steps}, checkpoint={"every": 2, "keep": 3}, repa=repa_section(dinov2_file), **sections
        )

    whole = train(tmp_path, "whole", config(4), latent_data) / "checkpoints" / "step-0000004"
    train(tmp_path, "resumed", config(2), latent_data)
    resumed = train(tmp_path, "resumed", config(4), latent_data, resume="auto") / "checkpoints" / "step-0000004"
    assert_same_weights(resumed, whole)
    for name in ("model_1.safetensors", "ema_repa_projector.safetensors"):  # the projector and its EMA
        a, b = read_safetensors(whole / name), read_safetensors(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    optimizer = [torch.load(run / "optimizer.bin", weights_only=True)["state"] for run in (whole, resumed)]
    assert len(optimizer[0]) == len(optimizer[1]) > 0
    assert all(torch.equal(optimizer[0][k]["exp_avg"], optimizer[1][k]["exp_avg"]) for k in optimizer[0])
    records = {name: read_metrics(tmp_path / name) for name in ("whole", "resumed")}
    for key in ("loss", "repa_loss"):
        assert [r[key] for r in records["whole"]] == [r[key] for r in records["resumed"]]
    assert len(records["whole"]) == 4 and all(-1 <= r["repa_loss"] <= 1 for r in records["whole"])

    # The projector is trained and its EMA follows it (decay 0.99); the EMA of the model holds no projector key.
    projector = read_safetensors(whole / "model_1.safetensors")
    ema_projector = read_safetensors(whole / "ema_repa_projector.safetensors")
    assert projector.keys() == ema_projector.keys() == {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert projector["4.weight"].shape == (32, 16)  # encoder width 32 <- projector_dim 16
    earlier = read_safetensors(whole.parent / "step-0000002" / "model_1.safetensors")
    earlier_ema = read_safetensors(whole.parent / "step-0000002" / "ema_repa_projector.safetensors")
    for key in projector:
        assert not torch.equal(projector[key], earlier[key]) and not torch.equal(ema_projector[key], earlier_ema[key])
        assert not torch.equal(ema_projector[key], projector[key])
    assert not any(
        "projector" in key or key.startswith(("0.", "2.", "4.")) for key in read_safetensors(whole / "ema.safetensors")
    )

    plain = train(tmp_path, "plain", tiny_latent_config(train={"max_steps": 2}, checkpoint={"every": 2}), latent_data)
    exported = export_checkpoint(tmp_path / "whole", tmp_path / "export")
    reference = export_checkpoint(plain, tmp_path / "export-plain")
    keys = read_safetensors(exported / "model.safetensors").keys()
    assert keys == read_safetensors(reference / "model.safetensors").keys()
    assert not any("projector" in key for key in keys)
    model, extra = diffit.load_pretrained(exported)  # strict
    assert extra["train"]["step"] == 4 and model.num_classes == 10
    ema = read_safetensors(whole / "ema.safetensors")
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)


# ---------------------------------------------------------------------------------------------------------------
# End to end from the command line
# ---------------------------------------------------------------------------------------------------------------


def test_encode_keep_images_then_train_with_the_demo_classifier_from_the_cli(tmp_path, classifier_dir):
    """`diffit-pipe encode --keep-images` (tiny random VAE), then `diffit-pipe train` of DiffiT-Tiny/2 on its 4 x 4
    latents aligned to a random demo classifier (8 x 8 feature map matched to the model's 2 x 2 tokens), then
    `diffit-pipe export` and strict loading."""
    import diffit
    from tests.support.encode_fixtures import TEST_MAX_PIXELS, make_image_tree, save_tiny_vae

    make_image_tree(tmp_path / "src", per_class=4)
    vae = save_tiny_vae(tmp_path / "vae")
    out = tmp_path / "latents"
    options = ["--resolution", "32", "--vae", vae, "--shard-size", "8", "--workers", "0", "--limit", "16"]
    options += ["--max-pixels", TEST_MAX_PIXELS, "--no-progress", "--keep-images"]
    result = cli("encode", tmp_path / "src", out, *options)
    assert result.exit_code == 0, result.output[-2000:]
    assert "png" in load_manifest(out)["members"]
    config = tiny_latent_config(
        model={"input_size": 4},
        train={"max_steps": 2},
        checkpoint={"every": 2},
        repa=repa_section(classifier_dir, encoder="demo-classifier", depth=2),
    )
    result = cli(
        "train", "--config", write_config(tmp_path / "c.yaml", config), "--data", out, "--run-dir", tmp_path / "run"
    )
    assert result.exit_code == 0, result.output[-3000:]
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2] and all("repa_loss" in r and "loss" in r for r in records)
    result = cli("export", tmp_path / "run", tmp_path / "model")
    assert result.exit_code == 0, result.output[-2000:]
    model, extra = diffit.load_pretrained(tmp_path / "model")
    assert extra["train"]["step"] == 2 and model.input_size == 4


def test_the_image_unet_trains_with_a_tiny_dinov2_from_the_cli(tmp_path, dinov2_file):
    """DiffiT-UNet-Tiny by EDM on 16 px images, block 2 (8 x 8 maps of 64 channels) aligned to a tiny random DINOv2
    at 112 px: the batch itself is the image; export without the projector."""
    import diffit

    data = write_image_dataset(tmp_path / "data", num_samples=8, num_shards=2, resolution=16)
    config = tiny_image_config(train={"max_steps": 2}, checkpoint={"every": 2}, repa=repa_section(dinov2_file, depth=2))
    result = cli(
        "train", "--config", write_config(tmp_path / "c.yaml", config), "--data", data, "--run-dir", tmp_path / "run"
    )
    assert result.exit_code == 0, result.output[-3000:]
    records = read_metrics(tmp_path / "run")
    assert len(records) == 2 and all(np.isfinite(r["repa_loss"]) for r in records)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000002"
    assert read_safetensors(checkpoint / "model_1.safetensors")["0.weight"].shape == (16, 64)
    result = cli("export", tmp_path / "run", tmp_path / "model")
    assert result.exit_code == 0, result.output[-2000:]
    model, _ = diffit.load_pretrained(tmp_path / "model")
    assert not any("projector" in key for key in model.state_dict())


@pytest.mark.slow
def test_two_processes_train_with_repa(tmp_path, dinov2_file):
    """Two gloo processes (`accelerate launch`), each its own shards and images: both projectors' gradients are
    synchronised by their own DDP wrapper; checkpoints hold the projector, its EMA and both RNG states."""
    import diffit
    from pipeline.train.export import export_checkpoint

    data = write_latent_dataset(tmp_path / "data", num_samples=16, num_shards=4, images=True)
    config = write_config(
        tmp_path / "c.yaml",
        tiny_latent_config(
            train={"max_steps": 2, "global_batch_size": 8, "per_device_batch_size": 2},
            checkpoint={"every": 2},
            repa=repa_section(dinov2_file),
        ),
    )
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [*launch, "-m", "cli.main", "train", "--config", str(config), "--data", str(data)]
    result = run_train_subprocess([*command, "--run-dir", str(tmp_path / "run")], timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["world_size"] == 2
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000002"
    names = {p.name for p in checkpoint.iterdir()}
    assert {
        "model_1.safetensors",
        "ema_repa_projector.safetensors",
        "random_states_0.pkl",
        "random_states_1.pkl",
    } <= names
    assert [("repa_loss" in r) for r in read_metrics(tmp_path / "run")] == [True, True]
    model, _ = diffit.load_pretrained(export_checkpoint(tmp_path / "run", tmp_path / "model"))
    assert model.num_classes == 10
