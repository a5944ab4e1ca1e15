"""The package's shape, read from its source with ``ast`` (nothing is imported): no import
cycle between modelkit modules, and a core that imports no UI.

Every import counts, also one inside a function (a deferred import is still a dependency);
only imports under ``if TYPE_CHECKING:`` are left out (they never run).
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "modelkit"
UI_LIBRARIES = ("ipywidgets", "IPython", "matplotlib.pyplot")
UI_MODULES = ("modelkit.ui.widgets", "modelkit.ui.cli", "modelkit.ui.demo", "modelkit.ui.demo_pair")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _type_checking_only(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                skip.update(id(n) for n in ast.walk(stmt))
    return skip


def _targets(module: str, node: ast.Import | ast.ImportFrom, is_package: bool) -> list[str]:
    """The dotted names an import statement makes this module depend on."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".")[: None if is_package else -1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    # `from pkg import sub` depends on pkg.sub when that is a module, else on pkg itself
    return [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]


def _owner(name: str) -> str | None:
    """The modelkit module a dotted name lives in (None for other libraries)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@functools.cache
def imports(module_level_only: bool = False) -> dict[str, set[str]]:
    """module -> every dotted name it imports (modelkit's own or a library's)."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        nodes = tree.body if module_level_only else ast.walk(tree)
        found = set()
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                found.update(_targets(module, node, path.name == "__init__.py"))
        graph[module] = found
    return graph


@functools.cache
def internal_graph() -> dict[str, set[str]]:
    """module -> the modelkit modules it imports. Importing a module runs its packages'
    ``__init__`` first, whatever the code says, so an edge to one's own package (or the
    root ``modelkit``) is not counted; an explicit one from a package to its submodule is."""
    graph = {}
    for module, names in imports().items():
        owners = {_owner(n) for n in names} - {None, module, "modelkit"}
        graph[module] = {o for o in owners if not module.startswith(o + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_deferred_imports():
    # the DyLoRA builder fills the base model with bridge.disk_to_model inside a function
    assert "modelkit.architecture.bridge" in internal_graph()["modelkit.formats.dylora_build"]
    assert "modelkit.ops.load" in internal_graph()["modelkit.ops.export"]


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modelkit_modules():
    graph = internal_graph()
    found = cycles(graph)
    detail = ["  ".join(f"{m} -> {sorted(d for d in graph[m] if d in c)}" for m in c) for c in found]
    assert not found, "import cycles:\n" + "\n".join(detail)


@pytest.mark.parametrize("module", [m for m in MODULES if not m.startswith(UI_MODULES)])
def test_core_modules_import_no_ui(module):
    at_import = {n for n in imports(module_level_only=True)[module]
                 if n.startswith(UI_LIBRARIES)}
    assert not at_import, f"{module} imports {sorted(at_import)} at module level"
    anywhere = {o for o in internal_graph()[module] if o.startswith(UI_MODULES)}
    assert not anywhere, f"{module} (core) imports the UI modules {sorted(anywhere)}"


# --------------------------------------------------------------------------- layers
# Lowest first; a module may import modules of its own layer and of the layers before it.
# The order is read from the code: models/ (nn.Modules) sit below formats/ (a format builds
# its model from them); present/ (text, figures, W&B from tables) sits below ops/ (a result's
# thin plot()/log_to_wandb() hands its tables down); bench/ (engines load and export through
# ops/) above ops/; testing/ writes artifacts with io/ only; ui/ may use everything.
LAYERS = (
    ("core", ("modelkit.errors", "modelkit.findings", "modelkit.schemas", "modelkit.schema_models",
              "modelkit.quiet", "modelkit.verdicts", "modelkit.units", "modelkit.progress",
              "modelkit.cache", "modelkit.collector")),
    ("io", ("modelkit.io",)),
    ("architecture", ("modelkit.architecture",)),
    ("models", ("modelkit.models",)),
    ("formats", ("modelkit.formats",)),
    ("present", ("modelkit.present",)),
    ("ops", ("modelkit.ops",)),
    ("bench", ("modelkit.bench",)),
    ("testing", ("modelkit.testing",)),
    ("ui", ("modelkit.ui",)),
    ("api", ("modelkit",)),  # the package root: the lazy public API
)
# Edges that still go up a layer, each to be removed by moving code (docs/DESIGN.md, "Layers"):
# the test fails on any other upward edge, and on an entry here that is gone (strike it).
KNOWN_UPWARD = {
    "modelkit.ops.compare -> modelkit.bench.codeeval.lm_task",   # compare/watch evaluate: they
    "modelkit.ops.compare -> modelkit.bench.engines",            # belong in bench/ (a move)
    "modelkit.ops.compare -> modelkit.bench.evaluation",
    "modelkit.ops.compare -> modelkit.bench.paired_stats",
    "modelkit.ops.compare_results -> modelkit.bench.paired_stats",
    "modelkit.ops.compare_results -> modelkit.bench.sample_logs",
    "modelkit.ops.watch -> modelkit.bench.engines",
    "modelkit.ops.watch -> modelkit.bench.evaluation",
    "modelkit.ops.watch -> modelkit.bench.executors",
}


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix naming ``module``."""
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    assert found is not None, f"{module} is in no layer of LAYERS"
    return found


def upward_edges(graph: dict[str, set[str]]) -> set[str]:
    return {f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m)}


def test_the_layer_check_finds_an_upward_import():
    assert upward_edges({"modelkit.io.files": {"modelkit.ops.load"}, "modelkit.ops.load": {"modelkit.io.files"}}) \
        == {"modelkit.io.files -> modelkit.ops.load"}


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


def test_each_layer_imports_only_the_layers_below_it():
    graph = internal_graph()
    edges = sum(len(d) for d in graph.values())
    up = upward_edges(graph)
    print(f"\n{len(MODULES)} modules, {edges} import edges, {len(cycles(graph))} cycles, "
          f"{len(up)} upward edges ({len(up - KNOWN_UPWARD)} new)")
    assert not up - KNOWN_UPWARD, "imports up a layer (move the code down or the caller up):\n" + \
        "\n".join(sorted(up - KNOWN_UPWARD))
    assert not KNOWN_UPWARD - up, "fixed, strike from KNOWN_UPWARD:\n" + "\n".join(sorted(KNOWN_UPWARD - up))
