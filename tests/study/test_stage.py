"""`diffit-pipe study`: the interval arithmetic, the study-file schema, a tiny study end to end (killed and
resumed to the same study.json), its page in headless Chromium, the SLURM scripts, the shipped studies."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from pipeline.study import StudyError, check_model_kwargs, interval, load_study, paired_difference
from tests.support.train_fixtures import (
    PYTHON,
    REPO,
    subprocess_env,
    tiny_image_config,
    write_config,
    write_image_dataset,
)

pytestmark = pytest.mark.usefixtures("one_thread")
T_975_2 = 4.302652729749464  # Student-t quantile 0.975 with 2 degrees of freedom (tables: 4.302653)


# ---------------------------------------------------------------------------------------------------------------
# Arithmetic (hand-computed cases)


def test_interval_of_one_two_three_is_the_mean_two_and_t_times_s_over_root_three():
    result = interval([1.0, 2.0, 3.0])
    assert result["mean"] == 2.0 and result["std"] == 1.0 and result["n"] == 3
    assert result["half_width"] == pytest.approx(T_975_2 / math.sqrt(3), rel=1e-12)
    assert result["half_width"] == pytest.approx(2.484137711750330, rel=1e-12)
    assert (result["low"], result["high"]) == (2.0 - result["half_width"], 2.0 + result["half_width"])


def test_interval_of_two_values_uses_t_12_706():
    # mean 5, s = sqrt(2), half = 12.706204736 * sqrt(2) / sqrt(2) = 12.706204736
    result = interval([4.0, 6.0])
    assert result["mean"] == 5.0
    assert result["half_width"] == pytest.approx(12.706204736174698, rel=1e-12)


def test_one_value_has_a_mean_and_no_interval():
    assert interval([7.5]) == {"n": 1, "mean": 7.5, "std": None, "half_width": None, "low": None, "high": None}


def test_paired_difference_uses_the_common_seeds_only():
    # differences over seeds 0, 1, 2: 0.5, 1.0, 0.0 -> mean 0.5, s = 0.5, half = 4.302653 * 0.5 / sqrt(3)
    variant = {0: 1.0, 1: 3.0, 2: 4.0, 3: 100.0}
    baseline = {0: 0.5, 1: 2.0, 2: 4.0}
    result = paired_difference(variant, baseline)
    assert result["seeds"] == [0, 1, 2] and result["n"] == 3
    assert result["mean"] == 0.5 and result["std"] == 0.5
    assert result["half_width"] == pytest.approx(T_975_2 * 0.5 / math.sqrt(3), rel=1e-12)


def test_paired_t_test_of_one_two_three_has_the_tables_p_value():
    # t = 2 / (1 / sqrt 3) = 3.4641, 2 degrees of freedom: two-sided p = 0.0741799 (t tables)
    from pipeline.study.stats import paired_t_test

    assert paired_t_test([1.0, 2.0, 3.0]) == pytest.approx(0.07417990022744857, rel=1e-9)
    assert paired_t_test([5.0]) is None and paired_t_test([2.0, 2.0]) == 0.0 and paired_t_test([0.0, 0.0]) == 1.0


def test_holm_adjusts_step_down_and_keeps_the_order():
    # sorted 0.01, 0.03, 0.04 of m = 3: 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; 1 x 0.04 = 0.04 -> max(0.06, 0.04) = 0.06
    from pipeline.study.stats import holm

    assert holm([0.04, 0.01, None, 0.03]) == pytest.approx([0.06, 0.03, None, 0.06]) and holm([0.02]) == [0.02]
    assert holm([0.9, 0.8]) == [1.0, 1.0]


def test_seeds_for_power_match_the_published_sample_sizes():
    # Paired (one-sample) t-test, two-sided alpha 0.05, power 0.8: effect size 1 -> 10, 0.5 -> 34 (G*Power)
    from pipeline.study.stats import seeds_for_power

    assert seeds_for_power(std=1.0, difference=1.0) == 10 and seeds_for_power(std=2.0, difference=-1.0) == 34
    assert seeds_for_power(std=1.0, difference=1.0, comparisons=4) > 10  # Holm's first level: alpha / 4
    assert seeds_for_power(std=1.0, difference=0.0) is None


def _row(metric: str, variant: str, values: list[float], baseline: list[float] | None) -> dict:
    row = {"metric": metric, "variant": variant, "values": {str(s): v for s, v in enumerate(values)}}
    row.update(interval(values))
    row["difference_to_baseline"] = (
        None if baseline is None else paired_difference(dict(enumerate(values)), dict(enumerate(baseline)))
    )
    return row


def test_verdicts_follow_the_holm_adjusted_paired_comparisons():
    """FD_demo (lower is better) over 4 seeds: bias clearly worse (the paper's direction: reproduced), mlp clearly
    better (opposite), adaln within noise (not resolved); a claim on an unmeasured metric is not measured. The
    family is the 3 comparisons of the table."""
    from pipeline.study.verdicts import comparisons, verdicts

    base = [5.0, 6.0, 5.5, 6.5]
    table = [
        _row("FD_demo", "tmsa", base, None),
        _row("FD_demo", "bias", [9.0, 10.1, 9.4, 10.6], base),
        _row("FD_demo", "mlp", [3.0, 4.1, 3.4, 4.6], base),
        _row("FD_demo", "adaln", [5.5, 5.0, 6.5, 6.0], base),
    ]
    family = comparisons(table, "tmsa")
    p = {entry["variant"]: entry["p"] for entry in family}
    ordered = sorted(p.values())
    expected_holm = [
        3 * ordered[0],
        max(3 * ordered[0], 2 * ordered[1]),
        max(3 * ordered[0], 2 * ordered[1], ordered[2]),
    ]
    assert sorted(entry["p_holm"] for entry in family) == pytest.approx(expected_holm)
    paper = {
        "claims": [
            {"source": "Table 6", "metric": "FD_demo", "values": {"tmsa": 1.95, "bias": 3.97, "mlp": 3.81}},
            {"source": "Fig. 7b", "metric": "FD_demo", "worse": ["adaln"]},
            {"source": "Table 6", "metric": "frechet_inception_distance", "worse": ["bias"]},
        ]
    }
    found = {(v["source"], v["metric"], v["variant"]): v for v in verdicts(paper, family, "tmsa", ("FD_demo",))}
    bias = found[("Table 6", "FD_demo", "bias")]
    assert bias["verdict"] == "reproduced" and bias["paper"] == bias["measured"] == "worse"
    assert bias["paper_relative_change"] == pytest.approx((3.97 - 1.95) / 1.95)
    assert bias["relative_change"] == pytest.approx((sum(table[1]["values"].values()) / 4 - 5.75) / 5.75)
    assert bias["p_holm"] < 0.05 and bias["seeds_for_80_percent_power"] == 2
    mlp = found[("Table 6", "FD_demo", "mlp")]
    assert mlp["verdict"] == "opposite" and (mlp["paper"], mlp["measured"]) == ("worse", "better")
    adaln = found[("Fig. 7b", "FD_demo", "adaln")]
    assert adaln["verdict"] == "not resolved" and adaln["p_holm"] >= 0.05 and adaln["paper_relative_change"] is None
    assert found[("Table 6", "frechet_inception_distance", "bias")]["verdict"] == "not measured"
    assert len(found) == 4


def test_a_claim_with_its_own_baseline_is_judged_against_it_inside_the_studys_holm_family():
    """Table 5 in one study: VE+TMSA against VE and VP+TMSA against VP (the study's baseline is vp). The claim's
    pair joins the family (Holm over 3 + 1 comparisons), its difference is paired seed by seed against ve, and the
    paper's relative change is taken against the claim's baseline."""
    from pipeline.study.verdicts import claim_pairs, claim_problems, comparisons, verdicts

    vp = [3.0, 3.2, 3.1, 2.9]
    ve = [3.8, 3.7, 3.9, 3.6]
    table = [
        _row("FD_demo", "vp", vp, None),
        _row("FD_demo", "vp-tmsa", [2.7, 2.95, 2.8, 2.7], vp),
        _row("FD_demo", "ve", ve, vp),
        _row("FD_demo", "ve-tmsa", [3.5, 3.45, 3.65, 3.3], vp),
    ]
    paper = {
        "claims": [
            {"source": "Table 5 VE", "metric": "FD_demo", "values": {"ve": 3.77, "ve-tmsa": 3.49}, "baseline": "ve"},
            {"source": "Table 5 VP", "metric": "FD_demo", "values": {"vp": 3.01, "vp-tmsa": 2.76}},
        ]
    }
    assert claim_problems(paper, ["vp", "vp-tmsa", "ve", "ve-tmsa"], "vp") == []
    assert claim_pairs(paper, "vp") == [("ve-tmsa", "ve")]
    family = comparisons(table, "vp", claim_pairs(paper, "vp"))
    assert [(e["variant"], e["baseline"]) for e in family] == [
        ("vp-tmsa", "vp"), ("ve", "vp"), ("ve-tmsa", "vp"), ("ve-tmsa", "ve")
    ]  # fmt: skip
    pair = family[-1]
    differences = [3.5 - 3.8, 3.45 - 3.7, 3.65 - 3.9, 3.3 - 3.6]
    assert pair["mean_difference"] == pytest.approx(sum(differences) / 4) and pair["n"] == 4
    # Holm over the four, by hand: the k-th smallest p times (4 - k), running maximum, capped at 1.
    ranked = sorted(e["p"] for e in family)
    holm_by_hand = [min(1.0, max((4 - j) * ranked[j] for j in range(k + 1))) for k in range(4)]
    assert pair["p_holm"] == pytest.approx(holm_by_hand[ranked.index(pair["p"])])
    found = {v["source"]: v for v in verdicts(paper, family, "vp", ("FD_demo",))}
    assert found["Table 5 VE"]["baseline"] == "ve" and found["Table 5 VE"]["mean_difference"] == pair["mean_difference"]
    assert found["Table 5 VE"]["paper_relative_change"] == pytest.approx((3.49 - 3.77) / 3.77)
    assert found["Table 5 VE"]["verdict"] == "reproduced" and found["Table 5 VP"]["baseline"] == "vp"
    bad = {"claims": [{"source": "x", "metric": "FD_demo", "values": {"ve-tmsa": 3.49}, "baseline": "ve"}]}
    assert claim_problems(bad, ["vp", "ve", "ve-tmsa"], "vp") == [
        "paper.claims[0]: 'values' must include the baseline 've' (a difference needs it)"
    ]
    unknown = {"claims": [{"source": "x", "metric": "FD_demo", "worse": ["ve"], "baseline": "ncsn"}]}
    assert "baseline 'ncsn' is not a variant" in claim_problems(unknown, ["vp", "ve"], "vp")[0]


# ---------------------------------------------------------------------------------------------------------------
# The study file


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 16 px labelled image dataset (2 classes), a random demo classifier, a tiny U-Net preset, a study file."""
    from pipeline.demo.classifier import ClassifierConfig, SmallCNN, save_classifier

    root = tmp_path_factory.mktemp("study")
    write_image_dataset(root / "data", num_samples=8, num_shards=1, resolution=16, num_classes=2)
    torch.manual_seed(0)
    save_classifier(SmallCNN(ClassifierConfig(num_classes=2, resolution=16, channels=(8, 16), groups=4)), root / "clf")
    config = tiny_image_config(
        train={"global_batch_size": 4, "max_steps": 4, "mixed_precision": "no", "log_every": 1, "tracker": "none"},
        checkpoint={"every": 2, "keep": 2},
    )
    config["model"]["kwargs"] = {"channels": [16, 16], "blocks_per_stage": [1, 1], "num_heads": 2, "num_groups": 4}
    write_config(root / "base.yaml", config)
    (root / "study.yaml").write_text(STUDY.format(root=root))
    return root


STUDY = """
name: tiny
base: base.yaml
data: {root}/data
seeds: [0, 1]
set: {{checkpoint.keep_every: 2}}
curve: {{num_samples: 4}}
axes:
  time_embedding:
    positional: {{model.kwargs.time_embedding: positional}}
    fourier: {{model.kwargs.time_embedding: fourier}}
evaluate: {{num_samples: 8, batch_size: 8, steps: 2, metrics: []}}
demo_metrics: {{reference: {root}/data, classifier: {root}/clf}}
paper:
  claims:
    - {{source: Table 8, metric: FD_demo, values: {{positional: 1.95, fourier: 2.02}}}}
"""


CLAIMS = "paper:\n  claims:\n    - {source: Table 8, metric: FD_demo, values: {positional: 1.95, fourier: 2.02}}\n"


def edited(tiny: Path, old: str, new: str, claims: bool = True) -> Path:
    path = tiny / f"edited-{abs(hash((old, new, claims)))}.yaml"
    text = (tiny / "study.yaml").read_text()
    assert old in text and CLAIMS in text
    path.write_text(text.replace(old, new).replace(CLAIMS, CLAIMS if claims else ""))
    return path


def test_the_study_expands_into_variants_times_seeds_with_the_seed_and_overrides_of_each(tiny):
    study = load_study(tiny / "study.yaml")
    units = study.units()
    assert [u.run_dir for u in units] == [
        "runs/positional/seed-0",
        "runs/positional/seed-1",
        "runs/fourier/seed-0",
        "runs/fourier/seed-1",
    ]
    assert units[3].overrides == ["checkpoint.keep_every=2", 'model.kwargs.time_embedding="fourier"', "train.seed=1"]
    assert [(e.variant, e.out_dir) for e in units[3].evaluations] == [("fourier", "evals/fourier/seed-1")]
    assert study.baseline == "positional"


def test_an_axis_of_evaluate_settings_shares_one_training_per_seed(tiny):
    path = edited(
        tiny,
        "  time_embedding:\n    positional: {model.kwargs.time_embedding: positional}\n"
        "    fourier: {model.kwargs.time_embedding: fourier}",
        "  cfg:\n    s1: {evaluate.guidance_scale: 1.0}\n    s3: {evaluate.guidance_scale: 3.0}",
        claims=False,
    )
    units = load_study(path).units()
    assert [u.run_dir for u in units] == ["runs/base/seed-0", "runs/base/seed-1"]
    assert [e.out_dir for e in units[0].evaluations] == ["evals/s1/seed-0", "evals/s3/seed-0"]


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("seeds: [0, 1]", "seeds: [0, 1]\nsteps: 3", "unknown key 'steps' in the study"),
        ("name: tiny", "name: tiny\nbaseline: sinusoidal", "baseline 'sinusoidal' is not a variant; variants: "),
        ("{model.kwargs.time_embedding: fourier}", "{model.kwarg.x: 1}", "unknown key 'model.kwarg'"),
        ("{model.kwargs.time_embedding: fourier}", "{train.max_steps: 8}", "'train.max_steps' is part of the budget"),
        ("{model.kwargs.time_embedding: fourier}", "{evaluate.cfg: 2}", "unknown key 'evaluate.cfg'"),
        ("metrics: []", "metric: []", "unknown key 'metric' in evaluate"),
        ("fourier: 2.02}", "sinusoid: 2.02}", "paper.claims[0]: 'sinusoid' is not a variant; variants: positional"),
        ("{positional: 1.95, ", "{", "paper.claims[0]: 'values' must include the baseline 'positional'"),
        ("metric: FD_demo,", "metric: FD_demo, direction: up,", "paper.claims[0]: unknown key 'direction'"),
    ],
)
def test_a_study_file_with_an_unknown_key_or_variant_is_a_clear_error(tiny, old, new, message):
    path = edited(tiny, old, new)
    with pytest.raises(StudyError, match=str(path).replace(".", r"\.")) as error:
        load_study(path)
    assert message in str(error.value)
    result = CliRunner().invoke(app, ["study", str(path), "--out", str(tiny / "never")])
    assert result.exit_code == 2 and f"error: {path}" in result.output and message in result.output
    assert not (tiny / "never").exists()


