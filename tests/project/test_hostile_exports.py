"""Hostile inputs, third round: saved `DiffiTPipeline` folders get the export checks before anything is built,
`.npz` members are inflated in bounded pieces and zip bombs refused by their compression ratio, a pickle payload
renamed `.pt` is one error line, out-of-range seeds are refused at config load, and a stop signal while
`diffit-pipe train` is still importing exits 75 and resumes to the uninterrupted run.

Every hostile file is built here (a few KB or MB); the memory claims are measured in a fresh process against its
baseline after its imports (VmHWM reset per case through /proc/self/clear_refs, as tests/support/hostile_probe.py does).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from diffit.config_check import InvalidModelFileError
from tests.support.eval_fixtures import make_latent_model_dir, make_tiny_vae, smooth_images, write_npz_reference
from tests.support.train_fixtures import (
    REPO,
    read_metrics,
    subprocess_env,
    tiny_latent_config,
    train_command,
    write_config,
    write_latent_dataset,
)

PEAK_RATIO = 1.5

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------
# Peak memory of a few cases in one fresh process


PROBE = r"""
import json, os, re, resource, sys, traceback

def status_kib(key):
    with open("/proc/self/status") as handle:
        return int(re.search(rf"^{key}:\s+(\d+) kB", handle.read(), re.MULTILINE).group(1))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")

def run(case):
    kind, arg = case
    try:
        if kind == "pipeline":
            from diffit import DiffiTPipeline
            pipe = DiffiTPipeline.from_pretrained(arg)
            pipe.set_progress_bar_config(disable=True)
            pipe(class_labels=[1], num_inference_steps=2, output_type="np")
        elif kind == "reference":
            from pipeline.evaluate.reference.formats import open_reference, reference_dataset
            dataset = reference_dataset(open_reference(arg))
            first, last = dataset[0], dataset[len(dataset) - 1]
            return {"ok": True, "count": len(dataset), "last_sum": int(last.sum()), "first_sum": int(first.sum())}
        return {"ok": True}
    except Exception as error:
        return {"ok": False, "type": type(error).__name__, "message": str(error), "tb": traceback.format_exc()}

cases = json.loads(sys.argv[1])
import diffit, diffit.pipeline_diffit, pipeline.evaluate.reference.formats  # the imports are part of the baseline
results = [run(cases[0])]  # warm-up: what the first case imports lazily is part of the baseline too
baseline = status_kib("VmRSS")
resource.setrlimit(resource.RLIMIT_AS, (status_kib("VmSize") * 1024 + 4 * 2**30,) * 2)  # fail fast, never swap
for case in cases[1:]:
    reset_peak()
    outcome = run(case)
    results.append({**outcome, "baseline_kib": baseline, "peak_kib": status_kib("VmHWM")})
