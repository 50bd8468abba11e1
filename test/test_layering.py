"""The import graph says what the architecture is: walks every ``import`` (module level and inside functions) of
``ecmnet_core`` and ``ecmnet_ros`` with :mod:`ast` and checks there is no import circle, that the ROS-free core
never imports ``ecmnet_ros``, and that the lower layers never import the ones above them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ecmnet_core", "ecmnet_ros")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module that ``import name`` loads (``a.b.C`` -> ``a.b`` when C is not a module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    deps: set[str] = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # ``from pkg import sub`` loads pkg.sub; ``from pkg import name`` loads pkg (its __init__)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        deps.update(r for r in map(_resolve, names) if r)
    # a module's own parent packages are always loaded first: not an edge of the architecture
    return {d for d in deps if d != module and not module.startswith(d + ".")}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_walker_sees_imports_and_finds_circles():
    assert "ecmnet_core.model" in GRAPH["ecmnet_core.model.attention"] or \
        "ecmnet_core.ops.axial_attention" in GRAPH["ecmnet_core.model.attention"]
    assert "ecmnet_core.inference" in GRAPH["ecmnet_ros.segmenter"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert _cycles(GRAPH) == []


def test_the_core_never_imports_the_ros_package():
    offenders = {m: sorted(d for d in deps if d.startswith("ecmnet_ros"))
                 for m, deps in GRAPH.items() if m.startswith("ecmnet_core")}
    assert {m: d for m, d in offenders.items() if d} == {}


@pytest.mark.parametrize("lower,upper", [
    ("ecmnet_core.ops", ("ecmnet_core.model", "ecmnet_core.checkpoint", "ecmnet_core.engines",
                         "ecmnet_core.inference", "ecmnet_core.evaluate", "ecmnet_core.train")),
    ("ecmnet_core.model", ("ecmnet_core.checkpoint", "ecmnet_core.engines", "ecmnet_core.inference",
                           "ecmnet_core.evaluate", "ecmnet_core.train", "ecmnet_core.bags")),
    ("ecmnet_core.engines", ("ecmnet_core.inference", "ecmnet_core.evaluate", "ecmnet_core.predict",
                             "ecmnet_core.bags", "ecmnet_core.train")),
    ("ecmnet_core.inference.pipeline", ("ecmnet_core.inference.segmenter", "ecmnet_core.inference.options",
                                        "ecmnet_core.evaluate", "ecmnet_core.engines", "ecmnet_core.checkpoint")),
    ("ecmnet_core.device", ("ecmnet_core.model", "ecmnet_core.ops", "ecmnet_core.data", "ecmnet_core.checkpoint",
                            "ecmnet_core.engines", "ecmnet_core.inference", "ecmnet_core.train")),
    ("ecmnet_core.inference", ("ecmnet_core.evaluate", "ecmnet_core.predict", "ecmnet_core.bags",
                               "ecmnet_core.bench", "ecmnet_core.train")),
])
def test_lower_layers_do_not_import_upper_ones(lower, upper):
    def inside(module: str, prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")

    wrong = {m: sorted(d for d in deps if any(inside(d, u) for u in upper))
             for m, deps in GRAPH.items() if inside(m, lower)}
    assert {m: d for m, d in wrong.items() if d} == {}


def test_no_function_is_over_100_lines():
    long = [f"{path.relative_to(REPO)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in MODULES.values() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 100]
    assert long == []


def test_one_home_for_each_helper():
    """Helpers that used to be written several times (with different behaviour) have exactly one definition."""
    for name in ("resolve_device", "default_palette", "bgr_lut", "write_image", "latency_summary", "stamp_ns"):
        homes = [str(path.relative_to(REPO)) for path in MODULES.values()
                 for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.FunctionDef) and node.name == name]
        assert len(homes) == 1, f"{name} is defined in {homes}"
    unlabeled = [str(path.relative_to(REPO)) for path in MODULES.values() if "UNLABELED = 255" in path.read_text()]
    assert unlabeled == ["ecmnet_core/data/classes.py"]


def test_the_package_top_level_stays_small():
    """Modules directly under ecmnet_core/ (besides __init__ and __main__): the rest lives in packages."""
    top = sorted(p.name for p in (REPO / "ecmnet_core").glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= 10, top
    assert len((REPO / "ecmnet_ros" / "segmenter.py").read_text().splitlines()) <= 480
