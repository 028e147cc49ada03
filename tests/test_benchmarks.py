"""The GPU check (`benchmarks/gpu_check.py`) runs in its tiny CPU version: every loss's
float32 accuracy row passes, and every `benchmarks/suite.py` cell is measured; the
second-order classification benchmark, the least-squares benchmark, the BLAS-threads
benchmark, the compile-time benchmark and the predictive-uncertainty benchmark run in
their quick modes."""

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
    assert [cell.split("`")[1] for cell in cells] == [
        "vploss_msereg",
        "vploss_bce",
        "vploss_ce",
        "vploss_bce, BudgetedNewtonCG",
        "vploss_ce, BudgetedNewtonCG",
    ]
    assert "accuracy passed" in output


@pytest.mark.slow
def test_ggn_classification_runs_quick(tmp_path):
    """The second-order classification benchmark, in its quick mode on the circle: every
    method runs, and the curves, summary and plot are written."""
    script = SCRIPT.parent / "ggn_classification.py"
    result = subprocess.run(
        [sys.executable, str(script), "circle", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = {path.suffix for path in tmp_path.iterdir()}
    assert {".json", ".csv", ".png"} <= written, written


@pytest.mark.slow
def test_least_squares_benchmark_runs_quick():
    script = SCRIPT.parent / "least_squares.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for table in ("Step cost, varpro / nlls", "Lowest median test error"):
        assert table in result.stdout, result.stdout[-3000:]


@pytest.mark.slow
def test_blas_threads_benchmark_runs_quick():
    """The BLAS-threads benchmark in its quick mode: four configurations, each path's
    row with both ratios and its LAPACK calls (the ridge default's only `potrf` and
    `trsm`, the SVD solver's `gesdd`)."""
    script = SCRIPT.parent / "blas_threads.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = {
        line.split("`")[1]: line.split(" | ")
        for line in result.stdout.splitlines()
        if line.startswith("| `")
    }
    assert len(rows) >= 14, result.stdout
    assert all(len(cells) == 9 for cells in rows.values()), result.stdout
    assert rows["vploss_msereg (default: cholesky)"][-1].strip(" |") == "spotrf, strsm"
    assert rows['vploss_msereg solver="svd"'][-1].strip(" |") == "sgesdd"
    assert "libscipy_openblas" in result.stdout


@pytest.mark.slow
def test_compile_time_benchmark_runs_quick():
    """The compile-time benchmark in its quick mode: a row for each of its 16 steps, each
    in a fresh process, with its ratio to the plain step of its task (1.00 for the five
    plain steps)."""
    script = SCRIPT.parent / "compile_time.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [
        line.split(" | ")
        for line in result.stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| task")
    ]
    assert len(rows) == 16, result.stdout
    plain = [cells for cells in rows if "plain" in cells[1]]
    assert len(plain) == 5 and all(cells[3] == "1.00" for cells in plain), result.stdout


@pytest.mark.slow
def test_uncertainty_runs_quick():
    """The predictive-uncertainty benchmark in its quick mode: both parts run and state
    their goals."""
    script = SCRIPT.parent / "uncertainty.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "coverage (%), noise=validation" in result.stdout
    assert "Laplace, prior tuned (validation), probit" in result.stdout
    assert result.stdout.count("goal") >= 4
