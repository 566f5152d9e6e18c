"""The embedded default run as a benchmark: wall time per step and sample quality of `diffit-pipe demo`.

    python bench/demo.py                  # default run (~13-14 min on 2 cores), in a temporary directory
    python bench/demo.py --quick          # the ~3 minute variant the test suite runs
    python bench/demo.py --out runs/demo  # keep the outputs (grids, models) to look at

Prints a markdown section for docs/benchmarks.md (`bench/run_all.py` collects it): the time of each step, and
for both models the class / shape consistency of their samples next to the two classifiers' accuracy on
held-out real images and on their VAE reconstructions (the yardsticks). Target: the default run takes at most
15 minutes on 2 CPU cores and its samples look like the classes (the grids are for a person to check).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_demo(out: Path, quick: bool) -> dict:
    """Run the demo CLI in a subprocess (as a user would) and return its summary.json."""
    command = [sys.executable, "-m", "cli.main", "demo", "--out", str(out)] + (["--quick"] if quick else [])
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def section(summary: dict, wall_s: float) -> str:
    """Markdown: step timings and sample quality."""
    lines = [
        f"Machine: {platform.machine()}, {platform.system()}; date {time.strftime('%Y-%m-%d')}; "
        f"{'quick' if summary['quick'] else 'default'} run, wall time {wall_s / 60:.1f} min "
        f"(target: default <= 15 min, quick <= 3 min).",
        "",
        "| step | seconds |",
        "|---|---|",
    ]
    lines += [f"| {step} | {seconds:.1f} |" for step, seconds in summary["timings_s"].items()]
    lines += ["", "| yardstick | held-out real images | their VAE reconstructions |", "|---|---|---|"]
    for name in ("classifier", "shape_classifier"):
        entry = summary[name]
        lines.append(f"| {name} | {entry['holdout_acc']:.3f} | {entry['holdout_acc_on_vae_reconstructions']:.3f} |")
    lines += ["", "| model | samples | class consistency | shape consistency | grid |", "|---|---|---|---|---|"]
    for kind, entry in summary["evaluation"].items():
        lines.append(
            f"| {kind} | {entry['num_samples']} | {entry['class_consistency']:.2f} | "
            f"{entry['shape_consistency']:.2f} | `{Path(entry['grid']).name}` |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the ~3 minute variant")
    parser.add_argument("--out", type=Path, default=None, help="keep the outputs here (default: a temporary dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as scratch:
        out = args.out or Path(scratch) / "demo"
        start = time.perf_counter()
        summary = run_demo(out, args.quick)
        print(section(summary, time.perf_counter() - start))


if __name__ == "__main__":
    main()
