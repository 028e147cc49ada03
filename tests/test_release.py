"""The release: `python -m build` makes an sdist and, from it, a wheel; `twine check`
accepts both; the wheel, installed with its dependencies from the package index into a
fresh virtual environment, imports and runs a loss there. The version is stated once,
in pyproject.toml; CITATION.cff, the README's citation and CHANGELOG.md must agree with it.

The build and install test is slow (a fresh environment gets JAX from the index) and
needs the package index; it is skipped only when no package source pip is configured
with can be reached at all.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import time
import tomllib
import urllib.error
import urllib.request
import zipfile

import pytest


ROOT = pathlib.Path(__file__).parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
NAME = PROJECT["name"]
VERSION = PROJECT["version"]
#: The package's files, subpackages included, relative to it.
SOURCES = sorted(
    p.relative_to(ROOT / "src" / NAME).as_posix()
    for p in (ROOT / "src" / NAME).rglob("*")
    if p.suffix in {".py", ".typed"} and "__pycache__" not in p.parts
)


def test_the_version_is_stated_once():
    """pyproject.toml states the version; the package reads it from its metadata, and the
    files that repeat it (the citation metadata, the README's BibTeX, the changelog's
    latest release) agree with it and with each other."""
    assert "version" not in PROJECT.get("dynamic", [])
    init = (ROOT / "src" / NAME / "__init__.py").read_text(encoding="utf-8")
    assert re.search(r"^__version__ = importlib\.metadata\.version\(\"vploss\"\)$", init, re.M)

    citation = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    cff_version = re.search(r"^version:\s*\"?([^\"\s]+)\"?\s*$", citation, re.M)
    cff_date = re.search(r"^date-released:\s*\"?(\d{4}-\d{2}-\d{2})\"?\s*$", citation, re.M)
    assert cff_version and cff_date, "CITATION.cff states no version or no date-released"
    assert cff_version.group(1) == VERSION, (
        f"CITATION.cff's version is {cff_version.group(1)}, pyproject.toml's {VERSION}"
    )

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    bibtex_versions = re.findall(r"^\s*version\s*=\s*\{([^}]*)\},?$", readme, re.M)
    assert bibtex_versions == [VERSION], (
        f"README.md's citation has versions {bibtex_versions}, pyproject.toml {VERSION}"
    )

    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d{2}-\d{2}))?$", changelog, re.M)
    assert headings[:1] == [("Unreleased", "")], "CHANGELOG.md starts with ## [Unreleased]"
    latest = (VERSION, cff_date.group(1))
    assert headings[1:2] == [latest], (
        f"CHANGELOG.md's latest release is {headings[1:2]}; pyproject.toml's version and "
        f"CITATION.cff's date-released say {latest}"
    )


def _run(args, **kwargs):
    """Run a command, failing the test with its output if it fails."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=1200, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited with {result.returncode}:\n"
        f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    )
    return result.stdout + result.stderr


def _package_sources():
    """The index URLs and find-links pip is configured with, PyPI's index by default."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    sources, index = [], ["https://pypi.org/simple/"]
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        option = key.rpartition(".")[2]
        values = value.strip().strip("'\"").split()
        if option == "index-url":
            index = values
        elif option in {"extra-index-url", "find-links"}:
            sources += values
    return index + sources


def _reachable(source):
    """Whether a package source answers: a local path exists, a server responds."""
    if "://" not in source or source.startswith("file://"):
        return pathlib.Path(source.removeprefix("file://")).exists()
    try:
        urllib.request.urlopen(source, timeout=15).close()
    except urllib.error.HTTPError:
        return True  # the server answered
    except (urllib.error.URLError, OSError):
        return False
    return True


def _environment():
    """The caller's environment without what would make a subprocess see this checkout
    or the current virtual environment instead of its own."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PIP_USER"}
    return {key: value for key, value in os.environ.items() if key not in drop}


