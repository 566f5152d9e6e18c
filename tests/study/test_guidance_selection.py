"""Each variant at its own best guidance scale (`guidance_selection`): the leave-one-seed-out rule on hand cases,
that it removes the bias of choosing on the compared seeds, the file's checks, and a tiny study end to end whose
study.json reads every (variant, seed) at the scale chosen on the other seeds."""

# ruff: noqa: F811  (the `tiny` fixture of test_stage.py, imported, is every test's parameter)

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from pipeline.study import StudyError, load_study
from pipeline.study.guidance_selection import best_scale, leave_one_seed_out, sweep_summary
from tests.study.test_stage import TIME_AXES, cli_error, edited, tiny  # noqa: F401  (tiny: the fixture)
from tests.support.train_fixtures import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

# Hand case: seeds 0, 1, 2 at scales 1 and 2 (lower is better).
#   seed 0 -> others 1, 2: scale 1 (6 + 5) / 2 = 5.5, scale 2 (7 + 5.5) / 2 = 6.25  -> 1
#   seed 1 -> others 0, 2: scale 1 (4 + 5) / 2 = 4.5, scale 2 (3 + 5.5) / 2 = 4.25  -> 2
#   seed 2 -> others 0, 1: scale 1 (4 + 6) / 2 = 5.0, scale 2 (3 + 7) / 2 = 5.0    -> 1 (a tie: the smaller scale)
HAND = {1.0: {0: 4.0, 1: 6.0, 2: 5.0}, 2.0: {0: 3.0, 1: 7.0, 2: 5.5}}


def test_each_seed_gets_the_scale_best_on_the_other_seeds():
    assert leave_one_seed_out(HAND, lower_is_better=True) == {0: 1.0, 1: 2.0, 2: 1.0}
    # Higher is better: seed 0 -> 5.5 < 6.25 -> 2; seed 1 -> 4.5 > 4.25 -> 1; seed 2 -> tie -> 1.
    assert leave_one_seed_out(HAND, lower_is_better=False) == {0: 2.0, 1: 1.0, 2: 1.0}
    assert best_scale({3.0: 1.0, 1.0: 1.0, 2.0: 2.0}, lower_is_better=True) == 1.0


def test_the_summary_reports_each_scale_the_choices_and_the_in_sample_best():
    summary = sweep_summary({"scales": [1.0, 2.0], "metric": "FD_demo", "rule": "leave-one-seed-out"},
                            {"a": HAND}, lower_is_better=True)  # fmt: skip
    entry = summary["per_variant"]["a"]
    assert entry["chosen_scale"] == {"0": 1.0, "1": 2.0, "2": 1.0}
    assert entry["by_scale"]["1"]["mean"] == pytest.approx(5.0) and entry["by_scale"]["2"]["mean"] == pytest.approx(
        15.5 / 3
    )
    assert entry["best_in_sample"] == 1.0 and summary["lower_is_better"] is True


def test_choosing_on_held_out_seeds_removes_the_bias_of_choosing_on_the_compared_ones():
    """Five scales that are all the same (pure noise, mean 0): picking the scale best on the same seeds that are
    then reported makes a variant look better than it is (by ~0.5 sd of a 6-seed mean here); the held-out choice
    reports an unbiased value. Fails if the rule looks at the seed it scores."""
    rng = np.random.default_rng(0)
    held_out, in_sample = [], []
    for _ in range(2000):
        noise = rng.standard_normal((5, 6))
        by_scale = {float(k): {seed: float(noise[k, seed]) for seed in range(6)} for k in range(5)}
        chosen = leave_one_seed_out(by_scale, lower_is_better=True)
        held_out.append(np.mean([by_scale[chosen[seed]][seed] for seed in range(6)]))
        in_sample.append(noise.mean(axis=1).min())
    assert abs(np.mean(held_out)) < 0.02  # the mean of 2000 means of sd ~0.41: se ~0.009
    assert np.mean(in_sample) < -0.45  # E[min of 5 N(0, 1/6)] = -1.163 / sqrt(6) = -0.475


