"""Hostile and damaged model files: refused before anything is allocated, as one `<file>: <problem>` line.

Each hostile file is built here (they are a few KB). The memory claims are measured, not assumed: every case
runs in one fresh process (`tests/support/hostile_probe.py`) that resets its peak-RSS counter before each case and
reports the peak beside the process's baseline after its imports; a control case shows that the meter sees a
real model being built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import diffit
from diffit.conditionings import LATENT_TIME_CONDITIONINGS
from diffit.config_check import (
    DEFAULT_MAX_PARAMETERS,
    MAX_PARAMETERS_ENV,
    TIME_CONDITIONINGS,
    InvalidModelFileError,
    check_model_config,
    implied_size,
)
from diffit.convert import to_nvlabs_state_dict
from diffit.models import MODEL_CONFIGS, count_parameters, create_model
from diffit.safetensors_check import check_safetensors_header

ROOT = Path(__file__).resolve().parents[2]
PEAK_RATIO = 1.5

# ----------------------------------------------------------------------------------------------------------------
# The parameter count a config implies, computed without building the model


VARIANTS = [(name, {}) for name in MODEL_CONFIGS] + [
    ("DiffiT-Tiny/2", {"time_embedding": "fourier", "num_classes": 0, "learn_sigma": False, "mlp_ratio": 2.5}),
    ("DiffiT-B/4", {"input_size": 64, "num_classes": 10}),
    ("DiffiT-UNet-Tiny", {"time_embedding": "fourier", "num_classes": 7, "time_dim": 48, "mlp_ratio": 3.0}),
    ("DiffiT-CIFAR10", {"blocks_per_stage": [4, 4, 4], "window_size": 8, "num_groups": 8}),
    ("DiffiT-UNet-Tiny", {"channels": [32, 64, 64], "blocks_per_stage": [0, 2, 1], "in_channels": 1}),
    # The time-conditioning variants (diffit.layers.DiffiTTransformerBlock), with the time-token width and window.
    *[("DiffiT-Tiny/2", {"time_conditioning": c, "time_dim": 48, "num_classes": 3}) for c in LATENT_TIME_CONDITIONINGS],
    *[("DiffiT-XL/2", {"time_conditioning": c}) for c in LATENT_TIME_CONDITIONINGS],
    *[("DiffiT-UNet-Tiny", {"time_conditioning": c, "time_dim": 40, "window_size": 2}) for c in TIME_CONDITIONINGS],
    ("DiffiT-FFHQ64", {"time_conditioning": "adaln", "window_size": 4, "time_embedding": "fourier"}),
]


@pytest.mark.parametrize(("name", "overrides"), VARIANTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(VARIANTS)])
def test_implied_size_is_exactly_what_the_model_holds(name, overrides):
    with torch.device("meta"):
        model = create_model(name, **overrides)
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    assert implied_size(name, overrides) == (count_parameters(model), buffer_bytes)


def test_implied_size_of_published_models_by_hand():
    # Table 9's 561M for XL/2; its 28 index buffers are [256, 256] int64 (28 * 65536 * 8 bytes).
    assert implied_size("DiffiT-XL/2") == (561_330_144, 14_680_064)
    # Hidden 8192, depth 28, 256 tokens, 16 heads, 1000 classes, learned sigma, by the formula written out:
    # patch embed, position embed, time MLP, label table, blocks (spatial + time qkv, bias, proj, MLP), final.
    h = 8192
    blocks = 28 * (2 * (3 * h * h + 3 * h) + 31**2 * 16 + h * h + h + 4 * h * h + 4 * h + 4 * h * h + h)
    expected = h * 4 * 4 + h + 256 * h + 256 * h + h + h * h + h + 1001 * h + blocks + h * 32 + 32
    assert expected == 28_268_827_104
    assert implied_size("DiffiT-XL/2", {"hidden_size": h})[0] == expected


# ----------------------------------------------------------------------------------------------------------------
# config.json: schema and bound (in process; the memory of each is measured below)


def latent_config(**kwargs):
    return {"model": {"name": "DiffiT-Tiny/2", "kwargs": kwargs}, "diffusion": {"type": "adm"}}


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ([1, 2], "expected a JSON object at the top level, got list"),
        ({"model": {"name": "DiffiT-Tiny/2", "kwargs": "depth=2"}}, "model.kwargs must be an object, got str"),
        (latent_config(hidden_sise=64), "model.kwargs has unknown keys ['hidden_sise']"),
        (latent_config(depth=True), "model.kwargs.depth must be an integer, got True"),
        (latent_config(depth=2.0), "model.kwargs.depth must be an integer, got 2.0"),
        (latent_config(mlp_ratio=float("nan")), "model.kwargs.mlp_ratio must be in [0.01, 64.0], got nan"),
        (latent_config(depth=10**7), "model.kwargs.depth must be in [1, 1000], got 10000000"),
        (latent_config(input_size=4096), "input_size 4096 / patch_size 2 gives 4194304 tokens in one attention"),
        (latent_config(hidden_size=66, num_heads=4), "hidden_size 66 is not divisible by num_heads 4"),
        ({"model": {"name": "DiT-XL/2"}}, "model.name 'DiT-XL/2' is not a known model"),
        ({"model": {"name": "DiffiT-Tiny/2", "weights": "x"}}, "model has unknown keys ['weights']"),
        ({**latent_config(), "vae": "sd"}, "vae must be an object, got str"),
        ({**latent_config(), "diffusion": {"type": "adm", "diffusion_steps": 10**10}}, "diffusion_steps must be in"),
        ({**latent_config(), "diffusion": {"type": "adm", "steps": 10}}, "diffusion has unknown keys ['steps']"),
        ({**latent_config(), "diffusion": {"type": "ddim"}}, "diffusion.type must be one of ['adm', 'edm', 'flow']"),
        ({"model": {"name": "DiffiT-UNet-Tiny", "kwargs": {"channels": [32]}}}, "channels [32] and blocks_per_stage"),
        ({**latent_config(), "sampling": {"steps": 10**10}}, "sampling.steps must be in [1, 100000], got 10000000000"),
        ({**latent_config(), "sampling": {"steps": "250"}}, "sampling.steps must be an integer, got '250'"),
        ({**latent_config(), "sampling": {"guidance_channels": 0}}, "sampling.guidance_channels must be in [1, 1024]"),
        ({**latent_config(), "sampling": {"cfg": 4}}, "sampling has unknown keys ['cfg']"),
    ],
)
def test_config_schema_refusals(config, problem):
    with pytest.raises(InvalidModelFileError) as caught:
        check_model_config(config, "m/config.json")
    assert str(caught.value).startswith("m/config.json: ") and problem in str(caught.value)
    assert caught.value.path == "m/config.json"


def test_config_schema_accepts_what_the_writers_write():
    """import-nvlabs' sampling entry (guidance on 3 channels, notes) and the other accepted spellings; the
    schema's samplers and schedules are the library's."""
    from diffit.config_check import SAMPLING_FIELDS
    from diffit.guidance import SCHEDULES
    from diffit.sampling_config import SAMPLERS
    from pipeline.train.released import released_sampling

    assert SAMPLING_FIELDS["sampler"][1:] == SAMPLERS and SAMPLING_FIELDS["guidance_schedule"][1:] == SCHEDULES
    for channels in (3, "all", None):
        sampling = {**released_sampling(64), "guidance_channels": channels, "eta": 0}
        resolved = check_model_config({**latent_config(mlp_ratio=4), "sampling": sampling, "mine": [1]})
        assert resolved == {**MODEL_CONFIGS["DiffiT-Tiny/2"]["kwargs"], "mlp_ratio": 4}


def test_parameter_bound_and_how_to_raise_it(monkeypatch):
    giant = {"model": {"name": "DiffiT-XL/2", "kwargs": {"hidden_size": 8192}}}
    with pytest.raises(InvalidModelFileError, match="implies 28,268,827,104 parameters and 105.3 GiB"):
        check_model_config(giant)
    assert DEFAULT_MAX_PARAMETERS == 4_000_000_000
    # Its buffers (14,680,064 bytes of index) count as 3,670,016 fp32 parameters in the memory bound.
    check_model_config(giant, max_parameters=28_268_827_104 + 3_670_016)
    with pytest.raises(InvalidModelFileError, match="over the bound of 28,272,497,119 parameters"):
        check_model_config(giant, max_parameters=28_268_827_104 + 3_670_015)
    tiny = latent_config()  # 150,116 parameters + 4,096 buffer bytes (1,024 parameter-equivalents)
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "151140")
    check_model_config(tiny)
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "151139")
    with pytest.raises(InvalidModelFileError, match="over the bound of 151,139 parameters"):
        check_model_config(tiny)
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "3e10")
    check_model_config(giant)
    monkeypatch.setenv(MAX_PARAMETERS_ENV, "lots")
    with pytest.raises(ValueError, match="DIFFIT_MAX_PARAMETERS='lots'"):
        check_model_config(tiny)


def test_load_pretrained_takes_the_bound_as_an_argument(tmp_path):
    diffit.save_pretrained(create_model("DiffiT-Tiny/2"), tmp_path)
    with pytest.raises(InvalidModelFileError, match="over the bound of 150,000 parameters"):
        diffit.load_pretrained(tmp_path, max_parameters=150_000)
    model, _ = diffit.load_pretrained(tmp_path, max_parameters=151_140)
    assert count_parameters(model) == 150_116


# ----------------------------------------------------------------------------------------------------------------
# safetensors headers, read by hand


def raw_safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "problem"),
    [
        (
            {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
            b"\0" * 4,
            "needs 8 bytes, data_offsets hold 4",
        ),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "outside the 4 data bytes"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "4 bytes after the last tensor"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            b"\0" * 8,
            "tensor 'b': data overlaps another tensor",
        ),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "is not a list of non-negative"),
        ({"w": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unknown dtype 'X9'"),
        ({"w": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "tensor 'w' has dtype I8; weights must"),
        ({"w": [1, 2]}, b"", "header entry must hold dtype, shape and data_offsets"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__ must map names to strings"),
    ],
)
def test_safetensors_header_refusals(tmp_path, header, data, problem):
    path = raw_safetensors(tmp_path / "m.safetensors", header, data)
    with pytest.raises(InvalidModelFileError, match=f"^{path}: ") as caught:
        check_safetensors_header(path)
    assert problem in str(caught.value)


def test_safetensors_header_against_the_expected_shapes(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}, str(path))
    header = check_safetensors_header(path, {"a": (2, 3), "b": (4,)})
    assert {name: (info["dtype"], info["shape"]) for name, info in header.items()} == {
        "a": ("F32", [2, 3]),
        "b": ("BF16", [4]),
    }
    with pytest.raises(InvalidModelFileError, match=r"tensor 'a' has shape \[2, 3\], the config implies \[3, 2\]"):
        check_safetensors_header(path, {"a": (3, 2), "b": (4,)})
    with pytest.raises(InvalidModelFileError, match=r"lacks 1 tensors the config needs, e.g. \['c'\]"):
        check_safetensors_header(path, {"a": (2, 3), "b": (4,), "c": (1,)})
    with pytest.raises(InvalidModelFileError, match=r"holds 1 tensors the config has no place for, e.g. \['b'\]"):
        check_safetensors_header(path, {"a": (2, 3)})


# ----------------------------------------------------------------------------------------------------------------
# The hostile files, each through the real entry point in a fresh process that measures its peak memory


def released_tiny(dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The released layout of DiffiT-Tiny/2; floating tensors cast to `dtype` when given."""
    torch.manual_seed(0)
    state = to_nvlabs_state_dict(create_model("DiffiT-Tiny/2"))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return {k: v.contiguous() for k, v in state.items()}


