"""The study stage's door: `run_study(StudyOptions)` -- what `diffit-pipe study` does, in one place.

    run_study(StudyOptions(study_file=Path("manifests/studies/time_embedding_demo.yaml"), settings=["data=D"]))

One call does one of: look (`plan`: the units and their state, the seeds power asks for; writes nothing), write
the SLURM scripts (`slurm`), run one unit (`run_index`: an array element or a `--jobs` process), or run every unit
that is not done (one after another, or `jobs` at a time) and aggregate (`aggregate_only`: only the aggregate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.atomic import write_json_atomic
from pipeline.study.aggregate import STUDY_JSON, aggregate, seed_power, write_grids
from pipeline.study.page import STUDY_HTML, write_page
from pipeline.study.parse import load_study
from pipeline.study.runner import check_directory, prepare_directory, run_all, run_unit, study_lock, unit_state
from pipeline.study.slurm import write_sbatch
from pipeline.study.spec import StudyError


@dataclass
class StudyOptions:
    """What `diffit-pipe study` parses."""

    study_file: Path
    out: Path | None = None  # default: studies/NAME
    settings: list[str] = field(default_factory=list)  # `--set KEY=VALUE` of the study file's own keys
    run_index: int | None = None  # run only this unit (a SLURM array element); no aggregate
    aggregate_only: bool = False
    slurm: bool = False
    plan: bool = False
    jobs: int = 1  # units at once, each its own process (`pipeline.study.parallel`)


def run_study(options: StudyOptions, log: Callable[[str], None] = print) -> Path:
    """Do what `options` ask (see the module docstring); returns the study directory."""
    study = load_study(options.study_file, list(options.settings))
    out = options.out or Path("studies") / study.name
    units = study.units()
    if options.plan:  # a look: checks the directory against the study, writes nothing
        missing = study.missing_inputs()
        if missing:  # a look before the inputs exist (a study planned before `diffit-pipe demo` ran, say)
            log(f"inputs not found yet (needed to run): {'; '.join(missing)}")
        check_directory(study, out, require_inputs=False)
        for unit in units:
            names = ", ".join(dict.fromkeys(e.variant for e in unit.evaluations))
            if study.guidance_selection:
                names += f" at guidance scales {', '.join(f'{g:g}' for g in study.guidance_selection['scales'])}"
            log(f"{unit.index}: {unit.run_dir} [{unit_state(study, unit, out)}] variants {names}")
        for line in seed_power(study, out):
            log(line)
        return out
    prepare_directory(study, out)
    if options.slurm:
        array, aggregate_script = write_sbatch(options.study_file, out, list(options.settings), len(units), study.name)
        log(f"wrote {array} ({len(units)} array elements) and {aggregate_script}")
        log(f"submit: ARRAY=$(sbatch --parsable {array}) && sbatch --dependency=afterok:$ARRAY {aggregate_script}")
        return out
    if options.run_index is not None:
        if not 0 <= options.run_index < len(units):
            raise StudyError(f"--run-index {options.run_index}: the study {study.name} has runs 0..{len(units) - 1}")
        run_unit(study, units[options.run_index], out)
        log(f"run {options.run_index} ({units[options.run_index].run_dir}) complete")
        return out
    with study_lock(out):
        if not options.aggregate_only and options.jobs > 1:
            from pipeline.study.parallel import run_parallel

            pending = [unit for unit in units if unit_state(study, unit, out) != "done"]
            run_parallel(options.study_file, out, list(options.settings), pending, options.jobs, len(units), log=log)
        elif not options.aggregate_only:
            run_all(study, out, log=log)
        result = aggregate(study, out)
        write_json_atomic(out / STUDY_JSON, result)
        write_page(result, out / STUDY_HTML, write_grids(study, out))
    log(f"wrote {out / STUDY_JSON} and {out / STUDY_HTML}")
    return out
