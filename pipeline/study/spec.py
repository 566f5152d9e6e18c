"""A study file -> a plan of ordinary runs.

A study is a base preset plus axes of overrides (variants) times seeds, at one budget:

    name: time-embedding-demo
    base: ../demo.yaml                  # a training preset, relative to this file
    data: null                          # the dataset (`train --data`); `--set data=PATH` on the command line
    set: {train.max_steps: 300}         # overrides every run gets (the budget lives here or in the preset)
    seeds: [0, 1, 2]
    axes:                               # each axis: variant name -> overrides; several axes: their product
      time_embedding:
        positional: {model.kwargs.time_embedding: positional}
        fourier: {model.kwargs.time_embedding: fourier}
    baseline: positional                # paired differences are taken against this variant
    evaluate: {num_samples: 256, steps: 18, metrics: []}   # `diffit-pipe evaluate` settings of every run
    demo_metrics: {reference: PATH, classifier: PATH, shape_classifier: PATH}   # FD_demo, consistencies
    curve: {num_samples: 200}           # the demo metrics of every milestone checkpoint (checkpoint.keep_every)
    guidance_selection: {scales: [1, 2, 4], metric: FD_demo}   # each variant at its own best scale
                                        # (chosen on held-out seeds: `pipeline.study.guidance_selection`)

An override key is a training-config key (`SECTION.FIELD`, `model.kwargs.NAME`, checked like `train --set`) or
`evaluate.FIELD` (an evaluate setting such as `evaluate.guidance_scale`). Variants that differ only in evaluate
settings share one trained model per seed (the guidance-scale curve: one training, many scales). Variants may
not change the budget (`BUDGET_KEYS`): every run trains the same steps on the same batch and is scored on the same
number of samples with the same number of network evaluations per sample (`check_sampling_budget`).

Expansion: one *unit* per (training overrides, seed) = one ordinary run directory `runs/TRAIN/seed-S` (train ->
export to `runs/TRAIN/seed-S/model`), and one evaluation per (variant, seed) in `evals/VARIANT/seed-S`. Units are
numbered in order (variant-major, then seed); a SLURM array element runs one unit (`--run-index`).

This module is the study's data: the file's keys and bounds, `Study` / `Variant` / `Unit` / `Evaluation`, the
expansion into units and the resolved training config of a unit (`training_config`). Reading a file into a `Study`
is `pipeline.study.parse` (`load_study`); the checks that need the training and evaluate stages are
`pipeline.study.checks`. Checks that need the model library (whether a `model.kwargs` name is accepted by the
model) are made when a unit runs (`check_model_kwargs` can be called earlier): a study file for model variants that
do not exist yet still loads and plans.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError


class StudyError(InputError):
    """A study file that does not fit the schema, or a study directory that belongs to another study."""


TOP_LEVEL_KEYS = ("name", "description", "scale", "paper", "base", "data", "set", "seeds", "axes", "baseline")
TOP_LEVEL_KEYS += ("evaluate", "demo_metrics", "curve", "power", "guidance_selection")
REQUIRED_KEYS = ("name", "base", "seeds", "axes")
# What variants may not change: every run of a study has the same budget.
BUDGET_KEYS = (
    "train.max_steps",
    "train.global_batch_size",
    "train.seed",
    "evaluate.num_samples",
    "evaluate.seed",
)
# Samplers and steps may differ between variants (an objective axis samples ADM models with DDIM, EDM and flow
# models with Heun) at equal network evaluations per sample: `check_sampling_budget`.
# `diffit-pipe evaluate` settings a study may give (EvaluateOptions fields and the sampling settings; paths and the
# per-run seed are the study's own).
EVALUATE_KEYS = (
    "num_samples",
    "batch_size",
    "sampler",
    "steps",
    "guidance_scale",
    "guidance_schedule",
    "guidance_power",
    "guidance_channels",
    "guidance_interval",
    "guide_model",
    "guide_step",  # autoguidance by the run's own milestone checkpoint at this step (study only)
    "classes",
    "eta",
    "pixels",
    "reference",
    "inception_weights",
    "metrics",
    "feature_layer",
    "feature_batch_size",
    "feature_workers",
    "kid_subset_size",
    "cache_dir",
    "prc_memory_gb",
    "prc_precision",
    "prc_reference_limit",
    "prc_seed",
    "device",
    "precision",
)
DEMO_METRIC_KEYS = ("reference", "classifier", "shape_classifier", "max_reference_images")
DEMO_METRIC_FILE_KEYS = ("reference", "classifier", "shape_classifier")
EVALUATE_FILE_KEYS = ("reference", "inception_weights", "guide_model")
CURVE_KEYS = ("num_samples",)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # whole string (fullmatch): no newline, no control character
EVALUATE_PREFIX = "evaluate."
# Evaluate settings renamed to diffusers' names: the old ones are read for one release, with a warning.
RENAMED_EVALUATE_KEYS = {
    "cfg_scale": "guidance_scale",
    "cfg_schedule": "guidance_schedule",
    "cfg_power": "guidance_power",
    "cfg_channels": "guidance_channels",
}
# Bounds checked before anything is expanded or allocated: a study of more evaluations than this is a typo (or an
# attack), and every one of them is a training run or a sampling run.
MAX_SEEDS = 1000
MAX_EVALUATIONS = 10_000  # variants x seeds
MAX_SEED = 2**32 - 1  # a training seed (numpy's and accelerate's `set_seed` limit)
MAX_REFERENCE_IMAGES = 10_000_000


@dataclass
class Variant:
    """One point of the study's grid: its name, its training overrides and its evaluate settings."""

    name: str
    train: dict[str, Any]
    evaluate: dict[str, Any]
    train_name: str  # the run-directory name of its training ("base" when it changes no training setting)


