"""Imports point one way (cli -> api/train/eval -> models/losses/batchnorm -> data -> plumbing), with no cycle.

Read from the source with ast, so imports inside functions and under ``if TYPE_CHECKING:`` count too: a module
that names another's type depends on it as much as one that calls it, and a cycle of annotations is a cycle in
the design.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "siamkit"

# Lower numbers are lower layers; a module may import its own layer or lower ones.
LAYERS = {
    "siamkit._version": 0, "siamkit.errors": 0, "siamkit.fileio": 0, "siamkit.device": 0,
    "siamkit.checkpoint": 0, "siamkit.options": 0, "siamkit.calibration": 0, "siamkit.outputs": 0,
    "siamkit.registry": 0, "siamkit.progress": 0,
    "siamkit.data": 1,
    "siamkit.accel": 2, "siamkit.kernel_choice": 2, "siamkit.winograd": 2, "siamkit.faces": 2, "siamkit.models": 2, "siamkit.losses": 2, "siamkit.batchnorm": 2,
    "siamkit.optimizers": 2,
    "siamkit.config": 3, "siamkit.eval": 3, "siamkit.verifier": 3, "siamkit.gallery": 3,
    "siamkit.train": 4, "siamkit.api": 4, "siamkit.serve": 4, "siamkit.export": 4, "siamkit.exported": 4,
    "siamkit.cli": 5, "siamkit.__main__": 5, "siamkit": 5,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def siamkit_imports(path: Path, source: str | None = None) -> set[str]:
    """Every siamkit module the file imports, anywhere in it (in functions and TYPE_CHECKING blocks too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text() if source is None else source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("siamkit")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("siamkit"):
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base)
    return found - {name}


def layer(name: str) -> int:
    key = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)
    return LAYERS[key]


def graph() -> dict[str, set[str]]:
    return {module_name(p): siamkit_imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    assert all(layer(m) >= 0 for m in graph())


def test_no_import_from_a_lower_layer_to_a_higher_one():
    upward = sorted(f"{m} imports {d}" for m, deps in graph().items() for d in deps if layer(d) > layer(m))
    assert upward == []


def test_models_eval_and_api_never_import_train_and_data_never_imports_models():
    g = graph()
    bad = sorted(
        f"{m} imports {d}" for m, deps in g.items() for d in deps
        if (m.startswith(("siamkit.models", "siamkit.eval", "siamkit.api")) and d.startswith("siamkit.train"))
        or (m.startswith("siamkit.data") and d.startswith(("siamkit.models", "siamkit.train", "siamkit.eval")))
    )
    assert bad == []


def test_type_checking_imports_are_seen():
    """The graph holds an import that only type checkers run (the kind that hid train/step.py -> train/run.py)."""
    source = "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .run import Run\n"
    assert siamkit_imports(PACKAGE / "train" / "step.py", source) == {"siamkit.train.run"}


def test_no_import_cycle():
    g = graph()
    # The package itself is imported before any submodule by Python; only its own imports count as edges.
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if d == "siamkit":
                continue
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert cycles == []