# ---------------------------------------------------------------------------------------------------------------
# End to end: an uninterrupted study and a killed + resumed one give the same study.json


def study_process(tiny: Path, out: Path) -> subprocess.Popen:
    command = [PYTHON, "-m", "cli.main", "study", str(tiny / "study.yaml"), "--out", str(out)]
    return subprocess.Popen(
        command, cwd=REPO, env=subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture(scope="module")
def studies(tiny) -> tuple[Path, Path]:
    whole, resumed = tiny / "whole", tiny / "resumed"
    process = study_process(tiny, whole)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    # Killed in the third run's training (after its first checkpoint), then run again.
    process = study_process(tiny, resumed)
    marker = resumed / "runs/fourier/seed-0/checkpoints/step-0000002"
    deadline = time.monotonic() + 600
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the study finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (resumed / "study.json").exists() and not (resumed / "evals/fourier/seed-0/result.json").exists()
    kept = {p: p.stat().st_mtime_ns for p in resumed.glob("evals/positional/*/result.json")}
    assert len(kept) == 2
    process = study_process(tiny, resumed)
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-3000:]
    assert "runs/positional/seed-0: done" in output and "runs/fourier/seed-0: todo" in output
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished runs were kept, not redone
    assert "continuing from" in output.lower() or "resum" in output.lower(), output[-3000:]
    return whole, resumed


