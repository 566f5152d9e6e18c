"""DiffiT model and diffusion library: pure torch, no dataset or network I/O.

`create_model("DiffiT-XL/2")` builds a named configuration; `save_pretrained` / `load_pretrained` write and
read an exported model directory (safetensors + config.json).
"""

from .io import load_pretrained, save_pretrained
from .models import MODEL_CONFIGS, count_flops, count_parameters, create_model

__all__ = ["MODEL_CONFIGS", "count_flops", "count_parameters", "create_model", "load_pretrained", "save_pretrained"]
