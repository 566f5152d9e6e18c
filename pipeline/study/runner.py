"""Running a study's units: each one the ordinary train -> export -> evaluate, through the stages' entry points
(`pipeline.train.run`, `pipeline.train.export_checkpoint`, `pipeline.evaluate.evaluate`: what the CLI calls).

Locally the units run one after another in this process; on a cluster each unit is one element of a SLURM job
array (`pipeline.study.slurm`) that runs `diffit-pipe study STUDY.yaml --run-index I`. Either way a unit's finished
parts are recognised by their complete outputs, never by a log:

- training + export: the exported model's `config.json` records `train.step == train.max_steps` and its weights
  file is there (each file is written atomically). Otherwise the trainer runs with `--resume auto`: it continues
  from the newest checkpoint that verifies (or does nothing when the last one is at max_steps), then exports.
- an evaluation: `result.json` in its directory, written atomically after `metrics.json` (evaluate's own last
  file). Otherwise `evaluate` runs; it keeps the samples already in its zarr store and fills the rest.
- a curve point (a study with `curve`): the milestone checkpoint of step N exported to
  `curve-models/TRAIN/seed-S/step-N`, evaluated on `curve.num_samples` samples into
  `curve-evals/VARIANT/seed-S/step-N` with its `result.json` (the demo metrics). The last point is the demo
  metrics of the first `curve.num_samples` samples of the final evaluation (the same seeds), kept in its result.

The study directory's `plan.json` records what the study is (variants, overrides, seeds, budget); a rerun with
another study file against the same directory is refused instead of mixing the results of two studies.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_json_atomic
from pipeline.core.storage import LocalDirectory
from pipeline.core.storage_io import StorageError
from pipeline.study.checks import check_model_kwargs
from pipeline.study.checks import evaluate_options as options_of_settings
from pipeline.study.demo_metrics import demo_metrics
from pipeline.study.parse import rename_evaluate_keys
from pipeline.study.spec import Evaluation, Study, StudyError, Unit, training_config

logger = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
RESULT_FILE = "result.json"
LOCKS_DIR = "locks"


def check_directory(study: Study, out: Path, require_inputs: bool = True) -> dict[str, Any]:
    """The study's plan (`Study.describe`: its file, settings and the content identity of its inputs), checked
    against the `plan.json` of an existing study directory: another study there, or this one with other inputs
    (data, references, classifiers), is refused; so are inputs that do not exist (unless not `require_inputs`:
    `--plan` lists them). Writes nothing (`--plan` uses it alone)."""
    if out.exists() and not out.is_dir():
        raise StudyError(f"{out}: not a directory (--out names the study directory)")
    missing = study.missing_inputs()
    if missing and require_inputs:
        raise StudyError(f"{study.path}: not found: {'; '.join(missing)}")
    plan = json.loads(json.dumps(study.describe()))
    stored = read_plan(out)
    if stored is not None and stored != plan:
        if "inputs" not in stored and {**stored, "inputs": plan["inputs"]} == plan:
            return plan  # written before inputs were recorded: the same study, its inputs recorded now
        differing = sorted(key for key in {*stored, *plan} if stored.get(key) != plan.get(key))
        if differing == ["inputs"]:
            changed = sorted(k for k in plan["inputs"] if stored["inputs"].get(k) != plan["inputs"][k])
            raise StudyError(
                f"{out} holds this study run with other inputs ({', '.join(changed)} differ from its {PLAN_FILE}): "
                "resuming would mix results of both; use another --out, or restore the inputs"
            )
        raise StudyError(
            f"{out} holds another study (its {PLAN_FILE} differs from {study.path} in {', '.join(differing)}): use "
            "another --out, or remove the directory to start afresh"
        )
    return plan


def read_plan(out: Path) -> dict[str, Any] | None:
    """The study directory's `plan.json` (None: none yet)."""
    path = out / PLAN_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise StudyError(f"{path}: unreadable ({error}); remove it to start this study afresh") from None
    if not isinstance(stored, dict):
        raise StudyError(f"{path}: not a study plan; remove it to start this study afresh")
    return rename_evaluate_keys(stored)  # a plan written before guidance_* replaced cfg_* is the same study


