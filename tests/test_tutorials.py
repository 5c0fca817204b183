"""Every tutorial in ``tutorials/`` runs as a script with CI-sized settings, and writes its figures.

Each ``tutorials/NN_name.py`` (a jupytext percent script) runs in a subprocess with
``PYROVAE_TUTORIAL_SMALL=1`` (its small settings: seconds, not minutes), ``MPLBACKEND=Agg`` and one
thread, and with ``PYROVAE_TUTORIAL_FIGURES`` pointing at a temporary folder so the committed
full-setting figures are left alone. The test fails if the script exits non-zero (the tutorials
assert their own claims at the end, so a library change that breaks a claim breaks its tutorial)
or if any figure the script names (``"NN_*.png"``) was not written. The tutorials must also be
listed in the README and in ``tutorials/README.md``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import find_mnist_root

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))


def figures_named(script: Path) -> list[str]:
    return sorted(set(re.findall(r"[\"'](\d\d_[\w-]+\.png)[\"']", script.read_text())))


def test_there_are_tutorials() -> None:
    assert TUTORIALS, "no tutorials/NN_name.py found"


@pytest.mark.parametrize("script", TUTORIALS, ids=[path.stem for path in TUTORIALS])
def test_tutorial_runs(script: Path, tmp_path: Path) -> None:
    source = script.read_text()
    if "load_mnist" in source:
        find_mnist_root()  # skips without MNIST in $PYROVAE_DATA, fails in CI
    figures = figures_named(script)
    assert figures, f"{script.name} names no figure NN_*.png"
    env = dict(os.environ, PYROVAE_TUTORIAL_SMALL="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1",
               PYROVAE_TUTORIAL_FIGURES=str(tmp_path))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    missing = [name for name in figures if not (tmp_path / name).is_file()]
    assert not missing, f"{script.name} did not write {missing}"


@pytest.mark.parametrize("readme", ["README.md", "tutorials/README.md"])
def test_tutorials_are_listed(readme: str) -> None:
    text = (ROOT / readme).read_text()
    unlisted = [path.name for path in TUTORIALS if path.name not in text]
    assert not unlisted, f"{readme} does not list {unlisted}"
