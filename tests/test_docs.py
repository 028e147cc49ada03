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

import ast
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


# Control characters other than the newline: a TAB, form feed, BEL or backspace in a
# source file is almost always a LaTeX command eaten by a non-raw string ("\theta",
# "\frac", "\alpha", "\beta"), which the rendered documentation then shows.
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".cff", ".ipynb", ".js", ".txt", ""}


def _tracked_text_files():
    skip = {".git", ".venv", "venv", "build", "dist", "site", "__pycache__", ".pytest_cache"}
    for path in sorted(ROOT.rglob("*")):
        parts = set(path.relative_to(ROOT).parts)
        if path.is_file() and not parts & skip and not any(p.endswith(".egg-info") for p in parts):
            if path.suffix in TEXT_SUFFIXES and path.name != "LICENSE":
                yield path


def test_no_control_characters_in_text_files():
    found = []
    for path in _tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.split("\n"), start=1):
            if match := CONTROL.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {match.group()!r} in {line!r}")
    assert not found, "control characters (write LaTeX in r-strings):\n" + "\n".join(found)


def _docstrings(path):
    """`(name, literal source, value)` of the module's, classes' and functions' docstrings."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    nodes = [tree] + [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    for node in nodes:
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            if isinstance(body[0].value.value, str):
                name = getattr(node, "name", "<module>")
                literal = ast.get_source_segment(source, body[0].value)
                yield f"{path.name}:{body[0].lineno} {name}", literal, body[0].value.value


def _maths_problems(doc):
    """Unbalanced `$`/`$$` delimiters in a docstring, outside code."""
    text = re.sub(r"```.*?```", "CODE", doc, flags=re.DOTALL)  # fenced code blocks
    text = re.sub(r"`[^`\n]*`", "CODE", text)  # inline code
    text = text.replace(r"\$", "")
    problems = []
    if text.count("$$") % 2:
        problems.append("odd number of `$$`")
    inline = re.sub(r"\$\$.*?\$\$", "", text, flags=re.DOTALL)
    for paragraph in inline.split("\n\n"):
        if paragraph.count("$") % 2:
            problems.append(f"odd number of `$` in {paragraph.strip()[:60]!r}")
    return problems


SOURCES = sorted((ROOT / "src" / "vploss").rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT / "src")) for p in SOURCES])
def test_docstring_maths_renders(path):
    """Every docstring (all of them: the API reference renders public ones, and private
    classes become public): a docstring with a backslash is a raw string, it holds no
    control character, and its `$...$` and `$$...$$` delimiters are balanced."""
    problems = []
    for name, literal, value in _docstrings(path):
        prefix = re.match(r"[a-zA-Z]*", literal).group().lower()
        if "\\" in literal and "r" not in prefix:
            problems.append(f"{name}: has a backslash but is not a raw string")
        if CONTROL.search(value):
            problems.append(f"{name}: control character {CONTROL.search(value).group()!r}")
        problems.extend(f"{name}: {p}" for p in _maths_problems(value))
    assert not problems, "\n".join(problems)


def test_the_docstring_checks_catch_eaten_latex():
    """The checks above, on the kind of mistake they exist for."""
    eaten = "The step $\x09heta \x0crac12 \x07lpha$."  # "\\theta \\frac12 \\alpha", eaten
    assert CONTROL.search(eaten)
    assert _maths_problems("a $x$ and $y") and _maths_problems("$$x$")
    assert not _maths_problems("a $x$, `$` and\n\n$$\\frac12$$ $[$`f(x)`$, 1]$ \\$5")


def _readout_loss_names():
    """`{name: function name}` for every readout loss in the registry `READOUT_LOSSES`:
    its `vploss_*` function's name and its class's name, both mapped to the function's."""
    from vploss._readout_losses.registry import READOUT_LOSSES

    names = {}
    for function, make_loss in READOUT_LOSSES.items():
        names[function.__name__] = function.__name__
        names[type(make_loss(2)).__name__] = function.__name__
    return names


