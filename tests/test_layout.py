"""The package's layout: the shared core (`vploss._core`) imports no family, and the
modules import each other without a cycle, so each family can be read (and changed)
knowing only the core and the families it names. The graph is read from the source
(every `from ... import` of a vploss module, function-level ones included), so a lazy
import cannot hide an edge."""

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vploss"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def import_graph() -> dict[str, set[str]]:
    """`{module: {vploss modules it imports}}` over every source file."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    target = _resolve(module, path.name == "__init__.py", node.level, node.module)
                else:
                    target = node.module or ""
                # `from .pkg import module` names a module; `from .module import name` not.
                candidates = [f"{target}.{alias.name}" for alias in node.names]
                edges.update(c for c in candidates if c in modules)
                if target in modules and not any(c in modules for c in candidates):
                    edges.add(target)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
        graph[module] = edges - {module}
    return graph


def _family(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes, or None (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


GRAPH = import_graph()


def test_the_graph_is_read():
    """The reader finds the edges it exists for (a test that cannot pass on an empty
    graph): the public `__init__` re-exports from every family, and the losses import
    the core."""
    assert {_family(m) for m in GRAPH["vploss"]} >= {"_core", "_ridge", "_readout_losses"}
    assert "vploss._core.envelope" in GRAPH["vploss._readout_losses.loss"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _family(m) == "_core"))
def test_the_core_imports_no_family(module):
    outside = sorted(m for m in GRAPH[module] if _family(m) != "_core")
    assert not outside, f"{module} imports {outside}"


def test_no_import_cycle():
    """No cycle between modules, nor between families (the public `__init__` aside,
    which only re-exports)."""
    assert _cycle(GRAPH) is None, " -> ".join(_cycle(GRAPH))
    families: dict[str, set[str]] = {}
    for module, edges in GRAPH.items():
        if module != "vploss":
            families.setdefault(_family(module), set()).update(
                _family(m) for m in edges if _family(m) != _family(module)
            )
    assert _cycle(families) is None, " -> ".join(_cycle(families))


def test_the_public_init_only_reexports():
    """`vploss/__init__.py` defines nothing: every statement is an import, except
    `__version__`."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign):
            assert [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__version__"]
        else:
            assert isinstance(node, ast.Import | ast.ImportFrom), ast.dump(node)[:80]
