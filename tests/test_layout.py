"""The house rules of the layout (README, "Layout"), checked on every import of every module.

Walks the source of each project module with `ast` (imports inside functions count too, since
a lazy import is still an arrow) and fails on an arrow that breaks a rule:
- data/ imports nothing of the project; model/ and optim/ import at most each other;
- only runtime/ names a device library (torch_xla, torch_neuronx) or torch.cuda / torch.neuron;
- runtime/ knows devices only: it imports nothing of the run, the benchmark, the leaderboard,
  the speed benchmark or the Hub;
- no package imports an entry point (train.py, evaluate.py, bench.py, leaderboard.py, embed.py);
- no import cycle, between packages or between the modules of one package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("data", "model", "optim", "runtime", "training", "evaluation", "submissions", "speed", "hub")
ENTRY_POINTS = ("train", "evaluate", "bench", "leaderboard", "embed")
ALLOWED = {  # package -> the project packages it may import (besides itself)
    "data": set(),
    "model": {"optim"},
    "optim": {"model"},
    "runtime": {"data", "model", "optim"},
}
DEVICE_LIBRARIES = ("torch_xla", "torch_neuronx", "libneuronxla")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the packages and every entry point."""
    mods = {name: ROOT / f"{name}.py" for name in ENTRY_POINTS}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = path.relative_to(ROOT).parent.parts[: len(path.relative_to(ROOT).parent.parts) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module
            out.append((node.lineno, name))
            # `from runtime import hardware` imports the module runtime.hardware
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names if f"{name}.{a.name}" in MODULES]
    return out


DEVICE_MODULES = ("cuda", "neuron")  # torch.<device> namespaces


def uses_device_module(path: Path) -> list[tuple[int, str]]:
    return [(n.lineno, n.attr) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Attribute) and n.attr in DEVICE_MODULES
            and isinstance(n.value, ast.Name) and n.value.id == "torch"]


def top(name: str) -> str:
    return name.split(".")[0]


MODULES = project_modules()
ARROWS = [(mod, line, target) for mod, path in MODULES.items() for line, target in imports(path)]
PROJECT = set(PACKAGES) | set(ENTRY_POINTS)


def where(mod: str, line: int) -> str:
    return f"{MODULES[mod].relative_to(ROOT)}:{line}"


def test_the_walk_sees_the_whole_project():
    assert {"data.shards", "model.hf", "runtime.devices", "training.config", "evaluation.benchmark",
            "submissions.logcheck", "speed.models", "hub.cli", "train", "leaderboard"} <= set(MODULES)
    assert ("train", "runtime.devices") in {(m, t) for m, _, t in ARROWS}
    # a lazy import inside a function is an arrow too
    assert ("runtime.devices", "runtime.cuda") in {(m, t) for m, _, t in ARROWS}


def test_lower_layers_import_only_what_they_may():
    bad = [f"{where(m, line)} imports {t}" for m, line, t in ARROWS
           if top(m) in ALLOWED and top(t) in PROJECT and top(t) != top(m) and top(t) not in ALLOWED[top(m)]]
    assert not bad, "arrows against the layout's rules:\n" + "\n".join(bad)


def test_only_runtime_knows_the_device():
    bad = [f"{where(m, line)} imports {t}" for m, line, t in ARROWS
           if top(m) != "runtime" and top(t) in DEVICE_LIBRARIES]
    bad += [f"{where(m, line)} uses torch.{name}" for m, path in MODULES.items()
            if top(m) != "runtime" for line, name in uses_device_module(path)]
    assert not bad, "device-specific code outside runtime/:\n" + "\n".join(bad)


def test_no_package_imports_an_entry_point():
    bad = [f"{where(m, line)} imports the entry point {t}" for m, line, t in ARROWS
           if top(m) in PACKAGES and top(t) in ENTRY_POINTS]
    assert not bad, "\n".join(bad)


def package_graph() -> dict[str, set[str]]:
    graph = {p: set() for p in PACKAGES}
    for m, _, t in ARROWS:
        if top(m) in PACKAGES and top(t) in PACKAGES and top(t) != top(m):
            graph[top(m)].add(top(t))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_packages():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_modules():
    graph = {m: set() for m in MODULES}
    for m, _, t in ARROWS:
        # the module named (a parent package's __init__ runs first, but is no arrow of ours)
        parts = t.split(".")
        named = next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in MODULES), None)
        if named and named != m:
            graph[m].add(named)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph,cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
])
def test_the_cycle_finder_finds_cycles(graph, cycle):
    assert find_cycle(graph) == cycle