# A list of names in backquotes, e.g. "`vploss_bce`, `vploss_ce` and `vploss_poisson`",
# "[`vploss_bce`](losses/bce.md) or the softmax `vploss.vploss_ce`" or
# "`vploss.SigmoidBinaryCrossEntropy()`,\n    `vploss.SoftmaxCrossEntropy(num_classes=K)`":
# items separated by a comma, "and" or "or", and at most three words.
_ITEM = r"\[?`(?:vploss\.)?(\w+)(?:\([^`]*\))?`(?:\]\([^)\s]*\))?"
_LIST = re.compile(_ITEM + r"(?:(?:,|,?\s+and|,?\s+or)\s+(?:[A-Za-z-]+\s+){0,3}" + _ITEM + r")+")
# The lists of the readout losses, which name every one: the section "Readout loss
# functions" of the API page of the losses, the classes' API page, and the README's
# features.
_CANONICAL_LOSS_LISTS = {
    "docs/api/losses.md": "functions",
    "docs/api/readout_losses.md": "classes",
    "README.md": "functions",
}
# Lists that name some readout losses on purpose: pages of measurements of those losses.
_PARTIAL_LOSS_LISTS = {
    ("docs/benchmark_suite.md", "`vploss_bce` and\n`vploss_ce`"),
    ("docs/benchmarks.md", "`vploss_bce`, `vploss_ce`"),
    ("docs/outer_second_order.md", "`vploss_bce` and `vploss_ce`"),
}


def _partial_loss_lists(text, names):
    """`(missing function names, list's text)` for each list in `text` that names two or
    more readout losses (by function or class name, `names` as `_readout_loss_names`)
    but not all of them."""
    every = set(names.values())
    for match in _LIST.finditer(text):
        named = {names[item] for item in re.findall(_ITEM, match.group()) if item in names}
        if len(named) >= 2 and named != every:
            yield sorted(every - named), match.group()


def _canonical_list(where, kind):
    """The names that the canonical list of `where` holds."""
    text = (ROOT / where).read_text(encoding="utf-8")
    if where == "docs/api/losses.md":
        text = text[text.index("## Readout loss functions") :]
        text = text[: text.find("\n## ") if "\n## " in text else len(text)]
    if where == "README.md":
        return set(re.findall(r"^\s*- `(vploss_\w+)`:", text, flags=re.MULTILINE))
    return set(re.findall(r"^::: vploss\.(\w+)", text, flags=re.MULTILINE))


def test_the_lists_of_the_readout_losses_name_them_all():
    """The lists of the readout losses (`_CANONICAL_LOSS_LISTS`) name every loss of the
    registry `READOUT_LOSSES`: a new loss is one module, one line of the registry, and
    its entries there."""
    names = _readout_loss_names()
    missing = []
    for where, kind in _CANONICAL_LOSS_LISTS.items():
        wanted = {n for n, f in names.items() if (n == f) == (kind == "functions")}
        if lacks := sorted(wanted - _canonical_list(where, kind)):
            missing.append(f"{where} lacks {lacks}")
    assert not missing, "\n".join(missing)


def test_no_other_list_of_the_readout_losses_is_partial():
    """Any other page or docstring that lists two or more readout losses, by function or
    by class name, names every one in the registry (`READOUT_LOSSES`), so that a new loss
    cannot be left out of it. Prose that does not list them (e.g. "the `vploss_*`
    function of every readout loss, listed on the page Losses") needs no edit."""
    names = _readout_loss_names()
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *SOURCES]
    incomplete = []
    for path in paths:
        where = str(path.relative_to(ROOT))
        for lacks, text in _partial_loss_lists(path.read_text(encoding="utf-8"), names):
            if (where, text) not in _PARTIAL_LOSS_LISTS:
                incomplete.append(f"{where}: {text!r} lacks {lacks}")
    assert not incomplete, "\n".join(incomplete)


def test_the_list_checks_catch_a_partial_list():
    """The checks above, on small strings."""
    names = {"vploss_a": "vploss_a", "A": "vploss_a", "vploss_b": "vploss_b", "B": "vploss_b"}
    names |= {"vploss_c": "vploss_c", "C": "vploss_c"}
    partial = [
        "`x`, `vploss_a` or the loss `vploss.vploss_b`",
        "[`vploss_a`](a.md), [`vploss_b`](b.md)",
        "(`vploss.A()`,\n    `vploss.B(num_classes=K)`, any other)",
        "`vploss_a`, `B` and `x`",
    ]
    for text in partial:
        assert [lacks for lacks, _ in _partial_loss_lists(text, names)] == [["vploss_c"]], text
    whole = "`vploss_a`, `B()` and `vploss.vploss_c`; `vploss_a` then, much later, `vploss_b`"
    assert not list(_partial_loss_lists(whole, names))
    assert not list(_partial_loss_lists("the `vploss_*` function of each loss", names))
    assert {n for n, f in _readout_loss_names().items() if n != f} >= {"SoftmaxCrossEntropy"}


