"""The evaluate stage: exported model -> seeded sampling into a zarr store -> decode -> metrics.json / npz.

`run` resolves the model and sampling settings and fills the store (any number of processes, resumable),
`sample_store` is the zarr store itself, `metrics` scores it against a reference by the ADM evaluator's protocol
(`adm`: the metric math, `features`: torch-fidelity's Inception plus the sFID layer, `datasets`: the images), and
`reference_batch` builds ADM-layout reference batches with streamed, resumable statistics. Other stages use
what this package exports, never its modules' internals.
"""

from pipeline.evaluate.adm import feature_statistics, frechet_distance
from pipeline.evaluate.datasets import ArrayDataset
from pipeline.evaluate.metrics import (
    PLUMBING_ONLY_LABEL,
    FeatureConfig,
    create_feature_extractor,
    extract_features,
    gather_reference_inputs,
    open_reference,
    reference_cache_dir,
    resolve_inception_weights,
)
from pipeline.evaluate.reference_batch import ReferenceOptions, build_reference
from pipeline.evaluate.run import (
    METRICS_FILE,
    EvaluateInputError,
    EvaluateOptions,
    SamplingOptions,
    evaluate,
    sample_grid,
    to_uint8_images,
)
from pipeline.evaluate.sample_store import (
    STORE_NAME,
    SampleStore,
    SampleStoreError,
    SampleStoreMismatchError,
    sample_class_labels,
    sample_noise_seeds,
)

__all__ = [
    "PLUMBING_ONLY_LABEL",
    "ArrayDataset",
    "FeatureConfig",
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
    "SamplingOptions",
    "build_reference",
    "evaluate",
    "sample_grid",
]
