"""`DiffiTPipeline` as a diffusers user expects it (diffit/pipeline_diffit.py, diffit/labels.py): DiT's call order
and guidance semantics, diffusers schedulers, torch_dtype / .to(dtype), class names, progress-bar settings.

Tiny models (DiffiT-Tiny/2 on 8x8x4 latents, the /2 random VAE), a few steps each, offline.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from diffit.guidance import GuidanceConfig
from diffit.labels import imagenet_classes
from diffit.sampling import sample
from diffit.sampling_config import to_uint8

pytestmark = pytest.mark.usefixtures("one_thread")


def _pipeline(model_dir, **kwargs):
    from diffit import DiffiTPipeline

    pipe = DiffiTPipeline.from_pretrained(model_dir, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _documented_seeds(seed: int, count: int) -> list[int]:
    """The per-sample seeds `generator=torch.Generator().manual_seed(seed)` stands for (pipeline docstring)."""
    return torch.randint(0, 2**31, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def imagenet_model(tmp_path_factory, tiny_vae):
    """A 1000-class DiffiT-Tiny/2 export whose dataset entry records ImageNet's label map (synset -> index)."""
    from tests.support.eval_fixtures import make_latent_model_dir

    folder = make_latent_model_dir(tmp_path_factory.mktemp("imagenet") / "model", tiny_vae, num_classes=1000)
    config = json.loads((folder / "config.json").read_text())
    label_map = {wnid: index for index, (wnid, _) in enumerate(imagenet_classes())}
    config["dataset"] = {"kind": "latents", "num_classes": 1000, "label_map": label_map}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# DiT's call order and guidance
# ---------------------------------------------------------------------------------------------------------------


def test_positional_arguments_follow_dits_order(latent_model):
    pipe = _pipeline(latent_model)
    positional = pipe([1, 2], 4.0, torch.Generator().manual_seed(0), 3, "latent").images
    keywords = pipe(
        class_labels=[1, 2],
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=3,
        output_type="latent",
    ).images
    assert torch.equal(positional, keywords)
    guided = dataclasses.replace(pipe.sampling_config, steps=3, guidance=GuidanceConfig(scale=4.0))
    assert torch.equal(positional, sample(pipe.transformer, (4, 8, 8), [1, 2], _documented_seeds(0, 2), guided))
    # The old order read the second argument as the step count: 4 steps, unguided, is another result.
    four_steps = pipe([1, 2], 1.0, torch.Generator().manual_seed(0), 4, "latent").images
    assert not torch.equal(positional, four_steps)
    images, *rest = pipe([1, 2], 4.0, torch.Generator().manual_seed(0), 3, "pt", False)
    assert rest == [] and images.shape == (2, 3, 16, 16)


def test_guidance_scale_at_most_one_means_no_guidance(latent_model):
    from diffit import DiffiTPipeline

    loaded = _pipeline(latent_model)
    stored = dataclasses.replace(loaded.sampling_config, guidance=GuidanceConfig(scale=4.6, schedule="power-cosine"))
    pipe = DiffiTPipeline(loaded.transformer, loaded.vae, sampling=stored.to_dict())
    call = dict(seeds=[5, 6], num_inference_steps=3, output_type="latent")
    unguided = sample(pipe.transformer, (4, 8, 8), [2, 3], [5, 6], stored, steps=3, guidance=None)
    for scale in (1.0, 0.5, 0.0):
        assert torch.equal(pipe([2, 3], scale, **call).images, unguided)
    assert not torch.equal(pipe([2, 3], **call).images, unguided)  # None: the stored 4.6 power-cosine


# ---------------------------------------------------------------------------------------------------------------
# diffusers schedulers
# ---------------------------------------------------------------------------------------------------------------


