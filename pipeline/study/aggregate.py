"""A finished study's aggregate: `study.json` (the table and the curves), read from the runs' own outputs.

The table: for each metric and variant, the values by seed, their mean and 95% Student-t interval, and the paired
difference to the baseline variant over the seeds both have (`pipeline.study.stats`). The curves: each
variant's training metrics against the step (`loss`, and `fid_*` / `plumbing_only_fid_*` when FID ran during
training), the mean over seeds at the steps every seed logged; with a study `curve`, also the demo metrics of
the milestone checkpoints (`FD_demo @ N samples`, ...), the last point the final model's. Nothing in
`study.json` but the measured wall times of `cost` (`MEASURED_COST_FIELDS`) depends on where the study directory
is or when it ran, so a study killed and resumed gives the same file as an uninterrupted one, those aside.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.errors import JobFailedError
from pipeline.study.demo_metrics import FD_DEMO
from pipeline.study.guidance_selection import leave_one_seed_out, sweep_summary
from pipeline.study.runner import curve_eval_dir, curve_evaluations, read_result, read_samples
from pipeline.study.spec import Study, StudyError, training_config
from pipeline.study.stats import interval, paired_difference
from pipeline.study.verdicts import METHOD, claim_pairs, comparisons, power_lines, verdicts

STUDY_JSON = "study.json"
GRIDS_DIR = "grids"
GRID_SAMPLES = 20  # the first samples of each variant's evaluation with the first seed: equal seeds across variants
FORMAT_VERSION = 4  # 3: comparisons (p, Holm), verdicts of the paper's claims; 4: each comparison's baseline
# Metrics where lower is better (the page says which way is better; verdicts read "better" with it): FD_demo and
# evaluate's keys for FID, sFID and KID.
LOWER_IS_BETTER = (
    FD_DEMO,
    "frechet_inception_distance",
    "spatial_frechet_inception_distance",
    "kernel_inception_distance_mean",
    "fid",
    "sfid",
    "kid",
)


# The guidance scale of a variant under a guidance sweep: chosen per seed (study.json's `guidance_selection`).
SELECTED = "chosen per seed (guidance_selection)"


class StudyIncompleteError(JobFailedError):
    """The study cannot be aggregated: some evaluations have no result yet."""


def collect_evaluations(study: Study, out: Path) -> dict[str, dict[float | None, dict[int, dict[str, Any]]]]:
    """variant -> guidance scale of the sweep (None without one) -> seed -> result.json of every evaluation; an
    error listing the missing ones."""
    found: dict[str, dict[float | None, dict[int, dict[str, Any]]]] = {}
    missing = []
    for unit in study.units():
        for evaluation in unit.evaluations:
            result = read_result(out / evaluation.out_dir)
            if result is None:
                missing.append(evaluation.out_dir)
            else:
                by_scale = found.setdefault(evaluation.variant, {})
                by_scale.setdefault(evaluation.guidance_scale, {})[evaluation.seed] = result
    if missing:
        raise StudyIncompleteError(
            f"{out}: {len(missing)} evaluation(s) have no result yet ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}): run the study (or its missing array elements) first"
        )
    return found


def selection_values(study: Study, found: dict) -> dict[str, dict[float, dict[int, float]]]:
    """variant -> scale -> seed -> the value of the sweep's selection metric (an error when it was not measured)."""
    metric = study.guidance_selection["metric"]
    values: dict[str, dict[float, dict[int, float]]] = {}
    for variant, by_scale in found.items():
        for scale, by_seed in by_scale.items():
            for seed, result in by_seed.items():
                value = result["metrics"].get(metric)
                if not isinstance(value, (int, float)):
                    raise StudyError(
                        f"{study.path}: guidance_selection.metric {metric!r} was not measured (the evaluations "
                        f"have {', '.join(sorted(result['metrics'])) or 'no metrics'})"
                    )
                values.setdefault(variant, {}).setdefault(scale, {})[seed] = float(value)
    return values


