"""Names of the places the time token enters a DiffiT transformer block (pure data, no torch)."""

# Where the time token x_t enters a `DiffiTTransformerBlock` (paper Sec. 3.2 and its ablations); the first is
# DiffiT itself. Here, where nothing imports torch
# (`diffit.config_check` checks files against them; `diffit.layers` builds them).
TIME_CONDITIONINGS = ("tmsa", "adaln", "adaln-relpos", "bias", "mlp", "decoupled")
# The two forms of DiT's adaLN-Zero modulation (Fig. 7b): "adaln" is DiT's block as DiT has it, plain attention
# without DiffiT's relative-position bias (two changes from TMSA at once: time moved to the modulation, bias
# dropped); "adaln-relpos" keeps the bias, so that against "tmsa" only where the time token enters changes.
ADALN_CONDITIONINGS = ("adaln", "adaln-relpos")
# Conditionings whose attention has no relative-position bias B (nor its index buffer).
NO_POSITION_BIAS = ("adaln",)
