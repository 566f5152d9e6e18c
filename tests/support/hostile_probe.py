"""Run model-file cases in one fresh process and measure each one's peak memory (used by the hostile-input tests:
tests/diffit/test_hostile_files.py, tests/encode/test_hostile_sources.py, tests/study/test_stage.py).

    python tests/support/hostile_probe.py CASES.json RESULTS.json

CASES.json: a list of {"id", "kind": "cli" | "library" | "allocate", "args"}: "cli" runs `diffit-pipe ARGS` (the
typer app, as the console script does), "library" calls `diffit.load_pretrained(ARGS[0])`, "allocate" builds
`diffit.create_model(ARGS[0])` (the control that shows the meter sees an allocation). The first case is a warm-up
run before the baseline is taken, so that what a command imports lazily is part of the baseline.

Per case: exit code (or exception type and message), what it wrote to stderr (file descriptor 2, so logging and
click's output alike), and the peak resident memory (VmHWM, reset before each case through
/proc/self/clear_refs) next to the baseline (VmRSS after the imports and the warm-up). RLIMIT_AS is set a few GiB
above the baseline's address space as a safety net: a regression fails fast instead of swapping a shared machine.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import tempfile
import traceback

SAFETY_NET_BYTES = 6 * 2**30


def status_kib(key: str) -> int:
    """A /proc/self/status memory field in KiB."""
    with open("/proc/self/status") as handle:
        return int(re.search(rf"^{key}:\s+(\d+) kB", handle.read(), re.MULTILINE).group(1))


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def run_case(case: dict) -> dict:
    """Run one case; its outcome without its stderr."""
    import diffit
    from cli.main import app

    kind, args = case["kind"], case["args"]
    try:
        if kind == "cli":
            try:
                app(args, prog_name="diffit-pipe")
            except SystemExit as stop:
                return {"exit_code": stop.code if isinstance(stop.code, int) else 1}
            return {"exit_code": 0}
        if kind == "library":
            diffit.load_pretrained(args[0])
        elif kind == "allocate":
            diffit.create_model(args[0])
        return {"exit_code": 0}
    except Exception as error:  # noqa: BLE001 - recorded for the test to judge
        return {"exception": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}


def run_captured(case: dict) -> dict:
    """`run_case` with file descriptor 2 redirected to a temporary file."""
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            outcome = run_case(case)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        outcome["stderr"] = capture.read().decode("utf-8", "replace")
    return outcome


def main() -> None:
    cases_path, results_path = sys.argv[1], sys.argv[2]
    with open(cases_path) as handle:
        cases = json.load(handle)
    import diffit  # noqa: F401 - the imports are part of the baseline
    import pipeline.train.released  # noqa: F401
    from cli.main import app  # noqa: F401

    warm_up = run_captured(cases[0])
    baseline = status_kib("VmRSS")
    resource.setrlimit(resource.RLIMIT_AS, (status_kib("VmSize") * 1024 + SAFETY_NET_BYTES,) * 2)
    results = {cases[0]["id"]: {**warm_up, "baseline_kib": baseline, "peak_kib": None}}
    for case in cases[1:]:
        reset_peak()
        outcome = run_captured(case)
        results[case["id"]] = {**outcome, "baseline_kib": baseline, "peak_kib": status_kib("VmHWM")}
    with open(results_path, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