def prepare_directory(study: Study, out: Path) -> None:
    """`check_directory`, then create the study directory with its `plan.json` (rewritten when it lacked the
    inputs' identity)."""
    plan = check_directory(study, out)
    if read_plan(out) != plan:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / PLAN_FILE, plan)


@contextlib.contextmanager
def held_lock(directory: Path, holder: str) -> Iterator[None]:
    """The exclusive lock of `directory` (`LocalDirectory.lock`, a `flock` the kernel drops when the process
    dies) for the block; StudyError naming `holder` when another process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = LocalDirectory(directory).lock()
    try:
        lock.__enter__()
    except StorageError:
        raise StudyError(f"{directory}: {holder} is already running (its lock is held); wait for it to end") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def study_lock(out: Path):
    """One `diffit-pipe study` that runs or aggregates a study directory at a time (array elements and `--jobs`
    units take only their unit's lock)."""
    return held_lock(out, "another `diffit-pipe study` on this study directory")


def unit_lock(out: Path, unit: Unit):
    """One process per unit at a time (a SLURM array element, a `--jobs` process, or the local runner)."""
    return held_lock(out / LOCKS_DIR / f"run-{unit.index}", f"run {unit.index} ({unit.run_dir})")


def export_complete(model_dir: Path, max_steps: int) -> bool:
    """Whether `model_dir` holds a complete export of a run trained to `max_steps`."""
    config_path = model_dir / "config.json"
    if not (config_path.is_file() and (model_dir / "model.safetensors").is_file()):
        return False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("train") or {}).get("step") == max_steps


def read_result(eval_dir: Path) -> dict[str, Any] | None:
    """The finished evaluation's `result.json`, or None when it is not there (an unfinished evaluation)."""
    path = eval_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise StudyError(f"{path}: not a JSON result ({error}); remove it to evaluate again") from None
    problem = result_problem(result)
    if problem:
        raise StudyError(f"{path}: not a study result ({problem}); remove it to evaluate again")
    return result


def result_problem(result: Any) -> str | None:
    """What makes `result` not a result this runner writes (None: nothing)."""
    if not isinstance(result, dict):
        return f"a {type(result).__name__}, not an object"
    metrics = result.get("metrics")
    if not isinstance(metrics, dict):
        return "no 'metrics' object"
    for name, value in metrics.items():
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            return f"metric {name[:60]!r} is not a finite number"
    if not (isinstance(result.get("seed"), int) and isinstance(result.get("num_samples"), int)):
        return "no integer 'seed' and 'num_samples'"
    point = result.get("curve_point")
    if point is not None:
        if not (isinstance(point, dict) and isinstance(point.get("step"), int)):
            return "a malformed 'curve_point'"
        problem = result_problem({**result, **point, "curve_point": None})
        if problem:
            return f"its curve_point has {problem}"
    return None


def curve_model_dir(unit: Unit, step: int) -> str:
    """Where the EMA of the unit's milestone checkpoint at `step` is exported for its curve point."""
    return f"curve-models/{unit.train_name}/seed-{unit.seed}/step-{step:07d}"


def curve_evaluations(study: Study, unit: Unit) -> list[Evaluation]:
    """The unit's evaluations that have curve points (with a guidance sweep: those at the shown scale)."""
    return [evaluation for evaluation in unit.evaluations if study.shown(evaluation)]


def curve_eval_dir(evaluation: Evaluation, step: int) -> str:
    """Where one evaluation's curve point at `step` is evaluated."""
    return f"curve-evals/{evaluation.variant}/seed-{evaluation.seed}/step-{step:07d}"


