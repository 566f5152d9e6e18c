"""FID and FD_DINOv2 of the EMA model during training (`eval.every` > 0), logged as `fid_{N}k` / `fd_dinov2_{N}k`
with the step.

Every `eval.every` steps all processes sample their contiguous share of the sample indices 0..N-1 from the EMA
model, with the evaluate stage's per-sample noise seeds and class labels (`sample_noise_seeds` /
`sample_class_labels` of (`eval.seed`, index)), so the N images are the same for any number of processes and
are the images `diffit-pipe evaluate --seed S --num-samples N` draws from the exported EMA. Latent samples are
decoded through the dataset's VAE (`vae.decode(latent_norm.denormalize(latents))`, as the evaluate stage decodes), the
images converted to uint8 as the evaluate stage stores them, and each process computes its images' features for
each of `eval.metrics` (Inception's for `fid`; DINOv2 ViT-L/14 CLS for `fd_dinov2`, as `pipeline.evaluate.dinov2`
computes them: one set of samples serves both). The features are gathered (`accelerator.gather`) in index order;
the main process computes their mean and covariance and the Fréchet distance to the reference's statistics --
stored ones, or those of its features, which the evaluate stage caches on disk (`.fidelity-cache` beside the
reference) and this module keeps in memory after the first evaluation (for FD_DINOv2 the reference's stored
`mu_dinov2` / `sigma_dinov2` when it has them, as `diffit-pipe evaluate`).

Keys: `fid_{N/1000:g}k` (5000 samples: `fid_5k`, 50: `fid_0.05k`) and `fd_dinov2_{N/1000:g}k`. With Inception
weights that are not the official torch-fidelity file (DINOv2 weights not recognised as the published ViT-L/14) the
value goes under `plumbing_only_fid_{N/1000:g}k` (`plumbing_only_fd_dinov2_...`) instead, never under a `fid_*` /
`fd_dinov2_*` key (the run report plots those numeric keys as the metric), and `fid_note` (`fd_dinov2_note`) holds
the plumbing-only label (the report lists text values of those keys as notes).

The sampling runs inside `torch.random.fork_rng`, so the training RNG stream is the same with and without it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pipeline.train.checks import DatasetInfo
from pipeline.train.config import Config

logger = logging.getLogger(__name__)

PLUMBING_PREFIX = "plumbing_only_"


def metric_key(metric: str, num_samples: int, official: bool) -> str:
    """`fid_5k` for FID on 5000 samples (`fid_0.05k` for 50), `fd_dinov2_5k` for FD_DINOv2; prefixed with
    `plumbing_only_` for weights that are not the official / published ones."""
    key = f"{metric}_{num_samples / 1000:g}k"
    return key if official else PLUMBING_PREFIX + key


def fid_key(num_samples: int, official: bool) -> str:
    """`fid_5k` for 5000 samples (`fid_0.05k` for 50); `plumbing_only_fid_5k` for non-official weights."""
    return metric_key("fid", num_samples, official)


def index_share(num_samples: int, rank: int, world_size: int) -> range:
    """The contiguous sample indices of one process (the first `num_samples % world_size` get one more)."""
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def rng_devices(device) -> list:
    """The CUDA device whose RNG `torch.random.fork_rng` must also save (none off CUDA)."""
    return [device] if device.type == "cuda" else []


def eval_sampling_config(config: Config, conditional: bool):
    """The `SamplingConfig` of the FID samples: the `eval` section's sampling settings, unset ones from `sample`
    (`pipeline.train.samples.sampling_config`), so both sections speak the evaluate stage's names."""
    from pipeline.train.config import sampling_settings
    from pipeline.train.samples import sampling_config

    chosen = {name: value for name, value in sampling_settings(config.eval).items() if value is not None}
    return sampling_config(config, conditional, {**sampling_settings(config.sample), **chosen})


