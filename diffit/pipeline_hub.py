"""A `DiffiTPipeline` on the Hugging Face Hub (diffusers keeps the Hub apart from the pipeline): `push_to_hub`
saves the pipeline into a temporary folder and uploads it in one commit, `push_folder` uploads a folder
`save_pretrained` wrote (`save_pretrained(DIR, push_to_hub=True, repo_id=...)`), both with this library's model card
(`model_card`, from `PIPELINE_CARD`: library `diffit`, the `DiffiTPipeline.from_pretrained(repo_id)` usage;
diffusers' own card would name diffusers, whose `DiffusionPipeline.from_pretrained` cannot load this pipeline).
`DiffiTPipeline.push_to_hub` / `.model_card` / `.save_pretrained` call these; huggingface_hub is imported on use.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .pipeline_diffit import DiffiTPipeline

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


def push_to_hub(
    pipe: DiffiTPipeline,
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
        pipe.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
        return push_folder(
            pipe,
            Path(folder),
            repo_id,
            token=token,
            private=private,
            commit_message=commit_message,
            create_pr=create_pr,
            path_in_repo=subfolder,
        )


def push_folder(
    pipe: DiffiTPipeline,
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
        (folder / "README.md").write_text(model_card(pipe, repo_id))
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        path_in_repo=path_in_repo,
        commit_message=commit_message or "Upload DiffiTPipeline",
        create_pr=create_pr,
    )


def model_card(pipe: DiffiTPipeline, repo_id: str) -> str:
    """README.md of `pipe`'s hub repository `repo_id` (library `diffit`, usage with `repo_id`)."""
    from huggingface_hub import ModelCard, ModelCardData

    config = pipe.sampling_config
    call = "class_labels=[207, 360]" if pipe.transformer.num_classes else "batch_size=2"
    vae_part = ", `vae/` the diffusers AutoencoderKL that decodes its latents," if pipe.vae is not None else ""
    card = ModelCard.from_template(
        ModelCardData(library_name="diffit", tags=["diffit", "diffusion", "image-generation"]),
        template_str=PIPELINE_CARD,
        model_name=pipe.transformer.model_config["name"],
        vae_part=vae_part,
        sampler=config.sampler,
        steps=config.steps,
        repo_id=repo_id,
        call=call,
    )
    return str(card)
