"""Every script in experiments/ is smoke-run with tiny flags by some test (Pyro's test_examples)."""

from __future__ import annotations

import ast
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1]
ROOT = EXPERIMENTS.parent
TEST_FILES = [*ROOT.glob("tests/test_*.py"), *EXPERIMENTS.glob("tests/test_*.py")]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def script_references(source: str) -> set[str]:
    """The experiment scripts a test file's code names: string literals in code (not in docstrings
    or comments) that are ``experiments/NAME.py`` (as passed to the ``load_experiment`` fixture) or
    ``NAME.py`` (joined to the experiments folder)."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value.strip()
            for prefix in ("experiments/", ""):
                if text.startswith(prefix) and text.endswith(".py") and "/" not in text[len(prefix):]:
                    names.add(text[len(prefix):-3])
    return names


def test_every_experiment_has_a_smoke_test():
    scripts = sorted(p.stem for p in EXPERIMENTS.glob("*.py") if not p.stem.startswith("_"))
    referenced = set()
    for path in TEST_FILES:
        if path.name != Path(__file__).name:
            referenced |= script_references(path.read_text())
    missing = [name for name in scripts if name not in referenced]
    assert not missing, (
        f"experiments without a smoke test (load it in a test: load_experiment('experiments/NAME.py')): {missing}"
    )


def test_a_docstring_or_comment_mention_is_no_smoke_test():
    source = '''"""Mentions experiments/a.py."""
# experiments/b.py
def test_x(load_experiment):
    """experiments/c.py"""
    load_experiment("experiments/d.py")
    path = ROOT / "e.py"
'''
    assert script_references(source) == {"d", "e"}
