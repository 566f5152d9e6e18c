"""Hugging Face Hub conventions for DiffiT models: `save_pretrained`, `from_pretrained`, `push_to_hub`.

`LatentDiffiT` and `DiffiTUNet` inherit `DiffiTModelHubMixin`, huggingface_hub's `PyTorchModelHubMixin` with
the export format of `diffit.io` as its files:

    model = diffit.create_model("DiffiT-B/2")
    model.save_pretrained("out")                 # model.safetensors + config.json + README.md (model card)
    model = LatentDiffiT.from_pretrained("out")  # a local folder (e.g. written by `diffit-pipe export`) or a hub id
    model.push_to_hub("user/diffit-b2")

config.json is `{"model": {"name", "kwargs"}, ...extra}`, so a folder written by `save_pretrained` is an export
and an export loads with `from_pretrained`. The extra entries (`diffusion`, `vae`, `dataset`, `train`) travel
with the model in `model.pretrained_extra`: `from_pretrained` fills it, `save_pretrained` and `push_to_hub` write
it back (the mixin's `config=` argument is not used: config.json always describes the model itself).
`DiffiTModelHubMixin.from_pretrained` on the mixin builds whichever class config.json names; on a model class it
also checks that the folder holds that class.

A hub id is fetched with `huggingface_hub.snapshot_download` (the local cache first); with HF_HUB_OFFLINE=1 and
no cached copy, or no network, loading fails with `PretrainedNotFoundError` naming the id and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import PyTorchModelHubMixin

from .configs import model_class, model_family, resolve_model_kwargs
from .export_format import CONFIG_NAME, WEIGHTS_NAME, load_weights, meta_state_shapes, read_config
from .export_format import save_pretrained as write_export

MODEL_CARD = """---
# Model card metadata: https://github.com/huggingface/hub-docs/blob/main/modelcard.md?plain=1
{{ card_data }}
---

# {{ model_name | default("DiffiT", true) }}

