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

An override key is a training-config key (`SECTION.FIELD`, `model.kwargs.NAME`, checked like `train --set`) or
`evaluate.FIELD` (an evaluate setting such as `evaluate.guidance_scale`). Variants that differ only in evaluate
settings share one trained model per seed (the guidance-scale curve: one training, many scales). Variants may
not change the budget (`BUDGET_KEYS`): every run trains the same steps on the same batch and is scored on the same
number of samples with the same sampler.

Expansion: one *unit* per (training overrides, seed) = one ordinary run directory `runs/TRAIN/seed-S` (train ->
export to `runs/TRAIN/seed-S/model`), and one evaluation per (variant, seed) in `evals/VARIANT/seed-S`. Units are
numbered in order (variant-major, then seed); a SLURM array element runs one unit (`--run-index`).

Checks that need the model library (whether a `model.kwargs` name is accepted by the model) are made when a unit
runs (`check_model_kwargs` can be called earlier): a study file for model variants that do not exist yet still
loads and plans.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import InputError, brief, one_line
from pipeline.core.yamlfile import SettingError, parse_setting, read_yaml_file


class StudyError(InputError):
    """A study file that does not fit the schema, or a study directory that belongs to another study."""


TOP_LEVEL_KEYS = ("name", "description", "scale", "paper", "base", "data", "set", "seeds", "axes", "baseline")
TOP_LEVEL_KEYS += ("evaluate", "demo_metrics", "curve", "power")
REQUIRED_KEYS = ("name", "base", "seeds", "axes")
# What variants may not change: every run of a study has the same budget.
BUDGET_KEYS = (
    "train.max_steps",
    "train.global_batch_size",
    "train.seed",
    "evaluate.num_samples",
    "evaluate.sampler",
    "evaluate.steps",
    "evaluate.seed",
)
# `diffit-pipe evaluate` settings a study may give (EvaluateOptions / SamplingOptions fields; paths and the
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
    """One (variant, seed) evaluation of a unit's model."""

    variant: str
    seed: int
    out_dir: str  # relative to the study directory


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
                units[key].evaluations.append(Evaluation(variant.name, seed, f"evals/{variant.name}/seed-{seed}"))
        return list(units.values())

    def evaluate_settings(self, variant: Variant) -> dict[str, Any]:
        """The evaluate settings of one variant: the study's, then the variant's."""
        return {**self.evaluate, **variant.evaluate}

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
            "units": [asdict(u) for u in self.units()],
            "inputs": self.inputs(),
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
        from pipeline.core.storage import is_url

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


