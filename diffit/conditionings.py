"""Names of the places the time token enters a DiffiT transformer block (pure data, no torch)."""

# Where the time token x_t enters a `DiffiTTransformerBlock` (paper Sec. 3.2 and its ablations); the first is
# DiffiT itself. Here, where nothing imports torch
# (`diffit.config_check` checks files against them; `diffit.layers` builds them).
TIME_CONDITIONINGS = ("tmsa", "adaln", "adaln-relpos", "bias", "mlp", "decoupled", "added-per-stage")
# The two forms of DiT's adaLN-Zero modulation (Fig. 7b): "adaln" is DiT's block as DiT has it, plain attention
# without DiffiT's relative-position bias (two changes from TMSA at once: time moved to the modulation, bias
# dropped); "adaln-relpos" keeps the bias, so that against "tmsa" only where the time token enters changes.
ADALN_CONDITIONINGS = ("adaln", "adaln-relpos")
# Conditionings whose attention has no relative-position bias B (nor its index buffer).
NO_POSITION_BIAS = ("adaln",)
# Conditionings where the time token does not enter the blocks at all but the U-Net's stages (Table 4's "the
# projected temporal component is adaptively scaled and simply added to the spatial component in each stage"):
# the block is TMSA without its time term (windowed attention and relative position bias kept), and the U-Net adds
# a FiLM of the time token at the start of each stage (`diffit.unet.StageTimeFiLM`). The latent DiffiT has no
# stages and refuses them.
STAGE_CONDITIONINGS = ("added-per-stage",)
# What the latent DiffiT accepts.
LATENT_TIME_CONDITIONINGS = tuple(c for c in TIME_CONDITIONINGS if c not in STAGE_CONDITIONINGS)
