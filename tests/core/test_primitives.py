"""pipeline.core: the atomic-write primitive, the error contract, image grids, and the package's layering rules."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.core.atomic import (
    AtomicFile,
    atomic_open,
    atomic_path,
    remove_temporary_files,
    replace_directory,
    write_json_atomic,
)
from pipeline.core.errors import InputError, JobFailedError, PipelineError
from pipeline.core.grids import image_grid, write_png

ROOT = Path(__file__).resolve().parents[2]


def _names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failure_mid_write_leaves_the_old_file_intact_and_no_temporary_file(tmp_path, failure):
    path = tmp_path / "manifest.json"
    path.write_bytes(b"old complete content")
    with pytest.raises(type(failure)):
        with atomic_open(path) as handle:
            handle.write(b"new, half written")
            raise failure
    assert path.read_bytes() == b"old complete content"
    assert _names(tmp_path) == ["manifest.json"]


def test_atomic_path_failure_of_a_library_writer_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "grid.png"
    path.write_bytes(b"old png")
    with pytest.raises(ValueError, match="unknown file extension"):
        with atomic_path(path) as temp:
            temp.write_bytes(b"partial")  # what a library may have written before failing
            from PIL import Image

            Image.new("RGB", (2, 2)).save(temp.with_suffix(".not-a-format"))  # raises before the rename
    assert path.read_bytes() == b"old png"
    assert _names(tmp_path) == ["grid.png"]


def test_a_failing_rename_removes_the_temporary_file(tmp_path):
    target = tmp_path / "occupied"
    target.mkdir()  # os.replace of a file onto a non-empty directory fails
    (target / "x").write_text("x")
    with pytest.raises(OSError):
        write_json_atomic(target, {"a": 1})
    assert _names(tmp_path) == ["occupied"] and _names(target) == ["x"]


def test_committed_file_has_the_new_bytes_and_the_umask_mode(tmp_path):
    path = tmp_path / "sub" / "state.json"
    write_json_atomic(path, {"b": 2, "a": 1})
    assert path.read_text() == '{\n  "a": 1,\n  "b": 2\n}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert _names(path.parent) == ["state.json"]


def test_atomic_file_commit_and_abort(tmp_path):
    writer = AtomicFile(tmp_path / "a.tar")
    writer.handle.write(b"abc")
    assert _names(tmp_path) == [writer.temp_path.name] and ".tmp-" in writer.temp_path.name
    assert writer.commit() == tmp_path / "a.tar"
    assert (tmp_path / "a.tar").read_bytes() == b"abc" and _names(tmp_path) == ["a.tar"]
    aborted = AtomicFile(tmp_path / "a.tar")
    aborted.handle.write(b"replacement")
    aborted.abort()
    assert (tmp_path / "a.tar").read_bytes() == b"abc" and _names(tmp_path) == ["a.tar"]


def test_a_killed_writer_leaves_the_old_file_and_a_temporary_file_that_clean_up_removes(tmp_path):
    path = tmp_path / "shard.tar"
    path.write_bytes(b"old")
    script = textwrap.dedent(
        f"""
        import sys, time
        from pipeline.core.atomic import atomic_open
        with atomic_open({str(path)!r}) as handle:
            handle.write(b"new data")
            handle.flush()
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert path.read_bytes() == b"old"
    leftovers = [name for name in _names(tmp_path) if name != "shard.tar"]
    assert len(leftovers) == 1 and leftovers[0].startswith("shard.tar.tmp-")
    assert remove_temporary_files(tmp_path) == leftovers
    assert _names(tmp_path) == ["shard.tar"]


def test_replace_directory_swaps_a_complete_directory_in(tmp_path):
    target, new = tmp_path / "model", tmp_path / "model.new"
    target.mkdir()
    (target / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_directory(new, target)
    assert _names(tmp_path) == ["model"] and _names(target) == ["new.txt"]


# ---------------------------------------------------------------------------------------------------------------
# Error contract


def test_error_classes_carry_their_exit_codes():
    assert issubclass(InputError, ValueError) and InputError("x").exit_code == 2
    assert issubclass(JobFailedError, RuntimeError) and JobFailedError("x").exit_code == 1
    from pipeline.train import ConfigError, NonFiniteLossError

    assert issubclass(ConfigError, PipelineError) and ConfigError.exit_code == 2
    assert issubclass(NonFiniteLossError, PipelineError) and NonFiniteLossError.exit_code == 1


def _pipeline_error_classes() -> list[str]:
    """Every exception class defined in pipeline/ (name, file)."""
    found = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                found.append((node.name, path))
    return found


def test_every_error_class_in_pipeline_is_a_pipeline_error():
    import importlib

    classes = _pipeline_error_classes()
    assert len(classes) >= 10
    for name, path in classes:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, PipelineError), f"{module}.{name} is not a PipelineError"


def test_cli_turns_a_pipeline_error_into_one_line_and_its_exit_code(tmp_path):
    from cli.main import app

    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "missing")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path / "missing") in lines[0]
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------------------------
# Grids


