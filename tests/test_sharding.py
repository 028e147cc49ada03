"""Data parallelism: every loss on a batch sharded over 4 devices gives the unsharded
loss and gradients, reduces across devices with all-reduce, and never holds the whole
batch on one device. The cases run in one subprocess (`tests/sharded_losses.py`),
since the number of host devices is fixed when JAX starts."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from .helpers import READOUT_CASES


ROOT = pathlib.Path(__file__).parent.parent
SHARDED = [
    "vploss_msereg",
    "vploss_msereg cholesky alpha2=0",
    *(case.function.__name__ for case in READOUT_CASES.values()),
    "vploss_cpflow",
]


# A subprocess with four CPU devices compiles every loss sharded: slow-marked.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run():
    # Kept: other XLA flags of the run (e.g. `--xla_cpu_max_isa`).
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    env = dict(os.environ, XLA_FLAGS=flags.strip())
    done = subprocess.run(
        [sys.executable, "-m", "tests.sharded_losses"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    return {r["name"]: r for r in records}, done.stderr


@pytest.mark.parametrize("name", SHARDED)
def test_sharded_equals_unsharded_without_gathering_the_batch(run, name):
    records, _ = run
    record = records[name]
    assert record["difference"] <= 1e-10
    assert record["collectives"] == ["all-reduce"]
    assert record["full_batch_shapes"] == []


def test_no_involuntary_rematerialisation(run):
    _, stderr = run
    assert "Involuntary full rematerialization" not in stderr


def test_dual_ridge_solver_gathers_the_batch(run):
    """The kernel form couples all samples: documented as not for sharded batches. This
    also shows that the checks above can fail."""
    records, _ = run
    record = records["vploss_msereg dual"]
    assert record["difference"] <= 1e-10
    assert "all-gather" in record["collectives"]
    # The kernel of the centred rows over all 96 samples (the intercept's row apart).
    kernels = ("f64[96,96]", "f64[96,97]", "f64[97,97]")
    assert any(shape in record["full_batch_shapes"] for shape in kernels)
