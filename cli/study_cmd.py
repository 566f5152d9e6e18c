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
    plan: Annotated[bool, typer.Option("--plan", help="List the runs and their state; run nothing.")] = False,
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
    from pipeline.study import (
        STUDY_HTML,
        STUDY_JSON,
        StudyError,
        aggregate,
        check_directory,
        load_study,
        prepare_directory,
        run_all,
        run_unit,
        seed_power,
        study_lock,
        unit_state,
        write_page,
        write_sbatch,
    )

    setup_logging()
    spec = load_study(study_file, list(settings))
    out = out or Path("studies") / spec.name
    units = spec.units()
    if plan:  # a look: checks the directory against the study, writes nothing
        check_directory(spec, out)
        for unit in units:
            names = ", ".join(e.variant for e in unit.evaluations)
            typer.echo(f"{unit.index}: {unit.run_dir} [{unit_state(spec, unit, out)}] variants {names}")
        for line in seed_power(spec, out):
            typer.echo(line)
        return
    prepare_directory(spec, out)
    if slurm:
        array, aggregate_script = write_sbatch(study_file, out, list(settings), len(units), spec.name)
        typer.echo(f"wrote {array} ({len(units)} array elements) and {aggregate_script}")
        typer.echo(
            f"submit: ARRAY=$(sbatch --parsable {array}) && sbatch --dependency=afterok:$ARRAY {aggregate_script}"
        )
        return
    if run_index is not None:
        if not 0 <= run_index < len(units):
            raise StudyError(f"--run-index {run_index}: the study {spec.name} has runs 0..{len(units) - 1}")
        run_unit(spec, units[run_index], out)
        typer.echo(f"run {run_index} ({units[run_index].run_dir}) complete")
        return
    from pipeline.core.atomic import write_json_atomic
    from pipeline.study.aggregate import write_grids

    with study_lock(out):
        if not aggregate_only and jobs > 1:
            from pipeline.study.parallel import run_parallel

            pending = [unit for unit in units if unit_state(spec, unit, out) != "done"]
            run_parallel(study_file, out, list(settings), pending, jobs, log=typer.echo)
        elif not aggregate_only:
            run_all(spec, out, log=typer.echo)
        result = aggregate(spec, out)
        write_json_atomic(out / STUDY_JSON, result)
        write_page(result, out / STUDY_HTML, write_grids(spec, out))
    typer.echo(f"wrote {out / STUDY_JSON} and {out / STUDY_HTML}")


def register(app: typer.Typer) -> None:
    """Add `study` to the diffit-pipe app."""
    app.command("study", help=STUDY_HELP)(study)