def test_dpm_solver_plus_plus_in_25_steps_is_deterministic_under_a_generator(latent_model):
    from diffusers import DPMSolverMultistepScheduler

    pipe = _pipeline(latent_model)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.algorithm_type == "dpmsolver++" and not pipe.uses_diffit_sampler
    first = pipe([1, 2], 2.0, torch.Generator().manual_seed(0), 25, "latent").images
    again = pipe([1, 2], 2.0, torch.Generator().manual_seed(0), 25, "latent").images
    other = pipe([1, 2], 2.0, torch.Generator().manual_seed(1), 25, "latent").images
    assert torch.equal(first, again) and not torch.equal(first, other)
    # A generator stands for the documented seeds; a sample does not depend on the rest of the batch.
    by_seeds = pipe([1, 2], 2.0, num_inference_steps=25, output_type="latent", seeds=_documented_seeds(0, 2)).images
    alone = pipe([2], 2.0, num_inference_steps=25, output_type="latent", seeds=_documented_seeds(0, 2)[1:]).images
    assert torch.equal(first, by_seeds)
    torch.testing.assert_close(alone[0], first[1], rtol=1e-5, atol=1e-5)  # batch size 1 vs 2 matmuls
    # The scheduler differs from the project's DDPM sampler, which still runs once it is set back.
    from diffit.scheduling_diffit import DiffiTScheduler

    pipe.scheduler = DiffiTScheduler.from_config(pipe.scheduler.config)
    own = pipe([1, 2], 2.0, torch.Generator().manual_seed(0), 25, "latent").images
    config = dataclasses.replace(pipe.sampling_config, steps=25, guidance=GuidanceConfig(scale=2.0))
    assert torch.equal(own, sample(pipe.transformer, (4, 8, 8), [1, 2], _documented_seeds(0, 2), config))
    assert not torch.allclose(own, first)


def test_ddim_scheduler_matches_a_hand_written_ddim_loop_with_dits_guidance(latent_model):
    from diffusers import DDIMScheduler

    pipe = _pipeline(latent_model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # "leading" spacing, final alpha 1
    assert pipe.scheduler.config.clip_sample is False  # latents are not clamped to [-1, 1]
    out = pipe([1, 2], 3.0, num_inference_steps=5, output_type="latent", seeds=[5, 6]).images

    # DDIM (eta 0) on timesteps 800, 600, ..., 0 of the linear 1e-4..0.02 chain (diffusers' float32 arithmetic);
    # guidance on 3 of the 4 eps channels from one doubled batch (labels, then the null class 10); the learned
    # Sigma channels 4..7 dropped.
    alphas_cumprod = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), dim=0)
    x = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(seed)) for seed in (5, 6)])
    labels = torch.tensor([1, 2, 10, 10])
    for t in (800, 600, 400, 200, 0):
        with torch.no_grad():
            output = pipe.transformer(torch.cat([x, x]), torch.full((4,), float(t)), labels)
        cond, uncond = output[:, :4].chunk(2)
        eps = torch.cat([uncond[:, :3] + 3.0 * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)
        alpha, alpha_prev = alphas_cumprod[t], alphas_cumprod[t - 200] if t >= 200 else torch.tensor(1.0)
        x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        x = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-4)
    assert x.abs().max() > 10  # a random network: the x0 estimates are far from the [-1, 1] clip range


def test_a_sigma_space_scheduler_agrees_with_the_projects_ddim(latent_model):
    # Deterministic DDIM is Euler's method on x / sqrt(alpha_bar) over sigma = sqrt(1 / alpha_bar - 1), so diffusers'
    # EulerDiscreteScheduler (initial noise x sigma_max = 157.4, inputs scaled by 1 / sqrt(sigma^2 + 1), float
    # timesteps) must reproduce the project's DDIM: the grids differ only by ADM rounding the respaced timesteps
    # linspace(0, 999, N) to integers.
    from diffusers import EulerDiscreteScheduler

    pipe = _pipeline(latent_model)
    own = pipe([1, 2], 2.0, None, 25, "latent", seeds=[3, 4], sampler="ddim", eta=0.0).images
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    euler = pipe([1, 2], 2.0, None, 25, "latent", seeds=[3, 4]).images
    assert pipe.scheduler.init_noise_sigma > 157 and own.abs().max() > 100
    torch.testing.assert_close(euler, own, rtol=0, atol=1e-4 * own.abs().max().item())


def test_stochastic_schedulers_draw_each_samples_noise_from_its_seed(latent_model):
    from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler

    pipe = _pipeline(latent_model)
    for scheduler_class in (DDPMScheduler, EulerAncestralDiscreteScheduler):
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
        torch.manual_seed(0)
        first = pipe([3, 4], num_inference_steps=4, output_type="latent", seeds=[7, 8]).images
        torch.manual_seed(1)  # the global generator plays no part
        again = pipe([3, 4], num_inference_steps=4, output_type="latent", seeds=[7, 8]).images
        other = pipe([3, 4], num_inference_steps=4, output_type="latent", seeds=[7, 9]).images
        assert torch.equal(first, again)
        assert torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])


