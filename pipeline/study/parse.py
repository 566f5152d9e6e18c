"""Reading a study file into a `pipeline.study.spec.Study`: the YAML read (bounded, no aliases), the `--set
KEY=VALUE` settings on the study's own keys, the evaluate names renamed to diffusers' (read for one release), every
key and override checked against the schema of `pipeline.study.spec`, the axes expanded into variants (bounded
before the product is formed), then the checks that need the training and evaluate stages
(`pipeline.study.checks`). `load_study(path, settings)` is the entry point.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import yaml

from pipeline.core.errors import brief, one_line
from pipeline.core.yamlfile import SettingError, parse_setting, read_yaml_file
from pipeline.study.checks import check_evaluate_settings, check_sampling_budget, check_training_configs
from pipeline.study.guidance_selection import parse_guidance_selection
from pipeline.study.spec import (
    BUDGET_KEYS,
    CURVE_KEYS,
    DEMO_METRIC_FILE_KEYS,
    DEMO_METRIC_KEYS,
    EVALUATE_KEYS,
    EVALUATE_PREFIX,
    MAX_EVALUATIONS,
    MAX_REFERENCE_IMAGES,
    MAX_SEED,
    MAX_SEEDS,
    RENAMED_EVALUATE_KEYS,
    REQUIRED_KEYS,
    TOP_LEVEL_KEYS,
    Study,
    StudyError,
    Variant,
    _need,
    is_name,
)


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
    selection = parse_guidance_selection(mapping.get("guidance_selection"), path, evaluate, variants, list(seeds))
    if selection is not None:
        evaluations = len(variants) * len(seeds) * len(selection["scales"])
        _need(
            evaluations <= MAX_EVALUATIONS,
            path,
            f"guidance_selection: {evaluations} evaluations (variants x seeds x scales); at most {MAX_EVALUATIONS}",
        )
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
        guidance_selection=selection,
    )
    check_evaluate_settings(study)
    check_sampling_budget(study)
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
    # Variants with the same training overrides share one training per seed (named after the first of them): an
    # axis may mix training and evaluate choices (flow, flow with a guidance interval, flow with autoguidance).
    first_of: dict[str, str] = {}
    for variant in variants:
        variant.train_name = first_of.setdefault(json.dumps(variant.train, sort_keys=True), variant.train_name)
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
