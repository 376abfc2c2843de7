"""The package's import graph, read from the source with ``ast``: every import counts, at module level, inside a
function or under TYPE_CHECKING, because each is a dependency a reader has to follow.

- no cycle between securemark's modules (a package's __init__ importing its own submodules is an edge like any
  other: it forms a cycle only when a submodule imports the package back);
- only the Flower layer (securemark/flower/) imports flwr and ray;
- the benchmarks (securemark/bench/) do not import flwr or ray themselves: what they need of Flower lives in
  securemark/flower/.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "securemark"
FLOWER = ("flwr", "flwr_datasets", "ray")  # top-level names of Flower's and Ray's distributions
ALLOWED = {
    # flwr_datasets is a dataset library (the optional ``hub`` extra: Hugging Face datasets partitioned for
    # clients), not the Flower runtime: data.py loads data with it and runs no app, strategy or Ray.
    ("securemark.data", "flwr_datasets"),
}


def _modules() -> dict[str, Path]:
    """Every module under securemark/ by dotted name (a package by its own name, for its __init__.py)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(dotted name imported, line) for every import in ``path``; ``from a import b`` gives ``a.b`` when that is
    a securemark module, else ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if full in MODULES else base, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    """securemark module -> the securemark modules it imports (an import of a.b.c names a.b.c only)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _ in _imports(name, path):
            while target and target not in MODULES:  # securemark.x.attribute -> securemark.x
                target = target.rpartition(".")[0]
            if target.startswith("securemark") and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _flower_imports(package: str) -> list[tuple[str, int, str]]:
    """(module, line, name imported) for every import of flwr, flwr_datasets or ray by a module of ``package``."""
    found = []
    for name, path in MODULES.items():
        if name == package or name.startswith(package + "."):
            found += [(name, line, target) for target, line in _imports(name, path) if target.split(".")[0] in FLOWER]
    return found


def _listed(found: list[tuple[str, int, str]]) -> str:
    return "\n".join(f"{name}:{line} imports {target}" for name, line, target in found)


def test_graph_is_read():
    graph = _graph()
    assert "securemark.flower.strategy" in graph["securemark.flower.server_app"]  # a module-level import
    assert "securemark.flower.ray_trials" in graph["securemark.evaluation.harness"]  # one inside a function


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles between securemark modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_only_the_flower_layer_imports_flwr_and_ray():
    outside = [
        (name, line, target)
        for name, line, target in _flower_imports("securemark")
        if not (name == "securemark.flower" or name.startswith("securemark.flower."))
        and (name, target.split(".")[0]) not in ALLOWED
    ]
    assert not outside, "flwr or ray imported outside securemark/flower/:\n" + _listed(outside)


def test_benchmarks_do_not_import_flwr_or_ray():
    assert any(name.startswith("securemark.bench.") for name in MODULES)
    found = _flower_imports("securemark.bench")
    assert not found, "securemark/bench/ imports flwr or ray (its Flower code belongs in securemark/flower/):\n" + (
        _listed(found)
    )


# The packages in layers (docs/layout.md): a package imports only packages of a lower layer. Top-level modules
# (config, owner, sim, ...) are placed one by one in the docs and are not checked here.
LAYERS = {"corpus": 1, "codes": 2, "secagg": 2, "fingerprint": 3, "registry": 4, "tracing": 5, "attacks": 5,
          "evaluation": 6, "flower": 7, "bench": 8, "cli": 9}  # fmt: skip
KEPT = {("securemark.evaluation", "securemark.flower")}  # the --ray runner, picked at run time (docs/layout.md)


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_packages_import_only_lower_layers():
    assert set(LAYERS) == {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}  # every package placed
    wrong = sorted(
        (name, target)
        for name, targets in _graph().items()
        for target in targets
        if (a := _package(name)) and (b := _package(target)) and a != b and LAYERS[b] >= LAYERS[a]
        and (f"securemark.{a}", f"securemark.{b}") not in KEPT
    )  # fmt: skip
    assert not wrong, "imports against the layers:\n" + "\n".join(f"{a} imports {b}" for a, b in wrong)
