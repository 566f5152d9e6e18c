"""The Inception-v3 the metrics see: its weights file (found, hashed, safety-checked, labelled official or
plumbing-only), which feature layer each metric uses (`FeatureConfig`), and feature extraction.

The weights cannot be downloaded here, so they come from `--inception-weights` or torch-fidelity's own cache, are
checked before any sampling, loaded only after a `torch.load(weights_only=True)` check, and identified by their
SHA-256. Metrics computed with a file whose hash is not the official one are labelled "plumbing-only" everywhere
they are reported (see `InceptionWeights`). The network itself is torch-fidelity's port of the TensorFlow graph the
ADM evaluator uses, plus the sFID layer (`pipeline.evaluate.features`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from pipeline.core.errors import InputError, weights_only_load_problem
from pipeline.core.shards import sha256_file
from pipeline.evaluate.adm import ADM_IS_SPLIT_SIZE, DEFAULT_PRC_MEMORY_BYTES, PRC_NEIGHBOURHOOD
from pipeline.evaluate.features import SFID_LAYER, InceptionFeatures, base_layers, extract_all

logger = logging.getLogger(__name__)

FEATURE_EXTRACTOR = "inception-v3-compat"
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
# torch.hub's naming convention (`load_state_dict_from_url(check_hash=True)`): the hex digits after the last '-'
# of a checkpoint's file name are the first digits of the SHA-256 of its content. A file whose hash starts with
# them is the torch-fidelity release file; any other file (random init, pytorch-fid's differently-keyed weights,
# a re-trained network) is not, and its numbers must not be reported as FID/IS.
OFFICIAL_INCEPTION_SHA256_PREFIX = "6726825d"
PLUMBING_ONLY_LABEL = "plumbing-only (non-official Inception weights)"
DEFAULT_PRC_REFERENCE_LIMIT = 10_000


class InceptionWeightsError(InputError):
    """The Inception weights file cannot be used (not a tensor state dict, not torch-fidelity's Inception-v3)."""


class MissingInceptionWeightsError(InceptionWeightsError, FileNotFoundError):
    """The Inception weights file is not available (it cannot be downloaded offline)."""


# ----------------------------------------------------------------------------------------------------------------
# Inception weights


@dataclass(frozen=True)
class InceptionWeights:
    """The Inception-v3 weights file the features come from, its SHA-256, and whether it is the official file."""

    path: Path
    sha256: str

    @property
    def official(self) -> bool:
        return self.sha256.startswith(OFFICIAL_INCEPTION_SHA256_PREFIX)

    @property
    def label(self) -> str:
        """How metrics computed with these weights must be labelled."""
        return "official torch-fidelity Inception-v3 weights" if self.official else PLUMBING_ONLY_LABEL

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "file_name": self.path.name,
            "sha256": self.sha256,
            "official": self.official,
            "label": self.label,
            "official_check": f"sha256 starts with {OFFICIAL_INCEPTION_SHA256_PREFIX} (the hash digits of "
            f"the release file name {INCEPTION_WEIGHTS_FILENAME})",
        }