def without_wall_times(study: dict) -> dict:
    """study.json without the measured times of its `cost` (the one part that differs between runs)."""
    from pipeline.study.aggregate import MEASURED_COST_FIELDS

    cost = {v: {k: x for k, x in e.items() if k not in MEASURED_COST_FIELDS} for v, e in study["cost"].items()}
    return {**study, "cost": cost}


def test_a_killed_and_resumed_study_writes_the_same_study_json_as_an_uninterrupted_one(studies):
    whole, resumed = (json.loads((path / "study.json").read_text()) for path in studies)
    assert without_wall_times(whole) == without_wall_times(resumed)
    assert set(whole["cost"]["fourier"]) - set(without_wall_times(whole)["cost"]["fourier"]) == {
        "train_seconds", "train_images_per_s", "evaluate_seconds", "sampling_images_per_s"
    }  # fmt: skip


def test_study_json_holds_fd_demo_per_variant_with_its_interval_and_the_paired_difference(studies):
    study = json.loads((studies[0] / "study.json").read_text())
    rows = {(r["metric"], r["variant"]): r for r in study["table"]}
    assert set(rows) == {(m, v) for m in ("FD_demo", "class_consistency") for v in ("positional", "fourier")}
    fd = rows[("FD_demo", "fourier")]
    values = [fd["values"]["0"], fd["values"]["1"]]
    assert fd["mean"] == pytest.approx(sum(values) / 2, rel=1e-12)
    assert fd["half_width"] == pytest.approx(12.706204736174698 * abs(values[0] - values[1]) / 2, rel=1e-9)
    base = rows[("FD_demo", "positional")]["values"]
    differences = [values[0] - base["0"], values[1] - base["1"]]
    assert fd["difference_to_baseline"]["mean"] == pytest.approx(sum(differences) / 2, rel=1e-9)
    assert rows[("FD_demo", "positional")]["difference_to_baseline"] is None
    # Each value is the one the run's own result.json holds.
    result = json.loads((studies[0] / "evals/fourier/seed-1/result.json").read_text())
    assert result["metrics"]["FD_demo"] == fd["values"]["1"]
    assert study["metric_details"]["FD_demo"] == {
        "feature_dim": 16,
        "features": "demo classifier head input (global average of the last conv stage)",
        "num_reference_images": 8,
        "num_samples": 8,
    }
    assert study["budget"]["images_seen"] == 16 and study["budget"]["num_samples"] == 8
    # What each variant costs: the exported model's parameters and GFLOPs, its guidance, measured times.
    from diffit.models import model_stats

    export = json.loads((studies[0] / "models/fourier/seed-0/config.json").read_text())["model"]
    stats = model_stats(export["name"], **export["kwargs"])
    cost = study["cost"]["fourier"]
    assert (cost["params"], cost["gflops"], cost["model"]) == (stats["params"], stats["gflops"], "DiffiT-UNet-Tiny")
    assert export["kwargs"]["time_embedding"] == "fourier" and cost["params"] > 0
    assert (cost["guidance_scale"], cost["sampler"], cost["sampling_steps"]) == (1.0, "edm-heun", 2)
    runs = [json.loads(line) for line in (studies[0] / "runs/fourier/seed-0/metrics.jsonl").read_text().splitlines()]
    seconds = [sum(4 / r["images_per_s"] for r in runs if "images_per_s" in r)]  # 4 images a step, logged every step
    runs = [json.loads(line) for line in (studies[0] / "runs/fourier/seed-1/metrics.jsonl").read_text().splitlines()]
    seconds.append(sum(4 / r["images_per_s"] for r in runs if "images_per_s" in r))
    assert cost["train_seconds"] == pytest.approx(sum(seconds) / 2, rel=1e-9)
    assert cost["train_images_per_s"] == pytest.approx((16 / seconds[0] + 16 / seconds[1]) / 2, rel=1e-9)
    assert cost["evaluate_seconds"] > 0 and cost["sampling_images_per_s"] > 0
    # The paper's claim (Fourier worse than positional) judged by the Holm-adjusted paired comparison.
    family = {(c["metric"], c["variant"]): c for c in study["comparisons"]}
    assert set(family) == {("FD_demo", "fourier"), ("class_consistency", "fourier")}
    comparison = family[("FD_demo", "fourier")]
    assert comparison["mean_difference"] == fd["difference_to_baseline"]["mean"]
    ((verdict),) = study["verdicts"]
    resolved = comparison["p_holm"] < 0.05
    measured = "worse" if comparison["mean_difference"] > 0 else "better"
    expected = "not resolved" if not resolved else ("reproduced" if measured == "worse" else "opposite")
    assert (verdict["variant"], verdict["paper"], verdict["verdict"]) == ("fourier", "worse", expected)
    smallest, own = min(c["p"] for c in family.values()), comparison["p"]  # Holm over a family of two
    holm_p = min(1.0, 2 * smallest) if own == smallest else max(min(1.0, 2 * smallest), own)
    assert verdict["p_holm"] == comparison["p_holm"] == pytest.approx(holm_p, rel=1e-12)
    assert study["curves"]["fourier"]["loss"]["step"] == [1, 2, 3, 4]
    assert study["curve"] == {"num_samples": 4, "steps": [2]}
    # Each run is an ordinary run directory and export.
    assert (studies[0] / "runs/fourier/seed-1/checkpoints/step-0000004").is_dir()
    assert json.loads((studies[0] / "models/fourier/seed-1/config.json").read_text())["train"]["step"] == 4