def override_text(key: str, value: Any) -> str:
    """`KEY=VALUE` as `train --set` reads it (the value as JSON, which YAML reads back unchanged)."""
    return f"{key}={json.dumps(value)}"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_study(path: str | Path, settings: list[str] | tuple[str, ...] = ()) -> Study:
    """Read and check a study file; `settings` are `KEY=VALUE` overrides of its own keys (`data=PATH`,
    `demo_metrics.classifier=PATH`, `evaluate.num_samples=64`, `seeds=[0,1]`)."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"{path}: no such study file")
    try:
        mapping = read_yaml_file(path)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise StudyError(f"{path}: not valid YAML ({one_line(error)})") from None
    if not isinstance(mapping, dict):
        raise StudyError(f"{path}: the top level must be a mapping, got {type(mapping).__name__}")
    for setting in settings:
        _apply_setting(mapping, setting, path)
    rename_evaluate_keys(mapping, lambda old, new: _warn_renamed(path, old, new))
    return parse_study(mapping, path)


def _warn_renamed(path: Path, old: str, new: str) -> None:
    import logging

    logging.getLogger(__name__).warning(
        "%s: %s is deprecated, use %s (the old name goes in the next release)", path, old, new
    )


def rename_evaluate_keys(mapping: Any, renamed=lambda old, new: None) -> Any:
    """`mapping` (a study file, or a plan.json's `evaluate` / variants) with the old evaluate names
    (`RENAMED_EVALUATE_KEYS`) replaced in place, in `evaluate`, `set` and every variant's overrides; `renamed(old,
    new)` is called for each. A section giving both names is left alone (the key check then names both)."""

    def rename(section: Any, prefix: str) -> None:
        if not isinstance(section, dict):
            return
        for old, new in RENAMED_EVALUATE_KEYS.items():
            if prefix + old in section and prefix + new not in section:
                section[prefix + new] = section.pop(prefix + old)
                renamed(prefix + old, prefix + new)

    if not isinstance(mapping, dict):
        return mapping
    rename(mapping.get("evaluate"), "")
    rename(mapping.get("set"), EVALUATE_PREFIX)
    axes = mapping.get("axes")
    for variants in axes.values() if isinstance(axes, dict) else ():
        for overrides in variants.values() if isinstance(variants, dict) else ():
            rename(overrides, EVALUATE_PREFIX)
    for variant in mapping.get("variants") or () if isinstance(mapping.get("variants"), list) else ():
        rename(variant.get("evaluate") if isinstance(variant, dict) else None, "")
    return mapping


def _apply_setting(mapping: dict, setting: str, path: Path) -> None:
    """One `--set KEY=VALUE` on the study file's own keys (one level of nesting: `evaluate.steps=18`)."""
    try:
        key, value = parse_setting(setting, "data=data/demo or evaluate.num_samples=64")
    except SettingError as error:
        raise StudyError(str(error)) from None
    parts = key.split(".", 1)
    if parts[0] not in TOP_LEVEL_KEYS:
        known = ", ".join(TOP_LEVEL_KEYS)
        raise StudyError(f"--set {brief(setting)}: unknown study key {brief(parts[0])}; known: {known}")
    if len(parts) == 1:
        mapping[parts[0]] = value
        return
    section = mapping.get(parts[0])
    if section is None:
        section = mapping[parts[0]] = {}
    if not isinstance(section, dict):
        raise StudyError(f"--set {brief(setting)}: {parts[0]!r} of {path} is not a mapping")
    section[parts[1]] = value


def _need(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise StudyError(f"{path}: {message}")


def is_name(value: Any) -> bool:
    """A study, axis or variant name: letters, digits, '.', '_', '-' (names directories and SLURM jobs)."""
    return isinstance(value, str) and NAME.fullmatch(value) is not None


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _mapping(value: Any, path: Path, where: str) -> dict:
    _need(value is None or isinstance(value, dict), path, f"{where} must be a mapping, got {type(value).__name__}")
    return dict(value or {})


def _check_keys(mapping: dict, known: tuple[str, ...], path: Path, where: str) -> None:
    unknown = sorted(map(str, set(mapping) - set(known)))
    _need(
        not unknown, path, f"unknown key {brief(unknown[0])} in {where}; known: {', '.join(known)}" if unknown else ""
    )


def parse_study(mapping: dict, path: Path) -> Study:
    """A `Study` from the file's mapping: every key and override checked, the variants expanded."""
    _check_keys(mapping, TOP_LEVEL_KEYS, path, "the study")
    missing = [key for key in REQUIRED_KEYS if mapping.get(key) is None]
    _need(not missing, path, f"missing {', '.join(missing)}")
    name = mapping["name"]
    _need(is_name(name), path, f"name {brief(name)} must be 1-100 of A-Z a-z 0-9 . _ - (the first a letter or digit)")
    _need(isinstance(mapping["base"], str), path, f"base must be a path, got {brief(mapping['base'])}")
    base = (path.parent / str(mapping["base"])).resolve()
    _need(base.is_file(), path, f"base preset {mapping['base']!r} not found (looked for {base})")
    seeds = mapping["seeds"]
    _need(
        isinstance(seeds, list) and 0 < len(seeds) <= MAX_SEEDS,
        path,
        f"seeds must be a list of 1 to {MAX_SEEDS} integers, got "
        + (f"{len(seeds)} seeds" if isinstance(seeds, list) else brief(seeds)),
    )
    bad = [seed for seed in seeds if not _is_int(seed, 0, MAX_SEED)]
    _need(not bad, path, f"seeds must be integers in [0, {MAX_SEED}], got {brief(bad[0]) if bad else ''}")
    _need(len(set(seeds)) == len(seeds), path, f"seeds repeat: {brief(seeds)}")
    data = mapping.get("data")
    _need(data is None or isinstance(data, str), path, f"data must be a path, got {brief(data)}")
    common = _mapping(mapping.get("set"), path, "set")
    for key in common:
        _check_override_key(key, path, "set")
    _need("train.seed" not in common, path, "set: 'train.seed' is given by the study's seeds (the `seeds` list)")
    evaluate = _mapping(mapping.get("evaluate"), path, "evaluate")
    _check_keys(evaluate, EVALUATE_KEYS, path, "evaluate")
    demo_metrics = _mapping(mapping.get("demo_metrics"), path, "demo_metrics")
    _check_keys(demo_metrics, DEMO_METRIC_KEYS, path, "demo_metrics")
    for key in DEMO_METRIC_FILE_KEYS:
        value = demo_metrics.get(key)
        _need(value is None or isinstance(value, str), path, f"demo_metrics.{key} must be a path, got {brief(value)}")
    count = demo_metrics.get("max_reference_images")
    _need(
        count is None or _is_int(count, 2, MAX_REFERENCE_IMAGES),
        path,
        f"demo_metrics.max_reference_images must be an integer in [2, {MAX_REFERENCE_IMAGES}], got {brief(count)}",
    )
    # `set: {evaluate.X: ...}` is an evaluate setting: moved before anything reads `evaluate` (the curve's bound).
    for key in list(common):
        if key.startswith(EVALUATE_PREFIX):
            evaluate[key[len(EVALUATE_PREFIX) :]] = common.pop(key)
    curve = _mapping(mapping.get("curve"), path, "curve")
    _check_keys(curve, CURVE_KEYS, path, "curve")
    if curve:
        count = curve.get("num_samples")
        _need(
            _is_int(count, 2, MAX_REFERENCE_IMAGES),
            path,
            f"curve.num_samples must be an integer >= 2 (a covariance), got {brief(count)}",
        )
        total = evaluate.get("num_samples", 50_000)  # not an integer: refused with the other evaluate settings
        _need(
            not _is_int(total, 1, MAX_REFERENCE_IMAGES) or count <= total,
            path,
            f"curve.num_samples {count} exceeds evaluate.num_samples (the last point is the first "
            "curve.num_samples samples of the final evaluation)",
        )
    variants = _expand_axes(mapping["axes"], path, MAX_EVALUATIONS // len(seeds))
    baseline = mapping.get("baseline") or variants[0].name
    names = [v.name for v in variants]
    _need(baseline in names, path, f"baseline {brief(baseline)} is not a variant; variants: {', '.join(names)}")
    from pipeline.study.verdicts import claim_problems, power_problems

    problems = claim_problems(mapping.get("paper"), names, baseline) + power_problems(mapping.get("power"))
    _need(not problems, path, problems[0] if problems else "")
    study = Study(
        path=path,
        name=name,
        description=str(mapping.get("description") or ""),
        scale=str(mapping.get("scale") or ""),
        paper=mapping.get("paper"),
        base=base,
        data=None if data is None else str(data),
        common=common,
        seeds=list(seeds),
        variants=variants,
        baseline=baseline,
        evaluate=evaluate,
        demo_metrics=demo_metrics,
        curve=curve,
        power=mapping.get("power"),
    )
    check_evaluate_settings(study)
    check_training_configs(study)
    return study


def _check_override_key(key: Any, path: Path, where: str) -> None:
    """An override key: `evaluate.FIELD` (a known evaluate setting) or a training key."""
    _need(isinstance(key, str) and "." in key, path, f"{where}: override key {brief(key)} must be SECTION.FIELD")
    if key.startswith(EVALUATE_PREFIX):
        field_name = key[len(EVALUATE_PREFIX) :]
        _need(
            field_name in EVALUATE_KEYS,
            path,
            f"{where}: unknown key {brief(key)}; evaluate settings: {', '.join(EVALUATE_KEYS)}",
        )
        return
    # A training key is checked by the trainer's own loader (`check_training_configs`), as `train --set` is.


def _expand_axes(axes: Any, path: Path, max_variants: int) -> list[Variant]:
    """The product of the axes' variants, in file order; names joined with '+'. More than `max_variants` is an
    error before the product is formed."""
    _need(isinstance(axes, dict) and bool(axes), path, "axes must be a non-empty mapping of axis -> variants")
    count = 1
    for axis, variants in axes.items():
        _need(is_name(axis), path, f"axis name {brief(axis)} must be 1-100 of A-Z a-z 0-9 . _ -")
        _need(isinstance(variants, dict) and bool(variants), path, f"axis {axis!r}: expected variant -> overrides")
        count *= len(variants)
        _need(
            count <= max_variants,
            path,
            f"the axes make at least {count} variants; with its seeds a study may have at most {MAX_EVALUATIONS} "
            f"evaluations (here {max_variants} variants)",
        )
    per_axis = []
    for axis, variants in axes.items():
        options = []
        for name, overrides in variants.items():
            _need(is_name(name), path, f"axis {axis!r}: bad variant name {brief(name)}")
            overrides = _mapping(overrides, path, f"axes.{axis}.{name}")
            for key in overrides:
                _check_override_key(key, path, f"axes.{axis}.{name}")
                _need(
                    key not in BUDGET_KEYS,
                    path,
                    f"axes.{axis}.{name}: {key!r} is part of the budget, which every variant shares "
                    f"({', '.join(BUDGET_KEYS)}); set it under 'set'",
                )
            options.append((name, overrides))
        per_axis.append((axis, options))
    variants = [_combine(combination, path) for combination in itertools.product(*(o for _, o in per_axis))]
    names = [v.name for v in variants]
    _need(len(set(names)) == len(names), path, f"variant names repeat: {names}")
    by_train_name: dict[str, dict] = {}
    for variant in variants:
        other = by_train_name.setdefault(variant.train_name, variant.train)
        _need(
            other == variant.train,
            path,
            f"two training set-ups are both named {variant.train_name!r}: rename a variant",
        )
    return variants


def _combine(combination: tuple[tuple[str, dict], ...], path: Path) -> Variant:
    """One variant from one choice per axis (an override set by two axes is an error)."""
    train: dict[str, Any] = {}
    evaluate: dict[str, Any] = {}
    train_parts = []
    for name, overrides in combination:
        for key, value in overrides.items():
            _need(key not in train and key[len(EVALUATE_PREFIX) :] not in evaluate, path, f"{key!r} set by two axes")
            if key.startswith(EVALUATE_PREFIX):
                evaluate[key[len(EVALUATE_PREFIX) :]] = value
            else:
                train[key] = value
        if any(not key.startswith(EVALUATE_PREFIX) for key in overrides):
            train_parts.append(name)
    return Variant(
        name="+".join(name for name, _ in combination),
        train=train,
        evaluate=evaluate,
        train_name="+".join(train_parts) or "base",
    )


def training_config(study: Study, unit: Unit):
    """The resolved training `Config` of one unit (the preset, then its overrides, checked)."""
    from pipeline.train import load_config

    return load_config(study.base, unit.overrides)


# Evaluate settings that are paths (made `Path`s) and the sampling ones (`SamplingOptions` fields).
SAMPLING_KEYS = ("sampler", "steps", "guidance_scale", "guidance_schedule", "guidance_power", "guidance_channels")
SAMPLING_KEYS += ("guidance_interval", "classes", "eta")
SAMPLING_KEYS += ("pixels",)
PATH_KEYS = ("inception_weights", "cache_dir", "guide_model")


def evaluate_options(settings: dict[str, Any], seed: int, model_dir: Path, out_dir: Path):
    """The `EvaluateOptions` of evaluate settings (a variant's, see `Study.evaluate_settings`) for one seed,
    checked (`pipeline.evaluate.check_options`): EvaluateInputError naming the setting otherwise."""
    from pipeline.evaluate import EvaluateInputError, EvaluateOptions, SamplingOptions, check_options

    sampling = {key: settings[key] for key in SAMPLING_KEYS if key in settings}
    channels = sampling.get("guidance_channels")
    if isinstance(channels, int) and not isinstance(channels, bool):
        sampling["guidance_channels"] = str(channels)  # `guidance_channels: 3` in YAML
    if isinstance(sampling.get("guidance_interval"), list):
        sampling["guidance_interval"] = tuple(sampling["guidance_interval"])  # `[low, high]` in YAML
    rest = {key: value for key, value in settings.items() if key not in SAMPLING_KEYS}
    for key in PATH_KEYS:
        if isinstance(rest.get(key), str):
            rest[key] = Path(rest[key])
    metrics = rest.get("metrics")
    if metrics is None or isinstance(metrics, list):
        rest["metrics"] = tuple(metrics or ())
    options = EvaluateOptions(
        model_dir=model_dir, out_dir=out_dir, sampling=SamplingOptions(seed=seed, **sampling), **rest
    )
    try:
        check_options(options)
    except EvaluateInputError as error:
        raise EvaluateInputError(f"evaluate.{error}") from None
    return options


def check_evaluate_settings(study: Study) -> None:
    """Every variant's evaluate settings are accepted by `evaluate` (types, ranges, choices), checked now rather
    than after a unit has trained for hours."""
    from pipeline.evaluate import EvaluateInputError

    for variant in study.variants:
        try:
            evaluate_options(study.evaluate_settings(variant), max(study.seeds), Path("model"), Path("evaluation"))
        except EvaluateInputError as error:
            raise StudyError(f"{study.path}: variant {variant.name}: {error}") from None


def check_training_configs(study: Study) -> None:
    """Every training set-up's config loads (known keys, types, ranges); the budget is the same for all; each
    variant's evaluate sampler samples its run's diffusion type. One load per set-up: its units differ only in
    `train.seed`, which the study checked."""
    from pipeline.train import ConfigError, samplers_for

    budgets = set()
    first_units: dict[str, Unit] = {}
    for unit in study.units():
        first_units.setdefault(unit.train_name, unit)
    for unit in first_units.values():
        try:
            config = training_config(study, unit)
        except ConfigError as error:
            raise StudyError(f"{study.path}: run {unit.run_dir}: {error}") from None
        budgets.add((config.train.max_steps, config.train.global_batch_size))
        for variant in (v for v in study.variants if v.train_name == unit.train_name):
            sampler = study.evaluate_settings(variant).get("sampler")
            _need(
                sampler is None or sampler in samplers_for(config.diffusion.type),
                study.path,
                f"variant {variant.name}: evaluate.sampler {sampler!r} does not sample diffusion.type "
                f"{config.diffusion.type!r} models (use one of {', '.join(samplers_for(config.diffusion.type))})",
            )
        if study.curve:
            every = config.checkpoint.keep_every
            _need(
                every > 0 and every % config.checkpoint.every == 0,
                study.path,
                f"run {unit.run_dir}: a curve evaluates the milestone checkpoints, so checkpoint.keep_every must "
                f"be a positive multiple of checkpoint.every ({config.checkpoint.every}), got {every}",
            )
    _need(len(budgets) == 1, study.path, f"runs differ in (max_steps, global_batch_size): {sorted(budgets)}")


def check_model_kwargs(study: Study, units: list[Unit] | None = None) -> None:
    """Every unit's (or those of `units`) `model.kwargs` are accepted by its model class: a study of variants the
    library does not have yet is an error here, before anything trains."""
    for unit in study.units() if units is None else units:
        config = training_config(study, unit)
        known = _known_kwargs(config.model.name)
        unknown = sorted(set(config.model.kwargs) - known)
        if unknown:
            raise StudyError(
                f"{study.path}: run {unit.run_dir}: model {config.model.name!r} does not accept "
                f"model.kwargs {', '.join(map(repr, unknown))} (known: {', '.join(sorted(known))})"
            )


def _known_kwargs(model_name: str) -> set[str]:
    """The keyword arguments the class of `model_name` takes (what `diffit.models.create_model` passes on)."""
    import inspect

    from diffit.models import model_class

    parameters = inspect.signature(model_class(model_name).__init__).parameters
    return {
        name for name, p in parameters.items() if name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def evaluate_fields() -> set[str]:
    """The option names of the evaluate stage (to keep EVALUATE_KEYS honest in the tests)."""
    from pipeline.evaluate import EvaluateOptions, SamplingOptions

    return {f.name for f in fields(EvaluateOptions)} | {f.name for f in fields(SamplingOptions)}
