"""bench/device_check.py runs end to end on the CPU with --quick and prints its one table (issue 16)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# (section, variant) of every row the CPU run must print; CUDA-only kernels have no CPU rows.
EXPECTED_ROWS = [
    ("tests", "pytest -m cuda"),
    ("attention", "SDPA default dispatch, bias as float mask (backend sdpa)"),
    ("attention", "FlexAttention, bias as score_mod, eager"),
    ("attention", "SDPA, no bias (ceiling)"),
    ("train", "DiffiT-Tiny/2 fwd+bwd"),
    ("train", "DiT-Tiny/2 fwd+bwd"),
    ("train", "DiffiT-Tiny/2 / DiT-Tiny/2 images/s"),
    ("vae", "SD-VAE encode float16"),
    ("vae", "SD-VAE encode bfloat16"),
    ("vae", "SD-VAE decode bfloat16"),
    ("sampling", "DiffiT-Tiny/2 DDIM-50, CFG 4.0 (one doubled batch per step)"),
    ("sampling", "50k samples DDPM-250 + CFG on 8 GPUs (projected)"),
]


@pytest.mark.slow
def test_device_check_quick_on_cpu_prints_every_row():
    result = subprocess.run(
        [sys.executable, "bench/device_check.py", "--device", "cpu", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("# device_check ") and "--device cpu --quick" in lines[0]
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == "| section | variant | batch | value | unit | notes |"
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[1:]]
    assert [(row[0], row[1]) for row in cells] == EXPECTED_ROWS, result.stdout
    for section, variant, _batch, value, unit, notes in cells:
        if section == "tests":
            assert "skipped" in value and "failed" not in value, value  # no CUDA here: every CUDA test skips
            continue
        assert float(value) > 0, (variant, value, notes)
        assert unit in ("ms", "images/s", "x", "hours"), unit
    assert "0 of 4 outputs not finite" in dict((r[1], r[5]) for r in cells)["SD-VAE encode bfloat16"]
    mfu_notes = [row[5] for row in cells if row[1].endswith("fwd+bwd")]
    assert all(note.startswith("MFU ") for note in mfu_notes)
