"""The encode stage: image sources -> crop -> VAE (or PNG) -> WebDataset shards + manifest, as Dask tasks.

`sources` scans a folder tree or packed shards (streaming, stopping early under a limit), `transforms` decodes
and center-crops one image, `plan` turns the items into compact shard tasks and decides which finished shards
resume keeps, `cluster` starts or joins the Dask cluster (CPU workers, one worker per GPU, a scheduler file),
`job` plans, runs and resumes the sharded job, `estimate` is its dry run, `inspect` summarises, verifies and
previews a finished dataset. Other stages use what this package exports, never its modules' internals.
"""

from pipeline.encode.estimate import DryRun, dry_run, format_dry_run
from pipeline.encode.inspect import PreviewError, format_summary, summarize, write_preview
from pipeline.encode.job import EncodeOptions, EncodeResult, JobError, JobPlan, command_line, plan_job, run_encode
from pipeline.encode.member_index import IndexCache
from pipeline.encode.source_items import Source, SourceError, SourceItem, SourceScan, item_location
from pipeline.encode.sources import (
    open_source,
    read_item_bytes,
    scan_source,
)
from pipeline.encode.transforms import DEFAULT_MAX_PIXELS, TRANSFORM_NAME, ImageDecodeError, prepare_image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "TRANSFORM_NAME",
    "IndexCache",
    "DryRun",
    "ImageDecodeError",
    "EncodeOptions",
    "JobError",
    "JobPlan",
    "EncodeResult",
    "PreviewError",
    "Source",
    "SourceError",
    "SourceItem",
    "SourceScan",
    "command_line",
    "dry_run",
    "format_dry_run",
    "format_summary",
    "item_location",
    "open_source",
    "plan_job",
    "prepare_image",
    "read_item_bytes",
    "run_encode",
    "scan_source",
    "summarize",
    "write_preview",
]