def test_image_grid_tiles_row_by_row_with_padding(tmp_path):
    images = np.stack([np.full((2, 3, 3), value, dtype=np.uint8) for value in (10, 20, 30)])
    grid = image_grid(images, columns=2, padding=1, pad_value=255)
    # make_grid: 2 columns x 2 rows of (2+1) x (3+1) cells plus a 1 px border -> 7 x 9
    assert grid.shape == (7, 9, 3) and grid.dtype == np.uint8
    assert (grid[1:3, 1:4] == 10).all() and (grid[1:3, 5:8] == 20).all() and (grid[4:6, 1:4] == 30).all()
    assert (grid[4:6, 5:8] == 255).all()  # the empty cell, like the padding, is pad_value
    assert (grid[0] == 255).all() and (grid[:, 4] == 255).all() and (grid[3] == 255).all()
    path = write_png(tmp_path / "grid.png", grid)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(path)), grid)


def test_image_grid_refuses_non_uint8_input():
    with pytest.raises(ValueError, match="uint8"):
        image_grid(np.zeros((1, 2, 2, 3), dtype=np.float32))


# ---------------------------------------------------------------------------------------------------------------
# Layering: diffit never imports pipeline, pipeline never imports cli, stages use each other's exports only

STAGES = ("encode", "train", "evaluate", "demo", "report", "study", "attention_maps")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement in a file, relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found.append((module, [alias.name for alias in node.names]))
    return found


def test_diffit_never_imports_pipeline_or_cli_and_pipeline_never_imports_cli():
    for path in (ROOT / "diffit").rglob("*.py"):
        for module, _ in _imports(path):
            assert module.split(".")[0] not in ("pipeline", "cli"), f"{path}: imports {module}"
    for path in (ROOT / "pipeline").rglob("*.py"):
        for module, _ in _imports(path):
            assert module.split(".")[0] != "cli", f"{path}: imports {module}"


def test_stages_use_only_what_other_stages_export():
    import importlib

    exports = {stage: set(getattr(importlib.import_module(f"pipeline.{stage}"), "__all__", [])) for stage in STAGES}
    for path in (ROOT / "pipeline").rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        own = parts[1] if len(parts) > 2 else None
        for module, names in _imports(path):
            pieces = module.split(".")
            if pieces[0] != "pipeline" or len(pieces) < 2 or pieces[1] not in STAGES or pieces[1] == own:
                continue
            assert len(pieces) == 2, f"{path}: imports the internals of another stage ({module})"
            assert set(names) <= exports[pieces[1]], f"{path}: {set(names) - exports[pieces[1]]} not exported"


def test_commands_call_only_what_the_stages_export():
    """cli/ parses and calls a stage's door: a command imports from `pipeline.STAGE` only names the stage exports
    (and shared infrastructure from `pipeline.core`), never a stage's modules."""
    import importlib

    exports = {stage: set(getattr(importlib.import_module(f"pipeline.{stage}"), "__all__", [])) for stage in STAGES}
    commands = sorted((ROOT / "cli").glob("*_cmd.py"))
    assert len(commands) >= 10
    for path in commands:
        for module, names in _imports(path):
            pieces = module.split(".")
            if pieces[0] != "pipeline" or (len(pieces) > 1 and pieces[1] == "core"):
                continue
            assert len(pieces) == 2 and pieces[1] in STAGES, f"{path}: imports {module}, not a stage's exports"
            assert set(names) <= exports[pieces[1]], f"{path}: {set(names) - exports[pieces[1]]} not exported"


DOORS = {
    "encode": ("run_encode", "EncodeOptions"),
    "train": ("run_train", "TrainOptions"),
    "evaluate": ("run_evaluate", "EvaluateOptions"),
    "report": ("run_report", "ReportOptions"),
    "demo": ("run_demo", "DemoOptions"),
    "study": ("run_study", "StudyOptions"),
    "attention_maps": ("run_attention_maps", "AttentionMapsOptions"),
}


def test_every_stage_exports_one_door_of_one_shape():
    """Each stage exports `run_<stage>(options)`, its first parameter typed by the options dataclass exported
    beside it, and the stage's command calls that door."""
    import dataclasses
    import importlib
    import inspect
    import typing

    assert set(DOORS) == set(STAGES)
    for stage, (door, options) in DOORS.items():
        package = importlib.import_module(f"pipeline.{stage}")
        assert door == f"run_{stage}" and {door, options} <= set(package.__all__), stage
        function, options_type = getattr(package, door), getattr(package, options)
        assert dataclasses.is_dataclass(options_type), options
        first = next(iter(inspect.signature(function).parameters))
        assert typing.get_type_hints(function)[first] is options_type, f"{door}({first}: ...)"
        commands = "".join(path.read_text() for path in (ROOT / "cli").glob(f"{stage}_cmd.py"))
        assert f"{door}(" in commands, f"cli/{stage}_cmd.py does not call {door}"


def test_a_library_that_writes_a_private_file_still_publishes_with_the_usual_mode(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "ema.safetensors"
    with atomic_path(path) as temp:
        save_file({"w": torch.zeros(2)}, str(temp))  # safetensors writes its own 0600 temp file and renames it
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_one_image_grid_has_the_same_border_as_a_larger_grid():
    image = np.full((1, 2, 2, 3), 7, dtype=np.uint8)
    grid = image_grid(image, padding=2, pad_value=255)
    assert grid.shape == (6, 6, 3) and (grid[2:4, 2:4] == 7).all() and grid.sum() == 255 * 3 * 32 + 7 * 3 * 4
