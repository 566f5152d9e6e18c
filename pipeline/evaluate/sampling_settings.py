"""Sampling defaults per model (recorded set-up, else the paper's), the checks of the user's choices, and the
settings a sample store depends on (compared on resume)."""

from __future__ import annotations

import logging
from typing import Any

from diffit.guidance import GuidanceConfig
from diffit.sampling_config import FLOW_DEFAULT_STEPS, SamplingConfig
from pipeline import __version__
from pipeline.evaluate.model_loading import LoadedModel, network_settings
from pipeline.evaluate.options import EvaluateInputError, check_sampling_settings

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Sampling settings


# ImageNet guidance of the paper's text (latent ADM models, class-conditional), by decoded height: (scale,
# schedule). The released NVlabs/DiffiT code scores its 256-px FID 1.73 with 4.4 instead (`slurm_sample_256.sh`);
# `import-nvlabs` records that in the imported model's config.json, where `sampling_defaults` finds it. 512 px:
# 1.49 constant in both.
PAPER_GUIDANCE = {256: (4.6, "power-cosine"), 512: (1.49, "constant")}


def sampling_defaults(loaded: LoadedModel) -> tuple[dict[str, Any], str]:
    """Default sampler, steps, guidance scale and schedule of a model, and where they come from.

    A model whose config.json records a sampling set-up (`import-nvlabs` writes the released code's) gets it;
    otherwise the paper's settings for its kind: latent ADM models DDPM-250 with `PAPER_GUIDANCE` at 256 / 512 px
    (unguided elsewhere), image-space EDM models Heun with 18 steps at 32 px and 40 above, unguided. Pixels:
    the recorded "pixels" (`import-nvlabs` records "truncate", the released code's conversion), else "round"
    (the default for models trained here: DiT's and EDM's conversion).
    """
    height = loaded.resolution[0]
    conditional = loaded.num_classes > 0
    if loaded.kind == "flow":  # beyond the paper: `diffit.sampling_config.paper_sampling_config`'s flow default
        paper = {
            "sampler": "heun",
            "steps": FLOW_DEFAULT_STEPS,
            "guidance_scale": 1.0,
            "guidance_schedule": "constant",
            "pixels": "round",
        }
    elif loaded.kind == "adm":
        scale, schedule = PAPER_GUIDANCE.get(height, (1.0, "constant")) if conditional else (1.0, "constant")
        paper = {
            "sampler": "ddpm",
            "steps": 250,
            "guidance_scale": scale,
            "guidance_schedule": schedule,
            "pixels": "round",
        }
    else:
        paper = {
            "sampler": "edm-heun",
            "steps": 18 if height <= 32 else 40,
            "guidance_scale": 1.0,
            "guidance_schedule": "constant",
            "pixels": "round",
        }
    recorded = loaded.config.get("sampling") if isinstance(loaded.config, dict) else None
    if not isinstance(recorded, dict):
        return paper, "paper"
    chosen = {name: recorded.get(name, paper[name]) for name in paper}  # config.json's names are these
    return chosen, str(recorded.get("origin", "the model's config.json"))