def test_the_metric_curve_holds_each_milestone_checkpoint_and_the_final_models_first_samples(studies, tiny):
    from pipeline.evaluate import STORE_NAME, SampleStore
    from pipeline.study.demo_metrics import demo_metrics

    study = json.loads((studies[0] / "study.json").read_text())
    settings = {"reference": str(tiny / "data"), "classifier": str(tiny / "clf")}
    for variant in ("positional", "fourier"):
        curve = study["curves"][variant]["FD_demo @ 4 samples"]
        assert curve["step"] == [2, 4] and curve["n"] == 2
        expected = {2: [], 4: []}
        for seed in (0, 1):
            # Step 2: the milestone checkpoint, exported and evaluated on its own 4 samples.
            point = studies[0] / f"curve-evals/{variant}/seed-{seed}/step-0000002"
            model = studies[0] / f"curve-models/{variant}/seed-{seed}/step-0000002/config.json"
            assert json.loads(model.read_text())["train"]["step"] == 2
            store = SampleStore.open(point / STORE_NAME, mode="r")
            images, labels = store.read_images(0, 4), store.read_labels()
            expected[2].append(demo_metrics(settings, images, labels)[0]["FD_demo"])
            # Step 4: the first 4 of the final evaluation's 8 samples.
            store = SampleStore.open(studies[0] / f"evals/{variant}/seed-{seed}" / STORE_NAME, mode="r")
            images, labels = store.read_images(0, 8)[:4], store.read_labels()[:4]
            expected[4].append(demo_metrics(settings, images, labels)[0]["FD_demo"])
        assert curve["mean"] == pytest.approx([sum(expected[2]) / 2, sum(expected[4]) / 2], rel=1e-12)
        assert curve["mean"][0] != curve["mean"][1]


def test_a_study_run_two_at_a_time_gives_the_same_study_json(studies, tiny):
    out = tiny / "parallel"
    command = [PYTHON, "-m", "cli.main", "study", str(tiny / "study.yaml"), "--out", str(out), "--jobs", "2"]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "OMP_NUM_THREADS=1" in result.stdout and (out / "logs/run-3.log").is_file()
    parallel, serial = (json.loads((path / "study.json").read_text()) for path in (out, studies[0]))
    assert without_wall_times(parallel) == without_wall_times(serial)


def test_jobs_take_one_cuda_device_each_or_a_share_of_the_cores():
    from pipeline.study.parallel import slot_environments

    assert slot_environments(2, 4, 16) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert slot_environments(3, 0, 16) == [{"OMP_NUM_THREADS": "5", "MKL_NUM_THREADS": "5"}] * 3
    assert slot_environments(4, 0, 2) == [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}] * 4
    with pytest.raises(StudyError, match="--jobs 2: this machine has 1 CUDA device"):
        slot_environments(2, 1, 16)


def test_fd_demo_features_are_the_classifier_heads_input(tiny):
    from pipeline.demo import load_classifier, load_labelled_images
    from pipeline.demo.classifier import to_input
    from pipeline.study import classifier_features

    model = load_classifier(tiny / "clf")
    images = load_labelled_images(tiny / "data", 16).images
    captured = []
    handle = model.head.register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0].detach()))
    with torch.no_grad():
        logits = model(to_input(images, 16))
    handle.remove()
    features = classifier_features(model, images)
    assert features.shape == (8, 16) and features.dtype == np.float64
    np.testing.assert_array_equal(features, captured[0].double().numpy())
    np.testing.assert_allclose(model.head(torch.from_numpy(features).float()).detach(), logits, rtol=0, atol=1e-6)


def test_fd_demo_of_the_reference_against_itself_is_zero_and_consistency_counts_matches(tiny):
    from pipeline.demo import load_classifier, load_labelled_images, predict
    from pipeline.study.demo_metrics import demo_metrics

    images = load_labelled_images(tiny / "data", 16).images
    labels = np.arange(8) % 2
    values, details = demo_metrics({"reference": str(tiny / "data"), "classifier": str(tiny / "clf")}, images, labels)
    assert values["FD_demo"] == pytest.approx(0.0, abs=1e-9)
    expected = float(np.mean(predict(load_classifier(tiny / "clf"), images) == labels))
    assert values["class_consistency"] == expected
    assert details["FD_demo"]["feature_dim"] == 16


def test_a_rerun_of_another_study_against_the_same_directory_is_refused(tiny, studies):
    path = edited(tiny, "seeds: [0, 1]", "seeds: [0, 1, 2]")
    result = CliRunner().invoke(app, ["study", str(path), "--out", str(studies[0]), "--plan"])
    assert result.exit_code == 2 and "holds another study" in result.output


BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run")


