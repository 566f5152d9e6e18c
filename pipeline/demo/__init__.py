"""The embedded default: a procedural labelled dataset, a small VAE fitted on it, a classifier that judges
samples, and `run_demo`, which drives encode -> train -> evaluate -> report on them through those stages' public
APIs.

`procedural` draws the dataset, `labelled_images` loads small image datasets into memory, `vae_fit` fits the
domain AutoencoderKL (`vae_fit_config` its settings, `vae_fit_math` its batches, loss and measures,
`vae_fit_output` its output directory), `classifier` is the class-consistency yardstick, `run` is the demo
itself, `staging` publishes whole output directories. Other packages (and the CLI) use what this package
exports, never its modules' internals.
"""

from pipeline.demo.classifier import (
    ClassifierError,
    class_consistency,
    embed_images,
    load_classifier,
    predict,
    train_classifier,
)
from pipeline.demo.labelled_images import load_labelled_images
from pipeline.demo.procedural import ProceduralDatasetError, generate_dataset
from pipeline.demo.run import DemoOptions, DemoSettings, format_summary, run_demo
from pipeline.demo.vae_fit import fit_vae
from pipeline.demo.vae_fit_config import VAEFitConfig, VAEFitError

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
