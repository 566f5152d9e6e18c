"""The embedded default: a procedural labelled dataset, a small VAE fitted on it, a classifier that judges
samples, and `run_demo`, which drives encode -> train -> evaluate -> report on them through those stages' public
APIs.

`procedural` draws and loads the dataset, `vae_fit` fits the domain AutoencoderKL, `classifier` is the
class-consistency yardstick, `run` is the demo itself, `staging` publishes whole output directories. Other
packages (and the CLI) use what this package exports, never its modules' internals.
"""

from pipeline.demo.classifier import (
    ClassifierError,
    class_consistency,
    embed_images,
    load_classifier,
    predict,
    train_classifier,
)
from pipeline.demo.procedural import ProceduralDatasetError, generate_dataset, load_labelled_images
from pipeline.demo.run import DemoOptions, DemoSettings, format_summary, run_demo
from pipeline.demo.vae_fit import VAEFitConfig, VAEFitError, fit_vae

__all__ = [
    "ClassifierError",
    "DemoOptions",
    "DemoSettings",
    "ProceduralDatasetError",
    "VAEFitConfig",
    "VAEFitError",
    "class_consistency",
    "embed_images",
    "fit_vae",
    "format_summary",
    "generate_dataset",
    "load_classifier",
    "load_labelled_images",
    "predict",
    "run_demo",
    "train_classifier",
]