SWEEP = "guidance_selection: {scales: [1, 2], metric: FD_demo}\n"
EVALUATE = "evaluate: {num_samples: 8, batch_size: 8, steps: 2, metrics: []}"
EVALUATE_AT_2 = "evaluate: {num_samples: 8, batch_size: 8, steps: 2, metrics: [], guidance_scale: 2}"
INTERVAL_AXES = (
    "  guidance:\n    everywhere: {}\n    interval: {evaluate.guidance_interval: [0.0, 1.0]}"
)  # fmt: skip


def sweep_study(tiny, sweep: str = SWEEP, evaluate: str = EVALUATE_AT_2, axes: str = INTERVAL_AXES):
    path = edited(tiny, TIME_AXES, axes, claims=False)
    text = path.read_text().replace(EVALUATE, evaluate) + sweep
    path.write_text(text)
    return path


def test_the_sweep_evaluates_every_variant_and_seed_at_every_scale(tiny):
    study = load_study(sweep_study(tiny))
    (first, second) = study.units()
    assert [(e.out_dir, e.guidance_scale) for e in first.evaluations] == [
        ("evals/everywhere/guidance-1/seed-0", 1.0),
        ("evals/everywhere/guidance-2/seed-0", 2.0),
        ("evals/interval/guidance-1/seed-0", 1.0),
        ("evals/interval/guidance-2/seed-0", 2.0),
    ]
    assert study.evaluation_settings(first.evaluations[2])["guidance_scale"] == 1.0
    assert study.evaluation_settings(first.evaluations[2])["guidance_interval"] == [0.0, 1.0]
    assert [study.shown(e) for e in first.evaluations] == [False, True, False, True]
    assert study.describe()["guidance_selection"] == {
        "scales": [1.0, 2.0],
        "metric": "FD_demo",
        "rule": "leave-one-seed-out",
    }


def test_a_plan_without_a_sweep_has_no_sweep_keys(tiny):
    # plan.json identifies a study: one without a sweep must not gain keys, or the directories of studies run
    # before sweeps existed would not resume.
    described = load_study(tiny / "study.yaml").describe()
    assert "guidance_selection" not in described
    assert all(set(e) == {"variant", "seed", "out_dir"} for u in described["units"] for e in u["evaluations"])


@pytest.mark.parametrize(
    "sweep, evaluate, message",
    [
        ("guidance_selection: {scales: [2], metric: FD_demo}\n", EVALUATE_AT_2, "scales must be a list of 2 to 32"),
        ("guidance_selection: {scales: [1, 1], metric: FD_demo}\n", EVALUATE_AT_2, "scales repeat"),
        ("guidance_selection: {scales: [1, -2], metric: FD_demo}\n", EVALUATE_AT_2, "a scale must be a number in"),
        ("guidance_selection: {scales: [1, 2]}\n", EVALUATE_AT_2, "metric must name the metric"),
        ("guidance_selection: {scales: [1, 2], metric: FD_demo, rule: best}\n", EVALUATE_AT_2, "rule must be one of"),
        ("guidance_selection: {scales: [1, 2], metric: x, seed: 1}\n", EVALUATE_AT_2, "unknown key 'seed'"),
        (SWEEP, EVALUATE, "evaluate.guidance_scale (the scale of the curve and the sample grids) must be one of"),
        (SWEEP.replace("[1, 2]", "[1, 3]"), EVALUATE_AT_2, "must be one of the scales [1.0, 3.0], got 2"),
    ],
)
def test_a_bad_sweep_is_one_error_line_at_plan(tiny, sweep, evaluate, message):
    line = cli_error(["study", sweep_study(tiny, sweep, evaluate), "--plan"])
    assert "guidance_selection: " in line and message in line