class InceptionFID:
    """FID: Inception features of the samples against the reference's (cached) Inception statistics."""

    name = "fid"

    def __init__(self, config: Config, cuda: bool):
        from pipeline.evaluate import FeatureConfig, resolve_inception_weights

        ev = config.eval
        weights = resolve_inception_weights(ev.inception_weights)
        self.features_config = FeatureConfig(
            weights=weights,
            layer_fid=ev.feature_layer,
            batch_size=ev.feature_batch_size,
            cuda=cuda,
            num_workers=0,
            progress=False,
        )
        self.layer = ev.feature_layer
        self.key = metric_key("fid", ev.num_samples, weights.official)
        self.label = weights.label
        self.extractor = None
        self.statistics = None  # (mu, sigma) of the reference, main process, after the first evaluation

    @property
    def device(self):
        return self.features_config.device

    def features(self, images):
        from pipeline.evaluate import ArrayDataset, create_feature_extractor, extract_features

        if self.extractor is None:
            self.extractor = create_feature_extractor(self.features_config, [self.layer])
        dataset = ArrayDataset(images, "training samples")
        return extract_features(dataset, self.extractor, self.features_config)[self.layer]

    def reference_statistics(self, reference, cache_dir: Path, dim: int):
        from pipeline.evaluate import gather_reference_inputs

        if self.statistics is None:
            inputs = gather_reference_inputs(
                reference,
                ["fid"],
                {"fid": self.layer},
                self.features_config,
                cache_dir,
                self.extractor,
                {self.layer: dim},
            )
            self.statistics = inputs.statistics["fid"]
        return self.statistics


class DINOv2FD:
    """FD_DINOv2: DINOv2 ViT-L/14 CLS features of the samples against the reference's (stored or cached) ones,
    exactly as `diffit-pipe evaluate --metrics fd_dinov2` (`pipeline.evaluate.fd_dinov2`)."""

    name = "fd_dinov2"

    def __init__(self, config: Config, cuda: bool):
        from pipeline.evaluate import DINOv2Config, resolve_dinov2_weights

        ev = config.eval
        weights = resolve_dinov2_weights(ev.dinov2_weights)
        self.features_config = DINOv2Config(
            weights=weights, batch_size=ev.feature_batch_size, cuda=cuda, progress=False
        )
        self.key = metric_key("fd_dinov2", ev.num_samples, weights.recognised)
        self.label = weights.label
        self.extractor = None
        self.statistics = None

    @property
    def device(self):
        return self.features_config.device

    def features(self, images):
        from pipeline.evaluate import ArrayDataset, create_dinov2_extractor, sample_dinov2_features

        if self.extractor is None:
            self.extractor = create_dinov2_extractor(self.features_config)
        return sample_dinov2_features(ArrayDataset(images, "training samples"), self.extractor, self.features_config)

    def reference_statistics(self, reference, cache_dir: Path, dim: int):
        from pipeline.evaluate import reference_dinov2_statistics

        if self.statistics is None:
            self.statistics, _, _ = reference_dinov2_statistics(
                reference, self.features_config, cache_dir, self.extractor
            )
        return self.statistics


TRAINING_METRIC_CLASSES = {"fid": InceptionFID, "fd_dinov2": DINOv2FD}


