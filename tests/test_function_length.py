"""No function in src is over 80 lines (the project's standard): read with ast, decorators and docstring included."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "siamkit"
MAX_LINES = 80


def function_lengths(source: str) -> dict[str, int]:
    """{qualified name: lines from its first decorator (or def) to its last line} of every function in ``source``."""
    lengths = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                    lengths[name] = child.end_lineno - first + 1
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return lengths


def test_function_lengths_are_counted_by_hand():
    source = "@decorator\ndef f():\n    x = 1\n\n    return x\n\nclass C:\n    def g(self):\n        def h():\n            pass\n"
    assert function_lengths(source) == {"f": 5, "C.g": 3, "C.g.h": 2}


def test_no_function_in_src_is_over_80_lines():
    long = sorted(f"{path.relative_to(PACKAGE)}: {name} has {n} lines"
                  for path in PACKAGE.rglob("*.py")
                  for name, n in function_lengths(path.read_text()).items() if n > MAX_LINES)
    assert long == []