def default_inception_weights_path() -> Path:
    """Where torch-fidelity itself would cache the weights: `$TORCH_HOME/hub/checkpoints/<file>`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def resolve_inception_weights(path: str | os.PathLike | None = None) -> InceptionWeights:
    """Find, hash and safety-check the Inception weights (before any sampling).

    `path` None means torch-fidelity's cache location. The file is loaded once with `weights_only=True` so that
    torch-fidelity's own (pickle) load later only ever sees a plain tensor state dict.
    """
    candidate = Path(path) if path is not None else default_inception_weights_path()
    if not candidate.is_file():
        where = f"{candidate}" if path is not None else f"{candidate} (torch-fidelity's cache, $TORCH_HOME)"
        raise MissingInceptionWeightsError(
            f"Inception weights not found: {where}. They cannot be downloaded offline: copy the file "
            f"{INCEPTION_WEIGHTS_FILENAME} (torch-fidelity release v0.2.0) to this machine and pass "
            f"--inception-weights PATH, or place it in {default_inception_weights_path().parent}."
        )
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses
            warnings.simplefilter("ignore")
            state = torch.load(candidate, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means the file is unusable; say which and why
        raise InceptionWeightsError(f"{candidate}: {weights_only_load_problem(error)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionWeightsError(
            f"{candidate}: expected a state dict of tensors (torch-fidelity Inception-v3 weights)"
        )
    weights = InceptionWeights(path=candidate.resolve(), sha256=sha256_file(candidate))
    if not weights.official:
        logger.warning(
            "Inception weights %s (sha256 %s…) are not the official file: metrics will be labelled %r",
            candidate,
            weights.sha256[:16],
            PLUMBING_ONLY_LABEL,
        )
    return weights


# ----------------------------------------------------------------------------------------------------------------
# Feature extractor configuration


@dataclass
class FeatureConfig:
    """Which Inception features each metric uses, and how they are computed and compared.

    Defaults are the ADM evaluator's: 2048-d pool features for FID / precision-recall (and KID), the `mixed_6/conv`
    spatial features for sFID, logits for IS (torch-fidelity's unbiased logits) over consecutive splits of 5000
    samples, k = 3 neighbours, precision / recall against at most 10,000 reference images. `cuda` runs the
    network and the distance blocks on the GPU; `prc_memory_bytes` bounds the distance blocks of precision /
    recall, `prc_precision` is their arithmetic (the evaluator's float16 with its float32 fallback, or float32);
    recall; `num_workers` DataLoader workers decode reference images.
    """

    weights: InceptionWeights
    layer_fid: str = "2048"
    layer_kid: str = "2048"
    layer_prc: str = "2048"
    layer_isc: str = "logits_unbiased"
    batch_size: int = 64
    cuda: bool = False
    isc_splits: int = 10
    isc_split_size: int | None = ADM_IS_SPLIT_SIZE  # None: torch-fidelity's `isc_splits` parts after a shuffle
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    prc_neighborhood: int = PRC_NEIGHBOURHOOD
    prc_memory_bytes: int = DEFAULT_PRC_MEMORY_BYTES
    prc_precision: str = "fp16"  # of the distances: "fp16" as the ADM evaluator (fp32 fallback), or "fp32"
    prc_reference_limit: int = DEFAULT_PRC_REFERENCE_LIMIT
    prc_seed: int = 0
    num_workers: int = 0
    rng_seed: int = 2020
    verbose: bool = False
    progress: bool = True

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.cuda else "cpu")

    def layers_for(self, metrics: Iterable[str]) -> dict[str, str]:
        """metric name -> feature layer, for the requested metrics."""
        layer_of = {
            "fid": self.layer_fid,
            "sfid": SFID_LAYER,
            "kid": self.layer_kid,
            "prc": self.layer_prc,
            "is": self.layer_isc,
        }
        return {metric: layer_of[metric] for metric in metrics}

    def extractor_identity(self) -> dict[str, Any]:
        """What the features depend on: network, weights content, library version, internal precision."""
        import torch_fidelity

        return {
            "name": FEATURE_EXTRACTOR,
            "weights_sha256": self.weights.sha256,
            "torch_fidelity": torch_fidelity.__version__,
            "internal_dtype": "float32",
        }

    def fidelity_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of torch-fidelity's metric functions (IS, KID) and extractor."""
        return {
            "cuda": self.cuda,
            "batch_size": self.batch_size,
            "isc_splits": self.isc_splits,
            "kid_subsets": self.kid_subsets,
            "kid_subset_size": self.kid_subset_size,
            "prc_neighborhood": self.prc_neighborhood,
            "rng_seed": self.rng_seed,
            "save_cpu_ram": True,
            "samples_shuffle": True,
            "verbose": self.verbose,
            "feature_extractor_weights_path": str(self.weights.path),
        }


def create_feature_extractor(config: FeatureConfig, layers: Sequence[str]) -> InceptionFeatures:
    """torch-fidelity's Inception-v3 for `layers` (sFID's `SFID_LAYER` included), loaded from the checked
    weights file, on the GPU when `config.cuda`."""
    from torch_fidelity.utils import create_feature_extractor as fidelity_create

    try:
        base = fidelity_create(FEATURE_EXTRACTOR, base_layers(layers), **config.fidelity_kwargs())
    except RuntimeError as error:  # load_state_dict: missing / unexpected keys, wrong shapes
        raise InceptionWeightsError(
            f"{config.weights.path}: not torch-fidelity Inception-v3 weights ({error})"
        ) from error
    return InceptionFeatures(base, layers)


def check_feature_layers(config: FeatureConfig, metrics: Iterable[str]) -> None:
    """Fail early when a requested feature layer does not exist in torch-fidelity's Inception-v3."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    provided = FeatureExtractorInceptionV3.get_provided_features_list()
    for metric, layer in config.layers_for(metrics).items():
        if layer not in provided and layer != SFID_LAYER:
            raise InputError(f"feature layer {layer!r} for {metric} is not one of Inception-v3's {provided}")


def extract_features(
    dataset: Dataset, extractor: torch.nn.Module, config: FeatureConfig, description: str = "features"
) -> dict[str, torch.Tensor]:
    """Features of every image of `dataset` (uint8 CHW tensors), batched on the extractor's device, with
    DataLoader workers where the dataset allows them and a progress bar."""
    # Worker processes pay off for a stream of images to decode, not for a batch or two (or a zarr store).
    many = len(dataset) > 2 * config.batch_size
    workers = config.num_workers if many and getattr(dataset, "supports_workers", True) else 0
    return extract_all(dataset, extractor, config.batch_size, workers, description, config.progress)