print(json.dumps(results))
"""


def probe(cases: list[tuple[str, str]], env: dict[str, str] | None = None) -> list[dict]:
    """Run `cases` (the first one a warm-up) in one fresh process; each outcome with its peak and the baseline."""
    environment = {**subprocess_env(), "HF_HUB_OFFLINE": "1", **(env or {})}
    environment.pop("DIFFIT_MAX_NPZ_BYTES", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([[kind, str(arg)] for kind, arg in cases])],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_within_memory(outcome: dict) -> None:
    assert outcome["peak_kib"] <= PEAK_RATIO * outcome["baseline_kib"], (
        f"peak {outcome['peak_kib'] / 1024:.0f} MiB over {PEAK_RATIO} x baseline {outcome['baseline_kib'] / 1024:.0f}"
    )


# ----------------------------------------------------------------------------------------------------------------
# 1. DiffiTPipeline folders get the export checks


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    """A tiny latent DiffiTPipeline saved with `save_pretrained` (transformer/, vae/, scheduler/, model_index)."""
    from diffit import DiffiTPipeline

    root = tmp_path_factory.mktemp("pipeline")
    vae = make_tiny_vae(root / "vae")
    model = make_latent_model_dir(root / "model", vae)
    DiffiTPipeline.from_pretrained(model).save_pretrained(root / "pipe")
    return root / "pipe"


def edited_copy(source: Path, target: Path, relative: str, change) -> Path:
    """A copy of the pipeline folder `source` with the JSON file `relative` changed by `change(dict)`."""
    shutil.copytree(source, target)
    path = target / relative
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))
    return target


def load_pipeline(folder: Path):
    from diffit import DiffiTPipeline

    return DiffiTPipeline.from_pretrained(folder)


def set_sampling(**values):
    return lambda index: index["sampling"].update(values)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (set_sampling(diffusion_steps=20_000_000), "sampling.diffusion_steps must be in [1, 100000], got 20000000"),
        (set_sampling(diffusion_steps=10**10), "sampling.diffusion_steps must be in [1, 100000], got 10000000000"),
        (set_sampling(steps=10**9), "sampling.steps must be in [1, 100000], got 1000000000"),
        (set_sampling(diffusion_steps="1000"), "sampling.diffusion_steps must be an integer, got '1000'"),
        (set_sampling(diffusion_steps=1000.0), "sampling.diffusion_steps must be an integer, got 1000.0"),
        (set_sampling(eta=float("nan")), "sampling.eta must be in [0.0, 10.0], got nan"),
        (set_sampling(guidance={"scale": "4"}), "sampling.guidance.scale must be a number, got '4'"),
        (set_sampling(guidance=[4.0]), "sampling.guidance must be an object, got list"),
        (set_sampling(S_max="lots"), "sampling.S_max must be a number, got 'lots'"),
        (set_sampling(stpes=10), "sampling has unknown keys ['stpes']"),
        (lambda index: index.update(sampling=[250]), "sampling must be an object, got list"),
        (lambda index: index.update(scaling_factor=-1), "scaling_factor must be a number in (0, 1e6], got -1"),
        (lambda index: index.update(vae="diffusers.AutoencoderKL"), "vae must be [library, class name] or null"),
        (lambda index: index.update(extra=1), "unknown entries ['extra']"),
        (lambda index: index.update(_class_name="DiTPipeline"), "describes a DiTPipeline, not a DiffiTPipeline"),
    ],
)
def test_model_index_is_checked_before_anything_is_built(saved_pipeline, tmp_path, change, problem):
    folder = edited_copy(saved_pipeline, tmp_path / "pipe", "model_index.json", change)
    with pytest.raises(InvalidModelFileError) as caught:
        load_pipeline(folder)
    assert str(caught.value) == f"{folder / 'model_index.json'}: {caught.value.problem}"
    assert problem in caught.value.problem


def test_model_index_that_is_not_json_or_too_large_is_one_error(saved_pipeline, tmp_path):
    folder = shutil.copytree(saved_pipeline, tmp_path / "pipe")
    index = folder / "model_index.json"
    index.write_bytes(b"\xff\xfe not text")
    with pytest.raises(InvalidModelFileError, match=r"model_index.json: not a text file"):
        load_pipeline(folder)
    with open(index, "wb") as handle:  # sparse: 17 MiB declared on disk, nothing read
        handle.truncate(17 * 2**20)
    with pytest.raises(InvalidModelFileError, match=r"model_index.json: 17,825,792 bytes, more than the"):
        load_pipeline(folder)


def test_scheduler_config_chain_length_is_bounded(saved_pipeline, tmp_path):
    def ddpm(index):
        index["scheduler"] = ["diffusers", "DDPMScheduler"]

    folder = edited_copy(saved_pipeline, tmp_path / "pipe", "model_index.json", ddpm)
    # A diffusers scheduler allocates its whole chain (betas, alphas, timesteps) when it is built (24 GB for 1e9
    # steps); just over the bound here, so that a loader without the check costs nothing in this test.
    config = {"_class_name": "DDPMScheduler", "num_train_timesteps": 100_001, "beta_schedule": "linear"}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(
        InvalidModelFileError, match=r"scheduler_config.json: num_train_timesteps must be in \[1, 100000\], got 100001"
    ):
        load_pipeline(folder)


def test_vae_without_matching_weights_is_refused_at_load_not_after_sampling(saved_pipeline, tmp_path):
    weights_name = "diffusion_pytorch_model.safetensors"
    # No weights at all: diffusers would build the VAE with meta tensors and fail only when decoding.
    missing = shutil.copytree(saved_pipeline, tmp_path / "missing")
    (missing / "vae" / weights_name).unlink()
    with pytest.raises(InvalidModelFileError, match=rf"vae/{weights_name}: no such file"):
        load_pipeline(missing)
    # Weights of another VAE: the config implies other tensors.
    other = shutil.copytree(saved_pipeline, tmp_path / "other")
    make_tiny_vae(tmp_path / "wide", latent_channels=8)
    shutil.copy(tmp_path / "wide" / weights_name, other / "vae" / weights_name)
    with pytest.raises(InvalidModelFileError, match=r"vae/diffusion_pytorch_model.safetensors: tensor '.*' has shape"):
        load_pipeline(other)
    # A config asking for a giant VAE (the bounds `encode` applies).
    giant = edited_copy(
        saved_pipeline, tmp_path / "giant", "vae/config.json", lambda c: c.update(layers_per_block=10**7)
    )
    with pytest.raises(InvalidModelFileError, match=r"vae/config.json: layers_per_block must be an integer in"):
        load_pipeline(giant)
    # Integer weights.
    from safetensors.torch import load_file, save_file

    ints = shutil.copytree(saved_pipeline, tmp_path / "ints")
    state = load_file(str(ints / "vae" / weights_name))
    save_file({k: v.to(torch.int8) for k, v in state.items()}, str(ints / "vae" / weights_name))
    with pytest.raises(InvalidModelFileError, match=r"has dtype I8; weights must be floating point"):
        load_pipeline(ints)


def test_an_exports_local_vae_folder_is_checked_too(saved_pipeline, tmp_path):
    """An export folder whose config.json names a local VAE (the `vae=PATH` route as well)."""
    model = saved_pipeline.parent / "model"
    vae = shutil.copytree(saved_pipeline.parent / "vae", tmp_path / "vae")
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InvalidModelFileError, match=r"diffusion_pytorch_model.safetensors: no such file"):
        from diffit import DiffiTPipeline

        DiffiTPipeline.from_pretrained(model, vae=str(vae))


def test_a_vae_with_diffusers_old_attention_names_still_loads(saved_pipeline, tmp_path):
    """The SD VAE's hub files use the attention names diffusers renames on load (query/key/value/proj_attn): the
    weights check accepts them, and the pipeline decodes with the same tensors."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(saved_pipeline, tmp_path / "pipe")
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    renamed = {}
    for key, value in load_file(str(weights)).items():
        for new_name, old_name in old_names.items():
            key = key.replace(new_name, old_name)
        renamed[key] = value
    assert any(".query." in key for key in renamed)
    save_file(renamed, str(weights))
    ours, theirs = load_pipeline(folder).vae.state_dict(), load_pipeline(saved_pipeline).vae.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_sampling_schema_is_the_sampling_config(saved_pipeline):
    """The schema's fields are `SamplingConfig`'s and `GuidanceConfig`'s, and what save_pretrained writes passes."""
    import dataclasses

    from diffit.guidance import GuidanceConfig
    from diffit.pipeline_check import GUIDANCE_FIELDS, PIPELINE_SAMPLING_FIELDS, check_pipeline_index
    from diffit.sampling_config import GUIDANCE_SETTINGS, SamplingConfig

    fields = {f.name for f in dataclasses.fields(SamplingConfig)}
    # guidance flat by its setting names, and the nested object of folders saved before
    assert set(PIPELINE_SAMPLING_FIELDS) == fields | set(GUIDANCE_SETTINGS)
    assert set(GUIDANCE_FIELDS) == {f.name for f in dataclasses.fields(GuidanceConfig)}
    check_pipeline_index(json.loads((saved_pipeline / "model_index.json").read_text()))
    edm = SamplingConfig(sampler="edm-heun", kind="edm", steps=18, S_churn=40, S_max=50, generator_device=None)
    check_pipeline_index({"_class_name": "DiffiTPipeline", "sampling": edm.to_dict()})
    assert load_pipeline(saved_pipeline).sampling_config.steps == 250


