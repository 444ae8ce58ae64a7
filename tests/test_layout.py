"""The house rules, checked on the syntax tree (like tests/reliability/test_safe_loading.py).

- Dependencies point one way: train.py -> opd -> {tip, eval, demo, agent, lm}; eval -> {agent, lm, demo};
  demo -> {agent, lm}; agent -> lm; lm and tip import nothing of ours. Imports inside functions and
  importlib/__import__ strings count too.
- Inside opd, only the training step (opd/step.py) imports tip.
- An import inside a function is only for a heavy or optional third-party library,
  with its reason in a comment on that line.
- No function in opd/ is longer than 60 lines.
- The loop reaches the teacher only through lm/teacher.py's protocol (`Teacher`: score, head, vocab, reads,
  model): no module of opd/ touches a teacher model's internals, offloading or ZeRO-3 sharding of it, and
  only the set-up builds a concrete teacher.
- `opd.losses.DIVERGENCES` is the only source of the divergence names (`opd.loss_type`): no other file of
  the packages lists them.
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
LAZY_OK = {"deepspeed", "matplotlib", "wandb", "math_verify", "vllm", "torch.utils.tensorboard", "gguf", "ray",
           "datasets"}
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


def protocol_members(cls_name: str, file: Path) -> set[str]:
    """Annotated fields and methods of a class (a typing.Protocol) in `file`."""
    tree = ast.parse(file.read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls_name)
    return {n.target.id if isinstance(n, ast.AnnAssign) else n.name for n in cls.body
            if isinstance(n, (ast.AnnAssign, ast.FunctionDef)) and not getattr(n, "name", "").startswith("_")}


TEACHER_BUILDERS = {"setup.py"}  # the one module of opd that builds a concrete teacher (from the model it loads)
LOOP = {"trainer.py", "step.py"}  # the loop and the step: not a word about where the teacher lives


def teacher_violations(files) -> list[str]:
    """Uses of a teacher in opd/ beyond lm.teacher.Teacher's members; concrete teachers built outside the set-up."""
    members = protocol_members("Teacher", REPO / "lm" / "teacher.py")
    found = []
    for path, text in files:
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                base = node.value  # run.teacher.X anywhere; a bare `teacher.X` in the loop (elsewhere the name
                # may be a tensor, e.g. the teacher's logits in opd/losses.py)
                of_run = isinstance(base, ast.Attribute) and base.attr == "teacher" and getattr(base.value, "id", "") == "run"
                bare = isinstance(base, ast.Name) and base.id == "teacher" and path.name == "trainer.py"
                if (of_run or bare) and node.attr not in members:
                    found.append(f"{path}:{node.lineno} uses teacher.{node.attr} (not in lm.teacher.Teacher)")
            elif isinstance(node, ast.ImportFrom) and node.module == "lm.teacher" and path.name not in TEACHER_BUILDERS:
                concrete = [a.name for a in node.names if a.name not in ("Teacher", "TeacherSide", "RoutedSide",
                                                                         "SidePart")]
                if concrete:
                    found.append(f"{path}:{node.lineno} imports {', '.join(concrete)} (only the set-up builds teachers)")
        for word in ("teacher_engine", "offload", "zero3", "teacher_head", "teacher_cache_device"):
            if word in text and path.name in LOOP:
                found.append(f"{path}: mentions {word} (the teacher's placement is lm.teacher's business)")
    return found


def test_the_loop_uses_only_the_teacher_protocol():
    files = [(p, p.read_text()) for p in sorted((REPO / "opd").glob("*.py"))]
    assert teacher_violations(files) == []
    planted = [(Path("opd/trainer.py"), "def f(run, teacher):\n    run.teacher.to('cpu')\n    teacher.eval()\n"
                                        "    return run.teacher_engine\n"),
               (Path("opd/step.py"), "from lm.teacher import LocalTeacher\n")]
    assert len(teacher_violations(planted)) == 4


def divergence_name_lists(files, names: set[str]) -> list[str]:
    """Tuple/list/set literals (a Literal[...]'s too) naming two or more divergences."""
    found = []
    for path, text in files:
        for node in ast.walk(ast.parse(text)):
            items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else None
            listed = {e.value for e in items or () if isinstance(e, ast.Constant)} & names
            if len(listed) >= 2:
                found.append(f"{path}:{node.lineno} lists divergences {sorted(listed)}")
    return found


def test_divergences_registry_is_the_only_list_of_loss_types():
    from opd.losses import DIVERGENCES

    names = set(DIVERGENCES)
    assert {"reverse_kl", "forward_kl", "jsd"} <= names
    files = [(p, p.read_text()) for _, p in sources() if p.name != "losses.py"]
    assert divergence_name_lists(files, names) == []
    planted = [(Path("opd/config.py"), "x: Literal['reverse_kl', 'jsd']\nLOSS_TYPES = ('forward_kl', 'jsd')\n")]
    assert len(divergence_name_lists(planted, names)) == 2


def test_the_checks_catch_planted_violations(tmp_path):
    planted = ast.parse(
        "import importlib\nfrom opd import trainer\n"
        "def f():\n    import json\n    importlib.import_module('eval.grader')\n    import deepspeed  # optional\n")
    found = [(m, lazy) for m, _, lazy in imported_modules(planted)]
    assert ("opd", False) in found and ("importlib", False) in found
    assert ("json", True) in found and ("eval.grader", True) in found and ("deepspeed", True) in found
    assert ours("eval.grader") == "eval" and ours("evaluate") is None and ours("lm.chat") == "lm"