def test_schedulers_that_do_not_fit_are_refused(latent_model, image_model):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    pipe = _pipeline(latent_model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, beta_schedule="scaled_linear")
    with pytest.raises(ValueError, match="another noise schedule than the model's training chain"):
        pipe([1], num_inference_steps=2)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    with pytest.raises(ValueError, match="predicts 'v_prediction'; DiffiT predicts eps"):
        pipe([1], num_inference_steps=2)
    pipe.scheduler = DPMSolverMultistepScheduler()
    with pytest.raises(ValueError, match="\\['S_churn', 'sampler'\\] configure the project's sampler"):
        pipe([1], num_inference_steps=2, sampler="ddim", S_churn=1.0)
    image = _pipeline(image_model)
    image.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="image-space EDM model.*pipe.scheduler = DiffiTScheduler\\(\\)"):
        image(batch_size=1, num_inference_steps=2)


def test_a_saved_pipeline_keeps_its_diffusers_scheduler(tmp_path, latent_model):
    from diffusers import UniPCMultistepScheduler

    pipe = _pipeline(latent_model)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    again = _pipeline(tmp_path / "pipe")
    assert isinstance(again.scheduler, UniPCMultistepScheduler)
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}  # noqa: E731
    assert public(again.scheduler.config) == public(pipe.scheduler.config)
    call = dict(num_inference_steps=6, output_type="latent", seeds=[1, 2])
    assert torch.equal(again([0, 9], 2.0, **call).images, pipe([0, 9], 2.0, **call).images)
    given = _pipeline(latent_model, scheduler=UniPCMultistepScheduler.from_config(pipe.scheduler.config))
    assert torch.equal(given([0, 9], 2.0, **call).images, pipe([0, 9], 2.0, **call).images)


def test_the_constructor_takes_dits_components_in_dits_order(latent_model):
    from diffit import DiffiTPipeline

    pipe = _pipeline(latent_model)
    with pytest.raises(
        TypeError, match="scheduler must be a diffusers scheduler or None, got dict.*sampling=\\.\\.\\."
    ):
        DiffiTPipeline(pipe.transformer, pipe.vae, pipe.sampling_config.to_dict())
    rebuilt = DiffiTPipeline(**pipe.components, id2label={3: "three, drei"})
    assert rebuilt.get_label_ids(["drei"]) == [3] and rebuilt.labels == {"drei": 3, "three": 3}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_stochastic_diffusers_scheduler_on_cuda_matches_cpu(latent_model):
    from diffusers import DDPMScheduler

    pipe = _pipeline(latent_model)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    call = dict(num_inference_steps=10, output_type="latent", seeds=[3, 4])
    on_cpu = pipe([1, 2], 2.0, **call).images
    on_gpu = pipe.to("cuda")([1, 2], 2.0, **call).images
    assert on_gpu.device.type == "cuda"
    scale = on_cpu.abs().max().item()  # a random network: latents in the hundreds
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-3 * scale)  # CPU generators: same noise


# ---------------------------------------------------------------------------------------------------------------
# dtypes and loading keywords
# ---------------------------------------------------------------------------------------------------------------


def test_torch_dtype_bfloat16_end_to_end_on_cpu(latent_model):
    pipe = _pipeline(latent_model, torch_dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    half = pipe([1, 2], 2.0, num_inference_steps=3, output_type="latent", seeds=[3, 4]).images
    full = _pipeline(latent_model)([1, 2], 2.0, num_inference_steps=3, output_type="latent", seeds=[3, 4]).images
    assert half.dtype == torch.float32
    # The same computation in bfloat16 (8 mantissa bits: ~0.4 % per rounding), not another sample.
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05 * full.abs().max().item())
    pil = pipe([1, 2], 2.0, num_inference_steps=3, seeds=[3, 4]).images
    assert [image.size for image in pil] == [(16, 16)] * 2 and pil[0].mode == "RGB"
    mixed = _pipeline(latent_model, torch_dtype={"transformer": torch.bfloat16, "default": torch.float32})
    assert (mixed.transformer.dtype, mixed.vae.dtype) == (torch.bfloat16, torch.float32)


