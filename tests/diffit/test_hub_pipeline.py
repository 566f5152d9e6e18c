"""Hub conventions of the DiffiT models (diffit/hub.py) and the diffusers `DiffiTPipeline` (diffit/pipeline_hub.py).

Everything runs offline (HF_HUB_OFFLINE=1, set in conftest): local folders, the tiny random VAE of the evaluate
tests, and hub ids only to check the error they give without network.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffit
from diffit.guidance import GuidanceConfig
from diffit.hub import DiffiTModelHubMixin, PretrainedNotFoundError
from diffit.sampling import sample

REPO = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pipeline(model_dir, **kwargs):
    from diffit import DiffiTPipeline

    pipe = DiffiTPipeline.from_pretrained(model_dir, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def _documented_seeds(seed: int, count: int) -> list[int]:
    """The per-sample seeds `generator=torch.Generator().manual_seed(seed)` stands for (pipeline docstring)."""
    return torch.randint(0, 2**31, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---------------------------------------------------------------------------------------------------------------
# Models: save_pretrained / from_pretrained / push_to_hub
# ---------------------------------------------------------------------------------------------------------------


def test_import_diffit_imports_neither_diffusers_nor_the_hub_client():
    code = (
        "import diffit, sys; "
        "assert 'diffusers' not in sys.modules, 'diffusers imported'; "
        "assert 'huggingface_hub' not in sys.modules, 'huggingface_hub imported'; "
        "diffit.create_model('DiffiT-Tiny/2'); "
        "assert 'diffusers' not in sys.modules, 'diffusers imported by a model class'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.mark.parametrize("name", ["DiffiT-Tiny/2", "DiffiT-UNet-Tiny"])
def test_model_save_pretrained_writes_an_export_that_rebuilds_the_model(tmp_path, name):
    torch.manual_seed(0)
    model = diffit.create_model(name)
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config == {"model": model.model_config}  # the export schema, nothing from the mixin
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "library_name: diffit" in card and f"# {name}" in card and "DiffiTPipeline.from_pretrained" in card

    reloaded = type(model).from_pretrained(tmp_path / "saved")
    through_mixin = DiffiTModelHubMixin.from_pretrained(str(tmp_path / "saved"))
    loaded, _ = diffit.load_pretrained(tmp_path / "saved")
    for other in (reloaded, through_mixin, loaded):
        assert type(other) is type(model) and not other.training and _same_weights(other, model)
    x = torch.randn(2, model.in_channels, model.input_size, model.input_size)
    labels = torch.tensor([1, 2]) if model.num_classes else None
    with torch.no_grad():
        assert torch.equal(
            reloaded(x, torch.tensor([3.0, 700.0]), labels), model.eval()(x, torch.tensor([3.0, 700.0]), labels)
        )


def test_an_export_loads_with_from_pretrained_and_saves_back_unchanged(tmp_path, latent_model):
    from diffit.latent import LatentDiffiT

    model = LatentDiffiT.from_pretrained(latent_model)
    loaded, config = diffit.load_pretrained(latent_model)
    assert _same_weights(model, loaded)
    assert model.pretrained_extra == {key: value for key, value in config.items() if key != "model"}
    assert set(model.pretrained_extra) == {"diffusion", "vae"} and loaded.pretrained_extra == model.pretrained_extra
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == config
    assert _same_weights(LatentDiffiT.from_pretrained(tmp_path / "again"), model)


def test_from_pretrained_checks_the_class_and_its_arguments(latent_model, image_model):
    from diffit.unet import DiffiTUNet

    with pytest.raises(TypeError, match="holds a DiffiT-Tiny/2 \\(LatentDiffiT\\), not a DiffiTUNet"):
        DiffiTUNet.from_pretrained(latent_model)
    with pytest.raises(TypeError, match="takes no model arguments"):
        DiffiTUNet.from_pretrained(image_model, depth=3)
    assert isinstance(DiffiTModelHubMixin.from_pretrained(image_model), DiffiTUNet)


def test_hub_ids_fail_offline_with_a_clear_message(tmp_path):
    from diffit.latent import LatentDiffiT

    with pytest.raises(PretrainedNotFoundError, match="HF_HUB_OFFLINE=1.*not in the local cache.*diffit-pipe export"):
        LatentDiffiT.from_pretrained("nobody-here/diffit-xl-2")
    with pytest.raises(PretrainedNotFoundError, match="HF_HUB_OFFLINE=1"):
        _pipeline("nobody-here/diffit-xl-2")
    with pytest.raises(PretrainedNotFoundError, match="no such directory"):
        LatentDiffiT.from_pretrained(str(tmp_path / "missing" / "model"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(PretrainedNotFoundError, match="is a file"):
        LatentDiffiT.from_pretrained(tmp_path / "file")


def test_push_to_hub_uploads_the_save_pretrained_folder(tmp_path, latent_model, monkeypatch):
    # The two network calls of the mixin's push_to_hub are replaced by a local "hub" that keeps the uploaded
    # folder; everything before them (save_pretrained into a temporary folder, the model card) runs for real.
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    from diffit.latent import LatentDiffiT

    uploads = {}

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads[repo_id] = shutil.copytree(folder_path, tmp_path / "hub" / repo_id)
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = LatentDiffiT.from_pretrained(latent_model)
    model.push_to_hub("someone/diffit-tiny")
    uploaded = Path(uploads["someone/diffit-tiny"])
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((uploaded / "config.json").read_text()) == json.loads((latent_model / "config.json").read_text())
    assert 'from_pretrained("someone/diffit-tiny")' in (uploaded / "README.md").read_text()
    assert _same_weights(LatentDiffiT.from_pretrained(uploaded), model)


# ---------------------------------------------------------------------------------------------------------------
# DiffiTPipeline
# ---------------------------------------------------------------------------------------------------------------

PIPELINE_CASES = [
    dict(sampler="ddpm"),
    dict(sampler="ddim", eta=0.5),
    dict(sampler="edm-heun", S_churn=20.0, S_min=0.1, S_max=20.0, S_noise=1.003),
    dict(sampler="ddpm", guidance=GuidanceConfig(scale=4.6, schedule="power-cosine")),
]


@pytest.mark.parametrize("settings", PIPELINE_CASES, ids=["ddpm", "ddim", "edm-heun", "ddpm-power-cosine"])
def test_pipeline_samples_are_those_of_diffit_sampling_bit_for_bit(latent_model, settings):
    pipe = _pipeline(latent_model)
    generator = torch.Generator().manual_seed(0)
    out = pipe(class_labels=[1, 7], num_inference_steps=5, generator=generator, output_type="latent", **settings)
    config = dataclasses.replace(pipe.sampling_config, steps=5, **settings)
    expected = sample(pipe.transformer, (4, 8, 8), [1, 7], _documented_seeds(0, 2), config)
    assert torch.equal(out.images, expected)
    pixels = pipe(
        class_labels=[1, 7], num_inference_steps=5, seeds=_documented_seeds(0, 2), output_type="pt", **settings
    )
    with torch.no_grad():
        decoded = pipe.vae.decode(expected / 0.18215).sample
    assert torch.equal(pixels.images, (decoded / 2 + 0.5).clamp(0, 1))
    assert pixels.images.shape == (2, 3, 16, 16)


def test_guidance_scale_keeps_the_stored_three_channel_power_cosine_schedule(latent_model):
    from diffit import DiffiTPipeline

    loaded = _pipeline(latent_model)
    paper = dataclasses.replace(loaded.sampling_config, guidance=GuidanceConfig(scale=4.6, schedule="power-cosine"))
    pipe = DiffiTPipeline(loaded.transformer, loaded.vae, sampling=paper.to_dict())
    out = pipe(class_labels=[2, 3], num_inference_steps=4, guidance_scale=3.0, seeds=[5, 6], output_type="latent")
    guidance = GuidanceConfig(scale=3.0, schedule="power-cosine", power=4.0, channels=3)
    expected = sample(pipe.transformer, (4, 8, 8), [2, 3], [5, 6], paper, steps=4, guidance=guidance)
    assert torch.equal(out.images, expected)
    constant = sample(pipe.transformer, (4, 8, 8), [2, 3], [5, 6], paper, steps=4, guidance=GuidanceConfig(scale=3.0))
    assert not torch.equal(out.images, constant)


def test_a_call_takes_sampling_settings_by_their_one_name(latent_model):
    """`pipe(..., guidance_schedule=..., guidance_power=..., guidance_channels="all")` as `evaluate` and studies
    spell them: the stored settings with those replaced (`SamplingConfig.with_settings`), bit for bit."""
    pipe = _pipeline(latent_model)
    settings = dict(guidance_schedule="power-cosine", guidance_power=2.0, guidance_channels="all")
    out = pipe(
        class_labels=[2, 3], guidance_scale=3.0, num_inference_steps=4, seeds=[5, 6], output_type="latent", **settings
    )
    guidance = GuidanceConfig(scale=3.0, schedule="power-cosine", power=2.0, channels=None)
    expected = sample(pipe.transformer, (4, 8, 8), [2, 3], [5, 6], pipe.sampling_config, steps=4, guidance=guidance)
    assert torch.equal(out.images, expected)
    with pytest.raises(ValueError, match="guidance_channels must be a positive integer or 'all', got 'some'"):
        pipe(class_labels=[2], num_inference_steps=2, guidance_channels="some")


def test_pipeline_seeds_generators_and_output_types(latent_model):
    pipe = _pipeline(latent_model)
    call = dict(class_labels=[4, 5, 6], num_inference_steps=3, sampler="ddim")
    by_seeds = pipe(**call, seeds=[11, 12, 13], output_type="latent").images
    assert torch.equal(
        by_seeds,
        sample(pipe.transformer, (4, 8, 8), [4, 5, 6], [11, 12, 13], pipe.sampling_config, steps=3, sampler="ddim"),
    )
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    per_image = pipe(**call, generator=generators, output_type="latent").images
    seeds = [int(torch.randint(0, 2**31, (1,), generator=torch.Generator().manual_seed(s)).item()) for s in (1, 2, 3)]
    assert torch.equal(per_image, pipe(**call, seeds=seeds, output_type="latent").images)
    torch.manual_seed(21)
    global_rng = pipe(**call, output_type="latent").images
    torch.manual_seed(21)
    assert torch.equal(
        global_rng, pipe(**call, seeds=torch.randint(0, 2**31, (3,)).tolist(), output_type="latent").images
    )

    pt = pipe(**call, seeds=[11, 12, 13], output_type="pt").images
    np_images = pipe(**call, seeds=[11, 12, 13], output_type="np").images
    pil = pipe(**call, seeds=[11, 12, 13]).images
    assert isinstance(np_images, np.ndarray) and np_images.dtype == np.float32 and np_images.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(np_images, pt.permute(0, 2, 3, 1).numpy())
    assert [image.size for image in pil] == [(16, 16)] * 3 and pil[0].mode == "RGB"
    # PIL images are the uint8 images evaluate stores: floor(127.5 x + 128) of the [-1, 1] decoder output.
    with torch.no_grad():
        decoded = pipe.vae.decode(by_seeds / 0.18215).sample
    expected_uint8 = (decoded * 127.5 + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.stack([np.asarray(image) for image in pil]), expected_uint8)
    assert not np.array_equal(expected_uint8[0], expected_uint8[1])
    images_tuple = pipe(**call, seeds=[11, 12, 13], output_type="latent", return_dict=False)
    assert isinstance(images_tuple, tuple) and torch.equal(images_tuple[0], by_seeds)


PIPELINE_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "transformer/README.md",
    "transformer/config.json",
    "transformer/model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


def test_pipeline_save_pretrained_round_trip(tmp_path, latent_model):
    from diffit import DiffiTPipeline

    loaded = _pipeline(latent_model)
    settings = dataclasses.replace(loaded.sampling_config, sampler="ddim", steps=7, eta=0.25)
    pipe = DiffiTPipeline(loaded.transformer, loaded.vae, sampling=settings.to_dict())
    pipe.save_pretrained(tmp_path / "pipe")
    names = sorted(str(p.relative_to(tmp_path / "pipe")) for p in (tmp_path / "pipe").rglob("*") if p.is_file())
    assert names == PIPELINE_FILES
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "DiffiTPipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["transformer"] == ["diffit.latent", "LatentDiffiT"] and index["scaling_factor"] == 0.18215
    again = _pipeline(tmp_path / "pipe")
    assert again.sampling_config == settings
    assert _same_weights(again.transformer, pipe.transformer) and _same_weights(again.vae, pipe.vae)
    first = pipe(class_labels=[0, 9], seeds=[1, 2], output_type="pt").images
    assert torch.equal(again(class_labels=[0, 9], seeds=[1, 2], output_type="pt").images, first)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """The Hub's two network calls (HfApi.create_repo, HfApi.upload_folder) replaced by a local "hub":
    `create_repo` answers with the repository's URL (a bare name in the namespace "someone", the token owner's)
    and `upload_folder` copies the folder to `root/<repo_id>`; both record their arguments, and the client's token,
    in `calls`. Anything else that reached for the Hub would fail (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    hub = SimpleNamespace(root=tmp_path / "hub", calls=[])

    def create_repo(api, repo_id, **kwargs):
        hub.calls.append(("create_repo", repo_id, {"token": api.token, **kwargs}))
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'someone/' + repo_id}")

    def upload_folder(api, *, repo_id, folder_path, path_in_repo=None, **kwargs):
        hub.calls.append(("upload_folder", repo_id, {"token": api.token, "path_in_repo": path_in_repo, **kwargs}))
        shutil.copytree(folder_path, hub.root / repo_id / (path_in_repo or ""), dirs_exist_ok=True)
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return hub