def resolve_sampling(
    loaded: LoadedModel, settings: dict[str, Any], classes: list[int] | None = None
) -> tuple[SamplingConfig, list[str]]:
    """The `SamplingConfig` the model samples with: the model's kind and training chain, its defaults
    (`sampling_defaults`) for the settings not given, then `settings` (by name, `diffit.sampling_config.SETTINGS`);
    checked against the model. Also returns the defaults used, as "name=value" lines for logs and metrics.json."""
    from diffit.flow import FLOW_SAMPLERS
    from diffit.sampling_config import SamplingConfig

    check_sampling_settings(settings)
    given = {name: value for name, value in settings.items() if value is not None}
    default, origin = sampling_defaults(loaded)
    suffix = "" if origin == "paper" else f" ({origin})"
    # Not listed among the defaults used (recorded as "pixels" in every record): the conversion, not a sampler
    # setting.
    defaults = [f"{name}={value}{suffix}" for name, value in default.items() if name not in given and name != "pixels"]
    diffusion = loaded.config["diffusion"]
    model = SamplingConfig(
        kind=loaded.kind,
        diffusion_steps=int(diffusion.get("diffusion_steps", 1000)),
        noise_schedule=diffusion.get("noise_schedule", "linear"),
        sigma_data=float(diffusion.get("sigma_data", 0.5)),
        precond=str(diffusion.get("precond", "edm")),  # exports written before VP / VE: EDM's
        guidance=GuidanceConfig(),
    )
    config = model.with_settings(**{**default, **given})
    conditional = loaded.num_classes > 0
    if loaded.kind == "edm" and config.sampler != "edm-heun":
        raise EvaluateInputError(f"{loaded.model_dir}: an EDM model samples with edm-heun, not {config.sampler}")
    if (loaded.kind == "flow") != (config.sampler in FLOW_SAMPLERS):
        sampler = config.sampler
        what = "a flow model samples with" if loaded.kind == "flow" else f"{sampler} samples flow models only; use"
        choices = FLOW_SAMPLERS if loaded.kind == "flow" else ("ddpm", "ddim", "edm-heun")
        raise EvaluateInputError(f"{loaded.model_dir}: {what} {', '.join(choices)}, not {sampler}")
    scale = config.guidance.scale
    if scale != 1.0 and not conditional:
        raise EvaluateInputError(f"--guidance-scale {scale}: {loaded.model_dir} is unconditional (no guidance)")
    if classes is not None:
        if not conditional:
            raise EvaluateInputError(f"--classes: {loaded.model_dir} is unconditional")
        bad = [c for c in classes if not 0 <= c < loaded.num_classes]
        if bad or not classes:
            raise EvaluateInputError(f"--classes {classes}: labels must lie in [0, {loaded.num_classes})")
    return config, defaults


def sampling_record(config: SamplingConfig, classes: list[int] | None, seed: int) -> dict[str, Any]:
    """What was sampled, as metrics.json and the sample store record it: the model kind, every setting by its
    name (`SamplingConfig.settings`), the classes and the seed."""
    return {"kind": config.kind, **config.settings(), "classes": classes, "seed": int(seed)}


def store_settings(loaded: LoadedModel, sampling: dict[str, Any], num_samples: int) -> dict[str, Any]:
    """What the samples depend on (`sampling`: the `sampling_record`): stored in the zarr attributes and
    compared on resume."""
    # Content hashes, not paths: a moved model directory or VAE folder still resumes its store.
    model = {key: value for key, value in loaded.identity.items() if key not in ("path", "vae")}
    if "vae" in loaded.identity:
        vae = loaded.identity["vae"]
        model["vae"] = {"scaling_factor": vae["scaling_factor"], "path_hash": vae["path_hash"]}
    described = dict(sampling)
    if described["pixels"] == "round":  # the conversion of stores made before it was a setting: they still resume
        del described["pixels"]
    if described["guidance_interval"] is None:  # likewise: stores made before intervals existed still resume
        del described["guidance_interval"]
    settings = {
        "model": model,
        "sampling": described,
        "num_samples": int(num_samples),
        "resolution": list(loaded.resolution),
        "num_classes": loaded.num_classes,
        "package_version": __version__,
    }
    # bf16 or compiled forwards give (slightly) other samples, so they are part of what a store holds; the
    # default (fp32, eager) is left out so that stores made before these options existed still resume.
    if loaded.precision != "fp32" or loaded.compiled:
        settings["network"] = network_settings(loaded)
    if loaded.guide is not None:  # autoguidance: the guide's weights and config by content
        settings["guide_model"] = {k: v for k, v in loaded.guide.identity.items() if k not in ("path", "vae")}
    return settings
