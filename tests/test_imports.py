"""The package's import graph: no cycle, and no import from a lower layer to a higher one.

Every ``scflow_jax`` module is read with ``ast`` (nothing is imported or run); module-level and
function-level imports both count, since a function-level import still ties the two modules
together. An import names the deepest ``scflow_jax`` module it resolves to
(``from scflow_jax.evaluation import fid`` -> ``scflow_jax.evaluation.fid``; a name defined in a
package's ``__init__`` -> that package).

Layers, lowest first. A module may import modules of its own layer or of lower ones only.
"""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = "scflow_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# (layer, what it is, module name prefixes). A module takes the layer of its longest matching
# prefix; a module that no prefix matches fails the test, so a new module must be placed.
LAYERS = (
    (1, "maths and networks", ("flows", "paired_batch", "models", "losses")),
    (
        2,
        "infrastructure",
        (
            "__init__",
            "default_config",
            "sharding",
            "checkpoint",
            "precision",
            "monitoring",
            "train_state",
            "sampling",
            "layout",
            "data",
            "distributed",
            "xla_cpu",
            "xla_gpu",
        ),
    ),
    # The evaluation procedures (digits_eval, real_eval) take the task they evaluate as an
    # argument and are run by it (Task.evaluate), so they sit below the tasks.
    (3, "metric and generation libraries", ("evaluation",)),
    (4, "tasks", ("tasks",)),
    (5, "stages", ("teacher", "distill", "evaluate", "sample", "export", "trainer")),
    # --mode=plan builds the distill stage's step from shapes (without running it) to compile it
    # for a target device: a tool over the stages.
    (6, "tools over the stages", ("planning",)),
    (7, "entry point", ("main",)),
)

# (importer, imported): why this upward import is right. Empty: there is none.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}
# Stages do not import one another: they meet in the workdir (layout.py). trainer.py is the
# training loop they share.
STAGE_LAYER, SHARED_STAGE_MODULES = 5, {f"{PACKAGE}.trainer"}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[: -len(".py")].split(os.sep)
    if rel[-1] == "__init__":
        rel = rel[:-1]  # a package's __init__ is the package itself
    return ".".join(rel)


def _modules() -> dict[str, str]:
    """Module name -> file, for every .py file of the package."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                out[_module_name(path)] = path
    return out


def _is_package(name: str, modules: dict[str, str]) -> bool:
    return modules.get(name, "").endswith("__init__.py")


def _resolve(name: str, modules: dict[str, str]) -> str | None:
    """The deepest package module ``name`` (a dotted name) lies in, or None if outside."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package modules ``module`` imports anywhere in its file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package upwards
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import name": the submodule pkg.name if there is one, else pkg.
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules) if name.split(".")[0] == PACKAGE else None
            if target is not None and target != module:
                found.add(target)
    return found


def layer_of(module: str) -> int | None:
    short = module[len(PACKAGE) + 1 :] if module != PACKAGE else "__init__"
    best, best_len = None, -1
    for layer, _, prefixes in LAYERS:
        for prefix in prefixes:
            if (short == prefix or short.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = layer, len(prefix)
    return best


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: imports_of(m, p, modules) for m, p in sorted(modules.items())}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles as closed paths, e.g. [a, b, c, a]: in each strongly connected component
    of more than one module (Tarjan), the shortest cycle through each of its modules."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for component in components:
        for module in sorted(component):
            path = _closed_path(graph, component, module)
            if not any(_same_cycle(path, other) for other in found):
                found.append(path)
    return found


def _same_cycle(a: list[str], b: list[str]) -> bool:
    """Whether two closed paths are one cycle entered at different modules."""
    if len(a) != len(b):
        return False
    ring = b[:-1] + b[:-1]
    return any(ring[i : i + len(a) - 1] == a[:-1] for i in range(len(b) - 1))


def _closed_path(graph, component: set[str], start: str) -> list[str]:
    """The shortest cycle through ``start`` inside ``component``, as a closed path."""
    previous, frontier = {start: None}, [start]
    while frontier:
        reached = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:  # back at the start: walk the predecessors from v
                    path = [v]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return path[::-1] + [start]
                if w not in previous:
                    previous[w] = v
                    reached.append(w)
        frontier = reached
    return sorted(component)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        for target in sorted(targets):
            low, high = layer_of(module), layer_of(target)
            if low is None or high is None or low >= high:
                continue
            if (module, target) not in ALLOWED_UPWARD:
                bad.append(f"{module} (layer {low}) imports {target} (layer {high})")
    return bad


def stage_to_stage_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} imports {target}"
        for module, targets in graph.items()
        if layer_of(module) == STAGE_LAYER
        for target in sorted(targets)
        if layer_of(target) == STAGE_LAYER and target not in SHARED_STAGE_MODULES
    ]


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_walk_sees_module_and_function_level_imports(graph):
    """Guards the walk itself: imports it must see, at module level and inside functions."""
    assert f"{PACKAGE}.flows" in graph[f"{PACKAGE}.sampling"]  # module level
    assert f"{PACKAGE}.xla_cpu" in graph[f"{PACKAGE}.main"]  # inside main.main()
    assert f"{PACKAGE}.models.clip" in graph[f"{PACKAGE}.data.prepare"]  # inside a function


def test_every_module_has_a_layer(graph):
    missing = sorted(m for m in graph if layer_of(m) is None)
    assert not missing, f"modules with no layer in tests/test_imports.py LAYERS: {missing}"


def test_no_import_cycle(graph):
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_import_from_a_lower_layer_to_a_higher_one(graph):
    bad = upward_imports(graph)
    assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_stages_do_not_import_each_other(graph):
    bad = stage_to_stage_imports(graph)
    assert not bad, "stages importing stages (read paths from layout.py):\n" + "\n".join(bad)


def test_the_checks_catch_what_they_are_for():
    """A cycle and an upward import in a made-up graph are found and named."""
    made_up = {
        f"{PACKAGE}.flows": {f"{PACKAGE}.sampling"},
        f"{PACKAGE}.sampling": {f"{PACKAGE}.flows"},
        f"{PACKAGE}.main": set(),
    }
    assert cycles(made_up) == [[f"{PACKAGE}.flows", f"{PACKAGE}.sampling", f"{PACKAGE}.flows"]]
    assert upward_imports(made_up) == [
        f"{PACKAGE}.flows (layer 1) imports {PACKAGE}.sampling (layer 2)"
    ]
    stages = {f"{PACKAGE}.sample": {f"{PACKAGE}.distill", f"{PACKAGE}.trainer"}}
    assert stage_to_stage_imports(stages) == [f"{PACKAGE}.sample imports {PACKAGE}.distill"]