def test_hostile_pipeline_folders_cost_no_memory(saved_pipeline, tmp_path):
    """Measured: the 2e7-step chain (4.4 GB when sampled) and the weightless VAE are refused at load."""
    steps = edited_copy(
        saved_pipeline, tmp_path / "steps", "model_index.json", set_sampling(diffusion_steps=20_000_000)
    )
    weightless = shutil.copytree(saved_pipeline, tmp_path / "weightless")
    (weightless / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    warm_up, *results = probe([("pipeline", saved_pipeline), ("pipeline", steps), ("pipeline", weightless)])
    assert warm_up["ok"], warm_up
    for outcome, where in zip(results, ("model_index.json", "vae/diffusion_pytorch_model.safetensors"), strict=True):
        assert outcome["type"] == "InvalidModelFileError", outcome
        assert outcome["message"].startswith(f"{tmp_path}/") and where in outcome["message"]
        assert_within_memory(outcome)


# ----------------------------------------------------------------------------------------------------------------
# 2. npz members: zip bombs by their ratio, large compressed members inflated in chunks, Fortran order


def write_deflated(path: Path, name: str, shape: tuple[int, ...], chunk: bytes, level: int = 1) -> Path:
    """An `.npz` whose uint8 member `name` of `shape` repeats `chunk`, deflated (written piece by piece)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as archive:
        with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_2_0(member, {"descr": "|u1", "fortran_order": False, "shape": shape})
            total = int(np.prod(shape))
            for start in range(0, total, len(chunk)):
                member.write(chunk[: min(len(chunk), total - start)])
    return path


@pytest.fixture(scope="module")
def npz_files_on_disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("npz")
    # The file: 500,000 x 32 x 32 x 3 zeros (1.5 GB declared, under the default 2 GiB bound) in ~7 MB.
    bomb = write_deflated(root / "bomb.npz", "arr_0", (500_000, 32, 32, 3), bytes(32 * 2**20))
    # A real-looking large member: 600 MiB compressing ~8:1, under the ratio bound; read in chunks.
    piece = np.zeros(32 * 2**20, np.uint8)
    piece[::16] = np.random.default_rng(0).integers(0, 256, piece[::16].shape)
    large = write_deflated(root / "large.npz", "arr_0", (12_800, 128, 128, 3), piece.tobytes())
    small = write_npz_reference(root / "small.npz", smooth_images(4))
    return {"bomb": bomb, "large": large, "small": small, "piece": piece}


def test_a_zip_bomb_under_the_size_bound_is_refused_by_its_ratio_without_inflating(npz_files_on_disk, tmp_path):
    bomb = npz_files_on_disk["bomb"]
    assert bomb.stat().st_size < 8 * 2**20
    warm_up, outcome = probe([("reference", npz_files_on_disk["small"]), ("reference", bomb)])
    assert warm_up["ok"], warm_up
    assert outcome["type"] == "ReferenceInputError", outcome
    assert outcome["message"].startswith(f"{bomb}: arr_0 declares 1.43 GiB (shape (500000, 32, 32, 3) uint8) from ")
    assert "above the 100:1 that real data reaches (a zip bomb?)" in outcome["message"]
    assert_within_memory(outcome)
    # Through the CLI (`evaluate` and `reference` open references alike): one line, exit 2, nothing written.
    out = tmp_path / "out" / "ref.npz"
    result = CliRunner().invoke(app, ["reference", str(bomb), str(out), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {bomb}: arr_0 declares 1.43 GiB"), lines
    assert not (tmp_path / "out").exists()


def test_a_large_compressed_member_is_inflated_in_chunks_into_a_mapped_file(npz_files_on_disk):
    large = npz_files_on_disk["large"]
    assert 12_800 * 128 * 128 * 3 / large.stat().st_size < 100  # within the ratio bound: it must be read
    warm_up, outcome = probe([("reference", npz_files_on_disk["small"]), ("reference", large)])
    assert warm_up["ok"], warm_up
    assert outcome["ok"], outcome
    image_bytes = 128 * 128 * 3
    piece = npz_files_on_disk["piece"]
    expected_last = piece[(12_799 * image_bytes) % piece.size :][:image_bytes]
    assert outcome["count"] == 12_800 and outcome["last_sum"] == int(expected_last.sum())
    assert outcome["first_sum"] == int(piece[:image_bytes].sum())
    assert_within_memory(outcome)


@pytest.mark.parametrize("spill", [False, True])
@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_fortran_order_members_read_back_equal(tmp_path, monkeypatch, save, spill):
    from pipeline.evaluate import npz_files

    if spill:
        monkeypatch.setattr(npz_files, "SPILL_BYTES", 0)
    a = np.arange(3 * 5 * 7 * 2, dtype=np.float32).reshape(3, 5, 7, 2)
    save(tmp_path / "f.npz", x=np.asfortranarray(a), y=a)
    for name in ("x", "y"):
        member = npz_files.read_member_header(tmp_path / "f.npz", name)
        assert member.fortran_order == (name == "x")
        np.testing.assert_array_equal(npz_files.load_member(tmp_path / "f.npz", name, member), a)


def test_a_damaged_spilled_member_is_one_error(tmp_path, monkeypatch):
    from pipeline.evaluate import npz_files
    from pipeline.evaluate.datasets import ReferenceInputError

    monkeypatch.setattr(npz_files, "SPILL_BYTES", 0)
    path = tmp_path / "d.npz"
    np.savez_compressed(path, arr_0=np.random.default_rng(0).integers(0, 255, (64, 64, 64, 3), dtype=np.uint8))
    info = zipfile.ZipFile(path).getinfo("arr_0.npy")
    data = bytearray(path.read_bytes())
    local = data[info.header_offset : info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    data[start + info.compress_size - 40] ^= 0xFF  # inside the deflated image data, after the .npy header
    path.write_bytes(bytes(data))
    with pytest.raises(ReferenceInputError, match=r"d.npz: cannot read arr_0"):
        npz_files.load_member(path, "arr_0")


# ----------------------------------------------------------------------------------------------------------------
# 3. A pickle payload renamed .pt


class Payload:
    """Unpickling this runs `open(marker, 'w')`: what a hostile .pt does with torch.load(weights_only=False)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["raw_pickle", "torch_save_with_a_callable"])
