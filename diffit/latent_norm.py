"""How VAE latents become what a latent model trains on, and back: ONE definition for the trainer and every decoder.

`LatentNorm` is one of two kinds:

* `scalar` (Stable Diffusion, SD3, FLUX: the VAE's own constants): `x = scaling_factor * (z - shift_factor)`, and
  `z = x / scaling_factor + shift_factor` to decode (diffusers' SD3 convention; with `shift_factor` 0 it is the SD
  VAE's `z * 0.18215`, and decoding divides by the factor exactly as before).
* `channel` (per-channel standardisation, as EDM2 and LightningDiT): `x = (z - mean[c]) / std[c]`, and
  `z = x * std[c] + mean[c]` to decode, with `mean` / `std` the dataset's per-channel statistics of the posterior
  means (`diffit-pipe encode` records them in its manifest as `latent_stats`).

`z` is the VAE posterior (unscaled: what `AutoencoderKL.encode(...).latent_dist` gives, and what `decode` takes).
An export records its norm as the config.json entry `"latent_norm": LatentNorm.to_dict()` beside `"vae"`; an export
written before that entry existed means `scalar` with the `vae` entry's `scaling_factor` and no shift
(`export_latent_norm`). Every number is checked when a norm is built (`from_dict` refuses NaN, inf, a std that is
not positive, lists of the wrong length or longer than `MAX_LATENT_CHANNELS`). No torch at import (the config
checks use this module); `normalize` / `denormalize` take torch tensors [..., C, h, w].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

LATENT_NORM_KINDS = ("scalar", "channel")
# What an AutoencoderKL config may declare (`diffit.pipeline_check.VAE_CONFIG_BOUNDS`, which imports this module; a
# test pins the two equal).
MAX_LATENT_CHANNELS = 256
MAX_FACTOR = 1e6  # scaling factors, shifts, means and stds are O(1) for every real VAE
_FIELDS = {"scalar": ("kind", "scaling_factor", "shift_factor"), "channel": ("kind", "mean", "std")}


def _number(where: str, value: Any, positive: bool = False) -> float:
    """`value` as a float: a finite number (bool refused), |value| <= MAX_FACTOR, > 0 when `positive`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r:.80}")
    value = float(value)
    if not math.isfinite(value) or abs(value) > MAX_FACTOR:
        raise ValueError(f"{where} must be a finite number of magnitude at most {MAX_FACTOR:g}, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{where} must be positive, got {value!r}")
    return value


def _numbers(where: str, values: Any, positive: bool = False) -> tuple[float, ...]:
    """A list of 1 .. MAX_LATENT_CHANNELS numbers, each checked by `_number`."""
    if not isinstance(values, (list, tuple)) or not 1 <= len(values) <= MAX_LATENT_CHANNELS:
        shown = f"{len(values)} entries" if isinstance(values, (list, tuple)) else repr(values)[:80]
        raise ValueError(f"{where} must be a list of 1 to {MAX_LATENT_CHANNELS} numbers, got {shown}")
    return tuple(_number(f"{where}[{index}]", value, positive) for index, value in enumerate(values))


