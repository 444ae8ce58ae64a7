"""The house rules, checked on the syntax tree (like tests/reliability/test_safe_loading.py).

- Dependencies point one way: train.py -> opd -> {tip, eval, demo, agent, lm}; eval -> {agent, lm, demo};
  demo -> {agent, lm}; agent -> lm; lm and tip import nothing of ours. Imports inside functions and
  importlib/__import__ strings count too.
- Inside opd, only the training step (opd/step.py) imports tip.
- An import inside a function is only for a heavy or optional third-party library,
  with its reason in a comment on that line.
- No function in opd/ is longer than 60 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lm", "tip", "agent", "demo", "eval", "opd")
ALLOWED = {
    "lm": {"lm"},
    "tip": {"tip"},
    "agent": {"agent", "lm"},
    "demo": {"demo", "agent", "lm"},
    "eval": {"eval", "agent", "lm", "demo"},
    "opd": {"opd", "tip", "eval", "demo", "agent", "lm"},
    "train.py": {"opd"},
}
LAZY_OK = {"deepspeed", "matplotlib", "wandb", "math_verify", "vllm", "torch.utils.tensorboard"}
MAX_FUNCTION_LINES = 60


def sources() -> list[tuple[str, Path]]:
    files = [("train.py", REPO / "train.py")]
    for package in PACKAGES:
        files += [(package, p) for p in sorted((REPO / package).rglob("*.py"))]
    return files


def imported_modules(tree: ast.AST):
    """(module name, node, inside a function?) for every import and importlib/__import__ string literal."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child, in_function
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                yield child.module, child, in_function
            elif isinstance(child, ast.Call) and child.args and isinstance(child.args[0], ast.Constant) \
                    and isinstance(child.args[0].value, str):
                f = child.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name in ("import_module", "__import__"):
                    yield child.args[0].value, child, True
            yield from walk(child, inner)
    yield from walk(tree, False)


def ours(module: str) -> str | None:
    root = module.split(".")[0]
    return root if root in PACKAGES else None


def violations() -> dict[str, list[str]]:
    found = {"direction": [], "tip_seam": [], "lazy": [], "long": []}
    for owner, path in sources():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        where = path.relative_to(REPO)
        for module, node, in_function in imported_modules(tree):
            target = ours(module)
            if target is not None and target not in ALLOWED[owner]:
                found["direction"].append(f"{where}:{node.lineno} {owner} imports {module}")
            if owner == "opd" and target == "tip" and path.name != "step.py":
                found["tip_seam"].append(f"{where}:{node.lineno} imports {module}")
            if in_function and isinstance(node, (ast.Import, ast.ImportFrom)):
                lazy_ok = any(module == m or module.startswith(m + ".") for m in LAZY_OK)
                if not lazy_ok or "#" not in lines[node.lineno - 1]:
                    found["lazy"].append(f"{where}:{node.lineno} imports {module} inside a function"
                                         + ("" if lazy_ok else " (not a heavy/optional third-party library)")
                                         + ("" if "#" in lines[node.lineno - 1] else " without a reason comment"))
        if owner == "opd":
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        found["long"].append(f"{where}:{node.lineno} {node.name} is {length} lines")
    return found


@pytest.mark.parametrize("rule", ["direction", "tip_seam", "lazy", "long"])
def test_house_rules(rule):
    assert violations()[rule] == []


def test_the_checks_catch_planted_violations(tmp_path):
    planted = ast.parse(
        "import importlib\nfrom opd import trainer\n"
        "def f():\n    import json\n    importlib.import_module('eval.grader')\n    import deepspeed  # optional\n")
    found = [(m, lazy) for m, _, lazy in imported_modules(planted)]
    assert ("opd", False) in found and ("importlib", False) in found
    assert ("json", True) in found and ("eval.grader", True) in found and ("deepspeed", True) in found
    assert ours("eval.grader") == "eval" and ours("evaluate") is None and ours("lm.chat") == "lm"
