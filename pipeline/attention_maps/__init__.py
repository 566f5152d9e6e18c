"""The attention-maps stage: an exported model -> a PNG of TMSA attention over the diffusion time (rows block x
head, columns time) and the raw maps as .npz beside it (the paper's Figs. 2 / 5).

`options`: what it is asked (`AttentionMapsOptions`, parsed from the flags) and the checks against the model;
`render`: the picture; `run`: the door, `run_attention_maps`. The capture itself is `diffit.attention_maps` (pure).
Other packages use what this package exports.
"""

from pipeline.attention_maps.options import AttentionMapsOptions
from pipeline.attention_maps.run import AttentionMapsResult, run_attention_maps

__all__ = ["AttentionMapsOptions", "AttentionMapsResult", "run_attention_maps"]