def test_a_pickle_payload_renamed_pt_is_one_error_line(tmp_path, kind):
    import pickle

    marker = tmp_path / "payload-ran"
    weights = tmp_path / "inception.pt"
    if kind == "raw_pickle":
        weights.write_bytes(pickle.dumps({"conv.weight": Payload(marker)}, protocol=4))
    else:
        torch.save({"conv.weight": torch.zeros(2), "hook": Payload(marker)}, weights)
    marker.unlink(missing_ok=True)
    source = write_npz_reference(tmp_path / "source.npz", smooth_images(4))
    out = tmp_path / "out" / "ref.npz"
    result = CliRunner().invoke(
        app, ["reference", str(source), str(out), "--device", "cpu", "--inception-weights", str(weights)]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, lines  # no torch multi-line message, no pickle-protocol warning
    assert lines[0].startswith(f"error: {weights}: not a plain tensor state dict: a weights-only load refuses it (")
    assert "a file that needs pickle (Python objects, a pickle payload) is never loaded here" in lines[0]
    assert not marker.exists() and not out.exists()


def test_a_pickle_payload_as_a_checkpoints_rng_state_is_one_line(tmp_path):
    """A checkpoint's per-rank RNG file (`random_states_0.pkl`, read with weights_only as accelerate reads it)."""
    import pickle

    from pipeline.train.checkpoint import CheckpointError, read_rng_state

    marker = tmp_path / "payload-ran"
    rng_file = tmp_path / "random_states_0.pkl"
    rng_file.write_bytes(pickle.dumps({"torch_manual_seed": Payload(marker)}, protocol=4))
    with pytest.raises(CheckpointError) as caught:
        read_rng_state(rng_file)
    message = str(caught.value)
    assert "\n" not in message and not marker.exists()
    assert message.startswith(
        f"{rng_file}: cannot read the RNG state: not a plain tensor state dict: a weights-only load refuses"
    )


# ----------------------------------------------------------------------------------------------------------------
# 4. Seeds at config load


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = write_latent_dataset(root / "data", num_samples=8, num_shards=2, num_classes=10, std=0.1)
    config = write_config(
        root / "c.yaml", tiny_latent_config(train={"max_steps": 2}, checkpoint={"every": 100, "keep": 1})
    )
    return {"data": data, "config": config, "root": root}


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("train.seed=-1", "train.seed must be an integer in [0, 4294967295] (2**32 - 1), got -1"),
        ("train.seed=1e23", "train.seed: expected an integer, got str '1e23'"),
        ("train.seed=1.0e+23", "train.seed: expected an integer, got float 1e+23"),
        (
            "train.seed=100000000000000000000000",
            "train.seed must be an integer in [0, 4294967295] (2**32 - 1), got 1" + "0" * 23,
        ),
        ("train.seed=4294967296", "train.seed must be an integer in [0, 4294967295] (2**32 - 1), got 4294967296"),
        ("sample.seed=-1", "sample.seed must be an integer in [0, 4294967295] (2**32 - 1), got -1"),
        ("eval.seed=-1", "eval.seed must be an integer in [0, 4294967295] (2**32 - 1), got -1"),
    ],
)
def test_out_of_range_seeds_are_one_line_at_config_load(train_inputs, tmp_path, override, problem):
    run_dir = tmp_path / "run"
    config = train_inputs["config"]
    args = ["train", "--config", str(config), "--data", str(train_inputs["data"]), "--run-dir", str(run_dir)]
    result = CliRunner().invoke(app, [*args, "--set", override])
    assert result.exit_code == 2, result.output
    assert [line for line in result.output.splitlines() if line.strip()] == [f"error: {config}: {problem}"]
    assert not run_dir.exists()  # refused before the run directory is created or locked


