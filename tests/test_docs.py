"""The documentation covers the public API, and each example notebook is its script.

Every public name of `vploss` must be rendered by a `::: vploss.NAME` directive of the
API reference. Every script in `examples/` is a jupytext "percent" script whose stored,
executed notebook in `docs/examples/` has the same cells, so the notebook shown in the
documentation is the code `test_examples.py` runs. Neither check needs mkdocs or
jupytext. After editing a script, regenerate and execute its notebook at full size:

    TQDM_DISABLE=1 jupytext --to ipynb --set-kernel python3 --execute --run-path examples \
        -o docs/examples/NAME.ipynb examples/NAME.py

(with `MPLBACKEND` unset, so that figures show inline; the figures the scripts save in
`examples/` are not kept).
"""

import json
import pathlib
import re
import types

import pytest

import vploss

from .helpers import EXAMPLE_SCRIPTS


ROOT = pathlib.Path(__file__).parent.parent
EXAMPLES = EXAMPLE_SCRIPTS


def _public_names():
    return sorted(
        name
        for name, value in vars(vploss).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    )


def test_every_public_name_is_in_the_api_reference():
    text = "\n".join(p.read_text() for p in sorted((ROOT / "docs" / "api").glob("*.md")))
    documented = set(re.findall(r"^::: vploss\.(\w+)", text, flags=re.MULTILINE))
    missing = [name for name in _public_names() if name not in documented]
    assert not missing, f"public names missing from docs/api/*.md: {missing}"
    unknown = sorted(documented - set(_public_names()))
    assert not unknown, f"docs/api/*.md documents names vploss does not export: {unknown}"


def percent_cells(text):
    """The cells of a jupytext percent script as `(kind, source)` pairs, as jupytext
    writes them to a notebook: markdown cells without their `# ` comment prefix, blank
    lines around each cell dropped."""
    parts = re.split(r"^# %%(.*)\n", text, flags=re.MULTILINE)
    assert not parts[0].strip(), "the script must start with a `# %%` cell marker"
    cells = []
    for header, body in zip(parts[1::2], parts[2::2], strict=True):
        kind = "markdown" if "[markdown]" in header else "code"
        lines = body.strip("\n").split("\n")
        if kind == "markdown":
            lines = [
                line[2:] if line.startswith("# ") else line.removeprefix("#") for line in lines
            ]
        cells.append((kind, "\n".join(lines).strip("\n")))
    return cells


def test_percent_parser_reads_markdown_and_code():
    text = "# %% [markdown]\n# # Title\n#\n# $x$\n\n# %%\nx = 1\n\n\n# %%\ny = 2\n"
    assert percent_cells(text) == [
        ("markdown", "# Title\n\n$x$"),
        ("code", "x = 1"),
        ("code", "y = 2"),
    ]


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_notebook_matches_its_script(script):
    notebook_path = ROOT / "docs" / "examples" / f"{script.stem}.ipynb"
    assert notebook_path.exists(), f"{notebook_path.name} is missing from docs/examples/"
    notebook = json.loads(notebook_path.read_text())
    stored = [(cell["cell_type"], "".join(cell["source"])) for cell in notebook["cells"]]
    assert stored == percent_cells(script.read_text()), (
        f"docs/examples/{notebook_path.name} differs from examples/{script.name}: regenerate it"
    )
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(cell["execution_count"] is not None for cell in code), "stored unexecuted"
    assert any(cell["outputs"] for cell in code), "stored without outputs"
