"""`DiffiTPipeline`: a diffusers `DiffusionPipeline` holding a DiffiT model, its VAE, a scheduler and its sampling
settings, called like diffusers' `DiTPipeline`.

    import torch
    from diffusers import DPMSolverMultistepScheduler
    from diffit import DiffiTPipeline

    pipe = DiffiTPipeline.from_pretrained("models/xl2", torch_dtype=torch.bfloat16).to("cuda")
    ids = pipe.get_label_ids(["golden retriever", "otter"])             # [207, 360] (ImageNet exports)
    images = pipe(ids, 4.0, torch.Generator().manual_seed(0)).images     # the recorded sampler, guidance 4.0
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    images = pipe(ids, 4.0, num_inference_steps=25).images              # DPM-Solver++, 25 steps, as DiT users do

Components: `transformer` (`LatentDiffiT` or `DiffiTUNet`), `vae` (diffusers `AutoencoderKL`, latent models only;
the one the export's config.json names under "vae": its local `path` when that still exists, else its `id`, a
local path or a hub id) and `scheduler`; configuration entries: `sampling` (a `diffit.sampling_config.SamplingConfig` as
a dict: sampler, steps, guidance, EDM's S_churn / S_min / S_max / S_noise, pixels, ...; from an export: what its
config.json records under "sampling", e.g. the released code's set-up written by `diffit-pipe import-nvlabs`, over
the paper's settings for that model, `diffit.sampling_config.paper_sampling_config`), `scaling_factor` (the VAE's),
`latent_norm` (`diffit.latent_norm`: how the model's latents map back to the VAE's before decoding) and
`id2label` (class index -> "comma, separated, names", see `diffit.labels`).

Which sampler runs: the `scheduler` component decides.

* `DiffiTScheduler` (the default of every loaded export) or None: the project's own sampler,
  `diffit.sampling.sample` with the stored `sampling` settings (ADM DDPM / DDIM with the learned Sigma, EDM-Heun,
  flow Euler / Heun / Euler-Maruyama).
  `DiffiTScheduler` runs no steps itself; its config is the model's training chain in diffusers' names
  (num_train_timesteps, beta_start, beta_end, beta_schedule, clip_sample=False, prediction_type="epsilon"), so
  `AnyScheduler.from_config(pipe.scheduler.config)` builds a diffusers scheduler for the same chain, and
  `pipe.scheduler = DiffiTScheduler.from_config(pipe.scheduler.config)` switches back.
* any other diffusers scheduler: its loop for the model's kind, `diffit.scheduling_loops` (whose docstring is the
  reference): DDPM-family schedulers with `alphas_cumprod` (every scheduler `DiTPipeline` accepts: DDIM, DDPM,
  DPM-Solver(++), UniPC, Euler, Heun, PNDM, LMS, ...) run DiT's loop for ADM (eps) models,
  `FlowMatchEulerDiscreteScheduler` drives flow (velocity) models, `EDMEulerScheduler` /
  `EDMDPMSolverMultistepScheduler` image-space EDM models. Settings only the project's sampler has (sampler, eta,
  S_churn, ...) are refused per call.
`diffit.scheduling_diffit.scheduler_for(pipe.sampling_config)` builds a fitting scheduler for each kind;
`check_scheduler` refuses any other combination in one line naming the scheduler to build.

`__call__(class_labels, guidance_scale, generator, num_inference_steps, output_type, return_dict)`: DiT's order and
meaning (positional calls mean what they mean for `DiTPipeline`), with `None` defaults meaning "the stored
setting" (steps, guidance) rather than DiT's 50 steps / 4.0. `guidance_scale <= 1` means no guidance, as in DiT;
a scale > 1 replaces the stored scale and keeps its schedule, power and guided channels (the paper's
three-channel power-cosine guidance for ImageNet-256 exports). Keyword-only extras: `seeds=`, `batch_size=`
(unconditional models) and any `SamplingConfig` field for this call (`sampler="ddim"`, `eta=0.0`,
`S_churn=40, S_min=0.05, S_max=50, S_noise=1.003`, `pixels="truncate"`).

Seeds: sample i draws all its randomness from a `torch.Generator` seeded with seeds[i] (the project's sampler, and
the diffusers-scheduler loops: initial noise and every stochastic scheduler step, one generator per batch row),
so the project's sampler gives the samples of `diffit.sampling.sample` for the same seeds and settings, bit for bit
on the same device:

* `seeds=[...]`: used as they are (one per image); an image does not depend on the others in the batch.
* `generator=g` (one generator): seeds = torch.randint(0, 2**31, (N,), generator=g).tolist().
* `generator=[g_0, ..., g_{N-1}]`: seeds[i] = torch.randint(0, 2**31, (1,), generator=g_i).item().
* neither: seeds drawn from torch's global generator as above (reproducible after `torch.manual_seed`).

Outputs (`output_type`): "pil" (the uint8 images `diffit-pipe evaluate` stores for the same settings:
`diffit.sampling_config.to_uint8(x, sampling.pixels)` of the [-1, 1] image x, "round" = floor(127.5 x + 128) or
"truncate" = floor(127.5 x + 127.5)), "np" (float32 [N, H, W, 3] in [0, 1]), "pt" (float32 [N, 3, H, W] in
[0, 1]) or "latent" (what the sampler returns: float32 latents, or the [-1, 1] images of an image-space model).

Precision and devices: `from_pretrained(..., torch_dtype=torch.bfloat16)` (or a {"transformer": ..., "vae": ...,
"default": ...} dict) and `pipe.to(dtype)` / `pipe.to(device)` cast the modules; noise is drawn in float32 from the
CPU generators, the network runs in its own dtype, its output and the sampler's state are float32. Other diffusers
loading keywords: `use_safetensors=True`, `variant=None` and `low_cpu_mem_usage` are accepted (the files are
safetensors without variants, read whole); anything else (`device_map`, `use_safetensors=False`, a variant,
`custom_pipeline`, ...) is an error naming it. Progress bars: `set_progress_bar_config(**tqdm_kwargs)` as in
diffusers; the diffusers-scheduler loop passes every keyword to tqdm, the project's sampler (whose bar
`diffit.sampling` draws) honours `disable` only.

Labels: `pipe.id2label`, `pipe.labels` (name -> index, every comma-separated name of one class) and
`pipe.get_label_ids("golden retriever")`, as in DiT; from the export's dataset label map (ImageNet synsets -> their
English names, `diffit/data/imagenet_classes.json`), ImageNet's for released NVlabs weights, or `id2label=`.

Released NVlabs weights (diffit_256.safetensors / diffit_512.safetensors): `diffit-pipe import-nvlabs FILE DIR`
writes an export folder (weights read with safetensors, the released sampling set-up recorded), then
`DiffiTPipeline.from_pretrained(DIR)`.

`save_pretrained(DIR)` writes `model_index.json` (the components, the sampling settings, id2label),
`transformer/` (the model's export folder), `scheduler/` and `vae/`; `DiffiTPipeline.from_pretrained(DIR)` reads
it back (a diffusers scheduler included), after the checks of `diffit.pipeline_check` and `diffit.config_check` on
every file and before anything is built (`check_pipeline_folder`: model_index.json and its sampling steps bounded,
the scheduler's chain length, vae/ config bounds and weights present and matching); a bad file is an
`InvalidModelFileError` naming it. A local VAE folder an export names (or `vae=PATH`) gets the same VAE check.
`save_pretrained(DIR, push_to_hub=True, repo_id=...)` and `push_to_hub(repo_id)` upload that folder with this
library's model card (`diffit.pipeline_hub`). This module imports diffusers; `import diffit` does not (it loads this
module on first use of `diffit.DiffiTPipeline`).

As diffusers splits a pipeline: this module is the pipeline (`__call__`, saving and loading); the scheduler component
is `diffit.scheduling_diffit`, the loops that run a diffusers scheduler `diffit.scheduling_loops`; checking and
loading a saved folder, its VAE and dtypes is `diffit.pipeline_loading`; pushing to the Hub `diffit.pipeline_hub`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin
from PIL import Image
from torch import nn

from . import pipeline_hub, scheduling_loops
from .guidance import GuidanceConfig
from .hub import DiffiTModelHubMixin, resolve_pretrained_dir
from .labels import checked_id2label, export_id2label, label_ids, label_lookup
from .latent_norm import LatentNorm, export_latent_norm
from .models import model_family
from .pipeline_loading import (
    check_load_keywords,
    check_pipeline_folder,
    component_dtype,
    float32_network,
    load_vae,
)
from .sampling import sample
from .sampling_config import GUIDANCE_SETTINGS, SETTINGS, SamplingConfig, paper_sampling_config, to_uint8
from .scheduling_diffit import DiffiTScheduler, load_scheduler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
SEED_RANGE = 2**31  # seeds are drawn in [0, 2**31)
# SamplingConfig fields a call may change when a diffusers scheduler samples (the others configure the project's
# sampler, which does not run then).
SCHEDULER_CALL_FIELDS = ("guidance", *GUIDANCE_SETTINGS, "pixels", "generator_device")


def seeds_from_generator(generator: torch.Generator | Sequence[torch.Generator] | None, count: int) -> list[int]:
    """The per-sample seeds of `diffit.sampling.sample` a generator stands for (see the module docstring)."""
    if isinstance(generator, Sequence):
        if len(generator) != count:
            raise ValueError(f"got {len(generator)} generators for {count} images; pass one per image")
        return [int(torch.randint(0, SEED_RANGE, (1,), generator=g, device=g.device).item()) for g in generator]
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, SEED_RANGE, (count,), generator=generator, device=device).tolist()


def to_output(images: torch.Tensor, output_type: str, pixels: str = "round"):
    """[-1, 1] float images [N, 3, H, W] -> the requested output type (module docstring); "pil" quantises with
    `diffit.sampling_config.to_uint8(images, pixels)`, as `diffit-pipe evaluate` does."""
    if output_type == "pil":
        uint8 = to_uint8(images, pixels)
        return [Image.fromarray(array) for array in uint8.permute(0, 2, 3, 1).cpu().numpy()]
    unit = (images.float() / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return unit
    return unit.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)


def with_recorded_sampling(config: SamplingConfig, recorded: dict[str, Any]) -> SamplingConfig:
    """`config` with an export's "sampling" entry applied: sampler, steps, eta and guidance_scale /
    guidance_schedule / guidance_power / guidance_channels (3, or None / "all" for every eps channel) and pixels
    (how PIL outputs are quantised), the names `diffit-pipe evaluate` records; other keys (origin, reference) are
    notes."""
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
        pixels=str(recorded.get("pixels", config.pixels)),
    )


class DiffiTPipeline(DiffusionPipeline):
    """Class-conditional (or unconditional) image generation with a DiffiT model; see the module docstring.

    `__call__(class_labels, guidance_scale, generator, num_inference_steps, output_type, return_dict, *, seeds,
    batch_size, **sampling)`: DiT's positional order; `sampling` replaces fields of the stored `SamplingConfig` for
    this call (e.g. `sampler="ddim"`, `eta=0.0`, `S_churn=40, S_min=0.05, S_max=50, S_noise=1.003`).
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae", "scheduler"]

    def __init__(
        self,
        transformer: nn.Module,
        vae: AutoencoderKL | None = None,
        scheduler: SchedulerMixin | None = None,
        id2label: Mapping[int | str, str] | None = None,
        sampling: dict[str, Any] | None = None,
        scaling_factor: float | None = None,
        latent_norm: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if not isinstance(transformer, DiffiTModelHubMixin) or not hasattr(transformer, "model_config"):
            raise TypeError(f"transformer must be a DiffiT model built by diffit.create_model, got {type(transformer)}")
        if scheduler is not None and not isinstance(scheduler, SchedulerMixin):
            raise TypeError(
                f"scheduler must be a diffusers scheduler or None, got {type(scheduler).__name__} (the arguments are "
                "DiT's: transformer, vae, scheduler, id2label; pass the sampling settings as sampling=...)"
            )
        latent = model_family(transformer.model_config["name"]) == "latent"
        if latent and vae is None:
            raise ValueError("a latent DiffiT model needs its VAE (vae=AutoencoderKL) to decode images")
        if scaling_factor is None and vae is not None:
            scaling_factor = float(vae.config.scaling_factor)
            if latent_norm is None:  # a VAE without a recorded norm: its own factors (diffusers' convention)
                latent_norm = LatentNorm.scalar(scaling_factor, getattr(vae.config, "shift_factor", None)).to_dict()
        if latent_norm is not None:  # checked (finite, std > 0, one entry per latent channel)
            latent_norm = LatentNorm.from_dict(latent_norm, int(transformer.in_channels)).to_dict()
        if sampling is None:
            sampling = self.default_sampling(transformer, vae).to_dict()
        config = SamplingConfig.from_dict(sampling)
        config.check()  # refuse bad settings here, not at the first call
        if scheduler is None:
            scheduler = DiffiTScheduler.for_sampling(config)
        id2label = checked_id2label(id2label, int(transformer.num_classes))
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        self.register_to_config(
            sampling=dict(sampling),
            scaling_factor=scaling_factor,
            latent_norm=latent_norm,
            id2label=None if id2label is None else {str(index): names for index, names in id2label.items()},
        )
        # DiT's name -> class id map (every comma-separated name of one class), plus the names classes share.
        self.labels, self._shared_labels = label_lookup(id2label)

    @staticmethod
    def default_sampling(transformer: nn.Module, vae: AutoencoderKL | None) -> SamplingConfig:
        """The settings an export records under "sampling" (e.g. the released code's set-up that `diffit-pipe
        import-nvlabs` writes) over the paper's settings for the model (`paper_sampling_config` of its
        "diffusion" entry and resolution)."""
        extra = getattr(transformer, "pretrained_extra", None) or {}
        diffusion = extra.get("diffusion")
        if diffusion is None and model_family(transformer.model_config["name"]) in ("image", "songunet"):
            diffusion = {"type": "edm"}
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        config = paper_sampling_config(diffusion, int(transformer.input_size) * factor, int(transformer.num_classes))
        recorded = extra.get("sampling")
        return with_recorded_sampling(config, recorded) if isinstance(recorded, dict) else config

    @property
    def latent_norm(self) -> LatentNorm | None:
        """What the model's latents are (`diffit.latent_norm`): the recorded norm, else (exports and pipelines saved
        before it was recorded) scalar with `scaling_factor` and no shift; None for an image-space model."""
        recorded = self.config.get("latent_norm")
        if recorded is not None:
            return LatentNorm.from_dict(recorded)
        factor = self.config.get("scaling_factor")
        return None if factor is None else LatentNorm.scalar(factor)

    @property
    def sampling_config(self) -> SamplingConfig:
        """The stored sampling settings."""
        return SamplingConfig.from_dict(self.config.sampling)

    @property
    def id2label(self) -> dict[int, str]:
        """Class index -> "comma, separated, names" (empty when the model records no class names)."""
        return {int(index): names for index, names in (self.config.id2label or {}).items()}

    @property
    def uses_diffit_sampler(self) -> bool:
        """True while the project's sampler runs (scheduler: `DiffiTScheduler` or None), False for a diffusers one."""
        return self.scheduler is None or isinstance(self.scheduler, DiffiTScheduler)

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class ids of label names (one name or a list), as DiT's `get_label_ids`; an unknown name is a ValueError
        listing the closest names, a name several classes share (ImageNet's "crane") one listing their ids."""
        return label_ids(label, self.labels, self._shared_labels)

    # -- loading and saving ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        vae: AutoencoderKL | str | None = None,
        scheduler: SchedulerMixin | None = None,
        id2label: Mapping[int | str, str] | None = None,
        torch_dtype: torch.dtype | Mapping[str, torch.dtype] | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        **kwargs: Any,
    ) -> DiffiTPipeline:
        """Load an export folder (`diffit-pipe export`: model.safetensors + config.json), a folder written by
        `DiffiTPipeline.save_pretrained` (model_index.json), or a hub repository holding either.

        `vae`: an AutoencoderKL, or a local folder / hub id to load, instead of the one the export names.
        `scheduler`: a diffusers scheduler instead of the project's sampler (module docstring). `id2label`: class
        names instead of the recorded ones. `torch_dtype`: a dtype, or {"transformer": ..., "vae": ...,
        "default": ...}, for the loaded modules. Other diffusers keywords: see the module docstring.
        """
        check_load_keywords(kwargs)
        dtypes = {name: component_dtype(torch_dtype, name) for name in ("transformer", "vae")}
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
            pipe = cls._from_pipeline_folder(folder, vae, scheduler, id2label)
        else:
            pipe = cls._from_export_folder(folder, vae, scheduler, id2label)
        loaded_vae = not isinstance(vae, nn.Module)  # a VAE passed in keeps its dtype
        for name, module in (("transformer", pipe.transformer), ("vae", pipe.vae if loaded_vae else None)):
            if module is not None and dtypes[name] is not None:
                module.to(dtypes[name])
        return pipe

    @classmethod
    def _from_export_folder(cls, folder: Path, vae, scheduler, id2label) -> DiffiTPipeline:
        """An export folder: model.safetensors + config.json (its "vae", "sampling", "dataset" entries)."""
        transformer = DiffiTModelHubMixin.from_pretrained(folder)
        extra = transformer.pretrained_extra
        if model_family(transformer.model_config["name"]) == "latent" and not isinstance(vae, nn.Module):
            entry = vae if vae is not None else extra.get("vae")
            if entry is None:
                raise ValueError(f"{folder / 'config.json'}: a latent model needs a 'vae' entry; pass vae=PATH")
            vae = load_vae(entry, folder)
        if id2label is None:
            id2label = export_id2label(extra, int(transformer.num_classes), str(folder / "config.json"))
        scaling_factor = (extra.get("vae") or {}).get("scaling_factor")
        scaling_factor = None if scaling_factor is None else float(scaling_factor)
        norm = export_latent_norm(extra, int(transformer.in_channels))  # an older export: scalar, no shift
        return cls(transformer, vae, scheduler, id2label, None, scaling_factor, norm.to_dict() if norm else None)

    @classmethod
    def _from_pipeline_folder(cls, folder: Path, vae, scheduler, id2label) -> DiffiTPipeline:
        """A folder written by `save_pretrained`: transformer/, vae/, scheduler/ and model_index.json. Every file is
        checked before anything is built (`check_pipeline_folder`)."""
        index = check_pipeline_folder(folder, cls.__name__, check_vae=vae is None, check_scheduler=scheduler is None)
        transformer = DiffiTModelHubMixin.from_pretrained(folder, subfolder="transformer")
        if isinstance(vae, str):
            vae = load_vae(vae, folder)
        elif vae is None and (index.get("vae") or [None])[0] is not None:
            vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True).eval().requires_grad_(False)
        if scheduler is None:
            scheduler = load_scheduler(index.get("scheduler"), folder)
        if id2label is None:
            id2label = index.get("id2label")
        sampling, factor, norm = index.get("sampling"), index.get("scaling_factor"), index.get("latent_norm")
        return cls(transformer, vae, scheduler, id2label, sampling, factor, norm)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write model_index.json, transformer/ (the model's export folder), scheduler/ and vae/ (safetensors only).

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
        if self.scheduler is not None:
            self.scheduler.save_pretrained(out / "scheduler")
        self.save_config(out)
        if push_to_hub:
            pipeline_hub.push_folder(
                self,
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
        the repository if given), with this library's model card instead of diffusers' (`diffit.pipeline_hub`)."""
        return pipeline_hub.push_to_hub(
            self, repo_id, commit_message, private, token, create_pr, safe_serialization, variant, subfolder
        )

    def model_card(self, repo_id: str) -> str:
        """README.md of the pipeline's hub repository `repo_id` (library `diffit`, usage with `repo_id`)."""
        return pipeline_hub.model_card(self, repo_id)

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
        """The stored settings with this call's replacements (sampling settings by their one name each,
        `guidance_power=2.0`, or any other `SamplingConfig` field); guidance_scale <= 1 turns guidance off (DiT)."""
        settings = {name: value for name, value in overrides.items() if name in SETTINGS}
        fields = {name: value for name, value in overrides.items() if name not in SETTINGS}
        config = dataclasses.replace(self.sampling_config, **fields).with_settings(**settings)
        if num_inference_steps is not None:
            config = dataclasses.replace(config, steps=int(num_inference_steps))
        if guidance_scale is not None:
            if float(guidance_scale) <= 1.0:
                config = dataclasses.replace(config, guidance=None)
            else:
                guidance = dataclasses.replace(config.guidance or GuidanceConfig(), scale=float(guidance_scale))
                config = dataclasses.replace(config, guidance=guidance)
        config.check()
        return config

    def check_scheduler(self, config: SamplingConfig | None = None) -> None:
        """Raise ValueError (one line, naming the scheduler to build) unless `self.scheduler` (a diffusers scheduler)
        drives this model: an ADM model a DDPM-family scheduler on its training chain with epsilon prediction, a
        flow model `FlowMatchEulerDiscreteScheduler` (fixed shift, sigmas from 1 to 0), an EDM model
        `EDMEulerScheduler` / `EDMDPMSolverMultistepScheduler` with the export's sigma_data and epsilon prediction
        (the module docstring)."""
        config = config or self.sampling_config
        scheduling_loops.check_scheduler(self.scheduler, config, self.transformer.model_config["name"])

    def _sample_with_diffit(self, labels, seeds, config: SamplingConfig) -> torch.Tensor:
        """`diffit.sampling.sample` (bit-identical for a float32 model); a bfloat16 / float16 model runs in its
        dtype inside the float32 sampler."""
        model = self.transformer
        shape = (int(model.in_channels), int(model.input_size), int(model.input_size))
        progress = dict(getattr(self, "_progress_bar_config", {}))  # set_progress_bar_config's tqdm settings
        network = float32_network(model)
        return sample(network, shape, labels, seeds, config, device=self._execution_device, progress=progress)

    def _sample_with_scheduler(self, labels, seeds, config: SamplingConfig) -> torch.Tensor:
        """`self.scheduler`'s loop for the model's kind (`diffit.scheduling_loops`): sample i's initial noise and every
        stochastic step draw from a generator seeded with seeds[i]; the stored guidance on one doubled batch."""
        return scheduling_loops.sample_with_scheduler(
            self.scheduler, self.transformer, labels, seeds, config, self._execution_device, self.progress_bar
        )

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Sampler output -> images in [-1, 1]: VAE decode of the latents `latent_norm` maps the samples back to
        (`samples / scaling_factor + shift_factor`, or per channel `samples * std_c + mean_c`) for latent models."""
        if self.vae is None:
            return samples
        latents = self.latent_norm.denormalize(samples)
        return self.vae.decode(latents.to(device=self.vae.device, dtype=self.vae.dtype)).sample

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int] | int | torch.Tensor | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        seeds: Sequence[int] | None = None,
        batch_size: int | None = None,
        **sampling: Any,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per class label (or `batch_size` / len(seeds) unconditional images).

        DiT's arguments and order. guidance_scale: None = the stored guidance; <= 1 = none; > 1 replaces the
        stored scale (its schedule, power and guided channels stay). num_inference_steps: None = the stored steps.
        `seeds`, `batch_size` and `SamplingConfig` fields (`sampling`) are keyword-only (module docstring).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        config = self._call_config(num_inference_steps, guidance_scale, sampling)
        labels = self._labels(class_labels)
        count = len(labels) if labels is not None else len(seeds) if seeds is not None else int(batch_size or 1)
        seeds = [int(seed) for seed in seeds] if seeds is not None else seeds_from_generator(generator, count)
        if len(seeds) != count:
            raise ValueError(f"got {len(seeds)} seeds for {count} images; pass one seed per image")
        if self.uses_diffit_sampler:
            samples = self._sample_with_diffit(labels, seeds, config)
        else:
            ignored = sorted(set(sampling) - set(SCHEDULER_CALL_FIELDS))
            if ignored:
                raise ValueError(
                    f"{ignored} configure the project's sampler, but pipe.scheduler is a "
                    f"{type(self.scheduler).__name__}: set them on that scheduler, or switch back with "
                    "pipe.scheduler = DiffiTScheduler.from_config(pipe.scheduler.config)"
                )
            samples = self._sample_with_scheduler(labels, seeds, config)
        images = samples if output_type == "latent" else to_output(self.decode(samples), output_type, config.pixels)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
