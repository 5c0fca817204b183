"""Sphinx configuration of pyrovae's API reference (docs/api).

Build from the repository root with the ``docs`` extra installed (``pip install -e ".[docs]"``)::

    python -m sphinx -W --keep-going -b html docs/api docs/api/_build/html

The pages are generated from the installed package, so they cannot go stale:

- ``.. pyrovae-public-api::`` (index.rst) is a summary table of ``pyrovae.__all__``, each name linked
  to its one full description in the page of the module that defines it;
- ``.. pyrovae-package:: pyrovae.data`` documents a subpackage's own docstring and members, then
  every module in it (recursively), each once, at its defining module (re-exports are not repeated).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from docutils.parsers.rst import Directive, directives

import pyrovae

project = "pyrovae"
author = "pyrovae contributors"
release = version = pyrovae.__version__
copyright = "pyrovae contributors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# Nothing is mocked: autodoc imports the real torch and pyro. The optional tracking extras
# (tensorboard, mlflow) need no mock either: pyrovae imports them only when a logger is made.

autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = True

# MathJax runs from a CDN in the browser; nothing is fetched at build time.
html_theme = "alabaster"
html_static_path: list[str] = []
exclude_patterns = ["_build"]
templates_path: list[str] = []


def _canonical(name: str) -> str:
    """The defining module's path of a public name (where its full description lives)."""
    obj = getattr(pyrovae, name)
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module and qualname and module.startswith("pyrovae") and getattr(importlib.import_module(module), qualname, None) is obj:
        return f"{module}.{qualname}"
    # data (OBJECTIVES): found in the module that defines it, the first one whose namespace holds it
    for mod in _all_modules("pyrovae"):
        m = importlib.import_module(mod)
        if m.__dict__.get(name) is obj and name in _own_data(m):
            return f"{mod}.{name}"
    raise ValueError(f"cannot place pyrovae.{name} in a module")


def _own_data(module) -> set[str]:
    """Module-level names assigned in the module's own source (not imported)."""
    from sphinx.pycode import ModuleAnalyzer

    try:
        analyzer = ModuleAnalyzer.for_module(module.__name__)
        analyzer.analyze()
    except Exception:
        return set()
    return {name for (scope, name) in analyzer.attr_docs if scope == ""}


def _all_modules(package: str) -> list[str]:
    pkg = importlib.import_module(package)
    names = [package]
    if hasattr(pkg, "__path__"):
        for info in pkgutil.iter_modules(pkg.__path__, prefix=package + "."):
            if info.name.rsplit(".", 1)[1].startswith("_"):
                continue
            names.extend(_all_modules(info.name))
    return names


class _Generated(Directive):
    def insert(self, lines: list[str]) -> list:
        source = self.state_machine.input_lines.source(self.lineno - self.state_machine.input_offset - 1)
        self.state_machine.insert_input(lines, source)
        return []


class PublicAPI(_Generated):
    """A summary table of ``pyrovae.__all__``, each entry linking to its defining module's page."""

    def run(self):
        # full paths: no current module (index.rst's automodule:: pyrovae sets one)
        lines = [".. currentmodule:: None", "", ".. autosummary::", "   :nosignatures:", ""]
        lines += [f"   ~{_canonical(name)}" for name in pyrovae.__all__]
        return self.insert(lines + [""])


class Package(_Generated):
    """A subpackage's docstring and own members, then each of its modules."""

    required_arguments = 1
    option_spec = {"exclude": directives.unchanged}

    def run(self):
        package = self.arguments[0]
        exclude = set((self.options.get("exclude") or "").split())
        lines: list[str] = []
        for i, mod in enumerate(m for m in _all_modules(package) if m not in exclude):
            if i:
                title = f"``{mod}``"
                lines += [title, "-" * len(title), ""]
            # :ignore-module-all: a package's __all__ re-exports its modules' names; they are
            # documented once, in their own module below.
            lines += [f".. automodule:: {mod}", "   :ignore-module-all:", ""]
        return self.insert(lines)


def setup(app):
    app.add_directive("pyrovae-public-api", PublicAPI)
    app.add_directive("pyrovae-package", Package)
