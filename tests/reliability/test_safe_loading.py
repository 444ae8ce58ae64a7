"""Safe loading: no code path of the project can execute code hidden in a file it reads.

The scan reads the project's Python sources as syntax trees (so a docstring or
comment that names `torch.load` is not a finding) and reports, as file:line,
every call that can unpickle or construct arbitrary objects: `yaml.load`
without a safe loader, `yaml.unsafe_load`/`full_load`, `torch.load` without
`weights_only=True`, `pickle`-family loads, `numpy.load(allow_pickle=True)`,
and `trust_remote_code=True` written into the code instead of coming from the
config. Imports are followed through aliases (`import torch as t`,
`from yaml import load`).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

SCANNED = ("opd", "tip", "eval", "demo", "scripts", "train.py")

SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader"}
YAML_LOADS = {"yaml.load", "yaml.load_all"}
ALWAYS_UNSAFE = {
    "yaml.unsafe_load": "yaml.unsafe_load runs arbitrary constructors",
    "yaml.unsafe_load_all": "yaml.unsafe_load_all runs arbitrary constructors",
    "yaml.full_load": "yaml.full_load is not safe_load",
    "yaml.full_load_all": "yaml.full_load_all is not safe_load",
    "pickle.load": "pickle.load can run code from the file",
    "pickle.loads": "pickle.loads can run code from the data",
    "pickle.Unpickler": "pickle.Unpickler can run code from the file",
    "_pickle.load": "_pickle.load can run code from the file",
    "_pickle.loads": "_pickle.loads can run code from the data",
    "dill.load": "dill.load can run code from the file",
    "dill.loads": "dill.loads can run code from the data",
    "cloudpickle.load": "cloudpickle.load can run code from the file",
    "joblib.load": "joblib.load unpickles",
    "pandas.read_pickle": "pandas.read_pickle unpickles",
}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


class _Scanner(ast.NodeVisitor):
    def __init__(self):
        self.aliases: dict[str, str] = {}  # local name -> dotted module path it stands for
        self.findings: list[tuple[int, str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.asname:
                self.aliases[a.asname] = a.name
            else:
                top = a.name.split(".")[0]
                self.aliases[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.module and not node.level:
            for a in node.names:
                self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def qualname(self, node: ast.AST) -> str | None:
        """`t.load` -> "torch.load" when `t` is torch; None for anything that is not a dotted name."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        head = self.aliases.get(node.id, node.id)
        return ".".join([head, *reversed(parts)])

    def visit_Call(self, node: ast.Call) -> None:
        name = self.qualname(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if name in ALWAYS_UNSAFE:
            self.findings.append((node.lineno, ALWAYS_UNSAFE[name]))
        elif name in YAML_LOADS:
            loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if loader is None or self.qualname(loader) not in SAFE_YAML_LOADERS:
                self.findings.append((node.lineno, f"{name} without Loader=yaml.SafeLoader (use yaml.safe_load)"))
        elif name == "torch.load" and not _is_true(keywords.get("weights_only")):
            self.findings.append((node.lineno, "torch.load without weights_only=True"))
        elif name == "numpy.load" and _is_true(keywords.get("allow_pickle")):
            self.findings.append((node.lineno, "numpy.load with allow_pickle=True"))
        if _is_true(keywords.get("trust_remote_code")):
            self.findings.append((node.lineno, "trust_remote_code=True hard-coded (it must come from the config)"))
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values):
            if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and _is_true(value):
                self.findings.append((node.lineno, "trust_remote_code=True hard-coded (it must come from the config)"))
        self.generic_visit(node)


def scan_file(path: Path, root: Path) -> list[str]:
    """`relative/path.py:line: what` for each unsafe load in one file."""
    scanner = _Scanner()
    scanner.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    rel = path.relative_to(root)
    return [f"{rel}:{line}: {what}" for line, what in sorted(scanner.findings)]


def scan(root: Path, entries=SCANNED) -> list[str]:
    files = []
    for entry in entries:
        path = root / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else []
    return [finding for f in files for finding in scan_file(f, root)]


def test_the_project_loads_nothing_unsafely():
    scanned = [e for e in SCANNED if (REPO / e).exists()]
    assert {"opd", "tip", "eval", "train.py"} <= set(scanned), scanned  # the scan looks where the code is
    assert scan(REPO) == []


PLANTED = '''\
"""Docstrings and comments may name torch.load(path) and yaml.load freely."""
import pickle
import torch as t
import yaml
from yaml import load, unsafe_load
from transformers import AutoModel
import numpy as np

a = yaml.load(open("c.yaml"))
b = load(text, Loader=yaml.FullLoader)
c = unsafe_load(text)
d = t.load("x.pt")
e = t.load("x.pt", weights_only=False)
f = pickle.loads(blob)
g = AutoModel.from_pretrained("org/m", trust_remote_code=True)
h = np.load("a.npy", allow_pickle=True)
i = dict(**{"trust_remote_code": True})
# below: all fine
ok1 = yaml.safe_load(text)
ok2 = yaml.load(text, Loader=yaml.SafeLoader)
ok3 = load(text, yaml.CSafeLoader)
ok4 = t.load("x.pt", map_location="cpu", weights_only=True)
ok5 = AutoModel.from_pretrained("org/m", trust_remote_code=cfg.trust_remote_code)
ok6 = np.load("a.npy")
note = "torch.load(x) in a string"
'''


def test_scanner_reports_every_planted_unsafe_load_by_file_and_line(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "bad.py").write_text(PLANTED)
    (tmp_path / "pkg" / "good.py").write_text("import yaml\nx = yaml.safe_load('a: 1')\n")
    assert scan(tmp_path, entries=("pkg",)) == [
        "pkg/bad.py:9: yaml.load without Loader=yaml.SafeLoader (use yaml.safe_load)",
        "pkg/bad.py:10: yaml.load without Loader=yaml.SafeLoader (use yaml.safe_load)",
        "pkg/bad.py:11: yaml.unsafe_load runs arbitrary constructors",
        "pkg/bad.py:12: torch.load without weights_only=True",
        "pkg/bad.py:13: torch.load without weights_only=True",
        "pkg/bad.py:14: pickle.loads can run code from the data",
        "pkg/bad.py:15: trust_remote_code=True hard-coded (it must come from the config)",
        "pkg/bad.py:16: numpy.load with allow_pickle=True",
        "pkg/bad.py:17: trust_remote_code=True hard-coded (it must come from the config)",
    ]