# Run in the fresh environment, from a directory outside the checkout.
SMOKE = """
import importlib.metadata, json, pathlib, sys

import equinox as eqx
import jax
import jax.numpy as jnp

import vploss

model = eqx.nn.MLP(2, 8, 8, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
x = jax.random.normal(jax.random.PRNGKey(1), (32, 2))
y = jnp.sin(x[:, 0]) * jnp.cos(x[:, 1])
loss_fn = lambda m: vploss.vploss_msereg(m, x, y, alpha2=1e-3)
(loss, readout), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
leaves = jax.tree_util.tree_leaves(eqx.filter(grads, eqx.is_inexact_array))
print(json.dumps({
    "prefix": str(pathlib.Path(sys.prefix).resolve()),
    "file": str(pathlib.Path(vploss.__file__).resolve()),
    "version": vploss.__version__,
    "metadata_version": importlib.metadata.version("vploss"),
    "typed": (pathlib.Path(vploss.__file__).parent / "py.typed").is_file(),
    "loss": float(loss),
    "grad_finite": all(bool(jnp.all(jnp.isfinite(g))) for g in leaves),
    "grad_norm": float(sum(jnp.sum(g**2) for g in leaves) ** 0.5),
    "readout_shape": list(readout.weight.shape),
}))
"""


@pytest.mark.slow
def test_the_wheel_installs_and_runs_in_a_fresh_environment(tmp_path):
    sources = _package_sources()
    if not any(_reachable(source) for source in sources):
        pytest.skip(f"no network: none of pip's package sources answers ({sources})")
    for tool in ("build", "twine"):
        assert subprocess.run([sys.executable, "-c", f"import {tool}"]).returncode == 0, (
            f"{tool} is missing: it is in the test extra, pip install -e '.[test]'"
        )
    env = _environment()
    times = {}

    # Without --sdist or --wheel, build makes the sdist and then the wheel from the sdist,
    # so a file the sdist leaves out that the wheel needs fails here.
    dist = tmp_path / "dist"
    start = time.perf_counter()
    log = _run([sys.executable, "-m", "build", "--outdir", dist, ROOT], cwd=ROOT, env=env)
    times["build"] = time.perf_counter() - start
    assert "Building wheel from sdist" in log, log
    sdist, wheel = dist / f"{NAME}-{VERSION}.tar.gz", dist / f"{NAME}-{VERSION}-py3-none-any.whl"
    assert sorted(dist.iterdir()) == sorted([sdist, wheel])

    # The sdist: what builds the wheel and runs the tests; no caches, environments,
    # figures or CI files.
    top = f"{NAME}-{VERSION}/"
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    assert all(name.startswith(top) or name + "/" == top for name in names), names
    names = {name.removeprefix(top) for name in names if name.startswith(top)}
    needed = {"pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "CITATION.cff"}
    needed |= {"PKG-INFO", "tests/test_release.py", "tests/conftest.py"}
    needed |= {f"src/{NAME}/{source}" for source in SOURCES}
    assert needed <= names, sorted(needed - names)
    unwanted = [
        name
        for name in names
        if name.split("/")[0] in {".git", ".github", ".ci", "site", "dist", "build", ".cache"}
        or "__pycache__" in name.split("/")
        or "venv" in name.split("/")[0]
        or name.endswith((".pyc", ".png", ".whl", ".tar.gz"))
    ]
    assert not unwanted, unwanted

    # The wheel: the package and its metadata only.
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    info = f"{NAME}-{VERSION}.dist-info/"
    assert {name for name in names if not name.startswith(info)} == {
        f"{NAME}/{source}" for source in SOURCES
    }
    assert f"{NAME}/py.typed" in names and f"{info}METADATA" in names

    log = _run([sys.executable, "-m", "twine", "check", "--strict", sdist, wheel], env=env)
    assert log.count("PASSED") == 2, log

    # A fresh environment, the wheel installed with its dependencies from the index.
    venv = tmp_path / "venv"
    start = time.perf_counter()
    _run([sys.executable, "-m", "venv", venv], env=env)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _run([python, "-m", "pip", "install", "--no-input", wheel], env=env, cwd=tmp_path)
    times["install"] = time.perf_counter() - start

    start = time.perf_counter()
    out = _run([python, "-I", "-c", SMOKE], env=env, cwd=tmp_path)
    times["smoke"] = time.perf_counter() - start
    report = json.loads(out.strip().splitlines()[-1])
    prefix = pathlib.Path(report["prefix"])
    assert prefix == venv.resolve(), report
    assert prefix in pathlib.Path(report["file"]).parents, report  # not this checkout
    assert report["version"] == report["metadata_version"] == VERSION, report
    assert report["typed"], report
    assert report["grad_finite"] and report["grad_norm"] > 0, report
    assert report["loss"] >= 0 and report["readout_shape"] == [1, 8], report
    print("seconds:", {stage: round(seconds, 1) for stage, seconds in times.items()})
