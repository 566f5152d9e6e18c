"""The train stage: YAML config -> shard stream -> Accelerate loop (EMA, checkpoints, samples) -> export.

`config` holds the dataclasses every setting lives in, `data` streams shards into batches, `checks` checks a
run's inputs before anything starts, `setup` builds what the loop works with, `objective` is the loss, lr and EMA,
`repa` REPA's alignment term (block-k hook, frozen encoder, projector),
`progress` / `samples` / `fid` (FID during training) report, `loop` runs training, `checkpoint` saves and
restores runs, `export` writes the EMA weights as a model directory, `released` imports NVlabs' released weights
as one (`import_nvlabs`).
Other stages use what this package exports, never its modules' internals.
"""

from pipeline.train.checkpoint import (
    CHECKPOINTS_DIR,
    FILE_HASHES,
    LATEST_POINTER,
    TRAIN_STATE,
    CheckpointError,
    checkpoint_name,
    checkpoint_problem,
    list_checkpoints,
)
from pipeline.train.checks import RUN_CONFIG, TrainError, TrainOptions
from pipeline.train.config import Config, ConfigError, config_from_dict, dump_config, load_config, samplers_for
from pipeline.train.diskfull import DiskFullError
from pipeline.train.export import export_checkpoint
from pipeline.train.loop import NonFiniteLossError, run_train
from pipeline.train.preemption import EXIT_STOPPED, TrainingStopped
from pipeline.train.progress import METRICS
from pipeline.train.released import import_nvlabs
from pipeline.train.runlock import RunLockedError
from pipeline.train.samples import SAMPLES_DIR
from pipeline.train.setup import RUN_INFO

__all__ = [
    "CHECKPOINTS_DIR",
    "FILE_HASHES",
    "LATEST_POINTER",
    "METRICS",
    "RUN_CONFIG",
    "RUN_INFO",
    "SAMPLES_DIR",
    "TRAIN_STATE",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DiskFullError",
    "NonFiniteLossError",
    "RunLockedError",
    "TrainOptions",
    "TrainError",
    "checkpoint_name",
    "checkpoint_problem",
    "config_from_dict",
    "dump_config",
    "export_checkpoint",
    "import_nvlabs",
    "list_checkpoints",
    "load_config",
    "run_train",
    "samplers_for",
    "EXIT_STOPPED",
    "TrainingStopped",
]