def collect_results(study: Study, out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """variant -> seed -> result.json of its evaluation; with a guidance sweep, the evaluation at the scale chosen
    for that seed on the other seeds (`pipeline.study.guidance_selection`). An error listing missing results."""
    found = collect_evaluations(study, out)
    if study.guidance_selection is None:
        return {variant: by_scale[None] for variant, by_scale in found.items()}
    lower = study.guidance_selection["metric"] in LOWER_IS_BETTER
    chosen = {v: leave_one_seed_out(by_scale, lower) for v, by_scale in selection_values(study, found).items()}
    return {v: {seed: found[v][scale][seed] for seed, scale in chosen[v].items()} for v in found}


def guidance_sweep(study: Study, out: Path) -> dict[str, Any] | None:
    """study.json's `guidance_selection`: the sweep per variant and scale and the scales chosen (None without)."""
    if study.guidance_selection is None:
        return None
    values = selection_values(study, collect_evaluations(study, out))
    return sweep_summary(study.guidance_selection, values, study.guidance_selection["metric"] in LOWER_IS_BETTER)


def metric_table(study: Study, results: dict[str, dict[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (metric, variant): values by seed, interval, paired difference to the baseline."""
    names: list[str] = []
    for by_seed in results.values():
        for result in by_seed.values():
            names += [name for name in result["metrics"] if name not in names]
    rows = []
    for metric in names:
        baseline = _values(results.get(study.baseline, {}), metric)
        for variant in study.variants:
            values = _values(results.get(variant.name, {}), metric)
            if not values:
                continue
            row = {"metric": metric, "variant": variant.name, "values": {str(s): v for s, v in values.items()}}
            row.update(interval([values[s] for s in sorted(values)]))
            row["difference_to_baseline"] = (
                None if variant.name == study.baseline else paired_difference(values, baseline)
            )
            rows.append(row)
    return rows


def _values(by_seed: dict[int, dict[str, Any]], metric: str) -> dict[int, float]:
    return {
        seed: float(result["metrics"][metric])
        for seed, result in sorted(by_seed.items())
        if isinstance(result["metrics"].get(metric), (int, float))
    }


def read_training_records(run_dir: Path) -> dict[int, dict[str, Any]]:
    """step -> every record logged for it in RUN/metrics.jsonl merged in file order (the trainer writes a loss
    record and then an FID record for a step; a value logged again, after a resume, replaces the earlier one).
    Unreadable lines are skipped."""
    path = run_dir / "metrics.jsonl"
    records: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return records
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.setdefault(record["step"], {}).update(record)
    return records


def curve_keys(record: dict[str, Any]) -> list[str]:
    """The training metrics a study plots: the loss and every numeric key of FID / FD_DINOv2 during training."""
    return [
        key
        for key, value in record.items()
        if isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (key == "loss" or key.removeprefix("plumbing_only_").startswith(("fid_", "fd_dinov2_")))
    ]


def training_curves(study: Study, out: Path) -> dict[str, dict[str, dict[str, list]]]:
    """variant -> metric -> {"step": [...], "mean": [...], "n": seeds}: the mean over seeds at common steps."""
    curves: dict[str, dict[str, dict[str, list]]] = {}
    runs = {(u.train_name, u.seed): u.run_dir for u in study.units()}
    for variant in study.variants:
        per_seed = [read_training_records(out / runs[(variant.train_name, seed)]) for seed in study.seeds]
        keys = sorted({key for records in per_seed for record in records.values() for key in curve_keys(record)})
        for key in keys:
            series = [{step: r[key] for step, r in records.items() if key in curve_keys(r)} for records in per_seed]
            steps = sorted(set.intersection(*(set(s) for s in series)))
            if steps:
                mean = [sum(float(s[step]) for s in series) / len(series) for step in steps]
                curves.setdefault(variant.name, {})[key] = {"step": steps, "mean": mean, "n": len(series)}
    return curves


def sample_curves(study: Study, out: Path, results: dict[str, dict[int, dict[str, Any]]]) -> dict:
    """variant -> "METRIC @ N samples" -> {"step", "mean", "n"}: the curve points' demo metrics (missing points
    are an error, as missing evaluations are), the mean over seeds at every step."""
    if not study.curve:
        return {}
    count = int(study.curve["num_samples"])
    steps = study.curve_steps()
    curves: dict[str, dict[str, dict[str, list]]] = {}
    missing = []
    for unit in study.units():
        for evaluation in curve_evaluations(study, unit):
            points = {}
            for step in steps:
                result = read_result(out / curve_eval_dir(evaluation, step))
                if result is None:
                    missing.append(curve_eval_dir(evaluation, step))
                else:
                    points[step] = result["metrics"]
            final = (read_result(out / evaluation.out_dir) or {}).get("curve_point")
            if final is not None:
                points[final["step"]] = final["metrics"]
            for step, metrics in points.items():
                for metric, value in metrics.items():
                    by_step = curves.setdefault(evaluation.variant, {}).setdefault(f"{metric} @ {count} samples", {})
                    by_step.setdefault(step, []).append(float(value))
    if missing:
        raise StudyIncompleteError(f"{out}: {len(missing)} curve point(s) have no result yet ({missing[0]}, ...)")
    return {
        variant: {
            key: {
                "step": sorted(by_step),
                "mean": [sum(by_step[s]) / len(by_step[s]) for s in sorted(by_step)],
                "n": min(len(v) for v in by_step.values()),
            }
            for key, by_step in per_key.items()
        }
        for variant, per_key in curves.items()
    }


def seed_power(study: Study, out: Path) -> list[str]:
    """`study --plan`'s lines on seeds (`verdicts.power_lines`): from the file's `power`, and from the finished
    evaluations in `out` when every one is there (a pilot)."""
    try:
        table = metric_table(study, collect_results(study, out))
        family = comparisons(table, study.baseline, claim_pairs(study.paper, study.baseline))
    except StudyIncompleteError:
        family = None
    return power_lines(study.power, family, len(study.variants))


# The measured (wall-clock) fields of `cost`: the only entries of study.json that differ between two runs of a study.
MEASURED_COST_FIELDS = ("train_seconds", "train_images_per_s", "evaluate_seconds", "sampling_images_per_s")


def training_seconds(run_dir: Path) -> float | None:
    """The seconds the steps of a run took, from its metrics.jsonl windows (images in the window over its
    images/s; a step logged again after a resume counts once); None without timed records."""
    seconds, previous = 0.0, 0
    timed = False
    for _, record in sorted(read_training_records(run_dir).items()):
        rate, seen = record.get("images_per_s"), record.get("images_seen")
        if isinstance(rate, (int, float)) and rate > 0 and isinstance(seen, int) and seen > previous:
            seconds += (seen - previous) / rate
            previous, timed = seen, True
    return seconds if timed else None


def _mean(values: list[float | None]) -> float | None:
    known = [float(v) for v in values if isinstance(v, (int, float))]
    return sum(known) / len(known) if known else None


def cost(study: Study, out: Path, results: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """variant -> what it costs: parameters and forward GFLOPs of its exported model (`diffit.model_stats`), the
    guidance and sampler it was evaluated with, and the measured wall time and throughput of its training and
    sampling (means over seeds; `MEASURED_COST_FIELDS` differ from run to run)."""
    from diffit.models import model_stats

    config = training_config(study, study.units()[0])
    images = config.train.max_steps * config.train.global_batch_size
    units = {(u.train_name, u.seed): u for u in study.units()}
    table = {}
    for variant in study.variants:
        runs = [units[(variant.train_name, seed)] for seed in study.seeds]
        export = json.loads((out / runs[0].model_dir / "config.json").read_text(encoding="utf-8"))
        stats = model_stats(export["model"]["name"], **export["model"].get("kwargs", {}))
        sampling = next(iter(results[variant.name].values())).get("sampling") or {}
        train = [training_seconds(out / run.run_dir) for run in runs]
        evaluate = [r.get("evaluate_seconds") for r in results[variant.name].values()]
        samples = [r.get("num_samples") for r in results[variant.name].values()]
        table[variant.name] = {
            "model": export["model"]["name"],
            "diffusion": (export.get("diffusion") or {}).get("type"),
            "params": stats["params"],
            "gflops": stats["gflops"],
            "guidance_scale": SELECTED if study.guidance_selection else sampling.get("guidance_scale"),
            "sampler": sampling.get("sampler"),
            "sampling_steps": sampling.get("steps"),
            "network_evaluations": _network_evaluations(sampling),
            "train_seconds": _mean(train),
            "train_images_per_s": _mean([images / s if s else None for s in train]),
            "evaluate_seconds": _mean(evaluate),
            "sampling_images_per_s": _mean([n / s if s and n else None for n, s in zip(samples, evaluate)]),
        }
    return table


def _network_evaluations(sampling: dict[str, Any]) -> int | None:
    from diffit.sampling_config import network_evaluations

    if sampling.get("sampler") is None or sampling.get("steps") is None:
        return None
    return network_evaluations(sampling["sampler"], sampling["steps"])


def budget(study: Study) -> dict[str, Any]:
    """What every run of the study shares ("per variant" where the variants differ: see `cost`)."""
    first = {}
    for unit in study.units():
        first.setdefault(unit.train_name, unit)
    configs = [training_config(study, unit) for unit in first.values()]
    config = configs[0]

    def shared(values: list[Any]) -> Any:
        return values[0] if len(set(values)) == 1 else "per variant"

    evaluate = study.evaluate
    sampling = [study.evaluate_settings(variant) for variant in study.variants]
    return {
        "max_steps": config.train.max_steps,
        "global_batch_size": config.train.global_batch_size,
        "images_seen": config.train.max_steps * config.train.global_batch_size,
        "model": shared([c.model.name for c in configs]),
        "diffusion": shared([c.diffusion.type for c in configs]),
        "sampler": shared([s.get("sampler") for s in sampling]),
        "sampling_steps": shared([s.get("steps") for s in sampling]),
        "network_evaluations": shared([_network_evaluations(s) for s in sampling]),
        # study-wide (a variant's own: `cost`)
        "guidance_scale": SELECTED if study.guidance_selection else evaluate.get("guidance_scale"),
        "num_samples": evaluate.get("num_samples", 50_000),
    }


def aggregate(study: Study, out: Path) -> dict[str, Any]:
    """The contents of `study.json` (see the module docstring); an error when runs are missing."""
    results = collect_results(study, out)
    table = metric_table(study, results)
    family = comparisons(table, study.baseline, claim_pairs(study.paper, study.baseline))
    details = {}
    for by_seed in results.values():
        for result in by_seed.values():
            for metric, detail in (result.get("details") or {}).items():
                details.setdefault(metric, detail)
    return {
        "format_version": FORMAT_VERSION,
        "name": study.name,
        "description": study.description,
        "scale": study.scale,
        "base": study.base.name,
        "seeds": study.seeds,
        "baseline": study.baseline,
        "budget": budget(study),
        "variants": [
            {"name": v.name, "train_overrides": v.train, "evaluate_overrides": v.evaluate, "run": v.train_name}
            for v in study.variants
        ],
        "metric_details": details,
        "lower_is_better": [m for m in LOWER_IS_BETTER],
        "table": table,
        "comparisons": family,
        "verdicts": verdicts(study.paper, family, study.baseline, LOWER_IS_BETTER),
        "verdict_method": METHOD,
        "curves": _merge(training_curves(study, out), sample_curves(study, out, results)),
        "curve": {**study.curve, "steps": study.curve_steps()} if study.curve else None,
        "cost": cost(study, out, results),
        **({"guidance_selection": guidance_sweep(study, out)} if study.guidance_selection else {}),
    }


def _merge(first: dict[str, dict], second: dict[str, dict]) -> dict[str, dict]:
    return {variant: {**first.get(variant, {}), **second.get(variant, {})} for variant in {**first, **second}}


def write_grids(study: Study, out: Path) -> dict[str, Path]:
    """variant -> `OUT/grids/VARIANT.png`: its first `GRID_SAMPLES` samples with the study's first seed (the same
    per-sample seeds for every variant), captioned with their class, enlarged to at least 64 px."""
    from pipeline.core.grids import image_grid, labelled_tiles, write_png

    seed = study.seeds[0]
    directories = {e.variant: e.out_dir for u in study.units() for e in curve_evaluations(study, u) if e.seed == seed}
    grids = {}
    for variant in study.variants:
        images, labels = read_samples(out / directories[variant.name], GRID_SAMPLES)
        captions = [str(int(label)) if label >= 0 else "" for label in labels]
        tiles = labelled_tiles(images, captions, scale=max(1, 64 // images.shape[1]))
        path = out / GRIDS_DIR / f"{variant.name}.png"
        grids[variant.name] = write_png(path, image_grid(tiles, columns=10, padding=2, pad_value=255))
    return grids