@dataclass
class Evaluation:
    """One (variant, seed) evaluation of a unit's model; one per scale with a `guidance_selection`."""

    variant: str
    seed: int
    out_dir: str  # relative to the study directory
    guidance_scale: float | None = None  # the sweep's scale (None: the variant's own settings)


@dataclass
class Unit:
    """One ordinary training run (a SLURM array element) and the evaluations of its model."""

    index: int
    train_name: str
    seed: int
    run_dir: str  # relative to the study directory
    overrides: list[str]  # `train --set` arguments, common ones first
    evaluations: list[Evaluation] = field(default_factory=list)

    @property
    def model_dir(self) -> str:
        """Where the run's EMA is exported (beside the run directory, which the trainer owns)."""
        return f"models/{self.train_name}/seed-{self.seed}"


@dataclass
class Study:
    """A parsed study file."""

    path: Path
    name: str
    description: str
    scale: str
    paper: Any
    base: Path
    data: str | None
    common: dict[str, Any]
    seeds: list[int]
    variants: list[Variant]
    baseline: str
    evaluate: dict[str, Any]
    demo_metrics: dict[str, Any]
    curve: dict[str, Any] = field(default_factory=dict)
    power: dict[str, Any] | None = None  # {metric, expected_sd, difference}: seeds by power (`study --plan`)
    # {scales, metric, rule}: every variant at its own best guidance scale (`pipeline.study.guidance_selection`)
    guidance_selection: dict[str, Any] | None = None
    # Each training set-up's `Config`, read from the preset once per process (`training_config`).
    configs: dict[tuple[str, ...], Any] = field(default_factory=dict, repr=False, compare=False)

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise StudyError(f"{self.path}: no variant {name!r}; variants: {', '.join(v.name for v in self.variants)}")

    def units(self) -> list[Unit]:
        """The runs of the study, in a fixed order: one per (training overrides, seed)."""
        units: dict[tuple[str, int], Unit] = {}
        common = [override_text(k, v) for k, v in self.common.items()]
        for variant in self.variants:
            for seed in self.seeds:
                key = (variant.train_name, seed)
                if key not in units:
                    overrides = common + [override_text(k, v) for k, v in variant.train.items()]
                    overrides.append(override_text("train.seed", seed))
                    run_dir = f"runs/{variant.train_name}/seed-{seed}"
                    units[key] = Unit(len(units), variant.train_name, seed, run_dir, overrides)
                units[key].evaluations += self._evaluations(variant.name, seed)
        return list(units.values())

    def _evaluations(self, variant: str, seed: int) -> list[Evaluation]:
        if self.guidance_selection is None:
            return [Evaluation(variant, seed, f"evals/{variant}/seed-{seed}")]
        return [  # one directory per scale of the sweep: guidance-2, guidance-1.5
            Evaluation(variant, seed, f"evals/{variant}/guidance-{scale:g}/seed-{seed}", scale)
            for scale in self.guidance_selection["scales"]
        ]

    def evaluate_settings(self, variant: Variant) -> dict[str, Any]:
        """The evaluate settings of one variant: the study's, then the variant's."""
        return {**self.evaluate, **variant.evaluate}

    def evaluation_settings(self, evaluation: Evaluation) -> dict[str, Any]:
        """The evaluate settings of one evaluation: its variant's, at the sweep's scale when it has one."""
        settings = self.evaluate_settings(self.variant(evaluation.variant))
        if evaluation.guidance_scale is not None:
            settings["guidance_scale"] = evaluation.guidance_scale
        return settings

    def shown(self, evaluation: Evaluation) -> bool:
        """Whether the curve and the sample grid use this evaluation: all of them, or with a guidance sweep the
        ones at the study's `evaluate.guidance_scale`."""
        return evaluation.guidance_scale is None or evaluation.guidance_scale == float(self.evaluate["guidance_scale"])

    def describe(self) -> dict[str, Any]:
        """What identifies the study's results (written as plan.json; a rerun must match it)."""
        return {
            "name": self.name,
            "base": self.base.name,
            "base_sha256": _sha256(self.base),
            "common": self.common,
            "seeds": self.seeds,
            "variants": [asdict(v) for v in self.variants],
            "baseline": self.baseline,
            "evaluate": self.evaluate,
            "curve": self.curve,
            "units": [_unit_record(u) for u in self.units()],
            "inputs": self.inputs(),
            # Only when given, so that plan.json of a study without a sweep reads as it always has.
            **({"guidance_selection": self.guidance_selection} if self.guidance_selection else {}),
        }

    def inputs(self) -> dict[str, Any]:
        """The content identity of every file the study reads besides its own (`pipeline.study.identity`):
        dataset, demo-metric reference and classifiers (and their other settings), evaluate references and
        Inception weights. Part of `describe`, so a resume with other inputs is refused."""
        from pipeline.study.identity import fingerprint

        evaluate_files = sorted(
            {
                str(value)
                for variant in self.variants
                for key in EVALUATE_FILE_KEYS
                if (value := self.evaluate_settings(variant).get(key)) is not None
            }
        )
        return {
            "data": fingerprint(self.data),
            "demo_metrics": {
                key: fingerprint(value) if key in DEMO_METRIC_FILE_KEYS else value
                for key, value in sorted(self.demo_metrics.items())
            },
            "evaluate": {path: fingerprint(path) for path in evaluate_files},
        }

    def missing_inputs(self) -> list[str]:
        """The local paths the study names that do not exist (checked before anything runs)."""
        from pipeline.core.storage_io import is_url

        named = {"data": self.data, **{f"demo_metrics.{k}": self.demo_metrics.get(k) for k in DEMO_METRIC_FILE_KEYS}}
        return [
            f"{key} {value}"
            for key, value in named.items()
            if value is not None and not is_url(value) and not Path(value).exists()
        ]

    def curve_steps(self) -> list[int]:
        """The steps below max_steps whose checkpoints the metric-vs-step curve evaluates (the milestones of
        `checkpoint.keep_every`, which rotation keeps); none without a `curve`."""
        if not self.curve:
            return []
        config = training_config(self, self.units()[0])
        every = config.checkpoint.keep_every
        return list(range(every, config.train.max_steps, every))