def zero_elements(layout: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`layout` with every tensor emptied (one dimension set to 0), keeping the dimensions the architecture is
    read from: a file of a few KB that claims the architecture of `layout`."""
    state = {}
    for key, value in layout.items():
        shape = list(value.shape)
        shape[0 if key.endswith("relative_position_bias_table") else -1] = 0  # heads are read from dim 1
        state[key] = torch.zeros(shape, dtype=value.dtype)
    return state


def zero_element_release(**architecture) -> dict[str, torch.Tensor]:
    """A zero-element released-layout file claiming DiffiT-XL/2 with `architecture` (built on the meta device)."""
    with torch.device("meta"):
        layout = to_nvlabs_state_dict(create_model("DiffiT-XL/2", **architecture))
    return zero_elements(layout)


def write_hostile_weights(directory: Path) -> dict[str, Path]:
    """The hostile weights files, by case name."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}

    def save(name, state):
        files[name] = directory / f"{name}.safetensors"
        save_file(state, str(files[name]))

    save("zero_element_hidden_8192_depth_28", zero_element_release(hidden_size=8192))
    depth_1e7 = {**released_tiny(), "blocks.9999999.attn.qkv.weight": torch.zeros(192, 64)}
    save("zero_element_depth_1e7", zero_elements(depth_1e7))
    save("int8_weights", released_tiny(torch.int8))
    save("bool_weights", released_tiny(torch.bool))
    save("int64_weights", released_tiny(torch.int64))
    save("valid", released_tiny())
    files["empty"] = directory / "empty.safetensors"
    files["empty"].write_bytes(b"")
    files["truncated"] = directory / "truncated.safetensors"
    files["truncated"].write_bytes(files["valid"].read_bytes()[:-1000])
    files["garbage"] = directory / "garbage.safetensors"
    files["garbage"].write_bytes(bytes((i * 97 + 13) % 256 for i in range(1024)))
    files["garbled_header"] = raw_safetensors(directory / "garbled_header.safetensors", {}, b"")
    files["garbled_header"].write_bytes((16).to_bytes(8, "little") + b"{not json at all")
    files["renamed_pt"] = directory / "renamed_pt.safetensors"
    torch.save(released_tiny(), files["renamed_pt"])
    return files


# (case, what the one line says after "<file>: "), for `diffit-pipe import-nvlabs FILE OUT`.
IMPORT_CASES = {
    "zero_element_hidden_8192_depth_28": "the architecture read off the tensor shapes is refused: model DiffiT-XL/2 "
    "with these kwargs implies 28,268,827,104 parameters",
    "zero_element_depth_1e7": "the architecture read off the tensor shapes is refused: model.kwargs.depth must be "
    "in [1, 1000], got 10000000",
    "empty": "empty file, not safetensors",
    "truncated": "data_offsets",
    "garbage": "over the limit of 8,388,608 bytes (not safetensors?)",
    "garbled_header": "garbled header (not the JSON of a safetensors file)",
    "renamed_pt": "a zip archive (a torch.save .pt file?), not safetensors",
    "int8_weights": "tensor 'blocks.0.attn.proj.bias' has dtype I8; weights must be floating point",
    "bool_weights": "tensor 'blocks.0.attn.proj.bias' has dtype BOOL; weights must be floating point",
    "int64_weights": "tensor 'blocks.0.attn.proj.bias' has dtype I64; weights must be floating point",
}

# (case, config.json or None for the weights' cases, which file the line names, what it says) for
# `diffit.load_pretrained(DIR)`. The weights' cases carry a DiffiT-L/2 config (380M parameters, 1.5 GB): a loader
# that built the model before reading the weights' header would show it in the peak.
LARGE = {"model": {"name": "DiffiT-L/2", "kwargs": {}}, "diffusion": {"type": "adm"}}
LIBRARY_CASES = {
    "config_hidden_8192": (
        {"model": {"name": "DiffiT-XL/2", "kwargs": {"hidden_size": 8192}}},
        "config.json",
        "implies 28,268,827,104 parameters and 105.3 GiB",
    ),
    "config_depth_1e7": (latent_config(depth=10**7), "config.json", "model.kwargs.depth must be in [1, 1000]"),
    "config_input_4096": (latent_config(input_size=4096), "config.json", "gives 4194304 tokens"),
    "config_diffusion_steps_1e10": (
        {**latent_config(), "diffusion": {"type": "adm", "diffusion_steps": 10**10}},
        "config.json",
        "diffusion.diffusion_steps must be in [1, 100000], got 10000000000",
    ),
    "config_unknown_key": (latent_config(hidden_sise=64), "config.json", "model.kwargs has unknown keys"),
    "config_kwargs_string": (
        {"model": {"name": "DiffiT-Tiny/2", "kwargs": "depth=2"}},
        "config.json",
        "model.kwargs must be an object, got str",
    ),
    "config_top_level_list": ([{"model": "DiffiT-Tiny/2"}], "config.json", "expected a JSON object at the top level"),
    "weights_empty": (LARGE, "model.safetensors", "empty file, not safetensors"),
    "weights_truncated": (LARGE, "model.safetensors", "data_offsets"),
    "weights_garbage": (LARGE, "model.safetensors", "over the limit of 8,388,608 bytes"),
    "weights_renamed_pt": (LARGE, "model.safetensors", "a zip archive"),
    "weights_wrong_model": (LARGE, "model.safetensors", "lacks 242 tensors the config needs"),
    "weights_int8": (latent_config(), "model.safetensors", "tensor 'blocks.0.attn.proj.bias' has dtype I8"),
}


def write_library_cases(directory: Path) -> dict[str, Path]:
    """One exported-model directory per library case."""
    torch.manual_seed(0)
    tiny = create_model("DiffiT-Tiny/2")
    weights = {
        "weights_empty": b"",
        "weights_garbage": bytes((i * 97 + 13) % 256 for i in range(1024)),
    }
    dirs = {}
    for case, (config, _, _) in LIBRARY_CASES.items():
        out = directory / case
        diffit.save_pretrained(tiny, out)
        (out / "config.json").write_text(json.dumps(config))
        model_file = out / "model.safetensors"
        if case in weights:
            model_file.write_bytes(weights[case])
        elif case == "weights_truncated":
            model_file.write_bytes(model_file.read_bytes()[:-1000])
        elif case == "weights_renamed_pt":
            torch.save(tiny.state_dict(), model_file)
        elif case == "weights_int8":
            save_file({k: v.to(torch.int8).contiguous() for k, v in tiny.state_dict().items()}, str(model_file))
        dirs[case] = out
    return dirs


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """Every case in one fresh process; {case: outcome}, plus the file paths."""
    root = tmp_path_factory.mktemp("hostile")
    files = write_hostile_weights(root / "weights")
    dirs = write_library_cases(root / "models")
    cases = [{"id": "warm_up", "kind": "cli", "args": ["import-nvlabs", str(files["valid"]), str(root / "ok")]}]
    cases += [
        {"id": case, "kind": "cli", "args": ["import-nvlabs", str(files[case]), str(root / "out" / case)]}
        for case in IMPORT_CASES
    ]
    cases += [{"id": case, "kind": "library", "args": [str(dirs[case])]} for case in LIBRARY_CASES]
    cases += [{"id": "control", "kind": "allocate", "args": ["DiffiT-L/2"]}]
    (root / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop(MAX_PARAMETERS_ENV, None)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "support" / "hostile_probe.py"),
            str(root / "cases.json"),
            str(root / "out.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {"results": json.loads((root / "out.json").read_text()), "files": files, "dirs": dirs, "root": root}


def assert_within_memory(outcome: dict) -> None:
    assert outcome["peak_kib"] <= PEAK_RATIO * outcome["baseline_kib"], (
        f"peak {outcome['peak_kib'] / 1024:.0f} MiB over {PEAK_RATIO} x baseline {outcome['baseline_kib'] / 1024:.0f}"
    )


def test_probe_measures_a_real_allocation_and_imports_a_valid_file(probe):
    """The controls: the valid file imports (exit 0), and building DiffiT-L/2 (1.5 GB) breaks the bound."""
    results = probe["results"]
    assert results["warm_up"]["exit_code"] == 0, results["warm_up"]["stderr"]
    assert (probe["root"] / "ok" / "model.safetensors").is_file()
    control = results["control"]
    assert control["exit_code"] == 0
    assert control["peak_kib"] > PEAK_RATIO * control["baseline_kib"]


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_nvlabs_refuses_hostile_file_in_one_line(probe, case):
    outcome = probe["results"][case]
    assert outcome.get("exit_code") == 2, outcome
    lines = outcome["stderr"].splitlines()
    assert len(lines) == 1, outcome["stderr"]
    assert lines[0].startswith(f"error: {probe['files'][case]}: ")
    assert IMPORT_CASES[case] in lines[0]
    assert not (probe["root"] / "out").exists()  # no case wrote anything: not OUT, not a staging directory
    assert_within_memory(outcome)


@pytest.mark.parametrize("case", list(LIBRARY_CASES))
def test_load_pretrained_refuses_hostile_file(probe, case):
    outcome = probe["results"][case]
    _, file_name, problem = LIBRARY_CASES[case]
    assert outcome.get("exception") == "InvalidModelFileError", outcome
    assert outcome["message"].startswith(f"{probe['dirs'][case] / file_name}: ")
    assert problem in outcome["message"] and "\n" not in outcome["message"]
    assert_within_memory(outcome)


@pytest.mark.parametrize("case", ["config_depth_1e7", "config_diffusion_steps_1e10", "weights_renamed_pt"])
def test_evaluate_and_sample_refuse_a_hostile_model_in_one_line(tmp_path, case):
    """The same files through `evaluate` (no metrics: no Inception weights needed) and `sample`: exit 2, one
    `error:` line naming the directory and the file, nothing written."""
    from typer.testing import CliRunner

    from cli.main import app

    model = write_library_cases(tmp_path / "models")[case]
    runs = {
        "evaluate": ["evaluate", "--model", str(model), "--out", str(tmp_path / "eval"), "--num-samples", "2",
                     "--metrics", "", "--device", "cpu"],
        "sample": ["sample", "--model", str(model), "--grid", str(tmp_path / "grid.png"), "--device", "cpu"],
    }  # fmt: skip
    for command, arguments in runs.items():
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 2, (command, result.output)
        lines = [line for line in result.output.splitlines() if line.strip() and "WARNING" not in line]
        assert len(lines) == 1 and lines[0].startswith(f"error: {model}"), (command, lines)
        assert LIBRARY_CASES[case][1] in lines[0] and LIBRARY_CASES[case][2] in lines[0], lines[0]
    assert not (tmp_path / "eval").exists() and not (tmp_path / "grid.png").exists()