def test_the_study_page_renders_in_headless_chromium(studies, tmp_path):
    from PIL import Image

    if os.environ.get("DIFFIT_NO_BROWSER") == "1":
        pytest.skip("DIFFIT_NO_BROWSER=1: the page is not rendered in a browser")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("headless Chromium is not installed: apt-get install -y chromium (or DIFFIT_NO_BROWSER=1)")
    page = studies[0] / "study.html"
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page.read_text())  # base64 may spell anything
    assert "FD_demo" in text and "paired difference to positional" in text and "FID" not in text
    assert 'alt="FD_demo @ 4 samples"' in text and 'alt="fourier samples"' in text
    # The grids: each variant's first samples with seed 0, class captions, 16 px enlarged 4x.
    from pipeline.study.runner import read_samples

    grid = np.asarray(Image.open(studies[0] / "grids/fourier.png").convert("RGB"))
    images, _ = read_samples(studies[0] / "evals/fourier/seed-0", 20)
    assert len(images) == 8 and grid.shape == (2 + 76 + 2, 2 + 8 * (64 + 2), 3)
    np.testing.assert_array_equal(grid[2:6, 2:6], np.broadcast_to(images[0][0, 0], (4, 4, 3)))
    shot = tmp_path / "shot.png"
    command = [browser, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1400"]
    result = subprocess.run(
        [*command, f"--screenshot={shot}", page.resolve().as_uri()], capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    non_white = (pixels < 250).any(axis=2)
    # The table alone is grey text on white; the loss chart's coloured lines bring many more colours.
    assert non_white.mean() > 0.03, non_white.mean()
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 300


# ---------------------------------------------------------------------------------------------------------------
# SLURM and the shipped studies


def test_slurm_writes_a_job_array_of_one_element_per_run_and_an_aggregate_job(tiny, tmp_path):
    out = tmp_path / "slurm-study"
    result = CliRunner().invoke(app, ["study", str(tiny / "study.yaml"), "--out", str(out), "--slurm"])
    assert result.exit_code == 0, result.output
    array = (out / "study.sbatch").read_text()
    assert "#SBATCH --array=0-3\n" in array
    assert f'study {tiny / "study.yaml"} --out {out} --run-index "$SLURM_ARRAY_TASK_ID"' in array
    assert "--aggregate-only" in (out / "study-aggregate.sbatch").read_text()
    for script in ("study.sbatch", "study-aggregate.sbatch"):
        assert subprocess.run(["bash", "-n", str(out / script)]).returncode == 0
    assert not (out / "runs").exists()


SHIPPED = sorted((REPO / "manifests" / "studies").glob("*.yaml"))


def test_the_shipped_studies_cover_every_ablation_at_both_scales():
    names = {path.stem for path in SHIPPED}
    for ablation in ("time_conditioning", "time_embedding", "window_size", "guidance_scale", "token_dims"):
        assert f"{ablation}_demo" in names
        assert any(name.startswith(ablation) and not name.endswith("_demo") for name in names), ablation
    assert "time_conditioning_imagenet256" in names and "time_conditioning_cifar10" in names
    # The FFHQ-64 rows of Tables 3, 7, 8 and Fig. 8; Fig. 7a at 512 px.
    ffhq = {"token_dims_ffhq64", "time_token_ffhq64", "time_embedding_ffhq64", "window_size_ffhq64"}
    assert ffhq <= names and {"token_dims_cifar10", "guidance_scale_imagenet512"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_a_shipped_study_loads_and_its_models_accept_its_kwargs(path):
    study = load_study(path)
    assert len(study.units()) >= 2 and study.baseline in [v.name for v in study.variants]
    check_model_kwargs(study)


# ---------------------------------------------------------------------------------------------------------------
# The study stage's guarantees: each test below fails with the one-line bug named in its docstring


@pytest.mark.parametrize(
    "settings",
    [["set.evaluate.num_samples=3"], []],
    ids=["--set", "set-in-the-file"],
)
def test_a_curve_longer_than_the_evaluation_is_refused_when_the_sample_count_comes_from_set(tiny, settings):
    """`set: {evaluate.num_samples: N}` is an evaluate setting: the curve bound must see it (it used to be checked
    before `set`'s evaluate keys were moved, so one curve mixed 4-sample and 3-sample points)."""
    path = edited(tiny, "set: {checkpoint.keep_every: 2}", "set: {checkpoint.keep_every: 2, evaluate.num_samples: 3}")
    with pytest.raises(StudyError, match="curve.num_samples 4 exceeds evaluate.num_samples"):
        load_study(tiny / "study.yaml" if settings else path, settings)


def _write_records(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_records_of_one_step_are_merged_so_the_loss_curve_keeps_the_steps_where_fid_was_logged(tiny, tmp_path):
    """The trainer logs a loss record and then an FID record for the same step; a resumed run logs a step again.
    The curve keeps the loss and the FID of such a step, and the later value of a repeated one (keeping only the
    last record lost the loss; keeping the first lost the FID and the resumed value)."""
    from pipeline.study.aggregate import read_training_records, training_curves

    study = load_study(tiny / "study.yaml")
    for unit in study.units():
        seed = unit.seed
        _write_records(
            tmp_path / unit.run_dir / "metrics.jsonl",
            [
                {"step": 1, "loss": 2.0 + seed},
                {"step": 2, "loss": 9.0},  # logged, then the run was killed and resumed from step 1
                "not json",
                {"step": 2, "loss": 1.0 + seed, "lr": 1e-4},
                {"step": 2, "fid_64": 30.0 + 2 * seed, "plumbing_only_fid_64": 7.0},
            ],
        )
    records = read_training_records(tmp_path / "runs/positional/seed-1")
    assert records[2] == {"step": 2, "loss": 2.0, "lr": 1e-4, "fid_64": 32.0, "plumbing_only_fid_64": 7.0}
    curves = training_curves(study, tmp_path)["fourier"]
    assert curves["loss"] == {"step": [1, 2], "mean": [2.5, 1.5], "n": 2}
    assert curves["fid_64"] == {"step": [2], "mean": [31.0], "n": 2}


BUDGET = [
    ("train.max_steps", 8),
    ("train.global_batch_size", 8),
    ("train.seed", 3),
    ("evaluate.num_samples", 4),
]


@pytest.mark.parametrize("key, value", BUDGET, ids=[key for key, _ in BUDGET])
def test_no_variant_may_change_the_budget(tiny, key, value):
    """Every run trains the same steps on the same batch and is scored on the same samples: each of these keys in
    one variant is refused (without `evaluate.num_samples` in the budget, variants were scored on different sample
    counts)."""
    path = edited(tiny, "{model.kwargs.time_embedding: fourier}", "{" + f"{key}: {json.dumps(value)}" + "}")
    with pytest.raises(StudyError, match=f"axes.time_embedding.fourier: '{key}' is part of the budget"):
        load_study(path)


@pytest.mark.parametrize(
    "study_wide, variant, message",
    [
        ("steps: 2, sampler: edm-heun", "{evaluate.steps: 3}", "positional 3, fourier 5"),
        ("steps: 2", "{evaluate.sampler: ddim, evaluate.steps: 3}", "evaluate.steps (not given for positional)"),
    ],
)
def test_variants_may_sample_differently_only_at_equal_network_evaluations(tiny, study_wide, variant, message):
    """Samplers and steps may differ between variants (an objective axis) only at equal network evaluations per
    sample: Heun on 2 steps is 3 evaluations, on 3 steps 5; a variant naming its sampler needs every variant to."""
    path = edited(tiny, "{model.kwargs.time_embedding: fourier}", variant)
    path.write_text(path.read_text().replace("batch_size: 8, steps: 2", f"batch_size: 8, {study_wide}"))
    with pytest.raises(StudyError, match=re.escape(message)):
        load_study(path)


def test_network_evaluations_per_sampler():
    from diffit.sampling_config import network_evaluations

    assert [network_evaluations(s, 32) for s in ("ddpm", "ddim", "euler", "euler-maruyama")] == [32] * 4
    assert network_evaluations("edm-heun", 32) == network_evaluations("heun", 32) == 63


CFG_AXIS = (
    "  cfg:\n    s1: {evaluate.guidance_scale: 1.0}\n    s3: {evaluate.guidance_scale: 3.0}\n    study_wide: {}",
    "evaluate: {num_samples: 8, batch_size: 8, steps: 2, metrics: [], guidance_scale: 2.0}",
)


def _cfg_study(tiny: Path) -> Path:
    text = (tiny / "study.yaml").read_text()
    axes = "  time_embedding:\n    positional: {model.kwargs.time_embedding: positional}\n"
    axes += "    fourier: {model.kwargs.time_embedding: fourier}"
    text = text.replace(axes, CFG_AXIS[0]).replace(
        "evaluate: {num_samples: 8, batch_size: 8, steps: 2, metrics: []}", CFG_AXIS[1]
    )
    text = text.replace("seeds: [0, 1]", "seeds: [0]").replace("curve: {num_samples: 4}\n", "").replace(CLAIMS, "")
    path = tiny / "cfg-study.yaml"
    path.write_text(text)
    return path


def test_a_variants_evaluate_setting_wins_over_the_study_wide_one(tiny, tmp_path):
    """A guidance-scale study measures each variant at its own scale; the study-wide value only where a variant
    sets none (the study-wide settings overriding the variant's measured one scale three times)."""
    from pipeline.study.runner import evaluate_options

    study = load_study(_cfg_study(tiny))
    (unit,) = study.units()
    scales = {
        evaluation.variant: evaluate_options(study, evaluation, tmp_path / "m", tmp_path / "e").sampling[
            "guidance_scale"
        ]
        for evaluation in unit.evaluations
    }
    assert scales == {"s1": 1.0, "s3": 3.0, "study_wide": 2.0}


def test_a_unit_is_done_only_when_every_one_of_its_evaluations_has_a_result(tiny, tmp_path):
    """A study killed between a unit's two evaluations (a result.json is written atomically, last) resumes with
    the missing evaluation only (a unit counted as done after its first evaluation skipped the rest)."""
    from pipeline.study import run_unit, unit_state

    study = load_study(_cfg_study(tiny))
    (unit,) = study.units()
    assert [e.out_dir for e in unit.evaluations] == ["evals/s1/seed-0", "evals/s3/seed-0", "evals/study_wide/seed-0"]
    out = tmp_path / "study"
    run_unit(study, unit, out)
    assert unit_state(study, unit, out) == "done"
    results = {e.out_dir: out / e.out_dir / "result.json" for e in unit.evaluations}

    def contents() -> dict:  # the results without their measured wall time
        return {name: {**json.loads(path.read_text()), "evaluate_seconds": None} for name, path in results.items()}

    finished = contents()
    kept = {name: path.stat().st_mtime_ns for name, path in results.items()}
    results["evals/s3/seed-0"].unlink()  # as if killed before its result was written
    assert unit_state(study, unit, out) == "trained"
    run_unit(study, unit, out)
    assert contents() == finished
    assert results["evals/s1/seed-0"].stat().st_mtime_ns == kept["evals/s1/seed-0"]
    assert results["evals/study_wide/seed-0"].stat().st_mtime_ns == kept["evals/study_wide/seed-0"]
    assert unit_state(study, unit, out) == "done"


def test_jobs_count_a_unit_killed_by_a_signal_as_failed(tiny, tmp_path, monkeypatch):
    """`--jobs 2`: a unit process that dies of SIGKILL (return code -9) is a failure named with its log; the other
    unit still runs (a negative return code counted as success let a study aggregate a unit that never finished)."""
    import sys

    from pipeline.core.errors import JobFailedError
    from pipeline.study import parallel

    study = load_study(tiny / "study.yaml")
    units = study.units()[1:3]  # a resumed study: unit 0 finished before
    done = tmp_path / "unit-1-ran"
    commands = {
        1: [sys.executable, "-c", f"open({str(done)!r}, 'w').close()"],
        2: [
            sys.executable,
            "-c",
            "import os, signal; print('dying', flush=True); os.kill(os.getpid(), signal.SIGKILL)",
        ],
    }
    monkeypatch.setattr(parallel, "unit_command", lambda _file, _out, _settings, index: commands[index])
    lines = []
    with pytest.raises(JobFailedError) as failed:
        parallel.run_parallel(tiny / "study.yaml", tmp_path, [], units, jobs=2, total=4, log=lines.append)
    log = tmp_path / "logs" / "run-2.log"
    assert str(failed.value) == f"1 of 2 study run(s) failed: {units[1].run_dir} exit -9 (log {log})"
    assert done.is_file() and log.read_text() == "dying\n"
    # Numbered out of the study's units, not out of the ones left to run.
    assert sorted(line.split(":")[0] for line in lines if line.endswith(("exit 0", "exit -9"))) == [
        f"[study] run 2/4 {units[0].run_dir}",
        f"[study] run 3/4 {units[1].run_dir}",
    ]


# ---------------------------------------------------------------------------------------------------------------
# Hostile and careless inputs: one `error:` line naming the file, exit 2, nothing written, before any training


def cli_error(arguments: list[str]) -> str:
    """Run `diffit-pipe ARGS` in this process; assert exit 2 with exactly one line, an `error:` line; return it."""
    result = CliRunner().invoke(app, [str(a) for a in arguments])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output[-2000:]
    assert "Traceback" not in result.output
    return lines[0]


ALIAS_BOMB = """name: bomb
base: base.yaml
seeds: [0]
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
axes: {x: {y: {evaluate.classes: *f}}}
"""


def test_a_yaml_alias_bomb_is_refused_at_its_first_alias(tiny):
    path = tiny / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    line = cli_error(["study", path, "--out", tiny / "never"])
    assert line.startswith(f"error: {path}: not valid YAML (aliases (*name) are not accepted (line 5, column 8)")
    assert len(line) < 400 and not (tiny / "never").exists()
    line = cli_error(["study", tiny / "study.yaml", "--set", "seeds=[&a 0, *a]", "--out", tiny / "never"])
    assert "--set 'seeds=[&a 0, *a]': the value is not valid YAML (aliases (*name) are not accepted" in line


@pytest.mark.parametrize(
    "setting, message",
    [
        ("data=[x", "--set 'data=[x': the value is not valid YAML (while parsing a flow sequence"),
        ("data=[1, 2]", "data must be a path, got [1, 2]"),
        ("seeds=[-1]", "seeds must be integers in [0, 4294967295], got -1"),
        ("seeds=[1e23]", "seeds must be integers in [0, 4294967295], got '1e23'"),
        ("seeds=[1.0e+23]", "seeds must be integers in [0, 4294967295], got 1e+23"),
        ("seeds=[0, 1, 0]", "seeds repeat: [0, 1, 0]"),
        ('name="tiny\\n"', "name 'tiny\\n' must be 1-100 of A-Z a-z 0-9"),
        ("evaluate.steps=abc", "variant positional: evaluate.steps: expected an integer in [1, 100000], got 'abc'"),
        (
            "evaluate.guidance_scale=[1, 2]",
            "variant positional: evaluate.guidance_scale: expected a finite number, got [1, 2]",
        ),
        ("evaluate.sampler=lms", "evaluate.sampler: expected one of ddpm, ddim, edm-heun, euler, heun, euler-m"),
        ("evaluate.sampler=euler", "variant positional: evaluate.sampler 'euler' does not sample diffusion.type 'edm'"),
        ("evaluate.metrics=[fid, fld]", "evaluate.metrics: unknown 'fld'; choose from fid, sfid, is, prc, kid"),
        ("evaluate.pixels=nearest", "evaluate.pixels: expected one of round, truncate, got 'nearest'"),
        ("evaluate.guidance_interval=[5, 1]", "evaluate.guidance_interval: expected LOW <= HIGH, got (5, 1)"),
        ("evaluate.guidance_interval=[1]", "evaluate.guidance_interval: expected LOW,HIGH, got (1,)"),
        ("evaluate.num_samples=2", "curve.num_samples 4 exceeds evaluate.num_samples"),
        ("evaluate.num_samples=abc", "evaluate.num_samples: expected an integer in [1, 10000000], got 'abc'"),
        ("demo_metrics.classifier=[a]", "demo_metrics.classifier must be a path, got ['a']"),
        ("demo_metrics.max_reference_images=abc", "demo_metrics.max_reference_images must be an integer in [2, "),
        ("curve.num_samples=1.5", "curve.num_samples must be an integer >= 2 (a covariance), got 1.5"),
        ("set.train.seed=-1", "set: 'train.seed' is given by the study's seeds"),
    ],
)
def test_every_value_is_checked_when_the_study_loads(tiny, setting, message):
    """`--set` values (and the same keys in the file) are parsed and checked before any unit trains."""
    out = tiny / "never"
    line = cli_error(["study", tiny / "study.yaml", "--set", setting, "--out", out])
    assert message in line, line
    assert not out.exists()


def test_counts_are_bounded_before_anything_is_expanded(tiny):
    """9 axes x 10 variants (10^9 variants), 5,000 seeds and a 1.5 MB file of 200,000 seeds are refused at once,
    with their counts."""
    axes = {f"a{i}": {f"v{j}": {"evaluate.guidance_scale": float(j)} for j in range(10)} for i in range(9)}
    path = tiny / "huge.yaml"
    path.write_text(json.dumps({"name": "huge", "base": "base.yaml", "seeds": [0], "axes": axes}))
    line = cli_error(["study", path, "--plan", "--out", tiny / "never"])
    assert "the axes make at least 100000 variants; with its seeds a study may have at most 10000 evaluations" in line
    path.write_text(json.dumps({"name": "many", "base": "base.yaml", "seeds": list(range(5000)), "axes": axes}))
    assert "seeds must be a list of 1 to 1000 integers, got 5000 seeds" in cli_error(["study", path, "--plan"])
    path.write_text(json.dumps({"name": "many", "base": "base.yaml", "seeds": list(range(200_000)), "axes": axes}))
    line = cli_error(["study", path, "--plan"])
    assert f"not valid YAML (a YAML file of {path.stat().st_size} bytes, more than the 1048576 accepted)" in line


def test_plan_writes_nothing_and_an_out_that_is_a_file_is_refused(tiny):
    out = tiny / "only-a-look"
    result = CliRunner().invoke(app, ["study", str(tiny / "study.yaml"), "--out", str(out), "--plan"])
    assert result.exit_code == 0 and "0: runs/positional/seed-0 [todo]" in result.output
    assert not out.exists()
    # A look before the inputs exist (a study planned before `diffit-pipe demo` made them) lists them.
    arguments = ["study", str(tiny / "study.yaml"), "--out", str(out), "--plan", "--set", "data=/nowhere/data"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0 and "inputs not found yet (needed to run): data /nowhere/data" in result.output
    assert not out.exists()
    (tiny / "a-file").write_text("x")
    line = cli_error(["study", tiny / "study.yaml", "--out", tiny / "a-file", "--plan"])
    assert line == f"error: {tiny / 'a-file'}: not a directory (--out names the study directory)"


@pytest.mark.parametrize("content", ["{}", "[]", '{"metrics": {"FD_demo": "x"}, "seed": 0, "num_samples": 8}'])
def test_a_result_file_that_is_not_a_result_is_one_error_line(tiny, tmp_path, content):
    out = tmp_path / "study"
    assert CliRunner().invoke(app, ["study", str(tiny / "study.yaml"), "--out", str(out), "--slurm"]).exit_code == 0
    result = out / "evals/positional/seed-0/result.json"
    result.parent.mkdir(parents=True)
    result.write_text(content)
    line = cli_error(["study", tiny / "study.yaml", "--out", out, "--plan"])
    assert line.startswith(f"error: {result}: not a study result (") and "remove it to evaluate again" in line


def _copy_dataset(source: Path, target: Path, change: bool) -> Path:
    shutil.copytree(source, target)
    if change:  # one shard rewritten: its sha256 in the manifest changes
        manifest = json.loads((target / "manifest.json").read_text())
        manifest["created"] = "another time"
        (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_a_study_resumed_with_other_inputs_is_refused_and_moved_inputs_are_accepted(tiny, tmp_path):
    """The study's identity covers the content of its data, references and classifiers: `--set data=B` on a
    directory made with data A is refused (it would mix the two in one study.json); the same bytes elsewhere are
    the same study."""
    out = tmp_path / "study"
    assert CliRunner().invoke(app, ["study", str(tiny / "study.yaml"), "--out", str(out), "--slurm"]).exit_code == 0
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["inputs"]) == {"data", "demo_metrics", "evaluate"}
    assert set(plan["inputs"]["demo_metrics"]) == {"classifier", "reference"}
    moved = _copy_dataset(tiny / "data", tmp_path / "same-data", change=False)
    other = _copy_dataset(tiny / "data", tmp_path / "other-data", change=True)
    clf = tmp_path / "other-clf"
    shutil.copytree(tiny / "clf", clf)
    weights = next(p for p in clf.iterdir() if p.suffix == ".safetensors")
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    ok = CliRunner().invoke(
        app, ["study", str(tiny / "study.yaml"), "--out", str(out), "--plan", "--set", f"data={moved}"]
    )
    assert ok.exit_code == 0, ok.output
    for setting, changed in ((f"data={other}", "data"), (f"demo_metrics.classifier={clf}", "demo_metrics")):
        line = cli_error(["study", tiny / "study.yaml", "--out", out, "--plan", "--set", setting])
        assert f"{out} holds this study run with other inputs ({changed} differ from its plan.json)" in line
    line = cli_error(["study", tiny / "study.yaml", "--out", out, "--set", "data=/no/such/data"])
    assert line == f"error: {tiny / 'study.yaml'}: not found: data /no/such/data"


def test_a_plan_written_before_inputs_were_recorded_is_resumed_and_completed(tiny, tmp_path):
    out = tmp_path / "study"
    assert CliRunner().invoke(app, ["study", str(tiny / "study.yaml"), "--out", str(out), "--slurm"]).exit_code == 0
    plan = json.loads((out / "plan.json").read_text())
    (out / "plan.json").write_text(json.dumps({k: v for k, v in plan.items() if k != "inputs"}))
    assert CliRunner().invoke(app, ["study", str(tiny / "study.yaml"), "--out", str(out), "--slurm"]).exit_code == 0
    assert json.loads((out / "plan.json").read_text()) == plan


def test_one_study_process_per_directory_and_one_process_per_unit(tiny, tmp_path):
    from pipeline.study import study_lock
    from pipeline.study.runner import unit_lock

    out = tmp_path / "study"
    assert CliRunner().invoke(app, ["study", str(tiny / "study.yaml"), "--out", str(out), "--slurm"]).exit_code == 0
    unit = load_study(tiny / "study.yaml").units()[1]
    with study_lock(out):
        line = cli_error(["study", tiny / "study.yaml", "--out", out])
        assert line == f"error: {out}: another `diffit-pipe study` on this study directory is already running " + (
            "(its lock is held); wait for it to end"
        )
        with unit_lock(out, unit):
            line = cli_error(["study", tiny / "study.yaml", "--out", out, "--run-index", "1"])
            assert line.startswith(f"error: {out / 'locks/run-1'}: run 1 (runs/positional/seed-1) is already running")
    assert not (out / "runs").exists()


HOSTILE_OUT = "out dir; $(touch PWNED) `touch PWNED2` 'q' \"d\""


def test_generated_scripts_quote_every_value_and_run_only_what_they_say(tiny, tmp_path):
    """The array and aggregate scripts, executed with stub `srun` / `diffit-pipe` on PATH and a hostile --out and
    --set: each command receives exactly the words it was given, nothing else runs; control characters are
    refused."""
    out = tmp_path / HOSTILE_OUT
    setting = "evaluate.cache_dir=$(touch PWNED3)"
    result = CliRunner().invoke(
        app, ["study", str(tiny / "study.yaml"), "--out", str(out), "--set", setting, "--slurm"]
    )
    assert result.exit_code == 0, result.output
    stubs = tmp_path / "bin"
    stubs.mkdir()
    record = tmp_path / "calls"
    for name in ("srun", "diffit-pipe", "scontrol"):
        stub = stubs / name
        stub.write_text(f'#!/bin/bash\nprintf "%s\\0" "$(basename "$0")" "$@" >> {shlex_quote(str(record))}\n')
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_JOB_ID": "9"}
    for script in ("study.sbatch", "study-aggregate.sbatch"):
        assert subprocess.run(["bash", "-n", str(out / script)]).returncode == 0
        ran = subprocess.run(["bash", str(out / script)], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert ran.returncode == 0, ran.stderr
    words = record.read_text().split("\0")[:-1]
    base = ["study", str((tiny / "study.yaml").resolve()), "--out", str(out.resolve()), "--set", setting]
    assert words == ["srun", "diffit-pipe", *base, "--run-index", "3", "diffit-pipe", *base, "--aggregate-only"]
    assert not list(tmp_path.glob("PWNED*")) and not list(REPO.glob("PWNED*"))
    for bad_out in (tmp_path / "line\nbreak", tmp_path / "tab\tx"):
        line = cli_error(["study", tiny / "study.yaml", "--out", bad_out, "--slurm"])
        assert "a control character (newline, tab, ...) cannot go into a job script" in line


def shlex_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def test_hostile_study_files_stay_within_the_commands_baseline_memory(tiny, tmp_path):
    """In a fresh process measuring its peak RSS per case (`tests/support/hostile_probe.py`): an alias bomb of 9^9
    strings (shared references once parsed, but ~2.7 GB as the JSON of a plan or the text of an error), 10^9 variants
    and 1,000 seeds x 20 variants each cost at most 1.5x the baseline of `study --plan` on a valid study."""
    bomb = tiny / "deep-bomb.yaml"
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb.write_text("name: bomb\nbase: base.yaml\nseeds: [0]\n" + "\n".join(levels) + "\naxes: {x: {y: {}}}\n")
    axes = {f"a{i}": {f"v{j}": {"evaluate.guidance_scale": float(j)} for j in range(10)} for i in range(9)}
    huge = tiny / "huge-axes.yaml"
    huge.write_text(json.dumps({"name": "huge", "base": "base.yaml", "seeds": [0], "axes": axes}))
    many = tiny / "many-seeds.yaml"
    many.write_text(
        json.dumps(
            {
                "name": "many",
                "base": "base.yaml",
                "seeds": list(range(1000)),
                "axes": {"a0": axes["a0"], "b": {"x": {}, "y": {}}},
            }
        )
    )
    study = ["study", "--plan", "--out", str(tmp_path / "never")]
    cases = [{"id": "warm_up", "kind": "cli", "args": [study[0], str(tiny / "study.yaml"), *study[1:]]}]
    cases += [
        {"id": path.stem, "kind": "cli", "args": [study[0], str(path), *study[1:]]} for path in (bomb, huge, many)
    ]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    env = {**subprocess_env(1), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [
            PYTHON,
            str(REPO / "tests" / "support" / "hostile_probe.py"),
            str(tmp_path / "cases.json"),
            str(tmp_path / "out.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "out.json").read_text())
    assert results["warm_up"]["exit_code"] == 0, results["warm_up"]["stderr"][-2000:]
    expected = {
        "deep-bomb": "aliases (*name) are not accepted",
        "huge-axes": "the axes make at least 100000 variants",
        "many-seeds": "the axes make at least 20 variants; with its seeds a study may have at most 10000 evaluations",
    }
    for case, message in expected.items():
        outcome = results[case]
        lines = outcome["stderr"].splitlines()
        assert outcome["exit_code"] == 2 and len(lines) == 1 and message in lines[0], outcome
        assert outcome["peak_kib"] <= 1.5 * outcome["baseline_kib"], (
            case,
            outcome["peak_kib"],
            outcome["baseline_kib"],
        )
    assert not (tmp_path / "never").exists()


def test_plan_reports_the_seeds_power_asks_for_from_the_file_and_from_a_pilot(studies, tiny):
    """`--plan` on a finished study (a pilot): each comparison's measured difference and spread, and the seeds a
    paired test at Holm's first level needs to resolve it at 80% power; `power:` in the file gives the same
    arithmetic before any run (SD 2, difference 2, one comparison: effect size 1 -> 10 seeds)."""
    from pipeline.study.stats import seeds_for_power

    setting = "power={metric: FD_demo, expected_sd: 2, difference: 2}"
    result = CliRunner().invoke(
        app, ["study", str(tiny / "study.yaml"), "--out", str(studies[0]), "--plan", "--set", setting]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert (
        "power: to resolve a FD_demo difference of 2 with paired differences of SD 2 at 80% power (Holm over 1 "
        "comparisons): 10 seeds"
    ) in lines
    study = json.loads((studies[0] / "study.json").read_text())
    comparison = next(c for c in study["comparisons"] if c["metric"] == "FD_demo")
    needed = seeds_for_power(comparison["std_difference"], comparison["mean_difference"], 2)
    pilot = next(line for line in lines if line.startswith("pilot: FD_demo fourier - baseline = "))
    assert pilot.endswith(f"{needed} seeds resolve it at 80% power") and "2 seeds" in pilot
    line = cli_error(["study", tiny / "study.yaml", "--plan", "--set", "power={metric: FD_demo, expected_sd: -1}"])
    assert "power.expected_sd must be a positive number, got '-1'" in line


def test_old_evaluate_names_load_as_the_new_ones_and_an_old_plan_resumes(tiny, tmp_path, caplog):
    """`evaluate.cfg_scale` (and `set: {evaluate.cfg_scale}`, a variant's `evaluate.cfg_channels`) are read as
    `guidance_*` for one release, with a warning; a study directory whose plan.json was written with the old names
    (as before the rename) is the same study."""
    import logging

    old = edited(
        tiny,
        "  time_embedding:\n    positional: {model.kwargs.time_embedding: positional}\n"
        "    fourier: {model.kwargs.time_embedding: fourier}",
        "  cfg:\n    s1: {evaluate.cfg_scale: 1.0, evaluate.cfg_channels: 3}\n    s3: {evaluate.cfg_scale: 3.0}",
        claims=False,
    )
    new_text = old.read_text().replace("cfg_scale", "guidance_scale").replace("cfg_channels", "guidance_channels")
    new = tmp_path / "new.yaml"
    new.write_text(new_text.replace("base: base.yaml", f"base: {tiny / 'base.yaml'}"))
    with caplog.at_level(logging.WARNING):
        old_study = load_study(old, ["evaluate.cfg_power=3.0"])
    assert "evaluate.cfg_scale is deprecated, use evaluate.guidance_scale" in caplog.text
    assert "cfg_power is deprecated, use guidance_power" in caplog.text
    new_study = load_study(new, ["evaluate.guidance_power=3.0"])
    assert [v.evaluate for v in old_study.variants] == [v.evaluate for v in new_study.variants]
    assert old_study.variants[0].evaluate == {"guidance_scale": 1.0, "guidance_channels": 3}
    assert old_study.evaluate["guidance_power"] == 3.0
    out = tmp_path / "study"
    assert CliRunner().invoke(app, ["study", str(new), "--out", str(out), "--slurm"]).exit_code == 0
    plan = json.loads((out / "plan.json").read_text())
    text = json.dumps(plan)
    for name in ("scale", "channels", "power"):
        text = text.replace(f'"guidance_{name}"', f'"cfg_{name}"')  # the plan today's main wrote
    (out / "plan.json").write_text(text)
    result = CliRunner().invoke(app, ["study", str(new), "--out", str(out), "--plan"])
    assert result.exit_code == 0 and "0: runs/base/seed-0 [todo]" in result.output, result.output


# ---------------------------------------------------------------------------------------------------------------
# Autoguidance by the run's own earlier checkpoint (`evaluate.guide_step`)

GUIDE_AXES = (
    "  guidance:\n    cfg: {evaluate.guidance_scale: 2.0}\n"
    "    auto: {evaluate.guidance_scale: 2.0, evaluate.guide_step: 2}"
)
TIME_AXES = (
    "  time_embedding:\n    positional: {model.kwargs.time_embedding: positional}\n"
    "    fourier: {model.kwargs.time_embedding: fourier}"
)


def test_guide_step_guides_with_the_runs_own_milestone_checkpoint(tiny, tmp_path):
    """`evaluate.guide_step: 2` evaluates the final model guided by the EMA of the same run's step-2 checkpoint
    (exported once to guide-models/): the samples are `evaluate --guide-model` of that export, bit for bit, and
    differ from classifier-free guidance at the same scale."""
    from pipeline.evaluate import STORE_NAME, EvaluateOptions, SampleStore, run_evaluate

    study_file = edited(tiny, TIME_AXES, GUIDE_AXES, claims=False)
    out = tmp_path / "study"
    result = CliRunner().invoke(app, ["study", str(study_file), "--out", str(out), "--set", "seeds=[0]"])
    assert result.exit_code == 0, result.output
    guide = out / "guide-models" / "base" / "seed-0" / "step-0000002"
    assert json.loads((guide / "config.json").read_text())["train"]["step"] == 2
    auto = json.loads((out / "evals" / "auto" / "seed-0" / "metrics.json").read_text())
    weights = json.loads((guide / "config.json").read_text())
    assert auto["guide_model"]["path"] == str(guide) and weights["model"]["name"] == "DiffiT-UNet-Tiny"
    direct = tmp_path / "direct"
    run_evaluate(
        EvaluateOptions(
            out / "models" / "base" / "seed-0", direct, num_samples=8, batch_size=8, metrics=(), device="cpu",
            sampling={"steps": 2, "guidance_scale": 2.0}, guide_model=guide,
        )
    )  # fmt: skip
    stored = {
        name: SampleStore.open(path / STORE_NAME, mode="r").read_images(0, 8)
        for name, path in (("auto", out / "evals" / "auto" / "seed-0"), ("cfg", out / "evals" / "cfg" / "seed-0"))
    }
    np.testing.assert_array_equal(stored["auto"], SampleStore.open(direct / STORE_NAME, mode="r").read_images(0, 8))
    assert not np.array_equal(stored["auto"], stored["cfg"])


@pytest.mark.parametrize(
    "axes, message",
    [
        (GUIDE_AXES.replace("guide_step: 2", "guide_step: 3"), "evaluate.guide_step 3 must be a milestone"),
        (GUIDE_AXES.replace("guide_step: 2", "guide_step: 4"), "evaluate.guide_step 4 must be a milestone"),
        (GUIDE_AXES.replace("guide_step: 2", "guide_step: 0"), "evaluate.guide_step: a step >= 1, got 0"),
        (GUIDE_AXES.replace("guide_step: 2", "guide_step: 2, evaluate.guide_model: m"), "not both"),
    ],
)
def test_a_guide_step_that_is_no_kept_milestone_is_refused_at_plan(tiny, axes, message):
    line = cli_error(["study", edited(tiny, TIME_AXES, axes, claims=False), "--plan"])
    assert message in line
