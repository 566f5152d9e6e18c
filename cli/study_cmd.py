"""`diffit-pipe study`: ablations as studies of ordinary runs (see `pipeline.study`, docs/studies.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

STUDY_HELP = """Run a study: a base preset + axes of overrides (variants) x seeds, at one budget.

\b
  diffit-pipe study manifests/studies/time_embedding_demo.yaml --set data=DATA \\
      --set demo_metrics.reference=IMAGES --set demo_metrics.classifier=CLASSIFIER
\b
Each run is an ordinary run directory (OUT/runs/TRAIN/seed-S: train -> export to OUT/models/... -> evaluate
into OUT/evals/VARIANT/seed-S), run one after another in this process; then OUT/study.json (mean and 95%
t-interval over seeds, paired difference to the baseline) and OUT/study.html. Rerun the same command after a
kill: finished runs are kept (recognised by their complete outputs), unfinished ones resume from their
checkpoints. --jobs N runs N at once (one device each; on CPUs the cores shared out).
\b
On a cluster: --slurm writes OUT/study.sbatch (a job array, one element per run: `diffit-pipe study STUDY
--run-index $SLURM_ARRAY_TASK_ID`) and OUT/study-aggregate.sbatch (run after the array: --aggregate-only)."""

SET_HELP = (
    "Override a key of the study file: data=PATH, evaluate.num_samples=64, demo_metrics.classifier=PATH, "
    "seeds=[0,1] (repeatable)."
)


def study(
    study_file: Annotated[Path, typer.Argument(help="The study YAML (manifests/studies/*.yaml).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Study directory. Default: studies/NAME.")] = None,
    settings: Annotated[list[str], typer.Option("--set", help=SET_HELP)] = [],  # noqa: B006 (typer's idiom)
    run_index: Annotated[
        int | None, typer.Option("--run-index", help="Run only this unit (a SLURM array element); no aggregate.")
    ] = None,
    aggregate_only: Annotated[
        bool, typer.Option("--aggregate-only", help="Only write study.json / study.html (every run must be done).")
    ] = False,
    slurm: Annotated[bool, typer.Option("--slurm", help="Write the SLURM array scripts instead of running.")] = False,
    plan: Annotated[
        bool, typer.Option("--plan", help="List the runs, their state and the seeds power asks for; write nothing.")
    ] = False,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            "-j",
            min=1,
            help="Runs at once, each its own process (`--run-index I`, as an array element) with one CUDA device, "
            "or on CPUs a share of the cores; logs in OUT/logs/run-I.log.",
        ),
    ] = 1,
) -> None:
    """`diffit-pipe study` (see STUDY_HELP)."""
    from pipeline.core.logs import setup_logging
    from pipeline.study import StudyOptions, run_study

    setup_logging()
    options = StudyOptions(study_file, out, list(settings), run_index, aggregate_only, slurm, plan, jobs)
    run_study(options, log=typer.echo)


def register(app: typer.Typer) -> None:
    """Add `study` to the diffit-pipe app."""
    app.command("study", help=STUDY_HELP)(study)
