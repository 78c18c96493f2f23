"""The architecture the tree promises (README, "Architecture"): rooms, dependency directions, sizes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "finetune", "flows")
FLOWS = {
    "flows.adapt_text",
    "flows.catalog_refresh",
    "flows.adapt_clip",
    "flows.supervised",
    "flows.evaluate",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in the file, top level and inside functions alike."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for module, names in _imports(path):
            targets |= {module} if module in modules else set()
            targets |= {f"{module}.{n}" for n in names if f"{module}.{n}" in modules}
        graph[name] = targets - {name}
    return graph


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_module_is_over_500_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 500}
    assert long == {}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_dependencies_point_one_way():
    """flows -> tasks, finetune; finetune -> tasks; tasks.<room> -> tasks.core; nothing imports flows."""
    problems = []
    for module, targets in _graph().items():
        for target in targets:
            if not module.startswith("flows") and target.startswith("flows"):
                problems.append(f"{module} imports {target}")
            if module.startswith("tasks.") and target.startswith("finetune"):
                problems.append(f"{module} imports {target}")
            if (
                _room(module) == "tasks.core"
                and target.startswith("tasks.")
                and _room(target) != "tasks.core"
            ):
                problems.append(f"{module} (core) imports {target}")
            allowed = {"tasks.core", _room(module)} | (
                {"tasks.catalog"} if _room(module) == "tasks.serving" else set()
            )
            if module.startswith("tasks.") and target.startswith("tasks.") and _room(target) not in allowed:
                problems.append(f"{module} imports another room: {target}")
    assert problems == []


def test_no_flow_imports_another_flow_or_a_private_name_of_one():
    problems = []
    modules = _modules()
    for module, path in modules.items():
        if not module.startswith("flows"):
            continue
        for target, names in _imports(path):
            if module in FLOWS and target in FLOWS and target != module:
                problems.append(f"{module} imports the flow {target}")
            if target.startswith("flows") and target != module and any(n.startswith("_") for n in names):
                problems.append(f"{module} imports private names of {target}: {names}")
    assert problems == []


def test_tasks_and_finetune_import_no_prefect():
    """Stages and training are plain functions: importing every module of tasks/ and finetune/ loads no Prefect."""
    names = [m for m in _modules() if m.startswith(("tasks", "finetune"))]
    script = (
        "import importlib, sys\n"
        + "".join(f"importlib.import_module({m!r})\n" for m in names)
        + ("print(sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')))")
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
