"""Sampling defaults per model (recorded set-up, else the paper's), the checks of the user's choices, and the
settings a sample store depends on (compared on resume)."""

from __future__ import annotations

import logging
from typing import Any

from diffit.sampling import FLOW_DEFAULT_STEPS
from pipeline import __version__
from pipeline.evaluate.model_loading import LoadedModel, network_settings
from pipeline.evaluate.options import EvaluateInputError, ResolvedSampling, SamplingOptions

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
    if loaded.kind == "flow":  # beyond the paper: `diffit.sampling.paper_sampling_config`'s flow default
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


def resolve_sampling(loaded: LoadedModel, options: SamplingOptions) -> ResolvedSampling:
    """Fill unset sampling options with the model's defaults (`sampling_defaults`), and check the rest."""
    from diffit.flow import FLOW_SAMPLERS
    from diffit.guidance import SCHEDULES
    from diffit.sampling import PIXEL_QUANTIZATIONS, SAMPLERS

    defaults: list[str] = []
    conditional = loaded.num_classes > 0
    default, origin = sampling_defaults(loaded)
    suffix = "" if origin == "paper" else f" ({origin})"

    def pick(name: str, given):
        if given is None:
            defaults.append(f"{name}={default[name]}{suffix}")
            return default[name]
        return given

    sampler = pick("sampler", options.sampler)
    steps = int(pick("steps", options.steps))
    scale = float(pick("guidance_scale", options.guidance_scale))
    schedule = pick("guidance_schedule", options.guidance_schedule)
    # Not listed in defaults_used (recorded as "pixels" in every record): the conversion, not a sampler setting.
    pixels = options.pixels if options.pixels is not None else default["pixels"]
    if pixels not in PIXEL_QUANTIZATIONS:
        raise EvaluateInputError(f"--pixels {pixels}: expected one of {', '.join(PIXEL_QUANTIZATIONS)}")
    if sampler not in SAMPLERS:
        raise EvaluateInputError(f"--sampler {sampler}: expected one of {SAMPLERS}")
    if loaded.kind == "edm" and sampler != "edm-heun":
        raise EvaluateInputError(f"{loaded.model_dir}: an EDM model samples with edm-heun, not {sampler}")
    if (loaded.kind == "flow") != (sampler in FLOW_SAMPLERS):
        what = "a flow model samples with" if loaded.kind == "flow" else f"{sampler} samples flow models only; use"
        choices = FLOW_SAMPLERS if loaded.kind == "flow" else ("ddpm", "ddim", "edm-heun")
        raise EvaluateInputError(f"{loaded.model_dir}: {what} {', '.join(choices)}, not {sampler}")
    if schedule not in SCHEDULES:
        raise EvaluateInputError(f"--guidance-schedule {schedule}: expected one of {SCHEDULES}")
    if steps < 1:
        raise EvaluateInputError(f"--steps must be >= 1, got {steps}")
    if scale != 1.0 and not conditional:
        raise EvaluateInputError(f"--guidance-scale {scale}: {loaded.model_dir} is unconditional (no guidance)")
    classes = options.classes
    if classes is not None:
        if not conditional:
            raise EvaluateInputError(f"--classes: {loaded.model_dir} is unconditional")
        bad = [c for c in classes if not 0 <= c < loaded.num_classes]
        if bad or not classes:
            raise EvaluateInputError(f"--classes {classes}: labels must lie in [0, {loaded.num_classes})")
    return ResolvedSampling(
        kind=loaded.kind,
        sampler=sampler,
        steps=int(steps),
        guidance_scale=scale,
        guidance_schedule=schedule,
        guidance_power=float(options.guidance_power),
        guidance_channels=3 if options.guidance_channels == "3" else None,
        classes=list(classes) if classes is not None else None,
        seed=int(options.seed),
        eta=float(options.eta),
        pixels=pixels,
        defaults_used=defaults,
        guidance_interval=[float(v) for v in options.guidance_interval] if options.guidance_interval else None,
    )


def store_settings(loaded: LoadedModel, sampling: ResolvedSampling, num_samples: int) -> dict[str, Any]:
    """What the samples depend on: stored in the zarr attributes and compared on resume."""
    # Content hashes, not paths: a moved model directory or VAE folder still resumes its store.
    model = {key: value for key, value in loaded.identity.items() if key not in ("path", "vae")}
    if "vae" in loaded.identity:
        vae = loaded.identity["vae"]
        model["vae"] = {"scaling_factor": vae["scaling_factor"], "path_hash": vae["path_hash"]}
    described = sampling.describe()
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
