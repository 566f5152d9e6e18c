"""A small CNN classifier for the offline class-consistency metric of the demo.

Without Inception weights, FID cannot say whether class-conditional samples show their class. Instead the demo
trains this classifier (about 100k parameters, a minute at most on a CPU) on the procedural dataset and reports
`class_consistency` = the fraction of samples generated for class k that the classifier assigns to class k. Its
accuracy on held-out *real* images is reported next to it: a consistency of 0.9 means little unless the
classifier itself is right on ~all real images.

The network (`SmallCNN`: four 3x3 conv stages with GroupNorm, SiLU, 2x2 max-pool after the first three, global
average pooling and a linear head), its configuration and `load_classifier` live in `pipeline.core.small_cnn`,
where the trainer loads it too (REPA's targets at demo scale); they are re-exported here. Inputs of another size
are resized (bilinear, antialiased) to the resolution the classifier was trained at.

Saved as a directory: `model.safetensors` + `config.json` (architecture, class names, training report), written
into a temporary directory that replaces the final one when complete (`staging.staged_directory`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.atomic import write_text_atomic
from pipeline.core.small_cnn import (  # the network and its file (the trainer loads it too: REPA's targets)
    CONFIG_NAME,
    MODEL_TYPE,
    WEIGHTS_NAME,
    ClassifierConfig,
    ClassifierError,
    SmallCNN,
)
from pipeline.core.small_cnn import load_classifier as load_classifier  # re-exported: the demo's own door to it
from pipeline.core.small_cnn import luminance as luminance
from pipeline.demo.labelled_images import LabelledImages, load_labelled_images
from pipeline.demo.staging import staged_directory

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Inputs


def _check_images(images: np.ndarray) -> np.ndarray:
    """Images must be uint8 [N, H, W, 3] (what samples and datasets are stored as)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ClassifierError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    return images


def to_input(images_uint8: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, R, R] in [-1, 1], resized to the classifier's resolution."""
    images = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if images.shape[-2:] != (resolution, resolution):
        images = F.interpolate(
            images, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )
    return images


def _gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Blur each image with its own Gaussian (sigma in pixels; 0 keeps it unchanged): one grouped convolution."""
    count, channels, height, width = images.shape
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype)
    weights = torch.exp(-0.5 * (offsets[None, :] / sigmas.clamp(min=1e-3)[:, None]) ** 2)
    weights = weights / weights.sum(dim=1, keepdim=True)  # [N, 2r+1]; sigma -> 0 gives the identity kernel
    kernels = weights.repeat_interleave(channels, dim=0)[:, None]  # one 1-D kernel per (image, channel)
    flat = F.pad(images.reshape(1, count * channels, height, width), [radius] * 4, mode="reflect")
    flat = F.conv2d(flat, kernels[:, :, None, :], groups=count * channels)  # horizontal pass
    flat = F.conv2d(flat, kernels[:, :, :, None], groups=count * channels)  # vertical pass
    return flat.reshape(count, channels, height, width)


def _degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur half of the images (sigma up to 1.5 px), scale each colour channel by 0.75-1.25, add a little noise.

    The classifier judges generated samples, which come out softer and with drifted colours (a VAE fitted for
    500 steps decodes blue squares purplish, orange crosses reddish, with blurred edges and halos). Trained on
    clean images only, it rejected 9% of such reconstructions of held-out images it classified correctly when
    clean; with these augmentations 1-4%, still at 100% on the clean held-out images.
    """
    blurred = torch.rand(images.shape[0], generator=generator) < 0.5
    sigmas = torch.where(blurred, torch.rand(images.shape[0], generator=generator) * 1.5, torch.zeros(()))
    images = _gaussian_blur(images, sigmas)
    # Per-channel gains around 1 (on [0, 1] intensities): a decoded sample's colours drift a little.
    gains = 1.0 + (torch.rand(images.shape[0], images.shape[1], 1, 1, generator=generator) - 0.5) * 0.5
    images = ((images + 1.0) * gains - 1.0).clamp(-1.0, 1.0)
    noise_levels = torch.rand(images.shape[0], 1, 1, 1, generator=generator) * 0.06
    return images + noise_levels * torch.randn(images.shape, generator=generator)