def test_to_bfloat16_then_call_with_either_sampler(latent_model):
    from diffusers import DPMSolverMultistepScheduler

    pipe = _pipeline(latent_model)
    reference = pipe([5], num_inference_steps=3, output_type="latent", seeds=[1]).images
    pipe.to(torch.bfloat16)
    assert pipe.dtype == torch.bfloat16
    own = pipe([5], num_inference_steps=3, output_type="latent", seeds=[1]).images
    torch.testing.assert_close(own, reference, rtol=0.05, atol=0.05 * reference.abs().max().item())
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    images = pipe([5], 3.0, num_inference_steps=4, output_type="np", seeds=[1]).images
    assert images.dtype == np.float32 and images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_from_pretrained_accepts_harmless_diffusers_keywords_and_refuses_the_rest(latent_model):
    pipe = _pipeline(latent_model, use_safetensors=True, variant=None, low_cpu_mem_usage=True)
    assert pipe.transformer.dtype == torch.float32
    with pytest.raises(ValueError, match="use_safetensors=False is not supported \\(.*safetensors weights only"):
        _pipeline(latent_model, use_safetensors=False)
    with pytest.raises(ValueError, match="variant='fp16' is not supported"):
        _pipeline(latent_model, variant="fp16")
    with pytest.raises(ValueError, match="does not take device_map.*pipe.to\\('cuda'\\)"):
        _pipeline(latent_model, device_map="balanced")
    with pytest.raises(TypeError, match="unsupported keyword custom_pipeline='x'"):
        _pipeline(latent_model, custom_pipeline="x")
    with pytest.raises(TypeError, match="torch_dtype must be a floating-point torch.dtype"):
        _pipeline(latent_model, torch_dtype="bf16")


# ---------------------------------------------------------------------------------------------------------------
# Class names
# ---------------------------------------------------------------------------------------------------------------


def test_the_shipped_imagenet_classes_are_the_standard_list():
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    classes = imagenet_classes()
    wnids = [wnid for wnid, _ in classes]
    assert len(classes) == 1000 and wnids == sorted(set(wnids))
    assert classes[0] == ("n01440764", "tench, Tinca tinca") and classes[207] == ("n02099601", "golden retriever")
    assert classes[999] == ("n15075141", "toilet tissue, toilet paper, bathroom tissue")
    # torchvision's names are the first synonym, but for the two it renames to tell duplicates apart.
    differ = [i for i, (_, names) in enumerate(classes) if names.split(", ")[0] != _IMAGENET_CATEGORIES[i]]
    assert differ == [134, 639]


def test_imagenet_label_names(tmp_path, imagenet_model):
    pipe = _pipeline(imagenet_model)
    assert pipe.get_label_ids(["golden retriever"]) == [207]
    assert pipe.get_label_ids(["white shark", "umbrella"]) == [2, 879]  # DiT's documentation example
    assert pipe.get_label_ids("tench") == [0]
    assert pipe.id2label[207] == "golden retriever" and len(pipe.id2label) == 1000
    assert pipe.id2label[2] == "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias"
    assert pipe.labels["Carcharodon carcharias"] == 2 and list(pipe.labels) == sorted(pipe.labels)
    with pytest.raises(ValueError, match="'golden retreiver' is not a class name.*closest names: \\['golden ret"):
        pipe.get_label_ids(["golden retreiver"])
    with pytest.raises(ValueError, match="'crane' names several classes \\[134, 517\\]"):
        pipe.get_label_ids(["crane"])
    pipe.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["id2label"]["207"] == "golden retriever"
    assert _pipeline(tmp_path / "pipe").id2label == pipe.id2label