def test_every_list_of_solver_names_names_them_all():
    """The pages and docstrings that list the solver names of a family name every entry
    of its table (`solver="..."` is resolved there)."""
    from vploss._readout_losses.solvers import _SOLVERS
    from vploss._ridge.loss import _RIDGE_SOLVERS

    def page(name):
        return (ROOT / "docs" / name).read_text(encoding="utf-8")

    places = [
        (_SOLVERS, "docs/api/readout_losses.md", page("api/readout_losses.md")),
        (_SOLVERS, "docs/losses/bce.md", page("losses/bce.md")),
        (_SOLVERS, "vploss_glm", vploss.vploss_glm.__doc__),
        (_SOLVERS, "vploss_bce", vploss.vploss_bce.__doc__),
        (_RIDGE_SOLVERS, "docs/api/losses.md", page("api/losses.md")),
        (_RIDGE_SOLVERS, "docs/losses/msereg.md", page("losses/msereg.md")),
        (_RIDGE_SOLVERS, "vploss_msereg", vploss.vploss_msereg.__doc__),
    ]
    missing = [
        f"{where} lacks {name!r}"
        for table, where, text in places
        for name in table
        if f'"{name}"' not in text
    ]
    assert not missing, "\n".join(missing)


def _section(text, heading):
    """The section of a markdown page under the level-2 `heading`, to the next one."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _page(name):
    return (ROOT / "docs" / name).read_text(encoding="utf-8")


def test_the_home_page_table_of_the_losses_has_every_loss_function():
    """The table "The losses" of the home page has a row for every public `vploss_*`
    loss function, and for no other name."""
    table = _section(_page("index.md"), "The losses")
    rows = re.findall(r"^\| \[?`(\w+)`", table, flags=re.MULTILINE)
    functions = [name for name in _public_names() if name.startswith("vploss_")]
    assert sorted(rows) == functions, (
        f"docs/index.md's table of the losses has rows {sorted(rows)}, not {functions}"
    )


def test_the_home_page_table_of_the_losses_names_every_solver():
    """The solver column of the home page's table names every `solver="..."` of both
    families."""
    from vploss._readout_losses.solvers import _SOLVERS
    from vploss._ridge.loss import _RIDGE_SOLVERS

    table = _section(_page("index.md"), "The losses")
    missing = [name for name in [*_SOLVERS, *_RIDGE_SOLVERS] if f'"{name}"' not in table]
    assert not missing, f"docs/index.md's table of the losses lacks the solvers {missing}"


_NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen".split()
    )
} | {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60}


def _number(word):
    """A count written in digits or in words ("twenty", "twenty-five")."""
    word = word.lower()
    if word.isdigit():
        return int(word)
    tens, _, unit = word.partition("-")
    return _NUMBER_WORDS[tens] + (_NUMBER_WORDS[unit] if unit else 0)


def test_the_getting_started_example_has_the_length_the_home_page_states():
    """The home page says the getting-started page trains a network in so many lines:
    the non-blank lines of that page's first Python block."""
    stated = re.search(
        r"\(getting_started\.md\) trains a network in\s+([\w-]+)\s+lines", _page("index.md")
    )
    assert stated, "docs/index.md no longer states the example's length: drop this test"
    block = re.search(r"^```python\n(.*?)^```", _page("getting_started.md"), re.S | re.M)
    lines = [line for line in block.group(1).split("\n") if line.strip()]
    assert _number(stated.group(1)) == len(lines), (
        f"docs/index.md says {stated.group(1)!r} lines; the example in "
        f"docs/getting_started.md has {len(lines)} non-blank lines"
    )
    assert _number("twenty") == 20 and _number("twenty-three") == 23 and _number("7") == 7


