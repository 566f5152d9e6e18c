"""`DiffiTPipeline`: a diffusers `DiffusionPipeline` holding a DiffiT model, its VAE and its sampling settings.

    from diffit import DiffiTPipeline

    pipe = DiffiTPipeline.from_pretrained("models/xl2")  # `diffit-pipe export` output, a saved pipeline or a hub id
    images = pipe(class_labels=[207, 360], num_inference_steps=250, generator=torch.Generator().manual_seed(0)).images

Components: `transformer` (`LatentDiffiT` or `DiffiTUNet`), `vae` (diffusers `AutoencoderKL`, latent models only;
the one the export's config.json names under "vae": its local `path` when that still exists, else its `id`, a
local path or a hub id) and the configuration entries `sampling` (a `diffit.sampling.SamplingConfig` as a dict:
sampler, steps, guidance, EDM's S_churn / S_min / S_max / S_noise, ...; from an export: what its config.json
records under "sampling", e.g. the released code's set-up written by `diffit-pipe import-nvlabs`, over the
paper's settings for that model, `diffit.sampling.paper_sampling_config`) and `scaling_factor` (latents are
divided by it before decoding).

Released NVlabs weights (diffit_256.safetensors / diffit_512.safetensors): `diffit-pipe import-nvlabs FILE DIR`
writes an export folder (weights read with safetensors, the released sampling set-up recorded), then
`DiffiTPipeline.from_pretrained(DIR)`.

Sampling is `diffit.sampling.sample` itself, so the pipeline's samples are those of `sample` for the same seeds
and settings, bit for bit on the same device. Sample i is drawn from a `torch.Generator` seeded with seeds[i]:

* `seeds=[...]`: used as they are (one per image); an image does not depend on the others in the batch.
* `generator=g` (one generator): seeds = torch.randint(0, 2**31, (N,), generator=g).tolist().
* `generator=[g_0, ..., g_{N-1}]`: seeds[i] = torch.randint(0, 2**31, (1,), generator=g_i).item().
* neither: seeds drawn from torch's global generator as above (reproducible after `torch.manual_seed`).

Outputs (`output_type`): "pil" (the uint8 images `diffit-pipe evaluate` stores: floor(127.5 x + 128) of the
[-1, 1] image x, EDM's conversion), "np" (float32 [N, H, W, 3] in [0, 1]), "pt" (float32 [N, 3, H, W] in
[0, 1]) or "latent" (what the sampler returns: latents, or the [-1, 1] images of an image-space model).

`save_pretrained(DIR)` writes `model_index.json` (the components and the sampling settings), `transformer/`
(the model's export folder) and `vae/`; `DiffiTPipeline.from_pretrained(DIR)` reads it back.
`save_pretrained(DIR, push_to_hub=True, repo_id=...)` and `push_to_hub(repo_id)` upload that folder with a model
card (README.md: library `diffit`, the `DiffiTPipeline.from_pretrained(repo_id)` usage; diffusers' own card would
name diffusers, whose `DiffusionPipeline.from_pretrained` cannot load this pipeline). This module imports
diffusers; `import diffit` does not (it loads this module on first use of `diffit.DiffiTPipeline`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput
from PIL import Image
from torch import nn

from .guidance import GuidanceConfig
from .hub import DiffiTModelHubMixin, PretrainedNotFoundError, resolve_pretrained_dir
from .models import model_family
from .sampling import SamplingConfig, paper_sampling_config, sample

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
VAE_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SEED_RANGE = 2**31  # seeds are drawn in [0, 2**31)

PIPELINE_CARD = """---
# Model card metadata: https://github.com/huggingface/hub-docs/blob/main/modelcard.md?plain=1
{{ card_data }}
---

# {{ model_name }} pipeline

