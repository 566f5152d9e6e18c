"""The train stage: YAML config -> shard stream -> Accelerate loop (EMA, checkpoints, samples) -> export.

`config` holds the dataclasses every setting lives in, `data` streams shards into batches, `checks` checks a
run's inputs before anything starts, `setup` builds what the loop works with, `objective` is the loss, lr and EMA,
`progress` / `samples` report, `loop` runs training, `checkpoint` saves and restores runs, `export` writes the
EMA weights as a model directory.
Other stages use what this package exports, never its modules' internals.
"""

from pipeline.train.checkpoint import CheckpointError
from pipeline.train.checks import TrainArgs, TrainError
from pipeline.train.config import Config, ConfigError, config_from_dict, dump_config, load_config
from pipeline.train.export import export_checkpoint
from pipeline.train.loop import NonFiniteLossError, run

__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "NonFiniteLossError",
    "TrainArgs",
    "TrainError",
    "config_from_dict",
    "dump_config",
    "export_checkpoint",
    "load_config",
    "run",
]