def test_a_sweep_needs_two_seeds_and_variants_that_leave_the_scale_to_it(tiny):
    path = sweep_study(tiny)
    path.write_text(path.read_text().replace("seeds: [0, 1]", "seeds: [0]"))
    with pytest.raises(StudyError, match="needs at least 2 seeds"):
        load_study(path)
    axes = "  guidance:\n    a: {}\n    b: {evaluate.guidance_scale: 3.0}"
    with pytest.raises(StudyError, match="variant 'b' sets evaluate.guidance_scale; the sweep chooses it"):
        load_study(sweep_study(tiny, axes=axes))


def test_study_json_reads_each_seed_at_the_scale_chosen_on_the_other_seed(tiny, tmp_path):
    """End to end (2 trainings shared by two evaluate-only variants, 8 evaluations): every value of the table is
    the evaluation at the scale best on the other seed, the sweep is reported, the curve and grids use the shown
    scale only, and the page has the sweep's section."""
    out = tmp_path / "study"
    result = CliRunner().invoke(app, ["study", str(sweep_study(tiny)), "--out", str(out)])
    assert result.exit_code == 0, result.output[-3000:]
    study = json.loads((out / "study.json").read_text())
    measured = {
        (variant, scale, seed): json.loads((out / f"evals/{variant}/guidance-{scale}/seed-{seed}/result.json").read_text())  # noqa: E501
        for variant in ("everywhere", "interval") for scale in (1, 2) for seed in (0, 1)
    }  # fmt: skip
    selection = study["guidance_selection"]
    for variant in ("everywhere", "interval"):
        fd = {s: {seed: measured[(variant, s, seed)]["metrics"]["FD_demo"] for seed in (0, 1)} for s in (1, 2)}
        # With two seeds, seed 0's scale is the one with the lower FD_demo on seed 1, and the reverse.
        expected = {0: 1 if fd[1][1] <= fd[2][1] else 2, 1: 1 if fd[1][0] <= fd[2][0] else 2}
        assert selection["per_variant"][variant]["chosen_scale"] == {str(k): float(v) for k, v in expected.items()}
        for row in (r for r in study["table"] if r["variant"] == variant):
            assert row["values"] == {
                str(seed): measured[(variant, expected[seed], seed)]["metrics"][row["metric"]] for seed in (0, 1)
            }
    assert (
        study["cost"]["interval"]["guidance_scale"]
        == study["budget"]["guidance_scale"]
        == "chosen per seed (guidance_selection)"
    )
    # The curve's points and the grids: the shown scale (evaluate.guidance_scale 2) only.
    assert sorted(p.parents[2].name for p in out.glob("curve-evals/*/seed-*/step-*/result.json")) == [
        "everywhere", "everywhere", "interval", "interval"
    ]  # fmt: skip
    final = study["curves"]["everywhere"]["FD_demo @ 4 samples"]
    points = [measured[("everywhere", 2, seed)]["curve_point"]["metrics"]["FD_demo"] for seed in (0, 1)]
    assert final["mean"][-1] == pytest.approx(sum(points) / 2)
    page = (out / "study.html").read_text()
    assert 'id="guidance"' in page and "chosen on the others" in page
    # bench/study_tables.py regenerates the docs' tables from study.json alone, the sweep and its choices included.
    import subprocess
    import sys

    tables = subprocess.run(
        [sys.executable, "bench/study_tables.py", str(out / "study.json")],
        capture_output=True, text=True, check=True, cwd=REPO,
    ).stdout  # fmt: skip
    chosen = selection["per_variant"]["interval"]["chosen_scale"]
    assert "| interval | " in tables and f"0: {chosen['0']:g}, 1: {chosen['1']:g} |" in tables
    fd_row = next(r for r in study["table"] if r["metric"] == "FD_demo" and r["variant"] == "interval")
    assert f"| FD_demo (lower is better) | interval | {fd_row['mean']:.3g} ± " in tables
    assert "guidance chosen per seed (guidance_selection)" in tables
