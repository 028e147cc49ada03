"""The GPU check (`benchmarks/gpu_check.py`) runs in its tiny CPU version: every loss's
float32 accuracy row passes, and every `benchmarks/suite.py` cell is measured."""

import pathlib
import subprocess
import sys

import pytest


SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
LOSSES = (
    "vploss_msereg",
    "vpresidual_msereg",
    "vploss_bce",
    "vploss_ce",
    "vploss_poisson",
    "vploss_cpflow",
)


@pytest.mark.slow
def test_gpu_check_runs_tiny_on_a_cpu():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny"], capture_output=True, text=True, timeout=600
    )
    output = result.stdout
    assert result.returncode == 0, output[-3000:] + result.stderr[-3000:]
    accuracy, costs = output.split("### Step cost")
    rows = [line for line in accuracy.splitlines() if line.startswith("| `")]
    assert {row.split("`")[1].split(" (")[0] for row in rows} == set(LOSSES)
    assert all(row.endswith("| yes |") for row in rows), accuracy
    cells = [line for line in costs.splitlines() if line.startswith("| `")]
    assert [cell.split("`")[1] for cell in cells] == ["vploss_msereg", "vploss_bce", "vploss_ce"]
    assert "accuracy passed" in output