def _same_pipeline(folder: Path, pipe) -> None:
    """`DiffiTPipeline.from_pretrained(folder)` is `pipe`: components, settings and samples, bit for bit."""
    again = _pipeline(folder)
    assert again.sampling_config == pipe.sampling_config and again.config.scaling_factor == pipe.config.scaling_factor
    assert _same_weights(again.transformer, pipe.transformer) and _same_weights(again.vae, pipe.vae)
    assert again.transformer.pretrained_extra == pipe.transformer.pretrained_extra
    call = dict(class_labels=[0, 9], num_inference_steps=4, output_type="pt")
    expected = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(again(**call, generator=torch.Generator().manual_seed(0)).images, expected)


def _check_card(readme: Path, repo_id: str, pipe) -> None:
    """The pipeline's model card: library diffit (not diffusers, whose DiffusionPipeline cannot load it), usage."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(readme)
    assert card.data.library_name == "diffit" and card.data.tags == ["diffit", "diffusion", "image-generation"]
    assert f'pipe = DiffiTPipeline.from_pretrained("{repo_id}")\n' in card.text
    assert f"({pipe.sampling_config.sampler} sampler, {pipe.sampling_config.steps} steps)" in card.text
    assert card.text.startswith("\n# DiffiT-Tiny/2 pipeline\n")


def test_pipeline_save_pretrained_with_push_to_hub_uploads_the_saved_folder(tmp_path, latent_model, local_hub):
    pipe = _pipeline(latent_model)
    pipe.save_pretrained(tmp_path / "pipe", push_to_hub=True, repo_id="someone/diffit-pipe", token="hf_x", private=True)
    pipe.save_pretrained(tmp_path / "diffit-tiny", push_to_hub=True, commit_message="tiny")  # repo: the folder name
    upload = {"path_in_repo": None, "create_pr": False}
    assert local_hub.calls == [
        ("create_repo", "someone/diffit-pipe", {"token": "hf_x", "private": True, "exist_ok": True}),
        (
            "upload_folder",
            "someone/diffit-pipe",
            {"token": "hf_x", "commit_message": "Upload DiffiTPipeline", **upload},
        ),
        ("create_repo", "diffit-tiny", {"token": None, "private": None, "exist_ok": True}),
        ("upload_folder", "someone/diffit-tiny", {"token": None, "commit_message": "tiny", **upload}),
    ]
    uploaded = local_hub.root / "someone" / "diffit-pipe"
    assert _files(uploaded) == _files(tmp_path / "pipe") == sorted(["README.md", *PIPELINE_FILES])
    assert all((uploaded / name).read_bytes() == (tmp_path / "pipe" / name).read_bytes() for name in _files(uploaded))
    _check_card(uploaded / "README.md", "someone/diffit-pipe", pipe)
    _same_pipeline(uploaded, pipe)
    assert _files(local_hub.root / "someone" / "diffit-tiny") == sorted(["README.md", *PIPELINE_FILES])
    _check_card(local_hub.root / "someone" / "diffit-tiny" / "README.md", "someone/diffit-tiny", pipe)


def test_diffusers_push_to_hub_uploads_the_pipeline_with_its_model_card(latent_model, local_hub):
    pipe = _pipeline(latent_model)
    url = pipe.push_to_hub("someone/diffit-pipe")  # diffusers' signature: save into a temporary folder, upload
    assert url == "https://huggingface.co/someone/diffit-pipe/commit/0"
    assert local_hub.calls == [
        ("create_repo", "someone/diffit-pipe", {"token": None, "private": None, "exist_ok": True}),
        (
            "upload_folder",
            "someone/diffit-pipe",
            {"token": None, "path_in_repo": None, "commit_message": "Upload DiffiTPipeline", "create_pr": False},
        ),
    ]
    uploaded = local_hub.root / "someone" / "diffit-pipe"
    assert _files(uploaded) == sorted(["README.md", *PIPELINE_FILES])
    _check_card(uploaded / "README.md", "someone/diffit-pipe", pipe)
    _same_pipeline(uploaded, pipe)

    # Into a folder of the repository (no card there: the repository's README.md is its root's), as a PR.
    pipe.push_to_hub("someone/diffit-pipe", subfolder="pipelines/tiny", create_pr=True, token="hf_x")
    assert local_hub.calls[2:] == [
        ("create_repo", "someone/diffit-pipe", {"token": "hf_x", "private": None, "exist_ok": True}),
        (
            "upload_folder",
            "someone/diffit-pipe",
            {
                "token": "hf_x",
                "path_in_repo": "pipelines/tiny",
                "commit_message": "Upload DiffiTPipeline",
                "create_pr": True,
            },
        ),
    ]
    assert _files(uploaded / "pipelines" / "tiny") == PIPELINE_FILES
    _same_pipeline(uploaded / "pipelines" / "tiny", pipe)
    with pytest.raises(ValueError, match="safetensors weights only"):
        pipe.push_to_hub("someone/diffit-pipe", safe_serialization=False)
    assert len(local_hub.calls) == 4  # refused before any call to the Hub


def test_image_space_pipeline_runs_edms_stochastic_sampler(image_model):
    pipe = _pipeline(image_model)
    assert pipe.vae is None and pipe.sampling_config.kind == "edm" and pipe.sampling_config.steps == 18
    churn = dict(S_churn=30.0, S_min=0.05, S_max=50.0, S_noise=1.003)
    out = pipe(
        batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(3), output_type="latent", **churn
    )
    expected = sample(
        pipe.transformer, (3, 16, 16), None, _documented_seeds(3, 2), pipe.sampling_config, steps=6, **churn
    )
    assert torch.equal(out.images, expected)
    deterministic = pipe(batch_size=2, num_inference_steps=6, seeds=_documented_seeds(3, 2), output_type="latent")
    assert not torch.equal(deterministic.images, expected)
    pt = pipe(batch_size=2, num_inference_steps=6, seeds=_documented_seeds(3, 2), output_type="pt", **churn).images
    assert torch.equal(pt, (expected / 2 + 0.5).clamp(0, 1))


def test_pipeline_vae_comes_from_the_export_and_must_be_the_encoding_one(tmp_path, latent_model, tiny_vae):
    from diffit.pipeline_loading import vae_path_hash

    config = json.loads((latent_model / "config.json").read_text())
    assert config["vae"]["path_hash"] == vae_path_hash(Path(tiny_vae))  # the hash `encode` records
    changed_vae = shutil.copytree(tiny_vae, tmp_path / "vae")
    vae_config = json.loads((changed_vae / "config.json").read_text())
    (changed_vae / "config.json").write_text(json.dumps({**vae_config, "force_upcast": not vae_config["force_upcast"]}))
    moved = shutil.copytree(latent_model, tmp_path / "model")
    (moved / "config.json").write_text(json.dumps({**config, "vae": {**config["vae"], "path": str(changed_vae)}}))
    with pytest.raises(ValueError, match="model/VAE mismatch"):
        _pipeline(moved)
    assert _pipeline(moved, vae=str(tiny_vae)).vae.config.force_upcast == vae_config["force_upcast"]
    (moved / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "vae"}))
    with pytest.raises(ValueError, match="needs a 'vae' entry; pass vae=PATH"):
        _pipeline(moved)
    (moved / "config.json").write_text(json.dumps({**config, "vae": {"id": "nobody-here/vae", "source": "hub"}}))
    with pytest.raises(
        PretrainedNotFoundError,
        match="VAE nobody-here/vae \\(named in .*config.json\\) cannot be loaded.*Pass vae=PATH",
    ):
        _pipeline(moved)


def test_pipeline_argument_errors(latent_model, image_model):
    pipe = _pipeline(latent_model)
    with pytest.raises(ValueError, match="class-conditional: pass class_labels"):
        pipe(num_inference_steps=2)
    with pytest.raises(ValueError, match="must lie in \\[0, 10\\)"):
        pipe(class_labels=[10], num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[1], num_inference_steps=2, output_type="jpeg")
    with pytest.raises(ValueError, match="2 seeds for 1 images"):
        pipe(class_labels=[1], num_inference_steps=2, seeds=[1, 2])
    with pytest.raises(TypeError, match="S_chrun"):
        pipe(class_labels=[1], num_inference_steps=2, S_chrun=1.0)
    with pytest.raises(ValueError, match="unconditional: call it without class_labels"):
        _pipeline(image_model)(class_labels=[1])


def test_released_layout_weights_load_into_the_model_class_and_the_pipeline(tmp_path, tiny_vae):
    # A released-layout safetensors file (NVlabs key names) -> `diffit-pipe import-nvlabs`'s export folder: the
    # model class and the pipeline load it, with the released sampling set-up the import records.
    from safetensors.torch import save_file

    from diffit.convert import to_nvlabs_state_dict
    from diffit.latent import LatentDiffiT
    from pipeline.train.released import import_nvlabs

    torch.manual_seed(0)
    model = diffit.create_model("DiffiT-Tiny/2")
    released = {key: value.contiguous() for key, value in to_nvlabs_state_dict(model).items()}
    save_file(released, str(tmp_path / "diffit_tiny.safetensors"))
    import_nvlabs(tmp_path / "diffit_tiny.safetensors", tmp_path / "imported", vae=str(tiny_vae))

    assert _same_weights(LatentDiffiT.from_pretrained(tmp_path / "imported"), model)
    pipe = _pipeline(tmp_path / "imported")
    assert _same_weights(pipe.transformer, model)
    recorded = json.loads((tmp_path / "imported" / "config.json").read_text())["sampling"]
    config = pipe.sampling_config
    assert (config.sampler, config.steps) == (recorded["sampler"], recorded["steps"]) == ("ddpm", 250)
    assert config.guidance == GuidanceConfig(
        scale=recorded["guidance_scale"], schedule=recorded["guidance_schedule"], power=4.0, channels=3
    )
    assert config.guidance.schedule == "power-cosine"  # 8x8 latents: the released code's 256-px branch
    assert config.pixels == recorded["pixels"] == "truncate"  # PIL images as the released sample.py writes them
    out = pipe(class_labels=[3], num_inference_steps=3, seeds=[1], output_type="latent").images
    assert torch.equal(out, sample(model, (4, 8, 8), [3], [1], config, steps=3))


@pytest.mark.slow
def test_an_export_of_diffit_pipe_export_loads_in_the_pipeline(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app
    from diffit.latent import LatentDiffiT
    from diffit.pipeline_loading import vae_path_hash
    from pipeline.train import TrainOptions, run_train
    from tests.support.encode_fixtures import save_tiny_vae
    from tests.support.train_fixtures import tiny_latent_config, write_config, write_latent_dataset

    vae = save_tiny_vae(tmp_path / "vae")
    data = write_latent_dataset(tmp_path / "data", num_samples=8, num_shards=2, vae_path=str(vae))
    manifest = json.loads((data / "manifest.json").read_text())  # the fixture records a placeholder VAE hash
    manifest["vae"]["path_hash"] = vae_path_hash(vae)
    (data / "manifest.json").write_text(json.dumps(manifest))
    config = write_config(tmp_path / "run.yaml", tiny_latent_config(train={"max_steps": 2}, checkpoint={"every": 2}))
    run_train(TrainOptions(run_dir=tmp_path / "run", config_path=config, data_dir=data))
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output

    exported = tmp_path / "exported"
    model = LatentDiffiT.from_pretrained(exported)
    loaded, config_json = diffit.load_pretrained(exported)
    assert _same_weights(model, loaded) and model.pretrained_extra["train"]["step"] == 2
    pipe = _pipeline(exported)
    assert (
        _same_weights(pipe.transformer, loaded) and pipe.config.scaling_factor == config_json["vae"]["scaling_factor"]
    )
    assert pipe.sampling_config.noise_schedule == config_json["diffusion"]["noise_schedule"]
    images = pipe(class_labels=[0, 1], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (64, 64)  # 8x8 latents through the /8 test VAE


@pytest.mark.cuda
@needs_cuda
def test_pipeline_on_cuda_matches_cpu(latent_model):
    pipe = _pipeline(latent_model)
    call = dict(class_labels=[1, 2], num_inference_steps=10, guidance_scale=2.0, seeds=[3, 4], output_type="latent")
    on_cpu = pipe(**call).images
    pipe.to("cuda")
    on_gpu = pipe(**call).images
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-3)  # same seeds, CPU generators