def _hostile_rows():
    """The ids of the rows of `ROWS` in tests/test_hostile_inputs.py, read from its
    source (importing it builds its arrays)."""
    tree = ast.parse((ROOT / "tests" / "test_hostile_inputs.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [
            "ROWS"
        ]:
            return [key.value for key in node.value.keys]
    raise AssertionError("tests/test_hostile_inputs.py has no `ROWS = {...}`")


def _stated_hostile_counts(text):
    """`(count, sentence)` for each sentence of `text` that mentions the hostile inputs
    and states a number of cases or rows ("lists 71 cases", "113 hostile-input rows"),
    outside tables."""
    text = "\n".join(line for line in text.split("\n") if not line.lstrip().startswith("|"))
    for sentence in re.split(r"(?<=[.!?])\s+|\n\s*\n", text):
        if re.search(r"hostile|edge[- ]input", sentence, flags=re.IGNORECASE):
            for match in re.finditer(r"\b(\d+)\s+(?:[\w-]+\s+){0,3}?(?:cases|rows)\b", sentence):
                yield int(match.group(1)), " ".join(sentence.split())


def test_stated_counts_of_the_hostile_inputs_are_the_rows():
    """A page or docstring that states how many hostile inputs are tabulated states the
    number of rows of the test (`ROWS`), which `test_doc_table_matches_rows` keeps one to
    one with the table of docs/hostile_inputs.md."""
    rows = _hostile_rows()
    table = re.findall(r"^\| \d+ \|", _page("hostile_inputs.md"), flags=re.MULTILINE)
    assert len(table) == len(rows), (len(table), len(rows))
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *SOURCES]
    wrong = [
        f"{path.relative_to(ROOT)}: states {count}, there are {len(rows)}: {sentence!r}"
        for path in paths
        for count, sentence in _stated_hostile_counts(path.read_text(encoding="utf-8"))
        if count != len(rows)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_hostile_count_check_finds_counts():
    """The check above, on small strings."""
    found = [
        count
        for text in [
            "[Hostile and edge inputs](hostile_inputs.md) lists 71 cases and what each does.",
            "The 113 hostile-input rows are tested.",
            "Edge inputs: 12 tested\ncases. A 3 rows matrix.",
            "| 5 | `ridge-x` | hostile | 3 rows |",
        ]
        for count, _ in _stated_hostile_counts(text)
    ]
    assert found == [71, 113, 12]


def test_the_hostile_inputs_prose_names_existing_rows():
    """The row ids (or parts of them) that the text above the table of
    docs/hostile_inputs.md names in backquotes are in the table."""
    text = _page("hostile_inputs.md")
    prose = text[: text.index("\n| # |")]
    rows = _hostile_rows()
    named = re.findall(r"`(-?[a-z0-9]+(?:-[a-z0-9]+)+-?)`", prose)
    assert named, "no row named: drop this test or fix its pattern"
    unknown = [name for name in named if not any(name in row for row in rows)]
    assert not unknown, f"docs/hostile_inputs.md names rows that do not exist: {unknown}"


def _module_constants():
    """`{name: [value, ...]}` of the module-level constants (`NAME = literal`) of the
    package's sources."""
    constants = {}
    for path in SOURCES:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                target = node.target
            else:
                continue
            if isinstance(target, ast.Name) and re.fullmatch(r"[A-Z][A-Z0-9_]+", target.id):
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                constants.setdefault(target.id, []).append(value)
    return constants


_QUOTED_CONSTANT = re.compile(r"`([A-Z][A-Z0-9_]+) = ([^`]+)`")


def test_quoted_constants_have_their_values():
    """A page or docstring that quotes a constant of the package with its value, e.g.
    "`MAX_EXACT_NEWTON_COST = 220`", quotes the value the code has."""
    constants = _module_constants()
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *SOURCES]
    wrong = []
    for path in paths:
        for name, value in _QUOTED_CONSTANT.findall(path.read_text(encoding="utf-8")):
            if name not in constants:
                wrong.append(f"{path.relative_to(ROOT)}: {name} is no constant of src/vploss")
            elif any(known != ast.literal_eval(value) for known in constants[name]):
                wrong.append(
                    f"{path.relative_to(ROOT)}: `{name} = {value}`, the code has {constants[name]}"
                )
    assert not wrong, "\n".join(wrong)
    assert _QUOTED_CONSTANT.findall("at most `MAX_BACKTRACKS = 60` trials") == [
        ("MAX_BACKTRACKS", "60")
    ]


def test_the_notebooks_link_only_to_absolute_addresses():
    """The markdown cells of the example notebooks hold no relative link: mkdocs-jupyter
    neither rewrites nor checks them (a link to `../stochastic.md` resolves against the
    notebook's page, `examples/NAME/`, where there is no such page), unlike the links of
    the pages, which `mkdocs build --strict` checks."""

    def links(markdown):
        text = re.sub(r"\$\$.*?\$\$|\$[^$]*\$|`[^`]*`", "", markdown, flags=re.DOTALL)
        return re.findall(r"\]\(\s*<?([^)\s>]+)", text)

    relative = [
        f"examples/{script.name}: {link}"
        for script in EXAMPLES
        for kind, source in percent_cells(script.read_text(encoding="utf-8"))
        if kind == "markdown"
        for link in links(source)
        if not re.match(r"[a-z][a-z0-9+.-]*://", link)
    ]
    assert links("see $[f, 1](z)$, `a[0](b)` and [here](../x.md)") == ["../x.md"]
    assert not relative, "relative links in the notebooks' markdown:\n" + "\n".join(relative)


def test_the_stated_python_version_is_the_required_one():
    """The version in "Python ≥ X.Y" of the README and the pages is the
    `requires-python` of pyproject.toml."""
    import tomllib

    required = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "requires-python"
    ]
    wrong = [
        f"{path.relative_to(ROOT)}: Python ≥ {version}, pyproject.toml: {required}"
        for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
        for version in re.findall(r"Python\s+(?:≥|>=)\s*([\d.]+\d)", path.read_text("utf-8"))
        if required != f">={version}"
    ]
    assert not wrong, "\n".join(wrong)