def test_other_label_maps_and_models_without_names(tmp_path, latent_model):
    moved = shutil.copytree(latent_model, tmp_path / "shapes")
    config = json.loads((moved / "config.json").read_text())
    shapes = ["circle", "square", "triangle", "star", "ring", "cross", "heart", "moon", "arrow", "n01440764"]
    label_map = {name: index for index, name in enumerate(shapes)}
    (moved / "config.json").write_text(json.dumps({**config, "dataset": {"label_map": label_map}}))
    pipe = _pipeline(moved)
    assert pipe.get_label_ids(["square", "star"]) == [1, 3]
    assert pipe.id2label[9] == "tench, Tinca tinca"  # an ImageNet synset folder gets its English names
    assert _pipeline(latent_model, id2label={0: "zero", 1: "one"}).get_label_ids("one") == [1]

    (moved / "config.json").write_text(json.dumps({**config, "dataset": {"label_map": {"a": 0, "b": 1}}}))
    with pytest.raises(ValueError, match="config.json: dataset.label_map must hold exactly the class indices 0..9"):
        _pipeline(moved)
    with pytest.raises(ValueError, match="no class names.*id2label="):
        _pipeline(latent_model).get_label_ids("circle")


# ---------------------------------------------------------------------------------------------------------------
# Outputs and progress bars
# ---------------------------------------------------------------------------------------------------------------


def test_pil_images_use_the_configured_pixel_quantization(latent_model):
    pipe = _pipeline(latent_model)
    call = dict(num_inference_steps=3, seeds=[1, 2])
    decoded = pipe([1, 2], output_type="pt", **call).images * 2 - 1  # back to the decoder's [-1, 1] range
    for pixels in ("round", "truncate"):
        pil = pipe([1, 2], pixels=pixels, **call).images
        expected = to_uint8(decoded, pixels).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(np.stack([np.asarray(image) for image in pil]), expected)


def test_progress_bar_configuration_reaches_tqdm(latent_model, capsys):
    from diffusers import DDIMScheduler

    pipe = _pipeline(latent_model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(desc="diffit-x", disable=False, ncols=60)
    pipe([1], num_inference_steps=3, output_type="latent", seeds=[0])
    bars = capsys.readouterr().err
    assert "diffit-x: 100%" in bars and "3/3" in bars
    pipe.set_progress_bar_config(disable=True)
    pipe([1], num_inference_steps=3, output_type="latent", seeds=[0])
    assert capsys.readouterr().err == ""


def test_progress_bar_configuration_reaches_the_own_samplers_bar(latent_model, capsys):
    pipe = _pipeline(latent_model)  # the default scheduler: diffit.sampling.sample
    pipe.set_progress_bar_config(desc="own-sampler", disable=False, ncols=70)
    pipe([1], num_inference_steps=3, output_type="latent", seeds=[0])
    bars = capsys.readouterr().err
    assert "own-sampler: 100%" in bars and "3/3" in bars
    assert max(len(line) for line in bars.replace("\r", "\n").splitlines()) <= 70
    pipe.set_progress_bar_config(disable=True)
    pipe([1], num_inference_steps=3, output_type="latent", seeds=[0])
    assert capsys.readouterr().err == ""


def test_a_folder_saved_before_the_scheduler_moved_module_still_loads(latent_model, tmp_path):
    """`DiffiTScheduler` lives in `diffit.scheduling_diffit` (diffusers' split of a pipeline); a model_index.json
    written when it lived in `diffit.pipeline_diffit` names that module, and still loads with the same samples."""
    import json

    from diffit import DiffiTPipeline
    from diffit.scheduling_diffit import DiffiTScheduler

    pipe = _pipeline(latent_model)
    pipe.save_pretrained(tmp_path / "saved")
    index_path = tmp_path / "saved" / "model_index.json"
    index = json.loads(index_path.read_text())
    assert index["scheduler"][1] == "DiffiTScheduler"
    index["scheduler"] = ["diffit.pipeline_diffit", "DiffiTScheduler"]
    index_path.write_text(json.dumps(index))
    loaded = DiffiTPipeline.from_pretrained(tmp_path / "saved")
    assert isinstance(loaded.scheduler, DiffiTScheduler)
    call = dict(num_inference_steps=3, output_type="latent", seeds=[1, 2])
    assert torch.equal(loaded([1, 2], 2.0, **call).images, pipe([1, 2], 2.0, **call).images)
    index["scheduler"] = ["diffit.elsewhere", "DiffiTScheduler"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="unknown scheduler diffit.elsewhere.DiffiTScheduler"):
        DiffiTPipeline.from_pretrained(tmp_path / "saved")