def unit_state(study: Study, unit: Unit, out: Path) -> str:
    """'done' (every evaluation and curve point has its result), 'trained' (the export is complete) or 'todo'."""
    steps = study.curve_steps()
    # The evaluations' results first: a result that is no result is an error before anything else is said.
    evaluated = all(read_result(out / e.out_dir) is not None for e in unit.evaluations)
    points = [curve_eval_dir(e, step) for e in curve_evaluations(study, unit) for step in steps]
    if evaluated and all(read_result(out / point) for point in points):
        return "done"
    max_steps = training_config(study, unit).train.max_steps
    return "trained" if export_complete(out / unit.model_dir, max_steps) else "todo"


def evaluate_options(study: Study, evaluation: Evaluation, model_dir: Path, out_dir: Path):
    """The `EvaluateOptions` of one evaluation: the study's settings, the variant's, the sweep's scale, its seed."""
    return options_of_settings(study.evaluation_settings(evaluation), evaluation.seed, model_dir, out_dir)


def guide_model_dir(unit: Unit, step: int) -> str:
    """Where the EMA of the unit's milestone checkpoint at `step` is exported when it guides (`guide_step`)."""
    return f"guide-models/{unit.train_name}/seed-{unit.seed}/step-{step:07d}"


def with_guide(study: Study, unit: Unit, out: Path, variant_name: str, options):
    """`options` with the autoguidance model a variant's `evaluate.guide_step` names: the EMA of the unit's own
    milestone checkpoint at that step (Karras et al. 2024 guide with an earlier, weaker model of the same run),
    exported once; `options` unchanged without it."""
    step = study.evaluate_settings(study.variant(variant_name)).get("guide_step")
    if step is None:
        return options
    return dataclasses.replace(options, guide_model=export_milestone(unit, out, step, guide_model_dir(unit, step)))


def export_milestone(unit: Unit, out: Path, step: int, model_dir: str) -> Path:
    """The EMA of the unit's milestone checkpoint at `step`, exported to `out / model_dir` (once)."""
    from pipeline.train import CHECKPOINTS_DIR, checkpoint_name, export_checkpoint

    target = out / model_dir
    if not export_complete(target, step):
        checkpoint = out / unit.run_dir / CHECKPOINTS_DIR / checkpoint_name(step)
        if not checkpoint.is_dir():
            raise StudyError(
                f"{checkpoint}: the milestone checkpoint at step {step} is gone; rerun the unit's training "
                "(remove its model export)"
            )
        export_checkpoint(checkpoint, target)
    return target


def train_unit(study: Study, unit: Unit, out: Path) -> None:
    """Train (or resume) the unit's run to max_steps and export its EMA; nothing when the export is complete."""
    from pipeline.train import TrainOptions, export_checkpoint, run_train

    max_steps = training_config(study, unit).train.max_steps
    model_dir = out / unit.model_dir
    if export_complete(model_dir, max_steps):
        return
    if study.data is None:
        raise StudyError(f"{study.path}: no dataset: set 'data' in the study file or pass --set data=PATH")
    check_model_kwargs(study, [unit])  # checked lazily: only the unit about to train
    run_dir = out / unit.run_dir
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("study %s: training %s", study.name, unit.run_dir)
    run_train(
        TrainOptions(
            run_dir=run_dir, config_path=study.base, data_dir=study.data, overrides=unit.overrides, resume="auto"
        )
    )
    export_checkpoint(run_dir, model_dir)