def _unit_record(unit: Unit) -> dict[str, Any]:
    """A unit as plan.json records it; an evaluation's `guidance_scale` only when it has one (plan.json of a study
    without a sweep stays what it was, so such studies resume)."""
    record = asdict(unit)
    for evaluation in record["evaluations"]:
        if evaluation["guidance_scale"] is None:
            del evaluation["guidance_scale"]
    return record


def override_text(key: str, value: Any) -> str:
    """`KEY=VALUE` as `train --set` reads it (the value as JSON, which YAML reads back unchanged)."""
    return f"{key}={json.dumps(value)}"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _need(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise StudyError(f"{path}: {message}")


def is_name(value: Any) -> bool:
    """A study, axis or variant name: letters, digits, '.', '_', '-' (names directories and SLURM jobs)."""
    return isinstance(value, str) and NAME.fullmatch(value) is not None


def training_config(study: Study, unit: Unit):
    """The resolved training `Config` of one unit (the preset, then its overrides, checked): read once per
    set-up and process, then the typed value travels (a copy, so no caller changes another's)."""
    from pipeline.train import load_config

    key = tuple(unit.overrides)
    if key not in study.configs:
        study.configs[key] = load_config(study.base, unit.overrides)
    return copy.deepcopy(study.configs[key])
