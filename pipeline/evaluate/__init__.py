"""The evaluate stage: exported model -> seeded sampling into a zarr store -> decode -> metrics.json / npz.

One concern per module:

- `run`: the command (pre-flight checks, then sampling on every rank, then metrics and `metrics.json` on rank 0);
  `options`: what it is asked; `model_loading`: the exported model, its VAE and the network's precision;
  `sampling_settings`: defaults and checks of the sampling settings; `generation`: seeded samples into the store;
  `sample_store`: the zarr store itself;
- `metrics`: which reference data feeds which metric, and the metric values (ADM evaluator's protocol);
  `adm`: the metric math; `inception`: the weights file and feature configuration; `features`: torch-fidelity's
  Inception plus the sFID layer; `datasets`: the images; `npz_files`: `.npz` members checked from their headers;
  `sample_seeds`: seeds and labels per sample index; `npz_export`: the ADM npz of a store;
- `dinov2`: FD_DINOv2's weights file and DINOv2 features (`pipeline.core.encoders`); `fd_dinov2`: its reference
  statistics and the distance;
- `reference/` (a subpackage): `formats` the reference formats, `cache` content hashes and cached features,
  `batch` ADM-layout reference batches and streamed, resumable statistics (`diffit-pipe reference`), `source`
  a reference of an encode source, `remote` reference URLs copied once and checked.
Other stages use what this package exports, never its modules' internals.
"""

from pipeline.evaluate.adm import feature_statistics, frechet_distance
from pipeline.evaluate.datasets import ArrayDataset
from pipeline.evaluate.dinov2 import DINOv2Config, create_dinov2_extractor, resolve_dinov2_weights
from pipeline.evaluate.fd_dinov2 import reference_dinov2_statistics, sample_dinov2_features
from pipeline.evaluate.generation import to_uint8_images
from pipeline.evaluate.inception import (
    PLUMBING_ONLY_LABEL,
    FeatureConfig,
    create_feature_extractor,
    extract_features,
    resolve_inception_weights,
)
from pipeline.evaluate.metrics import gather_reference_inputs
from pipeline.evaluate.options import EvaluateInputError, EvaluateOptions, check_options, check_sampling_settings
from pipeline.evaluate.reference.batch import ReferenceOptions, build_reference
from pipeline.evaluate.reference.cache import reference_cache_dir
from pipeline.evaluate.reference.formats import check_reference, open_reference
from pipeline.evaluate.run import METRICS_FILE, run_evaluate, sample_grid
from pipeline.evaluate.sample_seeds import sample_class_labels, sample_noise_seeds
from pipeline.evaluate.sample_store import (
    STORE_NAME,
    SampleStore,
    SampleStoreError,
    SampleStoreMismatchError,
)

__all__ = [
    "PLUMBING_ONLY_LABEL",
    "ArrayDataset",
    "DINOv2Config",
    "FeatureConfig",
    "check_reference",
    "create_dinov2_extractor",
    "reference_dinov2_statistics",
    "resolve_dinov2_weights",
    "sample_dinov2_features",
    "create_feature_extractor",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "gather_reference_inputs",
    "open_reference",
    "reference_cache_dir",
    "resolve_inception_weights",
    "sample_class_labels",
    "sample_noise_seeds",
    "to_uint8_images",
    "METRICS_FILE",
    "STORE_NAME",
    "EvaluateInputError",
    "EvaluateOptions",
    "ReferenceOptions",
    "SampleStore",
    "SampleStoreError",
    "SampleStoreMismatchError",
    "check_sampling_settings",
    "build_reference",
    "check_options",
    "run_evaluate",
    "sample_grid",
]
