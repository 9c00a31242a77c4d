"""The house in floors: every module of wrn3d_tl imports only from its own floor or the
floors below, with no cycle, and training and inference stand side by side.

The graph is read from the source (every ``import`` statement, those inside functions
included), so an import that only runs on some code path counts as much as one at the top.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "wrn3d_tl"

# Lowest first. A module imports only from its own floor (without a cycle) or from lower
# ones; training and inference share a floor but never import each other: the inference
# side reads what training saved through the nets' loader (wrn3d_tl.loading).
FLOORS = (
    ("base", ("wrn3d_tl", "wrn3d_tl.validate", "wrn3d_tl.cpu", "wrn3d_tl.files", "wrn3d_tl.devices",
              "wrn3d_tl.distribute", "wrn3d_tl.logs", "wrn3d_tl.metrics", "wrn3d_tl.config",
              "wrn3d_tl.checkpoint", "wrn3d_tl.evaluation")),
    ("data", ("wrn3d_tl.data", "wrn3d_tl.data.*")),
    ("nets", ("wrn3d_tl.layers", "wrn3d_tl.model", "wrn3d_tl.keras_twin", "wrn3d_tl.loading", "wrn3d_tl.convert")),
    ("training", ("wrn3d_tl.optim", "wrn3d_tl.memory", "wrn3d_tl.batches", "wrn3d_tl.feed", "wrn3d_tl.train",
                  "wrn3d_tl.experiment")),
    ("inference", ("wrn3d_tl.predict", "wrn3d_tl.export", "wrn3d_tl.explain", "wrn3d_tl.report")),
    ("commands", ("wrn3d_tl.commands", "wrn3d_tl.commands.*")),
)
SIDE_BY_SIDE = ("training", "inference")
LEVEL = {"base": 0, "data": 1, "nets": 2, "training": 3, "inference": 3, "commands": 4}


def modules():
    """{module name: source path} of every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name, path, known):
    """The package's modules that ``name`` imports anywhere in its source."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from wrn3d_tl.data import hdf5` imports the submodule; `from wrn3d_tl.data import x` the package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:   # `import wrn3d_tl.data.hdf5.x` -> the module that exists
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def floor_of(name):
    for floor, members in FLOORS:
        if any(name == m or (m.endswith(".*") and name.startswith(m[:-1])) for m in members):
            return floor
    return None


def violations(graph):
    """Import edges that break the floors: upward, or between training and inference."""
    bad = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = floor_of(source), floor_of(target)
            if LEVEL[b] > LEVEL[a] or (a != b and {a, b} == set(SIDE_BY_SIDE)):
                bad.append(f"{source} ({a}) imports {target} ({b})")
    return bad


def cycles(graph):
    """Import cycles, each as a list of module names (depth-first search)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_floor(graph):
    assert len(graph) > 30
    assert [name for name in graph if floor_of(name) is None] == []


def test_no_module_imports_upward_or_across_training_and_inference(graph):
    assert violations(graph) == []


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_inference_never_reaches_the_trainer(graph):
    """What serving loads (predict, export, explain, report and everything they import,
    transitively) holds no training module: the trainer, its optimizer, memory, experiment."""
    reach, todo = set(), ["wrn3d_tl.predict", "wrn3d_tl.export", "wrn3d_tl.explain", "wrn3d_tl.report"]
    while todo:
        name = todo.pop()
        if name not in reach:
            reach.add(name)
            todo.extend(graph[name])
    assert "wrn3d_tl.loading" in reach and "wrn3d_tl.model" in reach
    assert sorted(n for n in reach if floor_of(n) == "training") == []


def test_the_checks_see_an_upward_import_a_crossing_and_a_cycle(graph):
    """The checks themselves: a lower module importing the trainer, the inference side
    importing training, and a loop are each reported."""
    upward = {**graph, "wrn3d_tl.config": graph["wrn3d_tl.config"] | {"wrn3d_tl.train"}}
    assert violations(upward) == ["wrn3d_tl.config (base) imports wrn3d_tl.train (training)"]
    crossing = {**graph, "wrn3d_tl.predict": graph["wrn3d_tl.predict"] | {"wrn3d_tl.optim"}}
    assert violations(crossing) == ["wrn3d_tl.predict (inference) imports wrn3d_tl.optim (training)"]
    loop = {**graph, "wrn3d_tl.validate": graph["wrn3d_tl.validate"] | {"wrn3d_tl.config"}}
    assert ["wrn3d_tl.validate", "wrn3d_tl.config", "wrn3d_tl.validate"] in [c[-3:] for c in cycles(loop)]


def test_imports_inside_functions_count(tmp_path):
    """An import written inside a function is an edge, as one at the top is."""
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from wrn3d_tl.train import Trainer\n    return Trainer\n")
    assert imports("wrn3d_tl.config", source, set(modules())) == {"wrn3d_tl.train"}
