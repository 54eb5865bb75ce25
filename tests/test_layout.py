"""The layout shows the design (issue 13): packages import one way, with no cycles (imports
inside functions included, typing-only imports excluded), and no module grows past 500
lines."""

import ast
import pathlib
import subprocess
import sys

import ftrain

ROOT = pathlib.Path(ftrain.__file__).parent
MAX_LINES = 500


def _modules() -> dict[str, pathlib.Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = ["ftrain", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _typing_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (not run: no cycle)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def owner(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = _typing_only(tree)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                deps.update(owner(a.name) for a in node.names if a.name.startswith("ftrain."))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ftrain"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in mods else owner(node.module or ""))
        deps -= {name, "ftrain", ""}
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_imports_nothing_above_it():
    above = ("ftrain.loops", "ftrain.layers", "ftrain.checkpointing", "ftrain.parallel",
             "ftrain.compiling", "ftrain.populations", "ftrain.cli")
    graph = _graph()
    wrong = {m: sorted(d for d in deps if d.startswith(above))
             for m, deps in graph.items() if m.startswith("ftrain.core")}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_loops_find_no_layer_by_type():
    for path in (ROOT / "loops").glob("*.py"):
        source = path.read_text()
        assert "find(" not in source and "isinstance(step" not in source, path


def test_no_module_is_too_long():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_public_name_resolves_and_lazy_ones_wait_for_use():
    # __all__ names all resolve (lazy ones through ftrain.__getattr__) ...
    for name in ftrain.__all__:
        assert getattr(ftrain, name) is not None, name
    assert set(ftrain._LAZY) <= set(ftrain.__all__)
    assert set(ftrain.__all__) <= set(dir(ftrain))
    try:
        ftrain.no_such_name  # noqa: B018
    except AttributeError as err:
        assert "no_such_name" in str(err)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
    # ... and a bare `import ftrain` loads none of the lazy modules (fresh interpreter)
    code = ("import sys, ftrain; print(sorted(m for m in sys.modules if m in "
            "{'ftrain.cli', 'ftrain.export', 'ftrain.tune', 'ftrain.checkpointing.manager', "
            "'ftrain.populations.population', 'ftrain.compiling.step'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout
