"""The encode stage: image sources -> crop -> VAE (or PNG) -> WebDataset shards + manifest, as Dask tasks.

`sources` scans a folder tree or packed shards, `transforms` decodes and center-crops one image, `job` plans,
runs and resumes the sharded job, `inspect` summarises, verifies and previews a finished dataset. Other stages
use what this package exports, never its modules' internals.
"""

from pipeline.encode.inspect import PreviewError, format_summary, summarize, write_preview
from pipeline.encode.job import JobConfig, JobError, JobResult, command_line, run_job
from pipeline.encode.sources import Source, SourceError, SourceItem, read_item_bytes, scan_source
from pipeline.encode.transforms import ImageDecodeError, prepare_image

__all__ = [
    "ImageDecodeError",
    "JobConfig",
    "JobError",
    "JobResult",
    "PreviewError",
    "Source",
    "SourceError",
    "SourceItem",
    "command_line",
    "format_summary",
    "prepare_image",
    "read_item_bytes",
    "run_job",
    "scan_source",
    "summarize",
    "write_preview",
]
