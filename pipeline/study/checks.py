"""The checks of a study that need the training and evaluate stages, made when the study file is read (before
anything trains): every variant's evaluate settings accepted by `evaluate` (`check_evaluate_settings`, through
`evaluate_options`, the `EvaluateOptions` of a variant's settings), one sampling budget for all variants
(`check_sampling_budget`: equal network evaluations per sample), every training set-up's config loading with one
budget and samplers that sample its diffusion type (`check_training_configs`), and the model library accepting
every unit's `model.kwargs` (`check_model_kwargs`, made when a unit runs).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from pipeline.core.errors import brief
from pipeline.study.spec import Study, StudyError, Unit, _need, training_config

# Evaluate settings that are paths (made `Path`s); the sampling ones are `diffit.sampling_config.SETTINGS`.
PATH_KEYS = ("inception_weights", "cache_dir", "guide_model")


def evaluate_options(settings: dict[str, Any], seed: int, model_dir: Path, out_dir: Path):
    """The `EvaluateOptions` of evaluate settings (a variant's, see `Study.evaluate_settings`) for one seed,
    checked (`pipeline.evaluate.check_options`): EvaluateInputError naming the setting otherwise."""
    from diffit.sampling_config import SETTINGS
    from pipeline.evaluate import EvaluateInputError, EvaluateOptions, check_options

    sampling = {key: settings[key] for key in SETTINGS if key in settings}
    if isinstance(sampling.get("guidance_interval"), list):
        sampling["guidance_interval"] = tuple(sampling["guidance_interval"])  # `[low, high]` in YAML
    rest = {key: value for key, value in settings.items() if key not in SETTINGS}
    guide_step = rest.pop("guide_step", None)
    if guide_step is not None:
        ok = isinstance(guide_step, int) and not isinstance(guide_step, bool) and guide_step >= 1
        if not ok or rest.get("guide_model") is not None:
            what = "give guide_step or guide_model, not both" if ok else f"a step >= 1, got {brief(guide_step)}"
            raise EvaluateInputError(f"evaluate.guide_step: {what}")
    for key in PATH_KEYS:
        if isinstance(rest.get(key), str):
            rest[key] = Path(rest[key])
    metrics = rest.get("metrics")
    if metrics is None or isinstance(metrics, list):
        rest["metrics"] = tuple(metrics or ())
    options = EvaluateOptions(model_dir=model_dir, out_dir=out_dir, sampling=sampling, seed=seed, **rest)
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


def check_sampling_budget(study: Study) -> None:
    """Every variant samples with the same number of network evaluations per sample: variants that differ in
    `evaluate.sampler` or `evaluate.steps` must each give both, with equal
    `diffit.sampling_config.network_evaluations`."""
    from diffit.sampling_config import network_evaluations

    chosen = {}
    for variant in study.variants:
        settings = study.evaluate_settings(variant)
        chosen[variant.name] = (settings.get("sampler"), settings.get("steps"))
    if len(set(chosen.values())) <= 1:
        return
    missing = [name for name, (sampler, steps) in chosen.items() if sampler is None or steps is None]
    _need(
        not missing,
        study.path,
        "variants sample with different samplers or steps, so each must give evaluate.sampler and evaluate.steps "
        f"(not given for {', '.join(missing)})",
    )
    counts = {name: network_evaluations(sampler, steps) for name, (sampler, steps) in chosen.items()}
    _need(
        len(set(counts.values())) == 1,
        study.path,
        "variants must sample with equal network evaluations per sample (the budget; Heun takes 2 * steps - 1): "
        + ", ".join(f"{name} {count}" for name, count in counts.items()),
    )


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
        steps = {
            study.evaluate_settings(v).get("guide_step") for v in study.variants if v.train_name == unit.train_name
        }
        for step in sorted(steps - {None}):
            every = config.checkpoint.keep_every
            _need(
                step < config.train.max_steps
                and every > 0
                and step % every == 0
                and every % config.checkpoint.every == 0,
                study.path,
                f"run {unit.run_dir}: evaluate.guide_step {step} must be a milestone checkpoint the run keeps: below "
                f"train.max_steps ({config.train.max_steps}) and a multiple of checkpoint.keep_every ({every}), "
                f"itself a positive multiple of checkpoint.every ({config.checkpoint.every})",
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
    """The option names of the evaluate stage (to keep EVALUATE_KEYS honest in the tests): its options and the
    sampling settings."""
    from diffit.sampling_config import SETTINGS
    from pipeline.evaluate import EvaluateOptions

    return ({f.name for f in fields(EvaluateOptions)} - {"sampling"}) | set(SETTINGS)