A [DiffiT](https://arxiv.org/abs/2312.02139) diffusion pipeline (Hatamizadeh et al., "DiffiT: Diffusion Vision
Transformers for Image Generation") saved with the `diffit` library's `DiffiTPipeline`: `transformer/` holds the
model (weights and configuration){{ vae_part }} and `model_index.json` the components and the sampling settings
({{ sampler }} sampler, {{ steps }} steps).

```python
from diffit import DiffiTPipeline

pipe = DiffiTPipeline.from_pretrained("{{ repo_id }}")
images = pipe({{ call }}).images
```

diffusers' `DiffusionPipeline.from_pretrained` does not load it: the pipeline class is `diffit.DiffiTPipeline`.

- Code: https://github.com/NVlabs/DiffiT
- Paper: https://arxiv.org/abs/2312.02139
"""


def seeds_from_generator(generator: torch.Generator | Sequence[torch.Generator] | None, count: int) -> list[int]:
    """The per-sample seeds of `diffit.sampling.sample` a generator stands for (see the module docstring)."""
    if isinstance(generator, Sequence):
        if len(generator) != count:
            raise ValueError(f"got {len(generator)} generators for {count} images; pass one per image")
        return [int(torch.randint(0, SEED_RANGE, (1,), generator=g, device=g.device).item()) for g in generator]
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, SEED_RANGE, (count,), generator=generator, device=device).tolist()


def to_output(images: torch.Tensor, output_type: str):
    """[-1, 1] float images [N, 3, H, W] -> the requested output type (module docstring)."""
    if output_type == "pil":
        pixels = (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
        return [Image.fromarray(array) for array in pixels.permute(0, 2, 3, 1).cpu().numpy()]
    unit = (images.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return unit
    return unit.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)


def with_recorded_sampling(config: SamplingConfig, recorded: dict[str, Any]) -> SamplingConfig:
    """`config` with an export's "sampling" entry applied: sampler, steps, eta and guidance_scale /
    guidance_schedule / guidance_power / guidance_channels (3, or None / "all" for every eps channel), the
    names `diffit-pipe evaluate` records; other keys (origin, reference) are notes."""
    guidance = config.guidance or GuidanceConfig()
    channels = recorded.get("guidance_channels", guidance.channels)
    guidance = GuidanceConfig(
        scale=float(recorded.get("guidance_scale", guidance.scale)),
        schedule=str(recorded.get("guidance_schedule", guidance.schedule)),
        power=float(recorded.get("guidance_power", guidance.power)),
        channels=None if channels in (None, "all") else int(channels),
    )
    return dataclasses.replace(
        config,
        sampler=str(recorded.get("sampler", config.sampler)),
        steps=int(recorded.get("steps", config.steps)),
        eta=float(recorded.get("eta", config.eta)),
        guidance=guidance,
    )


def vae_path_hash(directory: Path) -> str:
    """sha256 over the names and bytes of config.json and the safetensors weights, the `path_hash` that
    `diffit-pipe encode` records for its VAE (so the pipeline can tell it decodes with the same one)."""
    digest = hashlib.sha256()
    for path in (directory / "config.json", directory / VAE_WEIGHTS_NAME):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _vae_source(entry: dict[str, Any] | str, model_dir: Path) -> tuple[str, str | None]:
    """(what to pass to AutoencoderKL.from_pretrained, revision) for an export's "vae" entry or a path / hub id."""
    if isinstance(entry, str):
        return entry, None
    if entry.get("path") and Path(entry["path"]).is_dir():
        return str(entry["path"]), None
    spec = entry.get("id") or entry.get("path")
    if not spec:
        raise ValueError(f"{model_dir / 'config.json'}: 'vae' has neither 'path' nor 'id'; pass vae=PATH")
    return str(spec), entry.get("revision") if entry.get("source") == "hub" else None


def load_vae(entry: dict[str, Any] | str, model_dir: Path) -> AutoencoderKL:
    """The AutoencoderKL an export's "vae" entry names (or a path / hub id), in eval mode. A local VAE whose files
    differ from the recorded `path_hash` (not the one the training latents were encoded with) is an error."""
    spec, revision = _vae_source(entry, model_dir)
    local = Path(os.path.expanduser(spec))
    subfolder = "vae" if local.is_dir() and not (local / "config.json").is_file() else None
    try:
        vae = AutoencoderKL.from_pretrained(spec, subfolder=subfolder, revision=revision, use_safetensors=True)
    except Exception as error:  # noqa: BLE001 - diffusers raises many types (OSError, ValueError, hub errors)
        origin = f"named in {model_dir / 'config.json'}" if isinstance(entry, dict) else "passed as vae="
        raise PretrainedNotFoundError(
            f"the VAE {spec} ({origin}) cannot be loaded: {type(error).__name__}: {error}. "
            "Pass vae=PATH (a local diffusers AutoencoderKL folder) or vae=an AutoencoderKL."
        ) from error
    recorded = entry.get("path_hash") if isinstance(entry, dict) else None
    folder = local / subfolder if subfolder else local
    if recorded and (folder / VAE_WEIGHTS_NAME).is_file() and vae_path_hash(folder) != recorded:
        raise ValueError(
            f"model/VAE mismatch: {folder} is not the VAE the training latents were encoded with (its files "
            f"changed; path_hash recorded in {model_dir / 'config.json'}). Pass vae= to decode with it on purpose."
        )
    return vae.eval().requires_grad_(False)


class DiffiTPipeline(DiffusionPipeline):
    """Class-conditional (or unconditional) image generation with a DiffiT model; see the module docstring.

    `__call__(class_labels, num_inference_steps, guidance_scale, generator, *, seeds, batch_size, output_type,
    return_dict, **sampling)` where `sampling` replaces fields of the stored `SamplingConfig` for this call
    (e.g. `sampler="ddim"`, `eta=0.0`, `S_churn=40, S_min=0.05, S_max=50, S_noise=1.003`).
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        transformer: nn.Module,
        vae: AutoencoderKL | None = None,
        sampling: dict[str, Any] | None = None,
        scaling_factor: float | None = None,
    ):
        super().__init__()
        if not isinstance(transformer, DiffiTModelHubMixin) or not hasattr(transformer, "model_config"):
            raise TypeError(f"transformer must be a DiffiT model built by diffit.create_model, got {type(transformer)}")
        latent = model_family(transformer.model_config["name"]) == "latent"
        if latent and vae is None:
            raise ValueError("a latent DiffiT model needs its VAE (vae=AutoencoderKL) to decode images")
        if scaling_factor is None and vae is not None:
            scaling_factor = float(vae.config.scaling_factor)
        if sampling is None:
            sampling = self.default_sampling(transformer, vae).to_dict()
        SamplingConfig.from_dict(sampling).check()  # refuse bad settings here, not at the first call
        self.register_modules(transformer=transformer, vae=vae)
        self.register_to_config(sampling=dict(sampling), scaling_factor=scaling_factor)

    @staticmethod
    def default_sampling(transformer: nn.Module, vae: AutoencoderKL | None) -> SamplingConfig:
        """The settings an export records under "sampling" (e.g. the released code's set-up that `diffit-pipe
        import-nvlabs` writes) over the paper's settings for the model (`paper_sampling_config` of its
        "diffusion" entry and resolution)."""
        extra = getattr(transformer, "pretrained_extra", None) or {}
        diffusion = extra.get("diffusion")
        if diffusion is None and model_family(transformer.model_config["name"]) == "image":
            diffusion = {"type": "edm"}
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        config = paper_sampling_config(diffusion, int(transformer.input_size) * factor, int(transformer.num_classes))
        recorded = extra.get("sampling")
        return with_recorded_sampling(config, recorded) if isinstance(recorded, dict) else config

    @property
    def sampling_config(self) -> SamplingConfig:
        """The stored sampling settings."""
        return SamplingConfig.from_dict(self.config.sampling)

    # -- loading and saving ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        vae: AutoencoderKL | str | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
    ) -> DiffiTPipeline:
        """Load an export folder (`diffit-pipe export`: model.safetensors + config.json), a folder written by
        `DiffiTPipeline.save_pretrained` (model_index.json), or a hub repository holding either.

        `vae`: an AutoencoderKL, or a local folder / hub id to load, instead of the one the export names.
        """
        folder = resolve_pretrained_dir(
            pretrained_model_name_or_path,
            allow_patterns=["*.json", "*.safetensors", "*.md"],
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        if (folder / "model_index.json").is_file():
            return cls._from_pipeline_folder(folder, vae)
        transformer = DiffiTModelHubMixin.from_pretrained(folder)
        extra = transformer.pretrained_extra
        if model_family(transformer.model_config["name"]) == "latent" and not isinstance(vae, nn.Module):
            entry = vae if vae is not None else extra.get("vae")
            if entry is None:
                raise ValueError(f"{folder / 'config.json'}: a latent model needs a 'vae' entry; pass vae=PATH")
            vae = load_vae(entry, folder)
        scaling_factor = (extra.get("vae") or {}).get("scaling_factor")
        return cls(transformer, vae, None, None if scaling_factor is None else float(scaling_factor))

    @classmethod
    def _from_pipeline_folder(cls, folder: Path, vae: AutoencoderKL | str | None) -> DiffiTPipeline:
        """A folder written by `save_pretrained`: transformer/, vae/ and model_index.json."""
        index = json.loads((folder / "model_index.json").read_text())
        if index.get("_class_name") != cls.__name__:
            raise ValueError(
                f"{folder / 'model_index.json'} describes a {index.get('_class_name')}, not {cls.__name__}"
            )
        transformer = DiffiTModelHubMixin.from_pretrained(folder, subfolder="transformer")
        if isinstance(vae, str):
            vae = load_vae(vae, folder)
        elif vae is None and (index.get("vae") or [None])[0] is not None:
            vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True).eval().requires_grad_(False)
        return cls(transformer, vae, index.get("sampling"), index.get("scaling_factor"))

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write model_index.json, transformer/ (the model's export folder) and vae/ (safetensors only).

        With `push_to_hub=True` the folder is then uploaded, with a model card (README.md, written into it too), to
        `repo_id` (default: the folder's name, in the token owner's namespace); `token`, `private`,
        `commit_message`, `create_pr` as in diffusers. `push_to_hub(repo_id)` uploads without a local folder.
        """
        if not safe_serialization or variant is not None:
            raise ValueError("DiffiTPipeline saves safetensors weights only, without variants")
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(out / "transformer")
        if self.vae is not None:
            self.vae.save_pretrained(out / "vae", safe_serialization=True)
        self.save_config(out)
        if push_to_hub:
            self._push_folder(
                out,
                kwargs.get("repo_id", out.name),
                token=kwargs.get("token"),
                private=kwargs.get("private"),
                commit_message=kwargs.get("commit_message"),
                create_pr=kwargs.get("create_pr", False),
            )

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        subfolder: str | None = None,
    ) -> str:
        """diffusers' `push_to_hub` (`save_pretrained` into a temporary folder, then one upload, into `subfolder` of
        the repository if given), with this library's model card instead of diffusers' (module docstring)."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            return self._push_folder(
                Path(folder),
                repo_id,
                token=token,
                private=private,
                commit_message=commit_message,
                create_pr=create_pr,
                path_in_repo=subfolder,
            )

    def _push_folder(
        self,
        folder: Path,
        repo_id: str,
        *,
        token: str | None,
        private: bool | None,
        commit_message: str | None,
        create_pr: bool,
        path_in_repo: str | None = None,
    ) -> str:
        """Create the hub repository if needed (a bare name lands in the token owner's namespace), write the model
        card into `folder` (not for a subfolder upload), upload `folder`; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if path_in_repo is None:
            (folder / "README.md").write_text(self.model_card(repo_id))
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            path_in_repo=path_in_repo,
            commit_message=commit_message or "Upload DiffiTPipeline",
            create_pr=create_pr,
        )

    def model_card(self, repo_id: str) -> str:
        """README.md of the pipeline's hub repository `repo_id` (library `diffit`, usage with `repo_id`)."""
        from huggingface_hub import ModelCard, ModelCardData

        config = self.sampling_config
        call = "class_labels=[207, 360]" if self.transformer.num_classes else "batch_size=2"
        vae_part = ", `vae/` the diffusers AutoencoderKL that decodes its latents," if self.vae is not None else ""
        card = ModelCard.from_template(
            ModelCardData(library_name="diffit", tags=["diffit", "diffusion", "image-generation"]),
            template_str=PIPELINE_CARD,
            model_name=self.transformer.model_config["name"],
            vae_part=vae_part,
            sampler=config.sampler,
            steps=config.steps,
            repo_id=repo_id,
            call=call,
        )
        return str(card)

    # -- generation ---------------------------------------------------------------------------------------------

    def _labels(self, class_labels) -> list[int] | None:
        """Class labels as a checked list (None for an unconditional call)."""
        if class_labels is None:
            if self.transformer.num_classes:
                raise ValueError("this model is class-conditional: pass class_labels (one per image)")
            return None
        if not self.transformer.num_classes:
            raise ValueError("this model is unconditional: call it without class_labels (batch_size=N)")
        labels = [int(label) for label in torch.as_tensor(class_labels).reshape(-1).tolist()]
        bad = [label for label in labels if not 0 <= label < self.transformer.num_classes]
        if bad or not labels:
            raise ValueError(f"class labels must lie in [0, {self.transformer.num_classes}), got {labels}")
        return labels

    def _call_config(self, num_inference_steps, guidance_scale, overrides: dict[str, Any]) -> SamplingConfig:
        """The stored settings with this call's replacements."""
        config = dataclasses.replace(self.sampling_config, **overrides)
        if num_inference_steps is not None:
            config = dataclasses.replace(config, steps=int(num_inference_steps))
        if guidance_scale is not None:
            guidance = dataclasses.replace(config.guidance or GuidanceConfig(), scale=float(guidance_scale))
            config = dataclasses.replace(config, guidance=guidance)
        config.check()
        return config

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Sampler output -> images in [-1, 1]: VAE decode of samples / scaling_factor for latent models."""
        if self.vae is None:
            return samples
        latents = samples / self.config.scaling_factor
        return self.vae.decode(latents.to(device=self.vae.device, dtype=self.vae.dtype)).sample

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | int | torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        *,
        seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        **sampling: Any,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per class label (or `batch_size` / len(seeds) unconditional images).

        num_inference_steps / guidance_scale replace the stored steps / guidance scale (the schedule, power and
        guided channels stay: the paper's three-channel power-cosine guidance for ImageNet-256 exports).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        config = self._call_config(num_inference_steps, guidance_scale, sampling)
        labels = self._labels(class_labels)
        count = len(labels) if labels is not None else len(seeds) if seeds is not None else int(batch_size or 1)
        seeds = [int(seed) for seed in seeds] if seeds is not None else seeds_from_generator(generator, count)
        if len(seeds) != count:
            raise ValueError(f"got {len(seeds)} seeds for {count} images; pass one seed per image")
        model = self.transformer
        shape = (int(model.in_channels), int(model.input_size), int(model.input_size))
        progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        samples = sample(model, shape, labels, seeds, config, device=self._execution_device, progress=progress)
        images = samples if output_type == "latent" else to_output(self.decode(samples), output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
