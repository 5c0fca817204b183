"""Layers point down only: app -> train -> infer -> guides -> models -> data/handlers, with runtime
(checkpoints, processes, signals, the param store, the training loop) below models; nothing in
pyrovae imports experiments/. Every import counts, also those inside functions."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "pyrovae"

# A module may import modules of a lower rank or of its own package (or, at the bottom, its
# siblings: handlers use distributions, data use checks).
RANK = {
    "_typing": 0, "checks": 0, "protocols": 0, "handlers": 0, "distributions": 0, "nets": 0, "data": 0,
    "runtime": 1, "models": 2, "guides": 2.5, "infer": 3, "train": 4, "app": 5,
}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "pyrovae" and len(parts) > 1 else None


def test_layers_point_down_only():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own not in RANK:  # __init__.py, __main__.py: the public surface imports everything
            continue
        for module in sorted(_imports(path)):
            if module.split(".")[0] == "experiments":
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
            layer = _layer(module)
            if layer is not None and layer != own and RANK.get(layer, 99) >= max(RANK[own], 0.5):
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not wrong, "\n".join(wrong)

