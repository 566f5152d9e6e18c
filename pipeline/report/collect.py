"""Reading a run for its report: what the train, export and evaluate stages wrote, and how the pieces link up.

Everything here is read as untrusted data and nothing is required: a missing file is "not present", a file that
cannot be read is recorded with the reason (`Loaded.problem`), and neither stops the report. Only a run
directory that does not exist is an error (`ReportError`).

The page is meant to be mailed, so nothing from outside the run may reach it: every file and directory is looked
at through one gate (`Gate.admits`), which lets through only regular files (and directories) whose real path --
every symbolic link resolved -- lies inside an allowed root: the run directory, the export and evaluation
directories given on the command line, and the dataset directory the run recorded (its manifest and failures are
the run's lineage). A symbolic link that stays inside a root is followed (it cannot show anything the root does
not hold); one that points outside, and anything that is not a regular file (a FIFO, a device), is skipped and
listed in the page's "skipped" section with the reason -- never its target. Files are then opened by their
resolved path with O_NOFOLLOW, so a link swapped in after the check is not followed either.

The lineage, each link checked by hash where the files record one:

    dataset manifest (sha256 of manifest.json; the run recorded it in RUN/run.json and every checkpoint)
      -> run config (RUN/config.yaml; every checkpoint holds a copy, hashed in its files.json)
      -> checkpoints (RUN/checkpoints/step-*/files.json: size and sha256 of every file)
      -> exports (config.json names the checkpoint it came from; model.safetensors hashed here)
      -> metrics (an evaluate output's metrics.json records the sha256 of the model it sampled)
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError, PipelineError
from pipeline.core.manifest import MANIFEST_NAME
from pipeline.core.shards import FAILURES_NAME
from pipeline.core.storage import Location
from pipeline.core.storage_io import is_url, join
from pipeline.evaluate import METRICS_FILE
from pipeline.train import (
    CHECKPOINTS_DIR,
    FILE_HASHES,
    LATEST_POINTER,
    METRICS,
    RUN_CONFIG,
    RUN_INFO,
    SAMPLES_DIR,
    TRAIN_STATE,
    checkpoint_problem,
    list_checkpoints,
)

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
MAX_FAILURES_SHOWN = 10
_GRID_NAME = re.compile(r"^step-(\d+)\.png$")


class ReportError(InputError):
    """The report cannot be made: the run directory does not exist (exit 2)."""


@dataclass
class Loaded:
    """One file read for the report: its content (None when absent or unreadable), its sha256 and, when it could
    not be read, why. A file that does not exist is simply not present."""

    path: Path
    data: Any = None
    sha256: str | None = None
    problem: str | None = None

    @property
    def present(self) -> bool:
        return self.sha256 is not None

    @property
    def usable(self) -> bool:
        return self.present and self.problem is None


@dataclass
class Gate:
    """Which paths the report may read (see the module docstring), and the ones it refused, with why."""

    roots: list[str] = field(default_factory=list)  # real paths
    skipped: dict[str, str] = field(default_factory=dict)  # path as met -> reason

    def allow(self, root: str | Path) -> None:
        """Add a root (its real path)."""
        real = os.path.realpath(root)
        if real not in self.roots:
            self.roots.append(real)

    def admits(self, path: str | Path, directory: bool = False) -> bool:
        """Whether `path` exists, is a regular file (a directory with `directory`) and resolves inside a root;
        a path that exists but is refused is recorded in `skipped`."""
        try:
            info = os.stat(path)
        except OSError:
            return False  # missing, or a dangling link: not present
        real = os.path.realpath(path)
        if not any(os.path.commonpath([real, root]) == root for root in self.roots):
            self.skipped[str(path)] = "a symbolic link pointing outside the run (not read)"
            return False
        wanted = stat.S_ISDIR if directory else stat.S_ISREG
        if not wanted(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            self.skipped[str(path)] = f"{kind} where a {'directory' if directory else 'file'} was expected (not read)"
            return False
        return True


# The gate of the run being read (`read_run` sets it); outside `read_run` every path is admitted unchecked.
_GATE: contextvars.ContextVar[Gate | None] = contextvars.ContextVar("report_gate", default=None)


def admitted(path: str | Path, directory: bool = False) -> bool:
    """`path` passes the current gate (see `Gate.admits`); without one, it exists as that kind."""
    gate = _GATE.get()
    if gate is None:
        return Path(path).is_dir() if directory else Path(path).is_file()
    return gate.admits(path, directory)


def open_admitted(path: str | Path, mode: str = "rb", **kwargs):
    """Open an admitted file by its resolved path, refusing a symbolic link swapped in since (O_NOFOLLOW)."""
    descriptor = os.open(os.path.realpath(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    return os.fdopen(descriptor, mode, **kwargs)


def read_file(path: Path, parse: str = "text") -> Loaded:
    """`path` as text, JSON ("json": a JSON object) or as its size only ("hash"), with its sha256."""
    loaded = Loaded(Path(path))
    if not admitted(loaded.path):
        return loaded
    try:
        with open_admitted(loaded.path) as handle:
            if parse == "hash":
                loaded.sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
                return loaded
            raw = handle.read()
    except OSError as error:
        loaded.sha256, loaded.problem = "", f"cannot be read ({error})"
        return loaded
    loaded.sha256 = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
        loaded.data = json.loads(text) if parse == "json" else text
    except (UnicodeDecodeError, ValueError) as error:
        loaded.problem = f"not {'JSON' if parse == 'json' else 'UTF-8 text'} ({error})"
        return loaded
    if parse == "json" and not isinstance(loaded.data, dict):
        loaded.data, loaded.problem = None, "does not hold a JSON object"
    return loaded


def mapping(value: Any) -> dict[str, Any]:
    """`value` when it is a dict, else an empty one (files from elsewhere may hold anything)."""
    return value if isinstance(value, dict) else {}


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what a curve can plot."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------------------
# The run's own files


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The records of RUN/metrics.jsonl that have an integer step, and how many lines were not such a record."""
    records, skipped = [], 0
    if not admitted(path):
        return records, skipped
    with open_admitted(path, "r", encoding="utf-8", errors="replace") as handle:
        lines = handle.read().splitlines()
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def sample_grids(run_dir: Path) -> list[tuple[int, Path]]:
    """The EMA sample grids RUN/samples/step-*.png, as (step, path), by step."""
    directory = run_dir / SAMPLES_DIR
    if not admitted(directory, directory=True):
        return []
    found = []
    for path in directory.iterdir():
        match = _GRID_NAME.match(path.name)
        if match and admitted(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


@dataclass
class Checkpoint:
    """One complete checkpoint: its recorded file hashes, its train state and what is wrong with it, if anything."""

    step: int
    path: Path
    files: dict[str, dict[str, Any]]  # name -> {"bytes", "sha256"} from files.json (empty when it has none)
    state: dict[str, Any]
    latest: bool
    status: str  # "sizes match files.json", "verified (sha256)", "no files.json", or the problem


def read_checkpoints(run_dir: Path, verify: bool) -> list[Checkpoint]:
    """Every complete checkpoint of the run, oldest first. Sizes are always compared with files.json; with
    `verify` every file is hashed again (`pipeline.train.checkpoint_problem`)."""
    pointer = read_file(run_dir / CHECKPOINTS_DIR / LATEST_POINTER)
    latest = pointer.data.strip() if pointer.usable else None
    checkpoints = []
    for step, path in list_checkpoints(run_dir):
        if not admitted(path, directory=True):
            continue
        record = read_file(path / FILE_HASHES, "json")
        files = {str(name): mapping(entry) for name, entry in mapping(mapping(record.data).get("files")).items()}
        if record.problem:
            status = f"{FILE_HASHES} {record.problem}"
        elif not record.present:
            status = f"no {FILE_HASHES} (an older checkpoint): not verifiable"
        elif verify:
            refused = [name for name in files if (path / name).exists() and not admitted(path / name)]
            status = (
                f"{refused[0]}: skipped (see skipped files), not verified"
                if refused
                else checkpoint_problem(path) or "verified: every file matches its sha256"
            )
        else:
            status = size_problem(path, files) or f"sizes match {FILE_HASHES} (--verify re-hashes)"
        state = mapping(read_file(path / TRAIN_STATE, "json").data)
        checkpoints.append(Checkpoint(step, path, files, state, path.name == latest, status))
    return checkpoints


def size_problem(checkpoint_dir: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """The first recorded file of a checkpoint that is missing or has another size (no hashing: cheap)."""
    for name, entry in files.items():
        path = checkpoint_dir / name
        if not admitted(path):
            return f"{name}: missing or skipped"
        if path.stat().st_size != entry.get("bytes"):
            return f"{name}: {path.stat().st_size} bytes, {FILE_HASHES} records {entry.get('bytes')}"
    return None


@dataclass
class Dataset:
    """The dataset the run trained on: its manifest, the hash the run recorded for it, its first failures."""

    path: Path | str | None  # a local directory or a dataset URL
    manifest: Loaded | None
    recorded_hash: str | None
    failures: list[dict[str, Any]] = field(default_factory=list)


def read_dataset(run_info: dict[str, Any], checkpoints: list[Checkpoint]) -> Dataset:
    """The dataset named by RUN/run.json (or, without it, by the newest checkpoint's train state)."""
    entry = mapping(run_info.get("dataset"))
    if not entry and checkpoints:
        entry = mapping(checkpoints[-1].state.get("dataset"))
    recorded = entry.get("manifest_hash") if isinstance(entry.get("manifest_hash"), str) else None
    if not isinstance(entry.get("path"), str):
        return Dataset(None, None, recorded)
    if is_url(entry["path"]):  # a dataset in object storage: its manifest is read from there (failures are not)
        return Dataset(entry["path"], read_object_manifest(entry["path"]), recorded)
    path = Path(entry["path"])
    manifest = read_file(path / MANIFEST_NAME, "json")
    return Dataset(path, manifest, recorded, first_failures(path / FAILURES_NAME))


def read_object_manifest(url: str) -> Loaded:
    """The manifest of a dataset URL as a `Loaded` (named by its URL); a store that cannot be reached (offline,
    no credentials) is a problem shown on the page, not an error."""
    loaded = Loaded(join(url, MANIFEST_NAME))  # type: ignore[arg-type]  # a URL, shown as text
    try:
        raw = Location.of(url).read_bytes(MANIFEST_NAME)
    except FileNotFoundError:
        return loaded
    except (OSError, PipelineError) as error:
        loaded.sha256, loaded.problem = "", f"cannot be read ({error})"
        return loaded
    loaded.sha256 = hashlib.sha256(raw).hexdigest()
    try:
        loaded.data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        loaded.problem = f"not JSON ({error})"
    return loaded


def first_failures(path: Path) -> list[dict[str, Any]]:
    """The first `MAX_FAILURES_SHOWN` records of a dataset's failures.jsonl (read no further: it may be long)."""
    failures = []
    if not admitted(path):
        return failures
    with open_admitted(path, "r", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if len(failures) == MAX_FAILURES_SHOWN:
                break
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                failures.append(record)
    return failures


# ---------------------------------------------------------------------------------------------------------------
# Exports and evaluations (given on the command line, or found inside the run directory)


@dataclass
class Export:
    """An exported model directory: its config.json and the sha256 of its weights."""

    path: Path
    config: Loaded
    weights: Loaded


@dataclass
class Evaluation:
    """An evaluate output directory's metrics.json."""

    path: Path
    record: Loaded


def read_export(directory: Path) -> Export:
    return Export(
        directory, read_file(directory / EXPORT_CONFIG, "json"), read_file(directory / EXPORT_WEIGHTS, "hash")
    )


def read_evaluation(path: Path) -> Evaluation:
    """An evaluate output directory (or its metrics.json itself)."""
    directory = path.parent if path.name == METRICS_FILE and admitted(path) else path
    return Evaluation(directory, read_file(directory / METRICS_FILE, "json"))


def found_inside(run_dir: Path, pattern: str, marker: str) -> list[Path]:
    """Directories RUN/<pattern> that hold `marker` (exports and evaluations kept inside the run directory)."""
    return sorted(path for path in run_dir.glob(pattern) if admitted(path, directory=True) and admitted(path / marker))


def unique(paths: list[Path]) -> list[Path]:
    """`paths` without repeats (the same directory given twice, or given and also found), in order."""
    seen, kept = set(), []
    for path in paths:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            kept.append(path)
    return kept


# ---------------------------------------------------------------------------------------------------------------
# The whole run


@dataclass
class RunFiles:
    """Everything the report shows, as read from the run directory and the exports / evaluations given."""

    run_dir: Path
    records: list[dict[str, Any]]
    skipped_lines: int
    grids: list[tuple[int, Path]]
    config: Loaded
    run_info: Loaded
    checkpoints: list[Checkpoint]
    dataset: Dataset
    exports: list[Export]
    evaluations: list[Evaluation]
    skipped: dict[str, str] = field(default_factory=dict)  # paths not read (links outside the run, ...): why


def read_run(
    run_dir: str | Path, exports: list[Path] = (), evaluations: list[Path] = (), verify: bool = False
) -> RunFiles:
    """Read a run directory; `exports` / `evaluations` add directories to those found as RUN/export*, RUN/eval*."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "is not a directory" if run_dir.exists() else "does not exist"
        raise ReportError(f"{run_dir}: {what} (expected a run directory written by `diffit-pipe train`)")
    gate = Gate()
    for root in (run_dir, *exports, *[path.parent if path.name == METRICS_FILE else path for path in evaluations]):
        gate.allow(root)
    token = _GATE.set(gate)
    try:
        return _read_run(run_dir, gate, list(map(Path, exports)), list(map(Path, evaluations)), verify)
    finally:
        _GATE.reset(token)


def _read_run(run_dir: Path, gate: Gate, exports: list[Path], evaluations: list[Path], verify: bool) -> RunFiles:
    """`read_run` behind its gate."""
    records, skipped = read_metrics(run_dir / METRICS)
    run_info = read_file(run_dir / RUN_INFO, "json")
    checkpoints = read_checkpoints(run_dir, verify)
    dataset_dir = mapping(mapping(run_info.data).get("dataset")).get("path")
    if isinstance(dataset_dir, str) and not is_url(dataset_dir):
        gate.allow(dataset_dir)  # the recorded dataset: part of the lineage (see the module docstring)
    export_dirs = unique([*exports, *found_inside(run_dir, "export*", EXPORT_CONFIG)])
    eval_dirs = unique([*evaluations, *found_inside(run_dir, "eval*", METRICS_FILE)])
    return RunFiles(
        run_dir=run_dir,
        records=records,
        skipped_lines=skipped,
        grids=sample_grids(run_dir),
        config=read_file(run_dir / RUN_CONFIG),
        run_info=run_info,
        checkpoints=checkpoints,
        dataset=read_dataset(mapping(run_info.data), checkpoints),
        exports=[read_export(path) for path in export_dirs],
        evaluations=[read_evaluation(path) for path in eval_dirs],
        skipped=gate.skipped,
    )