def _random_flips(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Horizontal and vertical flips, each with probability 1/2 (every procedural class is closed under them)."""
    flip_h = torch.rand(images.shape[0], generator=generator) < 0.5
    flip_v = torch.rand(images.shape[0], generator=generator) < 0.5
    images = torch.where(flip_h[:, None, None, None], images.flip(-1), images)
    return torch.where(flip_v[:, None, None, None], images.flip(-2), images)


# ----------------------------------------------------------------------------------------------------------------
# Prediction and the metric


@torch.no_grad()
def predict(model: SmallCNN, images_uint8_nhwc: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class index of every image: uint8 [N, H, W, 3] (any H = W) -> int64 [N]."""
    images = _check_images(images_uint8_nhwc)
    model.eval()
    labels = []
    for start in range(0, images.shape[0], batch_size):
        batch = to_input(images[start : start + batch_size], model.config.resolution)
        labels.append(model(batch).argmax(dim=1))
    if not labels:
        return np.zeros(0, dtype=np.int64)
    return torch.cat(labels).numpy().astype(np.int64)


@torch.no_grad()
def embed_images(model: SmallCNN, images_uint8_nhwc: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """`model.embed` of every image: uint8 [N, H, W, 3] -> float64 [N, D] (resized as `predict` does)."""
    images = _check_images(images_uint8_nhwc)
    model.eval()
    parts = [
        model.embed(to_input(images[start : start + batch_size], model.config.resolution))
        for start in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(parts).double().numpy() if parts else np.zeros((0, model.head.in_features))


def class_consistency(model: SmallCNN, images: np.ndarray, labels: np.ndarray | list[int]) -> float:
    """Fraction of images that the classifier assigns to the class they were generated for (or belong to)."""
    labels = np.asarray(labels, dtype=np.int64)
    images = _check_images(images)
    if labels.shape != (images.shape[0],):
        raise ClassifierError(f"{images.shape[0]} images but labels of shape {list(labels.shape)}")
    if images.shape[0] == 0:
        raise ClassifierError("class_consistency of an empty set of images")
    if labels.min() < 0 or labels.max() >= model.config.num_classes:
        raise ClassifierError(
            f"labels must lie in 0..{model.config.num_classes - 1} (the classifier's classes), "
            f"got {labels.min()}..{labels.max()}"
        )
    return float((predict(model, images) == labels).mean())


def per_class_accuracy(model: SmallCNN, images: np.ndarray, labels: np.ndarray) -> list[float | None]:
    """Accuracy within each class (None for classes without images): shows which classes a model fails."""
    predicted = predict(model, images)
    labels = np.asarray(labels)
    return [
        float((predicted[labels == k] == k).mean()) if (labels == k).any() else None
        for k in range(model.config.num_classes)
    ]


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading


def save_classifier(model: SmallCNN, out_path: str | os.PathLike, report: dict[str, Any] | None = None) -> Path:
    """Write `model.safetensors` + `config.json` into `out_path`, which appears complete or not at all."""
    from safetensors.torch import save_file

    out = Path(out_path).expanduser()
    with staged_directory(out) as temp:
        state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
        save_file(state, str(temp / WEIGHTS_NAME), metadata={"model_type": MODEL_TYPE})
        config = {"model_type": MODEL_TYPE, **asdict(model.config), "report": report or {}}
        write_text_atomic(temp / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return out


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """The training report stored with a classifier (accuracies, steps, time)."""
    return json.loads((Path(path).expanduser() / CONFIG_NAME).read_text(encoding="utf-8")).get("report", {})


# ----------------------------------------------------------------------------------------------------------------
# Training


def holdout_split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, holdout) index split of `count` items; holdout gets round(fraction * count) >= 1."""
    if not 0.0 < fraction < 1.0:
        raise ClassifierError(f"holdout fraction must be in (0, 1), got {fraction}")
    if count < 2:
        raise ClassifierError(f"need at least 2 images to hold some out, got {count}")
    order = np.random.default_rng([seed, 7919]).permutation(count)
    held = min(max(1, round(fraction * count)), count - 1)
    return np.sort(order[held:]), np.sort(order[:held])


def _labelled(data: LabelledImages, what: str) -> LabelledImages:
    """Refuse unlabelled data: a classifier needs class folders (or labelled packed shards)."""
    if data.num_classes == 0 or (data.labels < 0).any():
        raise ClassifierError(f"{what} {data.root} has no class labels (expected one folder per class)")
    return data


def _train_and_held_out(
    data: str | os.PathLike,
    holdout: str | os.PathLike | None,
    resolution: int,
    holdout_fraction: float,
    max_images: int | None,
    seed: int,
) -> tuple[LabelledImages, LabelledImages, LabelledImages]:
    """(everything read from `data`, training images, held-out images): `holdout` when given, else a
    `holdout_fraction` of `data` kept out of training."""
    dataset = _labelled(load_labelled_images(data, resolution, max_images=max_images, seed=seed), "dataset")
    if holdout is None:
        train_indices, held_indices = holdout_split(len(dataset), holdout_fraction, seed)
        return dataset, dataset.subset(train_indices), dataset.subset(held_indices)
    held_set = _labelled(load_labelled_images(holdout, resolution, seed=seed), "holdout set")
    if held_set.label_map != dataset.label_map:
        raise ClassifierError(
            f"the classes of the holdout set {held_set.root} ({sorted(held_set.label_map)}) differ from those "
            f"of {dataset.root} ({sorted(dataset.label_map)})"
        )
    return dataset, dataset, held_set


@dataclass(frozen=True)
class _Schedule:
    """How long and how fast the classifier is trained."""

    steps: int
    batch_size: int
    lr: float
    seed: int
    time_budget_s: float | None


def _optimiser(model: SmallCNN, schedule: _Schedule):
    """AdamW with a linear warm-up over the first 5% of the steps, then cosine decay to 0."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=1e-4)
    steps, warmup = schedule.steps, max(1, schedule.steps // 20)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(step, steps) / steps))
    )
    return optimizer, lr_schedule


def _fit(model: SmallCNN, train_set: LabelledImages, schedule: _Schedule, started: float, progress: bool) -> dict:
    """The training loop: random batches with flips and degradations (`_degrade`); stops after `steps` or when
    the time budget (counted from `started`) is spent. Returns steps, stopped_by and final_loss."""
    generator = torch.Generator().manual_seed(schedule.seed)
    optimizer, lr_schedule = _optimiser(model, schedule)
    train_images = to_input(train_set.images, model.config.resolution)  # the whole (small) set, once
    train_labels = torch.from_numpy(train_set.labels)
    iterator, bar = range(schedule.steps), None
    if progress:
        from tqdm import tqdm

        iterator = bar = tqdm(iterator, desc="classifier", unit="step", mininterval=1.0)
    model.train()
    step = loss_value = 0
    stopped_by = "steps"
    for step in iterator:
        indices = torch.randint(len(train_set), (schedule.batch_size,), generator=generator)
        batch = _degrade(_random_flips(train_images[indices], generator), generator)
        loss = F.cross_entropy(model(batch), train_labels[indices])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        loss_value = float(loss.detach())
        if bar is not None and step % 20 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}")
        if schedule.time_budget_s is not None and time.perf_counter() - started > schedule.time_budget_s:
            stopped_by = "time_budget"
            logger.warning(
                "classifier training stopped by the time budget after %d of %d steps", step + 1, schedule.steps
            )
            break
    if bar is not None:
        bar.close()
    return {"steps": step + 1, "stopped_by": stopped_by, "final_loss": loss_value}


def _new_model(
    dataset: LabelledImages, resolution: int, channels: tuple[int, ...], grayscale: bool, seed: int
) -> SmallCNN:
    """A freshly initialised classifier for the classes of `dataset` (initialisation fixed by `seed`)."""
    config = ClassifierConfig(
        num_classes=dataset.num_classes,
        resolution=resolution,
        channels=tuple(channels),
        class_names=sorted(dataset.label_map, key=dataset.label_map.get),
        grayscale=grayscale,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SmallCNN(config)


def _accuracies(model: SmallCNN, train_set: LabelledImages, held_set: LabelledImages) -> dict[str, Any]:
    """Accuracy on the training and held-out images, and per class on the held-out ones."""
    return {
        "train_acc": class_consistency(model, train_set.images, train_set.labels),
        "holdout_acc": class_consistency(model, held_set.images, held_set.labels),
        "holdout_per_class_acc": per_class_accuracy(model, held_set.images, held_set.labels),
    }


def train_classifier(
    data: str | os.PathLike,
    out_path: str | os.PathLike,
    resolution: int = 32,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    holdout: str | os.PathLike | None = None,
    holdout_fraction: float = 0.1,
    channels: tuple[int, ...] = (32, 64, 64, 64),
    max_images: int | None = None,
    time_budget_s: float | None = None,
    progress: bool = True,
    grayscale: bool = False,
) -> dict[str, Any]:
    """Train the classifier on `data` (class folders, a procedural dataset root, or packed raw shards) and save it.

    Held-out accuracy is measured on `holdout` (e.g. the `holdout` split of a procedural dataset) when given,
    else on a `holdout_fraction` of `data` kept out of training. AdamW with a linear warm-up and cosine decay;
    random flips, blur, colour gains and noise (see `_degrade`). `grayscale`: the classifier sees luminance only.
    Deterministic under `seed` for a given thread count, unless `time_budget_s` stops it early. Images are read at
    `resolution` (ADM centre crop, like `pack`); `predict` resizes other sizes with an antialiased bilinear
    filter. Returns the report also stored in `config.json`: train_acc, holdout_acc, per-class holdout accuracy,
    steps, seconds, image counts.
    """
    if steps < 1 or batch_size < 1 or resolution < 8:
        raise ClassifierError(
            f"need steps >= 1, batch_size >= 1, resolution >= 8 (got {steps}, {batch_size}, {resolution})"
        )
    started = time.perf_counter()
    dataset, train_set, held_set = _train_and_held_out(data, holdout, resolution, holdout_fraction, max_images, seed)
    counts = (len(train_set), len(held_set), dataset.num_classes, resolution, steps)
    logger.info("classifier: %d training / %d held-out images, %d classes, %d px, %d steps", *counts)
    model = _new_model(dataset, resolution, channels, grayscale, seed)
    outcome = _fit(model, train_set, _Schedule(steps, batch_size, lr, seed, time_budget_s), started, progress)
    train_seconds = time.perf_counter() - started

    report = {
        **_accuracies(model, train_set, held_set),
        **outcome,
        "train_images": len(train_set),
        "holdout_images": len(held_set),
        "holdout_source": str(holdout) if holdout is not None else f"{holdout_fraction:.0%} of {dataset.root}",
        "data": dataset.root,
        "resolution": resolution,
        "grayscale": grayscale,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(train_seconds, 2),
    }
    save_classifier(model, out_path, report)
    logger.info(
        "classifier saved to %s: held-out accuracy %.4f (%.1f s)", out_path, report["holdout_acc"], train_seconds
    )
    return report
