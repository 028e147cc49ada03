"""Every script in `examples/` runs end to end in its fast `--quick` mode in the slow run
(`python -m pytest -m slow`, part of CI); the default run checks the README's example up
to its command line (imports, definitions and argument parsing, with `--help`)."""

import os
import subprocess
import sys

import pytest

from .helpers import EXAMPLE_SCRIPTS as EXAMPLES


def _run(script, *args, timeout):
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_readme_example_parses_its_command_line():
    (script,) = [p for p in EXAMPLES if p.stem == "peaks_approximation"]
    result = _run(script, "--help", timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--quick" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_quick(script, tmp_path):
    result = _run(script, "--quick", "--out", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list(tmp_path.glob("*.png")), "the example saved no figure"
    # Without a terminal, no progress bars: the output is the summary.
    assert len(result.stdout) + len(result.stderr) < 20_000, "the output floods a log"
