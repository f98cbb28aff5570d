"""The trainer's folders keep their import rules (docs/architecture.md) and no module imports one that
imports it back, at module level or inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "trainer"
PACKAGE = ROOT / "dhad_trainer"

# folder -> folders it must never import (the rules each folder's __init__.py states)
FORBIDDEN = {
    "storage": {"stages", "runtime", "llm", "evaluation", "local", "data"},
    "data": {"stages", "runtime", "llm", "evaluation", "local"},
    "llm": {"stages", "runtime", "local", "evaluation"},
    "evaluation": {"stages", "runtime", "local"},
    "stages": {"local", "runtime"},
    "runtime": {"local"},
}
# modules of a forbidden folder that a folder may still import: a stage plugs the runtime's Trainer
# callbacks, tracking integrations and barriers into its own Trainer (never the launcher or the worker)
ALLOWED = {
    "stages": {"dhad_trainer.runtime.distributed", "dhad_trainer.runtime.tracking", "dhad_trainer.runtime.callbacks"},
}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imports_of(path: Path) -> set[str]:
    """The dhad_trainer modules (or packages) `path` imports, anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dhad_trainer"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (ROOT / (candidate.replace(".", "/") + ".py")).exists() or (ROOT / candidate.replace(".", "/")).is_dir()
                found.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dhad_trainer"))
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else None


def test_folders_import_only_what_their_rules_allow():
    broken = []
    for module, targets in graph().items():
        banned = FORBIDDEN.get(folder(module) or "", set())
        allowed = ALLOWED.get(folder(module) or "", set())
        broken += [f"{module} imports {t}" for t in sorted(targets) if folder(t) in banned and t not in allowed]
    assert broken == []


def test_no_module_imports_a_module_that_imports_it_back():
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert cycles == []


def test_the_rules_see_a_planted_forbidden_import():
    """The checks above could fail: a storage module importing stages/ is reported."""
    edges = graph()
    edges["dhad_trainer.storage.base"] = edges["dhad_trainer.storage.base"] | {"dhad_trainer.stages.base"}
    banned = FORBIDDEN["storage"]
    assert any(folder(t) in banned for t in edges["dhad_trainer.storage.base"])
    assert folder("dhad_trainer.storage.base") == "storage" and folder("dhad_trainer.cli") is None
    assert "dhad_trainer.runtime.launcher" not in ALLOWED["stages"] and folder("dhad_trainer.runtime.launcher") in FORBIDDEN["stages"]
