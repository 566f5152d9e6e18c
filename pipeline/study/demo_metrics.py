"""The demo-scale metrics: `FD_demo` (a Fréchet distance in the feature space of the demo's own classifier) and
the class / shape consistency of the samples.

Without the Inception weights FID cannot be computed here, so studies at demo scale measure sample quality in the
feature space of the small CNN that `pipeline.demo` trains on the procedural dataset (`train_classifier`): the
input of its linear head, i.e. the global average of its last conv stage (64 dimensions with the default
`channels=(32, 64, 64, 64)`). `FD_demo` = Fréchet distance between a Gaussian fitted to the samples' features and
one fitted to the reference images' features, with the ADM evaluator's formula (`pipeline.evaluate.
frechet_distance`). It is never called FID: its scale and its bias for small sample counts are its own, so values
are comparable only within one study (same classifier, reference and sample count, which a study fixes). Each
result records the feature dimension and both image counts.

Class consistency: the fraction of samples generated for class k that the colour classifier assigns to k; shape
consistency the same with the grayscale classifier (every procedural class has its own colour, so only the
second needs the right shape). Both need a class-conditional model.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.study.spec import StudyError

FD_DEMO = "FD_demo"
DEFAULT_MAX_REFERENCE_IMAGES = 5000


def classifier_features(model, images: np.ndarray) -> np.ndarray:
    """The classifier's head inputs [N, D] (float64) for uint8 images [N, H, W, 3] (`SmallCNN.embed`, with the
    same resizing and grayscale conversion as the consistency metric)."""
    from pipeline.demo import embed_images

    return embed_images(model, images)


@functools.lru_cache(maxsize=4)
def _classifier(path: str):
    from pipeline.demo import load_classifier

    return load_classifier(path)


@functools.lru_cache(maxsize=4)
def reference_statistics(classifier: str, reference: str, resolution: int, max_images: int):
    """(mu, sigma, count) of the reference images' features; computed once per process and reused by every run."""
    from pipeline.demo import load_labelled_images
    from pipeline.evaluate import feature_statistics

    images = load_labelled_images(reference, resolution, max_images=max_images).images
    if len(images) < 2:
        raise StudyError(f"demo_metrics.reference {reference}: {len(images)} images; FD_demo needs at least 2")
    mu, sigma = feature_statistics(classifier_features(_classifier(classifier), images))
    return mu, sigma, len(images)


def demo_metrics(settings: dict[str, Any], images: np.ndarray, labels: np.ndarray) -> tuple[dict, dict]:
    """(values, details) of FD_demo and the consistencies for samples `images` with their class `labels`."""
    from pipeline.demo import predict
    from pipeline.evaluate import feature_statistics, frechet_distance

    values: dict[str, float] = {}
    details: dict[str, Any] = {}
    classifier_path = settings.get("classifier")
    if classifier_path:
        classifier = _classifier(str(Path(classifier_path).resolve()))
        reference = settings.get("reference")
        if reference:
            max_images = int(settings.get("max_reference_images") or DEFAULT_MAX_REFERENCE_IMAGES)
            mu_ref, sigma_ref, count = reference_statistics(
                str(Path(classifier_path).resolve()), str(reference), int(images.shape[1]), max_images
            )
            if len(images) < 2:
                raise StudyError(f"FD_demo needs at least 2 samples, got {len(images)}")
            mu, sigma = feature_statistics(classifier_features(classifier, images))
            values[FD_DEMO] = frechet_distance(mu, sigma, mu_ref, sigma_ref)
            details[FD_DEMO] = {
                "feature_dim": int(mu.shape[0]),
                "num_samples": int(len(images)),
                "num_reference_images": int(count),
                "features": "demo classifier head input (global average of the last conv stage)",
            }
        if (labels >= 0).all():
            values["class_consistency"] = float(np.mean(predict(classifier, images) == labels))
    shape_path = settings.get("shape_classifier")
    if shape_path and (labels >= 0).all():
        shape = _classifier(str(Path(shape_path).resolve()))
        values["shape_consistency"] = float(np.mean(predict(shape, images) == labels))
    return values, details