A [DiffiT](https://arxiv.org/abs/2312.02139) diffusion model (Hatamizadeh et al., "DiffiT: Diffusion Vision
Transformers for Image Generation") saved with the `diffit` library: `model.safetensors` holds the weights,
`config.json` the configuration that rebuilds the model (`{"model": {"name", "kwargs"}, ...}`) and, for models
exported from a training run, the diffusion, VAE and dataset entries.

```python
from diffit import DiffiTPipeline

pipe = DiffiTPipeline.from_pretrained("{{ repo_id | default("path/to/this/folder", true) }}")
images = pipe(class_labels=[207, 360], num_inference_steps=250).images
```

- Code: {{ repo_url | default("[More Information Needed]", true) }}
- Paper: {{ paper_url | default("[More Information Needed]", true) }}
"""


class PretrainedNotFoundError(FileNotFoundError):
    """A model folder or hub id that cannot be found or fetched (message names it and says what to pass)."""


def _looks_like_path(spec: str) -> bool:
    """True for values meant as a local path, which are never sent to the hub as a repository id."""
    if spec.startswith(("/", "./", "../", "~", ".\\")) or spec in (".", "..") or "\\" in spec or spec.endswith("/"):
        return True
    return len(spec.split("/")) > 2  # hub ids are "name" or "owner/name"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_pretrained_dir(
    name_or_path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    allow_patterns: list[str] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local folder of a model: `name_or_path` itself when it is a directory, else a snapshot of the hub
    repository `name_or_path` (only `allow_patterns`), from the local cache or downloaded."""
    spec = str(name_or_path)
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return path / subfolder if subfolder else path
    if path.exists():
        raise PretrainedNotFoundError(
            f"{spec}: is a file; pass the directory that holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    if _looks_like_path(spec):
        raise PretrainedNotFoundError(
            f"{spec}: no such directory; pass a folder written by `diffit-pipe export` or `save_pretrained`, "
            "or a Hugging Face hub id (owner/name)"
        )
    from huggingface_hub import snapshot_download

    if subfolder and allow_patterns:
        allow_patterns = [f"{subfolder}/{pattern}" for pattern in allow_patterns]
    try:
        snapshot = snapshot_download(
            spec,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
            allow_patterns=allow_patterns,
        )
    except Exception as error:  # offline, not cached, unknown repository, invalid id, network failures
        where = (
            "the hub is offline (HF_HUB_OFFLINE=1) and this repository is not in the local cache"
            if _hub_offline() or local_files_only
            else "the Hugging Face hub could not be reached or has no such repository"
        )
        raise PretrainedNotFoundError(
            f"{spec}: not a local directory, and it cannot be loaded from the Hugging Face hub: {where} "
            f"({type(error).__name__}: {error}). Download it once where there is network access "
            f"(`huggingface-cli download {spec} --local-dir DIR`) and pass DIR, or pass a folder written by "
            "`diffit-pipe export`."
        ) from error
    folder = Path(snapshot) / subfolder if subfolder else Path(snapshot)
    if not (folder / CONFIG_NAME).is_file():
        raise PretrainedNotFoundError(f"{spec}: the hub repository has no {CONFIG_NAME} in {subfolder or 'its root'}")
    return folder


class DiffiTModelHubMixin(
    PyTorchModelHubMixin,
    library_name="diffit",
    repo_url="https://github.com/NVlabs/DiffiT",
    paper_url="https://arxiv.org/abs/2312.02139",
    tags=["diffit", "diffusion", "image-generation"],
    model_card_template=MODEL_CARD,
):
    """`save_pretrained` / `from_pretrained` / `push_to_hub` for DiffiT models in the export format (module doc).

    A model built by `diffit.create_model` carries `model_config = {"name", "kwargs"}`; `pretrained_extra` holds
    the other config.json entries (empty for a fresh model). `diffit_family` ("latent" / "image", set by each
    model class) is the family of configurations (`diffit.configs`) a class builds.
    """

    diffit_family: str | None = None

    @property
    def device(self):
        """Device of the first parameter (what diffusers pipelines read from their components)."""
        return next(self.parameters()).device

    @property
    def dtype(self):
        """dtype of the first floating-point parameter."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def _save_pretrained(self, save_directory: Path) -> None:
        """model.safetensors + config.json (`diffit.io.save_pretrained`, each file written atomically)."""
        write_export(self, save_directory, getattr(self, "pretrained_extra", None) or {})

    def generate_model_card(self, *args, **kwargs):
        """The mixin's card with the model's configuration name filled in."""
        model_config = getattr(self, "model_config", None) or {}
        kwargs.setdefault("model_name", model_config.get("name"))
        return super().generate_model_card(*args, **kwargs)

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> str:
        """The mixin's `push_to_hub` (save_pretrained into a temporary folder, then one upload), with the
        repository id in the model card's usage example."""
        model_card_kwargs = {"repo_id": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=model_card_kwargs, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        subfolder: str | None = None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ):
        """Load a model from a local folder (an export, a `save_pretrained` folder, or a pipeline folder with
        `subfolder="transformer"`) or a hub id; in eval mode on `map_location`. Loading is strict."""
        folder = resolve_pretrained_dir(
            pretrained_model_name_or_path,
            subfolder=subfolder,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        return cls._from_pretrained(
            model_id=str(folder),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=True,
            token=token,
            map_location=map_location,
            strict=strict,
            **model_kwargs,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | os.PathLike | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ):
        """Rebuild the model config.json in the local folder `model_id` names and load its weights (both files
        checked before anything is allocated, as `diffit.load_pretrained` does)."""
        if model_kwargs:
            raise TypeError(
                f"from_pretrained takes no model arguments ({sorted(model_kwargs)}): config.json rebuilds the model"
            )
        config = read_config(model_id)
        weights = Path(model_id) / WEIGHTS_NAME
        if not weights.is_file():
            raise PretrainedNotFoundError(f"{weights}: no such file (the folder has a config but no weights)")
        name = config["model"]["name"]
        family = model_family(name)
        builder = model_class(name)  # on the mixin itself: whichever class config.json names
        if cls.diffit_family is not None and family != cls.diffit_family:
            raise TypeError(
                f"{model_id} holds a {name} ({builder.__name__}), not a {cls.__name__}; load it with "
                f"{builder.__name__}.from_pretrained or DiffiTModelHubMixin.from_pretrained"
            )
        kwargs = resolve_model_kwargs(name, **config["model"].get("kwargs", {}))
        state = load_weights(weights, meta_state_shapes(lambda: builder(**kwargs), Path(model_id) / CONFIG_NAME))
        model = builder(**kwargs)
        model.load_state_dict(state, strict=strict)
        model.model_config = {"name": name, "kwargs": kwargs}
        model.pretrained_extra = {key: value for key, value in config.items() if key != "model"}
        return model.to(map_location).eval()
