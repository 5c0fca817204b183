"""The layers of ``pyrovae/`` point down only: every ``import`` in every module (read with ``ast``,
including imports inside functions and under ``TYPE_CHECKING``) goes to its own layer or to one the
table below allows.

Layers, bottom to top, and what each may import (``ALLOWED`` below; each layer may also import
itself):

=======  ======================================================  ===============================
layer    modules                                                 may import
=======  ======================================================  ===============================
base     checks, nets, distributions, handlers, protocols,       -
         params, _typing
data     data/                                                   base
models   models/                                                 base
guides   guides/                                                 base, models
infer    infer/ (objectives, weights, evaluate, diagnostics,     base, data, models, guides
         local, optim)
runtime  runtime/ (checkpoint, distributed, interrupt, perf)     base … infer
train    train/ (step, trainer)                                  base … runtime
app      app/ (config, build, run, cli, plots)                   base … train
package  pyrovae/__init__.py (the public names), __main__.py     every layer
=======  ======================================================  ===============================

Models know no guide, no data set and no process group; a guide may read its model's site names.
Nothing in ``pyrovae/`` imports the experiments (``studies``, ``experiments``): they are not
installed. A new module under ``pyrovae/`` that the table does not place fails the test until it is
given a layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pyrovae"

#: Module or sub-package (dotted) → layer; a module takes the layer of its longest listed prefix,
#: except that ``pyrovae`` itself is the package only, not everything under it.
LAYER_OF = {
    "pyrovae": "package",
    "pyrovae.__main__": "package",
    "pyrovae.checks": "base",
    "pyrovae.nets": "base",
    "pyrovae.distributions": "base",
    "pyrovae.handlers": "base",
    "pyrovae.protocols": "base",
    "pyrovae._typing": "base",
    "pyrovae.params": "base",
    "pyrovae.data": "data",
    "pyrovae.models": "models",
    "pyrovae.guides": "guides",
    "pyrovae.infer": "infer",
    "pyrovae.runtime": "runtime",
    "pyrovae.train": "train",
    "pyrovae.app": "app",
}

#: Layer → the layers its modules may import (its own included).
_BELOW_INFER = {"base", "data", "models", "guides"}
ALLOWED = {
    "base": {"base"},
    "data": {"base", "data"},
    "models": {"base", "models"},
    "guides": {"base", "models", "guides"},
    "infer": _BELOW_INFER | {"infer"},
    "runtime": _BELOW_INFER | {"infer", "runtime"},
    "train": _BELOW_INFER | {"infer", "runtime", "train"},
    "app": _BELOW_INFER | {"infer", "runtime", "train", "app"},
    "package": set(LAYER_OF.values()),
}

#: Top-level names that must never be imported from pyrovae/: the experiments are not installed.
EXPERIMENTS = {"studies", "experiments"}

#: (importing file, imported module) pairs that break the table today and are being fixed
#: elsewhere (issue 16). Each must still be an actual violation, so that fixing one makes this
#: test fail until its line is deleted here: the list only shrinks. Do not add to it.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer of a ``pyrovae`` module, by the longest prefix in :data:`LAYER_OF`."""
    if module == "pyrovae":
        return LAYER_OF[module]
    parts = module.split(".")
    for end in range(len(parts), 1, -1):
        layer = LAYER_OF.get(".".join(parts[:end]))
        if layer is not None:
            return layer
    return None


def _is_module(dotted: str) -> bool:
    relative = Path(*dotted.split("."))
    return (PACKAGE.parent / relative.with_suffix(".py")).is_file() or (PACKAGE.parent / relative / "__init__.py").is_file()


def imports(path: Path, text: str | None = None) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import in the module at ``path`` (its text, or
    ``text``). ``from a import b`` counts as importing ``a.b`` when that is a module of ours
    (``from pyrovae import nets``), else ``a`` (``from pyrovae import fit`` imports the package)."""
    tree = ast.parse(path.read_text() if text is None else text, filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..models import VAE
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.append((node.lineno, sub if _is_module(sub) else module))
    return found


def scan() -> tuple[list[tuple[str, int, str, str]], list[str]]:
    """Every import that breaks the table, as ``(file, line, imported module, why)``, and the
    modules that no row of :data:`LAYER_OF` places."""
    bad: list[tuple[str, int, str, str]] = []
    unplaced: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        layer = layer_of(module_name(path))
        if layer is None:
            unplaced.append(relative)
            continue
        for line, target in imports(path):
            top = target.split(".")[0]
            if top in EXPERIMENTS:
                bad.append((relative, line, target, "the experiments are not part of the installed package"))
            elif top == "pyrovae":
                target_layer = layer_of(target)
                if target_layer is None:
                    unplaced.append(target)
                elif target_layer not in ALLOWED[layer]:
                    allowed = ", ".join(sorted(ALLOWED[layer]))
                    bad.append((relative, line, target, f"{layer} imports {target_layer}; {layer} may import {allowed}"))
    return bad, unplaced


def test_the_table_places_every_module() -> None:
    _, unplaced = scan()
    assert not unplaced, f"modules without a layer (add them to LAYER_OF in tests/test_layers.py): {sorted(set(unplaced))}"


def test_layers_point_down_only() -> None:
    bad, _ = scan()
    new = [f"{file}:{line} imports {target} ({why})" for file, line, target, why in bad
           if (file, target) not in KNOWN_VIOLATIONS]
    assert not new, "imports against the layer table (tests/test_layers.py):\n  " + "\n  ".join(new)
    fixed = sorted(KNOWN_VIOLATIONS - {(file, target) for file, _, target, _ in bad})
    assert not fixed, f"no longer violated, so delete them from KNOWN_VIOLATIONS in tests/test_layers.py: {fixed}"


def test_the_scan_sees_every_form_of_import() -> None:
    """Plain, from-, relative, nested and facade imports are all found, and placed in their layer."""
    source = (
        "import pyrovae.runtime.distributed\n"
        "from pyrovae import nets, fit\n"
        "from ..guides import AmortizedGuide\n"
        "from . import vae\n"
        "def f():\n"
        "    from studies import vq\n"
    )
    found = [target for _, target in imports(PACKAGE / "models" / "probe.py", source)]
    assert found == ["pyrovae.runtime.distributed", "pyrovae.nets", "pyrovae", "pyrovae.guides",
                     "pyrovae.models.vae", "studies"]
    assert [layer_of(target) for target in found[:-1]] == ["runtime", "base", "package", "guides", "models"]
    assert layer_of("pyrovae.infer.objectives.iwae") == "infer" and layer_of("pyrovae.__main__") == "package"
    assert layer_of("pyrovae.newmodule") is None  # placed by no row: test_the_table_places_every_module fails