@dataclass(frozen=True)
class LatentNorm:
    """The map between VAE latents `z` and model latents `x` (see the module docstring); checked when built."""

    kind: str = "scalar"
    scaling_factor: float = 1.0  # scalar only
    shift_factor: float = 0.0  # scalar only
    mean: tuple[float, ...] | None = None  # channel only: per-channel mean of the posterior means
    std: tuple[float, ...] | None = None  # channel only: per-channel std of the posterior means

    def __post_init__(self) -> None:
        if self.kind == "scalar":
            if self.mean is not None or self.std is not None:
                raise ValueError("latent_norm: a scalar norm has no per-channel mean / std")
            object.__setattr__(self, "scaling_factor", _number("latent_norm.scaling_factor", self.scaling_factor, True))
            object.__setattr__(self, "shift_factor", _number("latent_norm.shift_factor", self.shift_factor))
        elif self.kind == "channel":
            mean, std = _numbers("latent_norm.mean", self.mean), _numbers("latent_norm.std", self.std, True)
            if len(mean) != len(std):
                raise ValueError(f"latent_norm: mean has {len(mean)} channels, std {len(std)}")
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "std", std)
        else:
            raise ValueError(f"latent_norm.kind must be one of {list(LATENT_NORM_KINDS)}, got {self.kind!r:.80}")

    @classmethod
    def scalar(cls, scaling_factor: float, shift_factor: float | None = 0.0) -> LatentNorm:
        """x = scaling_factor * (z - shift_factor) (a `None` shift, as diffusers' SD VAE configs hold, is 0)."""
        return cls("scalar", scaling_factor, 0.0 if shift_factor is None else shift_factor)

    @classmethod
    def channel(cls, mean: Sequence[float], std: Sequence[float]) -> LatentNorm:
        """x = (z - mean[c]) / std[c]."""
        return cls("channel", mean=tuple(mean), std=tuple(std))

    @property
    def channels(self) -> int | None:
        """The latent channels a channel norm is for (None: a scalar norm fits any)."""
        return None if self.mean is None else len(self.mean)

    def check_channels(self, channels: int, where: str = "latent_norm") -> None:
        """ValueError when a channel norm does not have `channels` entries."""
        if self.channels is not None and self.channels != int(channels):
            raise ValueError(
                f"{where}: per-channel statistics for {self.channels} channels, the latents have {channels}"
            )

    def _per_channel(self, values: tuple[float, ...], like):
        import torch

        return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)

    def normalize(self, z):
        """VAE latents z [..., C, h, w] -> model latents x (what the model trains on and samples)."""
        if self.kind == "scalar":
            return (z - self.shift_factor) * self.scaling_factor
        self.check_channels(z.shape[-3])
        return (z - self._per_channel(self.mean, z)) / self._per_channel(self.std, z)

    def denormalize(self, x):
        """Model latents x [..., C, h, w] -> VAE latents z (what `AutoencoderKL.decode` takes)."""
        if self.kind == "scalar":
            return x / self.scaling_factor + self.shift_factor
        self.check_channels(x.shape[-3])
        return x * self._per_channel(self.std, x) + self._per_channel(self.mean, x)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (an export's "latent_norm" entry, a checkpoint's train state)."""
        if self.kind == "scalar":
            return {"kind": "scalar", "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}
        return {"kind": "channel", "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, entry: Any, channels: int | None = None) -> LatentNorm:
        """A checked norm from its JSON form: known keys only, finite numbers, std > 0, lists of at most
        MAX_LATENT_CHANNELS entries (and `channels` of them when given); ValueError otherwise."""
        if not isinstance(entry, Mapping):
            raise ValueError(f"latent_norm must be an object, got {type(entry).__name__}")
        kind = entry.get("kind")
        if kind not in LATENT_NORM_KINDS:
            raise ValueError(f"latent_norm.kind must be one of {list(LATENT_NORM_KINDS)}, got {kind!r:.80}")
        unknown = sorted(str(key)[:80] for key in entry if key not in _FIELDS[kind])
        missing = [key for key in _FIELDS[kind] if key not in entry]
        if unknown or missing:
            raise ValueError(f"latent_norm ({kind}) has unknown keys {unknown} / lacks {missing}")
        if kind == "scalar":
            norm = cls("scalar", entry["scaling_factor"], entry["shift_factor"])
        else:
            norm = cls("channel", mean=entry["mean"], std=entry["std"])
        if channels is not None:
            norm.check_channels(channels)
        return norm


def export_latent_norm(config: Mapping[str, Any], channels: int | None = None) -> LatentNorm | None:
    """The norm an export's config.json (or a checkpoint's train state) records: its "latent_norm" entry, else -
    written before that entry existed - scalar with the "vae" entry's `scaling_factor` and no shift. None for a
    model without either (image space). ValueError for a bad entry or a `vae` without a usable scaling factor."""
    if config.get("latent_norm") is not None:
        return LatentNorm.from_dict(config["latent_norm"], channels)
    vae = config.get("vae")
    if not isinstance(vae, Mapping):
        return None
    if vae.get("scaling_factor") is None:
        raise ValueError("'vae' lacks 'scaling_factor' (the factor the model's latents were multiplied by in training)")
    return LatentNorm.scalar(_number("vae.scaling_factor", vae["scaling_factor"], positive=True))