def test_the_largest_seed_is_accepted():
    from pipeline.train.config import MAX_SEED, config_from_dict

    assert MAX_SEED == 2**32 - 1
    config = config_from_dict({"train": {"seed": MAX_SEED}, "sample": {"seed": 0}, "eval": {"seed": MAX_SEED}})
    assert config.train.seed == MAX_SEED


# ----------------------------------------------------------------------------------------------------------------
# 5. Stop signals while `diffit-pipe train` starts


def catches(pid: int, number: int) -> bool:
    """Whether process `pid` has a handler for signal `number` (SigCgt of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            mask = next(line for line in handle if line.startswith("SigCgt:")).split()[1]
    except (FileNotFoundError, StopIteration, ProcessLookupError):
        return False
    return bool(int(mask, 16) >> (number - 1) & 1)


def has_torch_loaded(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


def signal_at(command: list[str], delay: float, number: int) -> dict:
    """Start `command`, send `number` `delay` s after the start (not before its handler exists: the interpreter's
    own ~25 ms start-up precedes any Python code); wait for it. Returns what happened."""
    began = time.monotonic()
    process = subprocess.Popen(
        command, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    while not catches(process.pid, number) and process.poll() is None and time.monotonic() - began < 2:
        time.sleep(0.001)
    installed, torch_then = time.monotonic() - began, has_torch_loaded(process.pid)
    time.sleep(max(0.0, began + delay - time.monotonic()))
    sent, torch_loaded = time.monotonic() - began, has_torch_loaded(process.pid)
    os.kill(process.pid, number)
    return {"process": process, "installed": installed, "torch_at_install": torch_then, "sent": sent,
            "torch_loaded_when_sent": torch_loaded}  # fmt: skip


def finish(started: dict, timeout: float = 180) -> dict:
    process = started["process"]
    try:
        _, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return {**started, "returncode": process.returncode, "stderr": stderr}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow  # nine trainer processes (four at a time): ~30 s alone on 2 cores
def test_a_stop_signal_while_train_imports_exits_75_and_the_run_resumes_to_the_uninterrupted_one(train_inputs):
    root, config, data = train_inputs["root"] / "signals", train_inputs["config"], train_inputs["data"]
    reference_dir = root / "reference"
    moments = [(0.05, signal.SIGTERM), (0.3, signal.SIGUSR1), (0.8, signal.SIGTERM)]
    # All at once (each run has its own directory): the reference run and the three signalled starts.
    reference = subprocess.Popen(
        train_command(config, data, reference_dir), cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE, text=True
    )
    started = [signal_at(train_command(config, data, root / f"run-{i}"), *moment) for i, moment in enumerate(moments)]
    stopped = [finish(run) for run in started]
    _, reference_err = reference.communicate(timeout=180)
    assert reference.returncode == 0, reference_err[-3000:]
    for (_, number), run in zip(moments, stopped, strict=True):
        why = {k: v for k, v in run.items() if k != "process"}
        assert run["returncode"] == 75, why  # without the early handler: -15 / -10, killed by the signal
        assert f"stopped by {signal.Signals(number).name} during set-up, before the first step" in run["stderr"], why
        assert run["installed"] < 1.0 and not run["torch_at_install"], why  # the handler comes before the imports
    assert not stopped[0]["torch_loaded_when_sent"]  # the first signal landed before torch was even loaded
    # Each resumes (the same command with --resume auto) to the run that was never interrupted; a signal to a run
    # that is already complete, while it starts, exits 0 and changes nothing.
    resumed = [
        subprocess.Popen(
            train_command(config, data, root / f"run-{i}", "--resume", "auto"),
            cwd=REPO,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(len(moments))
    ]
    complete = finish(signal_at(train_command(config, data, reference_dir, "--resume", "auto"), 0.05, signal.SIGTERM))
    assert complete["returncode"] == 0, complete["stderr"][-3000:]
    final = "checkpoints/step-0000002"
    expected = {name: read_weights(reference_dir / final / name) for name in ("model.safetensors", "ema.safetensors")}
    for i, process in enumerate(resumed):
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr[-3000:]
        run_dir = root / f"run-{i}"
        assert [r["loss"] for r in read_metrics(run_dir)] == [r["loss"] for r in read_metrics(reference_dir)]
        for name, tensors in expected.items():
            ours = read_weights(run_dir / final / name)
            assert ours.keys() == tensors.keys() and all(torch.equal(ours[k], tensors[k]) for k in tensors)
    assert len(read_metrics(reference_dir)) == 2  # the signalled restart of the complete run trained nothing
