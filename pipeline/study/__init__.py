"""The study stage: ablations as studies of ordinary runs.

`spec` is a study (a base preset, axes of overrides, seeds, one budget) and its expansion into units (one
ordinary training run each) and evaluations, `parse` reads a study file into one, `checks` checks it against the
training and evaluate stages; `runner` runs a unit through the train / export / evaluate stages'
entry points, skipping complete outputs; `demo_metrics` is FD_demo and the consistencies at demo scale; `stats`
the interval arithmetic; `verdicts` judges the paper's claims (Holm-adjusted paired tests) and plans seeds by
power; `identity` fingerprints a study's inputs; `aggregate` writes `study.json`; `page` the HTML page; `slurm`
the job-array scripts; `parallel` runs units as processes. The door is `run.run_study(StudyOptions)`.
"""

from pipeline.study.aggregate import STUDY_JSON, StudyIncompleteError, aggregate, seed_power
from pipeline.study.checks import check_model_kwargs
from pipeline.study.demo_metrics import FD_DEMO, classifier_features
from pipeline.study.page import STUDY_HTML, write_page
from pipeline.study.parse import load_study
from pipeline.study.run import StudyOptions, run_study
from pipeline.study.runner import (
    PLAN_FILE,
    RESULT_FILE,
    check_directory,
    prepare_directory,
    run_all,
    run_unit,
    study_lock,
    unit_state,
)
from pipeline.study.slurm import AGGREGATE_SBATCH, SBATCH, write_sbatch
from pipeline.study.spec import BUDGET_KEYS, Study, StudyError
from pipeline.study.stats import interval, paired_difference

__all__ = [
    "AGGREGATE_SBATCH",
    "BUDGET_KEYS",
    "FD_DEMO",
    "PLAN_FILE",
    "RESULT_FILE",
    "SBATCH",
    "STUDY_HTML",
    "STUDY_JSON",
    "Study",
    "StudyOptions",
    "StudyError",
    "StudyIncompleteError",
    "aggregate",
    "check_directory",
    "check_model_kwargs",
    "classifier_features",
    "interval",
    "load_study",
    "paired_difference",
    "prepare_directory",
    "run_all",
    "run_study",
    "run_unit",
    "seed_power",
    "study_lock",
    "unit_state",
    "write_page",
    "write_sbatch",
]