class FidEvaluator:
    """The `eval` section's metrics (FID, FD_DINOv2) of the EMA model against `eval.reference`, from one set of
    samples; built on every process (all take part in `evaluate`).

    The weights and the reference are checked when it is built, before the first training step: the reference
    must serve every metric (images, or the stored statistics of each) at the dataset's image resolution, as
    `diffit-pipe evaluate` requires, so that a run never trains up to its first evaluation to fail there.
    """

    def __init__(self, config: Config, info: DatasetInfo, accelerator):
        from pipeline.core.errors import InputError
        from pipeline.evaluate import check_reference, open_reference
        from pipeline.train.checks import TrainError

        ev = config.eval
        self.config, self.info, self.accelerator = config, info, accelerator
        if ev.num_samples < accelerator.num_processes:
            raise TrainError(
                f"eval.num_samples {ev.num_samples} is fewer than the {accelerator.num_processes} processes"
            )
        cuda = accelerator.device.type == "cuda"
        self.metrics = [TRAINING_METRIC_CLASSES[name](config, cuda) for name in ev.metrics]
        self.reference = open_reference(ev.reference)
        resolution = int(info.manifest["resolution"])  # the samples' size: the images, or what the VAE decodes
        try:
            check_reference(self.reference, (resolution, resolution), ev.metrics)
        except InputError as error:
            raise TrainError(f"eval.reference: {error}") from None
        self.vae = None
        if info.kind == "latents":
            self.vae = self._load_vae(info, accelerator.device)

    @staticmethod
    def _load_vae(info: DatasetInfo, device):
        """The dataset's VAE in fp32 on the training device (the one VAE loader, as the sample grids load it); a
        VAE that does not load is an error here, before training, since the metrics need images."""
        from pipeline.train.checks import TrainError
        from pipeline.train.samples import load_dataset_vae

        try:
            return load_dataset_vae(info.manifest["vae"], info.manifest_path, str(device))
        except Exception as error:  # noqa: BLE001 -- any load failure is reported with the file
            raise TrainError(f"eval.every > 0: FID needs the dataset's VAE, which does not load ({error})") from error

    def evaluate(self, ema_model, step: int) -> dict[str, Any]:
        """Sample, score and return the record to log ({key: value, ...} per metric, plus the label when
        plumbing-only); every process calls it and gets the same record's keys (the values on the main process)."""
        import numpy as np
        import torch

        started = time.perf_counter()
        was_training = ema_model.training
        ema_model.eval()
        ev = self.config.eval
        share = index_share(ev.num_samples, self.accelerator.process_index, self.accelerator.num_processes)
        record: dict[str, Any] = {}
        # Nothing here may draw from the training RNG streams (the feature networks are built here, the first
        # time, and a reference's features may be extracted).
        with torch.random.fork_rng(devices=rng_devices(self.accelerator.device)), torch.no_grad():
            images = self._images(ema_model, np.arange(share.start, share.stop))
            for metric in self.metrics:
                gathered = self._gather(metric.features(images))
                if self.accelerator.is_main_process:
                    record[metric.key] = self._frechet(metric, gathered)
                    if metric.key.startswith(PLUMBING_PREFIX):
                        record[f"{metric.name}_note"] = metric.label
        ema_model.train(was_training)
        if self.accelerator.is_main_process:
            # Not under a `fid_*` / `fd_dinov2_*` key: the run report plots every numeric one as the metric.
            record["eval_seconds"] = time.perf_counter() - started
            values = ", ".join(f"{metric.key} = {record[metric.key]:.4f}" for metric in self.metrics)
            logger.info("step %d: %s (%.1f s)", step, values, record["eval_seconds"])
        return record

    def _images(self, ema_model, indices):
        """uint8 [n, H, W, 3] images of sample `indices`, drawn and converted as the evaluate stage does."""
        import numpy as np

        from diffit.sampling import sample
        from pipeline.evaluate import sample_class_labels, sample_noise_seeds, to_uint8_images

        ev = self.config.eval
        conditional = ema_model.num_classes > 0
        settings = eval_sampling_config(self.config, conditional)
        labels = sample_class_labels(ev.seed, indices, ema_model.num_classes)
        shape = (ema_model.in_channels, ema_model.input_size, ema_model.input_size)
        outputs = []
        for start in range(0, len(indices), ev.batch_size):
            batch = indices[start : start + ev.batch_size]
            seeds = sample_noise_seeds(ev.seed, batch)
            batch_labels = labels[start : start + ev.batch_size] if conditional else None
            samples = sample(ema_model, shape, batch_labels, seeds, settings, device=self.accelerator.device)
            outputs.append(to_uint8_images(self._decode(samples)))
        return np.concatenate(outputs)

    def _decode(self, samples):
        """Sampler output -> images in [-1, 1] (VAE decode of the latents the run's LatentNorm maps them back to)."""
        if self.vae is None:
            return samples
        return self.vae.decode(self.info.latent_norm.denormalize(samples)).sample

    def _gather(self, features):
        """Every process's features, concatenated in rank (= index) order, on every process: padded to the
        largest share for `accelerator.gather`, the padding dropped after."""
        import torch

        accelerator = self.accelerator
        ev = self.config.eval
        shares = [
            len(index_share(ev.num_samples, r, accelerator.num_processes)) for r in range(accelerator.num_processes)
        ]
        longest = max(shares)
        padded = torch.zeros(longest, features.shape[1], dtype=features.dtype, device=accelerator.device)
        padded[: features.shape[0]] = features.to(accelerator.device)
        gathered = accelerator.gather(padded).reshape(accelerator.num_processes, longest, -1)
        return torch.cat([gathered[rank, :count] for rank, count in enumerate(shares)]).cpu()

    def _frechet(self, metric, features) -> float:
        """The metric's Fréchet distance of the gathered features to the reference's statistics (computed once)."""
        from pipeline.evaluate import feature_statistics, frechet_distance, reference_cache_dir

        ev = self.config.eval
        cache_dir = reference_cache_dir(self.reference, Path(ev.cache_dir) if ev.cache_dir else None)
        reference = metric.reference_statistics(self.reference, cache_dir, int(features.shape[1]))
        mu, sigma = feature_statistics(features, metric.device)
        return float(frechet_distance(mu, sigma, *reference))
