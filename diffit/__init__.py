"""DiffiT model and diffusion library: pure torch, no dataset or network I/O.

`create_model("DiffiT-XL/2")` builds a named configuration; `save_pretrained` / `load_pretrained` write and
read an exported model directory (safetensors + config.json). The model classes follow the Hugging Face Hub
conventions (`LatentDiffiT.from_pretrained(dir or hub id)`, `model.save_pretrained(dir)`, `push_to_hub`;
`diffit.hub`), and `DiffiTPipeline` is a diffusers pipeline around an export (`diffit.pipeline_diffit`).

`DiffiTPipeline` and the model classes are loaded on first use, so `import diffit` imports neither diffusers nor
the Hub client (training processes stay light).
"""

from .io import load_pretrained, save_pretrained
from .models import MODEL_CONFIGS, count_flops, count_parameters, create_model

# name -> module that defines it, imported on first attribute access (PEP 562).
_LAZY = {
    "DiffiTPipeline": "pipeline_diffit",
    "DiffiTModelHubMixin": "hub",
    "LatentDiffiT": "latent",
    "DiffiTUNet": "unet",
}

__all__ = [
    "MODEL_CONFIGS",
    "DiffiTModelHubMixin",
    "DiffiTPipeline",
    "DiffiTUNet",
    "LatentDiffiT",
    "count_flops",
    "count_parameters",
    "create_model",
    "load_pretrained",
    "save_pretrained",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