def evaluate_unit(study: Study, unit: Unit, out: Path) -> None:
    """Every evaluation of the unit's model that has no result yet: evaluate, demo metrics, `result.json`."""
    from pipeline.evaluate import run_evaluate

    for evaluation in unit.evaluations:
        eval_dir = out / evaluation.out_dir
        if read_result(eval_dir) is not None:
            continue
        logger.info("study %s: evaluating %s", study.name, evaluation.out_dir)
        options = evaluate_options(study, evaluation, out / unit.model_dir, eval_dir)
        record = run_evaluate(with_guide(study, unit, out, evaluation.variant, options))
        timings = record.get("timings_s") or {}
        images, labels = read_samples(eval_dir)
        values, details = demo_metrics(study.demo_metrics, images, labels)
        metrics = {**values, **(record.get("metrics") or {})}
        curve_point = None
        if study.curve and study.shown(evaluation):
            count = int(study.curve["num_samples"])
            point, _ = demo_metrics(study.demo_metrics, images[:count], labels[:count])
            step = training_config(study, unit).train.max_steps
            curve_point = {"step": step, "metrics": point, "num_samples": count}
        plumbing = {f"plumbing_only_{k}": v for k, v in (record.get("plumbing_only_metrics") or {}).items()}
        result = {
            "variant": evaluation.variant,
            "seed": evaluation.seed,
            "run_dir": unit.run_dir,
            "model_dir": unit.model_dir,
            "metrics": {**metrics, **plumbing},
            "details": details,
            "num_samples": int(len(images)),
            "sampling": record.get("sampling"),  # the resolved settings (guidance scale, sampler, steps)
            **({"guidance_scale": evaluation.guidance_scale} if evaluation.guidance_scale is not None else {}),
            # Measured, so not the same in two runs: the aggregate keeps it apart (`study.json` "cost").
            "evaluate_seconds": timings.get("preflight_and_sampling"),
        }
        if curve_point is not None:
            result["curve_point"] = curve_point
        write_json_atomic(eval_dir / RESULT_FILE, result)


def curve_unit(study: Study, unit: Unit, out: Path) -> None:
    """The unit's curve points without a result: export each milestone checkpoint's EMA, evaluate it on
    `curve.num_samples` samples (no Inception metrics: FID during training is the trainer's `eval.every`), and
    write the demo metrics."""
    from pipeline.evaluate import run_evaluate

    count = int(study.curve.get("num_samples") or 0)
    for step in study.curve_steps():
        pending = [e for e in curve_evaluations(study, unit) if read_result(out / curve_eval_dir(e, step)) is None]
        if not pending:
            continue
        model_dir = export_milestone(unit, out, step, curve_model_dir(unit, step))
        for evaluation in pending:
            eval_dir = out / curve_eval_dir(evaluation, step)
            logger.info("study %s: curve point %s", study.name, eval_dir.relative_to(out))
            options = evaluate_options(study, evaluation, model_dir, eval_dir)
            options = dataclasses.replace(options, num_samples=count, metrics=())
            run_evaluate(with_guide(study, unit, out, evaluation.variant, options))
            images, labels = read_samples(eval_dir)
            values, _ = demo_metrics(study.demo_metrics, images, labels)
            result = {"variant": evaluation.variant, "seed": evaluation.seed, "step": step, "metrics": values}
            write_json_atomic(eval_dir / RESULT_FILE, {**result, "num_samples": int(len(images))})


def read_samples(eval_dir: Path, count: int | None = None):
    """The first `count` (default: all) samples and their labels from an evaluation's complete zarr store."""
    from pipeline.evaluate import STORE_NAME, SampleStore

    store = SampleStore.open(eval_dir / STORE_NAME, mode="r")
    store.require_complete()
    count = store.layout.num_samples if count is None else min(count, store.layout.num_samples)
    return store.read_images(0, count), store.read_labels()[:count]


def run_unit(study: Study, unit: Unit, out: Path) -> None:
    """One unit, as one array element runs it: train + export (unless complete), then its evaluations; under the
    unit's lock, so two processes never work on one unit."""
    with unit_lock(out, unit):
        if unit_state(study, unit, out) == "done":
            logger.info("study %s: %s is complete", study.name, unit.run_dir)
            return
        train_unit(study, unit, out)
        evaluate_unit(study, unit, out)
        curve_unit(study, unit, out)


def run_all(study: Study, out: Path, log=print) -> None:
    """Every unit, one after another, skipping finished ones (the local runner)."""
    units = study.units()
    for unit in units:
        state = unit_state(study, unit, out)
        log(f"[study] run {unit.index + 1}/{len(units)} {unit.run_dir}: {state}")
        if state != "done":
            run_unit(study, unit, out)
