"""A SLURM job array for a study: `study.sbatch` (one element per unit) and `study-aggregate.sbatch`.

Each array element runs `diffit-pipe study STUDY.yaml --run-index $SLURM_ARRAY_TASK_ID` (the same --out and
--set as the command that wrote the script): the ordinary train -> export -> evaluate of one unit, skipping what
is complete. A preempted element (trainer exit 75, after its checkpoint) is requeued and resumes from that
checkpoint. The aggregate job runs after the whole array (`--dependency=afterok:ARRAY`) and writes `study.json`
and `study.html`. SLURM is the scheduler; nothing here schedules.

Every value written into a script is shell-quoted (`shlex.quote`), in comments and `#SBATCH` lines too, and a
value holding a control character (a newline would end a comment and start a command) is refused: a study name,
path or setting can never become a command.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from pipeline.core.atomic import write_text_atomic
from pipeline.study.spec import StudyError, is_name

SBATCH = "study.sbatch"
AGGREGATE_SBATCH = "study-aggregate.sbatch"


def check_script_values(name: str, values: list[str]) -> None:
    """Refuse a job name that is not a study name and any value with a control character (see the docstring)."""
    if not is_name(name):
        raise StudyError(f"study name {name[:60]!r}: not usable as a SLURM job name (A-Z a-z 0-9 . _ - only)")
    for value in values:
        if any(ord(character) < 32 or ord(character) == 127 for character in value):
            raise StudyError(f"{value[:80]!r}: a control character (newline, tab, ...) cannot go into a job script")


def study_command(study_path: Path, out: Path, settings: list[str], *extra: str) -> str:
    """The `diffit-pipe study` command line an array element (or the aggregate job) runs."""
    words = ["diffit-pipe", "study", str(study_path.resolve()), "--out", str(out.resolve())]
    for setting in settings:
        words += ["--set", setting]
    return " ".join(shlex.quote(w) for w in words + list(extra))


def write_sbatch(
    study_path: Path,
    out: Path,
    settings: list[str],
    count: int,
    name: str,
    gpus: int = 1,
    time: str = "24:00:00",
) -> tuple[Path, Path]:
    """Write the array script and the aggregate script into `out`; returns their paths."""
    check_script_values(name, [str(study_path.resolve()), str(out.resolve()), *settings, time])
    logs = out.resolve() / "slurm"
    element = study_command(study_path, out, settings) + ' --run-index "$SLURM_ARRAY_TASK_ID"'
    quote = shlex.quote
    array = f"""#!/bin/bash
# Study {name}: {count} runs, one array element each (written by `diffit-pipe study --slurm`).
#   submit:  ARRAY=$(sbatch --parsable {quote(str(out.resolve() / SBATCH))})
#            sbatch --dependency=afterok:$ARRAY {quote(str(out.resolve() / AGGREGATE_SBATCH))}
#SBATCH --job-name={name}
#SBATCH --array=0-{int(count) - 1}
#SBATCH --gpus-per-task={int(gpus)}
#SBATCH --ntasks=1
#SBATCH --time={quote(time)}
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --output={quote(str(logs) + "/%x-%A_%a.out")}
set -uo pipefail
export HF_HUB_OFFLINE=${{HF_HUB_OFFLINE:-1}}
# The element: train (resuming from its newest checkpoint) -> export -> evaluate, skipping complete outputs.
srun {element}
code=$?
if [ "$code" -eq 75 ]; then
    # Preempted or out of time after a checkpoint: requeue this element; it continues from the checkpoint.
    scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
    exit 0
fi
exit "$code"
"""
    aggregate = f"""#!/bin/bash
# Study {name}: the aggregate (study.json + study.html), after every array element finished.
#SBATCH --job-name={name}-aggregate
#SBATCH --ntasks=1
#SBATCH --time=01:00:00
#SBATCH --output={quote(str(logs) + "/%x-%j.out")}
set -euo pipefail
{study_command(study_path, out, settings, "--aggregate-only")}
"""
    (logs).mkdir(parents=True, exist_ok=True)
    return write_text_atomic(out / SBATCH, array), write_text_atomic(out / AGGREGATE_SBATCH, aggregate)
