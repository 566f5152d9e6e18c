"""The evaluate stage: exported model -> seeded sampling into a zarr store -> decode -> metrics.json / npz.

`run` resolves the model and sampling settings and fills the store (any number of processes, resumable),
`sample_store` is the zarr store itself, `metrics` scores it against a reference with torch-fidelity's
Inception. Other stages use what this package exports, never its modules' internals.
"""

from pipeline.evaluate.run import EvaluateInputError, EvaluateOptions, SamplingOptions, evaluate, sample_grid
from pipeline.evaluate.sample_store import STORE_NAME, SampleStore, SampleStoreError, SampleStoreMismatchError

__all__ = [
    "STORE_NAME",
    "EvaluateInputError",
    "EvaluateOptions",
    "SampleStore",
    "SampleStoreError",
    "SampleStoreMismatchError",
    "SamplingOptions",
    "evaluate",
    "sample_grid",
]
